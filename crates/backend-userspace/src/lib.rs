//! The userspace proxier: a listener per Service port that forwards TCP and UDP to the
//! port's endpoints, round robin, with `ClientIP` affinity.
//!
//! * As root (`redirect`), listeners take ephemeral ports on all addresses and the
//!   tables `ip`/`ip6 kube-proxy-userspace` ([`rules`]) redirect the Service's ClusterIPs,
//!   external IPs, load-balancer IPs and NodePort to them.
//! * Without root, each Service port is served on the bind address at the Service's port
//!   (its NodePort when it has one); a port that cannot be bound is logged and skipped.
//!
//! `sync` runs on the runner's blocking thread: it opens and closes listeners itself
//! (binding is synchronous and cheap) and hands their sockets to tasks on the runtime it
//! was built in. Endpoint changes replace the port's [`balancer::Balancer`] contents, so
//! they apply to the next connection; established TCP connections are left to finish.

pub mod balancer;
mod forward;
pub mod localhost;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend_nftables::apply::NftRunner;
use proxy_core::model::{IpFamily, Protocol, ServicePort, ServicePortName};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};
use proxy_core::select::select;
use socket2::{Domain, Socket, Type};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::balancer::Balancer;
use crate::forward::{lock, PortContext};
use crate::rules::Target;

/// Upstream's default `--udp-timeout` for the userspace proxy.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a connection to one endpoint may take before the next one is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pending connections per TCP listener.
const LISTEN_BACKLOG: i32 = 4096;

/// How the userspace proxier serves Service ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// Root: ephemeral-port listeners, nftables redirects Service IPs to them. Otherwise
    /// listeners on `bind_ip` at each Service's port, no kernel rules.
    pub redirect: bool,
    /// Where listeners bind without `redirect` (see [`listen_ip`]).
    pub bind_ip: IpAddr,
    /// A UDP session ends after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Families the redirect tables are programmed in.
    pub families: Vec<IpFamily>,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            redirect: true,
            bind_ip: Ipv4Addr::LOCALHOST.into(),
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            families: vec![IpFamily::V4, IpFamily::V6],
        }
    }
}

/// Whether this process may program the kernel (redirect mode): effective uid 0.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The address non-root listeners bind for `--bind-address`: an unspecified address (the
/// default `0.0.0.0`, or `::`) means loopback, so an unprivileged proxy never exposes
/// cluster Services on every interface by accident; any other address is used as given.
pub fn listen_ip(bind_address: IpAddr) -> IpAddr {
    match bind_address {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        other => other,
    }
}

