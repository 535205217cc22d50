//! Sync status shared with the health and metrics servers. Readers never block a sync:
//! the lock is held only to copy a few fields.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// A copy of the sync status at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusSnapshot {
    /// The first sync after the sources' initial state succeeded.
    pub initial_sync_done: bool,
    /// When the last sync succeeded.
    pub last_success: Option<SystemTime>,
    /// When an update was queued that no sync has programmed yet; None when up to date.
    pub oldest_unsynced: Option<SystemTime>,
    /// When the last change was queued.
    pub last_queued: Option<SystemTime>,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    pub last_error: Option<String>,
    pub last_duration: Option<Duration>,
}

/// Shared, cheaply readable sync status.
#[derive(Debug)]
pub struct SyncStatus {
    inner: Mutex<StatusSnapshot>,
    /// Bumped after every sync attempt, so tests and servers can wait for one.
    attempts: watch::Sender<u64>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            inner: Mutex::new(StatusSnapshot::default()),
            attempts: watch::channel(0).0,
        }
    }
}

impl SyncStatus {
    pub fn snapshot(&self) -> StatusSnapshot {
        self.lock().clone()
    }

    /// A receiver that changes after every sync attempt.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    pub(crate) fn queued(&self, at: SystemTime) {
        let mut s = self.lock();
        s.last_queued = Some(at);
        s.oldest_unsynced.get_or_insert(at);
    }

    pub(crate) fn succeeded(&self, at: SystemTime, took: Duration, still_pending: bool) {
        {
            let mut s = self.lock();
            s.initial_sync_done = true;
            s.last_success = Some(at);
            s.successful_syncs += 1;
            s.last_error = None;
            s.last_duration = Some(took);
            if !still_pending {
                s.oldest_unsynced = None;
            }
        }
        self.attempts.send_modify(|n| *n += 1);
    }

    pub(crate) fn failed(&self, error: String, took: Duration) {
        {
            let mut s = self.lock();
            s.failed_syncs += 1;
            s.last_error = Some(error);
            s.last_duration = Some(took);
        }
        self.attempts.send_modify(|n| *n += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusSnapshot> {
        // A panic while holding this lock cannot leave the copyable fields inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
