//! What wakes the manifests source: inotify events in the directory, and timers.
//!
//! The directory (or, for a single file, its parent) is watched for files created, written,
//! renamed in or out, deleted, or whose attributes changed. A burst of events is applied
//! once it has been quiet for `coalesce`. Timers cover what inotify cannot see: every
//! `resync_interval` every file is compared with what was read (changes through symlinks
//! into other directories, filesystems that send no events); every `path_check_interval`
//! the path is resolved again, so a directory swapped in behind a symlink (as git-sync
//! does) or created again gets a new watch. Without inotify (or while the directory cannot
//! be watched) everything is compared every `poll_interval`, as before inotify.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::{is_manifest_name, WatchConfig};

/// The symlink a mounted ConfigMap or Secret swaps atomically to a new directory; its
/// files are symlinks through it, so a swap changes all of them at once.
const CONFIGMAP_DATA: &str = "..data";

/// What to look at after a wake-up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Wake {
    /// Compare every file with what was read.
    pub rescan: bool,
    /// Files that events named: read them again.
    pub files: BTreeSet<PathBuf>,
}

impl Wake {
    fn rescan() -> Wake {
        Wake {
            rescan: true,
            files: BTreeSet::new(),
        }
    }

    fn is_empty(&self) -> bool {
        !self.rescan && self.files.is_empty()
    }

    fn merge(&mut self, other: Wake) {
        self.rescan |= other.rescan;
        self.files.extend(other.files);
    }
}

pub(crate) struct Waker {
    /// The manifests path.
    path: PathBuf,
    /// The directory watched: the manifests directory, or the single file's parent.
    dir: PathBuf,
    /// For a single file: its name, the only one (with `..data`) whose events count.
    only: Option<OsString>,
    config: WatchConfig,
    /// The inotify instance, when one could be made.
    inotify: Option<inotify::Watch>,
    rescan: Interval,
    /// The period `rescan` runs at.
    rescan_period: Duration,
    check: Interval,
}

