//! The planner: desired state in, nftables objects out. Pure: no kernel, no clock.
//!
//! Shape of the ruleset (one table per IP family, `ip kube-proxy` and `ip6 kube-proxy`):
//! - `service-ips`: verdict map `daddr . l4proto . dport → goto <chain>` for every cluster
//!   IP, externalIP and load-balancer IP; `service-nodeports`: `l4proto . dport → goto
//!   <chain>` on the node's NodePort addresses.
//! - Plain Service ports (no affinity, no `Local` policy) share *class* chains, one per
//!   endpoint count N: `{cluster,external,nodeport}-class-N` DNAT through
//!   `numgen random mod N` into the data maps `endpoints-N` / `nodeport-endpoints-N`
//!   keyed by destination plus slot. A packet costs two hash lookups whatever the number
//!   of Services, and an endpoint change touches only that Service's elements.
//! - Ports that need more (session affinity, `Local` traffic policies) get chains of
//!   their own, named by a hash of the port's name: `int-H` (cluster-IP traffic), `ext-H`
//!   (NodePort/external traffic), `svc-H` / `svl-H` (all / local endpoints). They pick an
//!   endpoint with `numgen` rules and constant DNAT targets, not with an anonymous map:
//!   every named or anonymous set costs the kernel a scan of all sets (and of the
//!   transaction) when it is created or referenced, which made a 10,000-Service full sync
//!   quadratic.
//! - Session affinity: each endpoint of an affinity Service holds a small *slot* number,
//!   stable while the endpoint exists; the dynamic set `aff-K`, shared by all Services,
//!   remembers `client . destination` pairs sent to the endpoint in slot K. So the number
//!   of sets is the largest endpoint count, not the number of endpoints.
//! - `no-endpoint-services` / `no-endpoint-nodeports`: destinations of Services without
//!   any endpoint; new connections to them are rejected.
//! - `firewall-ips`: load-balancer IPs with `loadBalancerSourceRanges` → `fw-H`, which
//!   drops other sources.
//! - `hairpin`: `endpoint . endpoint` pairs, to masquerade a pod reaching itself.
//!
//! Only IP addresses, CIDRs, port numbers and hashes reach the rules, formatted by us from
//! parsed values; the one name that does (a chain comment) is filtered to a safe alphabet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, Protocol, ProxyState, ServicePort, ServicePortName,
    TrafficPolicy,
};
use proxy_core::select::{externally_accessible, select, Selection};

/// Settings that shape the static part of the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// The fwmark bit (0..=31) that tells postrouting to masquerade.
    pub masquerade_bit: u8,
    /// Masquerade all traffic to cluster IPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// How pod traffic is recognised (`--detect-local-mode`); traffic to a cluster IP from
    /// anything else is masqueraded.
    pub local: LocalDetector,
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
            local: LocalDetector::None,
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
    FirewallIps,
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
            MapId::FirewallIps => "firewall-ips".into(),
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

/// A chain owned by one Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chain {
    pub name: String,
    pub comment: String,
    pub rules: Vec<String>,
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
    /// Chains of its own (affinity, local policies, source ranges).
    pub chains: Vec<Chain>,
    /// With session affinity: the slot of each endpoint (`ip`, `port`), which names the
    /// shared `aff-K` set its clients are remembered in.
    pub affinity_slots: BTreeMap<(IpAddr, u16), usize>,
}

impl PortPlan {
    /// The affinity slots this port's rules refer to.
    fn slots_used(&self) -> BTreeSet<usize> {
        self.affinity_slots.values().copied().collect()
    }
}

/// The shared affinity set of one slot.
pub fn affinity_set_name(slot: usize) -> String {
    format!("aff-{slot}")
}

/// How "traffic from this cluster's pods" reads in nftables, both ways round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMatch {
    pub is_local: String,
    pub not_local: String,
}

