//! The planner: desired state in, nftables map elements out. Pure: no kernel, no clock.
//!
//! Shape of the ruleset (one table per IP family, `ip kube-proxy` and `ip6 kube-proxy`):
//! - `service-ips`: verdict map `daddr . l4proto . dport → goto {cluster,external}-class-N`
//!   for every cluster IP, externalIP and load-balancer IP of a Service port with N
//!   usable endpoints;
//! - `service-nodeports`: verdict map `l4proto . dport → goto nodeport-class-N`;
//! - `endpoints-N` / `nodeport-endpoints-N`: data maps from the same keys plus a slot
//!   `0..N` to `endpoint IP . port`; the class chain DNATs through them with
//!   `numgen random mod N`, so a packet costs two hash lookups whatever the number of
//!   Services, and an endpoint change touches only that Service's elements;
//! - `no-endpoint-services` / `no-endpoint-nodeports`: sets of destinations whose
//!   Service has no usable endpoint; new connections to them are rejected;
//! - `hairpin`: `endpoint . endpoint` pairs, to masquerade a pod reaching itself.
//!
//! Only IP addresses and port numbers from the API reach the rules, formatted by us from
//! parsed values: no name or string from an object can alter the rules' syntax.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use proxy_core::convert::usable_endpoints;
use proxy_core::model::{IpFamily, Protocol, ProxyState, ServicePort, ServicePortName};

