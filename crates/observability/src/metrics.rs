//! The metrics upstream kube-proxy v1.35 exports, with its names, types, help texts,
//! label names and buckets (the checked-in list `upstream-metrics-v1.35.txt` says where
//! each comes from; a test compares it with what [`ProxyMetrics::describe`] reports).
//!
//! Since v1.33 upstream registers the `kubeproxy_*` metrics by mode (iptables metrics
//! only in iptables mode, nftables failure counters only in nftables mode, ...) and
//! labels the per-proxier ones with `ip_family` (`IPv4`, `IPv6`).

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use proxy_core::model::IpFamily;

use crate::localhost_nodeports::{LocalhostNodePortMetrics, RejectedReader};
use crate::textfmt;

/// Upstream's stability prefixes on help texts (component-base adds them on registration).
const ALPHA: &str = "[ALPHA] ";
const BETA: &str = "[BETA] ";

/// `ExponentialBuckets(0.001, 2, 15)`: 1 ms to 16.384 s.
pub fn sync_duration_buckets() -> Vec<f64> {
    std::iter::successors(Some(0.001_f64), |b| Some(b * 2.0))
        .take(15)
        .collect()
}

/// Upstream's network programming buckets. Its bucket merge starts from a zero bucket,
/// so scrapes show `le="0"` first: 0, 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0, 0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

/// client-go's request latency buckets.
const REST_CLIENT_BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

/// The `ip_family` label value upstream uses (`v1.IPFamily`).
pub fn ip_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// Which proxy mode's metrics to register, as upstream's `RegisterMetrics(mode)` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    Nftables,
    Iptables,
    Ipvs,
    /// Ours (upstream has no userspace mode any more): the metrics every mode has.
    Userspace,
}

impl MetricsMode {
    pub const ALL: [MetricsMode; 4] = [
        MetricsMode::Nftables,
        MetricsMode::Iptables,
        MetricsMode::Ipvs,
        MetricsMode::Userspace,
    ];

    /// From the `/proxyMode` name (`nftables`, `iptables`, `ipvs`, `userspace`).
    pub fn from_name(mode: &str) -> Option<MetricsMode> {
        MetricsMode::ALL.into_iter().find(|m| m.name() == mode)
    }

    pub fn name(self) -> &'static str {
        match self {
            MetricsMode::Nftables => "nftables",
            MetricsMode::Iptables => "iptables",
            MetricsMode::Ipvs => "ipvs",
            MetricsMode::Userspace => "userspace",
        }
    }
}

/// Static facts for `kubernetes_build_info` and `kubernetes_feature_enabled`.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    /// e.g. `v1.35.0`; major and minor are derived from it.
    pub git_version: String,
    pub git_commit: String,
    pub build_date: String,
    /// Feature gates: name, stage (`ALPHA`, `BETA`, `` for GA), enabled.
    pub features: Vec<(String, String, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metrics: {0}")]
    Register(#[from] prometheus::Error),
}

/// One registered metric family as a scrape describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricDescription {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    /// With the stability prefix, as scraped.
    pub help: String,
    /// In declaration order.
    pub labels: Vec<String>,
    /// Histograms only; without `+Inf`.
    pub buckets: Vec<f64>,
}

