//! The proxy's own health, as upstream's `/healthz` and `/livez` report it.
//!
//! Upstream's rule: healthy unless an update was queued and no successful sync followed
//! within the health timeout (2 × the sync period); so a proxy that is starting up and
//! has nothing queued yet is healthy. `/healthz` also turns 503 when the node is being
//! deleted or tainted `ToBeDeletedByClusterAutoscaler`; `/livez` ignores the node.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::gotime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared health state: written by the sync observer, read by the HTTP handlers.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    timeout: Duration,
    /// Wall-clock start of the process, for Go's `m=+...` monotonic suffix.
    started: SystemTime,
}

/// One evaluation of the health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// The proxy's own health (what `/livez` and per-Service checks use).
    pub healthy: bool,
    pub node_eligible: bool,
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl Health {
    /// `timeout`: how long a queued update may stay unsynced (upstream: 2 × sync period).
    pub fn new(timeout: Duration) -> Health {
        Health {
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending_queued: None,
                // Eligible until a Node says otherwise, as upstream.
                node_eligible: true,
            }),
            timeout,
            started: SystemTime::now(),
        }
    }

    /// An update was queued for the backend.
    pub fn queued(&self, at: SystemTime) {
        self.lock().oldest_pending_queued.get_or_insert(at);
    }

    /// The backend was successfully updated.
    pub fn updated(&self, at: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending_queued = None;
        inner.last_updated = Some(at);
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn check(&self, now: SystemTime) -> HealthCheck {
        let inner = *self.lock();
        let healthy = match inner.oldest_pending_queued {
            None => true,
            // A clock step backwards counts as "not late".
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.timeout,
        };
        HealthCheck {
            healthy,
            node_eligible: inner.node_eligible,
            last_updated: inner.last_updated,
            current_time: now,
        }
    }

    /// Formats a time as Go's `time.Time.String()` does, with the process-relative
    /// monotonic reading.
    pub fn go_time(&self, at: Option<SystemTime>) -> String {
        match at {
            None => gotime::ZERO.to_owned(),
            Some(at) => gotime::format(at, at.duration_since(self.started).ok()),
        }
    }

    /// `/healthz`: status code and body, byte for byte as upstream writes them. When
    /// healthy, `lastUpdated` is the current time, as upstream keeps it for old clients.
    pub fn healthz(&self, now: SystemTime) -> (u16, String) {
        let c = self.check(now);
        let ok = c.healthy && c.node_eligible;
        let last = if ok { Some(now) } else { c.last_updated };
        let body = format!(
            "{{\"lastUpdated\": {},\"currentTime\": {}, \"nodeEligible\": {}}}",
            quote(&self.go_time(last)),
            quote(&self.go_time(Some(now))),
            c.node_eligible
        );
        (if ok { 200 } else { 503 }, body)
    }

    /// `/livez`: like `/healthz` without node eligibility.
    pub fn livez(&self, now: SystemTime) -> (u16, String) {
        let c = self.check(now);
        let last = if c.healthy { Some(now) } else { c.last_updated };
        let body = format!(
            "{{\"lastUpdated\": {},\"currentTime\": {}}}",
            quote(&self.go_time(last)),
            quote(&self.go_time(Some(now)))
        );
        (if c.healthy { 200 } else { 503 }, body)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few copyable fields: a panic elsewhere cannot corrupt it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A JSON string literal (what Go's `%q` gives for these ASCII strings).
fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn healthy_while_starting_and_until_a_queued_update_is_late() {
        let h = Health::new(Duration::from_secs(60));
        let t0 = SystemTime::now();
        assert!(
            h.check(t0).healthy,
            "nothing queued yet: healthy, as upstream"
        );
        h.queued(t0);
        assert!(h.check(t0 + 59 * SEC).healthy);
        // A later queue does not reset the oldest pending one.
        h.queued(t0 + 30 * SEC);
        assert!(!h.check(t0 + 60 * SEC).healthy);
        assert_eq!(h.healthz(t0 + 60 * SEC).0, 503);
        assert_eq!(h.livez(t0 + 60 * SEC).0, 503);
        h.updated(t0 + 61 * SEC);
        assert!(h.check(t0 + 500 * SEC).healthy);
    }

    #[test]
    fn node_eligibility_affects_healthz_only() {
        let h = Health::new(SEC);
        h.set_node_eligible(false);
        let now = SystemTime::now();
        let (code, body) = h.healthz(now);
        assert_eq!(code, 503);
        assert!(body.ends_with(", \"nodeEligible\": false}"), "{body}");
        assert!(
            body.starts_with(
                "{\"lastUpdated\": \"0001-01-01 00:00:00 +0000 UTC\",\"currentTime\": \""
            ),
            "{body}"
        );
        assert_eq!(h.livez(now).0, 200);
    }
}
