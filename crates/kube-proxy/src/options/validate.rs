//! Validation of an effective configuration, after upstream's
//! `pkg/proxy/apis/config/validation`. All problems are collected so the user
//! can fix them in one go; each names the config field (JSON path).

use std::fmt;
use std::net::IpAddr;

use super::config::{
    parse_ip, split_host_port, split_list, KubeProxyConfiguration, LocalMode, ProxyMode,
};
use super::duration::GoDuration;

/// The only value upstream v1.30 accepts for `showHiddenMetricsForVersion`
/// (the previous minor release).
const PREVIOUS_MINOR_VERSION: &str = "1.29";

const IPVS_SCHEDULERS: &[&str] = &[
    "", "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
];

/// One invalid field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path such as `iptables.masqueradeBit` or `nodePortAddresses[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, field: &str, d: GoDuration) {
        if d.as_nanos() <= 0 {
            self.add(field, format!("must be greater than 0 (got {d})"));
        }
    }

    fn non_negative(&mut self, field: &str, d: GoDuration) {
        if d.is_negative() {
            self.add(
                field,
                format!("must be greater than or equal to 0 (got {d})"),
            );
        }
    }

    fn masquerade_bit(&mut self, field: &str, bit: Option<i32>) {
        if let Some(bit) = bit {
            if !(0..=31).contains(&bit) {
                self.add(
                    field,
                    format!("must be within the range [0, 31] (got {bit})"),
                );
            }
        }
    }

    fn host_port(&mut self, field: &str, value: &str) {
        let Some((host, port)) = split_host_port(value) else {
            self.add(field, format!("must be IP:port (got {value:?})"));
            return;
        };
        if parse_ip(host).is_none() {
            self.add(field, format!("{host:?} must be a valid IP"));
        }
        if !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            self.add(field, format!("{port:?} must be a valid port (1-65535)"));
        }
    }

    fn cidr(&mut self, field: String, value: &str) {
        if value.parse::<ipnet::IpNet>().is_err() {
            self.add(
                field,
                format!("{value:?} must be a valid CIDR (e.g. 10.100.0.0/16)"),
            );
        }
    }
}