fn interval(period: Duration) -> Interval {
    // Not at once: the caller has just read everything.
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

impl Waker {
    /// Sets up the watch for `path`; call before the first load, so no change is missed.
    pub fn new(path: &Path, config: WatchConfig) -> Waker {
        let (dir, only) = match (fs::metadata(path), path.file_name()) {
            (Ok(meta), Some(name)) if !meta.is_dir() => {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                (
                    parent.unwrap_or(Path::new(".")).to_owned(),
                    Some(name.to_owned()),
                )
            }
            _ => (path.to_owned(), None),
        };
        let mut inotify = None;
        if config.inotify {
            match inotify::Watch::new() {
                Ok(watch) => inotify = Some(watch),
                Err(err) => tracing::warn!(
                    error = %err,
                    "cannot use inotify; checking the manifests every {:?}",
                    config.poll_interval
                ),
            }
        }
        if let Some(watch) = &mut inotify {
            match watch.add(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "watching the manifests with inotify")
                }
                Err(err) => tracing::warn!(
                    dir = %dir.display(),
                    error = %err,
                    "cannot watch the manifests directory; checking it every {:?} until it can be",
                    config.poll_interval
                ),
            }
        }
        let rescan_period = if inotify.as_ref().is_some_and(|w| w.is_watching()) {
            config.resync_interval
        } else {
            config.poll_interval
        };
        Waker {
            path: path.to_owned(),
            dir,
            only,
            rescan: interval(rescan_period),
            rescan_period,
            check: interval(config.path_check_interval),
            config,
            inotify,
        }
    }

    /// Waits for something to look at.
    pub async fn next(&mut self) -> Wake {
        loop {
            let wake = tokio::select! {
                _ = self.rescan.tick() => Wake::rescan(),
                _ = self.check.tick(), if self.inotify.is_some() => self.check_path(),
                events = inotify::events(self.inotify.as_mut()) => {
                    let wake = self.take_events(events);
                    if wake.is_empty() {
                        continue;
                    }
                    self.coalesce(wake).await
                }
            };
            self.follow_watch_state();
            if !wake.is_empty() {
                return wake;
            }
        }
    }

    /// Gathers the events that follow within `coalesce` of each other (at most for
    /// `poll_interval`), so a burst such as a rename of many files is one reload.
    async fn coalesce(&mut self, mut wake: Wake) -> Wake {
        let deadline = Instant::now() + self.config.poll_interval;
        loop {
            let quiet = Instant::now() + self.config.coalesce;
            tokio::select! {
                _ = tokio::time::sleep_until(quiet.min(deadline)) => return wake,
                events = inotify::events(self.inotify.as_mut()) => {
                    let more = self.take_events(events);
                    wake.merge(more);
                }
            }
        }
    }

    /// Turns events into what to read; a watch that ended is noted.
    fn take_events(&mut self, events: std::io::Result<Vec<inotify::Event>>) -> Wake {
        let events = match events {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    "reading inotify events failed; checking the manifests every {:?}",
                    self.config.poll_interval
                );
                self.inotify = None;
                return Wake::rescan();
            }
        };
        let Some(watch) = &mut self.inotify else {
            return Wake::default();
        };
        let mut wake = Wake::default();
        let mut ended = false;
        let mut entries = Vec::new();
        for event in &events {
            match watch.classify(event) {
                inotify::Kind::Other => {}
                inotify::Kind::Overflow => wake.rescan = true,
                inotify::Kind::WatchEnded => ended = true,
                inotify::Kind::Entry { name, created } => entries.push((name, created)),
            }
        }
        if ended {
            // The directory was removed, renamed or unmounted: look at the path (its
            // objects stay while it is missing) until it can be watched again.
            watch.forget();
            wake.rescan = true;
        }
        for (name, created) in entries {
            if let Some(file) = self.entry_changed(&name, created) {
                wake.files.insert(file);
            } else if name == CONFIGMAP_DATA {
                wake.rescan = true;
            }
        }
        // A single file's events name the file; it is compared like a directory's files.
        if self.only.is_some() && !wake.files.is_empty() {
            wake.rescan = true;
        }
        wake
    }

    /// The file to read again after an event for `name` in the directory, if any.
    fn entry_changed(&self, name: &OsStr, created: bool) -> Option<PathBuf> {
        let file = match &self.only {
            Some(only) if name != only => return None,
            // Named as given, as the source knows it.
            Some(_) => self.path.clone(),
            None if !name.to_str().is_some_and(is_manifest_name) => return None,
            None => self.dir.join(name),
        };
        // A regular file just created by open(2) is still being written, and its
        // close-write event follows: reading it now could see half of it. Symlinks and hard
        // links are created whole.
        if created && being_written(&file) {
            return None;
        }
        Some(file)
    }

    /// The path check: a new watch when the path now leads to another directory (or to
    /// the directory again after it was missing). A single file is compared each time
    /// (one `stat`): when it is a symlink into another directory, no event says it changed.
    fn check_path(&mut self) -> Wake {
        let mut wake = Wake::default();
        let Some(watch) = &mut self.inotify else {
            return wake;
        };
        if watch.leads_elsewhere(&self.dir) {
            match watch.add(&self.dir) {
                Ok(()) => {
                    tracing::info!(dir = %self.dir.display(), "watching the manifests directory again");
                    wake.rescan = true;
                }
                Err(err) => {
                    tracing::debug!(dir = %self.dir.display(), error = %err, "cannot watch the manifests directory yet");
                }
            }
        }
        if self.only.is_some() {
            wake.rescan = true;
        }
        wake
    }

    /// The slow safety-net period while watched, the old poll period otherwise.
    fn follow_watch_state(&mut self) {
        let watching = self.inotify.as_ref().is_some_and(|w| w.is_watching());
        let period = if watching {
            self.config.resync_interval
        } else {
            self.config.poll_interval
        };
        if period != self.rescan_period {
            self.rescan_period = period;
            self.rescan = interval(period);
        }
    }
}

#[cfg(unix)]
fn being_written(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_file() && m.nlink() == 1)
}

#[cfg(not(unix))]
fn being_written(_file: &Path) -> bool {
    false
}

#[cfg(target_os = "linux")]
mod inotify {
    use std::ffi::OsString;
    use std::io;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::Arc;

    use nix::errno::Errno;
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
    use tokio::sync::mpsc;

    pub type Event = InotifyEvent;

    /// What an event means for the source.
    pub enum Kind {
        /// An entry of the directory changed.
        Entry { name: OsString, created: bool },
        /// Events were lost: compare everything.
        Overflow,
        /// The watch is gone (directory removed or unmounted) or follows the directory
        /// elsewhere (renamed).
        WatchEnded,
        /// Nothing for us (e.g. a stale watch).
        Other,
    }

    /// An inotify instance whose events a thread reads (blocking) and passes on. A thread
    /// rather than the runtime's reactor: registering a foreign descriptor with tokio
    /// (`AsyncFd::register`) is `unsafe` in this tokio, and this crate has no unsafe code.
    pub struct Watch {
        inotify: Arc<Inotify>,
        events: mpsc::UnboundedReceiver<io::Result<Vec<InotifyEvent>>>,
        /// The directory's watch, while one is in place.
        wd: Option<WatchDescriptor>,
        /// Device and inode of the directory watched.
        id: Option<(u64, u64)>,
    }

