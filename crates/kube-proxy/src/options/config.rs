//! `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`) as read by
//! `--config` and written by `--write-config-to`.
//!
//! Field names follow upstream's JSON tags exactly so real configs (for
//! example kubeadm's `kube-proxy` ConfigMap) load unchanged. Decoding is strict:
//! unknown fields are errors. Defaulting mirrors upstream's v1alpha1
//! `SetDefaults_KubeProxyConfiguration`: Go pointer fields are `Option`s that
//! default when absent, and plain fields default when absent or zero.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::duration::{deserialize_duration_or_nanos, GoDuration};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
pub const DEFAULT_METRICS_PORT: u16 = 10249;
pub const DEFAULT_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// Upstream `qos.KubeProxyOOMScoreAdj`.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;
pub const DEFAULT_MASQUERADE_BIT: i32 = 14;
/// `nodePortAddresses` keyword for "the node's primary IPs".
pub const NODE_PORT_ADDRESSES_PRIMARY: &str = "primary";

/// Which proxier to run. `Unset` is the empty string: "use the platform
/// default", which for this implementation is nftables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    #[default]
    Unset,
    IpTables,
    Ipvs,
    NfTables,
    /// Removed upstream in v1.26; ours: forwarding in the proxy process, no root needed.
    Userspace,
    /// Windows only; rejected by validation on Linux.
    KernelSpace,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Unset => "",
            ProxyMode::IpTables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::NfTables => "nftables",
            ProxyMode::Userspace => "userspace",
            ProxyMode::KernelSpace => "kernelspace",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProxyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(ProxyMode::Unset),
            "iptables" => Ok(ProxyMode::IpTables),
            "ipvs" => Ok(ProxyMode::Ipvs),
            "nftables" => Ok(ProxyMode::NfTables),
            "kernelspace" => Ok(ProxyMode::KernelSpace),
            "userspace" => Ok(ProxyMode::Userspace),
            // Windows modes (the seeds' `winuserspace`, upstream's `winkernel`, whose
            // configuration name is `kernelspace`) are out of scope: say so plainly.
            "winuserspace" | "winkernel" => Err(format!(
                "proxy mode {s:?} is a Windows mode, which this Linux proxy does not implement (out of scope); use \"nftables\", \"iptables\", \"ipvs\" or \"userspace\""
            )),
            other => Err(format!(
                "unknown proxy mode {other:?}; must be \"iptables\", \"ipvs\", \"nftables\" or \"userspace\""
            )),
        }
    }
}

impl TryFrom<String> for ProxyMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ProxyMode> for String {
    fn from(m: ProxyMode) -> String {
        m.as_str().to_string()
    }
}

/// How kube-proxy tells pod traffic from other traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LocalMode {
    #[default]
    Unset,
    ClusterCidr,
    NodeCidr,
    BridgeInterface,
    InterfaceNamePrefix,
}

impl LocalMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalMode::Unset => "",
            LocalMode::ClusterCidr => "ClusterCIDR",
            LocalMode::NodeCidr => "NodeCIDR",
            LocalMode::BridgeInterface => "BridgeInterface",
            LocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
        }
    }
}

impl fmt::Display for LocalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LocalMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(LocalMode::Unset),
            "ClusterCIDR" => Ok(LocalMode::ClusterCidr),
            "NodeCIDR" => Ok(LocalMode::NodeCidr),
            "BridgeInterface" => Ok(LocalMode::BridgeInterface),
            "InterfaceNamePrefix" => Ok(LocalMode::InterfaceNamePrefix),
            other => Err(format!(
                "unknown detect-local mode {other:?}; must be \"ClusterCIDR\", \"NodeCIDR\", \
                 \"BridgeInterface\" or \"InterfaceNamePrefix\""
            )),
        }
    }
}