/// Checks `cfg` and returns every problem found (empty when valid).
pub fn validate(cfg: &KubeProxyConfiguration) -> Vec<FieldError> {
    let mut e = Errors::default();

    // Linux: upstream's validateProxyMode.
    match cfg.mode {
        ProxyMode::Unset
        | ProxyMode::IpTables
        | ProxyMode::Ipvs
        | ProxyMode::NfTables
        | ProxyMode::Userspace => {}
        ProxyMode::KernelSpace => e.add(
            "mode",
            "\"kernelspace\" is only supported on Windows; must be \"iptables\", \"ipvs\" or \"nftables\"",
        ),
    }

    match super::features::FeatureGates::resolve(&cfg.feature_gates) {
        Err(message) => e.add("featureGates", message),
        Ok((gates, _)) => {
            if cfg.mode == ProxyMode::Ipvs && !gates.enabled(super::features::KUBE_PROXY_IPVS) {
                e.add(
                    "mode",
                    "\"ipvs\" needs the KubeProxyIPVS feature gate, which is disabled",
                );
            }
        }
    }

    let ipt = &cfg.iptables;
    e.masquerade_bit("iptables.masqueradeBit", ipt.masquerade_bit);
    e.positive("iptables.syncPeriod", ipt.sync_period);
    e.non_negative("iptables.minSyncPeriod", ipt.min_sync_period);

    if cfg.mode == ProxyMode::Ipvs {
        let ipvs = &cfg.ipvs;
        e.positive("ipvs.syncPeriod", ipvs.sync_period);
        e.non_negative("ipvs.minSyncPeriod", ipvs.min_sync_period);
        if !IPVS_SCHEDULERS.contains(&ipvs.scheduler.as_str()) {
            e.add(
                "ipvs.scheduler",
                format!("unknown IPVS scheduler {:?}", ipvs.scheduler),
            );
        }
        for (i, c) in ipvs.exclude_cidrs.iter().enumerate() {
            e.cidr(format!("ipvs.excludeCIDRs[{i}]"), c);
        }
        e.non_negative("ipvs.tcpTimeout", ipvs.tcp_timeout);
        e.non_negative("ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout);
        e.non_negative("ipvs.udpTimeout", ipvs.udp_timeout);
    }

    if matches!(cfg.mode, ProxyMode::NfTables | ProxyMode::Unset) {
        let nft = &cfg.nftables;
        e.masquerade_bit("nftables.masqueradeBit", nft.masquerade_bit);
        e.positive("nftables.syncPeriod", nft.sync_period);
        e.non_negative("nftables.minSyncPeriod", nft.min_sync_period);
    }

    let ct = &cfg.conntrack;
    for (field, v) in [
        ("conntrack.maxPerCore", ct.max_per_core),
        ("conntrack.min", ct.min),
    ] {
        if let Some(v) = v.filter(|v| *v < 0) {
            e.add(
                field,
                format!("must be greater than or equal to 0 (got {v})"),
            );
        }
    }
    for (field, d) in [
        (
            "conntrack.tcpEstablishedTimeout",
            ct.tcp_established_timeout,
        ),
        ("conntrack.tcpCloseWaitTimeout", ct.tcp_close_wait_timeout),
        ("conntrack.udpTimeout", Some(ct.udp_timeout)),
        ("conntrack.udpStreamTimeout", Some(ct.udp_stream_timeout)),
    ] {
        if let Some(d) = d {
            e.non_negative(field, d);
        }
    }

    e.positive("configSyncPeriod", cfg.config_sync_period);

    if parse_ip(&cfg.bind_address).is_none() {
        e.add(
            "bindAddress",
            format!("{:?} must be a valid IP address", cfg.bind_address),
        );
    }
    // Empty disables the server.
    if !cfg.healthz_bind_address.is_empty() {
        e.host_port("healthzBindAddress", &cfg.healthz_bind_address);
    }
    if !cfg.metrics_bind_address.is_empty() {
        e.host_port("metricsBindAddress", &cfg.metrics_bind_address);
    }

    validate_cluster_cidr(&mut e, &cfg.cluster_cidr);

    if let Some(adj) = cfg.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            e.add(
                "oomScoreAdj",
                format!("must be within the range [-1000, 1000] (got {adj})"),
            );
        }
    }

    let cc = &cfg.client_connection;
    if cc.burst < 0 {
        e.add(
            "clientConnection.burst",
            format!("must be greater than or equal to 0 (got {})", cc.burst),
        );
    }
    if !cc.qps.is_finite() {
        e.add("clientConnection.qps", "must be a finite number");
    }

    match cfg.detect_local_mode {
        LocalMode::BridgeInterface if cfg.detect_local.bridge_interface.is_empty() => e.add(
            "detectLocal.bridgeInterface",
            "must be set when detectLocalMode is BridgeInterface",
        ),
        LocalMode::InterfaceNamePrefix if cfg.detect_local.interface_name_prefix.is_empty() => e
            .add(
                "detectLocal.interfaceNamePrefix",
                "must be set when detectLocalMode is InterfaceNamePrefix",
            ),
        _ => {}
    }

    // Keywords and CIDRs mix freely since upstream v1.37.
    for (i, a) in cfg.node_port_addresses.iter().enumerate() {
        if let Err(err) = proxy_core::model::NodePortAddresses::parse(&[a]) {
            e.add(format!("nodePortAddresses[{i}]"), err);
        }
    }

    let v = &cfg.show_hidden_metrics_for_version;
    if !v.is_empty() && v != PREVIOUS_MINOR_VERSION {
        e.add(
            "showHiddenMetricsForVersion",
            format!("must be omitted or {PREVIOUS_MINOR_VERSION:?} (got {v:?})"),
        );
    }

    if !matches!(cfg.logging.format.as_str(), "text" | "json") {
        e.add(
            "logging.format",
            format!(
                "unsupported format {:?}; must be \"text\" or \"json\"",
                cfg.logging.format
            ),
        );
    }
    for (i, item) in cfg.logging.vmodule.iter().enumerate() {
        if item.file_pattern.is_empty() || item.file_pattern.contains(['=', ',']) {
            e.add(
                format!("logging.vmodule[{i}].filePattern"),
                format!("invalid file pattern {:?}", item.file_pattern),
            );
        }
    }

    e.0
}

