//! Conntrack: the UDP entries the reconciler lists and deletes, over ctnetlink (no
//! `conntrack` tool on the node), and the `--conntrack-*` sysctls.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use netlink::{DecodeError, Message, RequestError, Socket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use proxy_core::model::IpFamily;
use proxy_core::stale::{Conntrack, FlowEntry, FlowTuple};

// ctnetlink (linux/netfilter/nfnetlink_conntrack.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;
/// `nfgenmsg` is 4 bytes: family, version, resource id.
const NFGENMSG_LEN: usize = 4;

fn af(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => libc::AF_INET as u8,
        IpFamily::V6 => libc::AF_INET6 as u8,
    }
}

fn nfgenmsg(family: IpFamily) -> [u8; NFGENMSG_LEN] {
    [af(family), 0, 0, 0]
}

/// The conntrack table over a kept-open `NETLINK_NETFILTER` socket.
#[derive(Default)]
pub struct ConntrackNetlink {
    socket: Option<Socket>,
}

impl ConntrackNetlink {
    fn socket(&mut self) -> Result<&mut Socket, RequestError> {
        if self.socket.is_none() {
            self.socket = Some(Socket::open(libc::NETLINK_NETFILTER)?);
        }
        // Just filled in when it was empty.
        self.socket
            .as_mut()
            .ok_or(RequestError::Decode(DecodeError::Truncated))
    }
}

fn be16(data: &[u8], name: &'static str) -> Result<u16, DecodeError> {
    data.get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or(DecodeError::Missing(name))
}

fn address(data: &[u8]) -> Result<IpAddr, DecodeError> {
    if let Ok(v4) = <[u8; 4]>::try_from(data) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    <[u8; 16]>::try_from(data)
        .map(|v6| IpAddr::V6(Ipv6Addr::from(v6)))
        .map_err(|_| DecodeError::Unsupported("CTA_IP address"))
}

