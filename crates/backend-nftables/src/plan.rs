//! The planner: desired state in, nftables objects out. Pure: no kernel, no clock.
//!
//! Shape of the ruleset (one table per IP family, `ip kube-proxy` and `ip6 kube-proxy`).
//! Every set the kernel looks up by name costs a scan of all sets (and of the transaction)
//! when it is created or referenced, and every chain a commit reaches is revalidated; so
//! the number of chains and sets does not grow with the number of Services. Per-Service
//! state lives in map elements, and a Service change is a change of elements only:
//! - `service-ips` (`daddr . l4proto . dport`) and `service-nodeports` (`l4proto . dport`)
//!   send a destination to an *entry* chain, which marks for masquerade as the traffic
//!   policy says: `internal` (cluster IPs), `external` / `nodeport`, and for
//!   `externalTrafficPolicy: Local` `external-local` / `nodeport-local` (outside clients
//!   keep their address; pods and the node short-circuit to all endpoints).
//! - Entry chains look the destination up again in `ip-picks` / `nodeport-picks` (or
//!   `*-short-circuits`), whose verdict is a *pick* chain: one per key kind, role (all
//!   endpoints or this node's), endpoint count N and affinity timeout. `pick-ip-10`
//!   chooses a slot K in 0..10 at random and goes to `dnat-slot-K`, which DNATs through
//!   map `slot-K` (destination → its endpoint in slot K). Each endpoint keeps its slot
//!   while it exists.
//! - Session affinity: the dynamic set `aff-K` remembers `client . destination` pairs
//!   sent to slot K. Known clients go back to their slot; new ones are spread over the N
//!   slots and remembered.
//! - `no-endpoint-services` / `no-endpoint-nodeports`: destinations of Services without
//!   any endpoint; new connections to them are rejected.
//! - `firewall-ips`: load-balancer IPs with `loadBalancerSourceRanges` → `fw-H`, which
//!   drops other sources (the one chain per Service, named by a hash).
//! - `hairpin`: `endpoint . endpoint` pairs, to masquerade a pod reaching itself.
//! - `cluster-ips`: every Service's cluster IP. New connections still addressed to one
//!   after DNAT (a port no Service uses) are rejected in `cluster-ips-check`, and those
//!   to any other address of the cluster's ServiceCIDRs are dropped there, as upstream.
//!
//! Only IP addresses, CIDRs, port numbers and hashes reach the rules, formatted by us from
//! parsed values; the one name that does (a chain comment) is filtered to a safe alphabet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, NodeInfo, Protocol, ProxyState, ServicePort,
    ServicePortName, TrafficPolicy,
};
use proxy_core::proxier::DestinationKind;
use proxy_core::select::{select, serves_localhost_nodeport, Selection};

use crate::rule::{Rule, Sel, Stmt, Verdict};

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
    /// Families whose loopback NodePorts are served by user-space listeners (upstream's
    /// `KubeProxyNFTablesLocalhostNodePorts`): the ones those listeners cannot serve are
    /// rejected on loopback rather than left to whatever binds the port.
    pub localhost_nodeports: Vec<IpFamily>,
    /// Which families to program.
    pub families: Vec<IpFamily>,
    /// `--service-counters`: count new connections per Service port and destination kind
    /// in named counters, selected through the `service-counters` and
    /// `nodeport-counters` object maps from the entry chains.
    pub service_counters: bool,
}

impl Default for NftConfig {
    fn default() -> Self {
        NftConfig {
            masquerade_bit: 14,
            masquerade_all: false,
            local: LocalDetector::None,
            nodeport_cidrs: Vec::new(),
            nodeport_primary: false,
            localhost_nodeports: Vec::new(),
            families: vec![IpFamily::V4, IpFamily::V6],
            service_counters: false,
        }
    }
}

/// How a destination is recognised in a packet: by address, protocol and port, or (a
/// NodePort, on any of the node's addresses) by protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    Ip,
    NodePort,
}

/// Which endpoints a destination is sent to: all usable ones, or this node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    All,
    Local,
}

impl Role {
    fn of(policy: TrafficPolicy) -> Role {
        match policy {
            TrafficPolicy::Cluster => Role::All,
            TrafficPolicy::Local => Role::Local,
        }
    }
}

/// A chain that picks one of `n` endpoints (slots 0..n) of `role` for destinations keyed
/// by `key`, with session affinity of `affinity` seconds or without. Shared by every
/// Service port of that shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PickClass {
    pub key: KeyKind,
    pub role: Role,
    pub n: usize,
    pub affinity: Option<u32>,
}

impl PickClass {
    pub fn chain(&self) -> String {
        let key = match self.key {
            KeyKind::Ip => "ip",
            KeyKind::NodePort => "nodeport",
        };
        let role = match self.role {
            Role::All => "",
            Role::Local => "-local",
        };
        match self.affinity {
            None => format!("pick-{key}{role}-{}", self.n),
            Some(t) => format!("pick-{key}{role}-{}-affinity-{t}", self.n),
        }
    }
}

/// The maps and sets that hold per-Service elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapId {
    ServiceIps,
    ServiceNodeports,
    /// Destination → pick chain (or `drop`): where its entry chain sends it.
    Picks(KeyKind),
    /// Destination of an `externalTrafficPolicy: Local` port → pick chain over all its
    /// endpoints, for pods and the node.
    ShortCircuits(KeyKind),
    NoEndpointServices,
    NoEndpointNodeports,
    FirewallIps,
    /// Destination → its endpoint in one slot.
    Slot(KeyKind, Role, usize),
    Hairpin,
    /// Every cluster IP of the family (a set of addresses).
    ClusterIps,
    /// NodePorts (`l4proto . dport`) that no loopback listener serves: rejected on the
    /// loopback address when localhost NodePorts are on.
    LocalhostNodeportRejects,
    /// Destination → the named counter of its Service port and destination kind.
    Counters(KeyKind),
}