/// Every metric the proxy exports, and the registry that holds them. Built once and
/// passed around (there is no global registry). Metrics of other modes exist as
/// objects (so callers need not care about the mode) but are not registered.
#[derive(Clone)]
pub struct ProxyMetrics {
    registry: Registry,
    mode: MetricsMode,
    names: Vec<String>,
    labels: BTreeMap<String, Vec<String>>,
    collectors: Arc<Vec<Arc<dyn Collector>>>,
    pub sync_proxy_rules_duration: HistogramVec,
    pub sync_full_proxy_rules_duration: HistogramVec,
    pub sync_partial_proxy_rules_duration: HistogramVec,
    pub sync_proxy_rules_last_timestamp: GaugeVec,
    pub sync_proxy_rules_last_queued_timestamp: GaugeVec,
    pub network_programming_duration: HistogramVec,
    pub endpoint_changes_pending: IntGauge,
    pub endpoint_changes_total: IntCounter,
    pub service_changes_pending: IntGauge,
    pub service_changes_total: IntCounter,
    pub iptables_ct_state_invalid_dropped_packets_total: IntCounter,
    pub iptables_localhost_nodeports_accepted_packets_total: IntCounter,
    pub iptables_restore_failures_total: IntCounterVec,
    pub iptables_partial_restore_failures_total: IntCounterVec,
    pub iptables_total: GaugeVec,
    pub iptables_last: GaugeVec,
    pub nftables_sync_failures_total: IntCounterVec,
    pub nftables_cleanup_failures_total: IntCounterVec,
    /// Ours (not upstream's): see [`OWN_METRICS`].
    pub rules_drift_total: IntCounter,
    pub no_local_endpoints_total: GaugeVec,
    pub proxy_healthz_total: IntCounterVec,
    pub proxy_livez_total: IntCounterVec,
    pub conntrack_reconciler_sync_duration: HistogramVec,
    pub conntrack_reconciler_deleted_entries_total: IntCounterVec,
    pub rest_client_requests_total: IntCounterVec,
    pub rest_client_request_duration: HistogramVec,
    /// nftables mode's localhost NodePorts (v1.37), when on.
    pub localhost_nodeports: Option<LocalhostNodePortMetrics>,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
            .field("mode", &self.mode)
            .field("names", &self.names)
            .finish()
    }
}

fn kp(name: &str, help: &str) -> Opts {
    Opts::new(format!("kubeproxy_{name}"), format!("{ALPHA}{help}"))
}

fn kp_histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(format!("kubeproxy_{name}"), format!("{ALPHA}{help}")).buckets(buckets)
}

const FAMILY: &[&str] = &["ip_family"];

/// Metrics of ours, outside upstream's set (documented apart in docs/metrics.md).
pub const OWN_METRICS: &[&str] = &[
    "kubeproxy_rules_drift_total",
    crate::service_traffic::PACKETS,
    crate::service_traffic::BYTES,
];

/// A registered collector that [`ProxyMetrics::describe`] can still reach.
struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// Registers collectors and keeps what `registered_metrics_total` counts.
struct Registrar {
    registry: Registry,
    names: Vec<String>,
    /// Each family's label names, in declaration order.
    labels: BTreeMap<String, Vec<String>>,
    /// What was registered (sharing the metrics' state), for [`ProxyMetrics::describe`].
    collectors: Vec<Arc<dyn Collector>>,
    alpha: u64,
    beta: u64,
}

impl Registrar {
    fn add(&mut self, c: Box<dyn Collector>) -> Result<(), MetricsError> {
        for d in c.desc() {
            self.names.push(d.fq_name.clone());
            self.labels
                .insert(d.fq_name.clone(), d.variable_labels.clone());
            if d.help.starts_with(BETA) {
                self.beta += 1;
            } else if d.help.starts_with(ALPHA) {
                self.alpha += 1;
            }
        }
        let shared: Arc<dyn Collector> = Arc::from(c);
        self.registry
            .register(Box::new(Shared(Arc::clone(&shared))))?;
        self.collectors.push(shared);
        Ok(())
    }
}

