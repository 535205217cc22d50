//! The command line, with upstream kube-proxy v1.35 flag names.
//!
//! Every flag is an `Option` without a clap default so we know which flags the
//! user actually gave: upstream only applies some of them on top of `--config`,
//! and unimplemented ones produce a warning.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{ArgMatches, Parser};

use super::config::{
    parse_ip, split_host_port, KubeProxyConfiguration, LocalMode, ProxyMode, VModuleItem,
};
use super::duration::{parse_duration, GoDuration};
use super::validate::is_cidr_list;

/// Flags whose feature works in kube-proxy-rs. Any other flag given on the
/// command line is still parsed, validated and stored in the configuration,
/// but produces a warning. Shrink this list as features land.
pub const IMPLEMENTED_FLAGS: &[&str] = &[
    "proxy-mode", // nftables only; other modes warn separately
    "config",
    "write-config-to",
    "cleanup",
    "version",
    "init-only",
    "hostname-override",
    "bind-address",
    "cluster-cidr",
    "masquerade-all",
    "nodeport-addresses",
    "metrics-bind-address",
    "healthz-bind-address",
    "bind-address-hard-fail",
    "iptables-sync-period",
    "iptables-min-sync-period",
    "iptables-masquerade-bit",
    "v",
    "detect-local-mode",
    "pod-bridge-interface",
    "pod-interface-name-prefix",
    "conntrack-max-per-core",
    "conntrack-min",
    "conntrack-tcp-timeout-established",
    "conntrack-tcp-timeout-close-wait",
    "conntrack-tcp-be-liberal",
    "conntrack-udp-timeout",
    "conntrack-udp-timeout-stream",
    "manifests",
    "service-counters",
    // The API source (crates/source-kube).
    "master",
    "kubeconfig",
    "kube-api-qps",
    "kube-api-burst",
    "kube-api-content-type", // accepted; the client speaks JSON
    "udp-timeout",           // userspace mode only
    // ipvs mode (crates/backend-ipvs).
    "ipvs-sync-period",
    "ipvs-min-sync-period",
    "ipvs-scheduler",
    "ipvs-strict-arp",
    "ipvs-exclude-cidrs",
    "ipvs-tcp-timeout",
    "ipvs-tcpfin-timeout",
    "ipvs-udp-timeout",
    "feature-gates",
];

/// Flags upstream still honours when `--config` is given (`Options.Complete`:
/// the file replaces the flag-built configuration, then logging flags and
/// `--hostname-override` are re-applied; the rest are not part of the file).
/// Every other flag is ignored with a warning in that case.
pub const FLAGS_APPLIED_WITH_CONFIG_FILE: &[&str] = &[
    "config",
    "write-config-to",
    "cleanup",
    "version",
    "init-only",
    "master",
    "hostname-override",
    "manifests",
    "service-counters",
    "v",
    "vmodule",
    "logging-format",
    "log-flush-frequency",
    "log-json-split-stream",
    "log-json-info-buffer-size",
    "log-text-split-stream",
    "log-text-info-buffer-size",
];

/// Which flag sets a config field, to point users at the flag when a value
/// they gave on the command line fails validation.
pub const FIELD_FLAGS: &[(&str, &str)] = &[
    ("mode", "proxy-mode"),
    ("featureGates", "feature-gates"),
    ("bindAddress", "bind-address"),
    ("healthzBindAddress", "healthz-bind-address"),
    ("metricsBindAddress", "metrics-bind-address"),
    ("clusterCIDR", "cluster-cidr"),
    ("nodePortAddresses", "nodeport-addresses"),
    ("iptables.syncPeriod", "iptables-sync-period"),
    ("iptables.minSyncPeriod", "iptables-min-sync-period"),
    ("nftables.syncPeriod", "iptables-sync-period"),
    ("nftables.minSyncPeriod", "iptables-min-sync-period"),
    ("ipvs.syncPeriod", "ipvs-sync-period"),
    ("ipvs.minSyncPeriod", "ipvs-min-sync-period"),
    ("ipvs.scheduler", "ipvs-scheduler"),
    ("ipvs.excludeCIDRs", "ipvs-exclude-cidrs"),
    ("ipvs.tcpTimeout", "ipvs-tcp-timeout"),
    ("ipvs.tcpFinTimeout", "ipvs-tcpfin-timeout"),
    ("ipvs.udpTimeout", "ipvs-udp-timeout"),
    ("configSyncPeriod", "config-sync-period"),
    (
        "conntrack.tcpEstablishedTimeout",
        "conntrack-tcp-timeout-established",
    ),
    (
        "conntrack.tcpCloseWaitTimeout",
        "conntrack-tcp-timeout-close-wait",
    ),
    ("conntrack.udpTimeout", "conntrack-udp-timeout"),
    ("conntrack.udpStreamTimeout", "conntrack-udp-timeout-stream"),
    ("clientConnection.burst", "kube-api-burst"),
    ("clientConnection.qps", "kube-api-qps"),
    ("detectLocal.bridgeInterface", "pod-bridge-interface"),
    (
        "detectLocal.interfaceNamePrefix",
        "pod-interface-name-prefix",
    ),
    (
        "showHiddenMetricsForVersion",
        "show-hidden-metrics-for-version",
    ),
    ("logging.format", "logging-format"),
];