impl MapId {
    pub fn name(self) -> String {
        let prefix = |key: KeyKind, role: Role| match (key, role) {
            (KeyKind::Ip, Role::All) => "",
            (KeyKind::Ip, Role::Local) => "local-",
            (KeyKind::NodePort, Role::All) => "nodeport-",
            (KeyKind::NodePort, Role::Local) => "local-nodeport-",
        };
        match self {
            MapId::ServiceIps => "service-ips".into(),
            MapId::ServiceNodeports => "service-nodeports".into(),
            MapId::Picks(KeyKind::Ip) => "ip-picks".into(),
            MapId::Picks(KeyKind::NodePort) => "nodeport-picks".into(),
            MapId::ShortCircuits(KeyKind::Ip) => "ip-short-circuits".into(),
            MapId::ShortCircuits(KeyKind::NodePort) => "nodeport-short-circuits".into(),
            MapId::NoEndpointServices => "no-endpoint-services".into(),
            MapId::NoEndpointNodeports => "no-endpoint-nodeports".into(),
            MapId::FirewallIps => "firewall-ips".into(),
            MapId::Slot(key, role, k) => format!("{}slot-{k}", prefix(key, role)),
            MapId::Hairpin => "hairpin".into(),
            MapId::ClusterIps => "cluster-ips".into(),
            MapId::LocalhostNodeportRejects => "localhost-nodeport-rejects".into(),
            MapId::Counters(KeyKind::Ip) => "service-counters".into(),
            MapId::Counters(KeyKind::NodePort) => "nodeport-counters".into(),
        }
    }
}

/// A map or set that pick classes need. Created with the first class that needs it,
/// removed only by a full rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClassObject {
    Map(MapId),
    /// `aff-K`: the clients sent to slot K.
    AffinitySet(usize),
}

impl ClassObject {
    pub fn name(&self) -> String {
        match self {
            ClassObject::Map(id) => id.name(),
            ClassObject::AffinitySet(slot) => affinity_set_name(*slot),
        }
    }
}

/// Everything the given pick classes refer to.
pub fn class_objects(classes: &BTreeSet<PickClass>) -> BTreeSet<ClassObject> {
    let mut out = BTreeSet::new();
    for c in classes {
        for k in 0..c.n {
            out.insert(ClassObject::Map(MapId::Slot(c.key, c.role, k)));
            if c.affinity.is_some() {
                out.insert(ClassObject::AffinitySet(k));
            }
        }
    }
    out
}

/// The slot chains the given pick classes jump to: `(key, role, slot)`.
pub fn slot_chains(classes: &BTreeSet<PickClass>) -> BTreeSet<(KeyKind, Role, usize)> {
    classes
        .iter()
        .flat_map(|c| (0..c.n).map(move |k| (c.key, c.role, k)))
        .collect()
}

/// The chain that DNATs to a destination's endpoint in one slot.
pub fn slot_chain_name(key: KeyKind, role: Role, slot: usize) -> String {
    format!("dnat-{}", MapId::Slot(key, role, slot).name())
}

/// The shared affinity set of one slot.
pub fn affinity_set_name(slot: usize) -> String {
    format!("aff-{slot}")
}

/// The slots of one port's endpoints (`ip`, `port`), per role; boxed slices, not maps:
/// there is one per Service port, and small maps (or vectors' spare room) cost several
/// times their contents.
/// An endpoint (address, port) and its slot.
pub type SlotOf = ((IpAddr, u16), usize);
pub type Slots = Box<[(Role, Box<[SlotOf]>)]>;

/// What a port was planned from: kept (shared with the state, so nearly free) instead of
/// its elements, which are derived again when needed. At 10,000 Services the elements
/// alone were ~25 MB.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSource {
    pub port: Arc<ServicePort>,
    pub endpoints: Option<Arc<Vec<Endpoint>>>,
}

/// A table's elements per map.
pub type Elements = BTreeMap<MapId, Vec<Element>>;

/// What one Service port contributes to one family's table, kept for the next change's
/// difference. Only ports with a cluster IP of the family have one. Exact-size slices:
/// a plan holds one per Service port for as long as the port exists.
#[derive(Debug, Clone, PartialEq)]
pub struct PortPlan {
    pub source: PortSource,
    pub destinations: Box<[Destination]>,
    /// Endpoint IPs, sorted, for the shared hairpin set.
    pub endpoint_ips: Box<[IpAddr]>,
    /// Its cluster IP of the family, for the shared `cluster-ips` set.
    pub cluster_ip: IpAddr,
    /// Chains of its own (only for `loadBalancerSourceRanges`).
    pub chains: Box<[Chain]>,
    /// The slot of each endpoint, per role.
    pub slots: Slots,
    /// The pick chains its elements send packets to.
    pub classes: Box<[PickClass]>,
}

/// A port while it is planned: grows as its elements are found, then is packed into a
/// [`PortPlan`] (and its elements handed out).
#[derive(Debug, Default)]
struct PortDraft {
    elements: Vec<Element>,
    destinations: Vec<Destination>,
    endpoint_ips: Vec<IpAddr>,
    cluster_ip: Option<IpAddr>,
    chains: Vec<Chain>,
    slots: Vec<(Role, Box<[SlotOf]>)>,
    classes: Vec<PickClass>,
}

