//! The standard test topology: a node, an outside client, backend pods and a
//! pod without a server, each in its own namespace, wired to the node by veths.
//!
//! ```text
//!  client 192.168.100.2 ── 192.168.100.1 node 10.244.1.1 ── 10.244.1.2 be0
//!         fd00:100::2        fd00:100::1      fd00:244:1::1   fd00:244:1::2
//!                                             10.244.2.1 ── 10.244.2.2 be1 ...
//!                                           10.244.200.1 ── 10.244.200.2 pod_client
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};

use crate::netns::{ip, link, Netns};
use crate::server::{serve, Proto, ServeMode, ServerGuard};

/// IPv4 cluster (pod) CIDR.
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
/// IPv6 cluster (pod) CIDR.
pub const CLUSTER_CIDR_V6: &str = "fd00:244::/48";

/// The node's IPv4 address (on the link to the client).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The node's IPv6 address (on the link to the client).
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
/// The outside client's IPv4 address.
pub const CLIENT_IPV4: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// The outside client's IPv6 address.
pub const CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
/// The pod client's IPv4 address (inside the cluster CIDR, no server).
pub const POD_CLIENT_IPV4: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 2);
/// The pod client's IPv6 address.
pub const POD_CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0x200, 0, 0, 0, 0, 2);

/// Node-side interface towards the client.
pub const NODE_CLIENT_IF: &str = "vclient";
/// Node-side interface towards the pod client.
pub const NODE_POD_CLIENT_IF: &str = "vpodcl";
/// Interface name inside the client, pod client and backend namespaces.
pub const POD_IF: &str = "eth0";

/// Most backends a topology can have (subnet 10.244.200.0/24 is the pod client's).
pub const MAX_BACKENDS: usize = 199;

/// Third octet / third IPv6 group of pod subnet `k`: 10.244.k.0/24 and
/// fd00:244:k::/64, where the IPv6 group is written with the same digits as
/// the IPv4 octet (so 10.244.12.2 pairs with fd00:244:12::2).
fn subnet_group(k: usize) -> u16 {
    u16::from_str_radix(&k.to_string(), 16).expect("decimal digits are hex digits")
}

/// IPv4 address of backend `i`: 10.244.{i+1}.2.
pub fn backend_ipv4(i: usize) -> Ipv4Addr {
    assert!(i < MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
    Ipv4Addr::new(10, 244, (i + 1) as u8, 2)
}

/// IPv6 address of backend `i`: fd00:244:{i+1}::2.
pub fn backend_ipv6(i: usize) -> Ipv6Addr {
    assert!(i < MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
    Ipv6Addr::new(0xfd00, 0x244, subnet_group(i + 1), 0, 0, 0, 0, 2)
}

/// Node-side interface towards backend `i`: `vbe{i}`.
pub fn node_backend_if(i: usize) -> String {
    format!("vbe{i}")
}

/// A backend pod: its own namespace with one interface to the node.
#[derive(Debug)]
pub struct Backend {
    /// The pod's namespace.
    pub ns: Netns,
    /// "be0", "be1", ...; what its servers answer.
    pub name: String,
    /// 10.244.{i+1}.2
    pub ipv4: Ipv4Addr,
    /// fd00:244:{i+1}::2
    pub ipv6: Ipv6Addr,
}

impl Backend {
    /// Serves `port` over TCP and UDP (and SCTP when the kernel has it),
    /// answering each connection / datagram with `"<name>\n"`.
    pub fn serve(&self, port: u16) -> Result<ServerGuard> {
        serve(
            &self.ns,
            &self.name,
            port,
            &Proto::available(),
            ServeMode::Name,
        )
    }

    /// Like [`Backend::serve`] with a chosen protocol set and mode.
    pub fn serve_with(&self, port: u16, protos: &[Proto], mode: ServeMode) -> Result<ServerGuard> {
        serve(&self.ns, &self.name, port, protos, mode)
    }

    /// The backend's address of the same family as `family`.
    pub fn ip_like(&self, family: IpAddr) -> IpAddr {
        match family {
            IpAddr::V4(_) => self.ipv4.into(),
            IpAddr::V6(_) => self.ipv6.into(),
        }
    }
}

/// The standard topology; dropping it deletes all its namespaces.
#[derive(Debug)]
pub struct Topology {
    /// The Kubernetes node; forwards IPv4 and IPv6; default routes via the client.
    pub node: Netns,
    /// An outside client (192.168.100.2, fd00:100::2); default routes via the node.
    pub client: Netns,
    /// Backend pods be0, be1, ...
    pub backends: Vec<Backend>,
    /// A pod without a server (10.244.200.2, fd00:244:200::2); default routes via the node.
    pub pod_client: Netns,
}

impl Topology {
    /// Builds the topology with `backends` backend pods (at most [`MAX_BACKENDS`]).
    pub fn new(backends: usize) -> Result<Topology> {
        ensure!(
            backends <= MAX_BACKENDS,
            "at most {MAX_BACKENDS} backends, asked for {backends}"
        );
        let node = Netns::new()?;
        // Settings that must precede the interfaces: later devices copy "default".
        node.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])?;
        quiet_host(&node)?;

        let client = Netns::new()?;
        let pod_client = Netns::new()?;
        let mut topo = Topology {
            node,
            client,
            backends: Vec::with_capacity(backends),
            pod_client,
        };
        for i in 0..backends {
            topo.backends.push(Backend {
                ns: Netns::new()?,
                name: format!("be{i}"),
                ipv4: backend_ipv4(i),
                ipv6: backend_ipv6(i),
            });
        }
        for ns in topo.hosts() {
            // Hosts must not forward (IPv4 settings are inherited from the root
            // namespace, which may forward).
            ns.sysctls(&[("net.ipv4.ip_forward", "0")])?;
            quiet_host(ns)?;
        }

        link(
            &topo.node,
            NODE_CLIENT_IF,
            &["192.168.100.1/24", "fd00:100::1/64"],
            &topo.client,
            POD_IF,
            &["192.168.100.2/24", "fd00:100::2/64"],
        )
        .context("linking client")?;
        for (i, be) in topo.backends.iter().enumerate() {
            wire_pod(&topo.node, &node_backend_if(i), &be.ns, i + 1)
                .with_context(|| format!("linking {}", be.name))?;
        }
        wire_pod(&topo.node, NODE_POD_CLIENT_IF, &topo.pod_client, 200)
            .context("linking pod client")?;

        // Routes last: gateways must be on links that are up on both ends.
        add_default_routes(&topo.client, "192.168.100.1", "fd00:100::1")?;
        add_default_routes(&topo.node, "192.168.100.2", "fd00:100::2")?;
        Ok(topo)
    }

    /// The namespaces other than the node: client, pod client, backends.
    pub fn hosts(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.pod_client]
            .into_iter()
            .chain(self.backends.iter().map(|b| &b.ns))
    }

    /// Starts [`Backend::serve`] on every backend; keep the guards alive.
    pub fn serve_all(&self, port: u16) -> Result<Vec<ServerGuard>> {
        self.backends.iter().map(|b| b.serve(port)).collect()
    }
}