/// How long a sync waits for removed listeners to close their sockets.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// One Service port's listener. Dropping it stops its task (the task sees `stop`'s sender
/// go), which closes the socket; [`close`] also waits for that.
struct Listener {
    addr: SocketAddr,
    port: u16,
    balancer: forward::SharedBalancer,
    _stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Closes `listeners` and waits (bounded) until their sockets are closed, so that when a
/// sync returns, a removed port already refuses connections.
fn close(handle: &Handle, listeners: Vec<Listener>) {
    if listeners.is_empty() {
        return;
    }
    let tasks: Vec<JoinHandle<()>> = listeners.into_iter().map(|l| l.task).collect();
    let waited = handle.block_on(tokio::time::timeout(CLOSE_WAIT, async {
        for task in tasks {
            let _ = task.await;
        }
    }));
    if waited.is_err() {
        tracing::warn!("closing listeners took longer than {CLOSE_WAIT:?}");
    }
}

/// The userspace backend. `R` runs the redirect rules (`nft -f -`).
pub struct UserspaceProxier<R: NftRunner> {
    config: UserspaceConfig,
    runner: R,
    handle: Option<Handle>,
    listeners: BTreeMap<ServicePortName, Listener>,
    /// The last bind error reported per port, so a port that stays unbindable is warned
    /// about once, not at every sync.
    bind_failures: BTreeMap<ServicePortName, String>,
    unsupported_reported: BTreeSet<ServicePortName>,
    /// The rules the kernel holds; `None` before the first sync and after a failure.
    programmed: Option<String>,
    fd_limit_raised: bool,
}

impl<R: NftRunner> UserspaceProxier<R> {
    /// Captures the current tokio runtime if there is one (else the first sync does).
    pub fn new(config: UserspaceConfig, runner: R) -> Self {
        UserspaceProxier {
            config,
            runner,
            handle: Handle::try_current().ok(),
            listeners: BTreeMap::new(),
            bind_failures: BTreeMap::new(),
            unsupported_reported: BTreeSet::new(),
            programmed: None,
            fd_limit_raised: false,
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The local address each served Service port listens on (tests, the demo).
    pub fn listening(&self) -> BTreeMap<ServicePortName, SocketAddr> {
        self.listeners
            .iter()
            .map(|(name, l)| (name.clone(), SocketAddr::new(l.addr.ip(), l.port)))
            .collect()
    }

    fn listen_addr(&self, sp: &ServicePort) -> SocketAddr {
        if self.config.redirect {
            let any: IpAddr = if self.config.families.contains(&IpFamily::V6) {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            SocketAddr::new(any, 0)
        } else {
            SocketAddr::new(self.config.bind_ip, sp.node_port.unwrap_or(sp.port))
        }
    }

    fn open(
        &self,
        handle: &Handle,
        sp: &ServicePort,
        addr: SocketAddr,
        balancer: Balancer,
    ) -> io::Result<Listener> {
        open_listener(
            handle,
            &sp.name,
            sp.protocol(),
            addr,
            balancer,
            self.config.connect_timeout,
            self.config.udp_idle_timeout,
        )
    }

    /// Opens, updates and closes listeners to match the state; returns what each Service
    /// port's traffic should meet.
    fn reconcile<'a>(
        &mut self,
        handle: &Handle,
        request: &'a SyncRequest,
    ) -> Vec<(&'a ServicePort, Target)> {
        let state = &request.state;
        let mut targets = Vec::new();
        let mut served = BTreeSet::new();
        let mut closing = Vec::new();
        for (name, sp) in &state.services {
            if sp.protocol() == Protocol::Sctp {
                if self.unsupported_reported.insert(name.clone()) {
                    tracing::warn!(service = %name, "SCTP is not supported in userspace mode; port not served");
                }
                continue;
            }
            // Cluster endpoints of both families (ready, else serving-terminating; topology
            // hints honoured); the balancer picks the client's family.
            let endpoints: Vec<SocketAddr> = [IpFamily::V4, IpFamily::V6]
                .into_iter()
                .flat_map(|family| {
                    select(sp, state.endpoints_of(name), family, &state.node).cluster
                })
                .map(|e| SocketAddr::new(e.ip, e.port))
                .collect();
            // No usable endpoint: no listener, so connections are refused.
            if endpoints.is_empty() {
                targets.push((sp.as_ref(), Target::Reject));
                continue;
            }
            let affinity = sp
                .session_affinity_timeout
                .map(|s| Duration::from_secs(u64::from(s)));
            let addr = self.listen_addr(sp);
            match self.listeners.get(name) {
                Some(l) if l.addr == addr => lock(&l.balancer).update(endpoints, affinity),
                _ => {
                    closing.extend(self.listeners.remove(name));
                    match self.open(handle, sp, addr, Balancer::new(endpoints, affinity)) {
                        Ok(listener) => {
                            tracing::info!(service = %name, address = %SocketAddr::new(addr.ip(), listener.port), "serving Service port");
                            self.bind_failures.remove(name);
                            self.listeners.insert(name.clone(), listener);
                        }
                        Err(err) => {
                            let message = err.to_string();
                            if self.bind_failures.get(name) != Some(&message) {
                                tracing::warn!(service = %name, address = %addr, error = %message, "cannot listen for Service port; it is not served");
                                self.bind_failures.insert(name.clone(), message);
                            }
                            targets.push((sp.as_ref(), Target::Reject));
                            continue;
                        }
                    }
                }
            }
            if let Some(l) = self.listeners.get(name) {
                served.insert(name.clone());
                targets.push((sp.as_ref(), Target::Redirect(l.port)));
            }
        }
        let (keep, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(name, _)| served.contains(name));
        self.listeners = keep;
        closing.extend(gone.into_values());
        close(handle, closing);
        self.bind_failures
            .retain(|name, _| state.services.contains_key(name));
        self.unsupported_reported
            .retain(|name| state.services.contains_key(name));
        targets
    }
}

/// Binds `addr` for one Service port and starts the task that serves it through
/// `balancer`.
fn open_listener(
    handle: &Handle,
    name: &ServicePortName,
    protocol: Protocol,
    addr: SocketAddr,
    balancer: Balancer,
    connect_timeout: Duration,
    udp_idle_timeout: Duration,
) -> io::Result<Listener> {
    let balancer = Arc::new(Mutex::new(balancer));
    let ctx = PortContext {
        name: name.to_string().into(),
        balancer: Arc::clone(&balancer),
        connect_timeout,
        udp_idle_timeout,
    };
    let (stop, stopped) = oneshot::channel();
    let (port, task) = match protocol {
        Protocol::Tcp => {
            let socket = bind(addr, Type::STREAM)?;
            socket.listen(LISTEN_BACKLOG)?;
            let listener = tokio::net::TcpListener::from_std(socket.into())?;
            let port = listener.local_addr()?.port();
            (
                port,
                handle.spawn(forward::serve_tcp(listener, ctx, stopped)),
            )
        }
        Protocol::Udp => {
            let socket = tokio::net::UdpSocket::from_std(bind(addr, Type::DGRAM)?.into())?;
            let port = socket.local_addr()?.port();
            (port, handle.spawn(forward::serve_udp(socket, ctx, stopped)))
        }
        Protocol::Sctp => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "SCTP is not supported by the userspace proxy",
            ))
        }
    };
    Ok(Listener {
        addr,
        port,
        balancer,
        _stop: stop,
        task,
    })
}