impl PortDraft {
    /// The port as a plan keeps it; `None` when it has nothing in this family.
    fn pack(self, source: PortSource) -> Option<PortPlan> {
        let cluster_ip = self.cluster_ip?;
        Some(PortPlan {
            source,
            destinations: self.destinations.into_boxed_slice(),
            endpoint_ips: self.endpoint_ips.into_boxed_slice(),
            cluster_ip,
            chains: self.chains.into_boxed_slice(),
            slots: self.slots.into_boxed_slice(),
            classes: self.classes.into_boxed_slice(),
        })
    }

    /// The elements it shares with other ports, as [`PortPlan::shared`].
    fn shared(&self) -> impl Iterator<Item = Shared> + '_ {
        shared_of(&self.endpoint_ips, self.cluster_ip)
    }
}

/// One field of an element's key or value, typed so it can be written as `nft` text or
/// as netlink bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    Addr(IpAddr),
    Proto(Protocol),
    Port(u16),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Addr(ip) => write!(f, "{ip}"),
            Field::Proto(p) => write!(f, "{p}"),
            Field::Port(port) => write!(f, "{port}"),
        }
    }
}

/// A concatenation of up to three fields (`a . b . c`), held inline: a table has
/// hundreds of thousands of elements, and a heap allocation each would double their size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fields([Option<Field>; 3]);

impl Fields {
    /// The first three of `fields` (no key or value here has more).
    pub fn new(fields: &[Field]) -> Fields {
        debug_assert!(fields.len() <= 3, "a concatenation of {}", fields.len());
        let mut items = [None; 3];
        for (slot, field) in items.iter_mut().zip(fields) {
            *slot = Some(*field);
        }
        Fields(items)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Field> {
        self.0.iter().flatten()
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            write!(f, "{field}")?;
        }
        Ok(())
    }
}

/// What a map element maps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Data(Fields),
    Goto(String),
    Drop,
    /// The name of a counter (in an object map).
    Counter(CounterName),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Data(fields) => write!(f, "{fields}"),
            Value::Goto(chain) => write!(f, "goto {chain}"),
            Value::Drop => f.write_str("drop"),
            Value::Counter(name) => write!(f, "\"{name}\""),
        }
    }
}

impl PortPlan {
    /// The elements it shares with other ports (each stays while one port needs it).
    pub fn shared(&self) -> impl Iterator<Item = Shared> + '_ {
        shared_of(&self.endpoint_ips, Some(self.cluster_ip))
    }
}

fn shared_of(
    endpoint_ips: &[IpAddr],
    cluster_ip: Option<IpAddr>,
) -> impl Iterator<Item = Shared> + '_ {
    endpoint_ips
        .iter()
        .map(|ip| Shared::Hairpin(*ip))
        .chain(cluster_ip.map(Shared::ClusterIp))
}

/// An element several Service ports may need: counted per port, so it goes with the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shared {
    /// A pod reaching itself: `endpoint . endpoint` in `hairpin`.
    Hairpin(IpAddr),
    /// A Service's cluster IP in `cluster-ips` (shared by the Service's ports).
    ClusterIp(IpAddr),
}

impl Shared {
    pub fn map(self) -> MapId {
        match self {
            Shared::Hairpin(_) => MapId::Hairpin,
            Shared::ClusterIp(_) => MapId::ClusterIps,
        }
    }

    pub fn element(self) -> Element {
        match self {
            Shared::Hairpin(ip) => Element {
                map: MapId::Hairpin,
                key: Fields::new(&[Field::Addr(ip), Field::Addr(ip)]),
                value: None,
            },
            Shared::ClusterIp(ip) => Element {
                map: MapId::ClusterIps,
                key: Fields::new(&[Field::Addr(ip)]),
                value: None,
            },
        }
    }
}

/// One element of a map (with a value) or a set (without).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub map: MapId,
    pub key: Fields,
    pub value: Option<Value>,
}

/// A destination of an IP: `address . protocol . port`.
pub(crate) fn ip_key(ip: IpAddr, proto: Protocol, port: u16) -> Fields {
    Fields::new(&[Field::Addr(ip), Field::Proto(proto), Field::Port(port)])
}

/// A NodePort: `protocol . port`.
pub(crate) fn nodeport_key(proto: Protocol, port: u16) -> Fields {
    Fields::new(&[Field::Proto(proto), Field::Port(port)])
}

/// An endpoint as DNAT data: `address . port`.
fn endpoint_value(ip: IpAddr, port: u16) -> Value {
    Value::Data(Fields::new(&[Field::Addr(ip), Field::Port(port)]))
}

/// A chain owned by one Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chain {
    pub name: String,
    pub comment: String,
    pub rules: Vec<Rule>,
}

/// A destination one Service port owns; two Services cannot share one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    Ip(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// How "traffic from this cluster's pods" reads in nftables, both ways round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMatch {
    pub is_local: Stmt,
    pub not_local: Stmt,
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
    /// The cluster's Service IP ranges of the family (ServiceCIDRs).
    pub service_cidrs: Vec<IpNet>,
    /// Loopback NodePorts are served by user-space listeners in this family.
    pub localhost_nodeports: bool,
    /// New connections are counted per Service port and destination kind.
    pub service_counters: bool,
}

/// The rules of `cluster-ips-check`, which sees new connections after DNAT: one still
/// addressed to a cluster IP used a port no Service serves and is rejected; one to any
/// other address of the Service ranges has no Service at all and is dropped.
pub fn cluster_ips_check_rules(settings: &FamilySettings) -> Vec<Rule> {
    let mut rules = vec![Rule::new([
        Stmt::InSet {
            key: vec![Sel::Daddr],
            set: MapId::ClusterIps.name(),
            negate: false,
        },
        Stmt::Reject,
    ])];
    if !settings.service_cidrs.is_empty() {
        rules.push(Rule::new([
            Stmt::AddrIn {
                sel: Sel::Daddr,
                nets: settings.service_cidrs.clone(),
                negate: false,
            },
            Stmt::Verdict(Verdict::Drop),
        ]));
    }
    rules
}

