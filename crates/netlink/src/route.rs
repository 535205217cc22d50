//! rtnetlink for what ipvs mode needs of the host's interfaces: a dummy link and its
//! addresses (create, find, delete; add, list, remove), so no `ip` tool is needed.
//! Numbers from the kernel's `rtnetlink.h`, `if_link.h` and `if_addr.h`.

use std::net::IpAddr;

use crate::{
    attr, DecodeError, Message, RequestError, Socket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;

const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, index.
const IFADDRMSG_LEN: usize = 8;

fn ifinfomsg() -> [u8; IFINFOMSG_LEN] {
    // AF_UNSPEC, index 0: the link is named by IFLA_IFNAME.
    [0; IFINFOMSG_LEN]
}

fn ifaddrmsg(addr: IpAddr, prefix: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let family = match addr {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let mut out = [0u8; IFADDRMSG_LEN];
    out[0] = u8::try_from(family).unwrap_or(0);
    out[1] = prefix;
    // flags 0; scope 0 (global), as `ip addr add` gives a non-loopback link.
    out[4..8].copy_from_slice(&index.to_ne_bytes());
    out
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `RTM_NEWLINK` creating a dummy link `name`; fails with EEXIST if it exists.
pub fn new_dummy(seq: u32, name: &str) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut msg = Message::new(RTM_NEWLINK, flags, seq, &ifinfomsg());
    msg.str(IFLA_IFNAME, name);
    msg.begin_nested(IFLA_LINKINFO);
    msg.str(IFLA_INFO_KIND, "dummy");
    msg.end_nested();
    msg.finish()
}

/// `RTM_DELLINK` of the link `name`.
pub fn del_link(seq: u32, name: &str) -> Vec<u8> {
    let mut msg = Message::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg());
    msg.str(IFLA_IFNAME, name);
    msg.finish()
}

/// `RTM_GETLINK` of the link `name`: one `RTM_NEWLINK` reply, or ENODEV.
pub fn get_link(seq: u32, name: &str) -> Vec<u8> {
    let mut msg = Message::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg());
    msg.str(IFLA_IFNAME, name);
    msg.finish()
}

