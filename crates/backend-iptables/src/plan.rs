//! The planner: desired state in, upstream-shaped iptables chains and `iptables-restore`
//! input out. Pure: no kernel, no clock.
//!
//! Layout (per IP family, as upstream's iptables mode):
//! - nat `KUBE-SERVICES`: one rule per cluster IP / externalIP / load-balancer IP of a
//!   Service port with endpoints, jumping to its `KUBE-SVC-*` (or `KUBE-SVL-*` for
//!   `internalTrafficPolicy: Local`), `KUBE-EXT-*` or `KUBE-FW-*`; last, the jump to
//!   `KUBE-NODEPORTS` for local destinations;
//! - nat `KUBE-SVC-*` (all endpoints) / `KUBE-SVL-*` (this node's): the one the cluster
//!   IP jumps to first masquerade-marks cluster IP traffic from outside the pod network
//!   (`--detect-local-mode`),
//!   then each spreads over `KUBE-SEP-*` with `-m statistic --probability 1/(n-i)`;
//!   `KUBE-SEP-*` marks hairpin traffic and DNATs; `KUBE-EXT-*` marks external traffic
//!   (or, for `externalTrafficPolicy: Local`, short-circuits pod and node traffic to
//!   `KUBE-SVC-*` and sends the rest to `KUBE-SVL-*`; it exists, and the external IPs and
//!   NodePort jump to it, while the Service has endpoints anywhere);
//!   `KUBE-FW-*` admits `loadBalancerSourceRanges`;
//! - filter `KUBE-SERVICES` / `KUBE-EXTERNAL-SERVICES`: REJECT for Service ports without
//!   endpoints (DROP when only local endpoints are missing); `KUBE-PROXY-FIREWALL` drops
//!   load-balancer traffic not admitted by `KUBE-FW-*`; `KUBE-NODEPORTS` accepts health
//!   check node ports; `KUBE-FORWARD` accepts marked and established traffic.
//!
//! API names reach the rules only inside comments, through [`sanitize`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, NodeInfo, ProxyState, ServicePort, ServicePortName,
    TrafficPolicy,
};
use proxy_core::select::candidates;

use crate::names::{
    endpoint_chain, endpoint_string, sanitize, service_port_string, PortChains,
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_CANARY, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};