/// The chain that holds [`cluster_ips_check_rules`].
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";

/// Where a full plan takes each port's endpoint slots from, so that a rewrite moves no
/// client: the plan programmed before, or (after a restart) the kernel's slot maps.
#[derive(Debug, Clone, Copy)]
pub enum PreviousSlots<'a> {
    None,
    Plan(&'a FamilyPlan),
    Adopted(&'a BTreeMap<ServicePortName, Slots>),
}

impl<'a> PreviousSlots<'a> {
    fn get(self, name: &ServicePortName) -> Option<&'a Slots> {
        match self {
            PreviousSlots::None => None,
            PreviousSlots::Plan(plan) => plan.ports.get(name).map(|p| &p.slots),
            PreviousSlots::Adopted(slots) => slots.get(name),
        }
    }
}

/// One family's table, as objects per Service port.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyPlan {
    pub settings: FamilySettings,
    /// The node the plan was made for (endpoint selection depends on it).
    pub node: NodeInfo,
    pub ports: BTreeMap<ServicePortName, PortPlan>,
    /// Who owns each destination: the port (whose name says who), shared with the state
    /// rather than a copy of its name.
    pub owners: HashMap<Destination, Arc<ServicePort>>,
    /// How many Service ports need each shared element (hairpin pairs, cluster IPs).
    /// A hash map: one entry per endpoint IP (~24 bytes each here, ~40 in a B-tree).
    pub shared_refs: HashMap<Shared, u32>,
    /// Pick classes whose chains exist (only a full rewrite drops unused ones).
    pub classes: BTreeSet<PickClass>,
}

impl FamilyPlan {
    pub fn family(&self) -> IpFamily {
        self.settings.family
    }

    /// Plans every Service port from scratch, with the table's elements (the hairpin
    /// set's aside), per map in the order of the ports (the kernel needs no order, and
    /// sorting ~250,000 elements was a tenth of a full sync). Conflicting destinations go
    /// to the port that sorts first; the others are reported. Slots are kept from `previous` (what the kernel
    /// held) so a full rewrite does not move clients.
    pub fn full(
        family: IpFamily,
        state: &ProxyState,
        config: &NftConfig,
        previous: PreviousSlots<'_>,
        warnings: &mut Vec<String>,
    ) -> (Self, Elements) {
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
            service_cidrs: state.service_cidrs_of(family),
            localhost_nodeports: config.localhost_nodeports.contains(&family),
            service_counters: config.service_counters,
        };
        let mut plan = FamilyPlan {
            settings,
            node: state.node.clone(),
            ports: BTreeMap::new(),
            owners: HashMap::new(),
            shared_refs: HashMap::new(),
            classes: BTreeSet::new(),
        };
        let mut elements = Elements::new();
        for (name, port) in &state.services {
            let eps = state.endpoints_of(name);
            let previous_slots = previous.get(name);
            let mut planned = plan_port(
                &plan.settings,
                port,
                eps,
                &plan.node,
                previous_slots,
                |d| plan.owns(d, name),
                warnings,
            );
            for e in std::mem::take(&mut planned.elements) {
                elements.entry(e.map).or_default().push(e);
            }
            plan.insert(name.clone(), planned, source_of(state, name, port));
        }
        (plan, elements)
    }

    /// The elements of one port, derived again from what it was planned from: the same
    /// slots and destinations give the same elements.
    pub fn port_elements(&self, port: &PortPlan) -> Vec<Element> {
        let source = &port.source;
        let endpoints = source.endpoints.as_deref().map_or(&[][..], Vec::as_slice);
        plan_port(
            &self.settings,
            &source.port,
            endpoints,
            &self.node,
            Some(&port.slots),
            |d| port.destinations.contains(d),
            &mut Vec::new(),
        )
        .elements
    }

    /// Whether destination `d` is free or already `name`'s.
    fn owns(&self, d: &Destination, name: &ServicePortName) -> bool {
        self.owners.get(d).is_none_or(|o| o.name == *name)
    }

    /// Keeps a planned port; one with nothing in this family is not kept.
    fn insert(&mut self, name: ServicePortName, planned: PortDraft, source: PortSource) {
        let Some(planned) = planned.pack(source) else {
            return;
        };
        for d in &planned.destinations {
            self.owners
                .insert(d.clone(), Arc::clone(&planned.source.port));
        }
        for shared in planned.shared() {
            *self.shared_refs.entry(shared).or_default() += 1;
        }
        self.classes.extend(planned.classes.iter().copied());
        self.ports.insert(name, planned);
    }

    fn remove(&mut self, name: &ServicePortName) {
        let Some(old) = self.ports.remove(name) else {
            return;
        };
        for d in &old.destinations {
            if self.owners.get(d).is_some_and(|o| o.name == *name) {
                self.owners.remove(d);
            }
        }
        for shared in old.shared() {
            if let Some(refs) = self.shared_refs.get_mut(&shared) {
                *refs -= 1;
                if *refs == 0 {
                    self.shared_refs.remove(&shared);
                }
            }
        }
    }

    /// The elements several ports share (hairpin pairs, cluster IPs) of the maps
    /// `wanted` names, per map, sorted. Only what is loaded is built: the hairpin set
    /// has an element per endpoint.
    pub fn shared_elements(&self, wanted: impl Fn(MapId) -> bool) -> Elements {
        let mut out = Elements::new();
        for shared in self.shared_refs.keys().filter(|s| wanted(s.map())) {
            let e = shared.element();
            out.entry(e.map).or_default().push(e);
        }
        for elements in out.values_mut() {
            elements.sort_unstable();
        }
        out
    }
}

