//! Reading the files that changed, and only those, into the [`Catalog`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, Delta, FileStamp};
use crate::parse::Loader;
use crate::{manifest_files, read_manifest, FileContent, ManifestProblem, SourceError};

/// The manifests at one path, as last read.
#[derive(Debug)]
pub(crate) struct Reloader {
    path: PathBuf,
    node_name: String,
    /// `path` is a single file: while it cannot be read (even when it is gone) its objects
    /// stay, as for a whole directory that cannot be listed.
    single_file: bool,
    catalog: Catalog,
    /// The last read error per file, and of the path itself, so a lasting one is logged once.
    errors: HashMap<PathBuf, String>,
    path_error: Option<String>,
}

impl Reloader {
    pub fn new(path: PathBuf, node_name: String) -> Self {
        let single_file = fs::metadata(&path).is_ok_and(|m| m.is_file());
        Reloader {
            path,
            node_name,
            single_file,
            catalog: Catalog::default(),
            errors: HashMap::new(),
            path_error: None,
        }
    }

    /// Reads every file. Any file that cannot be read fails the load: nothing has been
    /// handed over yet, so there are no objects to keep.
    pub fn load_all(&mut self) -> Result<Delta, SourceError> {
        let mut delta = Delta::default();
        for (file, meta) in manifest_files(&self.path)? {
            self.refresh(&file, Some(meta), true, &mut delta)?;
        }
        self.settle(&mut delta);
        Ok(delta)
    }

