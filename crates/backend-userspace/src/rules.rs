//! The redirect rules of root mode (pure): traffic to a Service's ClusterIPs, external
//! and load-balancer IPs and NodePort is redirected to the port's local listener, and
//! rejected when the port has no listener (no usable endpoints), as the nftables mode
//! does. Tables of their own, `ip kube-proxy-userspace` and `ip6 kube-proxy-userspace`,
//! rewritten whole: userspace mode is for small clusters, and a rewrite is one atomic
//! transaction.

use backend_nftables::netlink::{add_rules, drop_tables, ops_text_in, Hook, HookPoint, TableOp};
use backend_nftables::rule::{Rule, Sel, Stmt, Verdict};
use ipnet::IpNet;
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

fn verdict(protocol: Protocol, target: Target) -> Stmt {
    match (target, protocol) {
        (Target::Redirect(port), _) => Stmt::Redirect(port),
        (Target::Reject, Protocol::Tcp) => Stmt::RejectTcpReset,
        (Target::Reject, _) => Stmt::Reject,
    }
}

fn jump(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(chain.into()))
}

/// The tables of `families` (replacing whatever they held) for `ports`, as one
/// transaction on the tables named [`TABLE`].
pub fn ops(families: &[IpFamily], ports: &[(&ServicePort, Target)]) -> Vec<TableOp<'static>> {
    let mut out = Vec::new();
    for &family in families {
        let mut redirects = Vec::new();
        let mut rejects = Vec::new();
        for (sp, target) in ports {
            let chain = match target {
                Target::Redirect(_) => &mut redirects,
                Target::Reject => &mut rejects,
            };
            let port_is = |port| Stmt::PortIs {
                protocol: sp.protocol(),
                port,
            };
            let verdict = verdict(sp.protocol(), *target);
            let dests = sp
                .cluster_ips
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.load_balancer_ips)
                .filter(|ip| IpFamily::of(ip) == family);
            for &ip in dests {
                chain.push(Rule::new([
                    Stmt::AddrIs {
                        sel: Sel::Daddr,
                        net: IpNet::from(ip),
                        negate: false,
                    },
                    port_is(sp.port),
                    verdict.clone(),
                ]));
            }
            // NodePorts answer on every local address of the family the port has.
            if let Some(node_port) = sp.node_port {
                if sp.families().any(|f| f == family) {
                    chain.push(Rule::new([
                        Stmt::FibLocal(Sel::Daddr),
                        port_is(node_port),
                        verdict.clone(),
                    ]));
                }
            }
        }
        // Add, then delete: the delete succeeds whether or not the table existed.
        out.push(TableOp::AddTable {
            family,
            comment: None,
        });
        out.push(TableOp::DeleteTable(family));
        out.push(TableOp::AddTable {
            family,
            comment: None,
        });
        let hooked = |kind, hook, priority| {
            Some(Hook {
                kind,
                hook,
                priority,
            })
        };
        let chains = [
            (
                "nat-prerouting",
                hooked("nat", HookPoint::Prerouting, -100),
                vec![Rule::new([jump("services")])],
            ),
            (
                "nat-output",
                hooked("nat", HookPoint::Output, -100),
                vec![Rule::new([jump("services")])],
            ),
            (
                "filter-prerouting",
                hooked("filter", HookPoint::Prerouting, -110),
                vec![Rule::new([Stmt::CtNew, jump("no-endpoints")])],
            ),
            (
                "filter-output",
                hooked("filter", HookPoint::Output, -110),
                vec![Rule::new([Stmt::CtNew, jump("no-endpoints")])],
            ),
            ("services", None, redirects),
            ("no-endpoints", None, rejects),
        ];
        // Chains first: rules jump to chains declared after them.
        for (name, hook, _) in &chains {
            out.push(TableOp::AddChain {
                family,
                name: (*name).into(),
                hook: *hook,
                comment: None,
            });
        }
        for (name, _, rules) in chains {
            out.extend(add_rules(family, name, rules));
        }
    }
    out
}

/// [`ops`] as `nft` commands (tests; and what the proxier compares to skip a rewrite).
pub fn render(families: &[IpFamily], ports: &[(&ServicePort, Target)]) -> String {
    ops_text_in(TABLE, &ops(families, ports))
}

/// Deletes the tables in both families; succeeds whether or not they exist.
pub fn cleanup_ops() -> Vec<TableOp<'static>> {
    drop_tables()
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
