//! Explaining a packet (issue #16): where the proxy's rules send one connection, step by
//! step, for every mode. Pure: a [`ProxyState`], the proxy's [`Settings`] and a [`Query`]
//! in, an [`Explanation`] out. The metrics server's `/debug/explain` and the
//! `kube-proxy explain --manifests` command both call [`explain`], so they cannot
//! disagree; which endpoints a destination may use comes from [`crate::select`], as
//! every backend's does.
//!
//! What the rules do, per mode (the backends' planners are the reference; the
//! end-to-end test `explain_agrees_with_packets` checks the two against real traffic):
//! * nftables and iptables: destinations are matched in Service-name order (the first
//!   Service claiming a destination keeps it); cluster IPs before NodePorts.
//!   `loadBalancerSourceRanges` drop other sources (nftables even when the Service has no
//!   endpoint; iptables only while it has some, else the reject comes first). A Service
//!   without any usable endpoint is rejected; one whose traffic may use none of them
//!   (a `Local` policy, none on this node) is dropped. Only nftables rejects a cluster
//!   IP's unused ports and drops the rest of the ServiceCIDRs. iptables'
//!   `--detect-local-mode=ClusterCIDR` uses the first CIDR of each family only.
//! * ipvs: virtual servers, no source ranges; cluster-IP traffic is masqueraded when its
//!   source is outside some `--cluster-cidr` of its family (or with
//!   `--masquerade-all`), NodePort traffic always, external and LB IPs never.
//! * userspace: a listener proxies the connection, so the endpoint always sees the
//!   node's address; endpoints are taken in turn; no source ranges, no SCTP.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{
    Endpoint, IpFamily, LocalDetector, Protocol, ProxyState, ServicePort, TrafficPolicy,
};
use crate::select::{select, serves_localhost_nodeport, Selection};

/// The proxy mode whose rules are explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Nftables,
    Iptables,
    Ipvs,
    Userspace,
}

impl Mode {
    pub fn from_name(name: &str) -> Option<Mode> {
        match name {
            "nftables" => Some(Mode::Nftables),
            "iptables" => Some(Mode::Iptables),
            "ipvs" => Some(Mode::Ipvs),
            "userspace" => Some(Mode::Userspace),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::Ipvs => "ipvs",
            Mode::Userspace => "userspace",
        }
    }
}

