//! The proxy's own view of Services and endpoints: what every backend programs.
//!
//! Built from API objects by the pure functions in [`crate::convert`]; backends never look
//! at raw Kubernetes objects.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// An IP family, as a Service's `ipFamilies` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
}

/// The transport protocols a Service port can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`); an absent protocol means TCP.
    pub fn from_api(value: Option<&str>) -> Option<Protocol> {
        match value {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    /// Lower-case name, as nftables and iptables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a Service. The strings are shared (`Arc<str>`): a name is held by
/// the tracker, the state's maps, the planners and the debug state, and copied on every
/// change of the state, so a clone costs reference counts, not allocations.
#[derive(Debug, Clone, Eq)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// Orders two shared strings, equal at once when they are the same string: the maps of
/// a state and of its copy share their keys, and walks of both side by side compare
/// tens of thousands of them.
fn cmp_shared(a: &Arc<str>, b: &Arc<str>) -> Ordering {
    if Arc::ptr_eq(a, b) {
        Ordering::Equal
    } else {
        a.cmp(b)
    }
}

/// [`cmp_shared`]'s equality (`Arc<str>`'s own compares the bytes even of one string).
fn eq_shared(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl PartialEq for ServiceName {
    fn eq(&self, other: &Self) -> bool {
        eq_shared(&self.name, &other.name) && eq_shared(&self.namespace, &other.namespace)
    }
}

// By the strings, as equality goes.
impl Hash for ServiceName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.namespace.hash(state);
        self.name.hash(state);
    }
}

impl Ord for ServiceName {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_shared(&self.namespace, &other.namespace)
            .then_with(|| cmp_shared(&self.name, &other.name))
    }
}

impl PartialOrd for ServiceName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl ServiceName {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        ServiceName {
            namespace: namespace.as_ref().into(),
            name: name.as_ref().into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: the unit every backend programs.
#[derive(Debug, Clone, Eq)]
pub struct ServicePortName {
    pub service: ServiceName,
    /// The port's name; empty for a Service's single unnamed port.
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl PartialEq for ServicePortName {
    fn eq(&self, other: &Self) -> bool {
        self.protocol == other.protocol
            && eq_shared(&self.port, &other.port)
            && self.service == other.service
    }
}

impl Hash for ServicePortName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.service.hash(state);
        self.port.hash(state);
        self.protocol.hash(state);
    }
}

/// Service, then port name, then protocol (see [`ports_of_service`]).
impl Ord for ServicePortName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.service
            .cmp(&other.service)
            .then_with(|| cmp_shared(&self.port, &other.port))
            .then_with(|| self.protocol.cmp(&other.protocol))
    }
}

