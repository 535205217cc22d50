//! The sync observer that feeds metrics, proxy health and the per-Service health checks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxy_core::model::{IpFamily, ProxyState, TrafficPolicy};
use proxy_core::observer::{ChangeSummary, SyncObserver, SyncReport};
use tokio::sync::watch;

use crate::debug::ProgrammedState;
use crate::health::Health;
use crate::metrics::{ip_family, ProxyMetrics};
use crate::service_health::{self, Targets};

/// Updates metrics and health from the runner's reports. Cheap: counters, a mutex held
/// for a few fields, and a watch send.
pub struct ProxyObserver {
    metrics: ProxyMetrics,
    health: Arc<Health>,
    targets: watch::Sender<Targets>,
    /// The IP families each sync programs; per-family metrics get one sample each.
    families: Vec<IpFamily>,
    /// What the last successful sync programmed, for `/debug/services`.
    programmed: Arc<ProgrammedState>,
}

impl ProxyObserver {
    /// Also returns the receiver that [`service_health::run`] serves.
    pub fn new(
        metrics: ProxyMetrics,
        health: Arc<Health>,
        families: &[IpFamily],
    ) -> (Self, watch::Receiver<Targets>) {
        let (targets, rx) = watch::channel(Targets::new());
        (
            ProxyObserver {
                metrics,
                health,
                targets,
                families: families.to_vec(),
                programmed: Arc::default(),
            },
            rx,
        )
    }
}

impl ProxyObserver {
    /// The programmed state this observer records, for the metrics server.
    pub fn programmed(&self) -> Arc<ProgrammedState> {
        Arc::clone(&self.programmed)
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
            for family in self.labels() {
                m.sync_proxy_rules_last_queued_timestamp
                    .with_label_values(&family)
                    .set(unix_seconds(c.at));
            }
            self.health.queued(c.at);
        }
        self.health.set_node_eligible(c.node_eligible);
    }

    fn sync_finished(&self, r: &SyncReport<'_>) {
        let m = &self.metrics;
        let seconds = r.duration.as_secs_f64();
        // One sync programs every family: each family's upstream proxier would have
        // recorded this sync, so each family's series gets it.
        for family in self.labels() {
            m.sync_proxy_rules_duration
                .with_label_values(&family)
                .observe(seconds);
            let kind = if r.full {
                &m.sync_full_proxy_rules_duration
            } else {
                &m.sync_partial_proxy_rules_duration
            };
            kind.with_label_values(&family).observe(seconds);
        }
        if r.result.is_err() {
            m.sync_failed(&self.families, !r.full);
            return;
        }
        self.health.updated(r.finished_at);
        let same_state = self.programmed.record(r.state, r.finished_at);
        if let (Some(localhost), Ok(outcome)) = (&m.localhost_nodeports, r.result) {
            localhost.synced(&outcome.localhost_nodeports);
        }
        if let Ok(outcome) = r.result {
            m.rules_drift_total.inc_by(outcome.drift);
        }
        // One walk of the state for every family (it runs after each sync).
        let no_local = (!same_state).then(|| no_local_endpoints(r.state));
        for &family in &self.families {
            let label = [ip_family(family)];
            m.sync_proxy_rules_last_timestamp
                .with_label_values(&label)
                .set(unix_seconds(r.finished_at));
            for trigger in r.programmed_trigger_times {
                let latency = r.finished_at.duration_since(*trigger).unwrap_or_default();
                m.network_programming_duration
                    .with_label_values(&label)
                    .observe(latency.as_secs_f64());
            }
            let Some(no_local) = &no_local else {
                continue; // the same state: the gauges already say it
            };
            let (internal, external) = no_local.of(family);
            m.no_local_endpoints_total
                .with_label_values(&["internal", label[0]])
                .set(internal as f64);
            m.no_local_endpoints_total
                .with_label_values(&["external", label[0]])
                .set(external as f64);
        }
        if same_state {
            return;
        }
        let targets = service_health::targets(r.state);
        self.targets.send_if_modified(|current| {
            let changed = *current != targets;
            if changed {
                *current = targets;
            }
            changed
        });
    }

    fn conntrack_reconciled(&self, family: IpFamily, duration: Duration, deleted_entries: u64) {
        self.metrics
            .conntrack_reconciled(family, duration, deleted_entries);
    }
}

