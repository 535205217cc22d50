//! The sync observer that feeds metrics, proxy health and the per-Service health checks.

use std::sync::Arc;
use std::time::SystemTime;

use proxy_core::model::{ProxyState, TrafficPolicy};
use proxy_core::observer::{ChangeSummary, SyncObserver, SyncReport};
use tokio::sync::watch;

use crate::health::Health;
use crate::metrics::ProxyMetrics;
use crate::service_health::{self, Targets};

/// Updates metrics and health from the runner's reports. Cheap: counters, a mutex held
/// for a few fields, and a watch send.
pub struct ProxyObserver {
    metrics: ProxyMetrics,
    health: Arc<Health>,
    targets: watch::Sender<Targets>,
}

impl ProxyObserver {
    /// Also returns the receiver that [`service_health::run`] serves.
    pub fn new(metrics: ProxyMetrics, health: Arc<Health>) -> (Self, watch::Receiver<Targets>) {
        let (targets, rx) = watch::channel(Targets::new());
        (
            ProxyObserver {
                metrics,
                health,
                targets,
            },
            rx,
        )
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl SyncObserver for ProxyObserver {
    fn changes_applied(&self, c: &ChangeSummary) {
        let m = &self.metrics;
        // The tracker counts from start; counters only move forward.
        m.service_changes_total.inc_by(
            c.service_changes_total
                .saturating_sub(m.service_changes_total.get()),
        );
        m.endpoint_changes_total.inc_by(
            c.endpoint_changes_total
                .saturating_sub(m.endpoint_changes_total.get()),
        );
        m.service_changes_pending
            .set(i64::try_from(c.services_pending).unwrap_or(i64::MAX));
        m.endpoint_changes_pending
            .set(i64::try_from(c.endpoints_pending).unwrap_or(i64::MAX));
        if c.queued {
            m.sync_proxy_rules_last_queued_timestamp
                .set(unix_seconds(c.at));
            self.health.queued(c.at);
        }
        self.health.set_node_eligible(c.node_eligible);
    }

    fn sync_finished(&self, r: &SyncReport<'_>) {
        let m = &self.metrics;
        let seconds = r.duration.as_secs_f64();
        m.sync_proxy_rules_duration.observe(seconds);
        if r.full {
            m.sync_full_proxy_rules_duration.observe(seconds);
        } else {
            m.sync_partial_proxy_rules_duration.observe(seconds);
        }
        match r.result {
            Ok(_) => {
                m.sync_proxy_rules_last_timestamp
                    .set(unix_seconds(r.finished_at));
                self.health.updated(r.finished_at);
                for trigger in r.programmed_trigger_times {
                    let latency = r.finished_at.duration_since(*trigger).unwrap_or_default();
                    m.network_programming_duration
                        .observe(latency.as_secs_f64());
                }
                let (internal, external) = no_local_endpoints(r.state);
                m.no_local_endpoints_total
                    .with_label_values(&["internal"])
                    .set(internal as f64);
                m.no_local_endpoints_total
                    .with_label_values(&["external"])
                    .set(external as f64);
                let targets = service_health::targets(r.state);
                self.targets.send_if_modified(|current| {
                    let changed = *current != targets;
                    if changed {
                        *current = targets;
                    }
                    changed
                });
            }
            Err(_) => {
                // Upstream counts every failed kernel update here, whatever the mode;
                // dashboards key on it.
                m.iptables_restore_failures_total.inc();
                if !r.full {
                    m.iptables_partial_restore_failures_total.inc();
                }
            }
        }
    }
}

/// Service ports with a `Local` traffic policy that have endpoints, none of them on
/// this node: (internal policy count, external policy count), as upstream counts them.
fn no_local_endpoints(state: &ProxyState) -> (usize, usize) {
    let mut internal = 0;
    let mut external = 0;
    for (name, port) in &state.services {
        let eps = state.endpoints_of(name);
        if eps.is_empty() || eps.iter().any(|e| e.is_local && e.ready) {
            continue;
        }
        if port.internal_traffic_policy == TrafficPolicy::Local {
            internal += 1;
        }
        let externally_reachable = port.node_port.is_some()
            || !port.external_ips.is_empty()
            || !port.load_balancer_ips.is_empty();
        if port.external_traffic_policy == TrafficPolicy::Local && externally_reachable {
            external += 1;
        }
    }
    (internal, external)
}