/// At most two CIDRs, and two only as one IPv4 plus one IPv6.
fn validate_cluster_cidr(e: &mut Errors, value: &str) {
    if value.is_empty() {
        return;
    }
    let parts: Vec<&str> = value.split(',').collect();
    if parts.len() > 2 {
        e.add(
            "clusterCIDR",
            format!("{value:?}: only one CIDR, or one IPv4 plus one IPv6 CIDR, is allowed"),
        );
        return;
    }
    let mut nets = Vec::new();
    for p in &parts {
        match p.parse::<ipnet::IpNet>() {
            Ok(n) => nets.push(n),
            Err(_) => e.add(
                "clusterCIDR",
                format!("{p:?} must be a valid CIDR (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)"),
            ),
        }
    }
    if let [a, b] = nets.as_slice() {
        if matches!(a.addr(), IpAddr::V4(_)) == matches!(b.addr(), IpAddr::V4(_)) {
            e.add(
                "clusterCIDR",
                format!("{value:?}: two CIDRs must be one IPv4 and one IPv6"),
            );
        }
    }
}

/// True when `s` is a comma-separated list of valid CIDRs.
pub fn is_cidr_list(s: &str) -> bool {
    split_list(s).all(|p| p.parse::<ipnet::IpNet>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(cfg: &KubeProxyConfiguration) -> Vec<String> {
        validate(cfg).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn effective_default_is_valid() {
        assert_eq!(
            validate(&KubeProxyConfiguration::effective_default()),
            vec![]
        );
    }

    #[test]
    fn collects_all_errors() {
        let mut c = KubeProxyConfiguration::effective_default();
        c.iptables.masquerade_bit = Some(32);
        c.nftables.sync_period = GoDuration::ZERO;
        c.nftables.min_sync_period = GoDuration::from_secs(-1);
        c.bind_address = "nonsense".into();
        c.healthz_bind_address = "1.2.3.4".into();
        c.metrics_bind_address = "1.2.3.4:0".into();
        c.cluster_cidr = "10.0.0.0/8,11.0.0.0/8".into();
        c.node_port_addresses = vec!["primary".into(), "bad".into()];
        c.oom_score_adj = Some(2000);
        c.conntrack.min = Some(-1);
        c.conntrack.udp_timeout = GoDuration::from_secs(-1);
        c.client_connection.burst = -1;
        c.detect_local_mode = LocalMode::BridgeInterface;
        c.config_sync_period = GoDuration::ZERO;
        c.show_hidden_metrics_for_version = "1.2".into();
        c.logging.format = "xml".into();
        c.mode = ProxyMode::KernelSpace;
        let got = fields(&c);
        for want in [
            "mode",
            "iptables.masqueradeBit",
            "conntrack.min",
            "conntrack.udpTimeout",
            "configSyncPeriod",
            "bindAddress",
            "healthzBindAddress",
            "metricsBindAddress",
            "clusterCIDR",
            "oomScoreAdj",
            "clientConnection.burst",
            "detectLocal.bridgeInterface",
            "nodePortAddresses[1]",
            "showHiddenMetricsForVersion",
            "logging.format",
        ] {
            assert!(got.contains(&want.to_string()), "missing {want} in {got:?}");
        }
        // Keywords mix with CIDRs since v1.37: "primary" beside "bad" is fine.
        assert!(
            !got.contains(&"nodePortAddresses[0]".to_string()),
            "{got:?}"
        );
    }

    #[test]
    fn mode_specific_sections() {
        let mut c = KubeProxyConfiguration::effective_default();
        c.nftables.masquerade_bit = Some(40);
        c.ipvs.scheduler = "bogus".into();
        assert_eq!(fields(&c), vec!["nftables.masqueradeBit"]);
        c.mode = ProxyMode::Ipvs;
        c.node_port_addresses.clear();
        assert_eq!(fields(&c), vec!["ipvs.scheduler"]);
    }

    #[test]
    fn cluster_cidr_rules() {
        let mut c = KubeProxyConfiguration::effective_default();
        for ok in ["10.0.0.0/8", "10.0.0.0/8,fd00::/64", "fd00::/64"] {
            c.cluster_cidr = ok.into();
            assert_eq!(validate(&c), vec![], "{ok}");
        }
        for bad in ["10.0.0.0", "a,b,c", "10.0.0.0/8,10.1.0.0/16"] {
            c.cluster_cidr = bad.into();
            assert_eq!(fields(&c), vec!["clusterCIDR"], "{bad}");
        }
        assert!(is_cidr_list("10.0.0.0/8,fd00::/8"));
        assert!(!is_cidr_list("10.0.0.0/8,x"));
    }

    #[test]
    fn display_names_field() {
        let e = FieldError {
            field: "mode".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "mode: bad");
    }
}
