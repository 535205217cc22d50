//! Pure planning: the virtual servers a state needs, the operations that turn what the
//! kernel has into that, and the small nftables table for masquerade.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proxy_core::model::{IpFamily, NodeInfo, Protocol, ProxyState};
use proxy_core::select;

use backend_nftables::netlink::{
    add_rules, drop_tables, ops_text_in, DataType, Hook, HookPoint, SetDecl, TableOp,
};
use backend_nftables::plan::{Field, Fields};
use backend_nftables::rule::{ip_key, nodeport_key, Key, Rule, Sel, Stmt};

/// Name of the dummy interface holding the Service IPs, as upstream.
pub const DUMMY_INTERFACE: &str = "kube-ipvs0";
/// The nftables table (one per family) for masquerade marks.
pub const TABLE: &str = "kube-proxy-ipvs";
/// Weight of a serving real server; draining ones get 0.
pub const WEIGHT: u32 = 1;

/// A virtual server's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualServer {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// A virtual server with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vs: VirtualServer,
    pub scheduler: String,
    /// `Some(seconds)`: persistent (session affinity `ClientIP`).
    pub persistence_timeout: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
}

/// A real server as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealServerState {
    pub rs: RealServer,
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

/// What one virtual server holds in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub spec: ServiceSpec,
    pub dests: BTreeMap<RealServer, RealServerState>,
}

/// What one virtual server must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub spec: ServiceSpec,
    pub dests: BTreeSet<RealServer>,
}

/// One change to the kernel's IPVS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService(ServiceSpec),
    UpdateService(ServiceSpec),
    DelService(VirtualServer),
    AddDest(VirtualServer, RealServer),
    /// Weight 0 drains a removed real server; weight 1 brings a draining one back.
    SetWeight(VirtualServer, RealServer, u32),
    DelDest(VirtualServer, RealServer),
}

/// IPVS connection timeouts in seconds; 0 leaves the kernel's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

impl Timeouts {
    pub fn any(&self) -> bool {
        self.tcp > 0 || self.tcp_fin > 0 || self.udp > 0
    }
}

/// Settings of the ipvs mode.
#[derive(Debug, Clone)]
pub struct IpvsConfig {
    /// `--ipvs-scheduler`; empty means `rr`.
    pub scheduler: String,
    /// `--ipvs-strict-arp`.
    pub strict_arp: bool,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--cluster-cidr`: traffic to cluster IPs from outside is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// The fwmark bit (0..=31) that tells postrouting to masquerade.
    pub masquerade_bit: u8,
    /// `--nodeport-addresses` CIDRs; empty: every node address.
    pub nodeport_cidrs: Vec<IpNet>,
    pub families: Vec<IpFamily>,
    /// `--ipvs-exclude-cidrs`: virtual servers on these addresses are never removed by
    /// a full sync's reconcile (someone else's).
    pub exclude_cidrs: Vec<IpNet>,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`.
    pub timeouts: Timeouts,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            scheduler: "rr".into(),
            strict_arp: false,
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
            masquerade_bit: 14,
            nodeport_cidrs: Vec::new(),
            families: vec![IpFamily::V4, IpFamily::V6],
            exclude_cidrs: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }
}

impl IpvsConfig {
    fn scheduler(&self) -> &str {
        if self.scheduler.is_empty() {
            "rr"
        } else {
            &self.scheduler
        }
    }
}

/// Everything one state needs: virtual servers, the addresses for the dummy interface,
/// and the NodePorts (for masquerade).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: BTreeMap<VirtualServer, Desired>,
    /// Cluster, external and load-balancer IPs: bound to `kube-ipvs0` so that the
    /// kernel delivers their packets locally, where IPVS picks them up.
    pub bound: BTreeSet<IpAddr>,
    /// Cluster IP destinations, the "ipset" of upstream's `KUBE-CLUSTER-IP`.
    pub cluster_ips: BTreeSet<VirtualServer>,
    /// `(protocol, port)` of every NodePort, upstream's `KUBE-NODE-PORT-*` sets.
    pub node_ports: BTreeSet<(Protocol, u16)>,
}

/// The node addresses NodePort virtual servers are created on.
pub fn nodeport_addresses(config: &IpvsConfig, node: &NodeInfo, local: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = node.addresses.iter().chain(local).copied().collect();
    out.retain(|ip| {
        !ip.is_loopback()
            && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
            && (config.nodeport_cidrs.is_empty()
                || config.nodeport_cidrs.iter().any(|c| c.contains(ip)))
    });
    out.into_iter().collect()
}

