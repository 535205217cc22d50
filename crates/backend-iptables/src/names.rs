//! Upstream's chain names and rule comments, so that `iptables-save` reads the same as
//! with upstream kube-proxy for the same Service.
//!
//! Per-Service chain suffixes are the first 16 characters of the standard base32 encoding
//! of the SHA-256 of `"<namespace>/<name>[:<port name>]" + "<protocol, lower case>"`
//! (plus the endpoint's `ip:port` for `KUBE-SEP-*`), as upstream computes them.

use std::net::IpAddr;

use proxy_core::model::ServicePortName;
use sha2::{Digest, Sha256};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// Holds the CVE-2020-8558 mitigation (shared with the kubelet upstream).
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Prefixes of the per-Service chains; any chain with one of them is ours to delete.
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// Every fixed chain kube-proxy (ours or upstream's) creates in any table. The kubelet's
/// own chains (`KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`, `KUBE-MARK-DROP`) are not
/// here: they are not ours to remove.
pub const FIXED_CHAINS: [&str; 9] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
    KUBE_FORWARD,
    KUBE_PROXY_FIREWALL,
    KUBE_PROXY_CANARY,
    KUBE_FIREWALL,
];

/// Whether a chain of this name belongs to kube-proxy (ours or upstream's).
pub fn is_proxy_chain(name: &str) -> bool {
    FIXED_CHAINS.contains(&name) || SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `ns/name:port` (or `ns/name` for an unnamed port): upstream's `ServicePortName` string,
/// used in comments and as the hash input.
pub fn service_port_string(name: &ServicePortName) -> String {
    if name.port.is_empty() {
        name.service.to_string()
    } else {
        format!("{}:{}", name.service, name.port)
    }
}

/// `ip:port`, with brackets around IPv6 addresses.
pub fn endpoint_string(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first 16 characters of the base32 encoding (RFC 4648) of `sha256(input)`. 16
/// characters are exactly the first 80 bits, so no padding is involved.
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut bits: u128 = 0;
    for byte in &digest[..10] {
        bits = (bits << 8) | u128::from(*byte);
    }
    (0..16)
        .rev()
        .map(|i| char::from(BASE32_ALPHABET[((bits >> (i * 5)) & 0x1f) as usize]))
        .collect()
}

/// The chain names of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChains {
    /// Cluster traffic policy: all usable endpoints.
    pub svc: String,
    /// Local traffic policy: this node's usable endpoints.
    pub svl: String,
    /// External destinations (NodePort, externalIPs, load-balancer IPs).
    pub ext: String,
    /// Load-balancer source ranges.
    pub fw: String,
}

impl PortChains {
    pub fn new(name: &ServicePortName) -> Self {
        let hash = hash16(&format!(
            "{}{}",
            service_port_string(name),
            name.protocol.as_str()
        ));
        PortChains {
            svc: format!("KUBE-SVC-{hash}"),
            svl: format!("KUBE-SVL-{hash}"),
            ext: format!("KUBE-EXT-{hash}"),
            fw: format!("KUBE-FW-{hash}"),
        }
    }
}

/// `KUBE-SEP-*` of one endpoint of one Service port.
pub fn endpoint_chain(name: &ServicePortName, ip: IpAddr, port: u16) -> String {
    let hash = hash16(&format!(
        "{}{}{}",
        service_port_string(name),
        name.protocol.as_str(),
        endpoint_string(ip, port)
    ));
    format!("KUBE-SEP-{hash}")
}

/// Makes an API-derived text safe inside a double-quoted `iptables-restore` argument:
/// anything but letters, digits and `-_./:` becomes `_`, and the result is bounded by
/// the comment match's 256-byte limit. The model already validates names as DNS labels;
/// this is a second fence, so no name can ever end a quote or a line.
pub fn sanitize(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(200);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::model::{Protocol, ServiceName};

    fn spn(port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("ns1", "svc1"),
            port: port.into(),
            protocol,
        }
    }

    #[test]
    fn chain_names_match_upstream_for_the_same_service() {
        // Values from upstream's own test fixtures (ns1/svc1:p80 TCP, endpoint 10.180.0.1:80).
        let name = spn("p80", Protocol::Tcp);
        assert_eq!(PortChains::new(&name).svc, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(PortChains::new(&name).ext, "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(
            endpoint_chain(&name, "10.180.0.1".parse().unwrap(), 80),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn protocol_and_port_name_change_the_hash() {
        let tcp = PortChains::new(&spn("p80", Protocol::Tcp)).svc;
        let udp = PortChains::new(&spn("p80", Protocol::Udp)).svc;
        let unnamed = PortChains::new(&spn("", Protocol::Tcp)).svc;
        assert_ne!(tcp, udp);
        assert_ne!(tcp, unnamed);
        assert!(tcp.len() <= 28, "iptables chain names are at most 28 chars");
    }

    #[test]
    fn sanitize_cannot_break_quotes_or_lines() {
        let s = sanitize("evil\"; flush\n-A INPUT -j DROP \\");
        assert!(!s.contains(['"', '\n', ' ', '\\']), "{s}");
        assert_eq!(sanitize("ns/name:port"), "ns/name:port");
    }

    #[test]
    fn ownership_of_chain_names() {
        assert!(is_proxy_chain("KUBE-SEP-SXIVWICOYRO3J4NJ"));
        assert!(is_proxy_chain("KUBE-SERVICES"));
        assert!(!is_proxy_chain("KUBE-KUBELET-CANARY"));
        assert!(!is_proxy_chain("DOCKER"));
    }
}
