//! Generic netlink messages for the kernel's IPVS family, encoded and decoded by hand.
//!
//! Pure: no sockets here, so the bytes can be tested without root or an IPVS kernel.
//! Numbers are from the kernel's `include/uapi/linux/ip_vs.h` and `genetlink.h`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_core::model::Protocol;

use crate::plan::{RealServer, RealServerState, ServiceSpec, Timeouts, VirtualServer};

use netlink::{attrs, find, read_u16, read_u32, Message};
pub use netlink::{split, DecodeError, Received, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const GENL_HDRLEN: usize = 4;

// The generic netlink controller, to resolve the family name "IPVS" to its id.
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

// Commands.
pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_SET_CONFIG: u8 = 12;
pub const IPVS_CMD_FLUSH: u8 = 17;

// Top-level attributes.
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Nested in IPVS_CMD_ATTR_SERVICE.
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;

// Nested in IPVS_CMD_ATTR_DEST.
const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVECONNS: u16 = 7;
const IPVS_DEST_ATTR_INACTCONNS: u16 = 8;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: session affinity.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding, the only method kube-proxy uses.
const IP_VS_CONN_F_MASQ: u32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A generic netlink message: `genlmsghdr` is the command, the family version and two
/// reserved bytes.
fn genl_message(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Message {
    Message::new(family, flags, seq, &[cmd, version, 0, 0])
}

fn af(addr: &IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first four.
fn inet_addr(addr: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

fn ip_proto(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn protocol_of(number: u16) -> Option<Protocol> {
    match number {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

fn service_key(msg: &mut Message, vs: &VirtualServer) {
    msg.u16(IPVS_SVC_ATTR_AF, af(&vs.addr));
    msg.u16(IPVS_SVC_ATTR_PROTOCOL, ip_proto(vs.protocol));
    msg.attr(IPVS_SVC_ATTR_ADDR, &inet_addr(&vs.addr));
    // Ports travel in network byte order.
    msg.attr(IPVS_SVC_ATTR_PORT, &vs.port.to_be_bytes());
}

fn service_full(msg: &mut Message, spec: &ServiceSpec) {
    service_key(msg, &spec.vs);
    let mut name = spec.scheduler.as_bytes().to_vec();
    name.push(0);
    msg.attr(IPVS_SVC_ATTR_SCHED_NAME, &name);
    let flags = if spec.persistence_timeout.is_some() {
        IP_VS_SVC_F_PERSISTENT
    } else {
        0
    };
    // struct ip_vs_flags { flags, mask }: the mask says which bits to set.
    let mut both = [0u8; 8];
    both[..4].copy_from_slice(&flags.to_ne_bytes());
    both[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    msg.attr(IPVS_SVC_ATTR_FLAGS, &both);
    msg.u32(IPVS_SVC_ATTR_TIMEOUT, spec.persistence_timeout.unwrap_or(0));
    let netmask = match spec.vs.addr {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    };
    msg.u32(IPVS_SVC_ATTR_NETMASK, netmask);
}

fn nested_service_key(msg: &mut Message, vs: &VirtualServer) {
    msg.begin_nested(IPVS_CMD_ATTR_SERVICE);
    service_key(msg, vs);
    msg.end_nested();
}

/// Resolves the IPVS family's id.
pub fn get_family(seq: u32) -> Vec<u8> {
    let mut msg = genl_message(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    let mut name = IPVS_GENL_NAME.as_bytes().to_vec();
    name.push(0);
    msg.attr(CTRL_ATTR_FAMILY_NAME, &name);
    msg.finish()
}

/// `IPVS_CMD_NEW_SERVICE` (`set == false`) or `IPVS_CMD_SET_SERVICE`.
pub fn service(family: u16, seq: u32, spec: &ServiceSpec, set: bool) -> Vec<u8> {
    let cmd = if set {
        IPVS_CMD_SET_SERVICE
    } else {
        IPVS_CMD_NEW_SERVICE
    };
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        IPVS_GENL_VERSION,
    );
    msg.begin_nested(IPVS_CMD_ATTR_SERVICE);
    service_full(&mut msg, spec);
    msg.end_nested();
    msg.finish()
}

pub fn del_service(family: u16, seq: u32, vs: &VirtualServer) -> Vec<u8> {
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IPVS_CMD_DEL_SERVICE,
        IPVS_GENL_VERSION,
    );
    nested_service_key(&mut msg, vs);
    msg.finish()
}

/// `IPVS_CMD_NEW_DEST` or (`set == true`) `IPVS_CMD_SET_DEST` with a weight.
pub fn dest(
    family: u16,
    seq: u32,
    vs: &VirtualServer,
    rs: &RealServer,
    weight: u32,
    set: bool,
) -> Vec<u8> {
    let cmd = if set {
        IPVS_CMD_SET_DEST
    } else {
        IPVS_CMD_NEW_DEST
    };
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        IPVS_GENL_VERSION,
    );
    nested_service_key(&mut msg, vs);
    msg.begin_nested(IPVS_CMD_ATTR_DEST);
    msg.attr(IPVS_DEST_ATTR_ADDR, &inet_addr(&rs.addr));
    msg.attr(IPVS_DEST_ATTR_PORT, &rs.port.to_be_bytes());
    msg.u32(IPVS_DEST_ATTR_FWD_METHOD, IP_VS_CONN_F_MASQ);
    msg.u32(IPVS_DEST_ATTR_WEIGHT, weight);
    msg.u32(IPVS_DEST_ATTR_U_THRESH, 0);
    msg.u32(IPVS_DEST_ATTR_L_THRESH, 0);
    msg.u16(IPVS_DEST_ATTR_ADDR_FAMILY, af(&rs.addr));
    msg.end_nested();
    msg.finish()
}

pub fn del_dest(family: u16, seq: u32, vs: &VirtualServer, rs: &RealServer) -> Vec<u8> {
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IPVS_CMD_DEL_DEST,
        IPVS_GENL_VERSION,
    );
    nested_service_key(&mut msg, vs);
    msg.begin_nested(IPVS_CMD_ATTR_DEST);
    msg.attr(IPVS_DEST_ATTR_ADDR, &inet_addr(&rs.addr));
    msg.attr(IPVS_DEST_ATTR_PORT, &rs.port.to_be_bytes());
    msg.u16(IPVS_DEST_ATTR_ADDR_FAMILY, af(&rs.addr));
    msg.end_nested();
    msg.finish()
}

/// Dumps every virtual server.
pub fn get_services(family: u16, seq: u32) -> Vec<u8> {
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_SERVICE,
        IPVS_GENL_VERSION,
    )
    .finish()
}

/// Dumps the real servers of one virtual server.
pub fn get_dests(family: u16, seq: u32, vs: &VirtualServer) -> Vec<u8> {
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_DEST,
        IPVS_GENL_VERSION,
    );
    nested_service_key(&mut msg, vs);
    msg.finish()
}

/// Sets the connection timeouts in seconds (`--ipvs-tcp-timeout` ...); the kernel
/// leaves a timeout of 0 unchanged.
pub fn set_timeouts(family: u16, seq: u32, timeouts: &Timeouts) -> Vec<u8> {
    let mut msg = genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IPVS_CMD_SET_CONFIG,
        IPVS_GENL_VERSION,
    );
    msg.u32(IPVS_CMD_ATTR_TIMEOUT_TCP, timeouts.tcp);
    msg.u32(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, timeouts.tcp_fin);
    msg.u32(IPVS_CMD_ATTR_TIMEOUT_UDP, timeouts.udp);
    msg.finish()
}

/// Removes every virtual server (`--cleanup`).
pub fn flush(family: u16, seq: u32) -> Vec<u8> {
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IPVS_CMD_FLUSH,
        IPVS_GENL_VERSION,
    )
    .finish()
}

/// One received netlink message: its type, and the bytes after the netlink header.
/// The family id from the controller's reply to [`get_family`].
pub fn parse_family(payload: &[u8]) -> Result<u16, DecodeError> {
    let list = attrs(payload.get(GENL_HDRLEN..).ok_or(DecodeError::Truncated)?)?;
    read_u16(find(&list, CTRL_ATTR_FAMILY_ID, "CTRL_ATTR_FAMILY_ID")?, 0)
}

fn parse_addr(af: u16, raw: &[u8]) -> Result<IpAddr, DecodeError> {
    match af {
        AF_INET => {
            let b: [u8; 4] = raw
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        AF_INET6 => {
            let b: [u8; 16] = raw
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => Err(DecodeError::Unsupported("address family")),
    }
}

fn port(raw: &[u8]) -> Result<u16, DecodeError> {
    let b: [u8; 2] = raw
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::Truncated)?;
    Ok(u16::from_be_bytes(b))
}

/// A virtual server from a `GET_SERVICE` dump message. `Ok(None)` for services keyed by
/// firewall mark or an unknown protocol: not ours.
pub fn parse_service(payload: &[u8]) -> Result<Option<ServiceSpec>, DecodeError> {
    let top = attrs(payload.get(GENL_HDRLEN..).ok_or(DecodeError::Truncated)?)?;
    let svc = attrs(find(&top, IPVS_CMD_ATTR_SERVICE, "IPVS_CMD_ATTR_SERVICE")?)?;
    let Ok(addr_raw) = find(&svc, IPVS_SVC_ATTR_ADDR, "IPVS_SVC_ATTR_ADDR") else {
        return Ok(None);
    };
    let af = read_u16(find(&svc, IPVS_SVC_ATTR_AF, "IPVS_SVC_ATTR_AF")?, 0)?;
    let proto = read_u16(
        find(&svc, IPVS_SVC_ATTR_PROTOCOL, "IPVS_SVC_ATTR_PROTOCOL")?,
        0,
    )?;
    let Some(protocol) = protocol_of(proto) else {
        return Ok(None);
    };
    let sched = find(&svc, IPVS_SVC_ATTR_SCHED_NAME, "IPVS_SVC_ATTR_SCHED_NAME")?;
    let scheduler = String::from_utf8_lossy(sched)
        .trim_end_matches('\0')
        .to_string();
    let flags = read_u32(find(&svc, IPVS_SVC_ATTR_FLAGS, "IPVS_SVC_ATTR_FLAGS")?, 0)?;
    let timeout = read_u32(
        find(&svc, IPVS_SVC_ATTR_TIMEOUT, "IPVS_SVC_ATTR_TIMEOUT")?,
        0,
    )?;
    Ok(Some(ServiceSpec {
        vs: VirtualServer {
            addr: parse_addr(af, addr_raw)?,
            protocol,
            port: port(find(&svc, IPVS_SVC_ATTR_PORT, "IPVS_SVC_ATTR_PORT")?)?,
        },
        scheduler,
        persistence_timeout: (flags & IP_VS_SVC_F_PERSISTENT != 0).then_some(timeout),
    }))
}

/// A real server from a `GET_DEST` dump message; `af` is its virtual server's family,
/// used when the kernel does not report the destination's own.
pub fn parse_dest(payload: &[u8], vs_af_is_v6: bool) -> Result<RealServerState, DecodeError> {
    let top = attrs(payload.get(GENL_HDRLEN..).ok_or(DecodeError::Truncated)?)?;
    let d = attrs(find(&top, IPVS_CMD_ATTR_DEST, "IPVS_CMD_ATTR_DEST")?)?;
    let af = match find(&d, IPVS_DEST_ATTR_ADDR_FAMILY, "IPVS_DEST_ATTR_ADDR_FAMILY") {
        Ok(raw) => read_u16(raw, 0)?,
        Err(_) if vs_af_is_v6 => AF_INET6,
        Err(_) => AF_INET,
    };
    let u32_of = |kind, name| -> Result<u32, DecodeError> { read_u32(find(&d, kind, name)?, 0) };
    Ok(RealServerState {
        rs: RealServer {
            addr: parse_addr(af, find(&d, IPVS_DEST_ATTR_ADDR, "IPVS_DEST_ATTR_ADDR")?)?,
            port: port(find(&d, IPVS_DEST_ATTR_PORT, "IPVS_DEST_ATTR_PORT")?)?,
        },
        weight: u32_of(IPVS_DEST_ATTR_WEIGHT, "IPVS_DEST_ATTR_WEIGHT")?,
        active: u32_of(IPVS_DEST_ATTR_ACTIVECONNS, "IPVS_DEST_ATTR_ACTIVECONNS").unwrap_or(0),
        inactive: u32_of(IPVS_DEST_ATTR_INACTCONNS, "IPVS_DEST_ATTR_INACTCONNS").unwrap_or(0),
    })
}
