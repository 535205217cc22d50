//! Which endpoints a Service port's traffic may go to: decided here once, for every backend.
//!
//! Follows upstream's rules: cluster traffic uses the ready endpoints (filtered by topology
//! hints when the Service asks for it and the hints are complete), falling back to
//! serving-and-terminating ones when none is ready; `Local` policies use this node's
//! endpoints with the same fallback. A Service with no usable endpoint anywhere is
//! rejected; one whose traffic has endpoints elsewhere but none it may use is dropped.

use crate::model::{Endpoint, IpFamily, NodeInfo, ServicePort, TrafficPolicy};

/// The endpoints each kind of traffic may use, for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection<'a> {
    /// For traffic under the `Cluster` policy; empty when no traffic uses it.
    pub cluster: Vec<&'a Endpoint>,
    /// This node's endpoints, for traffic under a `Local` policy; empty when unused.
    pub local: Vec<&'a Endpoint>,
    /// Some endpoint anywhere can serve: when false, connections are rejected.
    pub has_any: bool,
}

/// Whether a user-space listener serves this port's NodePort on loopback (upstream's
/// localhost NodePort proxy): TCP only, and only while traffic from outside has an
/// endpoint to go to (this node's, under `externalTrafficPolicy: Local`).
pub fn serves_localhost_nodeport(port: &ServicePort, selection: &Selection<'_>) -> bool {
    port.node_port.is_some()
        && port.protocol() == crate::model::Protocol::Tcp
        && !selection.external(port).is_empty()
}

impl<'a> Selection<'a> {
    /// Endpoints for traffic to the cluster IP.
    pub fn internal(&self, port: &ServicePort) -> &[&'a Endpoint] {
        match port.internal_traffic_policy {
            TrafficPolicy::Local => &self.local,
            TrafficPolicy::Cluster => &self.cluster,
        }
    }

    /// Endpoints for traffic from outside (NodePort, externalIPs, load-balancer IPs).
    pub fn external(&self, port: &ServicePort) -> &[&'a Endpoint] {
        match port.external_traffic_policy {
            TrafficPolicy::Local => &self.local,
            TrafficPolicy::Cluster => &self.cluster,
        }
    }
}

/// Whether a Service port can be reached from outside the cluster.
pub fn externally_accessible(port: &ServicePort) -> bool {
    port.node_port.is_some() || !port.external_ips.is_empty() || !port.load_balancer_ips.is_empty()
}

/// Whether the port's traffic goes anywhere under the `Local` policy.
pub fn uses_local(port: &ServicePort) -> bool {
    port.internal_traffic_policy == TrafficPolicy::Local
        || (externally_accessible(port) && port.external_traffic_policy == TrafficPolicy::Local)
}

/// Whether any of the port's traffic goes to all endpoints: under `externalTrafficPolicy:
/// Local` pods and the node reaching an external destination still do (upstream's
/// short-circuit), so every externally reachable port uses them.
fn uses_cluster(port: &ServicePort) -> bool {
    port.internal_traffic_policy == TrafficPolicy::Cluster || externally_accessible(port)
}

/// Topology-aware routing applies when the Service asks for it, the node has a zone,
/// every ready endpoint carries zone hints, and some hint names this node's zone.
fn topology_zone<'n>(
    port: &ServicePort,
    endpoints: &[&Endpoint],
    node: &'n NodeInfo,
) -> Option<&'n str> {
    if !port.prefer_close {
        return None;
    }
    let zone = node.zone.as_deref().filter(|z| !z.is_empty())?;
    let mut has_zone = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        if ep.zone_hints.is_empty() {
            return None;
        }
        has_zone |= ep.zone_hints.iter().any(|z| z == zone);
    }
    has_zone.then_some(zone)
}

/// Ready endpoints passing `keep`, or, when there are none, serving-terminating ones.
fn ready_or_terminating<'a>(
    endpoints: &[&'a Endpoint],
    keep: impl Fn(&Endpoint) -> bool,
) -> Vec<&'a Endpoint> {
    let ready: Vec<_> = endpoints
        .iter()
        .copied()
        .filter(|e| e.ready && keep(e))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .copied()
        .filter(|e| e.serving && e.terminating && keep(e))
        .collect()
}

/// Both candidate sets of one family, whatever the policies: the cluster set (topology
/// applied) and this node's set. Backends that build both chains regardless use this.
pub fn candidates<'a>(
    port: &ServicePort,
    endpoints: &'a [Endpoint],
    family: IpFamily,
    node: &NodeInfo,
) -> (Vec<&'a Endpoint>, Vec<&'a Endpoint>) {
    let of_family: Vec<&Endpoint> = endpoints.iter().filter(|e| e.family() == family).collect();
    let cluster = match topology_zone(port, &of_family, node) {
        Some(zone) => ready_or_terminating(&of_family, |e| e.zone_hints.iter().any(|z| z == zone)),
        None => ready_or_terminating(&of_family, |_| true),
    };
    let local = ready_or_terminating(&of_family, |e| e.is_local);
    (cluster, local)
}

/// Selects the endpoints of one family for a Service port.
pub fn select<'a>(
    port: &ServicePort,
    endpoints: &'a [Endpoint],
    family: IpFamily,
    node: &NodeInfo,
) -> Selection<'a> {
    let (cluster, local) = candidates(port, endpoints, family, node);
    Selection {
        has_any: endpoints
            .iter()
            .any(|e| e.family() == family && (e.ready || (e.serving && e.terminating))),
        cluster: if uses_cluster(port) {
            cluster
        } else {
            Vec::new()
        },
        local: if uses_local(port) { local } else { Vec::new() },
    }
}