/// Resolves `--detect-local-mode` for one family; `None` when nothing is local.
fn local_match(
    family: IpFamily,
    detector: &LocalDetector,
    state: &ProxyState,
) -> Option<LocalMatch> {
    let cidr_match = |nets: &[IpNet]| {
        let list: Vec<IpNet> = nets
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .map(IpNet::trunc)
            .collect();
        let matching = |negate| Stmt::AddrIn {
            sel: Sel::Saddr,
            nets: list.clone(),
            negate,
        };
        (!list.is_empty()).then(|| LocalMatch {
            is_local: matching(false),
            not_local: matching(true),
        })
    };
    let iifname = |name: &str, prefix| LocalMatch {
        is_local: Stmt::Iifname {
            name: name.to_string(),
            prefix,
            negate: false,
        },
        not_local: Stmt::Iifname {
            name: name.to_string(),
            prefix,
            negate: true,
        },
    };
    match detector {
        LocalDetector::None => None,
        LocalDetector::ClusterCidr(nets) => cidr_match(nets),
        LocalDetector::NodeCidr => cidr_match(&state.node.pod_cidrs),
        // Interface names are validated at start-up (no quotes or spaces).
        LocalDetector::BridgeInterface(name) => Some(iifname(name, false)),
        LocalDetector::InterfaceNamePrefix(prefix) => Some(iifname(prefix, true)),
    }
}

/// What changes between two plans of one family, as nftables would apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Pick chains that did not exist, and the maps and sets they need that did not.
    pub new_classes: BTreeSet<PickClass>,
    pub new_objects: BTreeSet<ClassObject>,
    pub new_slot_chains: BTreeSet<(KeyKind, Role, usize)>,
    pub deleted: BTreeSet<Element>,
    pub added: BTreeSet<Element>,
    /// Chains that did not exist.
    pub chains_added: Vec<Chain>,
    /// Chains that exist with other rules: flushed and refilled.
    pub chains_changed: Vec<Chain>,
    pub chains_deleted: Vec<String>,
    /// Named counters of Service ports that are new (created before the elements that
    /// name them) or gone (deleted after them).
    pub counters_added: BTreeSet<CounterName>,
    pub counters_deleted: BTreeSet<CounterName>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.elements_only()
            && self.deleted.is_empty()
            && self.added.is_empty()
            && self.counters_added.is_empty()
            && self.counters_deleted.is_empty()
    }

    /// Whether only elements change (no chain, map or set is created or removed).
    pub fn elements_only(&self) -> bool {
        self.new_classes.is_empty()
            && self.new_objects.is_empty()
            && self.new_slot_chains.is_empty()
            && self.chains_added.is_empty()
            && self.chains_changed.is_empty()
            && self.chains_deleted.is_empty()
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
    let cidrs = state.service_cidrs_of(plan.family());
    if cidrs != plan.settings.service_cidrs {
        plan.settings.service_cidrs = cidrs;
        delta.chains_changed.push(Chain {
            name: CLUSTER_IPS_CHECK.into(),
            comment: String::new(),
            rules: cluster_ips_check_rules(&plan.settings),
        });
    }
    let shared_before: BTreeSet<Shared> = names
        .iter()
        .filter_map(|n| plan.ports.get(n))
        .flat_map(PortPlan::shared)
        .collect();
    let classes_before = plan.classes.clone();
    let mut old_elements: BTreeSet<Element> = BTreeSet::new();
    let mut old_chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut old_slots: BTreeMap<&ServicePortName, Slots> = BTreeMap::new();
    for name in names {
        if let Some(old) = plan.ports.get(name) {
            old_elements.extend(plan.port_elements(old));
            old_chains.extend(old.chains.iter().map(|c| (c.name.clone(), c.clone())));
            old_slots.insert(name, old.slots.clone());
        }
        plan.remove(name);
    }
    let mut new_elements: BTreeSet<Element> = BTreeSet::new();
    let mut new_chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut shared_touched = shared_before.clone();
    for name in names {
        let Some(port) = state.services.get(name) else {
            continue;
        };
        let eps = state.endpoints_of(name);
        let mut planned = plan_port(
            &plan.settings,
            port,
            eps,
            &plan.node,
            old_slots.get(name),
            |d| plan.owns(d, name),
            warnings,
        );
        new_elements.extend(std::mem::take(&mut planned.elements));
        new_chains.extend(planned.chains.iter().map(|c| (c.name.clone(), c.clone())));
        shared_touched.extend(planned.shared());
        plan.insert(name.clone(), planned, source_of(state, name, port));
    }
    delta.new_classes = plan.classes.difference(&classes_before).copied().collect();
    if !delta.new_classes.is_empty() {
        let before = class_objects(&classes_before);
        delta.new_objects = class_objects(&plan.classes)
            .difference(&before)
            .copied()
            .collect();
        let chains_before = slot_chains(&classes_before);
        delta.new_slot_chains = slot_chains(&plan.classes)
            .difference(&chains_before)
            .copied()
            .collect();
    }
    delta.deleted = old_elements.difference(&new_elements).cloned().collect();
    delta.added = new_elements.difference(&old_elements).cloned().collect();
    // Counter names are per port, so the changed ports' old and new elements tell.
    let counters_before = counter_names(&old_elements);
    let counters_after = counter_names(&new_elements);
    delta.counters_added = counters_after
        .difference(&counters_before)
        .copied()
        .collect();
    delta.counters_deleted = counters_before
        .difference(&counters_after)
        .copied()
        .collect();
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
    // Shared elements: compare presence before and after for the touched ones.
    for shared in shared_touched {
        let was = shared_before.contains(&shared) || shared_elsewhere(plan, shared, names);
        let is = plan.shared_refs.contains_key(&shared);
        if was && !is {
            delta.deleted.insert(shared.element());
        } else if !was && is {
            delta.added.insert(shared.element());
        }
    }
    delta
}

