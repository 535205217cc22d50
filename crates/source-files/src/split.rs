//! Splitting a manifest file into YAML documents by hand.
//!
//! serde-saphyr can read multi-document streams, but one syntax error ends the whole stream.
//! Splitting first lets a broken document be reported and skipped while its neighbours still
//! apply, and keeps each document's line offset so errors point at real file lines.

/// One non-empty document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Document<'a> {
    /// 1-based index among the file's non-empty documents.
    pub index: usize,
    /// 1-based file line of the first line of `text`.
    pub first_line: u64,
    /// 1-based file line of the first line holding actual content (not a comment or blank).
    pub content_line: u64,
    /// The document's text. It may begin with its `---` marker line, which YAML accepts.
    pub text: &'a str,
}

impl Document<'_> {
    /// Turns a 1-based line within `text` into a 1-based line of the file.
    pub fn file_line(&self, line_in_doc: u64) -> u64 {
        self.first_line + line_in_doc.saturating_sub(1)
    }
}

/// Splits `text` at `---` document-start and `...` document-end marker lines.
///
/// Documents holding nothing but blank lines, comments and directives are dropped and not
/// counted in [`Document::index`].
pub(crate) fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut current = Pending {
        start: 0,
        first_line: 1,
        content_line: None,
    };
    let mut offset = 0;
    let mut line_no: u64 = 0;

    for raw in text.split_inclusive('\n') {
        line_no += 1;
        let line_start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);

        if let Some(rest) = marker_rest(line, "---") {
            current.close(text, line_start, &mut docs);
            // The marker line stays in the new document: YAML allows content after `---`
            // (e.g. `--- |`), and keeping it makes saphyr's line numbers map one-to-one.
            current = Pending {
                start: line_start,
                first_line: line_no,
                content_line: (!is_blank_or_comment(rest)).then_some(line_no),
            };
        } else if marker_rest(line, "...").is_some() {
            current.close(text, line_start, &mut docs);
            current = Pending {
                start: offset,
                first_line: line_no + 1,
                content_line: None,
            };
        } else if current.content_line.is_none()
            && !is_blank_or_comment(line)
            // Directives (`%YAML`) precede a document's `---`; they are not content.
            && !line.starts_with('%')
        {
            current.content_line = Some(line_no);
        }
    }
    current.close(text, text.len(), &mut docs);
    docs
}

struct Pending {
    start: usize,
    first_line: u64,
    content_line: Option<u64>,
}

impl Pending {
    fn close<'a>(&self, text: &'a str, end: usize, docs: &mut Vec<Document<'a>>) {
        let (Some(content_line), Some(body)) = (self.content_line, text.get(self.start..end))
        else {
            return;
        };
        docs.push(Document {
            index: docs.len() + 1,
            first_line: self.first_line,
            content_line,
            text: body,
        });
    }
}

/// If `line` is the given marker alone or followed by whitespace, returns what follows it.
fn marker_rest<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(text: &str) -> Vec<(usize, u64, u64, &str)> {
        split_documents(text)
            .into_iter()
            .map(|d| (d.index, d.first_line, d.content_line, d.text))
            .collect()
    }

    #[test]
    fn single_document_without_markers() {
        assert_eq!(summary("a: 1\nb: 2\n"), vec![(1, 1, 1, "a: 1\nb: 2\n")]);
    }

    #[test]
    fn splits_on_markers_and_drops_empty_documents() {
        let text = "# header\n---\na: 1\n--- # second\n\n---\n\nb: 2\n...\n# trailing\n";
        assert_eq!(
            summary(text),
            vec![(1, 2, 3, "---\na: 1\n"), (2, 6, 8, "---\n\nb: 2\n"),]
        );
    }

    #[test]
    fn content_on_marker_line_counts() {
        assert_eq!(
            summary("--- |\n  text\n---x: 1\n"),
            vec![(1, 1, 1, "--- |\n  text\n---x: 1\n")]
        );
    }

    #[test]
    fn bare_document_after_end_marker() {
        assert_eq!(
            summary("a: 1\n...\nb: 2"),
            vec![(1, 1, 1, "a: 1\n"), (2, 3, 3, "b: 2")]
        );
    }

    #[test]
    fn crlf_and_directives() {
        assert_eq!(
            summary("%YAML 1.2\r\n---\r\na: 1\r\n"),
            vec![(1, 2, 3, "---\r\na: 1\r\n")]
        );
    }

    #[test]
    fn file_line_mapping() {
        let docs = split_documents("a: 1\n---\nb: 2\nc: 3\n");
        assert_eq!(docs[1].file_line(1), 2);
        assert_eq!(docs[1].file_line(3), 4);
    }
}
