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
        while let Some(file) = delta.promoted.pop_first() {
            self.refresh_or_keep(&file, None, true, delta);
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
        delta.promoted.remove(file);
        let objects = match read_manifest(file)? {
            FileContent::Text(text) => {
                let mut loader = Loader::new(&self.node_name);
                loader.add_file(file, &text);
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