/// A tuple nest; `None` when it is not UDP.
fn decode_tuple(data: &[u8]) -> Result<Option<FlowTuple>, DecodeError> {
    let mut ips = (None, None);
    let mut ports = (None, None);
    let mut udp = false;
    for item in netlink::Attrs(data) {
        let (kind, payload) = item?;
        match kind {
            CTA_TUPLE_IP => {
                for item in netlink::Attrs(payload) {
                    let (kind, payload) = item?;
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => ips.0 = Some(address(payload)?),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => ips.1 = Some(address(payload)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for item in netlink::Attrs(payload) {
                    let (kind, payload) = item?;
                    match kind {
                        CTA_PROTO_NUM => udp = payload.first() == Some(&IPPROTO_UDP),
                        CTA_PROTO_SRC_PORT => ports.0 = Some(be16(payload, "CTA_PROTO_SRC_PORT")?),
                        CTA_PROTO_DST_PORT => ports.1 = Some(be16(payload, "CTA_PROTO_DST_PORT")?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !udp {
        return Ok(None);
    }
    Ok(Some(FlowTuple {
        src: ips.0.ok_or(DecodeError::Missing("CTA_IP source"))?,
        dst: ips.1.ok_or(DecodeError::Missing("CTA_IP destination"))?,
        src_port: ports.0.ok_or(DecodeError::Missing("CTA_PROTO_SRC_PORT"))?,
        dst_port: ports.1.ok_or(DecodeError::Missing("CTA_PROTO_DST_PORT"))?,
    }))
}

/// One `IPCTNL_MSG_CT_NEW` message of a dump; `None` for entries other than UDP.
pub fn decode_entry(payload: &[u8]) -> Result<Option<FlowEntry>, DecodeError> {
    let attrs = payload.get(NFGENMSG_LEN..).ok_or(DecodeError::Truncated)?;
    let (mut original, mut reply, mut zone) = (None, None, 0);
    for item in netlink::Attrs(attrs) {
        let (kind, payload) = item?;
        match kind {
            CTA_TUPLE_ORIG => match decode_tuple(payload)? {
                Some(t) => original = Some(t),
                None => return Ok(None),
            },
            CTA_TUPLE_REPLY => reply = decode_tuple(payload)?,
            CTA_ZONE => zone = be16(payload, "CTA_ZONE")?,
            _ => {}
        }
    }
    match (original, reply) {
        (Some(original), Some(reply)) => Ok(Some(FlowEntry {
            original,
            reply,
            zone,
        })),
        _ => Ok(None),
    }
}

/// Writes a UDP tuple nest (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`).
fn put_tuple(m: &mut Message, kind: u16, t: &FlowTuple) {
    let (src, dst) = match IpFamily::of(&t.dst) {
        IpFamily::V4 => (CTA_IP_V4_SRC, CTA_IP_V4_DST),
        IpFamily::V6 => (CTA_IP_V6_SRC, CTA_IP_V6_DST),
    };
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    m.begin_nested(kind);
    m.begin_nested(CTA_TUPLE_IP);
    m.attr(src, &octets(t.src));
    m.attr(dst, &octets(t.dst));
    m.end_nested();
    m.begin_nested(CTA_TUPLE_PROTO);
    m.attr(CTA_PROTO_NUM, &[IPPROTO_UDP]);
    m.attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
    m.attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
    m.end_nested();
    m.end_nested();
}

/// The `IPCTNL_MSG_CT_DELETE` request for one entry, found by its original tuple.
pub fn delete_message(entry: &FlowEntry, seq: u32) -> Vec<u8> {
    let family = IpFamily::of(&entry.original.dst);
    let mut m = Message::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &nfgenmsg(family),
    );
    put_tuple(&mut m, CTA_TUPLE_ORIG, &entry.original);
    if entry.zone != 0 {
        m.attr(CTA_ZONE, &entry.zone.to_be_bytes());
    }
    m.finish()
}

impl Conntrack for ConntrackNetlink {
    fn list_udp(&mut self, family: IpFamily) -> Result<Vec<FlowEntry>, String> {
        let socket = self.socket().map_err(|e| e.to_string())?;
        let seq = socket.next_seq();
        let request = Message::new(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &nfgenmsg(family),
        )
        .finish();
        let mut out = Vec::new();
        let result = socket.request_each(&request, |payload| {
            if let Some(entry) = decode_entry(payload)? {
                out.push(entry);
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(out),
            // The table changed under the dump: go on with what was read, as upstream.
            Err(RequestError::Kernel { errno, .. }) if errno == libc::EINTR => Ok(out),
            Err(e) => {
                // A socket left mid-dump is reopened next time.
                self.socket = None;
                Err(format!("listing conntrack entries: {e}"))
            }
        }
    }

    fn delete(&mut self, entries: &[FlowEntry]) -> (u64, Vec<String>) {
        let mut deleted = 0;
        let mut errors = Vec::new();
        for entry in entries {
            let socket = match self.socket() {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e.to_string());
                    break;
                }
            };
            let seq = socket.next_seq();
            match socket.request(&delete_message(entry, seq)) {
                Ok(_) => deleted += 1,
                // Gone already (expired, or deleted by someone else): nothing to do.
                Err(RequestError::Kernel { errno, .. }) if errno == libc::ENOENT => {}
                Err(e) => errors.push(format!("{:?}: {e}", entry.original)),
            }
        }
        (deleted, errors)
    }
}

/// The `--conntrack-*` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// Entries per CPU core (0: leave the limit alone).
    pub max_per_core: u32,
    /// Lower bound for the limit.
    pub min: u32,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

const NETFILTER: &str = "/proc/sys/net/netfilter";

/// Writes one sysctl if it differs; describes what could not be done.
fn set(path: &Path, value: u64, warnings: &mut Vec<String>) {
    let current = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if current == Some(value) {
        return;
    }
    match std::fs::write(path, value.to_string()) {
        Ok(()) => tracing::info!(sysctl = %path.display(), value, "set conntrack sysctl"),
        // Inside a network namespace the global ones are read-only: say so, go on.
        Err(e) => warnings.push(format!("cannot set {} to {value}: {e}", path.display())),
    }
}

/// The largest `nf_conntrack_max` the proxy sets (upstream v1.36): beyond it the table's
/// memory, not its size, becomes the limit on big machines.
pub const CONNTRACK_MAX_CAP: u64 = 1 << 20;

/// The `nf_conntrack_max` to set: `--conntrack-max-per-core` × cores, at least
/// `--conntrack-min`, at most [`CONNTRACK_MAX_CAP`]; `None` when per-core is 0 (leave the
/// limit alone).
pub fn conntrack_max(settings: &ConntrackSettings, cpus: usize) -> Option<u64> {
    if settings.max_per_core == 0 {
        return None;
    }
    let scaled = u64::from(settings.max_per_core).saturating_mul(cpus as u64);
    Some(scaled.max(u64::from(settings.min)).min(CONNTRACK_MAX_CAP))
}

/// Applies the settings where writable; returns a warning per setting that was not.
pub fn apply_sysctls(settings: &ConntrackSettings, cpus: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    let dir = Path::new(NETFILTER);
    if let Some(max) = conntrack_max(settings, cpus) {
        set(&dir.join("nf_conntrack_max"), max, &mut warnings);
        // The hash table should hold a quarter of the entries, as upstream sets it; only
        // ever grow it.
        let hashsize = Path::new("/sys/module/nf_conntrack/parameters/hashsize");
        let current = std::fs::read_to_string(hashsize)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if current.is_some_and(|c| c < max / 4) {
            set(hashsize, max / 4, &mut warnings);
        }
    }
    let seconds = [
        (
            "nf_conntrack_tcp_timeout_established",
            settings.tcp_established_timeout,
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            settings.tcp_close_wait_timeout,
        ),
        ("nf_conntrack_udp_timeout", settings.udp_timeout),
        (
            "nf_conntrack_udp_timeout_stream",
            settings.udp_stream_timeout,
        ),
    ];
    for (name, value) in seconds {
        if let Some(d) = value.filter(|d| !d.is_zero()) {
            set(&dir.join(name), d.as_secs(), &mut warnings);
        }
    }
    if settings.tcp_be_liberal {
        set(&dir.join("nf_conntrack_tcp_be_liberal"), 1, &mut warnings);
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> FlowEntry {
        FlowEntry {
            original: FlowTuple {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.96.0.53".parse().unwrap(),
                src_port: 40000,
                dst_port: 53,
            },
            reply: FlowTuple {
                src: "10.244.1.2".parse().unwrap(),
                dst: "10.0.0.1".parse().unwrap(),
                src_port: 5353,
                dst_port: 40000,
            },
            zone: 7,
        }
    }

    /// A dump message as the kernel sends it: nfgenmsg, both tuples, the zone; `proto`
    /// replaces UDP's number to make other entries.
    fn listed(e: &FlowEntry, proto: u8) -> Vec<u8> {
        let mut m = Message::new(0, 0, 1, &nfgenmsg(IpFamily::V4));
        put_tuple(&mut m, CTA_TUPLE_ORIG, &e.original);
        put_tuple(&mut m, CTA_TUPLE_REPLY, &e.reply);
        m.attr(CTA_ZONE, &e.zone.to_be_bytes());
        let mut bytes = m.finish()[netlink::NLMSG_HDRLEN..].to_vec();
        if proto != IPPROTO_UDP {
            // CTA_PROTO_NUM attributes: length 5, type 1, then the number.
            let pattern = [5, 0, CTA_PROTO_NUM as u8, 0, IPPROTO_UDP];
            for i in 0..bytes.len().saturating_sub(pattern.len()) {
                if bytes[i..i + pattern.len()] == pattern {
                    bytes[i + 4] = proto;
                }
            }
        }
        bytes
    }

    #[test]
    fn conntrack_max_scales_with_cores_between_min_and_the_cap() {
        let settings = |max_per_core, min| ConntrackSettings {
            max_per_core,
            min,
            ..Default::default()
        };
        assert_eq!(conntrack_max(&settings(0, 131_072), 8), None);
        assert_eq!(conntrack_max(&settings(32_768, 131_072), 2), Some(131_072));
        assert_eq!(conntrack_max(&settings(32_768, 131_072), 8), Some(262_144));
        assert_eq!(
            conntrack_max(&settings(32_768, 131_072), 32),
            Some(1_048_576)
        );
        assert_eq!(
            conntrack_max(&settings(32_768, 131_072), 96),
            Some(1_048_576)
        );
        assert_eq!(
            conntrack_max(&settings(32_768, 4_000_000), 2),
            Some(1_048_576)
        );
        assert_eq!(
            conntrack_max(&settings(u32::MAX, 0), usize::MAX),
            Some(1_048_576)
        );
    }

    #[test]
    fn listed_udp_entries_decode_and_others_are_skipped() {
        let e = entry();
        assert_eq!(decode_entry(&listed(&e, IPPROTO_UDP)), Ok(Some(e)));
        assert_eq!(decode_entry(&listed(&e, 6)), Ok(None));
        assert!(decode_entry(&[0, 0]).is_err());
    }

    /// The delete request names the entry by its original tuple and zone, in the layout
    /// the decoder reads.
    #[test]
    fn delete_request_names_the_original_tuple() {
        let e = entry();
        let bytes = delete_message(&e, 1);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x102);
        let expected = listed(&e, IPPROTO_UDP);
        let payload = &bytes[netlink::NLMSG_HDRLEN..];
        // nfgenmsg + the original tuple are the same bytes; then the zone.
        let orig_len = u16::from_ne_bytes([payload[4], payload[5]]) as usize;
        assert_eq!(payload[..4 + orig_len], expected[..4 + orig_len]);
        assert_eq!(&payload[4 + orig_len..], &[6, 0, 18, 0, 0, 7, 0, 0]);
    }
}
