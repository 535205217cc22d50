//! Stale conntrack entries: the UDP flows whose NAT decision no longer matches a serving
//! endpoint, deleted so that their next packets follow the current rules.
//!
//! NAT decisions live in conntrack entries: a UDP client that keeps sending from the same
//! source port (a DNS resolver) would keep reaching a removed endpoint for as long as its
//! entry lives. As upstream since v1.32 (`pkg/proxy/conntrack/cleanup.go`), this is a
//! reconciler rather than a diff of the changes: after a successful sync in which some UDP
//! Service port's endpoints changed, the conntrack table is listed, per family, and every
//! UDP entry is deleted whose original destination is a Service IP and port (cluster IP,
//! external IP or load-balancer IP) or a NodePort of a Service port with serving endpoints,
//! and whose reply source (where it was DNATed to) is none of that port's serving
//! endpoints (IP and target port). Policies, topology and terminating state are not
//! consulted, so a UDP flow lives as long as a TCP connection would. A Service port with no
//! serving endpoint is left alone, as upstream: its flows are judged once it has some.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{Endpoint, IpFamily, Protocol, ProxyState, ServicePortName};
use crate::observer::SyncObserver;
use crate::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A UDP conntrack entry: what the client sent to, and where the replies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowEntry {
    pub original: FlowTuple,
    pub reply: FlowTuple,
    /// The conntrack zone (0 unless someone else uses zones); part of the entry's key.
    pub zone: u16,
}

/// The kernel's conntrack table, as the reconciler needs it.
pub trait Conntrack: Send + 'static {
    /// The UDP entries of one family. A partial listing (the table changed during the
    /// dump) is returned as it is, as upstream continues with a partial result.
    fn list_udp(&mut self, family: IpFamily) -> Result<Vec<FlowEntry>, String>;

    /// Deletes the entries; returns how many were deleted (entries already gone do not
    /// count and are no error) and what failed.
    fn delete(&mut self, entries: &[FlowEntry]) -> (u64, Vec<String>);
}

/// Whether a sync from `old` to `new` calls for a reconciliation: some UDP Service port's
/// endpoints changed (appeared, went, or differ), as upstream's `ConntrackCleanupRequired`.
pub fn cleanup_required(old: &ProxyState, new: &ProxyState) -> bool {
    if std::ptr::eq(old, new) {
        return false;
    }
    // Both maps in name order, side by side: any difference in their UDP entries (a
    // name on one side only, or other endpoints) is a change.
    fn udp(s: &ProxyState) -> impl Iterator<Item = (&ServicePortName, *const Vec<Endpoint>)> {
        s.endpoints
            .iter()
            .filter(|(name, _)| name.protocol == Protocol::Udp)
            .map(|(name, eps)| (name, Arc::as_ptr(eps)))
    }
    !udp(old).eq(udp(new))
}

/// The entries of `family` that `state` makes stale (see the module's description).
pub fn stale_entries<'a>(
    state: &ProxyState,
    family: IpFamily,
    entries: &'a [FlowEntry],
) -> Vec<&'a FlowEntry> {
    // Serving endpoints (IP, port) per Service IP and port, and per NodePort.
    let mut by_service_ip: HashMap<(IpAddr, u16), HashSet<(IpAddr, u16)>> = HashMap::new();
    let mut by_node_port: HashMap<u16, HashSet<(IpAddr, u16)>> = HashMap::new();
    for (name, port) in &state.services {
        if name.protocol != Protocol::Udp {
            continue;
        }
        let serving: HashSet<(IpAddr, u16)> = state
            .endpoints_of(name)
            .iter()
            .filter(|e| e.serving && e.family() == family)
            .map(|e| (e.ip, e.port))
            .collect();
        if serving.is_empty() {
            continue;
        }
        for ip in port
            .cluster_ip(family)
            .into_iter()
            .chain(port.external_destinations(family))
        {
            by_service_ip
                .entry((ip, port.port))
                .or_default()
                .extend(serving.iter().copied());
        }
        if let Some(node_port) = port.node_port {
            by_node_port
                .entry(node_port)
                .or_default()
                .extend(serving.iter().copied());
        }
    }
    entries
        .iter()
        .filter(|e| IpFamily::of(&e.original.dst) == family)
        .filter(|e| {
            let backend = (e.reply.src, e.reply.src_port);
            let stale_for = |serving: Option<&HashSet<(IpAddr, u16)>>| {
                serving.is_some_and(|s| !s.contains(&backend))
            };
            stale_for(by_service_ip.get(&(e.original.dst, e.original.dst_port)))
                || stale_for(by_node_port.get(&e.original.dst_port))
        })
        .collect()
}

