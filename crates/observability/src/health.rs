//! The proxy's own health, as upstream's `/healthz` and `/livez` report it (v1.33+).
//!
//! Upstream's rule: healthy unless an update was queued and no successful sync followed
//! within the health timeout (2 × the sync period); so a proxy that is starting up and
//! has nothing queued yet is healthy. `/healthz` also turns 503 when the node is being
//! deleted or tainted `ToBeDeletedByClusterAutoscaler`; `/livez` ignores the node.
//!
//! Upstream runs one proxier per IP family and reports each in `status`; one of our
//! syncs programs every family, so the families share one state.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use proxy_core::model::IpFamily;
use serde::Serialize;

use crate::gotime;
use crate::metrics::ip_family;

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
    families: Vec<IpFamily>,
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

/// Upstream's `ProxierHealth`: one IP family's proxier.
#[derive(Serialize)]
struct ProxierHealth {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    healthy: bool,
}

/// Upstream's `ProxyHealth`, fields in its order (Go's JSON keeps declaration order).
#[derive(Serialize)]
struct ProxyHealth {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    #[serde(rename = "currentTime")]
    current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, ProxierHealth>,
}

impl Health {
    /// `timeout`: how long a queued update may stay unsynced (upstream: 2 × sync period);
    /// `families`: the IP families the proxy programs.
    pub fn new(timeout: Duration, families: &[IpFamily]) -> Health {
        Health {
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending_queued: None,
                // Eligible until a Node says otherwise, as upstream.
                node_eligible: true,
            }),
            timeout,
            families: families.to_vec(),
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

    /// The JSON body upstream's `ProxyHealthServer` writes. `lastUpdated` is the current
    /// time when the answer is 200 (upstream keeps it so for old clients).
    fn body(&self, c: &HealthCheck, node_eligible: Option<bool>, ok: bool) -> String {
        // Upstream lists a family once its proxier has synced; we also list it when it is
        // late without any sync, so the 503 says which family it is.
        let status = if c.last_updated.is_some() || !c.healthy {
            self.families
                .iter()
                .map(|&f| {
                    let health = ProxierHealth {
                        last_updated: gotime::rfc3339_nano(c.last_updated),
                        healthy: c.healthy,
                    };
                    (ip_family(f), health)
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let body = ProxyHealth {
            last_updated: gotime::rfc3339_nano(if ok {
                Some(c.current_time)
            } else {
                c.last_updated
            }),
            current_time: gotime::rfc3339_nano(Some(c.current_time)),
            node_eligible,
            healthy: c.healthy,
            status,
        };
        serde_json::to_string(&body).unwrap_or_default()
    }

    /// `/healthz`: status code and body.
    pub fn healthz(&self, now: SystemTime) -> (u16, String) {
        let c = self.check(now);
        let ok = c.healthy && c.node_eligible;
        let body = self.body(&c, Some(c.node_eligible), ok);
        (if ok { 200 } else { 503 }, body)
    }

    /// `/livez`: like `/healthz` without node eligibility.
    pub fn livez(&self, now: SystemTime) -> (u16, String) {
        let c = self.check(now);
        let body = self.body(&c, None, c.healthy);
        (if c.healthy { 200 } else { 503 }, body)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few copyable fields: a panic elsewhere cannot corrupt it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const DUAL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).expect("JSON body")
    }

    #[test]
    fn healthy_while_starting_and_until_a_queued_update_is_late() {
        let h = Health::new(Duration::from_secs(60), &DUAL);
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
    fn bodies_have_upstreams_fields_in_upstreams_order() {
        let h = Health::new(SEC, &DUAL);
        let now = SystemTime::now();
        // Before any sync: no per-family status, Go's zero time is not shown (200).
        let (code, body) = h.healthz(now);
        assert_eq!(code, 200);
        let keys: Vec<&str> = body
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|k| {
                [
                    "lastUpdated",
                    "currentTime",
                    "nodeEligible",
                    "healthy",
                    "status",
                ]
                .contains(k)
            })
            .collect();
        assert_eq!(
            keys,
            ["lastUpdated", "currentTime", "nodeEligible", "healthy"],
            "{body}"
        );
        assert!(
            body.starts_with("{\"lastUpdated\":\""),
            "compact, as Go writes it: {body}"
        );

        let synced = now - 5 * SEC;
        h.updated(synced);
        let v = json(&h.healthz(now).1);
        assert_eq!(v["healthy"], true);
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(
            v["lastUpdated"], v["currentTime"],
            "healthy: lastUpdated is now"
        );
        let synced_text = gotime::rfc3339_nano(Some(synced));
        for family in ["IPv4", "IPv6"] {
            assert_eq!(v["status"][family]["healthy"], true, "{v}");
            assert_eq!(v["status"][family]["lastUpdated"], synced_text.as_str());
        }
        let live = json(&h.livez(now).1);
        assert!(live.get("nodeEligible").is_none(), "{live}");
        assert_eq!(live["status"]["IPv4"]["healthy"], true);

        // Late: 503, the per-family entries say unhealthy, lastUpdated is the last sync.
        h.queued(now);
        let (code, body) = h.healthz(now + 2 * SEC);
        assert_eq!(code, 503);
        let v = json(&body);
        assert_eq!(v["healthy"], false);
        assert_eq!(v["lastUpdated"], synced_text.as_str());
        assert_eq!(v["status"]["IPv6"]["healthy"], false);
    }

    #[test]
    fn node_eligibility_affects_healthz_only() {
        let h = Health::new(SEC, &[IpFamily::V4]);
        h.set_node_eligible(false);
        let now = SystemTime::now();
        let (code, body) = h.healthz(now);
        assert_eq!(code, 503);
        let v = json(&body);
        assert_eq!(v["nodeEligible"], false);
        assert_eq!(v["healthy"], true, "the proxier itself is healthy");
        assert_eq!(v["lastUpdated"], gotime::ZERO);
        assert_eq!(h.livez(now).0, 200);
    }
}