impl TryFrom<String> for LocalMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<LocalMode> for String {
    fn from(m: LocalMode) -> String {
        m.as_str().to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnectionConfiguration {
    pub kubeconfig: String,
    pub accept_content_types: String,
    pub content_type: String,
    pub qps: f32,
    pub burst: i32,
}

impl Default for ClientConnectionConfiguration {
    fn default() -> Self {
        ClientConnectionConfiguration {
            kubeconfig: String::new(),
            accept_content_types: String::new(),
            content_type: DEFAULT_CONTENT_TYPE.to_string(),
            qps: 5.0,
            burst: 10,
        }
    }
}

/// One `--vmodule` entry: `filePattern=verbosity`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct OutputRoutingOptions {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub split_stream: bool,
    /// A Kubernetes quantity such as `"0"` or `"64Ki"`; kept as text.
    #[serde(deserialize_with = "deserialize_quantity")]
    pub info_buffer_size: String,
}

impl Default for OutputRoutingOptions {
    fn default() -> Self {
        OutputRoutingOptions {
            split_stream: false,
            info_buffer_size: "0".to_string(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FormatOptions {
    pub text: OutputRoutingOptions,
    pub json: OutputRoutingOptions,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingConfiguration {
    pub format: String,
    #[serde(deserialize_with = "deserialize_duration_or_nanos")]
    pub flush_frequency: GoDuration,
    pub verbosity: u32,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub vmodule: Vec<VModuleItem>,
    pub options: FormatOptions,
}

impl Default for LoggingConfiguration {
    fn default() -> Self {
        LoggingConfiguration {
            format: "text".to_string(),
            flush_frequency: GoDuration::from_secs(5),
            verbosity: 0,
            vmodule: Vec::new(),
            options: FormatOptions::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IpTablesConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub localhost_node_ports: Option<bool>,
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
}

impl Default for IpTablesConfiguration {
    fn default() -> Self {
        IpTablesConfiguration {
            masquerade_bit: Some(DEFAULT_MASQUERADE_BIT),
            masquerade_all: false,
            localhost_node_ports: Some(true),
            sync_period: GoDuration::from_secs(30),
            min_sync_period: GoDuration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsConfiguration {
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
    pub scheduler: String,
    #[serde(rename = "excludeCIDRs", deserialize_with = "null_as_default")]
    pub exclude_cidrs: Vec<String>,
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    pub tcp_timeout: GoDuration,
    pub tcp_fin_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

impl Default for IpvsConfiguration {
    fn default() -> Self {
        IpvsConfiguration {
            sync_period: GoDuration::from_secs(30),
            min_sync_period: GoDuration::ZERO,
            scheduler: String::new(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: GoDuration::ZERO,
            tcp_fin_timeout: GoDuration::ZERO,
            udp_timeout: GoDuration::ZERO,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct NfTablesConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: bool,
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
}

impl Default for NfTablesConfiguration {
    fn default() -> Self {
        NfTablesConfiguration {
            masquerade_bit: Some(DEFAULT_MASQUERADE_BIT),
            masquerade_all: false,
            sync_period: GoDuration::from_secs(30),
            min_sync_period: GoDuration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WinkernelConfiguration {
    pub network_name: String,
    pub source_vip: String,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    pub root_hns_endpoint_name: String,
    pub forward_health_check_vip: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocalConfiguration {
    pub bridge_interface: String,
    pub interface_name_prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_core: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_established_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: GoDuration,
    pub udp_stream_timeout: GoDuration,
}

impl Default for ConntrackConfiguration {
    fn default() -> Self {
        ConntrackConfiguration {
            max_per_core: Some(32 * 1024),
            min: Some(128 * 1024),
            tcp_established_timeout: Some(GoDuration::from_hours(24)),
            tcp_close_wait_timeout: Some(GoDuration::from_hours(1)),
            tcp_be_liberal: false,
            udp_timeout: GoDuration::ZERO,
            udp_stream_timeout: GoDuration::ZERO,
        }
    }
}

/// The whole kube-proxy configuration.
///
/// `Default` gives upstream's v1alpha1 defaults (mode and detectLocalMode
/// still unset); the configuration returned by `options::parse` and
/// `load_config_file` additionally has the platform defaults applied
/// (see [`KubeProxyConfiguration::apply_platform_defaults`]), so all `Option`
/// fields are `Some` there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: String,
    pub kind: String,
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub feature_gates: BTreeMap<String, bool>,
    pub client_connection: ClientConnectionConfiguration,
    pub logging: LoggingConfiguration,
    pub hostname_override: String,
    pub bind_address: String,
    /// Defaulted after decoding because the default depends on `bindAddress`.
    #[serde(default)]
    pub healthz_bind_address: String,
    #[serde(default)]
    pub metrics_bind_address: String,
    pub bind_address_hard_fail: bool,
    pub enable_profiling: bool,
    pub show_hidden_metrics_for_version: String,
    pub mode: ProxyMode,
    #[serde(rename = "iptables")]
    pub iptables: IpTablesConfiguration,
    pub ipvs: IpvsConfiguration,
    pub nftables: NfTablesConfiguration,
    pub winkernel: WinkernelConfiguration,
    pub detect_local_mode: LocalMode,
    pub detect_local: DetectLocalConfiguration,
    /// Comma-separated, at most one CIDR per IP family.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    #[serde(deserialize_with = "null_as_default")]
    pub node_port_addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    pub conntrack: ConntrackConfiguration,
    pub config_sync_period: GoDuration,
    pub port_range: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub windows_run_as_service: bool,
}

// Serde needs these through `TryFrom<String>`/`Into<String>`, declared here so
// the enums above stay plain.
impl Serialize for ProxyMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProxyMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for LocalMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LocalMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for KubeProxyConfiguration {
    fn default() -> Self {
        KubeProxyConfiguration {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            feature_gates: BTreeMap::new(),
            client_connection: ClientConnectionConfiguration::default(),
            logging: LoggingConfiguration::default(),
            hostname_override: String::new(),
            bind_address: "0.0.0.0".to_string(),
            healthz_bind_address: format!("0.0.0.0:{DEFAULT_HEALTHZ_PORT}"),
            metrics_bind_address: format!("127.0.0.1:{DEFAULT_METRICS_PORT}"),
            bind_address_hard_fail: false,
            enable_profiling: false,
            show_hidden_metrics_for_version: String::new(),
            mode: ProxyMode::Unset,
            iptables: IpTablesConfiguration::default(),
            ipvs: IpvsConfiguration::default(),
            nftables: NfTablesConfiguration::default(),
            winkernel: WinkernelConfiguration::default(),
            detect_local_mode: LocalMode::Unset,
            detect_local: DetectLocalConfiguration::default(),
            cluster_cidr: String::new(),
            node_port_addresses: Vec::new(),
            oom_score_adj: Some(DEFAULT_OOM_SCORE_ADJ),
            conntrack: ConntrackConfiguration::default(),
            config_sync_period: GoDuration::from_mins(15),
            port_range: String::new(),
            windows_run_as_service: false,
        }
    }
}

impl KubeProxyConfiguration {
    /// Upstream's defaults plus this implementation's platform defaults: the
    /// configuration kube-proxy-rs runs with when given no flags at all.
    pub fn effective_default() -> Self {
        let mut cfg = Self::default();
        cfg.apply_platform_defaults();
        cfg
    }

    /// Fills fields that upstream defaults when they are zero/empty even if
    /// present in the file (v1alpha1 `SetDefaults_KubeProxyConfiguration`).
    pub fn apply_defaults(&mut self) {
        let d = Self::default();
        if self.bind_address.is_empty() {
            self.bind_address = d.bind_address;
        }
        let ipv4 = matches!(parse_ip(&self.bind_address), Some(IpAddr::V4(_)));
        let (healthz_host, metrics_host) = if ipv4 {
            ("0.0.0.0", "127.0.0.1")
        } else {
            ("[::]", "[::1]")
        };
        self.healthz_bind_address = if self.healthz_bind_address.is_empty() {
            format!("{healthz_host}:{DEFAULT_HEALTHZ_PORT}")
        } else {
            append_port_if_needed(&self.healthz_bind_address, DEFAULT_HEALTHZ_PORT)
        };
        self.metrics_bind_address = if self.metrics_bind_address.is_empty() {
            format!("{metrics_host}:{DEFAULT_METRICS_PORT}")
        } else {
            append_port_if_needed(&self.metrics_bind_address, DEFAULT_METRICS_PORT)
        };
        self.oom_score_adj.get_or_insert(DEFAULT_OOM_SCORE_ADJ);

        let ipt = &mut self.iptables;
        default_if_zero(&mut ipt.sync_period, d.iptables.sync_period);
        default_if_zero(&mut ipt.min_sync_period, d.iptables.min_sync_period);
        ipt.localhost_node_ports.get_or_insert(true);
        ipt.masquerade_bit.get_or_insert(DEFAULT_MASQUERADE_BIT);
        default_if_zero(&mut self.ipvs.sync_period, d.ipvs.sync_period);
        let nft = &mut self.nftables;
        default_if_zero(&mut nft.sync_period, d.nftables.sync_period);
        default_if_zero(&mut nft.min_sync_period, d.nftables.min_sync_period);
        nft.masquerade_bit.get_or_insert(DEFAULT_MASQUERADE_BIT);

        let ct = &mut self.conntrack;
        ct.max_per_core = ct.max_per_core.or(d.conntrack.max_per_core);
        ct.min = ct.min.or(d.conntrack.min);
        ct.tcp_established_timeout = ct
            .tcp_established_timeout
            .or(d.conntrack.tcp_established_timeout);
        ct.tcp_close_wait_timeout = ct
            .tcp_close_wait_timeout
            .or(d.conntrack.tcp_close_wait_timeout);
        default_if_zero(&mut self.config_sync_period, d.config_sync_period);

        let cc = &mut self.client_connection;
        if cc.content_type.is_empty() {
            cc.content_type = d.client_connection.content_type;
        }
        if cc.qps == 0.0 {
            cc.qps = d.client_connection.qps;
        }
        if cc.burst == 0 {
            cc.burst = d.client_connection.burst;
        }

        // component-base's SetRecommendedLoggingConfiguration.
        let log = &mut self.logging;
        if log.format.is_empty() {
            log.format = d.logging.format;
        }
        default_if_zero(&mut log.flush_frequency, d.logging.flush_frequency);
        for routing in [&mut log.options.text, &mut log.options.json] {
            if routing.info_buffer_size.is_empty() {
                routing.info_buffer_size = "0".to_string();
            }
        }
    }

    /// Defaults upstream applies per platform after loading (`platformApplyDefaults`),
    /// except that our default mode is nftables instead of iptables.
    pub fn apply_platform_defaults(&mut self) {
        if self.mode == ProxyMode::Unset {
            self.mode = ProxyMode::NfTables;
        }
        if self.mode == ProxyMode::NfTables && self.node_port_addresses.is_empty() {
            self.node_port_addresses = vec![NODE_PORT_ADDRESSES_PRIMARY.to_string()];
        }
        if self.detect_local_mode == LocalMode::Unset {
            self.detect_local_mode = LocalMode::ClusterCidr;
        }
    }

    /// `clusterCIDR` split into its (at most two) CIDRs; invalid entries are skipped
    /// (validation reports them).
    pub fn cluster_cidrs(&self) -> Vec<ipnet::IpNet> {
        split_list(&self.cluster_cidr)
            .filter_map(|s| s.parse().ok())
            .collect()
    }
}

fn default_if_zero(d: &mut GoDuration, default: GoDuration) {
    if d.is_zero() {
        *d = default;
    }
}

/// Comma-separated list entries, ignoring empty ones.
pub(crate) fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|p| !p.is_empty())
}

/// Parses an IP address, accepting IPv4 octets with leading zeros as Go's
/// `netutils.ParseIPSloppy` does.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (o, p) in octets.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    Some(IpAddr::from(octets))
}

/// Splits `host:port` like Go's `net.SplitHostPort` (IPv6 hosts in brackets).
pub fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        let port = rest.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// Upstream `proxyutil.AppendPortIfNeeded`: a bare IP gets `:port`, anything
/// else (already `ip:port`, or garbage for validation to report) is unchanged.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if let Some((host, _)) = split_host_port(addr) {
        if parse_ip(host).is_some() {
            return addr.to_string();
        }
    }
    match parse_ip(addr) {
        Some(IpAddr::V4(_)) => format!("{addr}:{port}"),
        Some(IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        None => addr.to_string(),
    }
}

/// Go decodes `null` into a slice or map as "empty"; kubeadm writes such nulls.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn deserialize_quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quantity such as \"0\" or \"64Ki\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_upstream_v1alpha1() {
        let c = KubeProxyConfiguration::default();
        assert_eq!(c.api_version, "kubeproxy.config.k8s.io/v1alpha1");
        assert_eq!(c.kind, "KubeProxyConfiguration");
        assert_eq!(c.bind_address, "0.0.0.0");
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(c.metrics_bind_address, "127.0.0.1:10249");
        assert_eq!(c.config_sync_period.to_string(), "15m0s");
        assert_eq!(c.iptables.sync_period.to_string(), "30s");
        assert_eq!(c.iptables.min_sync_period.to_string(), "1s");
        assert_eq!(c.iptables.masquerade_bit, Some(14));
        assert_eq!(c.iptables.localhost_node_ports, Some(true));
        assert_eq!(c.nftables.sync_period.to_string(), "30s");
        assert_eq!(c.nftables.min_sync_period.to_string(), "1s");
        assert_eq!(c.nftables.masquerade_bit, Some(14));
        assert_eq!(c.ipvs.sync_period.to_string(), "30s");
        assert_eq!(c.ipvs.min_sync_period, GoDuration::ZERO);
        assert_eq!(c.conntrack.max_per_core, Some(32768));
        assert_eq!(c.conntrack.min, Some(131072));
        assert_eq!(
            c.conntrack.tcp_established_timeout.map(|d| d.to_string()),
            Some("24h0m0s".to_string())
        );
        assert_eq!(
            c.conntrack.tcp_close_wait_timeout.map(|d| d.to_string()),
            Some("1h0m0s".to_string())
        );
        assert_eq!(c.client_connection.qps, 5.0);
        assert_eq!(c.client_connection.burst, 10);
        assert_eq!(c.client_connection.content_type, DEFAULT_CONTENT_TYPE);
        assert_eq!(c.oom_score_adj, Some(-999));
        assert_eq!(c.logging.format, "text");
        assert_eq!(c.logging.flush_frequency.to_string(), "5s");
        assert_eq!(c.mode, ProxyMode::Unset);

        let e = KubeProxyConfiguration::effective_default();
        assert_eq!(e.mode, ProxyMode::NfTables);
        assert_eq!(e.detect_local_mode, LocalMode::ClusterCidr);
        assert_eq!(e.node_port_addresses, vec!["primary"]);
    }

    #[test]
    fn apply_defaults_fills_zero_values_like_upstream() {
        let mut c = KubeProxyConfiguration {
            bind_address: "::".into(),
            healthz_bind_address: String::new(),
            metrics_bind_address: "10.0.0.1".into(),
            config_sync_period: GoDuration::ZERO,
            ..Default::default()
        };
        c.iptables.min_sync_period = GoDuration::ZERO;
        c.client_connection.qps = 0.0;
        c.conntrack.min = None;
        c.apply_defaults();
        assert_eq!(c.healthz_bind_address, "[::]:10256");
        assert_eq!(c.metrics_bind_address, "10.0.0.1:10249");
        assert_eq!(c.config_sync_period, GoDuration::from_mins(15));
        assert_eq!(c.iptables.min_sync_period, GoDuration::from_secs(1));
        assert_eq!(c.client_connection.qps, 5.0);
        assert_eq!(c.conntrack.min, Some(131072));
    }

    #[test]
    fn platform_defaults_depend_on_mode() {
        let mut c = KubeProxyConfiguration {
            mode: ProxyMode::IpTables,
            ..Default::default()
        };
        c.apply_platform_defaults();
        assert!(c.node_port_addresses.is_empty());
    }

    #[test]
    fn address_helpers() {
        assert_eq!(append_port_if_needed("1.2.3.4", 80), "1.2.3.4:80");
        assert_eq!(append_port_if_needed("::1", 80), "[::1]:80");
        assert_eq!(append_port_if_needed("1.2.3.4:9", 80), "1.2.3.4:9");
        assert_eq!(append_port_if_needed("[::1]:9", 80), "[::1]:9");
        assert_eq!(append_port_if_needed("junk", 80), "junk");
        assert_eq!(split_host_port("[::]:1"), Some(("::", "1")));
        assert_eq!(split_host_port("::1"), None);
        assert_eq!(parse_ip("010.001.0.1"), Some(IpAddr::from([10, 1, 0, 1])));
        assert_eq!(parse_ip("1.2.3"), None);
        let c = KubeProxyConfiguration {
            cluster_cidr: "10.0.0.0/8,fd00::/48".into(),
            ..Default::default()
        };
        assert_eq!(c.cluster_cidrs().len(), 2);
        assert_eq!("nftables".parse::<ProxyMode>(), Ok(ProxyMode::NfTables));
        assert_eq!(ProxyMode::Ipvs.to_string(), "ipvs");
        assert_eq!(String::from(LocalMode::NodeCidr), "NodeCIDR");
        assert_eq!("userspace".parse::<ProxyMode>(), Ok(ProxyMode::Userspace));
        assert!(ProxyMode::try_from("x".to_string()).is_err());
        for windows in ["winuserspace", "winkernel"] {
            let err = windows.parse::<ProxyMode>().expect_err(windows);
            assert!(
                err.contains(windows) && err.contains("Windows mode"),
                "{err}"
            );
        }
        assert_eq!(
            LocalMode::try_from("ClusterCIDR".to_string()),
            Ok(LocalMode::ClusterCidr)
        );
    }
}