impl ProxyMetrics {
    pub fn new(build: &BuildInfo, mode: MetricsMode) -> Result<ProxyMetrics, MetricsError> {
        let sync_proxy_rules_duration = HistogramVec::new(
            kp_histogram(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_duration_buckets(),
            ),
            FAMILY,
        )?;
        let sync_full_proxy_rules_duration = HistogramVec::new(
            kp_histogram(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_duration_buckets(),
            ),
            FAMILY,
        )?;
        let sync_partial_proxy_rules_duration = HistogramVec::new(
            kp_histogram(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_duration_buckets(),
            ),
            FAMILY,
        )?;
        let sync_proxy_rules_last_timestamp = GaugeVec::new(
            kp(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            FAMILY,
        )?;
        let sync_proxy_rules_last_queued_timestamp = GaugeVec::new(
            kp(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            FAMILY,
        )?;
        let network_programming_duration = HistogramVec::new(
            kp_histogram(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
            ),
            FAMILY,
        )?;
        let endpoint_changes_pending = IntGauge::with_opts(kp(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
        ))?;
        let endpoint_changes_total = IntCounter::with_opts(kp(
            "sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
        ))?;
        let service_changes_pending = IntGauge::with_opts(kp(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
        ))?;
        let service_changes_total = IntCounter::with_opts(kp(
            "sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
        ))?;
        // Upstream reads these two from nfacct counters its iptables rules feed; the
        // full names are given there without the subsystem.
        let iptables_ct_state_invalid_dropped_packets_total = IntCounter::with_opts(Opts::new(
            "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
            format!("{ALPHA}packets dropped by iptables to work around conntrack problems"),
        ))?;
        let iptables_localhost_nodeports_accepted_packets_total =
            IntCounter::with_opts(Opts::new(
                "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
                format!("{ALPHA}Number of packets accepted on nodeports of loopback interface"),
            ))?;
        let iptables_restore_failures_total = IntCounterVec::new(
            kp(
                "sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
            ),
            FAMILY,
        )?;
        let iptables_partial_restore_failures_total = IntCounterVec::new(
            kp(
                "sync_proxy_rules_iptables_partial_restore_failures_total",
                "Cumulative proxy iptables partial restore failures",
            ),
            FAMILY,
        )?;
        let iptables_total = GaugeVec::new(
            kp(
                "sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
            ),
            &["table", "ip_family"],
        )?;
        let iptables_last = GaugeVec::new(
            kp(
                "sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
            ),
            &["table", "ip_family"],
        )?;
        let nftables_sync_failures_total = IntCounterVec::new(
            kp(
                "sync_proxy_rules_nftables_sync_failures_total",
                "Cumulative proxy nftables sync failures",
            ),
            FAMILY,
        )?;
        let nftables_cleanup_failures_total = IntCounterVec::new(
            kp(
                "sync_proxy_rules_nftables_cleanup_failures_total",
                "Cumulative proxy nftables cleanup failures",
            ),
            FAMILY,
        )?;
        let rules_drift_total = IntCounter::with_opts(Opts::new(
            "kubeproxy_rules_drift_total",
            "Objects (maps, or whole tables) a periodic sync found differing from what the proxy programmed, and repaired. Ours, not upstream's.",
        ))?;
        let no_local_endpoints_total = GaugeVec::new(
            kp(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
            ),
            &["traffic_policy", "ip_family"],
        )?;
        let proxy_healthz_total = IntCounterVec::new(
            kp(
                "proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
            ),
            &["code"],
        )?;
        let proxy_livez_total = IntCounterVec::new(
            kp("proxy_livez_total", "Cumulative proxy livez HTTP status"),
            &["code"],
        )?;
        let conntrack_reconciler_sync_duration = HistogramVec::new(
            kp_histogram(
                "conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds",
                sync_duration_buckets(),
            ),
            FAMILY,
        )?;
        let conntrack_reconciler_deleted_entries_total = IntCounterVec::new(
            kp(
                "conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
            ),
            FAMILY,
        )?;
        let rest_client_requests_total = IntCounterVec::new(
            Opts::new(
                "rest_client_requests_total",
                format!(
                    "{ALPHA}Number of HTTP requests, partitioned by status code, method, and host."
                ),
            ),
            &["code", "method", "host"],
        )?;
        let rest_client_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "rest_client_request_duration_seconds",
                format!("{ALPHA}Request latency in seconds. Broken down by verb, and host."),
            )
            .buckets(REST_CLIENT_BUCKETS.to_vec()),
            &["verb", "host"],
        )?;

        let mut reg = Registrar {
            registry: Registry::new(),
            names: Vec::new(),
            labels: BTreeMap::new(),
            collectors: Vec::new(),
            alpha: 0,
            beta: 0,
        };
        // Every mode: upstream's "core" metrics.
        for c in [
            Box::new(sync_proxy_rules_duration.clone()) as Box<dyn Collector>,
            Box::new(sync_proxy_rules_last_queued_timestamp.clone()),
            Box::new(sync_proxy_rules_last_timestamp.clone()),
            Box::new(endpoint_changes_pending.clone()),
            Box::new(endpoint_changes_total.clone()),
            Box::new(service_changes_pending.clone()),
            Box::new(service_changes_total.clone()),
            Box::new(proxy_healthz_total.clone()),
            Box::new(proxy_livez_total.clone()),
            Box::new(network_programming_duration.clone()),
            Box::new(no_local_endpoints_total.clone()),
            Box::new(rest_client_requests_total.clone()),
            Box::new(rest_client_request_duration.clone()),
        ] {
            reg.add(c)?;
        }
        let conntrack: [Box<dyn Collector>; 2] = [
            Box::new(conntrack_reconciler_sync_duration.clone()),
            Box::new(conntrack_reconciler_deleted_entries_total.clone()),
        ];
        let by_mode: Vec<Box<dyn Collector>> = match mode {
            MetricsMode::Iptables => vec![
                Box::new(iptables_ct_state_invalid_dropped_packets_total.clone()),
                Box::new(iptables_localhost_nodeports_accepted_packets_total.clone()),
                Box::new(sync_full_proxy_rules_duration.clone()),
                Box::new(sync_partial_proxy_rules_duration.clone()),
                Box::new(iptables_restore_failures_total.clone()),
                Box::new(iptables_partial_restore_failures_total.clone()),
                Box::new(iptables_total.clone()),
                Box::new(iptables_last.clone()),
            ],
            MetricsMode::Ipvs => vec![Box::new(iptables_restore_failures_total.clone())],
            MetricsMode::Nftables => vec![
                Box::new(sync_full_proxy_rules_duration.clone()),
                Box::new(sync_partial_proxy_rules_duration.clone()),
                Box::new(nftables_sync_failures_total.clone()),
                Box::new(nftables_cleanup_failures_total.clone()),
                Box::new(rules_drift_total.clone()),
            ],
            MetricsMode::Userspace => Vec::new(),
        };
        let with_conntrack = mode != MetricsMode::Userspace;
        for c in by_mode
            .into_iter()
            .chain(conntrack.into_iter().filter(|_| with_conntrack))
        {
            reg.add(c)?;
        }
        for c in build_collectors(build)? {
            reg.add(c)?;
        }
        reg.add(Box::new(crate::process::ProcessCollector::new()?))?;
        register_meta_metrics(&mut reg)?;

        Ok(ProxyMetrics {
            registry: reg.registry,
            mode,
            names: reg.names,
            labels: reg.labels,
            collectors: Arc::new(reg.collectors),
            sync_proxy_rules_duration,
            sync_full_proxy_rules_duration,
            sync_partial_proxy_rules_duration,
            sync_proxy_rules_last_timestamp,
            sync_proxy_rules_last_queued_timestamp,
            network_programming_duration,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            iptables_ct_state_invalid_dropped_packets_total,
            iptables_localhost_nodeports_accepted_packets_total,
            iptables_restore_failures_total,
            iptables_partial_restore_failures_total,
            iptables_total,
            iptables_last,
            nftables_sync_failures_total,
            nftables_cleanup_failures_total,
            rules_drift_total,
            no_local_endpoints_total,
            proxy_healthz_total,
            proxy_livez_total,
            conntrack_reconciler_sync_duration,
            conntrack_reconciler_deleted_entries_total,
            rest_client_requests_total,
            rest_client_request_duration,
            localhost_nodeports: None,
        })
    }