/// Settings resolved for one family at full-plan time (they may depend on the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySettings {
    pub family: IpFamily,
    pub mark: u32,
    pub masquerade_all: bool,
    pub local: Option<LocalMatch>,
    /// Local addresses NodePorts answer on: `None` for all, `Some(empty)` for none.
    pub nodeport_addresses: Option<Vec<IpNet>>,
}

/// One family's table, as objects per Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub settings: FamilySettings,
    pub ports: BTreeMap<ServicePortName, PortPlan>,
    /// Who owns each destination.
    pub owners: HashMap<Destination, ServicePortName>,
    /// How many Service ports use each endpoint IP (hairpin elements are shared).
    pub hairpin_refs: BTreeMap<IpAddr, usize>,
    /// Endpoint-count classes whose chains and maps exist.
    pub classes: BTreeSet<usize>,
    /// How many Service ports use each affinity slot (its set exists while used).
    pub affinity_refs: BTreeMap<usize, usize>,
}

impl FamilyPlan {
    pub fn family(&self) -> IpFamily {
        self.settings.family
    }

    /// Plans every Service port from scratch. Conflicting destinations go to the port
    /// that sorts first; the others are reported. Affinity slots are kept from
    /// `previous` (what the kernel held) so a full rewrite does not move clients.
    pub fn full(
        family: IpFamily,
        state: &ProxyState,
        config: &NftConfig,
        previous: Option<&FamilyPlan>,
        warnings: &mut Vec<String>,
    ) -> Self {
        let settings = FamilySettings {
            family,
            mark: 1u32 << config.masquerade_bit,
            masquerade_all: config.masquerade_all,
            local: local_match(family, &config.local, state),
            nodeport_addresses: proxy_core::model::nodeport_addresses(
                &config.nodeport_cidrs,
                config.nodeport_primary,
                family,
                &state.node,
            ),
        };
        let mut plan = FamilyPlan {
            settings,
            ports: BTreeMap::new(),
            owners: HashMap::new(),
            hairpin_refs: BTreeMap::new(),
            classes: BTreeSet::new(),
            affinity_refs: BTreeMap::new(),
        };
        for (name, port) in &state.services {
            let eps = state.endpoints_of(name);
            let previous_slots = previous
                .and_then(|p| p.ports.get(name))
                .map(|p| &p.affinity_slots);
            let planned = plan_port(
                &plan.settings,
                port,
                eps,
                state,
                previous_slots,
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
        for slot in planned.slots_used() {
            *self.affinity_refs.entry(slot).or_default() += 1;
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
            release(&mut self.hairpin_refs, ip);
        }
        for slot in old.slots_used() {
            release(&mut self.affinity_refs, &slot);
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

/// Drops one reference to `key`, forgetting it at zero.
fn release<K: Ord>(refs: &mut BTreeMap<K, usize>, key: &K) {
    if let Some(count) = refs.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            refs.remove(key);
        }
    }
}

/// Resolves `--detect-local-mode` for one family; `None` when nothing is local.
fn local_match(
    family: IpFamily,
    detector: &LocalDetector,
    state: &ProxyState,
) -> Option<LocalMatch> {
    let addr = family_names(family).addr;
    let cidr_match = |nets: &[IpNet]| {
        let list: Vec<String> = nets
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .map(|n| n.trunc().to_string())
            .collect();
        (!list.is_empty()).then(|| LocalMatch {
            is_local: format!("{addr} saddr {{ {} }}", list.join(", ")),
            not_local: format!("{addr} saddr != {{ {} }}", list.join(", ")),
        })
    };
    match detector {
        LocalDetector::None => None,
        LocalDetector::ClusterCidr(nets) => cidr_match(nets),
        LocalDetector::NodeCidr => cidr_match(&state.node.pod_cidrs),
        // Interface names are validated at start-up (no quotes or spaces).
        LocalDetector::BridgeInterface(name) => Some(LocalMatch {
            is_local: format!("iifname \"{name}\""),
            not_local: format!("iifname != \"{name}\""),
        }),
        LocalDetector::InterfaceNamePrefix(prefix) => Some(LocalMatch {
            is_local: format!("iifname \"{prefix}*\""),
            not_local: format!("iifname != \"{prefix}*\""),
        }),
    }
}

/// What changes between two plans of one family, as nftables would apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub new_classes: BTreeSet<usize>,
    pub deleted: BTreeSet<Element>,
    pub added: BTreeSet<Element>,
    /// Chains that did not exist.
    pub chains_added: Vec<Chain>,
    /// Chains that exist with other rules: flushed and refilled.
    pub chains_changed: Vec<Chain>,
    pub chains_deleted: Vec<String>,
    pub sets_added: Vec<String>,
    pub sets_deleted: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.new_classes.is_empty()
            && self.deleted.is_empty()
            && self.added.is_empty()
            && self.chains_added.is_empty()
            && self.chains_changed.is_empty()
            && self.chains_deleted.is_empty()
            && self.sets_added.is_empty()
            && self.sets_deleted.is_empty()
    }
}

/// Replans the given Service ports (old and new names of the changed Services) on top of
/// `plan`, returning the delta. `plan` becomes the new plan.
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
    let slots_before: BTreeSet<usize> = plan.affinity_refs.keys().copied().collect();
    let mut old_elements: BTreeSet<Element> = BTreeSet::new();
    let mut old_chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut old_slots: BTreeMap<&ServicePortName, BTreeMap<(IpAddr, u16), usize>> = BTreeMap::new();
    for name in names {
        if let Some(old) = plan.ports.get(name) {
            old_elements.extend(old.elements.iter().cloned());
            old_chains.extend(old.chains.iter().map(|c| (c.name.clone(), c.clone())));
            old_slots.insert(name, old.affinity_slots.clone());
        }
        plan.remove(name);
    }
    let mut new_elements: BTreeSet<Element> = BTreeSet::new();
    let mut new_chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut hairpin_touched = hairpin_before.clone();
    for name in names {
        let Some(port) = state.services.get(name) else {
            continue;
        };
        let eps = state.endpoints_of(name);
        let planned = plan_port(
            &plan.settings,
            port,
            eps,
            state,
            old_slots.get(name),
            |d| plan.owners.get(d).is_none_or(|o| o == name),
            warnings,
        );
        new_elements.extend(planned.elements.iter().cloned());
        new_chains.extend(planned.chains.iter().map(|c| (c.name.clone(), c.clone())));
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
    for (name, chain) in &new_chains {
        match old_chains.get(name) {
            None => delta.chains_added.push(chain.clone()),
            Some(old) if old.rules != chain.rules => delta.chains_changed.push(chain.clone()),
            Some(_) => {}
        }
    }
    delta.chains_deleted = old_chains
        .keys()
        .filter(|n| !new_chains.contains_key(*n))
        .cloned()
        .collect();
    let slots_after: BTreeSet<usize> = plan.affinity_refs.keys().copied().collect();
    delta.sets_added = slots_after
        .difference(&slots_before)
        .map(|&s| affinity_set_name(s))
        .collect();
    delta.sets_deleted = slots_before
        .difference(&slots_after)
        .map(|&s| affinity_set_name(s))
        .collect();
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

/// A stable, short, syntax-safe identifier: FNV-1a over the parts, as 16 hex digits.
fn hash_id(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A chain comment: the port's name, restricted to characters that cannot end a string.
fn safe_comment(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | ':' | '-' | '.' | '_'))
        .take(120)
        .collect()
}

/// Whether a port needs chains of its own rather than the shared class chains.
fn needs_own_chains(port: &ServicePort) -> bool {
    port.session_affinity_timeout.is_some()
        || port.internal_traffic_policy == TrafficPolicy::Local
        || (externally_accessible(port) && port.external_traffic_policy == TrafficPolicy::Local)
}

/// Plans one Service port in one family. `may_claim` says whether a destination is free
/// for this port (not owned by another Service port); `previous_slots` are the affinity
/// slots its endpoints had.
fn plan_port(
    settings: &FamilySettings,
    port: &ServicePort,
    endpoints: &[Endpoint],
    state: &ProxyState,
    previous_slots: Option<&BTreeMap<(IpAddr, u16), usize>>,
    may_claim: impl Fn(&Destination) -> bool,
    warnings: &mut Vec<String>,
) -> PortPlan {
    let family = settings.family;
    let mut out = PortPlan::default();
    let Some(cluster_ip) = port.cluster_ip(family) else {
        return out;
    };
    let proto = port.protocol();
    let selection = select(port, endpoints, family, &state.node);

    // Claim destinations first: a conflict drops only that destination.
    let mut ip_dests: Vec<(IpAddr, bool)> = vec![(cluster_ip, false)];
    ip_dests.extend(port.external_destinations(family).map(|ip| (ip, true)));
    let mut claimed_ips = Vec::new();
    for (ip, external) in ip_dests {
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
        claimed_ips.push((ip, external));
    }
    let mut node_port = None;
    if let Some(np) = port.node_port {
        let dest = Destination::NodePort(proto, np);
        if may_claim(&dest) {
            out.destinations.push(dest);
            node_port = Some(np);
        } else {
            warnings.push(format!(
                "{}: nodePort {proto}/{np} is already used by another Service; skipped",
                port.name
            ));
        }
    }

    if !selection.has_any {
        for (ip, _) in &claimed_ips {
            out.elements.push(Element {
                map: MapId::NoEndpointServices,
                key: format!("{ip} . {proto} . {}", port.port),
                value: None,
            });
        }
        if let Some(np) = node_port {
            out.elements.push(Element {
                map: MapId::NoEndpointNodeports,
                key: format!("{proto} . {np}"),
                value: None,
            });
        }
    } else if needs_own_chains(port) {
        if port.session_affinity_timeout.is_some() {
            let used = selection.cluster.iter().chain(selection.local.iter());
            out.affinity_slots = assign_slots(previous_slots, used.map(|e| (e.ip, e.port)));
        }
        plan_own_chains(
            settings,
            port,
            &selection,
            &claimed_ips,
            node_port,
            &mut out,
        );
    } else {
        plan_class(
            settings,
            port,
            &selection.cluster,
            &claimed_ips,
            node_port,
            &mut out,
        );
    }
    plan_firewall(settings, port, &claimed_ips, &mut out);

    let used: BTreeSet<IpAddr> = selection
        .cluster
        .iter()
        .chain(selection.local.iter())
        .map(|e| e.ip)
        .collect();
    if selection.has_any && !out.destinations.is_empty() {
        out.endpoint_ips = used;
    }
    out.elements.sort();
    out
}

/// A plain port: elements in the shared class maps.
fn plan_class(
    settings: &FamilySettings,
    port: &ServicePort,
    eps: &[&Endpoint],
    ips: &[(IpAddr, bool)],
    node_port: Option<u16>,
    out: &mut PortPlan,
) {
    let _ = settings;
    let proto = port.protocol();
    let n = eps.len();
    for (ip, external) in ips {
        let key = format!("{ip} . {proto} . {}", port.port);
        for (slot, ep) in eps.iter().enumerate() {
            out.elements.push(Element {
                map: MapId::Endpoints(n),
                key: format!("{key} . {slot}"),
                value: Some(format!("{} . {}", ep.ip, ep.port)),
            });
        }
        let kind = if *external { "external" } else { "cluster" };
        out.elements.push(Element {
            map: MapId::ServiceIps,
            key,
            value: Some(format!("goto {kind}-class-{n}")),
        });
    }
    if let Some(np) = node_port {
        let key = format!("{proto} . {np}");
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

/// Above this many endpoints a chain picks one through an anonymous map (one lookup per
/// packet) rather than a rule per endpoint; below it, rules avoid the cost of a set.
const MAX_ENDPOINT_RULES: usize = 32;

/// Gives each endpoint an affinity slot: the one it had, else the lowest free one. Slots
/// name shared sets, so keeping them keeps the clients an endpoint already has.
fn assign_slots(
    previous: Option<&BTreeMap<(IpAddr, u16), usize>>,
    endpoints: impl Iterator<Item = (IpAddr, u16)>,
) -> BTreeMap<(IpAddr, u16), usize> {
    let wanted: BTreeSet<(IpAddr, u16)> = endpoints.collect();
    let mut slots: BTreeMap<(IpAddr, u16), usize> = previous
        .into_iter()
        .flatten()
        .filter(|(ep, _)| wanted.contains(ep))
        .map(|(ep, slot)| (*ep, *slot))
        .collect();
    let mut taken: BTreeSet<usize> = slots.values().copied().collect();
    let mut next = 0;
    for ep in wanted {
        if slots.contains_key(&ep) {
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        slots.insert(ep, next);
        taken.insert(next);
    }
    slots
}

/// The DNAT target of one endpoint, as a constant.
fn dnat_target(ep: &Endpoint) -> String {
    match ep.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", ep.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", ep.port),
    }
}

/// The rules that send a packet to one of `eps` (with affinity, to the one the client
/// used before); `drop` when there is none to use.
fn dispatch_rules(
    settings: &FamilySettings,
    port: &ServicePort,
    eps: &[&Endpoint],
    slots: &BTreeMap<(IpAddr, u16), usize>,
) -> Vec<String> {
    let a = family_names(settings.family).addr;
    let proto = port.protocol();
    let n = eps.len();
    if n == 0 {
        return vec!["drop".into()];
    }
    let dnat = |ep: &Endpoint| format!("meta l4proto {proto} dnat {a} to {}", dnat_target(ep));
    // Rule k of the spread matches with probability 1/(N-k), which makes the choice
    // uniform; the last always matches.
    let spread = |k: usize, action: String| {
        let remaining = n - k;
        if remaining > 1 {
            format!("numgen random mod {remaining} == 0 {action}")
        } else {
            action
        }
    };
    let Some(timeout) = port.session_affinity_timeout else {
        if n > MAX_ENDPOINT_RULES {
            let targets: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, ep)| format!("{i} : {} . {}", ep.ip, ep.port))
                .collect();
            return vec![format!(
                "meta l4proto {proto} dnat {a} to numgen random mod {n} map {{ {} }}",
                targets.join(", ")
            )];
        }
        return eps
            .iter()
            .enumerate()
            .map(|(k, ep)| spread(k, dnat(ep)))
            .collect();
    };
    // Affinity: a known client (its `client . destination` in the set of an endpoint's
    // slot) goes back to that endpoint; a new one is spread and remembered. Every new
    // connection refreshes the timeout.
    let client = format!("{a} saddr . {a} daddr . meta l4proto . th dport");
    let mut known = Vec::with_capacity(2 * n);
    let mut new = Vec::with_capacity(n);
    for (k, ep) in eps.iter().enumerate() {
        // Every endpoint in `eps` was given a slot; the fallback is never used.
        let slot = slots.get(&(ep.ip, ep.port)).copied().unwrap_or(k);
        let set = affinity_set_name(slot);
        let remember_and_dnat = format!(
            "update @{set} {{ {client} timeout {timeout}s }} {}",
            dnat(ep)
        );
        known.push(format!("{client} @{set} {remember_and_dnat}"));
        new.push(spread(k, remember_and_dnat));
    }
    known.extend(new);
    known
}