/// Settings that shape the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptConfig {
    /// The fwmark bit (0..=31) that tells KUBE-POSTROUTING to masquerade.
    pub masquerade_bit: u8,
    /// Masquerade all traffic to cluster IPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// How pod traffic is told apart (`--detect-local-mode`): it is not masqueraded to a
    /// cluster IP and is short-circuited under `externalTrafficPolicy: Local`. A CIDR
    /// detector uses the first CIDR of each family.
    pub local: LocalDetector,
    /// `--nodeport-addresses` CIDRs; empty with `nodeport_primary` unset: all local addresses.
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses=primary`: the node's primary IP of each family.
    pub nodeport_primary: bool,
    /// `--iptables-localhost-nodeports`: NodePorts answer on 127.0.0.1 too (IPv4 only).
    pub localhost_node_ports: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: no INVALID-drop rule needed.
    pub conntrack_tcp_be_liberal: bool,
    /// Which families to program.
    pub families: Vec<IpFamily>,
}

impl Default for IptConfig {
    fn default() -> Self {
        IptConfig {
            masquerade_bit: 14,
            masquerade_all: false,
            local: LocalDetector::None,
            nodeport_cidrs: Vec::new(),
            nodeport_primary: false,
            localhost_node_ports: true,
            conntrack_tcp_be_liberal: false,
            families: vec![IpFamily::V4, IpFamily::V6],
        }
    }
}

impl IptConfig {
    fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }

    /// The matches for pod traffic and for everything else, as upstream writes them;
    /// `None` when nothing is known to be local in this family.
    fn local_match(&self, family: IpFamily, node: &NodeInfo) -> Option<LocalMatch> {
        let cidr = |nets: &[IpNet]| {
            nets.iter()
                .find(|c| IpFamily::of_net(c) == family)
                .map(|c| LocalMatch {
                    is_local: format!("-s {}", c.trunc()),
                    not_local: format!("! -s {}", c.trunc()),
                })
        };
        // Interface names were validated at start-up: no spaces or quotes.
        let interface = |name: String| LocalMatch {
            is_local: format!("-i {name}"),
            not_local: format!("! -i {name}"),
        };
        match &self.local {
            LocalDetector::None => None,
            LocalDetector::ClusterCidr(nets) => cidr(nets),
            LocalDetector::NodeCidr => cidr(&node.pod_cidrs),
            LocalDetector::BridgeInterface(name) => Some(interface(name.clone())),
            LocalDetector::InterfaceNamePrefix(prefix) => Some(interface(format!("{prefix}+"))),
        }
    }

    /// CVE-2020-8558: with `route_localnet` on, block martian traffic to 127.0.0.0/8.
    fn localhost_nodeports_active(&self, family: IpFamily) -> bool {
        family == IpFamily::V4 && self.localhost_node_ports
    }
}

/// Pod traffic, and everything else, as iptables matches.
struct LocalMatch {
    is_local: String,
    not_local: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
    Mangle,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Filter, Table::Nat, Table::Mangle];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Chains shared by all Service ports: each port contributes rules, and the chain is
/// rewritten whole when its content changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TopChain {
    NatServices,
    NatNodeports,
    FilterServices,
    FilterExternalServices,
    FilterNodeports,
    FilterFirewall,
}

impl TopChain {
    pub const ALL: [TopChain; 6] = [
        TopChain::NatServices,
        TopChain::NatNodeports,
        TopChain::FilterServices,
        TopChain::FilterExternalServices,
        TopChain::FilterNodeports,
        TopChain::FilterFirewall,
    ];

    pub fn table(self) -> Table {
        match self {
            TopChain::NatServices | TopChain::NatNodeports => Table::Nat,
            _ => Table::Filter,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TopChain::NatServices | TopChain::FilterServices => KUBE_SERVICES,
            TopChain::NatNodeports | TopChain::FilterNodeports => KUBE_NODEPORTS,
            TopChain::FilterExternalServices => KUBE_EXTERNAL_SERVICES,
            TopChain::FilterFirewall => KUBE_PROXY_FIREWALL,
        }
    }
}

/// A chain with its complete rules (each a full `-A CHAIN ...` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: Table,
    pub name: String,
    pub rules: Vec<String>,
}

/// What one Service port contributes in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPlan {
    /// Rules in the shared chains.
    pub top: Vec<(TopChain, String)>,
    /// The port's own nat chains (`KUBE-SVC/SVL/EXT/FW/SEP-*`), by name.
    pub chains: BTreeMap<String, Chain>,
}

/// One family's rules, per Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub ports: BTreeMap<ServicePortName, PortPlan>,
    /// Where NodePorts answer: `None` for every local address.
    pub nodeport_addresses: Option<Vec<IpNet>>,
}

impl FamilyPlan {
    /// Plans every Service port from scratch.
    pub fn full(family: IpFamily, state: &ProxyState, config: &IptConfig) -> Self {
        let mut plan = FamilyPlan {
            family,
            ports: BTreeMap::new(),
            nodeport_addresses: proxy_core::model::nodeport_addresses(
                &config.nodeport_cidrs,
                config.nodeport_primary,
                family,
                &state.node,
            ),
        };
        // A port without a cluster IP of the family has nothing here: not kept (an
        // IPv4-only cluster would otherwise hold an empty entry per port in IPv6).
        for (name, port) in state
            .services
            .iter()
            .filter(|(_, p)| p.cluster_ip(family).is_some())
        {
            plan.ports.insert(
                name.clone(),
                plan_port(family, port, state.endpoints_of(name), &state.node, config),
            );
        }
        plan
    }

    /// Replans one Service port; returns the old plan (if any).
    pub fn replan(
        &mut self,
        name: &ServicePortName,
        state: &ProxyState,
        config: &IptConfig,
    ) -> (Option<PortPlan>, Option<&PortPlan>) {
        let old = self.ports.remove(name);
        let port = state.services.get(name);
        if let Some(port) = port.filter(|p| p.cluster_ip(self.family).is_some()) {
            let planned = plan_port(
                self.family,
                port,
                state.endpoints_of(name),
                &state.node,
                config,
            );
            self.ports.insert(name.clone(), planned);
        }
        (old, self.ports.get(name))
    }

    /// The complete rules of one shared chain.
    pub fn top_rules(&self, chain: TopChain, config: &IptConfig) -> Vec<String> {
        let mut rules: Vec<String> = self
            .ports
            .values()
            .flat_map(|p| p.top.iter())
            .filter(|(c, _)| *c == chain)
            .map(|(_, r)| r.clone())
            .collect();
        if chain == TopChain::NatServices {
            rules.extend(self.nodeports_jumps(config));
        }
        rules
    }

    /// The jump(s) to KUBE-NODEPORTS, last in nat KUBE-SERVICES.
    fn nodeports_jumps(&self, config: &IptConfig) -> Vec<String> {
        const COMMENT: &str =
            "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
        match &self.nodeport_addresses {
            None => {
                let exclude = match self.family {
                    IpFamily::V4 if !config.localhost_node_ports => " ! -d 127.0.0.0/8",
                    IpFamily::V4 => "",
                    IpFamily::V6 => " ! -d ::1/128",
                };
                vec![format!(
                    "-A {KUBE_SERVICES} {COMMENT} -m addrtype --dst-type LOCAL{exclude} -j {KUBE_NODEPORTS}"
                )]
            }
            Some(nets) => nets
                .iter()
                .map(|net| {
                    format!(
                        "-A {KUBE_SERVICES} {COMMENT} -d {net} -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}"
                    )
                })
                .collect(),
        }
    }

    /// Every chain this family programs, with its rules: fixed, shared and per-port.
    pub fn all_chains(&self, config: &IptConfig) -> Vec<Chain> {
        let mut chains = static_chains(self.family, config);
        for top in TopChain::ALL {
            chains.push(Chain {
                table: top.table(),
                name: top.name().to_string(),
                rules: self.top_rules(top, config),
            });
        }
        for port in self.ports.values() {
            chains.extend(port.chains.values().cloned());
        }
        chains
    }
}

fn host(ip: IpAddr) -> String {
    ip.to_string()
}

/// Plans one Service port in one family.
pub fn plan_port(
    family: IpFamily,
    sp: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeInfo,
    config: &IptConfig,
) -> PortPlan {
    let mut out = PortPlan::default();
    let Some(cluster_ip) = sp.cluster_ip(family) else {
        return out;
    };
    let spn = sanitize(&service_port_string(&sp.name));
    let p = sp.protocol().as_str();
    let port = sp.port;
    let names = PortChains::new(&sp.name);

    let (cluster_eps, local_eps) = candidates(endpoints, family, node);

    let external_ips: Vec<IpAddr> = sp
        .external_ips
        .iter()
        .copied()
        .filter(|ip| IpFamily::of(ip) == family)
        .collect();
    let lb_ips: Vec<IpAddr> = sp
        .load_balancer_ips
        .iter()
        .copied()
        .filter(|ip| IpFamily::of(ip) == family)
        .collect();
    let externally_accessible =
        sp.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
    let internal_local = sp.internal_traffic_policy == TrafficPolicy::Local;
    let external_local =
        externally_accessible && sp.external_traffic_policy == TrafficPolicy::Local;
    // External-Local still sends pod and node traffic to all endpoints (short-circuit).
    let uses_cluster = !internal_local || externally_accessible;
    let uses_local = internal_local || external_local;

    let internal_eps = if internal_local {
        &local_eps
    } else {
        &cluster_eps
    };
    let external_eps = if external_local {
        &local_eps
    } else {
        &cluster_eps
    };
    let has_endpoints = !cluster_eps.is_empty() || !local_eps.is_empty();
    let has_internal = !internal_eps.is_empty();
    let has_external = !external_eps.is_empty();
    let internal_chain = if internal_local {
        &names.svl
    } else {
        &names.svc
    };
    let external_policy_chain = if external_local {
        &names.svl
    } else {
        &names.svc
    };
    let (reject_comment, reject_target) = if has_endpoints {
        ("has no local endpoints", "DROP")
    } else {
        ("has no endpoints", "REJECT")
    };
    // Destinations that must at least short-circuit pod and node traffic: every one of a
    // Service with endpoints anywhere, even when none serves outside clients here.
    let use_fw = has_endpoints && !sp.load_balancer_source_ranges.is_empty() && !lb_ips.is_empty();

    // Cluster IP.
    if has_internal {
        out.top.push((
            TopChain::NatServices,
            format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {} --dport {port} -j {internal_chain}",
                host(cluster_ip)
            ),
        ));
    } else {
        out.top.push((
            TopChain::FilterServices,
            format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{spn} {reject_comment}\" -m {p} -p {p} -d {} --dport {port} -j {reject_target}",
                host(cluster_ip)
            ),
        ));
    }
    // externalIPs and load-balancer IPs.
    let external_targets = external_ips
        .iter()
        .map(|ip| (*ip, "external IP", &names.ext))
        .chain(lb_ips.iter().map(|ip| {
            (
                *ip,
                "loadbalancer IP",
                if use_fw { &names.fw } else { &names.ext },
            )
        }));
    for (ip, what, target) in external_targets {
        if has_endpoints {
            out.top.push((
                TopChain::NatServices,
                format!(
                    "-A {KUBE_SERVICES} -m comment --comment \"{spn} {what}\" -m {p} -p {p} -d {} --dport {port} -j {target}",
                    host(ip)
                ),
            ));
        }
        // What KUBE-EXT-* did not short-circuit (DNAT) is still addressed to the IP here.
        if !has_external {
            out.top.push((
                TopChain::FilterExternalServices,
                format!(
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment \"{spn} {reject_comment}\" -m {p} -p {p} -d {} --dport {port} -j {reject_target}",
                    host(ip)
                ),
            ));
        }
    }
    if use_fw {
        for ip in &lb_ips {
            out.top.push((
                TopChain::FilterFirewall,
                format!(
                    "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{spn} traffic not accepted by {}\" -m {p} -p {p} -d {} --dport {port} -j DROP",
                    names.fw,
                    host(*ip)
                ),
            ));
        }
    }
    // NodePort.
    if let Some(node_port) = sp.node_port {
        if has_endpoints {
            out.top.push((
                TopChain::NatNodeports,
                format!(
                    "-A {KUBE_NODEPORTS} -m comment --comment \"{spn}\" -m {p} -p {p} --dport {node_port} -j {}",
                    names.ext
                ),
            ));
        }
        if !has_external {
            out.top.push((
                TopChain::FilterExternalServices,
                format!(
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment \"{spn} {reject_comment}\" -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j {reject_target}"
                ),
            ));
        }
    }
    if let (true, Some(hc)) = (external_local, sp.health_check_node_port) {
        out.top.push((
            TopChain::FilterNodeports,
            format!(
                "-A {KUBE_NODEPORTS} -m comment --comment \"{spn} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
            ),
        ));
    }

    let local = config.local_match(family, node);
    let mut add_chain = |name: &str, rules: Vec<String>| {
        out.chains.insert(
            name.to_string(),
            Chain {
                table: Table::Nat,
                name: name.to_string(),
                rules,
            },
        );
    };
    let mut sep_endpoints: BTreeSet<(IpAddr, u16)> = BTreeSet::new();

    // Cluster IP traffic from outside the pod network (or all of it with
    // --masquerade-all) is masqueraded whichever policy picks its endpoints, so the rule
    // leads the chain the cluster IP jumps to: KUBE-SVL-* under internalTrafficPolicy
    // Local. Its -d match keeps it off short-circuited external traffic.
    let masq_match = if config.masquerade_all {
        Some(String::new())
    } else {
        local.as_ref().map(|l| format!(" {}", l.not_local))
    };
    let cluster_ip_masq = |chain: &str| -> Vec<String> {
        match &masq_match {
            Some(m) if has_internal && chain == internal_chain.as_str() => vec![format!(
                "-A {chain}{m} -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {} --dport {port} -j {KUBE_MARK_MASQ}",
                host(cluster_ip)
            )],
            _ => Vec::new(),
        }
    };

    // KUBE-SVC-*: all usable endpoints.
    if uses_cluster && !cluster_eps.is_empty() {
        let mut rules = cluster_ip_masq(&names.svc);
        spread_rules(&mut rules, &names.svc, &spn, sp, &cluster_eps);
        sep_endpoints.extend(cluster_eps.iter().map(|e| (e.ip, e.port)));
        add_chain(&names.svc, rules);
    }
    // KUBE-SVL-*: this node's usable endpoints.
    if uses_local && !local_eps.is_empty() {
        let mut rules = cluster_ip_masq(&names.svl);
        spread_rules(&mut rules, &names.svl, &spn, sp, &local_eps);
        sep_endpoints.extend(local_eps.iter().map(|e| (e.ip, e.port)));
        add_chain(&names.svl, rules);
    }
    // KUBE-EXT-*: external destinations.
    if externally_accessible && has_endpoints {
        let ext = &names.ext;
        let mut rules = Vec::new();
        if !external_local {
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j {KUBE_MARK_MASQ}"
            ));
        } else {
            if let Some(l) = &local {
                rules.push(format!(
                    "-A {ext} {} -m comment --comment \"pod traffic for {spn} external destinations\" -j {}",
                    l.is_local, names.svc
                ));
            }
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            ));
            rules.push(format!(
                "-A {ext} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {}",
                names.svc
            ));
        }
        if has_external {
            rules.push(format!("-A {ext} -j {external_policy_chain}"));
        }
        add_chain(ext, rules);
    }
    // KUBE-FW-*: admitted source ranges go on to KUBE-EXT-*; the rest stay undNATed
    // and are dropped by filter KUBE-PROXY-FIREWALL. When a range holds the node's IP,
    // the load-balancer IPs are admitted as sources too (a VIP bound on the node loops
    // the node's requests back from the VIP), as upstream.
    if use_fw {
        let mut sources: Vec<String> = sp
            .load_balancer_source_ranges
            .iter()
            .filter(|r| IpFamily::of_net(r) == family)
            .map(|range| range.trunc().to_string())
            .collect();
        if sp.admits_load_balancer_ips_as_sources(node.primary_ip(family)) {
            sources.extend(lb_ips.iter().map(|ip| host(*ip)));
        }
        let rules = sources
            .iter()
            .map(|source| {
                format!(
                    "-A {} -m comment --comment \"{spn} loadbalancer IP\" -s {source} -j {}",
                    names.fw, names.ext
                )
            })
            .collect();
        add_chain(&names.fw, rules);
    }
    // KUBE-SEP-*: hairpin mark and DNAT.
    for (ip, ep_port) in sep_endpoints {
        let sep = endpoint_chain(&sp.name, ip, ep_port);
        let recent = if sp.session_affinity_timeout.is_some() {
            format!(" -m recent --name {sep} --set")
        } else {
            String::new()
        };
        let rules = vec![
            format!(
                "-A {sep} -m comment --comment \"{spn}\" -s {} -j {KUBE_MARK_MASQ}",
                host(ip)
            ),
            format!(
                "-A {sep} -m comment --comment \"{spn}\" -m {p} -p {p}{recent} -j DNAT --to-destination {}",
                endpoint_string(ip, ep_port)
            ),
        ];
        add_chain(&sep, rules);
    }
    out
}

/// Affinity checks, then random spreading: endpoint i of n is taken with probability
/// 1/(n-i), so each gets 1/n overall; the last rule is unconditional.
fn spread_rules(
    rules: &mut Vec<String>,
    chain: &str,
    spn: &str,
    sp: &ServicePort,
    eps: &[&Endpoint],
) {
    let seps: Vec<(String, String)> = eps
        .iter()
        .map(|e| {
            (
                endpoint_chain(&sp.name, e.ip, e.port),
                endpoint_string(e.ip, e.port),
            )
        })
        .collect();
    if let Some(timeout) = sp.session_affinity_timeout {
        for (sep, ep) in &seps {
            rules.push(format!(
                "-A {chain} -m comment --comment \"{spn} -> {ep}\" -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
            ));
        }
    }
    let n = seps.len();
    for (i, (sep, ep)) in seps.iter().enumerate() {
        if i + 1 < n {
            let probability = 1.0 / (n - i) as f64;
            rules.push(format!(
                "-A {chain} -m comment --comment \"{spn} -> {ep}\" -m statistic --mode random --probability {probability:.10} -j {sep}"
            ));
        } else {
            rules.push(format!(
                "-A {chain} -m comment --comment \"{spn} -> {ep}\" -j {sep}"
            ));
        }
    }
}

/// The chains whose content does not depend on Services.
pub fn static_chains(family: IpFamily, config: &IptConfig) -> Vec<Chain> {
    let mark = config.mark();
    let chain = |table: Table, name: &str, rules: Vec<String>| Chain {
        table,
        name: name.to_string(),
        rules,
    };
    let mut forward = Vec::new();
    if !config.conntrack_tcp_be_liberal {
        // Out-of-window packets would otherwise reach pods un-NATed and get RST.
        forward.push(format!(
            "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP"
        ));
    }
    forward.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    forward.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    let mut chains = vec![
        chain(Table::Mangle, KUBE_PROXY_CANARY, vec![]),
        chain(Table::Nat, KUBE_PROXY_CANARY, vec![]),
        chain(Table::Filter, KUBE_PROXY_CANARY, vec![]),
        chain(
            Table::Nat,
            KUBE_MARK_MASQ,
            vec![format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")],
        ),
        chain(
            Table::Nat,
            KUBE_POSTROUTING,
            vec![
                format!("-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"),
                format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"),
                format!(
                    "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
                ),
            ],
        ),
        chain(Table::Filter, KUBE_FORWARD, forward),
    ];
    if config.localhost_nodeports_active(family) {
        chains.push(chain(
            Table::Filter,
            KUBE_FIREWALL,
            vec![format!(
                "-A {KUBE_FIREWALL} ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )],
        ));
    }
    chains
}

/// A rule in a built-in chain that hands packets to one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: Table,
    pub builtin: &'static str,
    pub target: &'static str,
    /// Matches before `-j target`.
    pub matches: &'static str,
}

impl Jump {
    /// Inserted first in the built-in chain, as upstream does.
    pub fn insert_rule(&self) -> String {
        let sep = if self.matches.is_empty() { "" } else { " " };
        format!(
            "-I {} 1{sep}{} -j {}",
            self.builtin, self.matches, self.target
        )
    }
}

/// The jumps from built-in chains, per family.
pub fn jumps(family: IpFamily, config: &IptConfig) -> Vec<Jump> {
    const NEW_LB: &str =
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"";
    const NEW_EXT: &str = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"";
    const NEW_SVC: &str =
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"";
    const SVC: &str = "-m comment --comment \"kubernetes service portals\"";
    let j = |table, builtin, target, matches| Jump {
        table,
        builtin,
        target,
        matches,
    };
    let mut out = vec![
        j(Table::Filter, "INPUT", KUBE_PROXY_FIREWALL, NEW_LB),
        j(Table::Filter, "OUTPUT", KUBE_PROXY_FIREWALL, NEW_LB),
        j(Table::Filter, "FORWARD", KUBE_PROXY_FIREWALL, NEW_LB),
        j(
            Table::Filter,
            "INPUT",
            KUBE_NODEPORTS,
            "-m comment --comment \"kubernetes health check service ports\"",
        ),
        j(Table::Filter, "INPUT", KUBE_EXTERNAL_SERVICES, NEW_EXT),
        j(Table::Filter, "FORWARD", KUBE_EXTERNAL_SERVICES, NEW_EXT),
        j(Table::Filter, "FORWARD", KUBE_SERVICES, NEW_SVC),
        j(Table::Filter, "OUTPUT", KUBE_SERVICES, NEW_SVC),
        j(
            Table::Filter,
            "FORWARD",
            KUBE_FORWARD,
            "-m comment --comment \"kubernetes forwarding rules\"",
        ),
        j(Table::Nat, "OUTPUT", KUBE_SERVICES, SVC),
        j(Table::Nat, "PREROUTING", KUBE_SERVICES, SVC),
        j(
            Table::Nat,
            "POSTROUTING",
            KUBE_POSTROUTING,
            "-m comment --comment \"kubernetes postrouting rules\"",
        ),
    ];
    if config.localhost_nodeports_active(family) {
        out.push(j(Table::Filter, "INPUT", KUBE_FIREWALL, ""));
        out.push(j(Table::Filter, "OUTPUT", KUBE_FIREWALL, ""));
    }
    out
}

/// What an `iptables-save` dump says about one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeSet<String>,
    /// `-A ...` lines, as printed.
    pub rules: Vec<String>,
}

impl SavedTable {
    /// Whether a rule of `builtin` jumps to `target`.
    pub fn has_jump(&self, builtin: &str, target: &str) -> bool {
        let prefix = format!("-A {builtin} ");
        let suffix = format!(" -j {target}");
        self.rules
            .iter()
            .any(|r| r.starts_with(&prefix) && r.trim_end().ends_with(&suffix))
    }
}

/// Parses `iptables-save` output into tables.
pub fn parse_save(text: &str) -> BTreeMap<Table, SavedTable> {
    let mut out: BTreeMap<Table, SavedTable> = BTreeMap::new();
    let mut current: Option<Table> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Table::from_name(name.trim());
            if let Some(t) = current {
                out.entry(t).or_default();
            }
            continue;
        }
        let Some(table) = current else { continue };
        let entry = out.entry(table).or_default();
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                entry.chains.insert(name.to_string());
            }
        } else if line.starts_with("-A ") {
            entry.rules.push(line.to_string());
        } else if line == "COMMIT" {
            current = None;
        }
    }
    out
}

/// One table's part of an `iptables-restore --noflush` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableInput {
    /// Declared chains: created if missing, flushed if present.
    pub declare: Vec<String>,
    pub rules: Vec<String>,
    /// Chains deleted last (after being declared, so they are empty).
    pub delete: Vec<String>,
}

impl TableInput {
    pub fn is_empty(&self) -> bool {
        self.declare.is_empty() && self.rules.is_empty() && self.delete.is_empty()
    }

    pub fn add_chain(&mut self, chain: &Chain) {
        self.declare.push(chain.name.clone());
        self.rules.extend(chain.rules.iter().cloned());
    }
}

/// Renders tables in a fixed order; empty tables are left out entirely.
pub fn render_restore(tables: &BTreeMap<Table, TableInput>) -> String {
    let mut out = String::new();
    for (table, input) in tables {
        if input.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table.name());
        for chain in input.declare.iter().chain(input.delete.iter()) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &input.rules {
            out.push_str(rule);
            out.push('\n');
        }
        for chain in &input.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The input of a full sync: every chain of ours declared and written, missing jumps from
/// built-in chains inserted, and stale per-Service chains (ours or upstream's, found in
/// `existing`) deleted.
pub fn full_input(
    plan: &FamilyPlan,
    config: &IptConfig,
    existing: &BTreeMap<Table, SavedTable>,
) -> (String, BTreeMap<Table, usize>) {
    let mut tables: BTreeMap<Table, TableInput> = BTreeMap::new();
    let mut wanted: BTreeMap<Table, BTreeSet<String>> = BTreeMap::new();
    for chain in plan.all_chains(config) {
        wanted
            .entry(chain.table)
            .or_default()
            .insert(chain.name.clone());
        tables.entry(chain.table).or_default().add_chain(&chain);
    }
    let empty = SavedTable::default();
    for jump in jumps(plan.family, config) {
        let saved = existing.get(&jump.table).unwrap_or(&empty);
        if !saved.has_jump(jump.builtin, jump.target) {
            tables
                .entry(jump.table)
                .or_default()
                .rules
                .push(jump.insert_rule());
        }
    }
    for (table, saved) in existing {
        let keep = wanted.get(table);
        for name in &saved.chains {
            let stale = crate::names::SERVICE_CHAIN_PREFIXES
                .iter()
                .any(|p| name.starts_with(p))
                && !keep.is_some_and(|k| k.contains(name));
            if stale {
                tables.entry(*table).or_default().delete.push(name.clone());
            }
        }
    }
    let counts = tables.iter().map(|(t, i)| (*t, i.rules.len())).collect();
    (render_restore(&tables), counts)
}

/// Rules per table that a plan programs (for `iptables_total`).
pub fn rule_counts(plan: &FamilyPlan, config: &IptConfig) -> BTreeMap<Table, usize> {
    let mut counts: BTreeMap<Table, usize> = BTreeMap::new();
    for chain in static_chains(plan.family, config) {
        *counts.entry(chain.table).or_default() += chain.rules.len();
    }
    for jump in jumps(plan.family, config) {
        *counts.entry(jump.table).or_default() += 1;
    }
    for port in plan.ports.values() {
        for (top, _) in &port.top {
            *counts.entry(top.table()).or_default() += 1;
        }
        for chain in port.chains.values() {
            *counts.entry(chain.table).or_default() += chain.rules.len();
        }
    }
    *counts.entry(Table::Nat).or_default() += plan.nodeports_jumps(config).len();
    counts
}

/// Removes every kube-proxy chain found in a dump, and the jumps to them from built-in
/// chains. Empty when there is nothing to remove.
pub fn cleanup_input(existing: &BTreeMap<Table, SavedTable>) -> String {
    let mut tables: BTreeMap<Table, TableInput> = BTreeMap::new();
    for (table, saved) in existing {
        let input = tables.entry(*table).or_default();
        for rule in &saved.rules {
            let mut words = rule.split_whitespace();
            let (Some(_), Some(chain)) = (words.next(), words.next()) else {
                continue;
            };
            let target = rule
                .rsplit_once(" -j ")
                .and_then(|(_, t)| t.split_whitespace().next());
            // Any other chain's jump into ours would keep ours from being deleted.
            if !crate::names::is_proxy_chain(chain)
                && target.is_some_and(crate::names::is_proxy_chain)
            {
                input.rules.push(format!("-D{}", &rule[2..]));
            }
        }
        input.delete.extend(
            saved
                .chains
                .iter()
                .filter(|c| crate::names::is_proxy_chain(c))
                .cloned(),
        );
    }
    render_restore(&tables)
}