    /// Adds the localhost NodePort metrics (nftables mode with the feature on); `rejected`
    /// reads the kernel's counts when scraped.
    pub fn with_localhost_nodeports(
        mut self,
        rejected: RejectedReader,
    ) -> Result<Self, MetricsError> {
        self.localhost_nodeports = Some(LocalhostNodePortMetrics::register(
            &self.registry,
            rejected,
        )?);
        Ok(self)
    }

    /// Registers the `kubeproxy_service_*` counters (`--service-counters`), read through
    /// `programmed`'s traffic reader when scraped.
    pub fn register_service_traffic(
        &self,
        programmed: Arc<crate::debug::ProgrammedState>,
    ) -> Result<(), MetricsError> {
        crate::service_traffic::register(&self.registry, programmed)
    }

    pub fn mode(&self) -> MetricsMode {
        self.mode
    }

    /// Names of every registered metric family (also those with no sample yet).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The `/metrics` body, in the text format 0.0.4.
    pub fn render(&self) -> String {
        textfmt::encode(&self.registry.gather())
    }

    /// A failed sync, counted as this mode's upstream proxier counts it, once per family
    /// (one of our syncs programs every family). `partial`: an incremental sync.
    pub fn sync_failed(&self, families: &[IpFamily], partial: bool) {
        for &family in families {
            let f = [ip_family(family)];
            match self.mode {
                MetricsMode::Nftables => self
                    .nftables_sync_failures_total
                    .with_label_values(&f)
                    .inc(),
                MetricsMode::Iptables | MetricsMode::Ipvs => {
                    self.iptables_restore_failures_total
                        .with_label_values(&f)
                        .inc();
                    if partial && self.mode == MetricsMode::Iptables {
                        self.iptables_partial_restore_failures_total
                            .with_label_values(&f)
                            .inc();
                    }
                }
                // Upstream has no such mode, so no counter to mirror.
                MetricsMode::Userspace => {}
            }
        }
    }

