//! Clients that send one request from inside a namespace and report what
//! happened in a way tests can assert on ("refused", not just "failed").

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;
use crate::server::{sctp_available, sctp_unavailable, Proto};

/// What the UDP clients send.
const UDP_PAYLOAD: &[u8] = b"ping\n";

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// Actively refused: TCP reset / ECONNREFUSED, or an ICMP port unreachable
    /// (for UDP: ECONNREFUSED from recv on the connected socket).
    Refused,
    /// ICMP host/network unreachable (EHOSTUNREACH / ENETUNREACH).
    Unreachable,
    /// Nothing came back in time (dropped somewhere).
    Timeout,
    /// Anything else, including failing to enter the namespace.
    Other(io::Error),
}

impl RequestError {
    fn from_io(e: io::Error) -> RequestError {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => return RequestError::Refused,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => return RequestError::Unreachable,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RequestError::Timeout,
            _ => RequestError::Other(e),
        }
    }

    /// The key [`spread`] counts this error under: "!refused", "!unreachable",
    /// "!timeout" or "!error".
    pub fn label(&self) -> &'static str {
        match self {
            RequestError::Refused => "!refused",
            RequestError::Unreachable => "!unreachable",
            RequestError::Timeout => "!timeout",
            RequestError::Other(_) => "!error",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Refused => f.write_str("refused"),
            RequestError::Unreachable => f.write_str("unreachable"),
            RequestError::Timeout => f.write_str("timed out"),
            RequestError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Other(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> RequestError {
        RequestError::from_io(e)
    }
}

/// Runs `f` inside `ns`, folding a failure to enter the namespace into `Other`.
fn in_ns<T: Send>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T, RequestError> + Send,
) -> Result<T, RequestError> {
    ns.run(f)
        .map_err(|e| RequestError::Other(io::Error::other(format!("{e:#}"))))?
}

/// Connects over TCP from `ns` to `addr`, reads until the server closes and
/// returns the reply without its trailing newline (a name server's name).
pub fn tcp_request(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_ns(ns, || request_here(Proto::Tcp, addr, None, timeout))
}

/// Like [`tcp_request`] over SCTP; `Other(Unsupported)` when the kernel has no SCTP.
pub fn sctp_request(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_ns(ns, || request_here(Proto::Sctp, addr, None, timeout))
}

/// Sends one UDP datagram from `ns` (ephemeral source port) to `addr` and
/// returns the reply without its trailing newline.
pub fn udp_request(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_ns(ns, || request_here(Proto::Udp, addr, None, timeout))
}

/// Like [`udp_request`] but from the fixed source port `local_port`, for
/// "same client port, same conntrack entry" tests.
pub fn udp_request_from(
    ns: &Netns,
    local_port: u16,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_ns(ns, || {
        request_here(Proto::Udp, addr, Some(local_port), timeout)
    })
}

/// One request of protocol `proto` from `ns`; see [`tcp_request`], [`udp_request`].
pub fn request(
    ns: &Netns,
    proto: Proto,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_ns(ns, || request_here(proto, addr, None, timeout))
}

/// Sends `data` over TCP to an echo server, closes the sending side and returns
/// everything read back until the server closes.
pub fn tcp_echo(
    ns: &Netns,
    addr: SocketAddr,
    data: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, RequestError> {
    in_ns(ns, || {
        let deadline = Instant::now() + timeout;
        let mut socket = connect_stream(Protocol::TCP, addr, timeout)?;
        socket.set_write_timeout(Some(timeout))?;
        // Write and read concurrently so a large payload cannot deadlock on full buffers.
        let mut writer = socket.try_clone()?;
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> io::Result<()> {
                writer.write_all(data)?;
                writer.shutdown(Shutdown::Write)
            });
            let received = read_to_end(&mut socket, deadline);
            let sent = sender.join().expect("echo sender panicked");
            let received = received?;
            sent?;
            Ok(received)
        })
    })
}

/// Sends `n` requests of protocol `proto` from `ns` to `addr`, one after the
/// other, and counts the answers: by reply (backend name) or, for failures, by
/// [`RequestError::label`]. Fails only if the namespace cannot be entered.
pub fn spread(
    ns: &Netns,
    addr: SocketAddr,
    proto: Proto,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, usize>> {
    ns.run(|| {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let key = match request_here(proto, addr, None, timeout) {
                Ok(reply) => reply,
                Err(e) => e.label().to_string(),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    })
}

/// One request from the calling thread's namespace (use inside [`Netns::run`]
/// to batch many requests into one thread). `local_port` fixes the source
/// port (UDP only; ignored for TCP and SCTP).
pub fn request_here(
    proto: Proto,
    addr: SocketAddr,
    local_port: Option<u16>,
    timeout: Duration,
) -> Result<String, RequestError> {
    let deadline = Instant::now() + timeout;
    let reply = match proto {
        Proto::Tcp => read_to_end(&mut connect_stream(Protocol::TCP, addr, timeout)?, deadline)?,
        Proto::Sctp => {
            if !sctp_available() {
                return Err(RequestError::Other(sctp_unavailable()));
            }
            read_to_end(
                &mut connect_stream(Protocol::SCTP, addr, timeout)?,
                deadline,
            )?
        }
        Proto::Udp => udp_exchange(addr, local_port, timeout)?,
    };
    let mut text = String::from_utf8_lossy(&reply).into_owned();
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

fn connect_stream(protocol: Protocol, addr: SocketAddr, timeout: Duration) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(protocol))?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket)
}

fn read_to_end(socket: &mut Socket, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        match socket.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn udp_exchange(
    addr: SocketAddr,
    local_port: Option<u16>,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(port) = local_port {
        // Lets back-to-back requests reuse the port while an old socket lingers.
        socket.set_reuse_address(true)?;
        let any: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        socket.bind(&SocketAddr::new(any, port).into())?;
    }
    let socket: UdpSocket = socket.into();
    // connect() so ICMP port unreachable surfaces as ECONNREFUSED on recv.
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(UDP_PAYLOAD)?;
    let mut buf = [0u8; 64 * 1024];
    let n = socket.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}