/// Value of pflag-style `--version[=true|false|raw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionFlag {
    Off,
    On,
    Raw,
}

#[derive(Debug, Parser)]
#[command(
    name = "kube-proxy",
    about = "The Kubernetes network proxy (kube-proxy-rs): programs nftables rules on each node so \
             that traffic to Services reaches their endpoints.",
    disable_version_flag = true,
    // pflag takes a repeated flag: the last value wins, a list or map flag adds to it.
    args_override_self = true,
    max_term_width = 100
)]
pub struct Flags {
    // --- Where the configuration comes from, and what to do ---
    /// The path to the configuration file (KubeProxyConfiguration YAML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Write the effective configuration to this file and exit.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,

    /// Remove the rules kube-proxy installed and exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub cleanup: Option<bool>,

    /// Print version information and exit (`--version=raw` is accepted too).
    #[arg(long, value_name = "true|false|raw", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_version_flag)]
    pub version: Option<VersionFlag>,

    /// Do the privileged set-up only (conntrack and mode sysctls), then exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub init_only: Option<bool>,

    /// Read Services and EndpointSlices from this YAML file or directory instead of the API server.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,

    // --- Proxy behaviour ---
    /// Proxy mode: 'nftables' (default), 'userspace', 'iptables' or 'ipvs'.
    #[arg(long, value_name = "MODE", value_parser = parse_proxy_mode)]
    pub proxy_mode: Option<ProxyMode>,

    /// Name of the Node this kube-proxy runs on, instead of the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// Overrides the node's primary IP (the name is historical; no socket is bound to it). [default: 0.0.0.0]
    #[arg(long, value_name = "IP", value_parser = parse_ip_flag)]
    pub bind_address: Option<String>,

    /// Treat failure to bind a server port as fatal.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub bind_address_hard_fail: Option<bool>,

    /// Pod CIDR(s) of the cluster; a comma-separated IPv4/IPv6 pair for dual-stack.
    #[arg(long, value_name = "CIDRS", value_parser = parse_cidr_list_flag)]
    pub cluster_cidr: Option<String>,

    /// Masquerade (SNAT) all traffic sent to Service cluster IPs.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub masquerade_all: Option<bool>,

    /// Count new connections per Service port and destination kind (cluster IP, NodePort, external IP, load-balancer IP) in the kernel; exported as kubeproxy_service_* metrics and in /debug/services. nftables mode only; not part of the configuration file, so honoured with --config too. [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub service_counters: Option<bool>,