    /// One conntrack reconciler pass over one family: how long it took and how many
    /// flows it deleted (upstream's `kubeproxy_conntrack_reconciler_*`).
    pub fn conntrack_reconciled(
        &self,
        family: IpFamily,
        duration: std::time::Duration,
        deleted_entries: u64,
    ) {
        let f = [ip_family(family)];
        self.conntrack_reconciler_sync_duration
            .with_label_values(&f)
            .observe(duration.as_secs_f64());
        // Upstream adds the count each pass, so the family's series exists from the first.
        self.conntrack_reconciler_deleted_entries_total
            .with_label_values(&f)
            .inc_by(deleted_entries);
    }

    /// Every registered family with its type, help, labels and buckets: what a scrape
    /// would show once each labelled metric had a sample. Histogram buckets are read
    /// back from a throwaway copy with one sample per histogram.
    pub fn describe(&self, build: &BuildInfo) -> Result<Vec<MetricDescription>, MetricsError> {
        let copy = ProxyMetrics::new(build, self.mode)?;
        for h in [
            &copy.sync_proxy_rules_duration,
            &copy.sync_full_proxy_rules_duration,
            &copy.sync_partial_proxy_rules_duration,
            &copy.network_programming_duration,
            &copy.conntrack_reconciler_sync_duration,
        ] {
            h.with_label_values(&["IPv4"]).observe(0.0);
        }
        copy.rest_client_request_duration
            .with_label_values(&["GET", "h"])
            .observe(0.0);
        let mut described = Vec::new();
        // The registry's gather leaves out families without samples: ask each collector.
        for family in copy.collectors.iter().flat_map(|c| c.collect()) {
            let kind = match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => "counter",
                prometheus::proto::MetricType::GAUGE => "gauge",
                prometheus::proto::MetricType::HISTOGRAM => "histogram",
                prometheus::proto::MetricType::SUMMARY => "summary",
                prometheus::proto::MetricType::UNTYPED => "untyped",
            };
            let buckets = family
                .get_metric()
                .first()
                .map(|m| {
                    m.get_histogram()
                        .get_bucket()
                        .iter()
                        .map(|b| b.upper_bound())
                        .filter(|b| b.is_finite())
                        .collect()
                })
                .unwrap_or_default();
            described.push(MetricDescription {
                name: family.name().to_owned(),
                kind: kind.to_owned(),
                help: family.help().to_owned(),
                labels: copy.labels.get(family.name()).cloned().unwrap_or_default(),
                buckets,
            });
        }
        described.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(described)
    }
}

