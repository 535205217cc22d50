//! The redirect rules of root mode (pure): traffic to a Service's ClusterIPs, external
//! and load-balancer IPs and NodePort is redirected to the port's local listener, and
//! rejected when the port has no listener (no usable endpoints), as the nftables mode
//! does. Tables of their own, `ip kube-proxy-userspace` and `ip6 kube-proxy-userspace`,
//! rewritten whole: userspace mode is for small clusters, and a rewrite is one atomic
//! transaction.

use std::fmt::Write as _;
use std::net::IpAddr;

use proxy_core::model::{IpFamily, Protocol, ServicePort};

pub const TABLE: &str = "kube-proxy-userspace";

/// What happens to new connections to one Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Redirected to the local listener on this port.
    Redirect(u16),
    /// Refused: TCP reset, ICMP port unreachable for UDP.
    Reject,
}

fn table_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn match_daddr(family: IpFamily, ip: IpAddr) -> String {
    match family {
        IpFamily::V4 => format!("ip daddr {ip}"),
        IpFamily::V6 => format!("ip6 daddr {ip}"),
    }
}

fn verdict(protocol: Protocol, target: Target) -> String {
    match (target, protocol) {
        (Target::Redirect(port), _) => format!("redirect to :{port}"),
        (Target::Reject, Protocol::Tcp) => "reject with tcp reset".to_string(),
        (Target::Reject, _) => "reject".to_string(),
    }
}

/// Renders the tables of `families` (replacing whatever they held) for `ports`.
/// Only parsed addresses and port numbers reach the text, never names.
pub fn render(families: &[IpFamily], ports: &[(&ServicePort, Target)]) -> String {
    let mut out = String::new();
    for &family in families {
        let mut redirects = String::new();
        let mut rejects = String::new();
        for (sp, target) in ports {
            let proto = sp.protocol().as_str();
            let chain = match target {
                Target::Redirect(_) => &mut redirects,
                Target::Reject => &mut rejects,
            };
            let verdict = verdict(sp.protocol(), *target);
            let dests = sp
                .cluster_ips
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.load_balancer_ips)
                .filter(|ip| IpFamily::of(ip) == family);
            for &ip in dests {
                let _ = writeln!(
                    chain,
                    "\t\t{} {proto} dport {} {verdict}",
                    match_daddr(family, ip),
                    sp.port
                );
            }
            // NodePorts answer on every local address of the family the port has.
            if let Some(node_port) = sp.node_port {
                if sp.families().any(|f| f == family) {
                    let _ = writeln!(
                        chain,
                        "\t\tfib daddr type local {proto} dport {node_port} {verdict}"
                    );
                }
            }
        }
        let f = table_family(family);
        let _ = write!(
            out,
            "add table {f} {TABLE}\n\
             delete table {f} {TABLE}\n\
             table {f} {TABLE} {{\n\
             \tchain nat-prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tjump services\n\
             \t}}\n\
             \tchain nat-output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tjump services\n\
             \t}}\n\
             \tchain filter-prerouting {{\n\
             \t\ttype filter hook prerouting priority dstnat - 10; policy accept;\n\
             \t\tct state new jump no-endpoints\n\
             \t}}\n\
             \tchain filter-output {{\n\
             \t\ttype filter hook output priority -110; policy accept;\n\
             \t\tct state new jump no-endpoints\n\
             \t}}\n\
             \tchain services {{\n{redirects}\t}}\n\
             \tchain no-endpoints {{\n{rejects}\t}}\n\
             }}\n"
        );
    }
    out
}

/// Deletes the tables in both families; succeeds whether or not they exist.
pub fn cleanup_script() -> String {
    let mut out = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let f = table_family(family);
        let _ = writeln!(out, "add table {f} {TABLE}\ndelete table {f} {TABLE}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::model::{ServiceName, ServicePortName};

    fn port(proto: Protocol, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                service: ServiceName::new("default", "web"),
                port: "http".into(),
                protocol: proto,
            },
            cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            port: 80,
            node_port,
            external_ips: vec!["192.168.200.50".parse().unwrap()],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_timeout: None,
            external_traffic_policy: Default::default(),
            internal_traffic_policy: Default::default(),
            health_check_node_port: None,
        }
    }

    #[test]
    fn redirects_and_rejects_per_family() {
        let web = port(Protocol::Tcp, Some(30080));
        let dns = port(Protocol::Udp, None);
        let script = render(
            &[IpFamily::V4, IpFamily::V6],
            &[(&web, Target::Redirect(40000)), (&dns, Target::Reject)],
        );
        let v4 = script.split("table ip6").next().unwrap();
        assert!(v4.contains("ip daddr 10.96.0.10 tcp dport 80 redirect to :40000"));
        assert!(v4.contains("ip daddr 192.168.200.50 tcp dport 80 redirect to :40000"));
        assert!(v4.contains("fib daddr type local tcp dport 30080 redirect to :40000"));
        assert!(v4.contains("ip daddr 10.96.0.10 udp dport 80 reject\n"));
        assert!(!v4.contains("fd00::10"));
        assert!(script.contains("ip6 daddr fd00::10 tcp dport 80 redirect to :40000"));
        assert!(script.contains("ip6 daddr fd00::10 udp dport 80 reject\n"));
        assert_eq!(script.matches("delete table").count(), 2);
    }
}
