//! The manifests source: Services, EndpointSlices and this node's Node read from a YAML file
//! or a directory of them. After the first load, inotify says which files changed and only
//! those are read again; what they define is compared with what they defined before, so
//! one changed file among thousands costs about one file (see `wake`, `reload`, `catalog`).
//!
//! Problems in the manifests (bad YAML, wrong types, duplicates) are reported per document
//! and never stop the other documents from applying. Only failing to read the path itself is
//! an error. Service semantics (IPs, ports) are not checked here: the change tracker in
//! `proxy-core` does that for every source.

#![forbid(unsafe_code)]

mod catalog;
mod parse;
mod reload;
mod split;
mod wake;

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_core::source::{Objects, SourceUpdate};
use tokio::sync::mpsc;

use crate::reload::Reloader;
use crate::wake::Waker;

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
    /// A manifest file exists but cannot be read (e.g. permissions). This fails a first
    /// load rather than silently dropping that file's objects; later, the file keeps the
    /// objects it last defined.
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
    let mut reloader = Reloader::new(path.to_owned(), node_name.to_owned());
    let mut delta = reloader.load_all()?;
    let files = delta.files_read;
    let problems = std::mem::take(&mut delta.problems);
    Ok(LoadReport {
        objects: delta.into_objects(),
        problems,
        files,
    })
}

/// How [`watch`] notices changes.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// While inotify watches the directory: how often every file is compared with what was
    /// read anyway, for changes no event reports (a symlink into another directory, a
    /// network filesystem). 20 s, as the kubelet checks its static-pod manifests: at
    /// 10,000 files a comparison costs tens of milliseconds of CPU.
    pub resync_interval: Duration,
    /// Without inotify, or while the directory cannot be watched: how often every file is
    /// compared.
    pub poll_interval: Duration,
    /// While watched: how often the path is resolved again, to watch the new directory when
    /// it now leads elsewhere (a symlink swapped above it) or exists again; a single file is
    /// compared this often. One `stat`.
    pub path_check_interval: Duration,
    /// Events are applied once none came for this long, so a burst is one reload.
    pub coalesce: Duration,
    /// Use inotify; false polls only.
    pub inotify: bool,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            resync_interval: Duration::from_secs(20),
            poll_interval: Duration::from_millis(250),
            path_check_interval: Duration::from_secs(1),
            coalesce: Duration::from_millis(5),
            inotify: true,
        }
    }
}

/// Loads `path` and sends [`SourceUpdate::Replace`]; then, whenever files change, reads
/// those files again and sends what changed in them ([`SourceUpdate::Changes`], and
/// [`SourceUpdate::Node`] / [`SourceUpdate::ServiceCidrs`] when those changed).
///
/// Problems are logged as warnings. A file that becomes unreadable keeps its objects, as
/// does the whole path while it cannot be listed, until it can be read again (logged once).
/// Returns when the receiver is dropped; errors only if the first load fails.
pub async fn watch(
    path: PathBuf,
    node_name: String,
    config: WatchConfig,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<(), SourceError> {
    // Watching starts before the first read, so a change during it is not missed.
    let mut waker = Waker::new(&path, config);
    let reloader = Reloader::new(path.clone(), node_name);
    let (mut reloader, delta) = blocking(reloader, |r| r.load_all()).await?;
    let mut delta = delta?;
    tracing::info!(
        path = %path.display(),
        files = delta.files_read,
        services = delta.summary().services,
        endpoint_slices = delta.summary().endpoint_slices,
        problems = delta.problems.len(),
        "loaded manifests"
    );
    log_problems(&std::mem::take(&mut delta.problems));
    if tx
        .send(SourceUpdate::Replace(delta.into_objects()))
        .await
        .is_err()
    {
        return Ok(());
    }

    loop {
        let wake = tokio::select! {
            _ = tx.closed() => return Ok(()),
            wake = waker.next() => wake,
        };
        let (back, mut delta) = blocking(reloader, move |r| {
            if wake.rescan {
                r.rescan(&wake.files)
            } else {
                r.changed(&wake.files)
            }
        })
        .await?;
        reloader = back;
        let summary = delta.summary();
        if !summary.is_empty() || !delta.problems.is_empty() {
            tracing::info!(
                path = %path.display(),
                files = delta.files_read,
                services = summary.services,
                removed_services = summary.removed_services,
                endpoint_slices = summary.endpoint_slices,
                removed_endpoint_slices = summary.removed_endpoint_slices,
                node = summary.node,
                service_cidrs = summary.service_cidrs,
                problems = delta.problems.len(),
                "manifests changed, re-read the changed files"
            );
        }
        log_problems(&std::mem::take(&mut delta.problems));
        for update in delta.into_updates() {
            if tx.send(update).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Runs `f` on the reloader off the async runtime (it reads files), and hands it back.
async fn blocking<T: Send + 'static>(
    mut reloader: Reloader,
    f: impl FnOnce(&mut Reloader) -> T + Send + 'static,
) -> Result<(Reloader, T), SourceError> {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut reloader);
        (reloader, out)
    })
    .await
    .map_err(|err| SourceError::Task(err.to_string()))
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

/// The files to read, in order, with their metadata (symlinks followed): `path` itself if
/// it is a file, else the manifest files directly inside the directory, sorted by name.
pub(crate) fn manifest_files(path: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, SourceError> {
    let meta = fs::metadata(path).map_err(|source| SourceError::Access {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_file() {
        return Ok(vec![(path.to_owned(), meta)]);
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
        match fs::metadata(&file) {
            Ok(meta) if meta.is_file() => files.push((file, meta)),
            _ => {}
        }
    }
    // By bytes, which for the entries of one directory is the order of their names (and
    // of `Path`'s comparison), without splitting every path into components.
    files.sort_unstable_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(files)
}

pub(crate) fn is_manifest_name(name: &str) -> bool {
    // Hidden files include editor lock files (`.#foo.yaml`) and swap files (`.foo.yaml.swp`).
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

pub(crate) enum FileContent {
    Text(String),
    /// Readable but unusable as a whole; the message says why.
    Invalid(String),
    /// Removed between listing and reading.
    Gone,
}

pub(crate) fn read_manifest(path: &Path) -> Result<FileContent, SourceError> {
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