/// `kubernetes_build_info` (labels in snake_case, as upstream writes them since v1.19)
/// and `kubernetes_feature_enabled`.
fn build_collectors(build: &BuildInfo) -> Result<Vec<Box<dyn Collector>>, MetricsError> {
    let build_info = GaugeVec::new(
        Opts::new(
            "kubernetes_build_info",
            format!(
                "{ALPHA}A metric with a constant '1' value labeled by major, minor, git version, \
                 git commit, git tree state, build date, Go version, and compiler from which \
                 Kubernetes was built, and platform on which it is running."
            ),
        ),
        &[
            "major",
            "minor",
            "git_version",
            "git_commit",
            "git_tree_state",
            "build_date",
            "go_version",
            "compiler",
            "platform",
        ],
    )?;
    let (major, minor) = major_minor(&build.git_version);
    let platform = format!("{}/{}", std::env::consts::OS, go_arch());
    build_info
        .with_label_values(&[
            major.as_str(),
            minor.as_str(),
            build.git_version.as_str(),
            build.git_commit.as_str(),
            "clean",
            build.build_date.as_str(),
            "",
            "rustc",
            platform.as_str(),
        ])
        .set(1.0);
    let feature_enabled = GaugeVec::new(
        Opts::new(
            "kubernetes_feature_enabled",
            format!("{BETA}This metric records the data about the stage and enablement of a k8s feature."),
        ),
        &["name", "stage"],
    )?;
    for (name, stage, enabled) in &build.features {
        feature_enabled
            .with_label_values(&[name.as_str(), stage.as_str()])
            .set(if *enabled { 1.0 } else { 0.0 });
    }
    Ok(vec![Box::new(build_info), Box::new(feature_enabled)])
}

/// component-base's meta metrics: how many metrics are registered by stability level
/// (ours), and none disabled or hidden (we have no flag that does either).
fn register_meta_metrics(reg: &mut Registrar) -> Result<(), MetricsError> {
    let registered = IntCounterVec::new(
        Opts::new(
            "registered_metrics_total",
            format!("{BETA}The count of registered metrics broken by stability level and deprecation version."),
        ),
        &["stability_level", "deprecated_version"],
    )?;
    let disabled = IntCounter::with_opts(Opts::new(
        "disabled_metrics_total",
        format!("{BETA}The count of disabled metrics."),
    ))?;
    let hidden = IntCounter::with_opts(Opts::new(
        "hidden_metrics_total",
        format!("{BETA}The count of hidden metrics."),
    ))?;
    for c in [
        Box::new(registered.clone()) as Box<dyn Collector>,
        Box::new(disabled),
        Box::new(hidden),
    ] {
        reg.add(c)?;
    }
    registered
        .with_label_values(&["ALPHA", ""])
        .inc_by(reg.alpha);
    registered.with_label_values(&["BETA", ""]).inc_by(reg.beta);
    Ok(())
}

/// `v1.30.2-foo` → (`1`, `30`), as upstream's build info labels them.
fn major_minor(git_version: &str) -> (String, String) {
    let mut parts = git_version.trim_start_matches('v').split('.');
    let major = parts.next().unwrap_or_default().to_owned();
    let minor = parts
        .next()
        .unwrap_or_default()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (major, minor)
}