/// The proxy's settings that decide a packet's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--detect-local-mode` (ipvs: `ClusterCidr` of `--cluster-cidr`).
    pub local: LocalDetector,
    /// `--nodeport-addresses` CIDRs (see [`crate::model::NodePortAddresses::kernel_cidrs`]).
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses=primary`.
    pub nodeport_primary: bool,
    /// The families the proxy programs.
    pub families: Vec<IpFamily>,
    /// The node's own addresses as the kernel has them (`fib … type local`), where the
    /// proxy runs; besides these, the Node's addresses and loopback count as local.
    pub local_addresses: Vec<IpAddr>,
    /// nftables: families whose loopback NodePorts user-space listeners serve.
    pub localhost_nodeports: Vec<IpFamily>,
    /// iptables: `--iptables-localhost-nodeports` (NodePorts on 127.0.0.1).
    pub iptables_localhost_nodeports: bool,
}

impl Settings {
    /// Defaults of a mode: no detector, NodePorts on every local address.
    pub fn new(mode: Mode) -> Settings {
        Settings {
            mode,
            masquerade_all: false,
            local: LocalDetector::None,
            nodeport_cidrs: Vec::new(),
            nodeport_primary: false,
            families: vec![IpFamily::V4, IpFamily::V6],
            local_addresses: Vec::new(),
            localhost_nodeports: Vec::new(),
            iptables_localhost_nodeports: mode == Mode::Iptables,
        }
    }
}

/// One connection to explain: its first packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Query {
    pub src: IpAddr,
    #[serde(rename = "srcPort")]
    pub src_port: Option<u16>,
    pub dst: SocketAddr,
    pub proto: Protocol,
    /// The interface the packet arrives on (for interface-based `--detect-local-mode`).
    pub iif: Option<String>,
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a query cannot be explained: the caller's input, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("src {0:?} is not an IP address or IP:port")]
    Src(String),
    #[error("dst {0:?} is not IP:port (IPv6 as [addr]:port); the destination port is required")]
    Dst(String),
    #[error("proto {0:?} is not one of tcp, udp, sctp")]
    Proto(String),
    #[error("iif {0:?} is not an interface name (1 to 15 printable characters, no '/')")]
    Iif(String),
    #[error("src {src} and dst {dst} are of different IP families")]
    Families { src: IpAddr, dst: IpAddr },
    #[error("missing {0}")]
    Missing(&'static str),
}

impl Query {
    /// Parses what a user typed: `src` as `IP` or `IP:port`, `dst` as `IP:port`, `proto`
    /// as `tcp`, `udp` or `sctp` (any case).
    pub fn parse(
        src: &str,
        dst: &str,
        proto: &str,
        iif: Option<&str>,
    ) -> Result<Query, QueryError> {
        let (src, src_port) = match src.trim().parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => {
                let bare = src.trim().trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = bare.parse().map_err(|_| QueryError::Src(src.into()))?;
                (ip, None)
            }
        };
        let dst: SocketAddr = dst
            .trim()
            .parse()
            .map_err(|_| QueryError::Dst(dst.into()))?;
        let proto = match proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(QueryError::Proto(proto.into())),
        };
        let iif = match iif.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => {
                let valid =
                    name.len() <= 15 && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
                if !valid {
                    return Err(QueryError::Iif(name.into()));
                }
                Some(name.to_string())
            }
        };
        // An IPv4-mapped source talks IPv4.
        let src = canonical(src);
        let dst = SocketAddr::new(canonical(dst.ip()), dst.port());
        if IpFamily::of(&src) != IpFamily::of(&dst.ip()) {
            return Err(QueryError::Families { src, dst: dst.ip() });
        }
        Ok(Query {
            src,
            src_port,
            dst,
            proto,
            iif,
        })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where the packet ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Sent to one of `endpoints` (DNAT, a virtual server or a user-space listener).
    Forwarded,
    /// No rule of the proxy touches it: routed as it is.
    Untouched,
    /// Refused (ICMP unreachable or TCP reset): the client sees an error at once.
    Rejected,
    /// Dropped silently: the client times out.
    Dropped,
}

/// How the destination was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DestinationKind {
    #[serde(rename = "clusterIP")]
    ClusterIp,
    #[serde(rename = "externalIP")]
    ExternalIp,
    #[serde(rename = "loadBalancerIP")]
    LoadBalancerIp,
    #[serde(rename = "nodePort")]
    NodePort,
}

impl DestinationKind {
    fn words(self) -> &'static str {
        match self {
            DestinationKind::ClusterIp => "cluster IP",
            DestinationKind::ExternalIp => "external IP",
            DestinationKind::LoadBalancerIp => "load-balancer IP",
            DestinationKind::NodePort => "NodePort",
        }
    }
}

/// The Service port the destination belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub namespace: String,
    pub service: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
    pub kind: DestinationKind,
    /// The traffic policy that picks its endpoints (`Cluster` or `Local`).
    pub policy: &'static str,
}

/// One endpoint the connection may go to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub address: SocketAddr,
    /// Chance of a new connection (without affinity) landing here.
    pub probability: f64,
    /// Runs on this node.
    pub local: bool,
    /// Serving but terminating (used only because no endpoint is ready).
    pub terminating: bool,
    /// The endpoint is the client itself: masqueraded whatever the policy (hairpin).
    pub hairpin: bool,
}

/// Whether the client's address is replaced by the node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Masquerade {
    pub masqueraded: bool,
    pub reason: String,
}

fn masq(masqueraded: bool, reason: impl Into<String>) -> Masquerade {
    Masquerade {
        masqueraded,
        reason: reason.into(),
    }
}

/// The answer: a verdict, the reasons, and the path in words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub mode: Mode,
    pub query: Query,
    pub outcome: Outcome,
    pub reason: String,
    #[serde(rename = "servicePort")]
    pub matched: Option<Matched>,
    pub masquerade: Option<Masquerade>,
    pub endpoints: Vec<Choice>,
    /// `ClientIP` affinity timeout, seconds: a returning client keeps its endpoint.
    #[serde(rename = "affinitySeconds")]
    pub affinity_seconds: Option<u32>,
    /// Each step in words; names from the API are quoted (see [`quote`]).
    pub steps: Vec<String>,
}

/// A name from the API, quoted for text output: in double quotes, with quotes,
/// backslashes and control characters escaped, so a hostile name cannot forge a line.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.escape_debug())
}

impl fmt::Display for Explanation {
    /// The text answer: a verdict line, then the numbered steps.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = &self.query;
        let src = match q.src_port {
            Some(p) => SocketAddr::new(q.src, p).to_string(),
            None => q.src.to_string(),
        };
        writeln!(
            f,
            "{} {src} -> {} ({} mode): {}",
            q.proto,
            q.dst,
            self.mode.as_str(),
            match self.outcome {
                Outcome::Forwarded => "FORWARDED",
                Outcome::Untouched => "UNTOUCHED",
                Outcome::Rejected => "REJECTED",
                Outcome::Dropped => "DROPPED",
            }
        )?;
        for (i, step) in self.steps.iter().enumerate() {
            writeln!(f, "  {}. {step}", i + 1)?;
        }
        Ok(())
    }
}

/// Checks the kernel against what the planner would program for an explained
/// destination (`--verify`); implemented by the kernel backends, which own the plans.
pub trait Verify: Send + Sync {
    /// Every difference found, in words (empty: the kernel holds the plan); an error
    /// when the kernel cannot be read.
    fn verify(&self, state: &ProxyState, explanation: &Explanation) -> Result<Vec<String>, String>;
}

/// What the packet meets, as [`explain`] builds it.
struct Path<'a> {
    settings: &'a Settings,
    state: &'a ProxyState,
    query: &'a Query,
    family: IpFamily,
    steps: Vec<String>,
}

impl Path<'_> {
    fn step(&mut self, text: impl Into<String>) {
        self.steps.push(text.into());
    }

    fn finish(
        self,
        outcome: Outcome,
        reason: impl Into<String>,
        matched: Option<Matched>,
        masquerade: Option<Masquerade>,
        endpoints: Vec<Choice>,
        affinity_seconds: Option<u32>,
    ) -> Explanation {
        let reason = reason.into();
        let mut steps = self.steps;
        steps.push(format!("Result: {reason}."));
        Explanation {
            mode: self.settings.mode,
            query: self.query.clone(),
            outcome,
            reason,
            matched,
            masquerade,
            endpoints,
            affinity_seconds,
            steps,
        }
    }

    /// An address of this node (`fib … type local`).
    fn is_node_address(&self, ip: IpAddr) -> bool {
        ip.is_loopback()
            || self.settings.local_addresses.contains(&ip)
            || self.state.node.addresses.contains(&ip)
    }

    /// Whether `--detect-local-mode` calls the source a pod, and the words for it.
    fn source_is_pod(&self) -> (bool, String) {
        let q = self.query;
        let cidrs = |nets: &[IpNet], what: &str| -> (bool, String) {
            let of_family: Vec<IpNet> = nets
                .iter()
                .filter(|n| IpFamily::of_net(n) == self.family)
                .map(IpNet::trunc)
                .collect();
            // iptables matches one `-s` CIDR per family, as upstream.
            let used: Vec<IpNet> = match self.settings.mode {
                Mode::Iptables => of_family.into_iter().take(1).collect(),
                _ => of_family,
            };
            let list = used
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            if used.is_empty() {
                (
                    false,
                    format!("{what} has no CIDR of this family, so no source is a pod"),
                )
            } else if used.iter().any(|n| n.contains(&q.src)) {
                (
                    true,
                    format!("source {} is inside {what} ({list}): a pod", q.src),
                )
            } else {
                (
                    false,
                    format!("source {} is outside {what} ({list}): not a pod", q.src),
                )
            }
        };
        let iif = |matches: bool, what: String| -> (bool, String) {
            match &q.iif {
                None => (
                    false,
                    format!("no iif given: treated as not arriving on {what}, so not a pod"),
                ),
                Some(name) if matches => (
                    true,
                    format!("it arrives on {} ({what}): a pod", quote(name)),
                ),
                Some(name) => (
                    false,
                    format!("it arrives on {}, not {what}: not a pod", quote(name)),
                ),
            }
        };
        match &self.settings.local {
            LocalDetector::None => (
                false,
                "no --detect-local-mode applies (no --cluster-cidr), so no source counts as a pod"
                    .into(),
            ),
            LocalDetector::ClusterCidr(nets) => cidrs(nets, "--cluster-cidr"),
            LocalDetector::NodeCidr => cidrs(&self.state.node.pod_cidrs, "the Node's podCIDRs"),
            LocalDetector::BridgeInterface(name) => iif(
                q.iif.as_deref() == Some(name.as_str()),
                format!("bridge {}", quote(name)),
            ),
            LocalDetector::InterfaceNamePrefix(prefix) => iif(
                q.iif
                    .as_deref()
                    .is_some_and(|i| i.starts_with(prefix.as_str())),
                format!("an interface named {}…", quote(prefix)),
            ),
        }
    }

    /// Whether a NodePort rule of this mode looks at `dst`, and why not.
    fn nodeport_destination(&self) -> Result<(), String> {
        let dst = self.query.dst.ip();
        if !self.is_node_address(dst) {
            return Err(format!("{dst} is not an address of this node"));
        }
        let node = &self.state.node;
        match self.settings.mode {
            Mode::Nftables | Mode::Iptables => {
                let localhost_ok = match self.settings.mode {
                    Mode::Iptables => {
                        self.family == IpFamily::V4 && self.settings.iptables_localhost_nodeports
                    }
                    _ => self.settings.localhost_nodeports.contains(&self.family),
                };
                if dst.is_loopback() && !localhost_ok {
                    return Err(format!("NodePorts are not served on loopback ({dst}) here"));
                }
                // nftables' loopback listeners are not kernel rules: no address filter.
                if dst.is_loopback() && self.settings.mode == Mode::Nftables {
                    return Ok(());
                }
                match crate::model::nodeport_addresses(
                    &self.settings.nodeport_cidrs,
                    self.settings.nodeport_primary,
                    self.family,
                    node,
                ) {
                    None => Ok(()),
                    Some(nets) if nets.iter().any(|n| n.contains(&dst)) => Ok(()),
                    Some(nets) => Err(format!(
                        "{dst} is not among the --nodeport-addresses ({})",
                        nets.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
            Mode::Ipvs => {
                let link_local =
                    matches!(dst, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                if dst.is_loopback() || link_local {
                    return Err(format!("ipvs has no NodePort virtual server on {dst}"));
                }
                let cidrs = &self.settings.nodeport_cidrs;
                if !cidrs.is_empty() && !cidrs.iter().any(|c| c.contains(&dst)) {
                    return Err(format!("{dst} is not among the --nodeport-addresses"));
                }
                Ok(())
            }
            Mode::Userspace => Ok(()),
        }
    }
}

/// The Service port whose destination the query is, first in name order.
fn find<'a>(
    state: &'a ProxyState,
    q: &Query,
    family: IpFamily,
    nodeport: bool,
) -> Option<(&'a ServicePort, DestinationKind)> {
    let (ip, port) = (q.dst.ip(), q.dst.port());
    state.services.values().find_map(|sp| {
        if sp.protocol() != q.proto {
            return None;
        }
        // A port is programmed only in the families of its cluster IPs.
        sp.cluster_ip(family)?;
        if nodeport {
            return (sp.node_port == Some(port))
                .then_some((sp.as_ref(), DestinationKind::NodePort));
        }
        if sp.port != port {
            return None;
        }
        if sp.cluster_ip(family) == Some(ip) {
            Some((sp.as_ref(), DestinationKind::ClusterIp))
        } else if sp.external_ips.contains(&ip) {
            Some((sp.as_ref(), DestinationKind::ExternalIp))
        } else if sp.load_balancer_ips.contains(&ip) {
            Some((sp.as_ref(), DestinationKind::LoadBalancerIp))
        } else {
            None
        }
    })
}

fn policy_name(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn endpoint_list(eps: &[&Endpoint]) -> String {
    if eps.is_empty() {
        return "none".into();
    }
    eps.iter()
        .map(|e| SocketAddr::new(e.ip, e.port).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Explains where the rules of `settings.mode` send `query`, given the state the proxy
/// programs.
pub fn explain(state: &ProxyState, settings: &Settings, query: &Query) -> Explanation {
    let family = IpFamily::of(&query.dst.ip());
    let mut path = Path {
        settings,
        state,
        query,
        family,
        steps: Vec::new(),
    };
    if !settings.families.contains(&family) {
        path.step(format!(
            "The proxy programs no {family:?} rules on this node."
        ));
        return path.finish(
            Outcome::Untouched,
            "no rule of the proxy applies",
            None,
            None,
            Vec::new(),
            None,
        );
    }
    if settings.mode == Mode::Userspace && query.proto == Protocol::Sctp {
        path.step("userspace mode does not serve SCTP.");
        return path.finish(
            Outcome::Untouched,
            "no rule of the proxy applies",
            None,
            None,
            Vec::new(),
            None,
        );
    }
    let found = find(state, query, family, false).or_else(|| {
        let dst_is_nodeport = path.nodeport_destination();
        let hit = dst_is_nodeport
            .as_ref()
            .ok()
            .and_then(|()| find(state, query, family, true));
        if hit.is_none() {
            if let Err(why) = dst_is_nodeport {
                path.step(format!("Not a NodePort destination: {why}."));
            }
        }
        hit
    });
    let Some((sp, kind)) = found else {
        return unmatched(path);
    };
    matched(path, sp, kind)
}

/// No Service port has the destination.
fn unmatched(mut path: Path<'_>) -> Explanation {
    let q = path.query;
    let ip = q.dst.ip();
    path.step(format!(
        "No Service port has destination {} {}.",
        q.proto, q.dst
    ));
    let owner = path
        .state
        .services
        .values()
        .find(|sp| sp.cluster_ip(path.family) == Some(ip));
    let in_cidrs = path
        .state
        .service_cidrs
        .iter()
        .find(|n| n.contains(&ip))
        .copied();
    match path.settings.mode {
        Mode::Nftables => {
            if let Some(sp) = owner {
                path.step(format!(
                    "{ip} is the cluster IP of Service {}, which has no {} port {}.",
                    quote(&sp.name.service.to_string()),
                    q.proto,
                    q.dst.port()
                ));
                return path.finish(
                    Outcome::Rejected,
                    "rejected: a cluster IP's port that no Service uses",
                    None,
                    None,
                    Vec::new(),
                    None,
                );
            }
            if let Some(net) = in_cidrs {
                path.step(format!(
                    "{ip} is inside the Service range {net} (ServiceCIDRs) but is no Service's cluster IP."
                ));
                return path.finish(
                    Outcome::Dropped,
                    "dropped: an unallocated Service address",
                    None,
                    None,
                    Vec::new(),
                    None,
                );
            }
        }
        Mode::Iptables if owner.is_some() || in_cidrs.is_some() => {
            path.step("iptables mode has no rule for unused cluster-IP ports or Service ranges: the packet is routed as it is.");
        }
        Mode::Ipvs if owner.is_some() => {
            path.step(format!(
                "{ip} is bound on kube-ipvs0, so the packet is delivered to the node itself, which usually has no listener there (refused)."
            ));
        }
        _ => {}
    }
    path.finish(
        Outcome::Untouched,
        "no rule of the proxy applies: routed as it is",
        None,
        None,
        Vec::new(),
        None,
    )
}

/// The destination is a Service port's: firewall, endpoints, masquerade, affinity.
fn matched(mut path: Path<'_>, sp: &ServicePort, kind: DestinationKind) -> Explanation {
    let q = path.query;
    let mode = path.settings.mode;
    let external = kind != DestinationKind::ClusterIp;
    let policy = if external {
        sp.external_traffic_policy
    } else {
        sp.internal_traffic_policy
    };
    let matched = Matched {
        namespace: sp.name.service.namespace.to_string(),
        service: sp.name.service.name.to_string(),
        port: sp.name.port.to_string(),
        protocol: sp.protocol(),
        kind,
        policy: policy_name(policy),
    };
    let port_words = if sp.name.port.is_empty() {
        String::new()
    } else {
        format!(" port {}", quote(&sp.name.port))
    };
    path.step(format!(
        "{} {} is the {} of Service {}{port_words} ({}{}).",
        q.proto,
        q.dst,
        kind.words(),
        quote(&sp.name.service.to_string()),
        if external {
            "externalTrafficPolicy "
        } else {
            "internalTrafficPolicy "
        },
        policy_name(policy),
    ));
    let endpoints = path.state.endpoints_of(&sp.name);
    let selection = select(sp, endpoints, path.family, &path.state.node);
    let m = Some(matched);
    let affinity = sp.session_affinity_timeout;

    // loadBalancerSourceRanges.
    if kind == DestinationKind::LoadBalancerIp && !sp.load_balancer_source_ranges.is_empty() {
        match mode {
            Mode::Nftables | Mode::Iptables if mode == Mode::Nftables || selection.has_any => {
                let mut ranges: Vec<IpNet> = sp
                    .load_balancer_source_ranges
                    .iter()
                    .filter(|n| IpFamily::of_net(n) == path.family)
                    .copied()
                    .collect();
                let lb_admitted =
                    sp.admits_load_balancer_ips_as_sources(path.state.node.primary_ip(path.family));
                if lb_admitted {
                    ranges.extend(
                        sp.load_balancer_ips
                            .iter()
                            .filter(|ip| IpFamily::of(ip) == path.family)
                            .map(|ip| IpNet::from(*ip)),
                    );
                }
                let list = ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                if !ranges.iter().any(|n| n.contains(&q.src)) {
                    path.step(format!(
                        "loadBalancerSourceRanges admit only {}; source {} is not among them.",
                        if list.is_empty() {
                            "sources of the other family".to_string()
                        } else {
                            list
                        },
                        q.src
                    ));
                    return path.finish(
                        Outcome::Dropped,
                        "dropped by loadBalancerSourceRanges",
                        m,
                        None,
                        Vec::new(),
                        affinity,
                    );
                }
                path.step(format!(
                    "loadBalancerSourceRanges ({list}) admit source {}.",
                    q.src
                ));
            }
            Mode::Nftables | Mode::Iptables => {}
            Mode::Ipvs | Mode::Userspace => path.step(format!(
                "loadBalancerSourceRanges are not enforced in {} mode.",
                mode.as_str()
            )),
        }
    }
    if !selection.has_any {
        path.step(format!(
            "Service {} has no ready or serving-terminating endpoint of this family.",
            quote(&sp.name.service.to_string())
        ));
        if mode == Mode::Ipvs {
            return path.finish(
                Outcome::Dropped,
                "dropped: the virtual server has no real server",
                m,
                None,
                Vec::new(),
                affinity,
            );
        }
        return path.finish(
            Outcome::Rejected,
            "rejected: the Service has no endpoints",
            m,
            None,
            Vec::new(),
            affinity,
        );
    }

    let (eps, masq) = match mode {
        Mode::Userspace => {
            path.step(
                "A user-space listener accepts the connection and opens another to an endpoint.",
            );
            (
                selection.cluster.clone(),
                Masquerade {
                    masqueraded: true,
                    reason:
                        "proxied by a user-space listener: the endpoint sees the node's address"
                            .into(),
                },
            )
        }
        Mode::Ipvs => ipvs_path(&mut path, sp, kind, &selection),
        Mode::Nftables | Mode::Iptables => {
            // nftables' loopback NodePorts go to a user-space listener, or are refused.
            if kind == DestinationKind::NodePort
                && mode == Mode::Nftables
                && q.dst.ip().is_loopback()
            {
                if !serves_localhost_nodeport(sp, &selection) {
                    path.step("No loopback listener serves this NodePort (only TCP, and only with an endpoint for outside traffic).");
                    return path.finish(
                        Outcome::Rejected,
                        "rejected: a loopback NodePort no listener serves",
                        m,
                        None,
                        Vec::new(),
                        affinity,
                    );
                }
                loopback_listener(&mut path, sp, &selection)
            } else {
                kernel_path(&mut path, sp, kind, &selection)
            }
        }
    };
    if eps.is_empty() {
        let reason = if mode == Mode::Userspace {
            "rejected: no endpoint for this traffic".to_string()
        } else {
            "dropped: traffic policy Local and no endpoint on this node".to_string()
        };
        let outcome = if mode == Mode::Userspace {
            Outcome::Rejected
        } else {
            Outcome::Dropped
        };
        path.step("None of the Service's endpoints may take this traffic.");
        return path.finish(outcome, reason, m, None, Vec::new(), affinity);
    }
    let n = eps.len();
    let choices: Vec<Choice> = eps
        .iter()
        .map(|e| Choice {
            address: SocketAddr::new(e.ip, e.port),
            probability: 1.0 / n as f64,
            local: e.is_local,
            terminating: !e.ready,
            hairpin: mode != Mode::Userspace && e.ip == q.src,
        })
        .collect();
    let how = match mode {
        Mode::Ipvs => "taken in turn by the IPVS scheduler",
        Mode::Userspace => "taken in turn (round robin)",
        _ => "chosen at random, each equally likely",
    };
    path.step(format!(
        "Endpoints ({n}, {how}): {}{}.",
        endpoint_list(&eps),
        if eps.iter().any(|e| !e.ready) {
            " (terminating: no endpoint is ready)"
        } else {
            ""
        }
    ));
    path.step(format!(
        "Masquerade: {} ({}).",
        if masq.masqueraded { "yes" } else { "no" },
        masq.reason
    ));
    if choices.iter().any(|c| c.hairpin) && !masq.masqueraded {
        path.step(format!(
            "Hairpin: when it lands on {} (the client itself), it is masqueraded.",
            q.src
        ));
    }
    match affinity {
        Some(t) if mode == Mode::Ipvs => path.step(format!(
            "Session affinity ClientIP: the virtual server is persistent for {t} s, so a client keeps its endpoint."
        )),
        Some(t) => path.step(format!(
            "Session affinity ClientIP: a client that connected in the last {t} s goes back to the same endpoint."
        )),
        None => {}
    }
    let target = match choices.as_slice() {
        [only] => only.address.to_string(),
        _ => format!("one of {n} endpoints"),
    };
    let masqueraded = if masq.masqueraded {
        ", masqueraded"
    } else {
        ""
    };
    let reason = format!("forwarded to {target}{masqueraded}");
    path.finish(Outcome::Forwarded, reason, m, Some(masq), choices, affinity)
}

/// nftables loopback NodePort served by a user-space listener.
fn loopback_listener<'a>(
    path: &mut Path<'_>,
    sp: &ServicePort,
    selection: &Selection<'a>,
) -> (Vec<&'a Endpoint>, Masquerade) {
    path.step("A user-space listener on loopback serves this NodePort (localhost NodePorts).");
    (
        selection.external(sp).to_vec(),
        masq(
            true,
            "proxied by the loopback listener: the endpoint sees the node's address",
        ),
    )
}

/// nftables and iptables: the entry chain's policy and masquerade marks.
fn kernel_path<'a>(
    path: &mut Path<'_>,
    sp: &ServicePort,
    kind: DestinationKind,
    selection: &Selection<'a>,
) -> (Vec<&'a Endpoint>, Masquerade) {
    let q = path.query;
    if kind == DestinationKind::ClusterIp {
        let eps = selection.internal(sp).to_vec();
        let masq = if path.settings.masquerade_all {
            masq(true, "--masquerade-all")
        } else {
            let (pod, why) = path.source_is_pod();
            let detector = !matches!(path.settings.local, LocalDetector::None);
            masq(
                detector && !pod,
                if detector && !pod {
                    format!("{why}; cluster-IP traffic from outside the pods is masqueraded")
                } else {
                    why
                },
            )
        };
        if sp.internal_traffic_policy == TrafficPolicy::Local {
            path.step("internalTrafficPolicy Local: only this node's endpoints.");
        }
        return (eps, masq);
    }
    if sp.external_traffic_policy == TrafficPolicy::Cluster {
        return (
            selection.cluster.clone(),
            masq(
                true,
                format!(
                    "externalTrafficPolicy Cluster: traffic to a {} is masqueraded",
                    kind.words()
                ),
            ),
        );
    }
    // externalTrafficPolicy Local: pods and the node short-circuit to all endpoints.
    let (pod, why) = path.source_is_pod();
    if pod {
        path.step(format!(
            "externalTrafficPolicy Local, but {why}: it goes to all endpoints as cluster-IP traffic would."
        ));
        return (
            selection.cluster.clone(),
            Masquerade {
                masqueraded: false,
                reason:
                    "a pod's traffic to a Local Service's external destination keeps its address"
                        .into(),
            },
        );
    }
    if path.is_node_address(q.src) {
        path.step(format!(
            "externalTrafficPolicy Local, but source {} is this node: it goes to all endpoints.",
            q.src
        ));
        return (
            selection.cluster.clone(),
            masq(
                true,
                "the node's own traffic to an external destination is masqueraded",
            ),
        );
    }
    path.step(format!(
        "externalTrafficPolicy Local: only this node's endpoints ({why})."
    ));
    (
        selection.local.clone(),
        masq(
            false,
            "externalTrafficPolicy Local keeps the client's address",
        ),
    )
}

/// ipvs: which endpoints the virtual server has, and the masquerade table's marks.
fn ipvs_path<'a>(
    path: &mut Path<'_>,
    sp: &ServicePort,
    kind: DestinationKind,
    selection: &Selection<'a>,
) -> (Vec<&'a Endpoint>, Masquerade) {
    let q = path.query;
    match kind {
        DestinationKind::ClusterIp => {
            let eps = selection.internal(sp).to_vec();
            let cidrs: Vec<IpNet> = match &path.settings.local {
                LocalDetector::ClusterCidr(nets) => nets
                    .iter()
                    .filter(|n| IpFamily::of_net(n) == path.family)
                    .copied()
                    .collect(),
                _ => Vec::new(),
            };
            let masq = if path.settings.masquerade_all {
                masq(true, "--masquerade-all")
            } else if let Some(net) = cidrs.iter().find(|n| !n.contains(&q.src)) {
                masq(true, format!("source {} is outside --cluster-cidr {net}", q.src))
            } else if cidrs.is_empty() {
                masq(false, "no --cluster-cidr of this family: cluster-IP traffic is not masqueraded")
            } else {
                masq(false, format!("source {} is inside --cluster-cidr", q.src))
            };
            (eps, masq)
        }
        DestinationKind::NodePort => (
            selection.external(sp).to_vec(),
            masq(true, "ipvs mode masquerades all NodePort traffic (externalTrafficPolicy Local does not keep the client's address in this mode)"),
        ),
        DestinationKind::ExternalIp | DestinationKind::LoadBalancerIp => (
            selection.external(sp).to_vec(),
            masq(false, "ipvs mode marks only cluster-IP and NodePort traffic for masquerade"),
        ),
    }
}

#[cfg(test)]
mod tests;
