//! NodePorts on the node's loopback addresses for nftables mode (upstream's KEP-6032,
//! gate `KubeProxyNFTablesLocalhostNodePorts`).
//!
//! nftables cannot DNAT a connection from `127.0.0.1` to a pod without
//! `route_localnet`, which iptables mode turns on and which exposes loopback-bound
//! services to the network (CVE-2020-8558); `::1` cannot be routed at all. So, as
//! upstream, these connections are accepted in user space: a TCP listener on
//! `127.0.0.1:<nodePort>` / `[::1]:<nodePort>` forwards each connection to an endpoint
//! the NodePort would use (this node's under `externalTrafficPolicy: Local`), with
//! `ClientIP` affinity. UDP and SCTP get no listener; the nftables rules reject them (and
//! TCP NodePorts without a usable endpoint) on loopback, by the same rule
//! ([`serves_localhost_nodeport`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proxy_core::model::{IpFamily, ProxyState, ServicePortName};
use proxy_core::proxier::{
    LocalhostNodePortCounts, Proxier, ProxierError, SyncOutcome, SyncRequest,
};
use proxy_core::select::{select, serves_localhost_nodeport};
use tokio::runtime::Handle;

use crate::balancer::Balancer;
use crate::forward::lock;
use crate::{close, open_listener, runtime_handle, Listener, DEFAULT_CONNECT_TIMEOUT};

/// The loopback listeners of the families whose loopback `--nodeport-addresses` names.
pub struct LocalhostNodePorts {
    families: Vec<IpFamily>,
    connect_timeout: Duration,
    handle: Option<Handle>,
    listeners: BTreeMap<(IpFamily, ServicePortName), Listener>,
    /// The last bind error per listener, so one that keeps failing is warned about once.
    bind_failures: BTreeMap<(IpFamily, ServicePortName), String>,
}

fn loopback(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => Ipv4Addr::LOCALHOST.into(),
        IpFamily::V6 => Ipv6Addr::LOCALHOST.into(),
    }
}

impl LocalhostNodePorts {
    /// Captures the current tokio runtime if there is one (else the first sync does).
    pub fn new(families: Vec<IpFamily>) -> Self {
        LocalhostNodePorts {
            families,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handle: Handle::try_current().ok(),
            listeners: BTreeMap::new(),
            bind_failures: BTreeMap::new(),
        }
    }

    /// Where each listener accepts connections (tests).
    pub fn listening(&self) -> Vec<(ServicePortName, SocketAddr)> {
        self.listeners
            .iter()
            .map(|((_, name), l)| (name.clone(), l.addr))
            .collect()
    }

    /// Opens, updates and closes listeners to match `state`. When it returns, a removed
    /// NodePort's listener is closed and a new one accepts connections.
    pub fn reconcile(
        &mut self,
        state: &ProxyState,
    ) -> Result<Vec<LocalhostNodePortCounts>, ProxierError> {
        let handle = runtime_handle(&mut self.handle)?;
        let _runtime = handle.enter();
        let mut wanted = BTreeMap::new();
        let mut failures: BTreeMap<IpFamily, u64> = BTreeMap::new();
        let mut closing = Vec::new();
        for &family in &self.families {
            for (name, sp) in &state.services {
                let Some(node_port) = sp.node_port else {
                    continue;
                };
                if sp.cluster_ip(family).is_none() {
                    continue;
                }
                let selection = select(sp, state.endpoints_of(name), family, &state.node);
                if !serves_localhost_nodeport(sp, &selection) {
                    continue;
                }
                let endpoints: Vec<SocketAddr> = selection
                    .external(sp)
                    .iter()
                    .map(|e| SocketAddr::new(e.ip, e.port))
                    .collect();
                let affinity = sp
                    .session_affinity_timeout
                    .map(|s| Duration::from_secs(u64::from(s)));
                let key = (family, name.clone());
                let addr = SocketAddr::new(loopback(family), node_port);
                match self.listeners.get(&key) {
                    Some(l) if l.addr == addr => {
                        lock(&l.balancer).update(endpoints, affinity);
                    }
                    _ => {
                        closing.extend(self.listeners.remove(&key));
                        // The old socket must be gone before the same port is bound again.
                        close(&handle, std::mem::take(&mut closing));
                        match open_listener(
                            &handle,
                            name,
                            sp.protocol(),
                            addr,
                            Balancer::new(endpoints, affinity),
                            self.connect_timeout,
                            Duration::ZERO,
                        ) {
                            Ok(listener) => {
                                tracing::info!(service = %name, address = %addr, "serving NodePort on loopback");
                                self.bind_failures.remove(&key);
                                self.listeners.insert(key.clone(), listener);
                            }
                            Err(err) => {
                                *failures.entry(family).or_default() += 1;
                                let message = err.to_string();
                                if self.bind_failures.get(&key) != Some(&message) {
                                    tracing::warn!(service = %name, address = %addr, error = %message, "cannot listen for a loopback NodePort; it is not served on loopback");
                                    self.bind_failures.insert(key.clone(), message);
                                }
                                continue;
                            }
                        }
                    }
                }
                wanted.insert(key, ());
            }
        }
        let (keep, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(key, _)| wanted.contains_key(key));
        self.listeners = keep;
        closing.extend(gone.into_values());
        close(&handle, closing);
        self.bind_failures
            .retain(|(_, name), _| state.services.contains_key(name));
        Ok(self
            .families
            .iter()
            .map(|&family| LocalhostNodePortCounts {
                family,
                listeners: self.listeners.keys().filter(|(f, _)| *f == family).count(),
                failures: failures.get(&family).copied().unwrap_or(0),
            })
            .collect())
    }

    /// Closes every listener.
    pub fn clear(&mut self) {
        if let Ok(handle) = runtime_handle(&mut self.handle) {
            close(
                &handle,
                std::mem::take(&mut self.listeners).into_values().collect(),
            );
        }
        self.listeners.clear();
    }
}

/// A kernel-mode proxier plus the loopback NodePort listeners: the kernel rules are
/// synced first, then the listeners, whatever the kernel sync's result (they serve
/// loopback only and must follow endpoint changes even while the kernel refuses a sync).
pub struct WithLocalhostNodePorts<P> {
    inner: P,
    listeners: LocalhostNodePorts,
}

impl<P: Proxier> WithLocalhostNodePorts<P> {
    pub fn new(inner: P, families: Vec<IpFamily>) -> Self {
        WithLocalhostNodePorts {
            inner,
            listeners: LocalhostNodePorts::new(families),
        }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    pub fn listeners(&self) -> &LocalhostNodePorts {
        &self.listeners
    }
}

impl<P: Proxier> Proxier for WithLocalhostNodePorts<P> {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn prepare(&mut self) {
        self.inner.prepare();
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let kernel = self.inner.sync(request);
        let listeners = self.listeners.reconcile(&request.state);
        let mut outcome = kernel?;
        outcome.localhost_nodeports = listeners?;
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.listeners.clear();
        self.inner.cleanup()
    }
}
