//! Small TCP, UDP and SCTP servers that answer with their name or echo.

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// How often listeners look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How long a connection may stay idle before its thread gives up.
const IDLE: Duration = Duration::from_secs(10);

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// All three protocols.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// TCP and UDP, plus SCTP when [`sctp_available`].
    pub fn available() -> Vec<Proto> {
        Proto::ALL
            .into_iter()
            .filter(|p| *p != Proto::Sctp || sctp_available())
            .collect()
    }

    /// Lower-case name as used by nftables and Kubernetes ("tcp", "udp", "sctp").
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether this kernel can create SCTP sockets (the `sctp` module may be
/// missing or not loadable). Checked once per process.
pub fn sctp_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(
        || match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::SCTP)) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("SCTP is not available in this kernel: {e}");
                false
            }
        },
    )
}

/// The error for SCTP use on a kernel without SCTP.
pub(crate) fn sctp_unavailable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SCTP is not available in this kernel (socket(IPPROTO_SCTP) fails; \
         is the sctp module loaded?); check testkit::sctp_available() first",
    )
}

/// What a server does with a connection or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServeMode {
    /// Send `"<name>\n"` and close (TCP/SCTP); reply `"<name>\n"` to each datagram (UDP).
    #[default]
    Name,
    /// Send back everything received until the client closes (TCP/SCTP);
    /// reply to each datagram with its own payload (UDP).
    Echo,
    /// Like `Name`, followed by a space and the client's address as the server saw it
    /// (`"be0 192.168.100.1"`): tells whether the proxy masqueraded.
    NameAndPeer,
}

/// Running servers; dropping the guard stops them (within ~50 ms) and closes
/// the listening sockets. Connections already accepted finish on their own.
#[derive(Debug)]
pub struct ServerGuard {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    protos: Vec<Proto>,
}

impl ServerGuard {
    /// The protocols being served.
    pub fn protos(&self) -> &[Proto] {
        &self.protos
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Listens on `[::]:port` (dual-stack, so IPv4 too) in `ns` for each of
/// `protos` and answers as `name` according to `mode`. Fails if a port is
/// taken or SCTP is asked for but unavailable.
pub fn serve(
    ns: &Netns,
    name: &str,
    port: u16,
    protos: &[Proto],
    mode: ServeMode,
) -> Result<ServerGuard> {
    if protos.contains(&Proto::Sctp) && !sctp_available() {
        bail!("{}", sctp_unavailable());
    }
    // Sockets keep the namespace they were created in, so only creation needs
    // the namespace; serving happens on ordinary threads.
    let sockets = ns
        .run(|| {
            protos
                .iter()
                .map(|&p| listen(p, port).map(|s| (p, s)))
                .collect::<Result<Vec<_>>>()
        })?
        .with_context(|| format!("serving {name} on port {port} in {}", ns.name()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (proto, socket) in sockets {
        let stop = stop.clone();
        let name = name.to_string();
        let t = std::thread::Builder::new()
            .name(format!("{name}-{proto}-{port}"))
            .spawn(move || match proto {
                Proto::Udp => serve_udp(socket.into(), &name, mode, &stop),
                Proto::Tcp | Proto::Sctp => serve_stream(socket, &name, mode, &stop),
            })
            .context("spawning server thread")?;
        threads.push(t);
    }
    Ok(ServerGuard {
        stop,
        threads,
        protos: protos.to_vec(),
    })
}

fn listen(proto: Proto, port: u16) -> Result<Socket> {
    let (ty, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
        Proto::Sctp => (Type::STREAM, Protocol::SCTP),
    };
    let socket =
        Socket::new(Domain::IPV6, ty, Some(protocol)).with_context(|| format!("{proto} socket"))?;
    socket.set_only_v6(false)?;
    if ty == Type::STREAM {
        // Quick restarts on the same port despite TIME_WAIT. Not for UDP, where
        // it would let a second server share the port silently.
        socket.set_reuse_address(true)?;
    }
    // accept() and recv() honour SO_RCVTIMEO, which lets the loops see the stop flag.
    socket.set_read_timeout(Some(STOP_POLL))?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {proto} {addr}"))?;
    if ty == Type::STREAM {
        socket.listen(128)?;
    }
    Ok(socket)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The client's address without the IPv4-mapped IPv6 wrapping of dual-stack sockets.
fn peer_ip(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "?".to_string(), |p| p.ip().to_canonical().to_string())
}

fn serve_stream(listener: Socket, name: &str, mode: ServeMode, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                tracing::debug!("{name}: connection from {:?}", peer.as_socket());
                let conn_name = match mode {
                    ServeMode::NameAndPeer => format!("{name} {}", peer_ip(peer.as_socket())),
                    _ => name.to_string(),
                };
                // One thread per connection so a slow client cannot block others.
                let spawned = std::thread::Builder::new()
                    .name(format!("{name}-conn"))
                    .spawn(move || {
                        if let Err(e) = handle_stream(conn, &conn_name, mode) {
                            tracing::debug!("{conn_name}: connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("{name}: spawning connection thread: {e}");
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("{name}: accept: {e}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

fn handle_stream(mut conn: Socket, name: &str, mode: ServeMode) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    conn.set_write_timeout(Some(IDLE))?;
    let mut buf = [0u8; 16 * 1024];
    match mode {
        ServeMode::Name | ServeMode::NameAndPeer => {
            conn.write_all(format!("{name}\n").as_bytes())?;
            conn.shutdown(Shutdown::Write)?;
            // Drain until the client closes: closing with unread data would
            // send a reset instead of a clean end.
            while conn.read(&mut buf)? > 0 {}
        }
        ServeMode::Echo => {
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
            }
            conn.shutdown(Shutdown::Write)?;
        }
    }
    Ok(())
}

fn serve_udp(socket: UdpSocket, name: &str, mode: ServeMode, stop: &AtomicBool) {
    let reply_name = format!("{name}\n");
    let mut buf = [0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                tracing::debug!("{name}: datagram from {peer}");
                let with_peer;
                let reply = match mode {
                    ServeMode::Name => reply_name.as_bytes(),
                    ServeMode::NameAndPeer => {
                        with_peer = format!("{name} {}\n", peer_ip(Some(peer)));
                        with_peer.as_bytes()
                    }
                    ServeMode::Echo => &buf[..n],
                };
                if let Err(e) = socket.send_to(reply, peer) {
                    tracing::debug!("{name}: reply to {peer}: {e}");
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // e.g. ECONNREFUSED left over from an earlier reply's ICMP error.
                tracing::debug!("{name}: recv: {e}");
            }
        }
    }
}