    /// CIDRs whose node IPs accept NodePort traffic, and any of the keywords 'primary' (the node's primary IPs), 'localhost' (its loopback addresses; in nftables mode served by user-space listeners when the KubeProxyNFTablesLocalhostNodePorts gate is on) and 'all' (every address). [default in nftables mode: primary]
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_node_port_address)]
    pub nodeport_addresses: Option<Vec<String>>,

    /// Metrics server address, IP or IP:port; empty disables it. [default: 127.0.0.1:10249]
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_ip_port_flag)]
    pub metrics_bind_address: Option<String>,

    /// Health check server address, IP or IP:port; empty disables it. [default: 0.0.0.0:10256]
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_ip_port_flag)]
    pub healthz_bind_address: Option<String>,

    /// Deprecated: port of the health check server; 0 disables it.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16))]
    pub healthz_port: Option<u16>,

    /// Deprecated: port of the metrics server; 0 disables it.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16))]
    pub metrics_port: Option<u16>,

    /// How often rules are fully re-synchronised, e.g. '30s', '1m'. [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub iptables_sync_period: Option<GoDuration>,

    /// Minimum time between rule re-syncs; 0 syncs on every change. [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub iptables_min_sync_period: Option<GoDuration>,

    /// Bit of the fwmark space marking packets that need SNAT, 0-31. [default: 14]
    #[arg(long, value_name = "BIT", value_parser = clap::value_parser!(i32).range(0..=31))]
    pub iptables_masquerade_bit: Option<i32>,

    /// Set to false to stop accepting NodePort connections on localhost (iptables mode).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub iptables_localhost_nodeports: Option<bool>,

    /// IPVS full re-sync interval. [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub ipvs_sync_period: Option<GoDuration>,

    /// Minimum time between IPVS re-syncs.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub ipvs_min_sync_period: Option<GoDuration>,

    /// IPVS scheduler (rr, wrr, lc, ...).
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// Comma-separated CIDRs the IPVS proxier leaves alone when cleaning up.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr_flag)]
    pub ipvs_exclude_cidrs: Option<Vec<String>>,

    /// Enable strict ARP (arp_ignore=1, arp_announce=2).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub ipvs_strict_arp: Option<bool>,

    /// Idle timeout for IPVS TCP connections; 0 leaves it as is.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub ipvs_tcp_timeout: Option<GoDuration>,

    /// Timeout for IPVS TCP connections after a FIN; 0 leaves it as is.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub ipvs_tcpfin_timeout: Option<GoDuration>,

    /// Timeout for IPVS UDP packets; 0 leaves it as is.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub ipvs_udp_timeout: Option<GoDuration>,

    /// How to detect pod (local) traffic: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix.
    #[arg(long, value_name = "MODE", value_parser = parse_local_mode)]
    pub detect_local_mode: Option<LocalMode>,

    /// Bridge whose traffic is local when --detect-local-mode=BridgeInterface.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// Interface name prefix whose traffic is local when --detect-local-mode=InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    // --- Conntrack ---
    /// Conntrack entries to allow per CPU core (the total capped at 1048576); 0 leaves the
    /// limit as is. [default: 32768]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub conntrack_max_per_core: Option<i32>,

    /// Minimum conntrack table size regardless of --conntrack-max-per-core. [default: 131072]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub conntrack_min: Option<i32>,

    /// Idle timeout for established TCP connections; 0 leaves it as is. [default: 24h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub conntrack_tcp_timeout_established: Option<GoDuration>,

    /// Conntrack timeout for TCP connections in CLOSE_WAIT. [default: 1h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub conntrack_tcp_timeout_close_wait: Option<GoDuration>,

    /// Set nf_conntrack_tcp_be_liberal to 1.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// Idle timeout for UNREPLIED UDP conntrack entries; 0 leaves it as is.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub conntrack_udp_timeout: Option<GoDuration>,

    /// Idle timeout for ASSURED UDP conntrack entries; 0 leaves it as is.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub conntrack_udp_timeout_stream: Option<GoDuration>,

    // --- API server connection ---
    /// Path to a kubeconfig file for the API server.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<String>,

    /// API server address (overrides the kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// Queries per second towards the API server. [default: 5]
    #[arg(long, value_name = "QPS", value_parser = parse_finite_f32)]
    pub kube_api_qps: Option<f32>,

    /// Burst of queries towards the API server. [default: 10]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub kube_api_burst: Option<i32>,

    /// Content type of requests to the API server. [default: application/vnd.kubernetes.protobuf]
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,

    /// How often configuration from the API server is refreshed. [default: 15m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub config_sync_period: Option<GoDuration>,

    // --- Process and observability ---
    /// Feature gates as key=value pairs: AllAlpha, AllBeta, AllowServiceExternalIPs
    /// (deprecated, default true), ContextualLogging (beta, true), KubeProxyIPVS
    /// (deprecated, true), LoggingAlphaOptions (alpha, false), LoggingBetaOptions (beta,
    /// true), and GA gates locked to true: MultiCIDRServiceAllocator, NFTablesProxyMode,
    /// PreferSameTrafficDistribution, ServiceTrafficDistribution, TopologyAwareHints,
    /// WinDSR, WinOverlay.
    #[arg(long, value_name = "K=V,...", value_delimiter = ',', value_parser = parse_feature_gate)]
    pub feature_gates: Option<Vec<(String, bool)>>,

    /// oom_score_adj for the kube-proxy process, -1000..1000. [default: -999]
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,

    /// Serve /debug/pprof on the metrics server.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub profiling: Option<bool>,

    /// Previous minor version whose hidden metrics to show, e.g. '1.29'.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,

    /// Log verbosity level.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", value_parser = clap::value_parser!(u32))]
    pub verbosity: Option<u32>,

    /// Per-file log verbosity: comma-separated pattern=N.
    #[arg(long, value_name = "PATTERN=N,...", value_delimiter = ',', value_parser = parse_vmodule)]
    pub vmodule: Option<Vec<VModuleItem>>,

    /// Log format: 'text' or 'json'. [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    pub logging_format: Option<String>,

    /// Maximum time between log flushes. [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub log_flush_frequency: Option<GoDuration>,

    /// [Alpha] Write info messages to stdout and errors to stderr in JSON format.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub log_json_split_stream: Option<bool>,

    /// [Alpha] Buffer size for info messages in JSON split-stream mode.
    #[arg(long, value_name = "QUANTITY")]
    pub log_json_info_buffer_size: Option<String>,

    /// [Alpha] Write info messages to stdout and errors to stderr in text format.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub log_text_split_stream: Option<bool>,

    /// [Alpha] Buffer size for info messages in text split-stream mode.
    #[arg(long, value_name = "QUANTITY")]
    pub log_text_info_buffer_size: Option<String>,

    // --- Accepted for compatibility only ---
    /// No effect (was for the removed userspace proxy).
    #[arg(long, value_name = "RANGE")]
    pub proxy_port_range: Option<String>,

    /// Idle time after which a UDP session ends (userspace mode). [default: 250ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub udp_timeout: Option<GoDuration>,
}

