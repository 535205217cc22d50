//! Seeing a change reach the kernel: the nftables monitor for the first `window` after
//! the event (the commit itself, exactly), then lookups of the element
//! (`NFT_MSG_GETSETELEM`, answered under RCU: they never wait for or slow down the
//! proxy's commits) every `poll` (or 1% of the time since the event, if longer) until it
//! is there.
//!
//! Why not the monitor alone: while it listens, every commit builds a message per
//! changed element inside the proxy's transaction. A periodic full sync at 10,000
//! Services took 4.9 s instead of 1.2 s whenever a change waiting for it kept the monitor
//! listening, which would make exactly the changes that meet a full sync look worse.
//! A change that has not committed within the window has met something slow (the
//! manifests source's poll and reload, a full sync, the min sync period): a lookup at
//! most `poll` late costs little against that.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netlink::{attrs, find, Message, RequestError, NLM_F_ACK, NLM_F_REQUEST};
use proxy_core::model::Protocol;

use crate::monitor::{Monitor, Seen, Target, Via};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFPROTO_IPV4: u8 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const TABLE: &str = "kube-proxy";

/// One thing to wait for, with what a lookup needs to find it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub target: Target,
    /// The destination its elements are keyed by (cluster IP . protocol . port), as the
    /// kernel holds it: each field in whole 32-bit registers, network order.
    pub key: Vec<u8>,
    /// For an endpoint: the slot maps (`slot-0` ..) of its Service's cluster IP to look in.
    pub slots: usize,
}

impl Probe {
    pub fn new(
        target: Target,
        cluster_ip: Ipv4Addr,
        protocol: Protocol,
        port: u16,
        slots: usize,
    ) -> Probe {
        let proto = match protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        };
        let mut key = cluster_ip.octets().to_vec();
        key.extend_from_slice(&[proto, 0, 0, 0]);
        let port = port.to_be_bytes();
        key.extend_from_slice(&[port[0], port[1], 0, 0]);
        Probe { target, key, slots }
    }
}

/// Element lookups over a netlink socket in the node's namespace.
pub struct Prober {
    socket: netlink::Socket,
}

impl Prober {
    /// Opens the socket; call on a thread inside the node's namespace.
    pub fn open() -> Result<Prober> {
        Ok(Prober {
            socket: netlink::Socket::open(libc::NETLINK_NETFILTER)
                .context("opening a NETLINK_NETFILTER socket")?,
        })
    }

