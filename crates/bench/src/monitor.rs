//! An nftables monitor: a `NETLINK_NETFILTER` socket in the node's namespace, subscribed
//! to the `NFNLGRP_NFTABLES` multicast group. The kernel sends it a message for every
//! object a transaction changed, after the transaction has committed, so the time a
//! message arrives is the time the rules were in force (give or take waking this thread).
//!
//! The bench registers what it waits for (an address first in the key or in the data of a
//! map element) before making a change, then waits for it. Messages are decoded only
//! while something is awaited: a full sync at 10,000 Services sends hundreds of thousands.
//!
//! Listening has a cost: the kernel builds those messages only when someone listens
//! (`nfnetlink_has_listeners`), and it builds them inside the proxy's commit (a full sync
//! at 1,000 Services took about 60% longer with a listener). So the socket is a member of
//! the group only while something is awaited: from just before a change to its commit.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netlink::{attrs, find, split, DecodeError};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, getsockname, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// `NFNLGRP_NFTABLES` (`include/uapi/linux/netfilter/nfnetlink.h`).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_NEWGEN: u16 = 15;
const NFPROTO_IPV4: u8 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// The proxy's table (family `ip`).
const TABLE: &str = "kube-proxy";
/// Room for bursts: a full sync at 50,000 Services sends about two million messages.
const RECEIVE_BUFFER: usize = 256 << 20;

/// What the bench waits for in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A Service's cluster IP first in a key of `service-ips` (it has endpoints) or
    /// `no-endpoint-services` (it rejects): the Service is programmed.
    Service(Ipv4Addr),
    /// The cluster IP in `service-ips`: the Service has endpoints.
    ServiceReady(Ipv4Addr),
    /// An endpoint first in the data of a `slot-K` map element (any of them: `slot-K`,
    /// `local-slot-K`, `nodeport-slot-K`): traffic can reach it.
    Endpoint(Ipv4Addr),
}

/// How a target was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The monitor's message: the commit itself.
    Monitor,
    /// A lookup of the element (`--poll-interval` apart): at most that late.
    Poll,
}

/// When and where a target showed up.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub set: String,
    pub via: Via,
}

/// Counters over the monitor's life.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MonitorStats {
    pub datagrams: u64,
    pub messages: u64,
    /// Committed transactions (`NFT_MSG_NEWGEN`).
    pub generations: u64,
    /// Times the socket's buffer overflowed (`ENOBUFS`): messages were lost then.
    pub overruns: u64,
    pub decode_errors: u64,
}

#[derive(Default)]
struct State {
    wanted: HashMap<Target, Option<Seen>>,
    stats: MonitorStats,
    failed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    seen: Condvar,
    stop: AtomicBool,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Monitor {
    shared: Arc<Shared>,
    fd: Arc<OwnedFd>,
    /// The socket's port id, which a re-bind (to join or leave the group) must repeat.
    port: u32,
    thread: Option<JoinHandle<()>>,
}

/// Opens the socket; call on a thread inside the node's namespace (the socket stays
/// there when used from elsewhere).
pub fn open_socket() -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .context("opening a NETLINK_NETFILTER socket")?;
    // Past rmem_max: needs CAP_NET_ADMIN, which the bench has (it runs as root).
    setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER).context("SO_RCVBUFFORCE")?;
    // Wake up now and then to see whether to stop.
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(0, 200_000), // 200 ms
    )
    .context("SO_RCVTIMEO")?;
    // Bound, not yet listening: [`Monitor::expect`] joins the group.
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding the netlink socket")?;
    Ok(fd)
}

/// Joins (`listen`) or leaves the `NFNLGRP_NFTABLES` group: a bound netlink socket may be
/// bound again with its own port id and other groups.
fn subscribe(fd: &OwnedFd, port: u32, listen: bool) -> Result<()> {
    let groups = if listen {
        1 << (NFNLGRP_NFTABLES - 1)
    } else {
        0
    };
    bind(fd.as_raw_fd(), &NetlinkAddr::new(port, groups))
        .with_context(|| format!("setting the netlink groups to {groups:#x}"))
}

