//! Synthetic clusters for the scale benchmarks and the planner micro-benchmarks: the same
//! cluster as the proxy's model ([`state`]) and as manifests ([`spec`]), so in-process
//! measurements and runs of the real binary program the same rules.
//!
//! The mix is deterministic (derived from the Service's index): 60% ClusterIP, 25%
//! NodePort, 15% LoadBalancer; 10% UDP; 10% with `ClientIP` session affinity; half the
//! LoadBalancers with `externalTrafficPolicy: Local`; 5% with `internalTrafficPolicy:
//! Local`. NodePorts come from an extended range (30000–65535, as
//! `--service-node-port-range` allows), so 50,000 Services fit without collisions.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use proxy_core::model::{
    Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName, TrafficPolicy,
};

use crate::manifests::{PortSpec, ServiceSpec};

/// Namespace of every synthetic Service.
pub const NAMESPACE: &str = "bench";
/// Port every synthetic Service listens on and every endpoint serves.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Most endpoints a synthetic Service can have (the address plan leaves room for 16).
pub const MAX_ENDPOINTS: usize = 16;

/// The Service types of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// One synthetic Service with one port.
#[derive(Debug, Clone)]
pub struct SynthService {
    pub index: usize,
    pub kind: Kind,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub node_port: Option<u16>,
    pub load_balancer_ip: Option<Ipv4Addr>,
    pub affinity: bool,
    pub external_local: bool,
    pub internal_local: bool,
    /// Endpoint addresses and whether each runs on this node.
    pub endpoints: Vec<(Ipv4Addr, bool)>,
}

impl SynthService {
    pub fn name(&self) -> String {
        format!("svc-{}", self.index)
    }

    pub fn port_name(&self) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new(NAMESPACE, self.name()),
            port: "p".into(),
            protocol: self.protocol,
        }
    }
}

/// ClusterIP of Service `i`: 10.96.0.0/12 from 10.96.0.1 on (room for a million).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0001 + i as u32)
}

/// Address of endpoint `slot` of Service `i`: in 10.128.0.0/9, [`MAX_ENDPOINTS`] per Service.
pub fn endpoint_ip(i: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + (i * MAX_ENDPOINTS + slot) as u32)
}

/// Service `i` of the mix, with `endpoints` endpoints.
pub fn service(i: usize, endpoints: usize) -> SynthService {
    let kind = match i % 20 {
        0..=11 => Kind::ClusterIp,
        12..=16 => Kind::NodePort,
        _ => Kind::LoadBalancer,
    };
    let protocol = if i % 10 == 9 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    // TCP and UDP NodePorts do not collide, so each protocol gets the whole range.
    let node_port = (kind != Kind::ClusterIp).then_some(30000 + (i % 35_536) as u16);
    let load_balancer_ip =
        (kind == Kind::LoadBalancer).then_some(Ipv4Addr::from(0xc633_0000 + i as u32));
    let external_local = kind == Kind::LoadBalancer && i.is_multiple_of(2);
    let internal_local = i % 20 == 3;
    let endpoints = (0..endpoints.min(MAX_ENDPOINTS))
        // Every third endpoint runs on this node, so local policies have something to pick.
        .map(|slot| (endpoint_ip(i, slot), (i + slot).is_multiple_of(3)))
        .collect();
    SynthService {
        index: i,
        kind,
        protocol,
        cluster_ip: cluster_ip(i),
        node_port,
        load_balancer_ip,
        affinity: i % 10 == 4,
        external_local,
        internal_local,
        endpoints,
    }
}

/// `services` Services, the endpoint count of each spread over `endpoints` (a single
/// count when the range has one value).
pub fn cluster(services: usize, endpoints: RangeInclusive<usize>) -> Vec<SynthService> {
    let (low, high) = (*endpoints.start(), *endpoints.end().max(endpoints.start()));
    let span = high - low + 1;
    (0..services)
        .map(|i| service(i, low + (i * 7) % span))
        .collect()
}

fn policy(local: bool) -> TrafficPolicy {
    if local {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    }
}

/// The model of one Service port, as the tracker would derive it from [`spec`].
pub fn service_port(s: &SynthService) -> ServicePort {
    ServicePort {
        name: s.port_name(),
        cluster_ips: vec![s.cluster_ip.into()],
        port: SERVICE_PORT,
        node_port: s.node_port,
        external_ips: vec![],
        load_balancer_ips: s.load_balancer_ip.map(IpAddr::from).into_iter().collect(),
        load_balancer_source_ranges: vec![],
        session_affinity_timeout: s.affinity.then_some(10_800),
        external_traffic_policy: policy(s.external_local),
        internal_traffic_policy: policy(s.internal_local),
        health_check_node_port: None,
    }
}

/// The model of one Service's endpoints.
pub fn endpoints(s: &SynthService) -> Vec<Endpoint> {
    s.endpoints
        .iter()
        .map(|&(ip, is_local)| Endpoint {
            ip: ip.into(),
            port: TARGET_PORT,
            ready: true,
            serving: true,
            terminating: false,
            is_local,
            hints: None,
        })
        .collect()
}

/// The whole cluster as the proxy's model.
pub fn state(services: &[SynthService]) -> ProxyState {
    let mut ports = BTreeMap::new();
    let mut eps = BTreeMap::new();
    for s in services {
        ports.insert(s.port_name(), Arc::new(service_port(s)));
        eps.insert(s.port_name(), Arc::new(endpoints(s)));
    }
    ProxyState {
        services: ports,
        endpoints: eps,
        node: Default::default(),
        service_cidrs: Vec::new(),
    }
}

/// One Service as manifests (Service plus EndpointSlice). Endpoints on this node carry
/// `nodeName: node-a`, so run the proxy with `--hostname-override=node-a`.
pub fn spec(s: &SynthService) -> ServiceSpec {
    let protocol = match s.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    };
    let mut port = PortSpec::new("p", protocol, SERVICE_PORT, TARGET_PORT);
    port.node_port = s.node_port;
    let mut spec = ServiceSpec::new(NAMESPACE, &s.name(), &[s.cluster_ip.into()], vec![port]);
    spec.type_ = match s.kind {
        Kind::ClusterIp => "ClusterIP",
        Kind::NodePort => "NodePort",
        Kind::LoadBalancer => "LoadBalancer",
    }
    .into();
    spec.load_balancer_ips = s.load_balancer_ip.map(IpAddr::from).into_iter().collect();
    spec.endpoints = s
        .endpoints
        .iter()
        .map(|(ip, _)| ((*ip).into(), true))
        .collect();
    spec.endpoint_nodes = s
        .endpoints
        .iter()
        .map(|(_, local)| if *local { "node-a" } else { "node-b" }.to_string())
        .collect();
    if s.affinity {
        spec.extra_spec.push("  sessionAffinity: ClientIP".into());
    }
    if s.external_local {
        spec.extra_spec
            .push("  externalTrafficPolicy: Local".into());
    }
    if s.internal_local {
        spec.extra_spec
            .push("  internalTrafficPolicy: Local".into());
    }
    spec
}
