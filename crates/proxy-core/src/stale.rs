//! Stale conntrack entries: which flows must be forgotten after a sync, so that packets
//! follow the new rules at once.
//!
//! NAT decisions live in conntrack entries: a UDP client that keeps sending from the same
//! source port (a DNS resolver) would keep reaching a removed endpoint for as long as its
//! entry lives, and a client that sent to a Service while it had no endpoints keeps its
//! un-NATed entry. Like upstream, after each successful sync we delete (UDP and SCTP only;
//! TCP notices on its own) the entries to endpoints that were removed, and the entries of
//! Service IPs whose Service went from no endpoints to some.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{IpFamily, Protocol, ProxyState, ServicePort};
use crate::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};
use crate::select::select;

/// One set of conntrack entries to delete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StaleFlow {
    /// Entries to `service_ip:port` that were NATed to `endpoint`.
    ServiceToEndpoint {
        protocol: Protocol,
        service_ip: IpAddr,
        port: u16,
        endpoint: IpAddr,
    },
    /// Entries to a NodePort that were NATed to `endpoint`.
    NodePortToEndpoint {
        protocol: Protocol,
        family: IpFamily,
        node_port: u16,
        endpoint: IpAddr,
    },
    /// All entries to `service_ip:port` (the Service had no endpoints).
    Service {
        protocol: Protocol,
        service_ip: IpAddr,
        port: u16,
    },
    /// All entries to a NodePort (the Service had no endpoints).
    NodePort {
        protocol: Protocol,
        family: IpFamily,
        node_port: u16,
    },
}

fn needs_cleanup(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// Endpoint IPs a port's traffic may reach in one family (what the backend programmed).
fn reachable(port: &ServicePort, state: &ProxyState, family: IpFamily) -> BTreeSet<IpAddr> {
    let selection = select(port, state.endpoints_of(&port.name), family, &state.node);
    selection
        .cluster
        .iter()
        .chain(selection.local.iter())
        .map(|e| e.ip)
        .collect()
}

fn service_ips(port: &ServicePort, family: IpFamily) -> Vec<IpAddr> {
    port.cluster_ip(family)
        .into_iter()
        .chain(port.external_destinations(family))
        .collect()
}

/// The flows made stale by going from `old` to `new`. Only ports whose definition or
/// endpoints changed are examined (shared `Arc`s are skipped cheaply).
pub fn stale_flows(old: &ProxyState, new: &ProxyState) -> BTreeSet<StaleFlow> {
    let mut out = BTreeSet::new();
    for (name, port) in &new.services {
        let protocol = port.protocol();
        if !needs_cleanup(protocol) {
            continue;
        }
        let old_port = old.services.get(name);
        let unchanged = old_port.is_some_and(|p| Arc::ptr_eq(p, port))
            && match (old.endpoints.get(name), new.endpoints.get(name)) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && old.node == new.node;
        if unchanged {
            continue;
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            let now = reachable(port, new, family);
            let before = old_port
                .map(|p| reachable(p, old, family))
                .unwrap_or_default();
            if before.is_empty() && !now.is_empty() {
                for service_ip in service_ips(port, family) {
                    out.insert(StaleFlow::Service {
                        protocol,
                        service_ip,
                        port: port.port,
                    });
                }
                if let Some(node_port) = port.node_port {
                    out.insert(StaleFlow::NodePort {
                        protocol,
                        family,
                        node_port,
                    });
                }
            }
            let Some(old_port) = old_port else { continue };
            for endpoint in before.difference(&now) {
                for service_ip in service_ips(old_port, family) {
                    out.insert(StaleFlow::ServiceToEndpoint {
                        protocol,
                        service_ip,
                        port: old_port.port,
                        endpoint: *endpoint,
                    });
                }
                if let Some(node_port) = old_port.node_port {
                    out.insert(StaleFlow::NodePortToEndpoint {
                        protocol,
                        family,
                        node_port,
                        endpoint: *endpoint,
                    });
                }
            }
        }
    }
    // Ports that disappeared: their endpoints are gone too.
    for (name, old_port) in &old.services {
        let protocol = old_port.protocol();
        if !needs_cleanup(protocol) || new.services.contains_key(name) {
            continue;
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            for endpoint in reachable(old_port, old, family) {
                for service_ip in service_ips(old_port, family) {
                    out.insert(StaleFlow::ServiceToEndpoint {
                        protocol,
                        service_ip,
                        port: old_port.port,
                        endpoint,
                    });
                }
                if let Some(node_port) = old_port.node_port {
                    out.insert(StaleFlow::NodePortToEndpoint {
                        protocol,
                        family,
                        node_port,
                        endpoint,
                    });
                }
            }
        }
    }
    out
}

impl StaleFlow {
    pub fn protocol(&self) -> Protocol {
        match self {
            StaleFlow::ServiceToEndpoint { protocol, .. }
            | StaleFlow::NodePortToEndpoint { protocol, .. }
            | StaleFlow::Service { protocol, .. }
            | StaleFlow::NodePort { protocol, .. } => *protocol,
        }
    }

    pub fn family(&self) -> IpFamily {
        match self {
            StaleFlow::ServiceToEndpoint { service_ip, .. }
            | StaleFlow::Service { service_ip, .. } => IpFamily::of(service_ip),
            StaleFlow::NodePortToEndpoint { family, .. } | StaleFlow::NodePort { family, .. } => {
                *family
            }
        }
    }
}

/// Deletes conntrack entries. Implementations must treat "no such entry" as success.
pub trait ConntrackCleaner: Send + 'static {
    fn delete(&mut self, flow: &StaleFlow) -> Result<(), String>;

    /// Deletes the entries of every flow; returns what could not be done. By default one
    /// `delete` per flow.
    fn delete_all(&mut self, flows: &BTreeSet<StaleFlow>) -> Vec<String> {
        flows
            .iter()
            .filter_map(|flow| self.delete(flow).err().map(|e| format!("{flow:?}: {e}")))
            .collect()
    }
}

/// Wraps a backend: after each successful sync, deletes the flows the sync made stale.
/// Failures to delete are logged, not fatal: the rules are right, only old flows linger.
pub struct CleaningProxier<C: ConntrackCleaner> {
    inner: Box<dyn Proxier>,
    cleaner: C,
    last: Option<Arc<ProxyState>>,
}

impl<C: ConntrackCleaner> CleaningProxier<C> {
    pub fn new(inner: Box<dyn Proxier>, cleaner: C) -> Self {
        CleaningProxier {
            inner,
            cleaner,
            last: None,
        }
    }
}

impl<C: ConntrackCleaner> Proxier for CleaningProxier<C> {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let outcome = self.inner.sync(request)?;
        // On the first sync we do not know what the previous process programmed: compare
        // with an empty state, which clears the entries of every UDP Service that now has
        // endpoints (as upstream does after a restart).
        let old = self.last.take().unwrap_or_default();
        let flows = stale_flows(&old, &request.state);
        if !flows.is_empty() {
            for err in self.cleaner.delete_all(&flows) {
                tracing::warn!(error = %err, "could not delete stale conntrack entries");
            }
        }
        if !flows.is_empty() {
            tracing::debug!(flows = flows.len(), "deleted stale conntrack entries");
        }
        self.last = Some(Arc::clone(&request.state));
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.inner.cleanup()
    }
}