/// Makes error replies immediate and unthrottled, and IPv6 addresses usable
/// without waiting for duplicate address detection.
fn quiet_host(ns: &Netns) -> Result<()> {
    ns.sysctls(&[
        // Tests send bursts to closed ports and expect every one refused:
        // no per-destination limits, and a namespace-wide budget (shared by
        // ICMP and ICMPv6) far above anything a test sends.
        ("net.ipv4.icmp_ratelimit", "0"),
        ("net.ipv6.icmp.ratelimit", "0"),
        ("net.ipv4.icmp_msgs_per_sec", "1000000"),
        ("net.ipv4.icmp_msgs_burst", "1000000"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ])
}

/// Links pod namespace `pod` to the node on subnet `k` (10.244.k.0/24,
/// fd00:244:k::/64; node .1, pod .2) and points the pod's default routes at the node.
fn wire_pod(node: &Netns, node_if: &str, pod: &Netns, k: usize) -> Result<()> {
    let g = subnet_group(k);
    let node_v4 = format!("10.244.{k}.1");
    let node_v6 = format!("fd00:244:{g:x}::1");
    link(
        node,
        node_if,
        &[&format!("{node_v4}/24"), &format!("{node_v6}/64")],
        pod,
        POD_IF,
        &[
            &format!("10.244.{k}.2/24"),
            &format!("fd00:244:{g:x}::2/64"),
        ],
    )?;
    add_default_routes(pod, &node_v4, &node_v6)
}

fn add_default_routes(ns: &Netns, via_v4: &str, via_v6: &str) -> Result<()> {
    let batch = format!("route add default via {via_v4}\nroute add ::/0 via {via_v6}\n");
    ip(&["-n", ns.name(), "-batch", "-"], Some(&batch))
        .with_context(|| format!("default routes in {}", ns.name()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(backend_ipv4(0).to_string(), "10.244.1.2");
        assert_eq!(backend_ipv6(0).to_string(), "fd00:244:1::2");
        assert_eq!(backend_ipv4(11).to_string(), "10.244.12.2");
        assert_eq!(backend_ipv6(11).to_string(), "fd00:244:12::2");
        assert_eq!(POD_CLIENT_IPV6.to_string(), "fd00:244:200::2");
    }
}