impl PartialOrd for ServicePortName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.service, self.protocol)
        } else {
            write!(f, "{}:{}/{}", self.service, self.port, self.protocol)
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// Everything the datapath needs to know about one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// At most one per family, primary family first.
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of LoadBalancer Services.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `Some(timeout in seconds)` for `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// A plain ClusterIP port: no NodePort, external addresses, affinity or `Local`
    /// policies; fields can be set afterwards.
    pub fn new(name: ServicePortName, cluster_ips: Vec<IpAddr>, port: u16) -> Self {
        ServicePort {
            name,
            cluster_ips,
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.name.protocol
    }

    /// The IP families this port is programmed in: those of its cluster IPs.
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.cluster_ips.iter().map(IpFamily::of)
    }

    pub fn cluster_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
    }

    /// Whether packets whose source is one of this port's load-balancer IPs pass its
    /// `loadBalancerSourceRanges`, as upstream decides: only when a range holds the node's
    /// own IP (a VIP bound on the node loops the node's requests back with the VIP as
    /// their source).
    pub fn admits_load_balancer_ips_as_sources(&self, node_ip: IpAddr) -> bool {
        self.load_balancer_source_ranges
            .iter()
            .any(|range| range.contains(&node_ip))
    }

    /// External destinations (externalIPs and load-balancer IPs) of one family.
    pub fn external_destinations(&self, family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
        self.external_ips
            .iter()
            .chain(self.load_balancer_ips.iter())
            .copied()
            .filter(move |ip| IpFamily::of(ip) == family)
    }
}

/// One backend of a Service port, from an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Runs on this node.
    pub is_local: bool,
    /// Topology hints, when the EndpointSlice has any. Boxed: most endpoints have none,
    /// and a cluster holds hundreds of thousands of endpoints (32 bytes each, not 72).
    pub hints: Option<Box<Hints>>,
}

/// The topology hints of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    /// Zones this endpoint is hinted for (topology-aware routing).
    pub zones: Vec<String>,
    /// Nodes this endpoint is hinted for (`trafficDistribution: PreferSameNode`).
    pub nodes: Vec<String>,
}

impl Endpoint {
    /// A ready endpoint on another node, without topology hints.
    pub fn ready(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            hints: None,
        }
    }

    /// Zones this endpoint is hinted for.
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// Nodes this endpoint is hinted for.
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.ip)
    }
}

/// What the proxy knows about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    pub pod_cidrs: Vec<IpNet>,
    /// InternalIPs first, then ExternalIPs, each in the Node's order.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// The node's IP of a family as upstream's node-IP detection settles it: the Node's
    /// first address of that family, else loopback (what upstream falls back to when the
    /// Node has none).
    pub fn primary_ip(&self, family: IpFamily) -> IpAddr {
        self.addresses
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
            .unwrap_or(match family {
                IpFamily::V4 => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpFamily::V6 => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            })
    }
}

/// The desired state: every Service port and its endpoints. Immutable once handed to a
/// backend (the tracker copies on write), so a sync never sees a half-applied change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyState {
    pub services: BTreeMap<ServicePortName, Arc<ServicePort>>,
    pub endpoints: BTreeMap<ServicePortName, Arc<Vec<Endpoint>>>,
    pub node: NodeInfo,
    /// The cluster's Service IP ranges (`ServiceCIDR` objects' `spec.cidrs`), sorted and
    /// without duplicates. Traffic to an address in them that no Service holds is dropped.
    pub service_cidrs: Vec<IpNet>,
}

impl ProxyState {
    /// The Service IP ranges of one family.
    pub fn service_cidrs_of(&self, family: IpFamily) -> Vec<IpNet> {
        self.service_cidrs
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .copied()
            .collect()
    }

    /// Every Service port with its endpoints, in name order: one pass over both maps,
    /// not a lookup per port (a sync's observers walk 50,000 ports after each change).
    pub fn ports_with_endpoints(
        &self,
    ) -> impl Iterator<
        Item = (
            &ServicePortName,
            &Arc<ServicePort>,
            Option<&Arc<Vec<Endpoint>>>,
        ),
    > {
        let mut endpoints = self.endpoints.iter().peekable();
        self.services.iter().map(move |(name, port)| {
            while endpoints.next_if(|(n, _)| *n < name).is_some() {}
            let eps = endpoints.next_if(|(n, _)| *n == name).map(|(_, e)| e);
            (name, port, eps)
        })
    }

    /// The ports whose Service or endpoints are not the very ones `old` holds (every
    /// port without `old`): the tracker replaces what changes, so pointers tell.
    pub fn ports_replaced_since<'a>(
        &'a self,
        old: Option<&'a ProxyState>,
    ) -> impl Iterator<Item = &'a ServicePortName> {
        let mut old_ports = old
            .into_iter()
            .flat_map(ProxyState::ports_with_endpoints)
            .peekable();
        self.ports_with_endpoints()
            .filter(move |(name, port, eps)| {
                while old_ports.next_if(|(n, ..)| n < name).is_some() {}
                let same =
                    old_ports
                        .next_if(|(n, ..)| n == name)
                        .is_some_and(|(_, old_port, old_eps)| {
                            let eps_same = match (old_eps, eps) {
                                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                                (None, None) => true,
                                _ => false,
                            };
                            eps_same && Arc::ptr_eq(old_port, port)
                        });
                !same
            })
            .map(|(name, ..)| name)
    }

    pub fn endpoints_of(&self, name: &ServicePortName) -> &[Endpoint] {
        self.endpoints
            .get(name)
            .map(|eps| eps.as_slice())
            .unwrap_or(&[])
    }

    /// All ports of one Service, in order.
    pub fn ports_of<'a>(
        &'a self,
        service: &'a ServiceName,
    ) -> impl Iterator<Item = (&'a ServicePortName, &'a Arc<ServicePort>)> + 'a {
        ports_of_service(&self.services, service)
    }
}

/// The entries of one Service's ports in a map by port name: a range, not a walk of
/// the map (a sync looks up the changed Services among tens of thousands of ports).
pub fn ports_of_service<'a, V>(
    map: &'a BTreeMap<ServicePortName, V>,
    service: &'a ServiceName,
) -> impl Iterator<Item = (&'a ServicePortName, &'a V)> + 'a {
    // Names sort by Service first; within one, no port name sorts before the empty one
    // and no protocol before TCP.
    let first = ServicePortName {
        service: service.clone(),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    map.range(first..)
        .take_while(move |(k, _)| &k.service == service)
}

/// How the proxy tells traffic from this cluster's pods apart from everything else
/// (`--detect-local-mode`): local traffic to a cluster IP is not masqueraded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// Nothing is known to be local (no `--cluster-cidr`).
    #[default]
    None,
    /// `ClusterCIDR`: sources inside these CIDRs.
    ClusterCidr(Vec<IpNet>),
    /// `NodeCIDR`: sources inside this node's pod CIDRs (from its Node object).
    NodeCidr,
    /// `BridgeInterface`: packets arriving on this bridge.
    BridgeInterface(String),
    /// `InterfaceNamePrefix`: packets arriving on interfaces whose name starts so.
    InterfaceNamePrefix(String),
}

/// `--nodeport-addresses` as written: CIDRs and, since upstream v1.37, the keywords
/// `primary` (the node's primary IPs), `localhost` (the loopback addresses) and `all`,
/// in any combination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePortAddresses {
    pub cidrs: Vec<IpNet>,
    pub primary: bool,
    pub all: bool,
}

impl NodePortAddresses {
    pub const PRIMARY: &'static str = "primary";
    pub const LOCALHOST: &'static str = "localhost";
    pub const ALL: &'static str = "all";

    /// Parses the list; an entry that is neither a keyword nor a CIDR is an error naming it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<NodePortAddresses, String> {
        let mut out = NodePortAddresses::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            match entry {
                Self::PRIMARY => out.primary = true,
                Self::ALL => out.all = true,
                Self::LOCALHOST => out.cidrs.extend(loopback_nets()),
                _ => out.cidrs.push(Self::parse_cidr(entry)?),
            }
        }
        Ok(out)
    }

    /// One CIDR entry, with the error a flag or config field reports.
    pub fn parse_cidr(entry: &str) -> Result<IpNet, String> {
        entry.parse().map_err(|_| {
            format!(
                "{entry:?} is neither a CIDR (e.g. 10.0.0.0/8) nor one of \"{}\", \"{}\", \"{}\"",
                Self::PRIMARY,
                Self::LOCALHOST,
                Self::ALL
            )
        })
    }

    /// The CIDRs the kernel rules match NodePorts on; empty (with `primary` unset) means
    /// every local address, which is what `all` asks for whatever else is listed.
    pub fn kernel_cidrs(&self) -> (Vec<IpNet>, bool) {
        if self.all {
            (Vec::new(), false)
        } else {
            (self.cidrs.clone(), self.primary)
        }
    }

    /// Families whose loopback address is named explicitly (by `localhost` or a CIDR
    /// inside the loopback range): upstream's condition for serving NodePorts on
    /// loopback in nftables mode. `all` alone, or `0.0.0.0/0`, does not count.
    pub fn loopback_families(&self) -> Vec<IpFamily> {
        let mut families: Vec<IpFamily> = self
            .cidrs
            .iter()
            .filter(|net| loopback_nets().iter().any(|lo| lo.contains(*net)))
            .map(IpFamily::of_net)
            .collect();
        families.sort();
        families.dedup();
        families
    }
}

/// The loopback ranges: `127.0.0.0/8` and `::1/128`.
pub fn loopback_nets() -> [IpNet; 2] {
    [
        IpNet::from(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(127, 0, 0, 0),
            8,
        )),
        IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ]
}

/// Resolves `--nodeport-addresses` for one family against what is known of the node:
/// `None` means every local address, `Some(empty)` none of this family. `primary` (the
/// nftables default upstream) is the node's first IP of the family from its Node object;
/// while the node's IPs are unknown NodePorts stay on every local address rather than
/// none.
pub fn nodeport_addresses(
    cidrs: &[IpNet],
    primary: bool,
    family: IpFamily,
    node: &NodeInfo,
) -> Option<Vec<IpNet>> {
    let mut nets: Vec<IpNet> = cidrs
        .iter()
        .filter(|c| IpFamily::of_net(c) == family)
        .map(IpNet::trunc)
        .collect();
    if primary {
        match node.addresses.iter().find(|ip| IpFamily::of(ip) == family) {
            Some(ip) => nets.push(IpNet::from(*ip)),
            None if node.addresses.is_empty() => return None,
            None => {}
        }
    } else if cidrs.is_empty() {
        return None;
    }
    Some(nets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn port_name(namespace: &str, name: &str, port: &str, protocol: u8) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new(namespace, name),
            port: port.into(),
            protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(protocol % 3)],
        }
    }

    fn spelled(n: &ServicePortName) -> (String, String, String, Protocol) {
        let s = &n.service;
        (
            s.namespace.to_string(),
            s.name.to_string(),
            n.port.to_string(),
            n.protocol,
        )
    }

    proptest! {
        /// Names order and compare equal as their strings do, whether they share the
        /// strings or not; a Service's ports are exactly the range `ports_of_service`
        /// returns.
        #[test]
        fn names_order_by_their_strings_and_a_services_ports_are_a_range(
            names in prop::collection::vec(("[ab]{0,2}", "[ab-]{1,3}", "[ab]{0,2}", 0u8..3), 1..40),
        ) {
            let names: Vec<ServicePortName> =
                names.iter().map(|(ns, n, p, proto)| port_name(ns, n, p, *proto)).collect();
            for a in &names {
                prop_assert_eq!(a.cmp(a), Ordering::Equal);
                for b in &names {
                    prop_assert_eq!(a.cmp(b), spelled(a).cmp(&spelled(b)), "{} vs {}", a, b);
                    prop_assert_eq!(a == b, spelled(a) == spelled(b), "{} vs {}", a, b);
                    prop_assert_eq!(a.cmp(&b.clone()), a.cmp(b));
                }
            }
            let map: BTreeMap<ServicePortName, ()> = names.iter().map(|n| (n.clone(), ())).collect();
            for a in &names {
                let found: Vec<&ServicePortName> =
                    ports_of_service(&map, &a.service).map(|(n, _)| n).collect();
                let want: Vec<&ServicePortName> =
                    map.keys().filter(|n| n.service == a.service).collect();
                prop_assert_eq!(found, want);
            }
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn nodeport_keywords_combine_with_cidrs() {
        let a = NodePortAddresses::parse(&["primary", "10.0.0.0/8", "localhost"]).unwrap();
        assert!(a.primary && !a.all);
        assert_eq!(a.cidrs, nets(&["10.0.0.0/8", "127.0.0.0/8", "::1/128"]));
        assert_eq!(a.loopback_families(), vec![IpFamily::V4, IpFamily::V6]);
        assert_eq!(a.kernel_cidrs(), (a.cidrs.clone(), true));
    }

    #[test]
    fn all_matches_every_address_and_names_no_loopback() {
        let a = NodePortAddresses::parse(&["all", "10.0.0.0/8"]).unwrap();
        assert_eq!(a.kernel_cidrs(), (Vec::new(), false));
        assert!(a.loopback_families().is_empty());
        let wide = NodePortAddresses::parse(&["0.0.0.0/0", "::/0"]).unwrap();
        assert!(wide.loopback_families().is_empty());
        let with_lo = NodePortAddresses::parse(&["all", "127.0.0.1/32"]).unwrap();
        assert_eq!(with_lo.loopback_families(), vec![IpFamily::V4]);
    }

    /// The one-pass walk pairs each port with exactly the endpoints a lookup finds,
    /// whichever names lack endpoints or have endpoints without a port.
    #[test]
    fn ports_with_endpoints_match_lookups() {
        let name = |n: &str| ServicePortName {
            service: ServiceName::new("ns", n),
            port: "".into(),
            protocol: Protocol::Tcp,
        };
        let mut state = ProxyState::default();
        for (i, n) in ["a", "c", "d", "f"].iter().enumerate() {
            let ip = format!("10.0.0.{i}").parse().unwrap();
            let port = ServicePort::new(name(n), vec![ip], 80);
            state.services.insert(name(n), Arc::new(port));
        }
        for n in ["b", "c", "f", "g"] {
            let ep = Endpoint::ready("10.1.0.1".parse().unwrap(), 80);
            state.endpoints.insert(name(n), Arc::new(vec![ep]));
        }
        let walked: Vec<(String, usize)> = state
            .ports_with_endpoints()
            .map(|(n, _, eps)| (n.service.name.to_string(), eps.map_or(0, |e| e.len())))
            .collect();
        let looked_up: Vec<(String, usize)> = state
            .services
            .keys()
            .map(|n| (n.service.name.to_string(), state.endpoints_of(n).len()))
            .collect();
        assert_eq!(walked, looked_up);
        assert_eq!(walked.iter().filter(|(_, n)| *n > 0).count(), 2);
    }

    #[test]
    fn unknown_entry_is_named_in_the_error() {
        let err = NodePortAddresses::parse(&["primary", "loopback"]).unwrap_err();
        assert!(err.contains("\"loopback\""), "{err}");
        assert!(err.contains("localhost"), "{err}");
    }
}