/// A non-blocking socket bound to `addr`; an unspecified IPv6 address also takes IPv4.
fn bind(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let protocol = if ty == Type::STREAM {
        socket2::Protocol::TCP
    } else {
        socket2::Protocol::UDP
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    if ty == Type::STREAM {
        // A restarted proxy must get its ports back while old connections linger in
        // TIME_WAIT. (Not for UDP: there it would let two sockets share a port.)
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The runtime listeners run on: the one captured at construction, else the current one
/// (kept for later syncs).
fn runtime_handle(handle: &mut Option<Handle>) -> Result<Handle, ProxierError> {
    if let Some(h) = handle {
        return Ok(h.clone());
    }
    let h = Handle::try_current().map_err(|e| {
        ProxierError::Other(format!("user-space listeners need a tokio runtime: {e}"))
    })?;
    *handle = Some(h.clone());
    Ok(h)
}

/// Each connection costs two descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %err, soft, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "cannot read the open-files limit"),
    }
}

impl<R: NftRunner + Send + 'static> Proxier for UserspaceProxier<R> {
    fn mode(&self) -> &'static str {
        "userspace"
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let handle = runtime_handle(&mut self.handle)?;
        if !self.fd_limit_raised {
            raise_fd_limit();
            self.fd_limit_raised = true;
        }
        // Listener sockets register with the runtime's reactor.
        let _runtime = handle.enter();
        let targets = self.reconcile(&handle, request);
        let mut outcome = SyncOutcome {
            full: request.full,
            transaction_bytes: 0,
            service_ports: self.listeners.len(),
            ..SyncOutcome::default()
        };
        if self.config.redirect {
            let ops = rules::ops(&self.config.families, &targets);
            let script = backend_nftables::netlink::ops_text_in(rules::TABLE, &ops);
            // Endpoint-only changes leave the rules alone; the periodic full sync
            // rewrites them anyway, repairing any tampering.
            if request.full || self.programmed.as_deref() != Some(script.as_str()) {
                self.programmed = None;
                outcome.transaction_bytes = self.runner.apply_in(rules::TABLE, &ops)?;
                outcome.full = true;
                self.programmed = Some(script);
            }
        }
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.listeners.clear();
        self.programmed = None;
        self.runner
            .apply_in(rules::TABLE, &rules::cleanup_ops())
            .map(|_| ())
    }
}

impl<R: NftRunner> Drop for UserspaceProxier<R> {
    /// Unlike the kernel modes, the redirect rules go when the proxy does: they point at
    /// listeners that die with the process, and a stale rule would hand Service traffic
    /// to whatever program binds that port next.
    fn drop(&mut self) {
        self.listeners.clear();
        if self.programmed.take().is_some() {
            match self.runner.apply_in(rules::TABLE, &rules::cleanup_ops()) {
                Ok(_) => tracing::info!("removed the userspace redirect rules"),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot remove the userspace redirect rules")
                }
            }
        }
    }
}