/// Plans the virtual servers for `state`. `node_addresses` are where NodePorts answer.
pub fn plan(config: &IpvsConfig, state: &ProxyState, node_addresses: &[IpAddr]) -> Plan {
    let mut out = Plan::default();
    for (name, port) in &state.services {
        let endpoints = state.endpoints_of(name);
        for family in port.families() {
            if !config.families.contains(&family) {
                continue;
            }
            let selection = select::select(port, endpoints, family, &state.node);
            let spec = |addr: IpAddr, port_number: u16| ServiceSpec {
                vs: VirtualServer {
                    addr,
                    protocol: port.protocol(),
                    port: port_number,
                },
                scheduler: config.scheduler().to_string(),
                persistence_timeout: port.session_affinity_timeout,
            };
            let reals = |eps: &[&proxy_core::model::Endpoint]| -> BTreeSet<RealServer> {
                eps.iter()
                    .map(|e| RealServer {
                        addr: e.ip,
                        port: e.port,
                    })
                    .collect()
            };
            let internal = reals(selection.internal(port));
            let external = reals(selection.external(port));
            let mut add = |spec: ServiceSpec, dests: &BTreeSet<RealServer>| {
                // Two Services claiming one destination: the first (sorted) keeps it.
                if let Some(existing) = out.services.get(&spec.vs) {
                    tracing::warn!(destination = ?existing.spec.vs, service = %name, "destination already used by another Service; ignored");
                    return;
                }
                out.services.insert(
                    spec.vs,
                    Desired {
                        spec,
                        dests: dests.clone(),
                    },
                );
            };
            if let Some(cluster_ip) = port.cluster_ip(family) {
                let s = spec(cluster_ip, port.port);
                out.cluster_ips.insert(s.vs);
                out.bound.insert(cluster_ip);
                add(s, &internal);
            }
            for ip in port.external_destinations(family) {
                out.bound.insert(ip);
                add(spec(ip, port.port), &external);
            }
            if let Some(node_port) = port.node_port {
                out.node_ports.insert((port.protocol(), node_port));
                for ip in node_addresses
                    .iter()
                    .filter(|ip| IpFamily::of(ip) == family)
                {
                    add(spec(*ip, node_port), &external);
                }
            }
        }
    }
    out
}

/// The operations that turn `current` into `desired`. Removed real servers are drained: weight 0 first, deleted
/// once the kernel reports no connections to them.
pub fn diff(
    desired: &BTreeMap<VirtualServer, Desired>,
    current: &BTreeMap<VirtualServer, Current>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for vs in current.keys() {
        if !desired.contains_key(vs) {
            ops.push(Op::DelService(*vs));
        }
    }
    for (vs, want) in desired {
        match current.get(vs) {
            None => {
                ops.push(Op::AddService(want.spec.clone()));
                ops.extend(want.dests.iter().map(|rs| Op::AddDest(*vs, *rs)));
            }
            Some(cur) => {
                if cur.spec != want.spec {
                    ops.push(Op::UpdateService(want.spec.clone()));
                }
                for rs in &want.dests {
                    match cur.dests.get(rs) {
                        None => ops.push(Op::AddDest(*vs, *rs)),
                        Some(state) if state.weight != WEIGHT => {
                            ops.push(Op::SetWeight(*vs, *rs, WEIGHT))
                        }
                        Some(_) => {}
                    }
                }
                for (rs, state) in &cur.dests {
                    if want.dests.contains(rs) {
                        continue;
                    }
                    if state.weight != 0 {
                        ops.push(Op::SetWeight(*vs, *rs, 0));
                    } else if state.active == 0 && state.inactive == 0 {
                        ops.push(Op::DelDest(*vs, *rs));
                    }
                }
            }
        }
    }
    ops
}

/// Applies `ops` to a model of the kernel, so the proxier's cache follows what it sent.
pub fn apply_to(current: &mut BTreeMap<VirtualServer, Current>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::AddService(spec) | Op::UpdateService(spec) => {
                let entry = current.entry(spec.vs).or_insert_with(|| Current {
                    spec: spec.clone(),
                    dests: BTreeMap::new(),
                });
                entry.spec = spec.clone();
            }
            Op::DelService(vs) => {
                current.remove(vs);
            }
            Op::AddDest(vs, rs) => {
                if let Some(c) = current.get_mut(vs) {
                    c.dests.insert(
                        *rs,
                        RealServerState {
                            rs: *rs,
                            weight: WEIGHT,
                            active: 0,
                            inactive: 0,
                        },
                    );
                }
            }
            Op::SetWeight(vs, rs, weight) => {
                if let Some(d) = current.get_mut(vs).and_then(|c| c.dests.get_mut(rs)) {
                    d.weight = *weight;
                }
            }
            Op::DelDest(vs, rs) => {
                if let Some(c) = current.get_mut(vs) {
                    c.dests.remove(rs);
                }
            }
        }
    }
}