/// What `name` is planned from in `state`.
fn source_of(state: &ProxyState, name: &ServicePortName, port: &Arc<ServicePort>) -> PortSource {
    PortSource {
        port: Arc::clone(port),
        endpoints: state.endpoints.get(name).cloned(),
    }
}

/// Whether a Service port outside `names` needs `shared`.
fn shared_elsewhere(plan: &FamilyPlan, shared: Shared, names: &BTreeSet<ServicePortName>) -> bool {
    let refs = plan.shared_refs.get(&shared).map_or(0, |&n| n as usize);
    let ours = names
        .iter()
        .filter_map(|n| plan.ports.get(n))
        .filter(|p| p.shared().any(|s| s == shared))
        .count();
    refs > ours
}

/// The counters the elements name (values of the counter maps).
pub fn counter_names<'a>(elements: impl IntoIterator<Item = &'a Element>) -> BTreeSet<CounterName> {
    elements
        .into_iter()
        .filter_map(|e| match &e.value {
            Some(Value::Counter(name)) => Some(*name),
            _ => None,
        })
        .collect()
}

/// The named counter of a Service port's new connections of one destination kind:
/// `svc-<hash of the port's name>-<kind>`, so no name from the API reaches the kernel,
/// and the same after a restart, so an adopted table keeps counting. Held as the hash
/// and the kind and spelled out only where it is sent or shown: a full sync names tens
/// of thousands of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterName {
    // Ordered as the names are: fixed-width hex, then the kind's word.
    hash: u64,
    kind: &'static str,
}

/// Longest spelling: `svc-` + 16 hex digits + `-external-ip`.
pub const COUNTER_NAME_MAX: usize = 32;

impl CounterName {
    pub fn new(port: &ServicePortName, kind: DestinationKind) -> CounterName {
        CounterName::of_port(port_hash(port), kind)
    }

    /// With the port's hash ([`port_hash`]) already computed, as for each of its kinds.
    pub fn of_port(hash: u64, kind: DestinationKind) -> CounterName {
        let kind = match kind {
            DestinationKind::ClusterIp => "cluster-ip",
            DestinationKind::NodePort => "nodeport",
            DestinationKind::ExternalIp => "external-ip",
            DestinationKind::LoadBalancerIp => "lb-ip",
        };
        CounterName { hash, kind }
    }

    /// A Service port's counter as the kernel names it; `None` for any other name.
    pub fn parse(name: &str) -> Option<CounterName> {
        let rest = name.strip_prefix("svc-")?;
        let (hex, kind) = (rest.get(..16)?, rest.get(16..)?.strip_prefix('-')?);
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let hash = u64::from_str_radix(hex, 16).ok()?;
        DestinationKind::ALL
            .into_iter()
            .map(|k| CounterName::of_port(hash, k))
            .find(|c| c.kind == kind)
    }

    /// The name, spelled into `buf` (no allocation per element when encoding).
    pub fn spell<'b>(&self, buf: &'b mut [u8; COUNTER_NAME_MAX]) -> &'b str {
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // Cannot fail: the longest name fits the buffer.
        let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{self}"));
        let len = cursor.position() as usize;
        std::str::from_utf8(&buf[..len]).unwrap_or_default()
    }
}

impl fmt::Display for CounterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "svc-{:016x}-{}", self.hash, self.kind)
    }
}

/// The hash of a Service port's name that its counters' names carry.
pub fn port_hash(port: &ServicePortName) -> u64 {
    let mut h = Fnv::default();
    // Cannot fail: writing to a hasher.
    let _ = fmt::Write::write_fmt(&mut h, format_args!("{port}"));
    h.end_part();
    h.0
}

/// The named counter of a Service port's new connections of one destination kind, as
/// the kernel names it ([`CounterName`]).
pub fn service_counter_name(port: &ServicePortName, kind: DestinationKind) -> String {
    CounterName::new(port, kind).to_string()
}

/// FNV-1a, fed bytes or formatted text (no string built to hash a name).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Parts are separated by a NUL, which no part holds.
    fn end_part(&mut self) {
        self.bytes(&[0]);
    }
}

impl fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.bytes(s.as_bytes());
        Ok(())
    }
}

/// A stable, short, syntax-safe identifier: FNV-1a over the parts, as 16 hex digits.
fn hash_id(parts: &[&str]) -> String {
    let mut h = Fnv::default();
    for part in parts {
        h.bytes(part.as_bytes());
        h.end_part();
    }
    format!("{:016x}", h.0)
}

/// A chain comment: the port's name, restricted to characters that cannot end a string.
fn safe_comment(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | ':' | '-' | '.' | '_'))
        .take(120)
        .collect()
}