/// Go's GOARCH spelling of this machine's architecture.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl proxy_core::observer::ApiRequestObserver for ProxyMetrics {
    fn request_done(
        &self,
        method: &str,
        host: &str,
        status: Option<u16>,
        elapsed: std::time::Duration,
    ) {
        // client-go labels a request that got no response "<error>".
        let code = status.map_or_else(|| "<error>".to_string(), |s| s.to_string());
        self.rest_client_requests_total
            .with_label_values(&[code.as_str(), method, host])
            .inc();
        self.rest_client_request_duration
            .with_label_values(&[method, host])
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_upstream() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        assert_eq!(sync[0], 0.001);
        assert_eq!(sync[14], 16.384);
        let np = network_programming_buckets();
        assert_eq!(np.len(), 81);
        assert_eq!(&np[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(np[61], 59.0);
        assert_eq!(np[62], 60.0);
        assert_eq!(np[73], 115.0);
        assert_eq!(np[74], 120.0);
        assert_eq!(np[80], 300.0);
    }

    #[test]
    fn scrape_has_upstream_names_help_and_buckets() {
        let m = ProxyMetrics::new(
            &BuildInfo {
                git_version: "v1.35.0".into(),
                ..BuildInfo::default()
            },
            MetricsMode::Nftables,
        )
        .expect("metrics");
        m.sync_proxy_rules_duration
            .with_label_values(&["IPv4"])
            .observe(0.003);
        m.network_programming_duration
            .with_label_values(&["IPv6"])
            .observe(1.5);
        m.sync_failed(&[IpFamily::V4], true);
        let text = m.render();
        for needle in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.002\"} 0\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv6\",le=\"0\"} 0\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv6\",le=\"2\"} 1\n",
            "# TYPE kubeproxy_sync_proxy_rules_nftables_sync_failures_total counter\n",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1\n",
            "kubernetes_build_info{build_date=\"\",compiler=\"rustc\",git_commit=\"\",git_tree_state=\"clean\",git_version=\"v1.35.0\",go_version=\"\",major=\"1\",minor=\"35\",platform=",
            "# TYPE process_resident_memory_bytes gauge\n",
            "process_start_time_seconds ",
            "process_virtual_memory_max_bytes ",
            "registered_metrics_total{deprecated_version=\"\",stability_level=\"ALPHA\"} ",
            "hidden_metrics_total 0\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Another mode's metrics are not registered, as upstream's RegisterMetrics(mode).
        for absent in [
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "process_threads",
        ] {
            assert!(!text.contains(absent), "{absent} in nftables mode");
        }
        for name in [
            "kubeproxy_proxy_healthz_total",
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "rest_client_requests_total",
            "kubernetes_feature_enabled",
        ] {
            assert!(m.names().iter().any(|n| n == name), "{name} not registered");
        }
    }

    #[test]
    fn failures_count_in_the_modes_own_counter() {
        let build = BuildInfo::default();
        let ipt = ProxyMetrics::new(&build, MetricsMode::Iptables).expect("metrics");
        ipt.sync_failed(&[IpFamily::V4, IpFamily::V6], true);
        ipt.sync_failed(&[IpFamily::V4, IpFamily::V6], false);
        let v6 = ["IPv6"];
        assert_eq!(
            ipt.iptables_restore_failures_total
                .with_label_values(&v6)
                .get(),
            2
        );
        assert_eq!(
            ipt.iptables_partial_restore_failures_total
                .with_label_values(&v6)
                .get(),
            1
        );
        assert_eq!(
            ipt.nftables_sync_failures_total
                .with_label_values(&v6)
                .get(),
            0
        );
        let ipvs = ProxyMetrics::new(&build, MetricsMode::Ipvs).expect("metrics");
        ipvs.sync_failed(&[IpFamily::V4], true);
        assert_eq!(
            ipvs.iptables_partial_restore_failures_total
                .with_label_values(&["IPv4"])
                .get(),
            0
        );
        ipvs.conntrack_reconciled(IpFamily::V4, std::time::Duration::from_millis(3), 7);
        let text = ipvs.render();
        assert!(
            text.contains(
                "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 7\n"
            ),
            "{text}"
        );
        assert!(text.contains("kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1\n"), "{text}");
    }
}