/// Virtual servers holding a draining real server (weight 0, not desired), whose
/// connection counts must be read back before the next diff.
pub fn draining(
    desired: &BTreeMap<VirtualServer, Desired>,
    current: &BTreeMap<VirtualServer, Current>,
) -> Vec<VirtualServer> {
    current
        .iter()
        .filter(|(vs, cur)| {
            cur.dests.iter().any(|(rs, st)| {
                st.weight == 0 && desired.get(vs).is_none_or(|d| !d.dests.contains(rs))
            })
        })
        .map(|(vs, _)| *vs)
        .collect()
}

fn family_of_vs(vs: &VirtualServer) -> IpFamily {
    IpFamily::of(&vs.addr)
}

/// The changes replacing the `kube-proxy-ipvs` table of one family (one transaction):
/// sets of cluster-IP destinations and NodePorts, a prerouting/output mark for traffic
/// to masquerade, and postrouting masquerade of marked packets. IPVS forwards on the
/// input hook, after these nat chains ran, and its packets leave through postrouting.
pub fn nft_ops(config: &IpvsConfig, plan: &Plan, family: IpFamily) -> Vec<TableOp<'static>> {
    let mark = 1u32 << (config.masquerade_bit % 32);
    let addr = DataType::addr(family);
    let mut ops = Vec::new();
    // Add, then delete: the replacement works whether or not the table exists.
    ops.push(TableOp::AddTable {
        family,
        comment: None,
    });
    ops.push(TableOp::DeleteTable(family));
    ops.push(TableOp::AddTable {
        family,
        comment: None,
    });
    let set = |name: &str, key: Vec<DataType>| TableOp::AddSet {
        family,
        set: SetDecl {
            name: name.into(),
            key,
            data: None,
            dynamic: false,
        },
    };
    ops.push(set(
        "cluster-ips",
        vec![addr, DataType::InetProto, DataType::InetService],
    ));
    ops.push(TableOp::AddElements {
        family,
        set: "cluster-ips".into(),
        keys: plan
            .cluster_ips
            .iter()
            .filter(|vs| family_of_vs(vs) == family)
            .map(|vs| {
                Fields::new(&[
                    Field::Addr(vs.addr),
                    Field::Proto(vs.protocol),
                    Field::Port(vs.port),
                ])
            })
            .collect(),
    });
    ops.push(set(
        "node-ports",
        vec![DataType::InetProto, DataType::InetService],
    ));
    ops.push(TableOp::AddElements {
        family,
        set: "node-ports".into(),
        keys: plan
            .node_ports
            .iter()
            .map(|(p, port)| Fields::new(&[Field::Proto(*p), Field::Port(*port)]))
            .collect(),
    });
    let in_set = |key: Key, set: &str| Stmt::InSet {
        key,
        set: set.into(),
        negate: false,
    };
    let mut marks = Vec::new();
    if config.masquerade_all {
        marks.push(Rule::new([
            in_set(ip_key(), "cluster-ips"),
            Stmt::MarkOr(mark),
        ]));
    } else {
        for cidr in config
            .cluster_cidrs
            .iter()
            .filter(|c| IpFamily::of_net(c) == family)
        {
            marks.push(Rule::new([
                in_set(ip_key(), "cluster-ips"),
                Stmt::AddrIs {
                    sel: Sel::Saddr,
                    net: *cidr,
                    negate: true,
                },
                Stmt::MarkOr(mark),
            ]));
        }
    }
    // NodePort traffic is always masqueraded (externalTrafficPolicy Local is not
    // implemented in this mode), so replies come back through this node.
    marks.push(Rule::new([
        Stmt::FibLocal(Sel::Daddr),
        in_set(nodeport_key(), "node-ports"),
        Stmt::MarkOr(mark),
    ]));
    let masquerade = vec![Rule::new([
        Stmt::MarkHas(mark),
        Stmt::Masquerade {
            fully_random: false,
        },
    ])];
    for (chain, hook, priority, rules) in [
        ("prerouting", HookPoint::Prerouting, -100, marks.clone()),
        ("output", HookPoint::Output, -100, marks),
        ("postrouting", HookPoint::Postrouting, 100, masquerade),
    ] {
        ops.push(TableOp::AddChain {
            family,
            name: chain.into(),
            hook: Some(Hook {
                kind: "nat",
                hook,
                priority,
            }),
            comment: None,
        });
        ops.extend(add_rules(family, chain, rules));
    }
    ops
}

/// [`nft_ops`] as `nft` commands (tests; and what the proxier compares to skip a rewrite).
pub fn render_nft(config: &IpvsConfig, plan: &Plan, family: IpFamily) -> String {
    ops_text_in(TABLE, &nft_ops(config, plan, family))
}

/// Deletes the table of every family (errors from a missing table are avoided by
/// creating it first).
pub fn nft_cleanup_ops() -> Vec<TableOp<'static>> {
    drop_tables()
}

/// [`nft_cleanup_ops`] as `nft` commands.
pub fn render_nft_cleanup() -> String {
    ops_text_in(TABLE, &nft_cleanup_ops())
}