/// Long names of the flags given explicitly on the command line.
pub fn flags_set(cmd: &clap::Command, matches: &ArgMatches) -> Vec<&'static str> {
    cmd.get_arguments()
        .filter(|a| {
            matches.value_source(a.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine)
        })
        .filter_map(|a| a.get_long())
        .filter_map(|long| {
            // Map back to our static names so callers get &'static str.
            IMPLEMENTED_FLAGS
                .iter()
                .chain(FLAGS_APPLIED_WITH_CONFIG_FILE)
                .chain(ALL_OTHER_FLAGS)
                .find(|n| **n == long)
                .copied()
        })
        .collect()
}

/// The flags given on the command line with their values as given (a repeated flag's
/// values joined by commas), for `/flagz`.
pub fn given_values(cmd: &clap::Command, matches: &ArgMatches) -> BTreeMap<String, String> {
    cmd.get_arguments()
        .filter(|a| {
            matches.value_source(a.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine)
        })
        .filter_map(|a| {
            let long = a.get_long()?;
            let values: Vec<String> = matches
                .get_raw(a.get_id().as_str())
                .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            Some((long.to_owned(), values.join(",")))
        })
        .collect()
}

/// Flags that are neither implemented nor honoured with `--config`; kept so
/// `flags_set` can hand out `'static` names. A unit test checks the three lists
/// cover every flag.
const ALL_OTHER_FLAGS: &[&str] = &[
    "healthz-port",
    "metrics-port",
    "iptables-localhost-nodeports",
    "config-sync-period",
    "oom-score-adj",
    "profiling",
    "show-hidden-metrics-for-version",
    "proxy-port-range",
];

