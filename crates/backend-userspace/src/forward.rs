//! The forwarding tasks: one accept loop per TCP listener, one receive loop per UDP
//! listener. Each reads the port's [`Balancer`] when a connection or session starts, so an
//! endpoint change applies to the next connection at once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::balancer::Balancer;

/// Buffer per direction of a TCP connection: large enough that a bulk transfer is not
/// limited by system calls, small enough for thousands of connections.
const TCP_BUFFER: usize = 64 * 1024;
/// At most this many endpoints are tried for one connection before giving up.
const MAX_CONNECT_TRIES: usize = 3;
/// Pause after an accept error (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Largest UDP payload.
const UDP_BUFFER: usize = 64 * 1024;

pub type SharedBalancer = Arc<Mutex<Balancer>>;

pub fn lock(balancer: &Mutex<Balancer>) -> MutexGuard<'_, Balancer> {
    // The balancer is consistent after every method call, so a panic elsewhere while the
    // lock was held leaves nothing half-done.
    balancer.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every forwarding task of one Service port shares.
#[derive(Debug, Clone)]
pub struct PortContext {
    /// `namespace/name:port/proto`, for logs.
    pub name: Arc<str>,
    pub balancer: SharedBalancer,
    pub connect_timeout: Duration,
    pub udp_idle_timeout: Duration,
}

/// Accepts connections until `stop` fires or its sender is dropped; the listening socket
/// closes on return. Connections already accepted run in their own tasks and are left to
/// finish.
pub async fn serve_tcp(listener: TcpListener, ctx: PortContext, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tokio::spawn(proxy_tcp(client, peer, ctx.clone()));
            }
            Err(err) => {
                tracing::warn!(service = %ctx.name, error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn proxy_tcp(mut client: TcpStream, peer: SocketAddr, ctx: PortContext) {
    let candidates = lock(&ctx.balancer).candidates(peer.ip(), Instant::now());
    for ep in candidates.into_iter().take(MAX_CONNECT_TRIES) {
        let connected = tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(ep)).await;
        let mut backend = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(service = %ctx.name, endpoint = %ep, error = %err, "connect failed; trying the next endpoint");
                continue;
            }
            Err(_) => {
                tracing::debug!(service = %ctx.name, endpoint = %ep, "connect timed out; trying the next endpoint");
                continue;
            }
        };
        lock(&ctx.balancer).record(peer.ip(), ep, Instant::now());
        // Small request/response exchanges should not wait for Nagle.
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);
        tracing::trace!(service = %ctx.name, client = %peer, endpoint = %ep, "forwarding");
        // Copies both ways; when one side finishes sending, the other side's write half
        // is shut down and the remaining direction carries on (half-close).
        let result = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut backend,
            TCP_BUFFER,
            TCP_BUFFER,
        )
        .await;
        if let Err(err) = result {
            tracing::debug!(service = %ctx.name, client = %peer, endpoint = %ep, error = %err, "connection ended with an error");
        }
        return;
    }
    // No endpoint answered: reset rather than close, so the client sees a failure and
    // not an empty reply.
    tracing::debug!(service = %ctx.name, client = %peer, "no endpoint reachable; resetting");
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
}

/// One client address's UDP session: a socket connected to the chosen endpoint.
#[derive(Debug)]
struct Session {
    endpoint: SocketAddr,
    backend: UdpSocket,
    /// Milliseconds since the listener's epoch of the last datagram either way.
    last_active: AtomicU64,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Receives datagrams until the task is aborted, keeping a session per client address.
/// A session whose endpoint left is replaced at the client's next datagram; an idle
/// session ends after `udp_idle_timeout`. When `stop` fires (or its sender is dropped)
/// every session ends too, and the port's socket is closed by the time this returns, so
/// clients are refused from then on.
pub async fn serve_udp(socket: UdpSocket, ctx: PortContext, mut stop: oneshot::Receiver<()>) {
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    let mut relays = JoinSet::new();
    let epoch = Instant::now();
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let received = tokio::select! {
            _ = &mut stop => {
                // The relays hold the socket to send replies: wait until they are gone.
                relays.shutdown().await;
                return;
            }
            received = socket.recv_from(&mut buf) => received,
        };
        let (n, client) = match received {
            Ok(received) => received,
            Err(err) => {
                tracing::debug!(service = %ctx.name, error = %err, "UDP receive failed");
                continue;
            }
        };
        // Reap relays of expired sessions.
        while relays.try_join_next().is_some() {}
        let existing = sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned();
        let session = match existing {
            Some(s) if lock(&ctx.balancer).contains(&s.endpoint) => s,
            _ => match open_session(&socket, &sessions, &mut relays, client, &ctx, epoch).await {
                Some(s) => s,
                None => continue,
            },
        };
        session
            .last_active
            .store(millis_since(epoch), Ordering::Relaxed);
        if let Err(err) = session.backend.send(&buf[..n]).await {
            tracing::debug!(service = %ctx.name, endpoint = %session.endpoint, error = %err, "UDP send failed");
        }
    }
}

async fn open_session(
    listener: &Arc<UdpSocket>,
    sessions: &Sessions,
    relays: &mut JoinSet<()>,
    client: SocketAddr,
    ctx: &PortContext,
    epoch: Instant,
) -> Option<Arc<Session>> {
    let candidates = lock(&ctx.balancer).candidates(client.ip(), Instant::now());
    let endpoint = *candidates.first()?;
    let backend = match connected_udp(endpoint).await {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(service = %ctx.name, endpoint = %endpoint, error = %err, "cannot open a UDP session");
            return None;
        }
    };
    lock(&ctx.balancer).record(client.ip(), endpoint, Instant::now());
    let session = Arc::new(Session {
        endpoint,
        backend,
        last_active: AtomicU64::new(millis_since(epoch)),
    });
    sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(client, Arc::clone(&session));
    relays.spawn(relay_replies(
        Arc::clone(listener),
        Arc::clone(sessions),
        client,
        Arc::clone(&session),
        ctx.clone(),
        epoch,
    ));
    Some(session)
}

async fn connected_udp(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = match endpoint {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(endpoint).await?;
    Ok(socket)
}

/// Sends the endpoint's replies back to the client from the listener's socket, until the
/// session has been idle for the timeout.
async fn relay_replies(
    listener: Arc<UdpSocket>,
    sessions: Sessions,
    client: SocketAddr,
    session: Arc<Session>,
    ctx: PortContext,
    epoch: Instant,
) {
    let idle = ctx.udp_idle_timeout;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        match tokio::time::timeout(idle, session.backend.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                session
                    .last_active
                    .store(millis_since(epoch), Ordering::Relaxed);
                if let Err(err) = listener.send_to(&buf[..n], client).await {
                    tracing::debug!(service = %ctx.name, client = %client, error = %err, "UDP reply failed");
                }
            }
            // E.g. ICMP port unreachable from the endpoint: nothing to relay; the session
            // still expires when idle.
            Ok(Err(err)) => {
                tracing::debug!(service = %ctx.name, endpoint = %session.endpoint, error = %err, "UDP receive from endpoint failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {}
        }
        let quiet = millis_since(epoch).saturating_sub(session.last_active.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            break;
        }
    }
    let mut map = sessions.lock().unwrap_or_else(|e| e.into_inner());
    if map.get(&client).is_some_and(|s| Arc::ptr_eq(s, &session)) {
        map.remove(&client);
    }
}