impl Monitor {
    /// Starts reading `fd` (from [`open_socket`]) on a thread of its own.
    pub fn start(fd: OwnedFd) -> Result<Monitor> {
        let port = getsockname::<NetlinkAddr>(fd.as_raw_fd())
            .context("reading the netlink socket's port id")?
            .pid();
        let fd = Arc::new(fd);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            seen: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let reader = Arc::clone(&shared);
        let reader_fd = Arc::clone(&fd);
        let thread = std::thread::Builder::new()
            .name("nft-monitor".into())
            .spawn(move || read_loop(&reader_fd, &reader))
            .context("starting the monitor thread")?;
        Ok(Monitor {
            shared,
            fd,
            port,
            thread: Some(thread),
        })
    }

    /// Starts watching for `target` (and listening, if nothing else was awaited); call
    /// before making the change.
    pub fn expect(&self, target: Target) -> Result<()> {
        let mut state = lock(&self.shared);
        if state.wanted.is_empty() {
            subscribe(&self.fd, self.port, true)?;
        }
        state.wanted.insert(target, None);
        Ok(())
    }

    /// Forgets `target`; stops listening when nothing else is awaited.
    fn forget(&self, state: &mut State, target: Target) -> Result<()> {
        state.wanted.remove(&target);
        if state.wanted.is_empty() {
            subscribe(&self.fd, self.port, false)?;
        }
        Ok(())
    }