/// A port with affinity or a `Local` policy: chains of its own.
fn plan_own_chains(
    settings: &FamilySettings,
    port: &ServicePort,
    selection: &Selection<'_>,
    ips: &[(IpAddr, bool)],
    node_port: Option<u16>,
    out: &mut PortPlan,
) {
    let proto = port.protocol();
    let name_text = format!(
        "{}/{}/{}/{}",
        port.name.service.namespace, port.name.service.name, port.name.port, proto
    );
    let id = hash_id(&[&name_text]);
    let mark_rule = format!("meta mark set meta mark | {:#x}", settings.mark);
    let comment = safe_comment(&port.name.to_string());

    // svc-H: all (cluster) endpoints; svl-H: this node's.
    let svc = format!("svc-{id}");
    let svl = format!("svl-{id}");
    let cluster_rules = dispatch_rules(settings, port, &selection.cluster, &out.affinity_slots);
    out.chains.push(Chain {
        name: svc.clone(),
        comment: comment.clone(),
        rules: cluster_rules,
    });
    let uses_local = !selection.local.is_empty()
        || port.internal_traffic_policy == TrafficPolicy::Local
        || port.external_traffic_policy == TrafficPolicy::Local;
    if uses_local {
        let local_rules = dispatch_rules(settings, port, &selection.local, &out.affinity_slots);
        out.chains.push(Chain {
            name: svl.clone(),
            comment: comment.clone(),
            rules: local_rules,
        });
    }

    // int-H: traffic to the cluster IP.
    let int = format!("int-{id}");
    let mut int_rules = Vec::new();
    if settings.masquerade_all {
        int_rules.push(mark_rule.clone());
    } else if let Some(local) = &settings.local {
        int_rules.push(format!("{} {mark_rule}", local.not_local));
    }
    int_rules.push(match port.internal_traffic_policy {
        TrafficPolicy::Local => format!("goto {svl}"),
        TrafficPolicy::Cluster => format!("goto {svc}"),
    });
    out.chains.push(Chain {
        name: int.clone(),
        comment: comment.clone(),
        rules: int_rules,
    });

    // Where cluster-IP traffic goes; pods and the node reaching an external address of a
    // Local Service are sent the same way (upstream's short-circuit).
    let internal_target = match port.internal_traffic_policy {
        TrafficPolicy::Local => &svl,
        TrafficPolicy::Cluster => &svc,
    };
    // ext-H: NodePort, externalIP and load-balancer traffic.
    let ext = format!("ext-{id}");
    let mut ext_rules = Vec::new();
    match port.external_traffic_policy {
        TrafficPolicy::Cluster => {
            ext_rules.push(mark_rule.clone());
            ext_rules.push(format!("goto {svc}"));
        }
        TrafficPolicy::Local => {
            // Pods and the node itself reach external IPs of a Local Service as if they
            // had used the cluster IP; outside clients keep their source address and
            // reach this node's endpoints only.
            if let Some(local) = &settings.local {
                ext_rules.push(format!("{} goto {internal_target}", local.is_local));
            }
            ext_rules.push(format!("fib saddr type local {mark_rule}"));
            ext_rules.push(format!("fib saddr type local goto {internal_target}"));
            ext_rules.push(format!("goto {svl}"));
        }
    }
    let has_external = ips.iter().any(|(_, e)| *e) || node_port.is_some();
    if has_external {
        out.chains.push(Chain {
            name: ext.clone(),
            comment,
            rules: ext_rules,
        });
    }

    for (ip, external) in ips {
        out.elements.push(Element {
            map: MapId::ServiceIps,
            key: format!("{ip} . {proto} . {}", port.port),
            value: Some(format!("goto {}", if *external { &ext } else { &int })),
        });
    }
    if let Some(np) = node_port {
        out.elements.push(Element {
            map: MapId::ServiceNodeports,
            key: format!("{proto} . {np}"),
            value: Some(format!("goto {ext}")),
        });
    }
}