    fn dir_id(dir: &Path) -> Option<(u64, u64)> {
        std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
    }

    impl Watch {
        pub fn new() -> io::Result<Watch> {
            let inotify = Arc::new(Inotify::init(InitFlags::IN_CLOEXEC)?);
            let (tx, events) = mpsc::unbounded_channel();
            let reader = Arc::clone(&inotify);
            std::thread::Builder::new()
                .name("manifests-inotify".into())
                .spawn(move || loop {
                    let result = match reader.read_events() {
                        Err(Errno::EINTR) => continue,
                        other => other.map_err(io::Error::from),
                    };
                    let failed = result.is_err();
                    // Ends when the receiver is gone (see `Drop`) or reading fails.
                    if tx.send(result).is_err() || failed {
                        return;
                    }
                })?;
            Ok(Watch {
                inotify,
                events,
                wd: None,
                id: None,
            })
        }

        /// Watches `dir` (replacing the watch of an earlier directory).
        pub fn add(&mut self, dir: &Path) -> io::Result<()> {
            self.forget();
            // Identify the directory before watching it: if it is swapped in between, the
            // next check sees a different one and watches again.
            let id = dir_id(dir);
            let flags = AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_ATTRIB
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_ONLYDIR;
            self.wd = Some(self.inotify.add_watch(dir, flags)?);
            self.id = id;
            Ok(())
        }

        pub fn is_watching(&self) -> bool {
            self.wd.is_some()
        }

        /// Whether `dir` now is another directory than the one watched (or exists again).
        pub fn leads_elsewhere(&self, dir: &Path) -> bool {
            let now = dir_id(dir);
            now.is_some() && now != self.id
        }

        pub fn forget(&mut self) {
            if let Some(wd) = self.wd.take() {
                // Already gone when its directory was removed; a directory renamed away is
                // still watched, and that stops here.
                let _ = self.inotify.rm_watch(wd);
            }
            self.id = None;
        }

        pub fn classify(&self, event: &InotifyEvent) -> Kind {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                return Kind::Overflow;
            }
            // Events of an earlier watch (before the path led elsewhere) are stale.
            if Some(event.wd) != self.wd {
                return Kind::Other;
            }
            let ended = AddWatchFlags::IN_IGNORED
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_UNMOUNT;
            if event.mask.intersects(ended) {
                return Kind::WatchEnded;
            }
            match &event.name {
                Some(name) => Kind::Entry {
                    name: name.clone(),
                    created: event.mask.contains(AddWatchFlags::IN_CREATE),
                },
                None => Kind::Other,
            }
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            // The reader thread ends at its next event, which removing a watch sends
            // (IN_IGNORED); without a watch in place, one is added and removed for that.
            self.events.close();
            let wd = self.wd.take().or_else(|| {
                self.inotify
                    .add_watch("/", AddWatchFlags::IN_DELETE_SELF)
                    .ok()
            });
            if let Some(wd) = wd {
                let _ = self.inotify.rm_watch(wd);
            }
        }
    }

    /// The next events of `watch`; never ready without one.
    pub async fn events(watch: Option<&mut Watch>) -> io::Result<Vec<InotifyEvent>> {
        let Some(watch) = watch else {
            return std::future::pending().await;
        };
        match watch.events.recv().await {
            Some(result) => result,
            None => Err(io::Error::other("the inotify reader stopped")),
        }
    }
}

/// Without inotify the source polls.
#[cfg(not(target_os = "linux"))]
mod inotify {
    use std::ffi::OsString;
    use std::io;
    use std::path::Path;

    pub enum Event {}

    pub enum Kind {
        Entry { name: OsString, created: bool },
        Overflow,
        WatchEnded,
        Other,
    }

    pub enum Watch {}

    impl Watch {
        pub fn new() -> io::Result<Watch> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "inotify is Linux only",
            ))
        }

        pub fn add(&mut self, _dir: &Path) -> io::Result<()> {
            match *self {}
        }

        pub fn is_watching(&self) -> bool {
            match *self {}
        }

        pub fn leads_elsewhere(&self, _dir: &Path) -> bool {
            match *self {}
        }

        pub fn forget(&mut self) {
            match *self {}
        }

        pub fn classify(&self, event: &Event) -> Kind {
            match *event {}
        }
    }

    pub async fn events(_watch: Option<&mut Watch>) -> io::Result<Vec<Event>> {
        std::future::pending().await
    }
}
