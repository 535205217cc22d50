//! Which endpoints a Service port's traffic may go to: decided here once, for every backend.
//!
//! Follows upstream's rules: cluster traffic uses the ready endpoints (filtered by topology
//! hints, for this node or else its zone, when every ready endpoint carries them), falling back to
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

/// Which topology hints narrow a Service's cluster endpoints. As upstream since v1.33, hints
/// are honoured whenever the EndpointSlices carry them (the Service's `trafficDistribution`
/// only tells the EndpointSlice controller to write them): node hints when every ready
/// endpoint has some and one names this node, else zone hints on the same terms, else none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology<'n> {
    All,
    Node(&'n str),
    Zone(&'n str),
}

impl Topology<'_> {
    fn admits(self, ep: &Endpoint) -> bool {
        match self {
            Topology::All => true,
            Topology::Node(name) => ep.node_hints().iter().any(|n| n == name),
            Topology::Zone(zone) => ep.zone_hints().iter().any(|z| z == zone),
        }
    }
}

fn topology<'n>(endpoints: &[&Endpoint], node: &'n NodeInfo) -> Topology<'n> {
    let ready: Vec<&Endpoint> = endpoints.iter().copied().filter(|e| e.ready).collect();
    // Hints of one kind count only when every ready endpoint has some and one names us.
    let usable = |hints: fn(&Endpoint) -> &[String], me: &str| {
        !me.is_empty()
            && ready.iter().all(|e| !hints(e).is_empty())
            && ready.iter().any(|e| hints(e).iter().any(|h| h == me))
    };
    if usable(Endpoint::node_hints, &node.name) {
        return Topology::Node(&node.name);
    }
    match node.zone.as_deref() {
        Some(zone) if usable(Endpoint::zone_hints, zone) => Topology::Zone(zone),
        _ => Topology::All,
    }
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
    endpoints: &'a [Endpoint],
    family: IpFamily,
    node: &NodeInfo,
) -> (Vec<&'a Endpoint>, Vec<&'a Endpoint>) {
    let of_family: Vec<&Endpoint> = endpoints.iter().filter(|e| e.family() == family).collect();
    let topology = topology(&of_family, node);
    let cluster = ready_or_terminating(&of_family, |e| topology.admits(e));
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
    let (cluster, local) = candidates(endpoints, family, node);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hints, Protocol, ServiceName, ServicePortName};

    fn port() -> ServicePort {
        let name = ServicePortName {
            service: ServiceName::new("ns", "svc"),
            port: "".into(),
            protocol: Protocol::Tcp,
        };
        ServicePort::new(name, vec!["10.0.0.1".parse().unwrap()], 80)
    }

    fn ep(last: u8, nodes: &[&str], zones: &[&str]) -> Endpoint {
        let mut e = Endpoint::ready(format!("10.1.0.{last}").parse().unwrap(), 8080);
        e.hints = Some(Box::new(Hints {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            zones: zones.iter().map(|s| s.to_string()).collect(),
        }));
        e
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            zone: Some("za".into()),
            ..Default::default()
        }
    }

    /// The last octets of the cluster endpoints chosen.
    fn chosen(eps: &[Endpoint], node: &NodeInfo) -> Vec<u8> {
        select(&port(), eps, IpFamily::V4, node)
            .cluster
            .iter()
            .map(|e| match e.ip {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn node_hints_for_this_node_win() {
        let eps = [
            ep(1, &["n1"], &["za"]),
            ep(2, &["n2"], &["za"]),
            ep(3, &["n3"], &["zb"]),
        ];
        assert_eq!(chosen(&eps, &node()), [1]);
    }

    #[test]
    fn zone_hints_when_no_node_hint_names_this_node() {
        let eps = [
            ep(1, &["n2"], &["za"]),
            ep(2, &["n3"], &["za"]),
            ep(3, &["n4"], &["zb"]),
        ];
        assert_eq!(chosen(&eps, &node()), [1, 2]);
    }

    #[test]
    fn zone_hints_when_a_ready_endpoint_lacks_node_hints() {
        let eps = [ep(1, &["n1"], &["zb"]), ep(2, &[], &["za"])];
        assert_eq!(chosen(&eps, &node()), [2]);
    }

    #[test]
    fn all_endpoints_when_hints_are_incomplete_or_name_neither() {
        let eps = [ep(1, &["n1"], &["za"]), ep(2, &[], &[])];
        assert_eq!(chosen(&eps, &node()), [1, 2]);
        let eps = [ep(1, &["n2"], &["zb"]), ep(2, &["n3"], &["zc"])];
        assert_eq!(chosen(&eps, &node()), [1, 2]);
        // No zone label: zone hints cannot apply.
        let eps = [ep(1, &[], &["za"]), ep(2, &[], &["zb"])];
        let zoneless = NodeInfo {
            zone: None,
            ..node()
        };
        assert_eq!(chosen(&eps, &zoneless), [1, 2]);
    }

    #[test]
    fn only_ready_endpoints_must_carry_hints() {
        let mut not_ready = ep(2, &[], &[]);
        not_ready.ready = false;
        let eps = [ep(1, &["n1"], &["za"]), not_ready, ep(3, &["n2"], &["za"])];
        assert_eq!(chosen(&eps, &node()), [1]);
    }
}