/// Extra explanation for some unimplemented flags.
pub fn warning_for_flag(flag: &str) -> String {
    match flag {
        "healthz-port" | "metrics-port" => format!(
            "flag --{flag} is deprecated (use --{}-bind-address instead)",
            flag.trim_end_matches("-port")
        ),
        "proxy-port-range" => {
            format!("flag --{flag} has no effect (it configured the removed userspace proxy)")
        }
        _ => format!("flag --{flag} is accepted but not implemented yet; it has no effect"),
    }
}

impl Flags {
    /// Applies the flags that upstream stores in the configuration object
    /// (everything except `--config`, `--master`, and the action flags).
    pub fn apply_to(&self, cfg: &mut KubeProxyConfiguration) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut cfg.mode, &self.proxy_mode);
        set(&mut cfg.bind_address, &self.bind_address);
        set(
            &mut cfg.bind_address_hard_fail,
            &self.bind_address_hard_fail,
        );
        set(&mut cfg.cluster_cidr, &self.cluster_cidr);
        set(&mut cfg.node_port_addresses, &self.nodeport_addresses);
        set(&mut cfg.metrics_bind_address, &self.metrics_bind_address);
        set(&mut cfg.healthz_bind_address, &self.healthz_bind_address);

        // Upstream v1.30 stores these four flags only in `iptables.*`, while its
        // nftables proxier reads `nftables.*`, so they silently do nothing in
        // nftables mode there. v1.31+ fixed that for the sync periods and
        // masquerade-all (they feed the mode-independent settings for every
        // non-IPVS mode). As nftables is our main mode, we set both sections so
        // the flags take effect and a written config is consistent either way;
        // for the masquerade bit this goes beyond upstream, which keeps
        // nftables.masqueradeBit separate.
        if let Some(d) = self.iptables_sync_period {
            cfg.iptables.sync_period = d;
            cfg.nftables.sync_period = d;
        }
        if let Some(d) = self.iptables_min_sync_period {
            cfg.iptables.min_sync_period = d;
            cfg.nftables.min_sync_period = d;
        }
        if let Some(b) = self.masquerade_all {
            cfg.iptables.masquerade_all = b;
            cfg.nftables.masquerade_all = b;
        }
        if let Some(bit) = self.iptables_masquerade_bit {
            cfg.iptables.masquerade_bit = Some(bit);
            cfg.nftables.masquerade_bit = Some(bit);
        }
        if self.iptables_localhost_nodeports.is_some() {
            cfg.iptables.localhost_node_ports = self.iptables_localhost_nodeports;
        }

        set(&mut cfg.ipvs.sync_period, &self.ipvs_sync_period);
        set(&mut cfg.ipvs.min_sync_period, &self.ipvs_min_sync_period);
        set(&mut cfg.ipvs.scheduler, &self.ipvs_scheduler);
        set(&mut cfg.ipvs.exclude_cidrs, &self.ipvs_exclude_cidrs);
        set(&mut cfg.ipvs.strict_arp, &self.ipvs_strict_arp);
        set(&mut cfg.ipvs.tcp_timeout, &self.ipvs_tcp_timeout);
        set(&mut cfg.ipvs.tcp_fin_timeout, &self.ipvs_tcpfin_timeout);
        set(&mut cfg.ipvs.udp_timeout, &self.ipvs_udp_timeout);

        set(&mut cfg.detect_local_mode, &self.detect_local_mode);
        set(
            &mut cfg.detect_local.bridge_interface,
            &self.pod_bridge_interface,
        );
        set(
            &mut cfg.detect_local.interface_name_prefix,
            &self.pod_interface_name_prefix,
        );

        let ct = &mut cfg.conntrack;
        if self.conntrack_max_per_core.is_some() {
            ct.max_per_core = self.conntrack_max_per_core;
        }
        if self.conntrack_min.is_some() {
            ct.min = self.conntrack_min;
        }
        if self.conntrack_tcp_timeout_established.is_some() {
            ct.tcp_established_timeout = self.conntrack_tcp_timeout_established;
        }
        if self.conntrack_tcp_timeout_close_wait.is_some() {
            ct.tcp_close_wait_timeout = self.conntrack_tcp_timeout_close_wait;
        }
        set(&mut ct.tcp_be_liberal, &self.conntrack_tcp_be_liberal);
        set(&mut ct.udp_timeout, &self.conntrack_udp_timeout);
        set(
            &mut ct.udp_stream_timeout,
            &self.conntrack_udp_timeout_stream,
        );

        set(&mut cfg.client_connection.kubeconfig, &self.kubeconfig);
        set(&mut cfg.client_connection.qps, &self.kube_api_qps);
        set(&mut cfg.client_connection.burst, &self.kube_api_burst);
        set(
            &mut cfg.client_connection.content_type,
            &self.kube_api_content_type,
        );
        set(&mut cfg.config_sync_period, &self.config_sync_period);

        if let Some(gates) = &self.feature_gates {
            cfg.feature_gates.extend(gates.iter().cloned());
        }
        if self.oom_score_adj.is_some() {
            cfg.oom_score_adj = self.oom_score_adj;
        }
        set(&mut cfg.enable_profiling, &self.profiling);
        set(
            &mut cfg.show_hidden_metrics_for_version,
            &self.show_hidden_metrics_for_version,
        );
        set(&mut cfg.port_range, &self.proxy_port_range);

        self.apply_logging_to(cfg);
    }

    /// Applies the logging flags; upstream re-applies these on top of a config
    /// file, with `--vmodule` entries placed before the file's.
    pub fn apply_logging_to(&self, cfg: &mut KubeProxyConfiguration) {
        let log = &mut cfg.logging;
        if let Some(v) = self.verbosity {
            log.verbosity = v;
        }
        if let Some(items) = &self.vmodule {
            let mut merged = items.clone();
            merged.append(&mut log.vmodule);
            log.vmodule = merged;
        }
        if let Some(f) = &self.logging_format {
            log.format = f.clone();
        }
        if let Some(d) = self.log_flush_frequency {
            log.flush_frequency = d;
        }
        if let Some(b) = self.log_json_split_stream {
            log.options.json.split_stream = b;
        }
        if let Some(s) = &self.log_json_info_buffer_size {
            log.options.json.info_buffer_size = s.clone();
        }
        if let Some(b) = self.log_text_split_stream {
            log.options.text.split_stream = b;
        }
        if let Some(s) = &self.log_text_info_buffer_size {
            log.options.text.info_buffer_size = s.clone();
        }
    }
}