/// Settings that shape the static part of the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// The fwmark bit (0..=31) that tells postrouting to masquerade.
    pub masquerade_bit: u8,
    /// Masquerade all traffic to cluster IPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// Pod CIDRs; traffic to a cluster IP from outside them is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`: NodePorts answer only on local addresses in these CIDRs.
    /// Empty (and `nodeport_primary` unset): on every local address.
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses=primary` (upstream's nftables default): NodePorts answer on
    /// the node's primary IP of each family, from its Node object; on every local
    /// address while the node's IPs are unknown.
    pub nodeport_primary: bool,
    /// Which families to program.
    pub families: Vec<IpFamily>,
}

impl Default for NftConfig {
    fn default() -> Self {
        NftConfig {
            masquerade_bit: 14,
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
            nodeport_cidrs: Vec::new(),
            nodeport_primary: false,
            families: vec![IpFamily::V4, IpFamily::V6],
        }
    }
}

/// The maps and sets that hold per-Service elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapId {
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    Endpoints(usize),
    NodeportEndpoints(usize),
    Hairpin,
}

impl MapId {
    pub fn name(self) -> String {
        match self {
            MapId::ServiceIps => "service-ips".into(),
            MapId::ServiceNodeports => "service-nodeports".into(),
            MapId::NoEndpointServices => "no-endpoint-services".into(),
            MapId::NoEndpointNodeports => "no-endpoint-nodeports".into(),
            MapId::Endpoints(n) => format!("endpoints-{n}"),
            MapId::NodeportEndpoints(n) => format!("nodeport-endpoints-{n}"),
            MapId::Hairpin => "hairpin".into(),
        }
    }
}

/// One element of a map (with a value) or a set (without).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub map: MapId,
    pub key: String,
    pub value: Option<String>,
}

/// A destination one Service port owns; two Services cannot share one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    Ip(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// What one Service port contributes to one family's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPlan {
    pub elements: Vec<Element>,
    pub destinations: Vec<Destination>,
    /// Endpoint IPs, for the shared hairpin set.
    pub endpoint_ips: BTreeSet<IpAddr>,
}

/// One family's table, as elements per Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub ports: BTreeMap<ServicePortName, PortPlan>,
    /// Who owns each destination.
    pub owners: HashMap<Destination, ServicePortName>,
    /// How many Service ports use each endpoint IP (hairpin elements are shared).
    pub hairpin_refs: BTreeMap<IpAddr, usize>,
    /// Endpoint-count classes whose chains and maps exist.
    pub classes: BTreeSet<usize>,
    /// Local addresses NodePorts answer on: `None` for all, `Some(empty)` for none.
    pub nodeport_addresses: Option<Vec<IpNet>>,
}

impl FamilyPlan {
    pub fn new(family: IpFamily) -> Self {
        FamilyPlan {
            family,
            ports: BTreeMap::new(),
            owners: HashMap::new(),
            hairpin_refs: BTreeMap::new(),
            classes: BTreeSet::new(),
            nodeport_addresses: None,
        }
    }

    /// Plans every Service port from scratch. Conflicting destinations go to the port
    /// that sorts first; the others are reported.
    pub fn full(
        family: IpFamily,
        state: &ProxyState,
        config: &NftConfig,
        warnings: &mut Vec<String>,
    ) -> Self {
        let mut plan = FamilyPlan::new(family);
        plan.nodeport_addresses = nodeport_addresses(family, state, config);
        for (name, port) in &state.services {
            let eps = state.endpoints_of(name);
            let planned = plan_port(
                family,
                port,
                eps,
                |d| plan.owners.get(d).is_none_or(|o| o == name),
                warnings,
            );
            plan.insert(name.clone(), planned);
        }
        plan
    }

    fn insert(&mut self, name: ServicePortName, planned: PortPlan) {
        for d in &planned.destinations {
            self.owners.insert(d.clone(), name.clone());
        }
        for ip in &planned.endpoint_ips {
            *self.hairpin_refs.entry(*ip).or_default() += 1;
        }
        for e in &planned.elements {
            if let MapId::Endpoints(n) | MapId::NodeportEndpoints(n) = e.map {
                self.classes.insert(n);
            }
        }
        self.ports.insert(name, planned);
    }

    fn remove(&mut self, name: &ServicePortName) {
        let Some(old) = self.ports.remove(name) else {
            return;
        };
        for d in &old.destinations {
            if self.owners.get(d) == Some(name) {
                self.owners.remove(d);
            }
        }
        for ip in &old.endpoint_ips {
            if let Some(refs) = self.hairpin_refs.get_mut(ip) {
                *refs -= 1;
                if *refs == 0 {
                    self.hairpin_refs.remove(ip);
                }
            }
        }
    }

    /// Every element of the table, sorted per map.
    pub fn elements(&self) -> BTreeMap<MapId, Vec<(&str, Option<&str>)>> {
        let mut out: BTreeMap<MapId, Vec<(&str, Option<&str>)>> = BTreeMap::new();
        for port in self.ports.values() {
            for e in &port.elements {
                out.entry(e.map)
                    .or_default()
                    .push((&e.key, e.value.as_deref()));
            }
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        out
    }

    pub fn hairpin_key(ip: &IpAddr) -> String {
        format!("{ip} . {ip}")
    }
}

/// Resolves `--nodeport-addresses` for one family against what is known of the node.
fn nodeport_addresses(
    family: IpFamily,
    state: &ProxyState,
    config: &NftConfig,
) -> Option<Vec<IpNet>> {
    let mut nets: Vec<IpNet> = config
        .nodeport_cidrs
        .iter()
        .filter(|c| IpFamily::of_net(c) == family)
        .map(IpNet::trunc)
        .collect();
    if config.nodeport_primary {
        match state
            .node
            .addresses
            .iter()
            .find(|ip| IpFamily::of(ip) == family)
        {
            Some(ip) => nets.push(IpNet::from(*ip)),
            // Node IPs unknown (no Node object): do not lose NodePorts over it.
            None if state.node.addresses.is_empty() => return None,
            None => {}
        }
    } else if config.nodeport_cidrs.is_empty() {
        return None;
    }
    Some(nets)
}

/// What changes between two plans of one family, as nftables would apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub new_classes: BTreeSet<usize>,
    pub deleted: BTreeSet<Element>,
    pub added: BTreeSet<Element>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.new_classes.is_empty() && self.deleted.is_empty() && self.added.is_empty()
    }
}

/// Replans the given Service ports (old and new names of the changed Services) on top of
/// `plan`, returning the delta. `plan` becomes the new plan; callers that need to roll
/// back keep a copy of what they hand in or rebuild with [`FamilyPlan::full`].
pub fn replan(
    plan: &mut FamilyPlan,
    state: &ProxyState,
    names: &BTreeSet<ServicePortName>,
    warnings: &mut Vec<String>,
) -> Delta {
    let mut delta = Delta::default();
    let hairpin_before: BTreeSet<IpAddr> = names
        .iter()
        .filter_map(|n| plan.ports.get(n))
        .flat_map(|p| p.endpoint_ips.iter().copied())
        .collect();
    let mut old_elements: BTreeSet<Element> = BTreeSet::new();
    for name in names {
        if let Some(old) = plan.ports.get(name) {
            old_elements.extend(old.elements.iter().cloned());
        }
        plan.remove(name);
    }
    let mut new_elements: BTreeSet<Element> = BTreeSet::new();
    let mut hairpin_touched = hairpin_before.clone();
    for name in names {
        let Some(port) = state.services.get(name) else {
            continue;
        };
        let eps = state.endpoints_of(name);
        let planned = plan_port(
            plan.family,
            port,
            eps,
            |d| plan.owners.get(d).is_none_or(|o| o == name),
            warnings,
        );
        new_elements.extend(planned.elements.iter().cloned());
        hairpin_touched.extend(planned.endpoint_ips.iter().copied());
        for e in &planned.elements {
            if let MapId::Endpoints(n) | MapId::NodeportEndpoints(n) = e.map {
                if !plan.classes.contains(&n) {
                    delta.new_classes.insert(n);
                }
            }
        }
        plan.insert(name.clone(), planned);
    }
    delta.deleted = old_elements.difference(&new_elements).cloned().collect();
    delta.added = new_elements.difference(&old_elements).cloned().collect();
    // Hairpin elements are shared: compare presence before and after for touched IPs.
    for ip in hairpin_touched {
        let was = hairpin_before.contains(&ip) || plan_has_hairpin_elsewhere(plan, &ip, names);
        let is = plan.hairpin_refs.contains_key(&ip);
        let element = Element {
            map: MapId::Hairpin,
            key: FamilyPlan::hairpin_key(&ip),
            value: None,
        };
        if was && !is {
            delta.deleted.insert(element);
        } else if !was && is {
            delta.added.insert(element);
        }
    }
    delta
}

/// Whether a Service port outside `names` keeps `ip` in the hairpin set.
fn plan_has_hairpin_elsewhere(
    plan: &FamilyPlan,
    ip: &IpAddr,
    names: &BTreeSet<ServicePortName>,
) -> bool {
    let refs = plan.hairpin_refs.get(ip).copied().unwrap_or(0);
    let ours = names
        .iter()
        .filter_map(|n| plan.ports.get(n))
        .filter(|p| p.endpoint_ips.contains(ip))
        .count();
    refs > ours
}

/// Plans one Service port in one family. `may_claim` says whether a destination is free
/// for this port (not owned by another Service port).
fn plan_port(
    family: IpFamily,
    port: &ServicePort,
    endpoints: &[proxy_core::model::Endpoint],
    may_claim: impl Fn(&Destination) -> bool,
    warnings: &mut Vec<String>,
) -> PortPlan {
    let mut out = PortPlan::default();
    let Some(cluster_ip) = port.cluster_ip(family) else {
        return out;
    };
    let proto = port.protocol();
    let eps: Vec<_> = usable_endpoints(endpoints)
        .filter(|e| e.family() == family)
        .collect();
    let n = eps.len();

    let mut ip_dests: Vec<(IpAddr, &str)> = vec![(cluster_ip, "cluster")];
    ip_dests.extend(
        port.external_destinations(family)
            .map(|ip| (ip, "external")),
    );
    for (ip, kind) in ip_dests {
        let dest = Destination::Ip(ip, proto, port.port);
        if out.destinations.contains(&dest) {
            continue;
        }
        if !may_claim(&dest) {
            warnings.push(format!(
                "{}: {ip} {proto}/{} is already used by another Service; skipped",
                port.name, port.port
            ));
            continue;
        }
        out.destinations.push(dest);
        let key = format!("{ip} . {proto} . {}", port.port);
        if n == 0 {
            out.elements.push(Element {
                map: MapId::NoEndpointServices,
                key,
                value: None,
            });
            continue;
        }
        for (slot, ep) in eps.iter().enumerate() {
            out.elements.push(Element {
                map: MapId::Endpoints(n),
                key: format!("{key} . {slot}"),
                value: Some(format!("{} . {}", ep.ip, ep.port)),
            });
        }
        out.elements.push(Element {
            map: MapId::ServiceIps,
            key,
            value: Some(format!("goto {kind}-class-{n}")),
        });
    }

    if let Some(node_port) = port.node_port {
        let dest = Destination::NodePort(proto, node_port);
        if !may_claim(&dest) {
            warnings.push(format!(
                "{}: nodePort {proto}/{node_port} is already used by another Service; skipped",
                port.name
            ));
        } else {
            out.destinations.push(dest);
            let key = format!("{proto} . {node_port}");
            if n == 0 {
                out.elements.push(Element {
                    map: MapId::NoEndpointNodeports,
                    key,
                    value: None,
                });
            } else {
                for (slot, ep) in eps.iter().enumerate() {
                    out.elements.push(Element {
                        map: MapId::NodeportEndpoints(n),
                        key: format!("{key} . {slot}"),
                        value: Some(format!("{} . {}", ep.ip, ep.port)),
                    });
                }
                out.elements.push(Element {
                    map: MapId::ServiceNodeports,
                    key,
                    value: Some(format!("goto nodeport-class-{n}")),
                });
            }
        }
    }
    if n > 0 && !out.destinations.is_empty() {
        out.endpoint_ips = eps.iter().map(|e| e.ip).collect();
    }
    out.elements.sort();
    out
}

/// nftables' names for a family.
pub struct FamilyNames {
    pub table_family: &'static str,
    pub addr: &'static str,
    pub addr_type: &'static str,
    pub localhost: &'static str,
}

pub fn family_names(family: IpFamily) -> FamilyNames {
    match family {
        IpFamily::V4 => FamilyNames {
            table_family: "ip",
            addr: "ip",
            addr_type: "ipv4_addr",
            localhost: "127.0.0.0/8",
        },
        IpFamily::V6 => FamilyNames {
            table_family: "ip6",
            addr: "ip6",
            addr_type: "ipv6_addr",
            localhost: "::1",
        },
    }
}

/// The table every mode of ours programs nftables rules in (per family).
pub const TABLE: &str = "kube-proxy";

/// Renders the definition of one endpoint-count class: its DNAT map and chains.
fn render_class(
    out: &mut String,
    family: IpFamily,
    config: &NftConfig,
    n: usize,
    endpoints: &[(&str, Option<&str>)],
    nodeport_endpoints: &[(&str, Option<&str>)],
) {
    let f = family_names(family);
    let mark = 1u32 << config.masquerade_bit;
    // `numgen random mod 1` only gives the key's type; the chains use `mod N`.
    let _ = writeln!(
        out,
        "\tmap endpoints-{n} {{\n\t\ttypeof {a} daddr . meta l4proto . th dport . numgen random mod 1 : {a} daddr . th dport",
        a = f.addr
    );
    render_elements(out, endpoints);
    out.push_str("\t}\n");
    let _ = writeln!(
        out,
        "\tmap nodeport-endpoints-{n} {{\n\t\ttypeof meta l4proto . th dport . numgen random mod 1 : {a} daddr . th dport",
        a = f.addr
    );
    render_elements(out, nodeport_endpoints);
    out.push_str("\t}\n");
    let mut cluster_mark = String::new();
    if config.masquerade_all {
        cluster_mark = format!("\t\tmeta mark set meta mark | {mark:#x}\n");
    } else {
        let cidrs: Vec<String> = config
            .cluster_cidrs
            .iter()
            .filter(|c| IpFamily::of_net(c) == family)
            .map(|c| c.trunc().to_string())
            .collect();
        if !cidrs.is_empty() {
            cluster_mark = format!(
                "\t\t{} saddr != {{ {} }} meta mark set meta mark | {mark:#x}\n",
                f.addr,
                cidrs.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "\tchain cluster-class-{n} {{\n{cluster_mark}\t\tdnat {a} to {a} daddr . meta l4proto . th dport . numgen random mod {n} map @endpoints-{n}\n\t}}",
        a = f.addr
    );
    let _ = writeln!(
        out,
        "\tchain external-class-{n} {{\n\t\tmeta mark set meta mark | {mark:#x}\n\t\tdnat {a} to {a} daddr . meta l4proto . th dport . numgen random mod {n} map @endpoints-{n}\n\t}}",
        a = f.addr
    );
    let _ = writeln!(
        out,
        "\tchain nodeport-class-{n} {{\n\t\tmeta mark set meta mark | {mark:#x}\n\t\tdnat {a} to meta l4proto . th dport . numgen random mod {n} map @nodeport-endpoints-{n}\n\t}}",
        a = f.addr
    );
}

fn render_elements(out: &mut String, elements: &[(&str, Option<&str>)]) {
    if elements.is_empty() {
        return;
    }
    out.push_str("\t\telements = {\n");
    for (i, (key, value)) in elements.iter().enumerate() {
        out.push_str("\t\t\t");
        out.push_str(key);
        if let Some(v) = value {
            out.push_str(" : ");
            out.push_str(v);
        }
        out.push_str(if i + 1 == elements.len() { "\n" } else { ",\n" });
    }
    out.push_str("\t\t}\n");
}

/// Renders the whole table of one family, replacing whatever table of that name exists,
/// as one part of an atomic `nft -f` transaction.
pub fn render_full(out: &mut String, plan: &FamilyPlan, config: &NftConfig) {
    let family = plan.family;
    let f = family_names(family);
    let t = format!("{} {TABLE}", f.table_family);
    let mark = 1u32 << config.masquerade_bit;
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "add table {t}\ndelete table {t}\ntable {t} {{");
    let _ = writeln!(out, "\tcomment \"rules for kube-proxy\"");
    let elements = plan.elements();
    let empty = Vec::new();
    let get = |id: MapId| elements.get(&id).unwrap_or(&empty);

    for &n in &plan.classes {
        render_class(
            out,
            family,
            config,
            n,
            get(MapId::Endpoints(n)),
            get(MapId::NodeportEndpoints(n)),
        );
    }
    let _ = writeln!(
        out,
        "\tmap service-ips {{\n\t\ttype {} . inet_proto . inet_service : verdict",
        f.addr_type
    );
    render_elements(out, get(MapId::ServiceIps));
    out.push_str("\t}\n");
    out.push_str("\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n");
    render_elements(out, get(MapId::ServiceNodeports));
    out.push_str("\t}\n");
    let _ = writeln!(
        out,
        "\tset no-endpoint-services {{\n\t\ttype {} . inet_proto . inet_service",
        f.addr_type
    );
    render_elements(out, get(MapId::NoEndpointServices));
    out.push_str("\t}\n");
    out.push_str("\tset no-endpoint-nodeports {\n\t\ttype inet_proto . inet_service\n");
    render_elements(out, get(MapId::NoEndpointNodeports));
    out.push_str("\t}\n");
    let _ = writeln!(out, "\tset hairpin {{\n\t\ttype {t} . {t}", t = f.addr_type);
    let hairpin: Vec<String> = plan
        .hairpin_refs
        .keys()
        .map(FamilyPlan::hairpin_key)
        .collect();
    let hairpin_refs: Vec<(&str, Option<&str>)> =
        hairpin.iter().map(|k| (k.as_str(), None)).collect();
    render_elements(out, &hairpin_refs);
    out.push_str("\t}\n");

    // NodePorts answer on the resolved local addresses; a family with none has no
    // NodePorts at all.
    let nodeport_match = match &plan.nodeport_addresses {
        None => Some(String::new()),
        Some(nets) if nets.is_empty() => None,
        Some(nets) => {
            let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
            Some(format!("{} daddr {{ {} }} ", f.addr, list.join(", ")))
        }
    };
    let nodeport_rule = |verdict: &str| match &nodeport_match {
        Some(np) => format!(
            "\t\tfib daddr type local {a} daddr != {lo} {np}meta l4proto . th dport {verdict}\n",
            a = f.addr,
            lo = f.localhost
        ),
        None => String::new(),
    };
    let reject_nodeport = nodeport_rule("@no-endpoint-nodeports ct state new goto reject-chain");
    let dispatch_nodeport = nodeport_rule("vmap @service-nodeports");
    let _ = writeln!(
        out,
        "\tchain reject-chain {{\n\t\treject\n\t}}\n\
         \tchain filter-prerouting {{\n\t\ttype filter hook prerouting priority dstnat - 10; policy accept;\n\
         \t\tct state new {a} daddr . meta l4proto . th dport @no-endpoint-services goto reject-chain\n\
         {reject_nodeport}\t}}\n\
         \tchain filter-output {{\n\t\ttype filter hook output priority -110; policy accept;\n\
         \t\tct state new {a} daddr . meta l4proto . th dport @no-endpoint-services goto reject-chain\n\
         {reject_nodeport}\t}}\n\
         \tchain services {{\n\
         \t\t{a} daddr . meta l4proto . th dport vmap @service-ips\n\
         {dispatch_nodeport}\t}}\n\
         \tchain nat-prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain nat-output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {mark:#x} == {mark:#x} meta mark set meta mark ^ {mark:#x} masquerade fully-random\n\
         \t\tct status dnat {a} saddr . {a} daddr @hairpin masquerade fully-random\n\t}}\n}}",
        a = f.addr,
    );
}

fn render_element_command(
    out: &mut String,
    verb: &str,
    family: IpFamily,
    map: MapId,
    elems: &[(&str, Option<&str>)],
) {
    let f = family_names(family);
    let _ = writeln!(
        out,
        "{verb} element {} {TABLE} {} {{",
        f.table_family,
        map.name()
    );
    for (i, (key, value)) in elems.iter().enumerate() {
        out.push('\t');
        out.push_str(key);
        if let (Some(v), "add") = (value, verb) {
            out.push_str(" : ");
            out.push_str(v);
        }
        out.push_str(if i + 1 == elems.len() { "\n" } else { ",\n" });
    }
    out.push_str("}\n");
}

/// Renders a delta as `nft` commands: new classes, then deletions, then additions.
pub fn render_delta(out: &mut String, family: IpFamily, delta: &Delta, config: &NftConfig) {
    let f = family_names(family);
    if !delta.new_classes.is_empty() {
        // Redeclaring the table block with `table` adds objects without touching others.
        let _ = writeln!(out, "table {} {TABLE} {{", f.table_family);
        for &n in &delta.new_classes {
            render_class(out, family, config, n, &[], &[]);
        }
        out.push_str("}\n");
    }
    for (verb, set) in [("delete", &delta.deleted), ("add", &delta.added)] {
        let mut by_map: BTreeMap<MapId, Vec<(&str, Option<&str>)>> = BTreeMap::new();
        for e in set {
            by_map
                .entry(e.map)
                .or_default()
                .push((&e.key, e.value.as_deref()));
        }
        for (map, elems) in by_map {
            render_element_command(out, verb, family, map, &elems);
        }
    }
}