    /// The set `probe`'s target is in now, if it is.
    pub fn find(&mut self, probe: &Probe) -> Result<Option<String>> {
        match probe.target {
            Target::Service(_) => {
                for set in ["service-ips", "no-endpoint-services"] {
                    if self.lookup(set, &probe.key)?.is_some() {
                        return Ok(Some(set.into()));
                    }
                }
                Ok(None)
            }
            Target::ServiceReady(_) => Ok(self
                .lookup("service-ips", &probe.key)?
                .map(|_| "service-ips".into())),
            Target::Endpoint(ip) => {
                for k in 0..probe.slots {
                    let set = format!("slot-{k}");
                    if let Some(data) = self.lookup(&set, &probe.key)? {
                        if data.starts_with(&ip.octets()) {
                            return Ok(Some(set));
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// The data of `key`'s element in `set` (empty for a set without data), or None when
    /// there is no such element (or set).
    fn lookup(&mut self, set: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let seq = self.socket.next_seq();
        let mut msg = Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            &[NFPROTO_IPV4, 0, 0, 0],
        );
        msg.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        msg.str(NFTA_SET_ELEM_LIST_SET, set);
        msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
        msg.begin_nested(NFTA_LIST_ELEM);
        msg.begin_nested(NFTA_SET_ELEM_KEY);
        msg.attr(NFTA_DATA_VALUE, key);
        msg.end_nested();
        msg.end_nested();
        msg.end_nested();
        match self.socket.request(&msg.finish()) {
            Ok(replies) => Ok(Some(
                replies
                    .first()
                    .and_then(|r| element_data(r))
                    .unwrap_or_default(),
            )),
            Err(RequestError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up an element of {set}")),
        }
    }
}

/// The data of the first element of a `NEWSETELEM` reply.
fn element_data(payload: &[u8]) -> Option<Vec<u8>> {
    let list = attrs(payload.get(4..)?).ok()?;
    let elements = attrs(find(&list, NFTA_SET_ELEM_LIST_ELEMENTS, "elements").ok()?).ok()?;
    let element = attrs(elements.first()?.1).ok()?;
    let data = attrs(find(&element, NFTA_SET_ELEM_DATA, "data").ok()?).ok()?;
    Some(find(&data, NFTA_DATA_VALUE, "value").ok()?.to_vec())
}

/// The monitor and the prober together.
pub struct Observer {
    pub monitor: Monitor,
    pub prober: Prober,
    /// How long the monitor listens after an event.
    pub window: Duration,
    /// Time between lookups after that.
    pub poll: Duration,
    /// Give up on a target after this long.
    pub timeout: Duration,
}

impl Observer {
    /// Makes a change with `change` (which returns the instant of the event) and waits for
    /// each of `probes` to reach the kernel. Returns the event's instant and, per probe,
    /// when it was seen (None: not within the timeout).
    pub fn observe(
        &mut self,
        probes: &[Probe],
        change: impl FnOnce() -> Result<Instant>,
    ) -> Result<(Instant, Vec<Option<Seen>>)> {
        for p in probes {
            self.monitor.expect(p.target)?;
        }
        let t0 = change()?;
        let window_end = t0 + self.window;
        let mut seen = Vec::with_capacity(probes.len());
        // Each target is forgotten once found or after the window: the monitor stops
        // listening with the last.
        for p in probes {
            let left = window_end.saturating_duration_since(Instant::now());
            seen.push(self.monitor.wait(p.target, left)?);
        }
        let deadline = t0 + self.timeout;
        while seen.iter().any(Option::is_none) && Instant::now() < deadline {
            for (p, s) in probes.iter().zip(seen.iter_mut()) {
                if s.is_none() {
                    if let Some(set) = self.prober.find(p)? {
                        *s = Some(Seen {
                            at: Instant::now(),
                            set,
                            via: Via::Poll,
                        });
                    }
                }
            }
            if seen.iter().any(Option::is_none) {
                // At least `poll` apart, and 1% of the time so far: a slow change costs
                // fewer lookups for the same relative precision.
                std::thread::sleep(self.poll.max(t0.elapsed() / 100));
            }
        }
        Ok((t0, seen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_as_the_kernel_holds_them() {
        let p = Probe::new(
            Target::Service(Ipv4Addr::new(10, 96, 0, 53)),
            Ipv4Addr::new(10, 96, 0, 53),
            Protocol::Udp,
            53,
            0,
        );
        assert_eq!(p.key, vec![10, 96, 0, 53, 17, 0, 0, 0, 0, 53, 0, 0]);
    }

    #[test]
    fn reads_the_data_of_a_reply() {
        let mut m = Message::new(0x0a0c, 0, 1, &[NFPROTO_IPV4, 0, 0, 0]);
        m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        m.str(NFTA_SET_ELEM_LIST_SET, "slot-0");
        m.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
        m.begin_nested(NFTA_LIST_ELEM);
        m.begin_nested(NFTA_SET_ELEM_KEY);
        m.attr(NFTA_DATA_VALUE, &[10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        m.end_nested();
        m.begin_nested(NFTA_SET_ELEM_DATA);
        m.attr(NFTA_DATA_VALUE, &[172, 16, 0, 1, 0x1f, 0x90, 0, 0]);
        m.end_nested();
        m.end_nested();
        m.end_nested();
        let bytes = m.finish();
        let msgs = netlink::split(&bytes).unwrap();
        assert_eq!(
            element_data(msgs[0].payload),
            Some(vec![172, 16, 0, 1, 0x1f, 0x90, 0, 0])
        );
    }
}