fn plan_port(
    settings: &FamilySettings,
    port: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeInfo,
    previous_slots: Option<&Slots>,
    may_claim: impl Fn(&Destination) -> bool,
    warnings: &mut Vec<String>,
) -> PortDraft {
    let family = settings.family;
    let mut out = PortDraft::default();
    let Some(cluster_ip) = port.cluster_ip(family) else {
        return out;
    };
    let proto = port.protocol();
    let selection = select(port, endpoints, family, node);
    out.cluster_ip = Some(cluster_ip);

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
                key: ip_key(*ip, proto, port.port),
                value: None,
            });
        }
        if let Some(np) = node_port {
            out.elements.push(Element {
                map: MapId::NoEndpointNodeports,
                key: nodeport_key(proto, np),
                value: None,
            });
        }
    } else {
        plan_picks(
            port,
            &selection,
            &claimed_ips,
            node_port,
            previous_slots,
            &mut out,
        );
        if settings.service_counters {
            plan_counters(port, &claimed_ips, node_port, &mut out);
        }
    }
    if let Some(np) = node_port.filter(|_| settings.localhost_nodeports) {
        if !serves_localhost_nodeport(port, &selection) {
            out.elements.push(Element {
                map: MapId::LocalhostNodeportRejects,
                key: nodeport_key(proto, np),
                value: None,
            });
        }
    }
    plan_firewall(settings, port, &claimed_ips, node, &mut out);

    if selection.has_any && !out.destinations.is_empty() {
        let mut used: Vec<IpAddr> = selection
            .cluster
            .iter()
            .chain(selection.local.iter())
            .map(|e| e.ip)
            .collect();
        used.sort_unstable();
        used.dedup();
        out.endpoint_ips = used;
    }
    out.elements.sort();
    out.elements.dedup();
    out
}

/// Gives each endpoint an affinity slot in 0..N: the one it had if still in range, else a
/// free one. Slots name shared sets, so keeping them keeps the clients an endpoint has;
/// when the Service shrinks, only the endpoints beyond the new count move.
fn assign_slots(
    previous: Option<&[((IpAddr, u16), usize)]>,
    endpoints: &[&Endpoint],
) -> Box<[SlotOf]> {
    let wanted: BTreeSet<(IpAddr, u16)> = endpoints.iter().map(|e| (e.ip, e.port)).collect();
    let n = wanted.len();
    let mut slots: BTreeMap<(IpAddr, u16), usize> = previous
        .into_iter()
        .flatten()
        .filter(|(ep, slot)| wanted.contains(ep) && *slot < n)
        .map(|(ep, slot)| (*ep, *slot))
        .collect();
    let taken: BTreeSet<usize> = slots.values().copied().collect();
    let mut free = (0..n).filter(|s| !taken.contains(s));
    for ep in wanted {
        if slots.contains_key(&ep) {
            continue;
        }
        if let Some(slot) = free.next() {
            slots.insert(ep, slot);
        }
    }
    slots.into_iter().collect()
}

fn push_verdict(out: &mut PortDraft, map: MapId, key: &Fields, verdict: Value) {
    out.elements.push(Element {
        map,
        key: *key,
        value: Some(verdict),
    });
}

/// The verdict that sends destination `key` to one of its `role` endpoints (`drop` when
/// there is none), adding the endpoint elements and the pick class it needs.
fn pick(
    port: &ServicePort,
    eps: &[&Endpoint],
    kind: KeyKind,
    key: &Fields,
    role: Role,
    previous_slots: Option<&Slots>,
    out: &mut PortDraft,
) -> Value {
    if eps.is_empty() {
        return Value::Drop;
    }
    let at = match out.slots.iter().position(|(r, _)| *r == role) {
        Some(at) => at,
        None => {
            let previous = previous_slots
                .and_then(|s| s.iter().find(|(r, _)| *r == role))
                .map(|(_, s)| &s[..]);
            out.slots.push((role, assign_slots(previous, eps)));
            out.slots.len() - 1
        }
    };
    let slots = &out.slots[at].1;
    let n = slots.len();
    for ((ip, ep_port), slot) in slots.iter() {
        out.elements.push(Element {
            map: MapId::Slot(kind, role, *slot),
            key: *key,
            value: Some(endpoint_value(*ip, *ep_port)),
        });
    }
    let class = PickClass {
        key: kind,
        role,
        n,
        affinity: port.session_affinity_timeout,
    };
    if !out.classes.contains(&class) {
        out.classes.push(class);
    }
    Value::Goto(class.chain())
}

/// Elements of a port with endpoints: for each destination its entry chain, its pick
/// chain(s) and the endpoints they choose from.
fn plan_picks(
    port: &ServicePort,
    selection: &Selection<'_>,
    ips: &[(IpAddr, bool)],
    node_port: Option<u16>,
    previous_slots: Option<&Slots>,
    out: &mut PortDraft,
) {
    let proto = port.protocol();
    let internal = Role::of(port.internal_traffic_policy);
    let external = Role::of(port.external_traffic_policy);
    let endpoints_of = |role: Role| match role {
        Role::All => &selection.cluster,
        Role::Local => &selection.local,
    };
    for (ip, is_external) in ips {
        let key = ip_key(*ip, proto, port.port);
        let (role, entry) = match (is_external, external) {
            (false, _) => (internal, "internal"),
            (true, Role::All) => (Role::All, "external"),
            (true, Role::Local) => (Role::Local, "external-local"),
        };
        let verdict = pick(
            port,
            endpoints_of(role),
            KeyKind::Ip,
            &key,
            role,
            previous_slots,
            out,
        );
        push_verdict(out, MapId::Picks(KeyKind::Ip), &key, verdict);
        if entry == "external-local" {
            // Pods and the node reach an external address of a Local Service on all of
            // its endpoints, whatever the internal policy (upstream's short-circuit).
            let eps = endpoints_of(Role::All);
            let verdict = pick(port, eps, KeyKind::Ip, &key, Role::All, previous_slots, out);
            push_verdict(out, MapId::ShortCircuits(KeyKind::Ip), &key, verdict);
        }
        push_verdict(out, MapId::ServiceIps, &key, Value::Goto(entry.into()));
    }
    if let Some(np) = node_port {
        let key = nodeport_key(proto, np);
        let verdict = pick(
            port,
            endpoints_of(external),
            KeyKind::NodePort,
            &key,
            external,
            previous_slots,
            out,
        );
        push_verdict(out, MapId::Picks(KeyKind::NodePort), &key, verdict);
        let entry = match external {
            Role::All => "nodeport",
            Role::Local => {
                let eps = endpoints_of(Role::All);
                let verdict = pick(
                    port,
                    eps,
                    KeyKind::NodePort,
                    &key,
                    Role::All,
                    previous_slots,
                    out,
                );
                push_verdict(out, MapId::ShortCircuits(KeyKind::NodePort), &key, verdict);
                "nodeport-local"
            }
        };
        push_verdict(
            out,
            MapId::ServiceNodeports,
            &key,
            Value::Goto(entry.into()),
        );
    }
}