/// Go's `strconv.ParseBool` spellings.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (use true or false)")),
    }
}

fn parse_version_flag(s: &str) -> Result<VersionFlag, String> {
    if s == "raw" {
        return Ok(VersionFlag::Raw);
    }
    parse_go_bool(s)
        .map(|b| if b { VersionFlag::On } else { VersionFlag::Off })
        .map_err(|_| format!("{s:?} is not valid; use true, false or raw"))
}

fn parse_duration_flag(s: &str) -> Result<GoDuration, String> {
    parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 1m30s, 250ms, 1h)"))
}

fn parse_proxy_mode(s: &str) -> Result<ProxyMode, String> {
    match s.parse()? {
        ProxyMode::KernelSpace => {
            Err("\"kernelspace\" is only supported on Windows; use \"nftables\"".to_string())
        }
        m => Ok(m),
    }
}

fn parse_local_mode(s: &str) -> Result<LocalMode, String> {
    s.parse()
}

/// `utilflag.IPVar`: an IP address, or empty.
fn parse_ip_flag(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    parse_ip(s)
        .map(|_| s.to_string())
        .ok_or_else(|| format!("{s:?} is not a valid IP address"))
}

/// `utilflag.IPPortVar`: an IP, an IP:port, or empty (disables the server).
fn parse_ip_port_flag(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    if parse_ip(s).is_some() {
        return Ok(s.to_string());
    }
    let (host, port) = split_host_port(s)
        .ok_or_else(|| format!("{s:?} is not in a valid format (ip or ip:port)"))?;
    if parse_ip(host).is_none() {
        return Err(format!("{host:?} is not a valid IP address"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{port:?} is not a valid port number"))?;
    Ok(s.to_string())
}

fn parse_cidr_flag(s: &str) -> Result<String, String> {
    s.parse::<ipnet::IpNet>()
        .map(|_| s.to_string())
        .map_err(|_| format!("{s:?} is not a valid CIDR (e.g. 10.0.0.0/8)"))
}

fn parse_cidr_list_flag(s: &str) -> Result<String, String> {
    if is_cidr_list(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a comma-separated list of CIDRs (e.g. 10.244.0.0/16,fd00:10:244::/56)"
        ))
    }
}

fn parse_node_port_address(s: &str) -> Result<String, String> {
    proxy_core::model::NodePortAddresses::parse(&[s]).map(|_| s.to_string())
}

/// One `key=value` of `--feature-gates`, with component-base's error texts.
fn parse_feature_gate(s: &str) -> Result<(String, bool), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("missing bool value for {}", s.trim()));
    };
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() {
        return Err(format!("{s:?} has an empty feature name"));
    }
    let v = parse_go_bool(v).map_err(|_| {
        format!("invalid value of {k}={v}, err: strconv.ParseBool: parsing {v:?}: invalid syntax")
    })?;
    Ok((k.to_string(), v))
}

