//! Netlink framing shared by the backends that talk to the kernel directly (IPVS over
//! generic netlink, nftables over nfnetlink): building messages with nested attributes,
//! splitting replies, and a socket that waits for the kernel's acknowledgements;
//! `route` holds the rtnetlink requests for links and addresses.
#![forbid(unsafe_code)]

pub mod route;

use std::io::Read as _;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket as RawSocket, Type};

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLMSG_HDRLEN: usize = 16;

/// A reply that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated netlink message")]
    Truncated,
    #[error("missing attribute {0}")]
    Missing(&'static str),
    #[error("unsupported value in attribute {0}")]
    Unsupported(&'static str),
}

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("undecodable netlink reply: {0}")]
    Decode(#[from] DecodeError),
    /// The kernel refused a message (errno as a positive number).
    #[error("{message} (errno {errno})")]
    Kernel { errno: i32, message: String },
}

/// One netlink message being built: the header, a family-specific header, attributes.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    /// Offsets of the nested attributes still open.
    open: Vec<usize>,
}

impl Message {
    /// `header` follows the netlink header: `genlmsghdr`, `nfgenmsg`, ...
    pub fn new(kind: u16, flags: u16, seq: u32, header: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(header);
        Message {
            buf,
            open: Vec::new(),
        }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        // Payloads are small (addresses, names); a nested list closes with its own length.
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn u16(&mut self, kind: u16, value: u16) {
        self.attr(kind, &value.to_ne_bytes());
    }

    pub fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_ne_bytes());
    }

    /// A big-endian (network order) 32-bit value, as nfnetlink wants its numbers.
    pub fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    /// A NUL-terminated string.
    pub fn str(&mut self, kind: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    pub fn begin_nested(&mut self, kind: u16) {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost nested attribute. One longer than an attribute can say (64
    /// KiB) is an error the caller avoids by splitting its messages.
    pub fn end_nested(&mut self) {
        if let Some(start) = self.open.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// Bytes so far: to keep a message under a size limit.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Received<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub fn split(mut data: &[u8]) -> Result<Vec<Received<'_>>, DecodeError> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = read_u32(data, 0)? as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(DecodeError::Truncated);
        }
        out.push(Received {
            kind: read_u16(data, 4)?,
            seq: read_u32(data, 8)?,
            payload: &data[NLMSG_HDRLEN..len],
        });
        let next = align4(len).min(data.len());
        data = &data[next..];
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` message (0 for an acknowledgement), as a positive number.
pub fn error_code(payload: &[u8]) -> Result<i32, DecodeError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::Truncated)?;
    Ok(-i32::from_ne_bytes(bytes))
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub fn read_u16(data: &[u8], at: usize) -> Result<u16, DecodeError> {
    data.get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or(DecodeError::Truncated)
}

pub fn read_u32(data: &[u8], at: usize) -> Result<u32, DecodeError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(DecodeError::Truncated)
}

/// The attributes of a block, as (type without flags, payload).
pub fn attrs(data: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    Attrs(data).collect()
}

/// The attributes of a block one by one, without collecting them: dumps of large tables
/// decode hundreds of thousands of small nests.
#[derive(Debug, Clone)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = self.0;
        if data.len() < 4 {
            return None;
        }
        let parsed = read_u16(data, 0).and_then(|len| Ok((len as usize, read_u16(data, 2)?)));
        let (len, kind) = match parsed {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        if len < 4 || len > data.len() {
            self.0 = &[];
            return Some(Err(DecodeError::Truncated));
        }
        self.0 = &data[align4(len).min(data.len())..];
        Some(Ok((kind & NLA_TYPE_MASK, &data[4..len])))
    }
}

/// The payload of the first attribute of type `kind` in a block, if any.
pub fn attr(data: &[u8], kind: u16) -> Result<Option<&[u8]>, DecodeError> {
    for item in Attrs(data) {
        let (k, payload) = item?;
        if k == kind {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

pub fn find<'a>(
    list: &[(u16, &'a [u8])],
    kind: u16,
    name: &'static str,
) -> Result<&'a [u8], DecodeError> {
    list.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| *v)
        .ok_or(DecodeError::Missing(name))
}

fn kernel_error(errno: i32) -> RequestError {
    RequestError::Kernel {
        errno,
        message: std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// A netlink socket of one protocol, kept open: opening and closing one per request costs
/// the kernel more than the request itself.
pub struct Socket {
    socket: RawSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// `protocol`: `libc::NETLINK_GENERIC`, `libc::NETLINK_NETFILTER`, ...
    pub fn open(protocol: i32) -> Result<Self, RequestError> {
        let socket = RawSocket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(protocol)),
        )
        .map_err(RequestError::Socket)?;
        // A kernel that never answers must not hang the sync.
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(RequestError::Socket)?;
        Ok(Socket {
            socket,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and collects the payloads of the replies until the
    /// acknowledgement (or, for dumps, `NLMSG_DONE`).
    pub fn request(&mut self, message: &[u8]) -> Result<Vec<Vec<u8>>, RequestError> {
        let mut out = Vec::new();
        self.request_each(message, |payload| {
            out.push(payload.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    /// Sends one request and hands each reply's payload to `each` as it arrives, until
    /// the acknowledgement (or, for dumps, `NLMSG_DONE`): a dump of a large table is
    /// never held whole. An error from `each` ends the request (the rest of the dump is
    /// read and dropped, so the socket stays usable).
    pub fn request_each(
        &mut self,
        message: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), DecodeError>,
    ) -> Result<(), RequestError> {
        let seq = read_u32(message, 8)?;
        self.socket.send(message).map_err(RequestError::Socket)?;
        let mut failed: Option<DecodeError> = None;
        loop {
            let n = (&self.socket)
                .read(&mut self.buf)
                .map_err(RequestError::Socket)?;
            for msg in split(&self.buf[..n])? {
                if msg.seq != seq {
                    continue; // a late reply to an earlier request
                }
                match msg.kind {
                    NLMSG_DONE => return failed.map_or(Ok(()), |e| Err(e.into())),
                    NLMSG_ERROR => {
                        let errno = error_code(msg.payload)?;
                        if errno != 0 {
                            return Err(kernel_error(errno));
                        }
                        return failed.map_or(Ok(()), |e| Err(e.into()));
                    }
                    _ if failed.is_none() => failed = each(msg.payload).err(),
                    _ => {}
                }
            }
        }
    }

    /// Sends an nfnetlink batch in one datagram and waits for the acknowledgement of its
    /// last message (`last_seq`). A refused message fails the batch (the kernel then
    /// applies none of it); so does a failed commit, which the kernel reports against the
    /// batch's first message (`begin_seq`). Both arrive before that acknowledgement.
    pub fn send_batch(
        &mut self,
        batch: &[u8],
        begin_seq: u32,
        last_seq: u32,
    ) -> Result<(), RequestError> {
        // A full load is one datagram of several megabytes: the buffer must hold it.
        if self
            .socket
            .send_buffer_size()
            .map_err(RequestError::Socket)?
            < batch.len()
        {
            // Past the system's limit only with CAP_NET_ADMIN; without it the send fails
            // with EMSGSIZE and the caller takes another way.
            let forced = setsockopt(&self.socket, sockopt::SndBufForce, &batch.len());
            if forced.is_err() {
                self.socket
                    .set_send_buffer_size(batch.len())
                    .map_err(RequestError::Socket)?;
            }
        }
        // Each refused message comes back quoted in its error: room for all of them, or
        // they overflow the buffer (ENOBUFS) and the kernel's reason is lost. Only memory
        // the replies use is taken; the kernel doubles the value for its bookkeeping.
        let replies = batch.len() + 64 * 1024;
        if self
            .socket
            .recv_buffer_size()
            .map_err(RequestError::Socket)?
            < replies
        {
            // Without CAP_NET_ADMIN the system's rmem_max caps it; an overflow is then
            // reported as such below.
            if setsockopt(&self.socket, sockopt::RcvBufForce, &replies).is_err() {
                let _ = self.socket.set_recv_buffer_size(replies);
            }
        }
        self.socket.send(batch).map_err(RequestError::Socket)?;
        let in_batch = |seq: u32| seq.wrapping_sub(begin_seq) <= last_seq.wrapping_sub(begin_seq);
        let mut refused = None;
        loop {
            let n = (&self.socket).read(&mut self.buf).map_err(|err| {
                // Only errors need room (one acknowledgement is asked for), so an
                // overflow means the kernel refused the batch: it applied none of it.
                if err.raw_os_error() == Some(libc::ENOBUFS) {
                    RequestError::Socket(std::io::Error::other(
                        "the kernel refused the batch; its error replies overflowed the \
                         socket's receive buffer (ENOBUFS), so its reason is unknown",
                    ))
                } else {
                    RequestError::Socket(err)
                }
            })?;
            for msg in split(&self.buf[..n])? {
                if msg.kind != NLMSG_ERROR || !in_batch(msg.seq) {
                    continue; // a late reply to an earlier batch
                }
                let errno = error_code(msg.payload)?;
                if errno != 0 && refused.is_none() {
                    refused = Some(errno);
                }
                if msg.seq == last_seq {
                    return match refused {
                        Some(errno) => Err(kernel_error(errno)),
                        None => Ok(()),
                    };
                }
            }
        }
    }
}