/// Wraps a backend: after each successful sync that changed a UDP Service's endpoints,
/// reconciles the conntrack table of each family. Failures are logged, not fatal: the
/// rules are right, only old flows linger until the next reconciliation.
pub struct CleaningProxier<C: Conntrack> {
    inner: Box<dyn Proxier>,
    conntrack: C,
    families: Vec<IpFamily>,
    observer: Arc<dyn SyncObserver>,
    last: Option<Arc<ProxyState>>,
}

impl<C: Conntrack> CleaningProxier<C> {
    pub fn new(
        inner: Box<dyn Proxier>,
        conntrack: C,
        families: Vec<IpFamily>,
        observer: Arc<dyn SyncObserver>,
    ) -> Self {
        CleaningProxier {
            inner,
            conntrack,
            families,
            observer,
            last: None,
        }
    }

    /// One family's reconciliation; returns how many entries were deleted.
    fn reconcile(&mut self, state: &ProxyState, family: IpFamily) -> u64 {
        let entries = match self.conntrack.list_udp(family) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, ?family, "could not list conntrack entries");
                return 0;
            }
        };
        let stale: Vec<FlowEntry> = stale_entries(state, family, &entries)
            .into_iter()
            .copied()
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let (deleted, errors) = self.conntrack.delete(&stale);
        for error in errors {
            tracing::warn!(%error, "could not delete a stale conntrack entry");
        }
        deleted
    }
}

impl<C: Conntrack> Proxier for CleaningProxier<C> {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn prepare(&mut self) {
        self.inner.prepare();
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let outcome = self.inner.sync(request)?;
        // On the first sync every UDP Service's endpoints are new, so the table is
        // reconciled against what this process programmed, as upstream after a restart.
        let old = self.last.take().unwrap_or_default();
        if cleanup_required(&old, &request.state) {
            for family in self.families.clone() {
                let start = Instant::now();
                let deleted = self.reconcile(&request.state, family);
                let took: Duration = start.elapsed();
                tracing::debug!(?family, deleted, ?took, "reconciled conntrack entries");
                self.observer.conntrack_reconciled(family, took, deleted);
            }
        }
        self.last = Some(Arc::clone(&request.state));
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.inner.cleanup()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceName, ServicePort, ServicePortName};

