//! The manifests source: Services, EndpointSlices and this node's Node read from a YAML file
//! or a directory of them, reloaded when the files change.
//!
//! Problems in the manifests (bad YAML, wrong types, duplicates) are reported per document
//! and never stop the other documents from applying. Only failing to read the path itself is
//! an error. Service semantics (IPs, ports) are not checked here: the change tracker in
//! `proxy-core` does that for every source.

#![forbid(unsafe_code)]

mod parse;
mod split;

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy_core::source::{Objects, SourceUpdate};
use tokio::sync::mpsc;

use crate::parse::Loader;

/// Files larger than this are skipped with a problem, so a hostile or mistaken file (a log,
/// a disk image) cannot make the proxy allocate without bound.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Something wrong in the manifests; the document (or file) it concerns was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// 1-based index of the document among the file's non-empty documents; 0 when the problem
    /// concerns the whole file (too large, not UTF-8).
    pub document: usize,
    /// 1-based line in the file.
    pub line: Option<u64>,
    /// 1-based column.
    pub column: Option<u64>,
    pub message: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The result of reading the manifests once.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub objects: Objects,
    pub problems: Vec<ManifestProblem>,
    /// How many manifest files were read.
    pub files: usize,
}

/// Failures to read the manifests path itself; problems inside files are [`ManifestProblem`]s.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path does not exist or its metadata cannot be read.
    #[error("cannot access manifests path {}: {source}", path.display())]
    Access { path: PathBuf, source: io::Error },
    /// The path is neither a regular file nor a directory.
    #[error("manifests path {} is neither a file nor a directory", path.display())]
    NotFileOrDirectory { path: PathBuf },
    /// The directory cannot be listed.
    #[error("cannot list manifests directory {}: {source}", path.display())]
    ListDirectory { path: PathBuf, source: io::Error },
    /// A manifest file exists but cannot be read (e.g. permissions). This fails the whole load
    /// rather than silently dropping that file's objects.
    #[error("cannot read manifest file {}: {source}", path.display())]
    ReadFile { path: PathBuf, source: io::Error },
    /// The background task reading the files died.
    #[error("manifest loading task failed: {0}")]
    Task(String),
}

/// Reads the manifests at `path` once.
///
/// `node_name`: only the Node with this `metadata.name` is kept (others are ignored).
pub fn load(path: &Path, node_name: &str) -> Result<LoadReport, SourceError> {
    let files = manifest_files(path)?;
    let mut loader = Loader::new(node_name);
    let mut read = 0;
    for file in &files {
        match read_manifest(file)? {
            FileContent::Text(text) => {
                read += 1;
                loader.add_file(file, &text);
            }
            FileContent::Invalid(message) => {
                read += 1;
                loader.file_problem(file, message);
            }
            FileContent::Gone => {}
        }
    }
    let (objects, problems) = loader.finish();
    Ok(LoadReport {
        objects,
        problems,
        files: read,
    })
}

/// Loads `path`, sends [`SourceUpdate::Replace`], then polls every `interval` and reloads and
/// sends `Replace` again whenever a file was added, removed or modified.
///
/// Problems are logged as warnings. If the path becomes unreadable the last objects stay in
/// force (nothing is sent) until it can be read again. Returns when the receiver is dropped;
/// errors only if the first load fails.
pub async fn watch(
    path: PathBuf,
    node_name: String,
    interval: Duration,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<(), SourceError> {
    let (mut last_fingerprint, report) = load_blocking(&path, &node_name).await?;
    tracing::info!(
        path = %path.display(),
        files = report.files,
        services = report.objects.services.len(),
        endpoint_slices = report.objects.endpoint_slices.len(),
        problems = report.problems.len(),
        "loaded manifests"
    );
    log_problems(&report.problems);
    if tx
        .send(SourceUpdate::Replace(report.objects))
        .await
        .is_err()
    {
        return Ok(());
    }

    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // The first tick is immediate; we just loaded.
                         // The last read error, so a persistent one is logged once rather than every interval.
    let mut last_error: Option<String> = None;

    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = ticker.tick() => {}
        }

        let result = match fingerprint_blocking(&path).await {
            Ok(fp) if fp == last_fingerprint => continue,
            Ok(_) => load_blocking(&path, &node_name).await,
            Err(err) => Err(err),
        };
        match result {
            Ok((fingerprint, report)) => {
                last_error = None;
                last_fingerprint = fingerprint;
                tracing::info!(
                    path = %path.display(),
                    files = report.files,
                    services = report.objects.services.len(),
                    endpoint_slices = report.objects.endpoint_slices.len(),
                    problems = report.problems.len(),
                    "manifests changed, reloaded"
                );
                log_problems(&report.problems);
                if tx
                    .send(SourceUpdate::Replace(report.objects))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(err) => {
                let message = err.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!("{message}; keeping the previously loaded objects");
                    last_error = Some(message);
                }
            }
        }
    }
}