/// `RTM_NEWADDR`/`RTM_DELADDR` of `addr/prefix` on the link `index`. Both the local and
/// the peer address are `addr`, as `ip addr add` sends them for a link without a peer.
pub fn address(seq: u32, add: bool, index: u32, addr: IpAddr, prefix: u8) -> Vec<u8> {
    let (kind, flags) = if add {
        (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut msg = Message::new(kind, flags, seq, &ifaddrmsg(addr, prefix, index));
    let bytes = addr_bytes(addr);
    msg.attr(IFA_LOCAL, &bytes);
    msg.attr(IFA_ADDRESS, &bytes);
    msg.finish()
}

/// `RTM_GETADDR` dump of every address of every link, both families.
pub fn get_addresses(seq: u32) -> Vec<u8> {
    let header = [0u8; IFADDRMSG_LEN];
    Message::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, &header).finish()
}

/// The index of a link from an `RTM_NEWLINK` payload.
pub fn parse_link_index(payload: &[u8]) -> Result<u32, DecodeError> {
    crate::read_u32(payload, 4)
}

/// `(link index, address)` from an `RTM_NEWADDR` payload: the local address, or for
/// links that have none (IPv6) the address.
pub fn parse_address(payload: &[u8]) -> Result<(u32, IpAddr), DecodeError> {
    let family = i32::from(*payload.first().ok_or(DecodeError::Truncated)?);
    let index = crate::read_u32(payload, 4)?;
    let attrs = payload.get(IFADDRMSG_LEN..).ok_or(DecodeError::Truncated)?;
    let bytes = match attr(attrs, IFA_LOCAL)? {
        Some(local) => local,
        None => attr(attrs, IFA_ADDRESS)?.ok_or(DecodeError::Missing("IFA_ADDRESS"))?,
    };
    let addr = match family {
        libc::AF_INET => <[u8; 4]>::try_from(bytes).map(IpAddr::from),
        libc::AF_INET6 => <[u8; 16]>::try_from(bytes).map(IpAddr::from),
        _ => return Err(DecodeError::Unsupported("ifa_family")),
    }
    .map_err(|_| DecodeError::Unsupported("IFA_ADDRESS"))?;
    Ok((index, addr))
}

/// A `NETLINK_ROUTE` socket for links and addresses, kept open.
pub struct Route {
    socket: Socket,
}

impl Route {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, RequestError> {
        Ok(Route {
            socket: Socket::open(libc::NETLINK_ROUTE)?,
        })
    }

    /// The index of the link `name`, or `None` when there is no such link.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, RequestError> {
        let seq = self.socket.next_seq();
        let mut index = None;
        let result = self.socket.request_each(&get_link(seq, name), |payload| {
            index = Some(parse_link_index(payload)?);
            Ok(())
        });
        match result {
            Ok(()) => Ok(index),
            Err(RequestError::Kernel { errno, .. }) if errno == libc::ENODEV => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Creates the dummy link `name` (down, as `ip link add NAME type dummy` leaves it).
    pub fn add_dummy(&mut self, name: &str) -> Result<(), RequestError> {
        let seq = self.socket.next_seq();
        self.socket.request(&new_dummy(seq, name)).map(drop)
    }

    /// Deletes the link `name`, with its addresses.
    pub fn delete_link(&mut self, name: &str) -> Result<(), RequestError> {
        let seq = self.socket.next_seq();
        self.socket.request(&del_link(seq, name)).map(drop)
    }

    /// Every address of every link, as `(link index, address)`.
    pub fn addresses(&mut self) -> Result<Vec<(u32, IpAddr)>, RequestError> {
        let seq = self.socket.next_seq();
        let mut out = Vec::new();
        self.socket.request_each(&get_addresses(seq), |payload| {
            out.push(parse_address(payload)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Adds `addr/prefix` to the link `index`; an address already there is no error.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), RequestError> {
        self.change_address(true, index, addr, prefix, libc::EEXIST)
    }

    /// Removes `addr/prefix` from the link `index`; an address already gone is no error.
    pub fn delete_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), RequestError> {
        self.change_address(false, index, addr, prefix, libc::EADDRNOTAVAIL)
    }

    /// `done`: the errno saying the address already is as asked.
    fn change_address(
        &mut self,
        add: bool,
        index: u32,
        addr: IpAddr,
        prefix: u8,
        done: i32,
    ) -> Result<(), RequestError> {
        let seq = self.socket.next_seq();
        match self.socket.request(&address(seq, add, index, addr, prefix)) {
            Err(RequestError::Kernel { errno, .. }) if errno == done => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split;

    #[test]
    fn dummy_link_request_names_the_link_and_its_kind() {
        let bytes = new_dummy(7, "kube-ipvs0");
        let msgs = split(&bytes).expect("split");
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, RTM_NEWLINK);
        assert_eq!(msgs[0].seq, 7);
        let flags = crate::read_u16(&bytes, 6).expect("flags");
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let attrs = &msgs[0].payload[IFINFOMSG_LEN..];
        assert_eq!(
            attr(attrs, IFLA_IFNAME).unwrap(),
            Some(&b"kube-ipvs0\0"[..])
        );
        let info = attr(attrs, IFLA_LINKINFO).unwrap().expect("linkinfo");
        assert_eq!(attr(info, IFLA_INFO_KIND).unwrap(), Some(&b"dummy\0"[..]));
    }

    #[test]
    fn address_request_round_trips_through_the_reply_parser() {
        for (addr, prefix) in [
            ("10.96.0.10".parse::<IpAddr>().unwrap(), 32),
            ("fd00:96::10".parse().unwrap(), 128),
        ] {
            let bytes = address(3, true, 42, addr, prefix);
            let msgs = split(&bytes).expect("split");
            assert_eq!(msgs[0].kind, RTM_NEWADDR);
            assert_eq!(msgs[0].payload[1], prefix);
            // The kernel's RTM_NEWADDR replies have the same layout as the request.
            assert_eq!(parse_address(msgs[0].payload), Ok((42, addr)));
            let del = address(4, false, 42, addr, prefix);
            assert_eq!(split(&del).unwrap()[0].kind, RTM_DELADDR);
        }
    }

    #[test]
    fn address_reply_without_local_uses_the_address_and_bad_lengths_are_errors() {
        let mut header = ifaddrmsg("fe80::1".parse().unwrap(), 64, 2).to_vec();
        let mut msg = Message::new(RTM_NEWADDR, 0, 1, &header);
        msg.attr(IFA_ADDRESS, &addr_bytes("fe80::1".parse().unwrap()));
        let bytes = msg.finish();
        let payload = split(&bytes).unwrap()[0].payload.to_vec();
        assert_eq!(parse_address(&payload), Ok((2, "fe80::1".parse().unwrap())));

        header[0] = u8::try_from(libc::AF_INET).unwrap();
        let mut msg = Message::new(RTM_NEWADDR, 0, 1, &header);
        msg.attr(IFA_LOCAL, &[1, 2, 3]);
        let bytes = msg.finish();
        assert_eq!(
            parse_address(split(&bytes).unwrap()[0].payload),
            Err(DecodeError::Unsupported("IFA_ADDRESS"))
        );
        assert_eq!(parse_address(&[2, 0]), Err(DecodeError::Truncated));
    }
}
