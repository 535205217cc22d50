//! The metrics upstream kube-proxy v1.30 registers, with its names, types, help texts,
//! label names and buckets. Upstream registers every `kubeproxy_*` metric whatever the
//! mode, so a metric that does not apply (e.g. the iptables rule counts in nftables mode)
//! is still registered, with whatever value it has.

use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry,
};

use crate::textfmt;

/// Upstream's stability prefix on help texts (component-base adds it on registration).
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

/// Static facts for `kubernetes_build_info` and `kubernetes_feature_enabled`.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    /// e.g. `v1.30.0`; major and minor are derived from it.
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

/// Every metric the proxy exports, and the registry that holds them. Built once and
/// passed around (there is no global registry).
#[derive(Clone)]
pub struct ProxyMetrics {
    registry: Registry,
    names: Vec<String>,
    pub sync_proxy_rules_duration: Histogram,
    pub sync_full_proxy_rules_duration: Histogram,
    pub sync_partial_proxy_rules_duration: Histogram,
    pub sync_proxy_rules_last_timestamp: Gauge,
    pub sync_proxy_rules_last_queued_timestamp: Gauge,
    pub network_programming_duration: Histogram,
    pub endpoint_changes_pending: IntGauge,
    pub endpoint_changes_total: IntCounter,
    pub service_changes_pending: IntGauge,
    pub service_changes_total: IntCounter,
    pub iptables_restore_failures_total: IntCounter,
    pub iptables_partial_restore_failures_total: IntCounter,
    pub iptables_total: GaugeVec,
    pub iptables_last: GaugeVec,
    pub no_local_endpoints_total: GaugeVec,
    pub proxy_healthz_total: IntCounterVec,
    pub proxy_livez_total: IntCounterVec,
    pub rest_client_requests_total: IntCounterVec,
    pub rest_client_request_duration: HistogramVec,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
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

impl ProxyMetrics {
    pub fn new(build: &BuildInfo) -> Result<ProxyMetrics, MetricsError> {
        let registry = Registry::new();
        let mut names = Vec::new();
        let mut register = |c: Box<dyn Collector>| -> Result<(), MetricsError> {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c)?;
            Ok(())
        };

        let sync_proxy_rules_duration = Histogram::with_opts(kp_histogram(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration_buckets(),
        ))?;
        let sync_full_proxy_rules_duration = Histogram::with_opts(kp_histogram(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_duration_buckets(),
        ))?;
        let sync_partial_proxy_rules_duration = Histogram::with_opts(kp_histogram(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_duration_buckets(),
        ))?;
        let sync_proxy_rules_last_timestamp = Gauge::with_opts(kp(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        ))?;
        let sync_proxy_rules_last_queued_timestamp = Gauge::with_opts(kp(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        ))?;
        let network_programming_duration = Histogram::with_opts(kp_histogram(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming_buckets(),
        ))?;
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
        let iptables_restore_failures_total = IntCounter::with_opts(kp(
            "sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
        ))?;
        let iptables_partial_restore_failures_total = IntCounter::with_opts(kp(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
        ))?;
        let iptables_total = GaugeVec::new(
            kp(
                "sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
            ),
            &["table"],
        )?;
        let iptables_last = GaugeVec::new(
            kp(
                "sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
            ),
            &["table"],
        )?;
        let no_local_endpoints_total = GaugeVec::new(
            kp(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
            ),
            &["traffic_policy"],
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
                "gitVersion",
                "gitCommit",
                "gitTreeState",
                "buildDate",
                "goVersion",
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

        for c in [
            Box::new(sync_proxy_rules_duration.clone()) as Box<dyn Collector>,
            Box::new(sync_full_proxy_rules_duration.clone()),
            Box::new(sync_partial_proxy_rules_duration.clone()),
            Box::new(sync_proxy_rules_last_timestamp.clone()),
            Box::new(sync_proxy_rules_last_queued_timestamp.clone()),
            Box::new(network_programming_duration.clone()),
            Box::new(endpoint_changes_pending.clone()),
            Box::new(endpoint_changes_total.clone()),
            Box::new(service_changes_pending.clone()),
            Box::new(service_changes_total.clone()),
            Box::new(iptables_restore_failures_total.clone()),
            Box::new(iptables_partial_restore_failures_total.clone()),
            Box::new(iptables_total.clone()),
            Box::new(iptables_last.clone()),
            Box::new(no_local_endpoints_total.clone()),
            Box::new(proxy_healthz_total.clone()),
            Box::new(proxy_livez_total.clone()),
            Box::new(rest_client_requests_total.clone()),
            Box::new(rest_client_request_duration.clone()),
            Box::new(build_info),
            Box::new(feature_enabled),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            register(c)?;
        }

        Ok(ProxyMetrics {
            registry,
            names,
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
            iptables_restore_failures_total,
            iptables_partial_restore_failures_total,
            iptables_total,
            iptables_last,
            no_local_endpoints_total,
            proxy_healthz_total,
            proxy_livez_total,
            rest_client_requests_total,
            rest_client_request_duration,
        })
    }

    /// Names of every registered metric family (also those with no sample yet).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The `/metrics` body, in the text format 0.0.4.
    pub fn render(&self) -> String {
        textfmt::encode(&self.registry.gather())
    }
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
        let m = ProxyMetrics::new(&BuildInfo {
            git_version: "v1.30.0".into(),
            ..BuildInfo::default()
        })
        .expect("metrics");
        m.sync_proxy_rules_duration.observe(0.003);
        m.network_programming_duration.observe(1.5);
        let text = m.render();
        for needle in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0\"} 0\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300\"} 1\n",
            "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter\n",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0\n",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 0\n",
            "kubernetes_build_info{buildDate=\"\",compiler=\"rustc\",gitCommit=\"\",gitTreeState=\"clean\",gitVersion=\"v1.30.0\",goVersion=\"\",major=\"1\",minor=\"30\",platform=",
            "# TYPE process_resident_memory_bytes gauge\n",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        for name in [
            "kubeproxy_proxy_healthz_total",
            "kubeproxy_sync_proxy_rules_iptables_total",
            "rest_client_requests_total",
            "rest_client_request_duration_seconds",
            "kubernetes_feature_enabled",
        ] {
            assert!(m.names().iter().any(|n| n == name), "{name} not registered");
        }
    }
}