fn log_problems(problems: &[ManifestProblem]) {
    for p in problems {
        tracing::warn!(
            file = %p.file.display(),
            document = p.document,
            line = p.line,
            column = p.column,
            "manifest problem: {p}"
        );
    }
}

/// Cheap summary of the manifest files: (name, size, mtime, inode) of each. Symlinks are
/// followed, so the atomic `..data` swap of a mounted ConfigMap shows up as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<FileStamp>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn fingerprint(path: &Path) -> Result<Fingerprint, SourceError> {
    let mut stamps = Vec::new();
    for file in manifest_files(path)? {
        match fs::metadata(&file) {
            Ok(meta) => stamps.push(FileStamp {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: inode(&meta),
                path: file,
            }),
            // Removed since the listing; the next poll sees the directory without it.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SourceError::ReadFile { path: file, source }),
        }
    }
    Ok(Fingerprint(stamps))
}

#[cfg(unix)]
fn inode(meta: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &fs::Metadata) -> u64 {
    0
}

/// Fingerprint then load, off the async runtime. The fingerprint is taken first so a change
/// racing with the read is seen by the next poll.
async fn load_blocking(
    path: &Path,
    node_name: &str,
) -> Result<(Fingerprint, LoadReport), SourceError> {
    let path = path.to_owned();
    let node_name = node_name.to_owned();
    tokio::task::spawn_blocking(move || {
        let fp = fingerprint(&path)?;
        let report = load(&path, &node_name)?;
        Ok((fp, report))
    })
    .await
    .map_err(|err| SourceError::Task(err.to_string()))?
}

async fn fingerprint_blocking(path: &Path) -> Result<Fingerprint, SourceError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || fingerprint(&path))
        .await
        .map_err(|err| SourceError::Task(err.to_string()))?
}

/// The files to read, in order: `path` itself if it is a file, else the manifest files
/// directly inside the directory, sorted by name.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let meta = fs::metadata(path).map_err(|source| SourceError::Access {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    if !meta.is_dir() {
        return Err(SourceError::NotFileOrDirectory {
            path: path.to_owned(),
        });
    }
    let list_error = |source| SourceError::ListDirectory {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !is_manifest_name(name) {
            continue;
        }
        let file = entry.path();
        // Follows symlinks; dangling links and subdirectories are skipped.
        if fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn is_manifest_name(name: &str) -> bool {
    // Hidden files include editor lock files (`.#foo.yaml`) and swap files (`.foo.yaml.swp`).
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

enum FileContent {
    Text(String),
    /// Readable but unusable as a whole; the message says why.
    Invalid(String),
    /// Removed between listing and reading.
    Gone,
}

fn read_manifest(path: &Path) -> Result<FileContent, SourceError> {
    let read_error = |source| SourceError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(FileContent::Gone),
        Err(err) => return Err(read_error(err)),
    };
    let too_large = || {
        FileContent::Invalid(format!(
            "file is larger than {MAX_FILE_BYTES} bytes, skipped"
        ))
    };
    let len = file.metadata().map_err(read_error)?.len();
    if len > MAX_FILE_BYTES {
        return Ok(too_large());
    }
    // `take` guards against a file that grows after the size check.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Ok(too_large());
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(FileContent::Text(text)),
        Err(err) => Ok(FileContent::Invalid(format!(
            "file is not valid UTF-8 (at byte {}), skipped",
            err.utf8_error().valid_up_to()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        for ok in ["a.yaml", "b.yml", "c.json", "svc.v2.yaml"] {
            assert!(is_manifest_name(ok), "{ok}");
        }
        for skip in [
            ".hidden.yaml",
            ".#a.yaml",
            "a.yaml~",
            ".a.yaml.swp",
            "a.yaml.swp",
            "README.md",
            ".yaml",
            "a.txt",
        ] {
            assert!(!is_manifest_name(skip), "{skip}");
        }
    }

    #[test]
    fn problem_display() {
        let mut p = ManifestProblem {
            file: PathBuf::from("/m/a.yaml"),
            document: 2,
            line: Some(7),
            column: Some(9),
            message: "bad".into(),
        };
        assert_eq!(p.to_string(), "/m/a.yaml:7:9: document 2: bad");
        p.column = None;
        assert_eq!(p.to_string(), "/m/a.yaml:7: document 2: bad");
        p.line = None;
        p.document = 0;
        assert_eq!(p.to_string(), "/m/a.yaml: bad");
    }
}