/// Each destination in `service-ips` / `service-nodeports` names its port's counter of
/// that destination kind (external IPs that are also load-balancer IPs count as the
/// latter).
fn plan_counters(
    port: &ServicePort,
    ips: &[(IpAddr, bool)],
    node_port: Option<u16>,
    out: &mut PortDraft,
) {
    let proto = port.protocol();
    // One hash per port, whatever its number of destinations.
    let hash = port_hash(&port.name);
    let counter = |kind| Some(Value::Counter(CounterName::of_port(hash, kind)));
    for (ip, is_external) in ips {
        let kind = match (is_external, port.load_balancer_ips.contains(ip)) {
            (false, _) => DestinationKind::ClusterIp,
            (true, true) => DestinationKind::LoadBalancerIp,
            (true, false) => DestinationKind::ExternalIp,
        };
        out.elements.push(Element {
            map: MapId::Counters(KeyKind::Ip),
            key: ip_key(*ip, proto, port.port),
            value: counter(kind),
        });
    }
    if let Some(np) = node_port {
        out.elements.push(Element {
            map: MapId::Counters(KeyKind::NodePort),
            key: nodeport_key(proto, np),
            value: counter(DestinationKind::NodePort),
        });
    }
}

/// `loadBalancerSourceRanges`: only listed sources reach the load-balancer IPs (and the
/// load-balancer IPs themselves when a range holds the node's IP, as upstream).
fn plan_firewall(
    settings: &FamilySettings,
    port: &ServicePort,
    ips: &[(IpAddr, bool)],
    node: &NodeInfo,
    out: &mut PortDraft,
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
    let proto = port.protocol();
    let mut ranges: Vec<IpNet> = port
        .load_balancer_source_ranges
        .iter()
        .filter(|n| IpFamily::of_net(n) == settings.family)
        .copied()
        .collect();
    if port.admits_load_balancer_ips_as_sources(node.primary_ip(settings.family)) {
        ranges.extend(lb_ips.iter().map(|ip| IpNet::from(**ip)));
    }
    let id = hash_id(&[&port.name.to_string(), "firewall"]);
    let chain = format!("fw-{id}");
    let drop = Stmt::Verdict(Verdict::Drop);
    let rule = if ranges.is_empty() {
        // Ranges only of the other family: nobody of this family may connect.
        Rule::new([drop])
    } else {
        Rule::new([
            Stmt::AddrIn {
                sel: Sel::Saddr,
                nets: ranges,
                negate: true,
            },
            drop,
        ])
    };
    out.chains.push(Chain {
        name: chain.clone(),
        comment: safe_comment(&port.name.to_string()),
        rules: vec![rule],
    });
    for ip in lb_ips {
        out.elements.push(Element {
            map: MapId::FirewallIps,
            key: ip_key(*ip, proto, port.port),
            value: Some(Value::Goto(chain.clone())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_core::model::ServiceName;

    fn port(name: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName {
                namespace: "ns".into(),
                name: "web".into(),
            },
            port: name.into(),
            protocol: Protocol::Tcp,
        }
    }

    /// Counter names reach the kernel and must stay what tables already hold (restarts
    /// adopt them): `svc-` + FNV-1a of the port's name + `-` + the kind's word.
    #[test]
    fn counter_names_are_spelled_parsed_and_ordered_as_the_kernel_names() {
        let mut names = Vec::new();
        for p in ["", "http", "https-9443"] {
            let text = port(p).to_string();
            for kind in DestinationKind::ALL {
                let c = CounterName::new(&port(p), kind);
                let word = match kind {
                    DestinationKind::ClusterIp => "cluster-ip",
                    DestinationKind::NodePort => "nodeport",
                    DestinationKind::ExternalIp => "external-ip",
                    DestinationKind::LoadBalancerIp => "lb-ip",
                };
                let spelled = format!("svc-{}-{word}", hash_id(&[&text]));
                assert_eq!(c.to_string(), spelled);
                assert_eq!(c.spell(&mut [0; COUNTER_NAME_MAX]), spelled);
                assert_eq!(CounterName::parse(&spelled), Some(c));
                names.push(c);
            }
        }
        assert_eq!(
            CounterName::new(&port("http"), DestinationKind::NodePort).to_string(),
            "svc-a8b117d7f34bba09-nodeport"
        );
        for bad in [
            "svc-0123456789abcdef-other",
            "svc-0123456789ABCDEF-nodeport",
            "svc-0123-nodeport",
            "localhost-nodeports-tcp",
        ] {
            assert_eq!(CounterName::parse(bad), None, "{bad}");
        }
        // Sets of them iterate (and so create counters) in the names' order.
        let mut by_text = names.clone();
        by_text.sort_by_key(ToString::to_string);
        names.sort();
        assert_eq!(names, by_text);
    }
}