/// `loadBalancerSourceRanges`: only listed sources reach the load-balancer IPs.
fn plan_firewall(
    settings: &FamilySettings,
    port: &ServicePort,
    ips: &[(IpAddr, bool)],
    out: &mut PortPlan,
) {
    if port.load_balancer_source_ranges.is_empty() {
        return;
    }
    let lb_ips: Vec<&IpAddr> = ips
        .iter()
        .filter(|(ip, _)| port.load_balancer_ips.contains(ip))
        .map(|(ip, _)| ip)
        .collect();
    if lb_ips.is_empty() {
        return;
    }
    let f = family_names(settings.family);
    let proto = port.protocol();
    let ranges: Vec<String> = port
        .load_balancer_source_ranges
        .iter()
        .filter(|n| IpFamily::of_net(n) == settings.family)
        .map(ToString::to_string)
        .collect();
    let id = hash_id(&[&port.name.to_string(), "firewall"]);
    let chain = format!("fw-{id}");
    let rule = if ranges.is_empty() {
        // Ranges only of the other family: nobody of this family may connect.
        "drop".to_string()
    } else {
        format!("{} saddr != {{ {} }} drop", f.addr, ranges.join(", "))
    };
    out.chains.push(Chain {
        name: chain.clone(),
        comment: safe_comment(&port.name.to_string()),
        rules: vec![rule],
    });
    for ip in lb_ips {
        out.elements.push(Element {
            map: MapId::FirewallIps,
            key: format!("{ip} . {proto} . {}", port.port),
            value: Some(format!("goto {chain}")),
        });
    }
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

/// Renders the definition of one endpoint-count class: its DNAT maps and chains.
fn render_class(
    out: &mut String,
    settings: &FamilySettings,
    n: usize,
    endpoints: &[(&str, Option<&str>)],
    nodeport_endpoints: &[(&str, Option<&str>)],
) {
    let f = family_names(settings.family);
    let mark = settings.mark;
    // `numgen random mod 1` only gives the key's type; the chains use `mod N`.
    let _ = writeln!(out, "\tmap endpoints-{n} {{\n\t\ttypeof {a} daddr . meta l4proto . th dport . numgen random mod 1 : {a} daddr . th dport", a = f.addr);
    render_elements(out, endpoints);
    out.push_str("\t}\n");
    let _ = writeln!(out, "\tmap nodeport-endpoints-{n} {{\n\t\ttypeof meta l4proto . th dport . numgen random mod 1 : {a} daddr . th dport", a = f.addr);
    render_elements(out, nodeport_endpoints);
    out.push_str("\t}\n");
    let cluster_mark = if settings.masquerade_all {
        format!("\t\tmeta mark set meta mark | {mark:#x}\n")
    } else if let Some(local) = &settings.local {
        format!(
            "\t\t{} meta mark set meta mark | {mark:#x}\n",
            local.not_local
        )
    } else {
        String::new()
    };
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

/// Keyed by client and destination, so one set serves every Service. No `size`: the
/// kernel would allocate a hash table of that many buckets up front.
fn affinity_set_definition(family: IpFamily) -> String {
    let a = family_names(family).addr;
    format!("typeof {a} saddr . {a} daddr . meta l4proto . th dport; flags dynamic,timeout;")
}

fn render_chain_block(out: &mut String, chain: &Chain) {
    let _ = writeln!(out, "\tchain {} {{", chain.name);
    let _ = writeln!(out, "\t\tcomment \"{}\"", chain.comment);
    for rule in &chain.rules {
        let _ = writeln!(out, "\t\t{rule}");
    }
    out.push_str("\t}\n");
}

/// Renders the whole table of one family, replacing whatever table of that name exists,
/// as one part of an atomic `nft -f` transaction.
pub fn render_full(out: &mut String, plan: &FamilyPlan) {
    let settings = &plan.settings;
    let family = settings.family;
    let f = family_names(family);
    let t = format!("{} {TABLE}", f.table_family);
    let mark = settings.mark;
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "add table {t}\ndelete table {t}\ntable {t} {{");
    let _ = writeln!(out, "\tcomment \"rules for kube-proxy\"");
    let elements = plan.elements();
    let empty = Vec::new();
    let get = |id: MapId| elements.get(&id).unwrap_or(&empty);

    for &n in &plan.classes {
        render_class(
            out,
            settings,
            n,
            get(MapId::Endpoints(n)),
            get(MapId::NodeportEndpoints(n)),
        );
    }
    for &slot in plan.affinity_refs.keys() {
        let _ = writeln!(
            out,
            "\tset {} {{ {} }}",
            affinity_set_name(slot),
            affinity_set_definition(family)
        );
    }
    for port in plan.ports.values() {
        for chain in &port.chains {
            render_chain_block(out, chain);
        }
    }
    let verdict_maps = [
        (
            MapId::ServiceIps,
            format!("{} . inet_proto . inet_service : verdict", f.addr_type),
        ),
        (
            MapId::ServiceNodeports,
            "inet_proto . inet_service : verdict".to_string(),
        ),
        (
            MapId::FirewallIps,
            format!("{} . inet_proto . inet_service : verdict", f.addr_type),
        ),
    ];
    for (id, ty) in verdict_maps {
        let _ = writeln!(out, "\tmap {} {{\n\t\ttype {ty}", id.name());
        render_elements(out, get(id));
        out.push_str("\t}\n");
    }
    let sets = [
        (
            MapId::NoEndpointServices,
            format!("{} . inet_proto . inet_service", f.addr_type),
        ),
        (
            MapId::NoEndpointNodeports,
            "inet_proto . inet_service".to_string(),
        ),
    ];
    for (id, ty) in sets {
        let _ = writeln!(out, "\tset {} {{\n\t\ttype {ty}", id.name());
        render_elements(out, get(id));
        out.push_str("\t}\n");
    }
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
    let nodeport_match = match &settings.nodeport_addresses {
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
         \t\t{a} daddr . meta l4proto . th dport vmap @firewall-ips\n\
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

/// Renders a delta as `nft` commands, ordered so every reference exists when it is
/// made and nothing is deleted while still referenced: new classes, sets and chains;
/// flushes; element deletions; rules; element additions; chain and set deletions.
pub fn render_delta(out: &mut String, plan: &FamilyPlan, delta: &Delta) {
    let family = plan.family();
    let f = family_names(family);
    let t = format!("{} {TABLE}", f.table_family);
    if !delta.new_classes.is_empty() {
        // Redeclaring the table block with `table` adds objects without touching others.
        let _ = writeln!(out, "table {t} {{");
        for &n in &delta.new_classes {
            render_class(out, &plan.settings, n, &[], &[]);
        }
        out.push_str("}\n");
    }
    for set in &delta.sets_added {
        let _ = writeln!(
            out,
            "add set {t} {set} {{ {} }}",
            affinity_set_definition(family)
        );
    }
    for chain in &delta.chains_added {
        let _ = writeln!(
            out,
            "add chain {t} {} {{ comment \"{}\"; }}",
            chain.name, chain.comment
        );
    }
    for name in delta
        .chains_changed
        .iter()
        .map(|c| &c.name)
        .chain(&delta.chains_deleted)
    {
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    let by_map = |set: &BTreeSet<Element>| {
        let mut by_map: BTreeMap<MapId, Vec<(String, Option<String>)>> = BTreeMap::new();
        for e in set {
            by_map
                .entry(e.map)
                .or_default()
                .push((e.key.clone(), e.value.clone()));
        }
        by_map
    };
    for (map, elems) in by_map(&delta.deleted) {
        let refs: Vec<(&str, Option<&str>)> = elems
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        render_element_command(out, "delete", family, map, &refs);
    }
    for chain in delta.chains_added.iter().chain(&delta.chains_changed) {
        for rule in &chain.rules {
            let _ = writeln!(out, "add rule {t} {} {rule}", chain.name);
        }
    }
    for (map, elems) in by_map(&delta.added) {
        let refs: Vec<(&str, Option<&str>)> = elems
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        render_element_command(out, "add", family, map, &refs);
    }
    for name in &delta.chains_deleted {
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    for set in &delta.sets_deleted {
        let _ = writeln!(out, "delete set {t} {set}");
    }
}