    /// Compares every file with what was read and reads again those that changed, were
    /// added, or are in `forced`; forgets removed files. While the path cannot be listed,
    /// nothing changes.
    pub fn rescan(&mut self, forced: &BTreeSet<PathBuf>) -> Delta {
        let mut delta = Delta::default();
        match manifest_files(&self.path) {
            Err(err) => {
                let message = err.to_string();
                if self.path_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!("{message}; keeping the previously loaded objects");
                    self.path_error = Some(message);
                }
            }
            Ok(files) => {
                if self.path_error.take().is_some() {
                    tracing::info!(path = %self.path.display(), "manifests path readable again");
                }
                let listed: HashSet<&Path> = files.iter().map(|(f, _)| f.as_path()).collect();
                let gone: Vec<PathBuf> = self
                    .catalog
                    .files()
                    .filter(|f| !listed.contains(f))
                    .map(Path::to_owned)
                    .collect();
                // Errors of files that are gone and were never read (not in the catalog).
                let catalog = &self.catalog;
                self.errors
                    .retain(|f, _| listed.contains(f.as_path()) || catalog.contains(f));
                // Looked at once more: one the listing skipped because its metadata cannot
                // be read (a symlink loop, say) is unreadable, not gone, and keeps its
                // objects.
                for file in gone {
                    self.refresh_or_keep(&file, None, true, &mut delta);
                }
                for (file, meta) in files {
                    let force = forced.contains(&file);
                    self.refresh_or_keep(&file, Some(meta), force, &mut delta);
                }
            }
        }
        self.settle(&mut delta);
        delta
    }

    /// Reads again `files`, which events said changed (a file that is gone is forgotten).
    pub fn changed(&mut self, files: &BTreeSet<PathBuf>) -> Delta {
        if self.single_file {
            return self.rescan(files);
        }
        let mut delta = Delta::default();
        // In name order: a file that takes over an object from an earlier one is then
        // read after it (see `settle`).
        for file in files {
            self.refresh_or_keep(file, None, true, &mut delta);
        }
        self.settle(&mut delta);
        delta
    }

    /// Reads the files that now hold the winning definition of an object another file
    /// dropped, then the ServiceCIDR ranges.
    fn settle(&mut self, delta: &mut Delta) {
        // `refresh` takes the file off the list (and reads it whole); the removal after
        // it covers a read that failed first.
        while let Some(file) = delta.promoted.first().cloned() {
            self.refresh_or_keep(&file, None, true, delta);
            delta.promoted.remove(&file);
        }
        self.catalog.finish(delta);
    }

    /// [`Self::refresh`]; a file that cannot be read keeps its objects and is reported
    /// once per distinct error.
    fn refresh_or_keep(
        &mut self,
        file: &Path,
        meta: Option<fs::Metadata>,
        force: bool,
        delta: &mut Delta,
    ) {
        if let Err(err) = self.refresh(file, meta, force, delta) {
            // Read it again next time, whatever its stamp.
            self.catalog.forget_stamp(file);
            let message = err.to_string();
            if self.errors.get(file) != Some(&message) {
                tracing::warn!("{message}; keeping its objects");
                self.errors.insert(file.to_owned(), message);
            }
        }
    }

    /// Reads `file` if it changed since it was read (or `force`); `meta`: its metadata when
    /// the directory listing just took it.
    fn refresh(
        &mut self,
        file: &Path,
        meta: Option<fs::Metadata>,
        force: bool,
        delta: &mut Delta,
    ) -> Result<(), SourceError> {
        let read_error = |source| SourceError::ReadFile {
            path: file.to_owned(),
            source,
        };
        let meta = match meta.map_or_else(|| fs::metadata(file), Ok) {
            Ok(meta) if meta.is_file() => meta,
            // Not a regular file (any more): a directory listing skips it too.
            Ok(_) if !self.single_file => return self.vanished(file, delta),
            Ok(_) => {
                let source = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
                return Err(read_error(source));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => return self.vanished(file, delta),
            Err(err) => return Err(read_error(err)),
        };
        // Taken before the read: a change racing with it is seen next time.
        let stamp = stamp(&meta);
        if !force && self.catalog.stamp(file) == Some(&stamp) {
            return Ok(());
        }
        if delta.promoted.remove(file) {
            self.catalog.forget_documents(file);
        }
        let objects = match read_manifest(file)? {
            FileContent::Text(text) => {
                let mut loader = Loader::new(&self.node_name);
                loader.add_file(file, &text, &self.catalog.known_documents(file));
                let (objects, problems) = loader.finish();
                delta.problems.extend(problems);
                objects
            }
            FileContent::Invalid(message) => {
                delta.problems.push(ManifestProblem {
                    file: file.to_owned(),
                    document: 0,
                    line: None,
                    column: None,
                    message,
                });
                Vec::new()
            }
            FileContent::Gone => return self.vanished(file, delta),
        };
        delta.files_read += 1;
        self.errors.remove(file);
        self.catalog.set_file(file, stamp, objects, delta);
        Ok(())
    }

    fn vanished(&mut self, file: &Path, delta: &mut Delta) -> Result<(), SourceError> {
        if self.single_file {
            return Err(SourceError::Access {
                path: file.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        self.forget(file, delta);
        Ok(())
    }

    fn forget(&mut self, file: &Path, delta: &mut Delta) {
        self.errors.remove(file);
        delta.promoted.remove(file);
        self.catalog.remove_file(file, delta);
    }
}

fn stamp(meta: &fs::Metadata) -> FileStamp {
    FileStamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: inode(meta),
    }
}

#[cfg(unix)]
fn inode(meta: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &fs::Metadata) -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::source::SourceUpdate;

    fn service(name: &str, port: u16) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - port: {port}\n")
    }

    /// The upserted Services (name, port) and the removed ones' names.
    fn sent(delta: Delta) -> (Vec<(String, u16)>, Vec<String>) {
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for update in delta.into_updates() {
            if let SourceUpdate::Changes(changes) = update {
                for record in &changes.services {
                    let port = record.ports.first().map_or(0, |p| p.port);
                    upserts.push((record.name.name.to_string(), port));
                }
                removed.extend(changes.removed_services.iter().map(|n| n.name.to_string()));
            }
        }
        upserts.sort();
        removed.sort();
        (upserts, removed)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    /// A file read again parses, and sends, only the documents whose text changed; a
    /// document that was a duplicate or broken is read again whatever its text, and so
    /// is a whole file that takes over an object from another, even when it changed in
    /// the same reload.
    #[test]
    fn a_file_read_again_sends_only_its_changed_documents() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        let many: String = (0..40).map(|i| service(&format!("s{i}"), 80)).collect();
        let dup = service("web", 81);
        fs::write(
            &a,
            format!("{many}{}{}", service("web", 80), service("gone", 80)),
        )
        .unwrap();
        fs::write(&b, format!("{dup}{}", service("x", 80))).unwrap();
        let mut reloader = Reloader::new(dir.path().to_owned(), "node".into());
        let first = reloader.load_all().unwrap();
        assert_eq!(first.summary().services, 43);
        assert_eq!(first.problems.len(), 1, "{:?}", first.problems);

        // One Service changed, one removed, one added at the top, the rest moved down a
        // document: only the change and the addition are sent.
        let moved = format!(
            "{}{}{}",
            service("new", 80),
            many.replace("s7\n", "s7b\n"),
            service("web", 80)
        );
        fs::write(&a, moved).unwrap();
        let delta = reloader.changed(&BTreeSet::from([a.clone()]));
        assert_eq!(delta.files_read, 1);
        assert_eq!(
            sent(delta),
            (
                vec![("new".into(), 80), ("s7b".into(), 80)],
                names(&["gone", "s7"])
            )
        );

        // Written again unchanged: nothing.
        let same = fs::read_to_string(&a).unwrap();
        fs::write(&a, &same).unwrap();
        assert_eq!(
            sent(reloader.changed(&BTreeSet::from([a.clone()]))),
            (vec![], vec![])
        );

        // A duplicate inside a file, not first, is parsed again when the first goes.
        fs::write(&b, format!("{dup}{}{}", service("x", 80), service("x", 90))).unwrap();
        let delta = reloader.changed(&BTreeSet::from([b.clone()]));
        assert_eq!(delta.problems.len(), 2, "{:?}", delta.problems);
        assert_eq!(sent(delta), (vec![], vec![]));
        fs::write(&b, format!("{dup}{}", service("x", 90))).unwrap();
        assert_eq!(
            sent(reloader.changed(&BTreeSet::from([b.clone()]))),
            (vec![("x".into(), 90)], vec![])
        );

        // a drops web while b, whose web was a duplicate until now, changes elsewhere in
        // the same reload: b's unchanged web document is the definition now, and is sent.
        fs::write(&a, many.clone()).unwrap();
        fs::write(&b, format!("{dup}{}", service("x", 91))).unwrap();
        let delta = reloader.changed(&BTreeSet::from([a.clone(), b.clone()]));
        assert_eq!(
            sent(delta),
            (
                vec![("s7".into(), 80), ("web".into(), 81), ("x".into(), 91)],
                names(&["new", "s7b"])
            )
        );
    }
}
