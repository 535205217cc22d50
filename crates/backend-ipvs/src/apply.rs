//! The only code touching the kernel: IPVS over generic netlink, the dummy interface
//! and its addresses over rtnetlink, sysctls, and the nftables table through `nft`. A
//! recording host stands in for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ::netlink::route::Route;
use backend_nftables::apply::{NftCommand, NftRunner};
use backend_nftables::netlink::TableOp;

use crate::netlink;
use crate::plan::{
    Current, Op, RealServer, RealServerState, Timeouts, VirtualServer, DUMMY_INTERFACE,
};
use crate::IpvsError;

/// What the proxier needs from the host.
pub trait Host: Send {
    /// Fails with [`IpvsError::Unavailable`] when the kernel has no IPVS.
    fn check_ipvs(&mut self) -> Result<(), IpvsError>;
    /// Every virtual server keyed by address (not firewall mark), with its real servers.
    fn dump(&mut self) -> Result<BTreeMap<VirtualServer, Current>, IpvsError>;
    /// The real servers of one virtual server.
    fn dests(
        &mut self,
        vs: &VirtualServer,
    ) -> Result<BTreeMap<RealServer, RealServerState>, IpvsError>;
    /// Sends the operations in order; returns the bytes sent.
    fn apply(&mut self, ops: &[Op]) -> Result<usize, IpvsError>;
    /// Removes every virtual server.
    fn flush(&mut self) -> Result<(), IpvsError>;
    /// Sets the connection timeouts.
    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError>;
    /// Whether the dummy interface exists.
    fn dummy_exists(&mut self) -> Result<bool, IpvsError>;
    fn ensure_dummy(&mut self) -> Result<(), IpvsError>;
    fn delete_dummy(&mut self) -> Result<(), IpvsError>;
    /// Addresses on the dummy interface.
    fn bound(&mut self) -> Result<BTreeSet<IpAddr>, IpvsError>;
    fn bind(&mut self, addr: IpAddr) -> Result<(), IpvsError>;
    fn unbind(&mut self, addr: IpAddr) -> Result<(), IpvsError>;
    /// The host's addresses, except the dummy interface's.
    fn local_addresses(&mut self) -> Result<Vec<IpAddr>, IpvsError>;
    /// Writes `/proc/sys/<path>`.
    fn sysctl(&mut self, path: &str, value: &str) -> Result<(), IpvsError>;
    /// Applies changes to the `kube-proxy-ipvs` tables as one transaction.
    fn nft(&mut self, ops: &[TableOp<'_>]) -> Result<(), IpvsError>;
}

/// A generic netlink socket talking to the IPVS family.
struct IpvsSocket {
    socket: ::netlink::Socket,
    family: u16,
}

impl From<::netlink::RequestError> for IpvsError {
    fn from(err: ::netlink::RequestError) -> Self {
        match err {
            ::netlink::RequestError::Socket(e) => IpvsError::Socket(e),
            ::netlink::RequestError::Decode(e) => IpvsError::Decode(e),
            ::netlink::RequestError::Kernel { errno, message } => {
                IpvsError::Kernel { errno, message }
            }
        }
    }
}

impl IpvsSocket {
    fn open() -> Result<Self, IpvsError> {
        let socket = ::netlink::Socket::open(libc::NETLINK_GENERIC)?;
        let mut this = IpvsSocket {
            socket,
            family: netlink::GENL_ID_CTRL,
        };
        let seq = this.next_seq();
        let replies = match this.request(&netlink::get_family(seq)) {
            Ok(replies) => replies,
            // ENOENT: the kernel has no IPVS family (module not loaded, not built).
            Err(IpvsError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                return Err(IpvsError::Unavailable)
            }
            Err(err) => return Err(err),
        };
        let payload = replies.first().ok_or(IpvsError::Unavailable)?;
        this.family = netlink::parse_family(payload).map_err(IpvsError::Decode)?;
        Ok(this)
    }

    fn next_seq(&mut self) -> u32 {
        self.socket.next_seq()
    }

    /// Sends one request and collects the payloads of the replies.
    fn request(&mut self, message: &[u8]) -> Result<Vec<Vec<u8>>, IpvsError> {
        Ok(self.socket.request(message)?)
    }
}

/// The real host. Its sockets are opened on first use, in the network namespace of the
/// thread using it.
#[derive(Default)]
pub struct LinuxHost {
    socket: Option<IpvsSocket>,
    route: Option<Route>,
    nft: NftCommand,
}

/// Host prefix length: a Service IP is one address.
fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl LinuxHost {
    fn socket(&mut self) -> Result<&mut IpvsSocket, IpvsError> {
        if self.socket.is_none() {
            self.socket = Some(IpvsSocket::open()?);
        }
        self.socket.as_mut().ok_or(IpvsError::Unavailable)
    }

    /// Runs `f` on the rtnetlink socket; a failure is reported as `what`.
    fn route<T>(
        &mut self,
        what: impl FnOnce() -> String,
        f: impl FnOnce(&mut Route) -> Result<T, ::netlink::RequestError>,
    ) -> Result<T, IpvsError> {
        let result = match &mut self.route {
            Some(route) => f(route),
            None => Route::open().and_then(|mut route| {
                let out = f(&mut route);
                self.route = Some(route);
                out
            }),
        };
        result.map_err(|source| IpvsError::Interface {
            what: what(),
            source,
        })
    }

    /// The dummy interface's index, `None` when it does not exist.
    fn dummy_index(&mut self) -> Result<Option<u32>, IpvsError> {
        self.route(
            || format!("looking up {DUMMY_INTERFACE}"),
            |r| r.link_index(DUMMY_INTERFACE),
        )
    }

    /// The dummy interface's index; an error when it does not exist.
    fn existing_dummy(&mut self) -> Result<u32, IpvsError> {
        self.dummy_index()?.ok_or_else(|| IpvsError::Interface {
            what: format!("looking up {DUMMY_INTERFACE}"),
            source: ::netlink::RequestError::Kernel {
                errno: libc::ENODEV,
                message: std::io::Error::from_raw_os_error(libc::ENODEV).to_string(),
            },
        })
    }

    /// Every address on the host, by link index.
    fn addresses(&mut self) -> Result<Vec<(u32, IpAddr)>, IpvsError> {
        self.route(|| "listing addresses".into(), |r| r.addresses())
    }
}

impl Host for LinuxHost {
    fn check_ipvs(&mut self) -> Result<(), IpvsError> {
        self.socket().map(|_| ())
    }

    fn dump(&mut self) -> Result<BTreeMap<VirtualServer, Current>, IpvsError> {
        let sock = self.socket()?;
        let seq = sock.next_seq();
        let replies = sock.request(&netlink::get_services(sock.family, seq))?;
        let mut out = BTreeMap::new();
        for payload in replies {
            if let Some(spec) = netlink::parse_service(&payload).map_err(IpvsError::Decode)? {
                out.insert(
                    spec.vs,
                    Current {
                        spec,
                        dests: BTreeMap::new(),
                    },
                );
            }
        }
        let keys: Vec<VirtualServer> = out.keys().copied().collect();
        for vs in keys {
            let dests = self.dests(&vs)?;
            if let Some(cur) = out.get_mut(&vs) {
                cur.dests = dests;
            }
        }
        Ok(out)
    }

    fn dests(
        &mut self,
        vs: &VirtualServer,
    ) -> Result<BTreeMap<RealServer, RealServerState>, IpvsError> {
        let sock = self.socket()?;
        let seq = sock.next_seq();
        let replies = sock.request(&netlink::get_dests(sock.family, seq, vs))?;
        let mut out = BTreeMap::new();
        for payload in replies {
            let state =
                netlink::parse_dest(&payload, vs.addr.is_ipv6()).map_err(IpvsError::Decode)?;
            out.insert(state.rs, state);
        }
        Ok(out)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<usize, IpvsError> {
        let sock = self.socket()?;
        let mut bytes = 0;
        for op in ops {
            let seq = sock.next_seq();
            let family = sock.family;
            let message = match op {
                Op::AddService(spec) => netlink::service(family, seq, spec, false),
                Op::UpdateService(spec) => netlink::service(family, seq, spec, true),
                Op::DelService(vs) => netlink::del_service(family, seq, vs),
                Op::AddDest(vs, rs) => {
                    netlink::dest(family, seq, vs, rs, crate::plan::WEIGHT, false)
                }
                Op::SetWeight(vs, rs, weight) => netlink::dest(family, seq, vs, rs, *weight, true),
                Op::DelDest(vs, rs) => netlink::del_dest(family, seq, vs, rs),
            };
            bytes += message.len();
            sock.request(&message).map_err(|err| match err {
                IpvsError::Kernel { errno, message } => IpvsError::Kernel {
                    errno,
                    message: format!("{op:?}: {message}"),
                },
                other => other,
            })?;
        }
        Ok(bytes)
    }

    fn flush(&mut self) -> Result<(), IpvsError> {
        let sock = self.socket()?;
        let seq = sock.next_seq();
        sock.request(&netlink::flush(sock.family, seq))?;
        Ok(())
    }

    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        let sock = self.socket()?;
        let seq = sock.next_seq();
        sock.request(&netlink::set_timeouts(sock.family, seq, timeouts))?;
        Ok(())
    }

    fn dummy_exists(&mut self) -> Result<bool, IpvsError> {
        Ok(self.dummy_index()?.is_some())
    }

    fn ensure_dummy(&mut self) -> Result<(), IpvsError> {
        if !self.dummy_exists()? {
            self.route(
                || format!("creating {DUMMY_INTERFACE}"),
                |r| r.add_dummy(DUMMY_INTERFACE),
            )?;
        }
        Ok(())
    }

    fn delete_dummy(&mut self) -> Result<(), IpvsError> {
        if self.dummy_exists()? {
            self.route(
                || format!("deleting {DUMMY_INTERFACE}"),
                |r| r.delete_link(DUMMY_INTERFACE),
            )?;
        }
        Ok(())
    }

    fn bound(&mut self) -> Result<BTreeSet<IpAddr>, IpvsError> {
        let Some(index) = self.dummy_index()? else {
            return Ok(BTreeSet::new());
        };
        Ok(self
            .addresses()?
            .into_iter()
            .filter(|(link, _)| *link == index)
            .map(|(_, a)| a)
            .collect())
    }

    fn bind(&mut self, addr: IpAddr) -> Result<(), IpvsError> {
        let index = self.existing_dummy()?;
        self.route(
            || format!("adding {addr} to {DUMMY_INTERFACE}"),
            |r| r.add_address(index, addr, host_prefix(addr)),
        )
    }

    fn unbind(&mut self, addr: IpAddr) -> Result<(), IpvsError> {
        let index = self.existing_dummy()?;
        self.route(
            || format!("removing {addr} from {DUMMY_INTERFACE}"),
            |r| r.delete_address(index, addr, host_prefix(addr)),
        )
    }

    fn local_addresses(&mut self) -> Result<Vec<IpAddr>, IpvsError> {
        let dummy = self.dummy_index()?;
        Ok(self
            .addresses()?
            .into_iter()
            .filter(|(link, _)| Some(*link) != dummy)
            .map(|(_, a)| a)
            .collect())
    }

    fn sysctl(&mut self, path: &str, value: &str) -> Result<(), IpvsError> {
        std::fs::write(format!("/proc/sys/{path}"), value).map_err(|source| IpvsError::Sysctl {
            path: path.to_string(),
            source,
        })
    }

    fn nft(&mut self, ops: &[TableOp<'_>]) -> Result<(), IpvsError> {
        self.nft
            .apply_in(crate::plan::TABLE, ops)
            .map(|_| ())
            .map_err(IpvsError::Nft)
    }
}

/// A host that only records, for tests: keeps a model of the IPVS table.
#[derive(Debug, Default)]
pub struct RecordingHost {
    pub services: BTreeMap<VirtualServer, Current>,
    pub ops: Vec<Op>,
    pub bound: BTreeSet<IpAddr>,
    pub dummy: bool,
    pub local: Vec<IpAddr>,
    pub sysctls: Vec<(String, String)>,
    pub scripts: Vec<String>,
    /// Number of `dests` reads (incremental syncs should read only draining ones).
    pub dest_reads: usize,
    pub dumps: usize,
    pub timeouts: Option<Timeouts>,
}

impl Host for RecordingHost {
    fn check_ipvs(&mut self) -> Result<(), IpvsError> {
        Ok(())
    }

    fn dump(&mut self) -> Result<BTreeMap<VirtualServer, Current>, IpvsError> {
        self.dumps += 1;
        Ok(self.services.clone())
    }

    fn dests(
        &mut self,
        vs: &VirtualServer,
    ) -> Result<BTreeMap<RealServer, RealServerState>, IpvsError> {
        self.dest_reads += 1;
        Ok(self
            .services
            .get(vs)
            .map(|c| c.dests.clone())
            .unwrap_or_default())
    }

    fn apply(&mut self, ops: &[Op]) -> Result<usize, IpvsError> {
        crate::plan::apply_to(&mut self.services, ops);
        self.ops.extend_from_slice(ops);
        Ok(ops.len())
    }

    fn flush(&mut self) -> Result<(), IpvsError> {
        self.services.clear();
        Ok(())
    }

    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        self.timeouts = Some(*timeouts);
        Ok(())
    }

    fn dummy_exists(&mut self) -> Result<bool, IpvsError> {
        Ok(self.dummy)
    }

    fn ensure_dummy(&mut self) -> Result<(), IpvsError> {
        self.dummy = true;
        Ok(())
    }

    fn delete_dummy(&mut self) -> Result<(), IpvsError> {
        self.dummy = false;
        self.bound.clear();
        Ok(())
    }

    fn bound(&mut self) -> Result<BTreeSet<IpAddr>, IpvsError> {
        Ok(self.bound.clone())
    }

    fn bind(&mut self, addr: IpAddr) -> Result<(), IpvsError> {
        self.bound.insert(addr);
        Ok(())
    }

    fn unbind(&mut self, addr: IpAddr) -> Result<(), IpvsError> {
        self.bound.remove(&addr);
        Ok(())
    }

    fn local_addresses(&mut self) -> Result<Vec<IpAddr>, IpvsError> {
        Ok(self.local.clone())
    }

    fn sysctl(&mut self, path: &str, value: &str) -> Result<(), IpvsError> {
        self.sysctls.push((path.to_string(), value.to_string()));
        Ok(())
    }

    fn nft(&mut self, ops: &[TableOp<'_>]) -> Result<(), IpvsError> {
        self.scripts.push(backend_nftables::netlink::ops_text_in(
            crate::plan::TABLE,
            ops,
        ));
        Ok(())
    }
}