fn parse_vmodule(s: &str) -> Result<VModuleItem, String> {
    let (pattern, level) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not pattern=N"))?;
    if pattern.is_empty() {
        return Err(format!("{s:?} has an empty file pattern"));
    }
    let verbosity = level
        .parse()
        .map_err(|_| format!("{level:?} is not a non-negative verbosity level"))?;
    Ok(VModuleItem {
        file_pattern: pattern.to_string(),
        verbosity,
    })
}

fn parse_finite_f32(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flag_lists_cover_every_flag_exactly_once() {
        let cmd = Flags::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let in_impl = IMPLEMENTED_FLAGS.contains(&long);
            let in_cfg = FLAGS_APPLIED_WITH_CONFIG_FILE.contains(&long);
            let in_other = ALL_OTHER_FLAGS.contains(&long);
            assert!(
                in_impl || in_cfg || in_other,
                "--{long} missing from the lists"
            );
            assert!(!(in_impl && in_other), "--{long} listed twice");
        }
        cmd.debug_assert();
    }

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
        assert!(parse_go_bool("tRUE").is_err());
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_version_flag("raw"), Ok(VersionFlag::Raw));
        assert_eq!(parse_version_flag("false"), Ok(VersionFlag::Off));
        assert!(parse_version_flag("x").is_err());
        assert_eq!(parse_ip_port_flag("1.2.3.4"), Ok("1.2.3.4".into()));
        assert_eq!(parse_ip_port_flag("[::1]:80"), Ok("[::1]:80".into()));
        assert_eq!(parse_ip_port_flag(""), Ok(String::new()));
        assert!(parse_ip_port_flag("1.2.3.4:x").is_err());
        assert!(parse_ip_port_flag("host:80").is_err());
        assert!(parse_ip_flag("nonsense").is_err());
        assert_eq!(parse_feature_gate("A = true"), Ok(("A".to_string(), true)));
        assert!(parse_feature_gate("A").is_err());
        assert!(parse_feature_gate("A=maybe").is_err());
        assert_eq!(
            parse_vmodule("proxier*=4"),
            Ok(VModuleItem {
                file_pattern: "proxier*".into(),
                verbosity: 4
            })
        );
        assert!(parse_vmodule("x=-1").is_err());
        assert!(parse_finite_f32("NaN").is_err());
        assert!(parse_node_port_address("primary").is_ok());
        assert!(parse_node_port_address("10.0.0.0/8").is_ok());
        assert!(parse_node_port_address("all").is_ok());
        assert!(parse_node_port_address("localhost").is_ok());
        assert!(parse_node_port_address("everything").is_err());
        assert!(parse_proxy_mode("kernelspace").is_err());
        assert_eq!(parse_proxy_mode("userspace"), Ok(ProxyMode::Userspace));
        assert_eq!(parse_local_mode("NodeCIDR"), Ok(LocalMode::NodeCidr));
        assert!(parse_cidr_list_flag("10.0.0.0/8,bad").is_err());
        assert!(warning_for_flag("healthz-port").contains("--healthz-bind-address"));
        assert!(warning_for_flag("proxy-port-range").contains("no effect"));
    }
}