impl ProxyObserver {
    /// The `ip_family` label values of the families programmed.
    fn labels(&self) -> impl Iterator<Item = [&'static str; 1]> + '_ {
        self.families.iter().map(|&f| [ip_family(f)])
    }
}

/// Per family, Service ports of the family (a cluster IP of it) with a `Local` traffic
/// policy that have endpoints of it, none of them ready on this node: (internal policy
/// count, external policy count), as that family's upstream proxier counts them.
#[derive(Debug, Default)]
struct NoLocalEndpoints {
    v4: (usize, usize),
    v6: (usize, usize),
}

impl NoLocalEndpoints {
    fn of(&self, family: IpFamily) -> (usize, usize) {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }
}

fn no_local_endpoints(state: &ProxyState) -> NoLocalEndpoints {
    let mut out = NoLocalEndpoints::default();
    for (name, port) in &state.services {
        // Policies first: this runs after every sync, and most ports are `Cluster`, so
        // their endpoints are not read at all.
        let internal_local = port.internal_traffic_policy == TrafficPolicy::Local;
        let externally_reachable = port.node_port.is_some()
            || !port.external_ips.is_empty()
            || !port.load_balancer_ips.is_empty();
        let external_local =
            port.external_traffic_policy == TrafficPolicy::Local && externally_reachable;
        if !(internal_local || external_local) {
            continue;
        }
        let endpoints = state.endpoints_of(name);
        for (family, counts) in [(IpFamily::V4, &mut out.v4), (IpFamily::V6, &mut out.v6)] {
            if !port.cluster_ips.iter().any(|ip| IpFamily::of(ip) == family) {
                continue;
            }
            let mut eps = endpoints
                .iter()
                .filter(|e| IpFamily::of(&e.ip) == family)
                .peekable();
            if eps.peek().is_none() || eps.any(|e| e.is_local && e.ready) {
                continue;
            }
            counts.0 += usize::from(internal_local);
            counts.1 += usize::from(external_local);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use proxy_core::model::{IpFamily, ProxyState};
    use proxy_core::observer::{SyncObserver, SyncReport};
    use proxy_core::proxier::{ProxierError, SyncOutcome};

    use super::*;
    use crate::metrics::{BuildInfo, MetricsMode};

    fn observer(mode: MetricsMode) -> (ProxyObserver, ProxyMetrics, Arc<Health>) {
        let metrics = ProxyMetrics::new(&BuildInfo::default(), mode).expect("metrics");
        let families = [IpFamily::V4, IpFamily::V6];
        let health = Arc::new(Health::new(Duration::from_secs(60), &families));
        let (o, _targets) = ProxyObserver::new(metrics.clone(), Arc::clone(&health), &families);
        (o, metrics, health)
    }

    #[test]
    fn each_sync_is_recorded_once_per_family_and_failures_in_the_modes_counter() {
        let (o, m, health) = observer(MetricsMode::Nftables);
        let state = Arc::new(ProxyState::default());
        let outcome = SyncOutcome::default();
        let now = SystemTime::now();
        let ok = SyncReport {
            full: true,
            duration: Duration::from_millis(5),
            finished_at: now,
            result: Ok(&outcome),
            state: &state,
            programmed_trigger_times: &[now - Duration::from_secs(2)],
        };
        o.sync_finished(&ok);
        let error = ProxierError::Other("refused".into());
        let failed = SyncReport {
            full: false,
            result: Err(&error),
            programmed_trigger_times: &[],
            ..ok
        };
        o.sync_finished(&failed);
        for family in ["IPv4", "IPv6"] {
            let f = [family];
            assert_eq!(
                m.sync_proxy_rules_duration
                    .with_label_values(&f)
                    .get_sample_count(),
                2
            );
            assert_eq!(
                m.sync_full_proxy_rules_duration
                    .with_label_values(&f)
                    .get_sample_count(),
                1
            );
            assert_eq!(
                m.sync_partial_proxy_rules_duration
                    .with_label_values(&f)
                    .get_sample_count(),
                1
            );
            assert_eq!(
                m.network_programming_duration
                    .with_label_values(&f)
                    .get_sample_count(),
                1
            );
            assert_eq!(
                m.nftables_sync_failures_total.with_label_values(&f).get(),
                1
            );
            assert!(
                m.sync_proxy_rules_last_timestamp
                    .with_label_values(&f)
                    .get()
                    > 0.0
            );
        }
        assert_eq!(health.check(now).last_updated, Some(now));
    }

    /// Upstream's `sync_proxy_rules_no_local_endpoints_total`, per family: ports of the
    /// family with a `Local` policy (external only when reachable from outside) that have
    /// endpoints of the family, none of them ready on this node.
    #[test]
    fn ports_with_local_policies_and_no_local_endpoints_are_counted_per_family() {
        use proxy_core::model::Protocol;
        use proxy_core::model::{Endpoint, ServiceName, ServicePort, ServicePortName};
        let mut state = ProxyState::default();
        let mut add =
            |name: &str, ips: &[&str], eps: &[(&str, bool, bool)], set: fn(&mut ServicePort)| {
                let port_name = ServicePortName {
                    service: ServiceName::new("ns", name),
                    port: "".into(),
                    protocol: Protocol::Tcp,
                };
                let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
                let mut port = ServicePort::new(port_name.clone(), ips, 80);
                set(&mut port);
                let eps: Vec<Endpoint> = eps
                    .iter()
                    .map(|(ip, local, ready)| Endpoint {
                        is_local: *local,
                        ready: *ready,
                        ..Endpoint::ready(ip.parse().unwrap(), 8080)
                    })
                    .collect();
                if !eps.is_empty() {
                    state.endpoints.insert(port_name.clone(), Arc::new(eps));
                }
                state.services.insert(port_name, Arc::new(port));
            };
        let internal_local = |p: &mut ServicePort| p.internal_traffic_policy = TrafficPolicy::Local;
        let external_local = |p: &mut ServicePort| {
            p.external_traffic_policy = TrafficPolicy::Local;
            p.node_port = Some(30080);
        };
        let both_local = |p: &mut ServicePort| {
            p.internal_traffic_policy = TrafficPolicy::Local;
            p.external_traffic_policy = TrafficPolicy::Local;
            p.load_balancer_ips = vec!["192.0.2.1".parse().unwrap()];
        };
        let remote = [("10.244.1.2", false, true)];
        // Counted: internal (v4); external (v4); both (v4 and v6, remote endpoints in each).
        add("int", &["10.96.0.1"], &remote, internal_local);
        add("ext", &["10.96.0.2"], &remote, external_local);
        add(
            "both",
            &["10.96.0.3", "fd00::3"],
            &[("10.244.1.3", false, true), ("fd00:244::3", false, true)],
            both_local,
        );
        // Not counted: Cluster policies; a ready local endpoint; no endpoints; only a
        // local endpoint that is not ready (counted: none ready here); external Local but
        // not reachable from outside; endpoints of the other family only.
        add("cluster", &["10.96.0.4"], &remote, |_| {});
        add(
            "has-local",
            &["10.96.0.5"],
            &[("10.244.1.5", true, true), ("10.244.2.5", false, true)],
            internal_local,
        );
        add("no-eps", &["10.96.0.6"], &[], internal_local);
        add(
            "local-not-ready",
            &["10.96.0.7"],
            &[("10.244.1.7", true, false)],
            internal_local,
        );
        add("ext-unreachable", &["10.96.0.8"], &remote, |p| {
            p.external_traffic_policy = TrafficPolicy::Local
        });
        add(
            "v6-eps-only",
            &["10.96.0.9", "fd00::9"],
            &[("fd00:244::9", true, true)],
            internal_local,
        );
        let counted = no_local_endpoints(&state);
        assert_eq!(counted.of(IpFamily::V4), (3, 2));
        assert_eq!(counted.of(IpFamily::V6), (1, 1));
    }

    #[test]
    fn the_conntrack_reconciler_hook_reaches_the_metrics() {
        let (o, m, _) = observer(MetricsMode::Iptables);
        // What the runner holds: the observer as a trait object.
        let hook: &dyn SyncObserver = &o;
        hook.conntrack_reconciled(IpFamily::V6, Duration::from_millis(20), 4);
        hook.conntrack_reconciled(IpFamily::V6, Duration::from_millis(1), 0);
        let v6 = ["IPv6"];
        assert_eq!(
            m.conntrack_reconciler_deleted_entries_total
                .with_label_values(&v6)
                .get(),
            4
        );
        assert_eq!(
            m.conntrack_reconciler_sync_duration
                .with_label_values(&v6)
                .get_sample_count(),
            2
        );
        assert!(m.render().contains(
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv6\"} 4\n"
        ));
    }
}