    const CLUSTER_IP: &str = "172.30.1.1";
    const EXTERNAL_IP: &str = "192.168.99.100";
    const LB_IP: &str = "1.2.3.4";
    const SERVING: &str = "10.240.0.4";
    const NOT_SERVING: &str = "10.240.1.5";
    const DELETED: &str = "10.240.2.6";
    const PORT: u16 = 8000;
    const TARGET: u16 = 8080;
    const NODE_PORT: u16 = 32000;
    const OTHER_PORT: u16 = 3000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn name(protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("test", "cleanup-test"),
            port: protocol.as_str().into(),
            protocol,
        }
    }

    /// One Service with a TCP and a UDP port, both on the same numbers, one serving and
    /// one non-serving endpoint each.
    fn state(endpoints: &[(&str, bool)]) -> ProxyState {
        let mut state = ProxyState::default();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let mut port = ServicePort::new(name(protocol), vec![ip(CLUSTER_IP)], PORT);
            port.external_ips = vec![ip(EXTERNAL_IP)];
            port.load_balancer_ips = vec![ip(LB_IP)];
            port.node_port = Some(NODE_PORT);
            state.services.insert(name(protocol), Arc::new(port));
            let eps = endpoints
                .iter()
                .map(|(addr, serving)| Endpoint {
                    serving: *serving,
                    ready: *serving,
                    ..Endpoint::ready(ip(addr), TARGET)
                })
                .collect();
            state.endpoints.insert(name(protocol), Arc::new(eps));
        }
        state
    }

    fn entry(dst: &str, dst_port: u16, reply_src: &str, reply_port: u16) -> FlowEntry {
        FlowEntry {
            original: FlowTuple {
                src: ip("10.0.0.9"),
                dst: ip(dst),
                src_port: 40000,
                dst_port,
            },
            reply: FlowTuple {
                src: ip(reply_src),
                dst: ip("10.0.0.9"),
                src_port: reply_port,
                dst_port: 40000,
            },
            zone: 0,
        }
    }

    #[test]
    fn entries_not_dnated_to_a_serving_endpoint_of_the_port_are_stale() {
        let state = state(&[(SERVING, true), (NOT_SERVING, false)]);
        let mut entries = Vec::new();
        let mut expected = Vec::new();
        for backend in [SERVING, NOT_SERVING, DELETED] {
            for dst in [CLUSTER_IP, EXTERNAL_IP, LB_IP] {
                for port in [PORT, OTHER_PORT] {
                    let e = entry(dst, port, backend, TARGET);
                    entries.push(e);
                    if port == PORT && backend != SERVING {
                        expected.push(e);
                    }
                }
            }
            // To the NodePort on any node address.
            let e = entry("192.168.100.1", NODE_PORT, backend, TARGET);
            entries.push(e);
            if backend != SERVING {
                expected.push(e);
            }
        }
        // The serving endpoint's IP on another port is not that endpoint.
        let wrong_port = entry(CLUSTER_IP, PORT, SERVING, 9999);
        entries.push(wrong_port);
        expected.push(wrong_port);
        // Not DNATed at all (sent while there was no rule): stale on the Service port.
        for dst in [CLUSTER_IP, EXTERNAL_IP, LB_IP] {
            let e = entry(dst, PORT, dst, PORT);
            entries.push(e);
            expected.push(e);
            entries.push(entry(dst, OTHER_PORT, dst, OTHER_PORT));
        }
        let stale: Vec<FlowEntry> = stale_entries(&state, IpFamily::V4, &entries)
            .into_iter()
            .copied()
            .collect();
        assert_eq!(stale, expected);
        assert!(stale_entries(&state, IpFamily::V6, &entries).is_empty());
    }

    #[test]
    fn a_port_without_serving_endpoints_is_left_alone() {
        let entries = [
            entry(CLUSTER_IP, PORT, SERVING, TARGET),
            entry(CLUSTER_IP, PORT, DELETED, TARGET),
            entry("192.168.100.1", NODE_PORT, DELETED, TARGET),
        ];
        for endpoints in [&[][..], &[(NOT_SERVING, false)][..]] {
            assert!(stale_entries(&state(endpoints), IpFamily::V4, &entries).is_empty());
        }
        // A Service that is gone is not judged either.
        assert!(stale_entries(&ProxyState::default(), IpFamily::V4, &entries).is_empty());
    }

    #[test]
    fn only_udp_endpoint_changes_call_for_a_reconciliation() {
        let before = state(&[(SERVING, true)]);
        assert!(!cleanup_required(&before, &before.clone()));
        assert!(cleanup_required(&ProxyState::default(), &before));
        assert!(cleanup_required(&before, &ProxyState::default()));
        let mut tcp_only = before.clone();
        tcp_only
            .endpoints
            .insert(name(Protocol::Tcp), Arc::new(Vec::new()));
        assert!(!cleanup_required(&before, &tcp_only));
        let mut udp = before.clone();
        udp.endpoints
            .insert(name(Protocol::Udp), Arc::new(Vec::new()));
        assert!(cleanup_required(&before, &udp));
        // A Service change alone does not.
        let mut service = before.clone();
        let mut port = (*service.services[&name(Protocol::Udp)]).clone();
        port.port = 9000;
        service.services.insert(name(Protocol::Udp), Arc::new(port));
        assert!(!cleanup_required(&before, &service));
    }
}