    /// Waits until `target` (registered with [`Monitor::expect`]) shows up, at most
    /// `timeout`; then forgets it. None when it did not show up in time.
    pub fn wait(&self, target: Target, timeout: Duration) -> Result<Option<Seen>> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.shared);
        loop {
            if let Some(err) = &state.failed {
                anyhow::bail!("nftables monitor failed: {err}");
            }
            if let Some(Some(seen)) = state.wanted.get(&target) {
                let seen = seen.clone();
                self.forget(&mut state, target)?;
                return Ok(Some(seen));
            }
            let now = Instant::now();
            if now >= deadline {
                self.forget(&mut state, target)?;
                return Ok(None);
            }
            state = self
                .shared
                .seen
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn stats(&self) -> MonitorStats {
        lock(&self.shared).stats.clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_loop(fd: &OwnedFd, shared: &Shared) {
    let mut buf = vec![0u8; 1 << 20];
    while !shared.stop.load(Ordering::Relaxed) {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => {
                let at = Instant::now();
                let mut state = lock(shared);
                state.stats.datagrams += 1;
                // Counted, not fatal: one odd message must not stop the others being read.
                if handle(&buf[..n], at, &mut state).is_err() {
                    state.stats.decode_errors += 1;
                }
                if state.wanted.values().any(Option::is_some) {
                    shared.seen.notify_all();
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(Errno::ENOBUFS) => lock(shared).stats.overruns += 1,
            Err(e) => {
                lock(shared).failed = Some(e.to_string());
                shared.seen.notify_all();
                return;
            }
        }
    }
}

fn handle(datagram: &[u8], at: Instant, state: &mut State) -> Result<(), DecodeError> {
    let waiting = state.wanted.values().any(Option::is_none);
    for msg in split(datagram)? {
        state.stats.messages += 1;
        if msg.kind >> 8 != NFNL_SUBSYS_NFTABLES {
            continue;
        }
        match msg.kind & 0xff {
            NFT_MSG_NEWGEN => state.stats.generations += 1,
            NFT_MSG_NEWSETELEM if waiting => {
                for (target, set) in new_elements(msg.payload)? {
                    if let Some(slot @ None) = state.wanted.get_mut(&target) {
                        *slot = Some(Seen {
                            at,
                            set: set.clone(),
                            via: Via::Monitor,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The targets a `NEWSETELEM` message of our IPv4 table shows: the first address of each
/// element's key (in the sets that program a Service) or data (in the slot maps).
fn new_elements(payload: &[u8]) -> Result<Vec<(Target, String)>, DecodeError> {
    // nfgenmsg: family, version, resource id.
    let family = *payload.first().ok_or(DecodeError::Truncated)?;
    if family != NFPROTO_IPV4 {
        return Ok(Vec::new());
    }
    let list = attrs(payload.get(4..).ok_or(DecodeError::Truncated)?)?;
    if cstr(find(&list, NFTA_SET_ELEM_LIST_TABLE, "table")?) != TABLE {
        return Ok(Vec::new());
    }
    let set = cstr(find(&list, NFTA_SET_ELEM_LIST_SET, "set")?);
    let ready = set == "service-ips";
    let (attr, make): (u16, fn(Ipv4Addr) -> Target) = if ready || set == "no-endpoint-services" {
        (NFTA_SET_ELEM_KEY, Target::Service)
    } else if set.contains("slot-") {
        (NFTA_SET_ELEM_DATA, Target::Endpoint)
    } else {
        return Ok(Vec::new());
    };
    let Ok(elements) = find(&list, NFTA_SET_ELEM_LIST_ELEMENTS, "elements") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (kind, element) in attrs(elements)? {
        if kind != NFTA_LIST_ELEM {
            continue;
        }
        let fields = attrs(element)?;
        let Ok(nested) = find(&fields, attr, "key or data") else {
            continue;
        };
        let Ok(value) = find(&attrs(nested)?, NFTA_DATA_VALUE, "value") else {
            continue; // a verdict
        };
        if let Some(ip) = first_ipv4(value) {
            out.push((make(ip), set.clone()));
            if ready {
                out.push((Target::ServiceReady(ip), set.clone()));
            }
        }
    }
    Ok(out)
}

fn first_ipv4(value: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = value.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink::Message;

    fn elements_message(set: &str, key: [u8; 4], data: Option<[u8; 4]>) -> Vec<u8> {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        let mut m = Message::new(kind, 0, 1, &[NFPROTO_IPV4, 0, 0, 0]);
        m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        m.str(NFTA_SET_ELEM_LIST_SET, set);
        m.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
        m.begin_nested(NFTA_LIST_ELEM);
        m.begin_nested(NFTA_SET_ELEM_KEY);
        let mut k = key.to_vec();
        k.extend_from_slice(&[6, 0, 0, 0, 0, 80, 0, 0]);
        m.attr(NFTA_DATA_VALUE, &k);
        m.end_nested();
        if let Some(data) = data {
            m.begin_nested(NFTA_SET_ELEM_DATA);
            let mut d = data.to_vec();
            d.extend_from_slice(&[0x1f, 0x90, 0, 0]);
            m.attr(NFTA_DATA_VALUE, &d);
            m.end_nested();
        }
        m.end_nested();
        m.end_nested();
        m.finish()
    }

    #[test]
    fn finds_services_and_endpoints() {
        let mut state = State::default();
        let svc = Target::Service(Ipv4Addr::new(10, 96, 0, 1));
        let ready = Target::ServiceReady(Ipv4Addr::new(10, 96, 0, 1));
        let ep = Target::Endpoint(Ipv4Addr::new(172, 16, 0, 9));
        let other = Target::Endpoint(Ipv4Addr::new(10, 96, 0, 1));
        for t in [svc, ready, ep, other] {
            state.wanted.insert(t, None);
        }
        let mut datagram = elements_message("service-ips", [10, 96, 0, 1], None);
        datagram.extend(elements_message(
            "nodeport-slot-3",
            [10, 96, 0, 1],
            Some([172, 16, 0, 9]),
        ));
        handle(&datagram, Instant::now(), &mut state).unwrap();
        let rejecting = Target::Service(Ipv4Addr::new(10, 96, 0, 2));
        let not_ready = Target::ServiceReady(Ipv4Addr::new(10, 96, 0, 2));
        state.wanted.insert(rejecting, None);
        state.wanted.insert(not_ready, None);
        let datagram = elements_message("no-endpoint-services", [10, 96, 0, 2], None);
        handle(&datagram, Instant::now(), &mut state).unwrap();
        assert!(state.wanted[&rejecting].is_some());
        assert!(state.wanted[&not_ready].is_none());
        assert_eq!(state.wanted[&svc].as_ref().unwrap().set, "service-ips");
        assert!(state.wanted[&ready].is_some());
        assert_eq!(state.wanted[&ep].as_ref().unwrap().set, "nodeport-slot-3");
        // A key of a slot map is not an endpoint.
        assert!(state.wanted[&other].is_none());
        assert_eq!(state.stats.messages, 3);
    }
}
