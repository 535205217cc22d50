//! ipvs mode: as upstream, Service IPs are bound to the dummy interface `kube-ipvs0` so
//! the kernel delivers their packets locally, where IPVS virtual servers (one per
//! Service IP, port and protocol, plus one per node address for NodePorts) balance them
//! to real servers by NAT. A small nftables table marks traffic to masquerade.
//!
//! `plan` and `netlink` are pure; `apply` is the only code touching the kernel.

pub mod apply;
pub mod netlink;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proxy_core::model::IpFamily;
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};

use crate::apply::{Host, LinuxHost};
use crate::plan::{Current, IpvsConfig, VirtualServer};

/// Why talking to the kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("the kernel has no IPVS (load the ip_vs module)")]
    Unavailable,
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("undecodable netlink reply: {0}")]
    Decode(#[from] netlink::DecodeError),
    #[error("IPVS refused: {message} (errno {errno})")]
    Kernel { errno: i32, message: String },
    /// A link or address request over rtnetlink failed (`what` says which).
    #[error("{what}: {source}")]
    Interface {
        what: String,
        #[source]
        source: ::netlink::RequestError,
    },
    #[error("cannot write sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Nft(ProxierError),
}

impl From<IpvsError> for ProxierError {
    fn from(err: IpvsError) -> Self {
        match err {
            IpvsError::Nft(inner) => inner,
            IpvsError::Kernel { message, .. } => ProxierError::Rejected {
                program: "ipvs".into(),
                message,
            },
            other => ProxierError::Other(other.to_string()),
        }
    }
}

/// The ipvs proxier. Keeps a model of the virtual servers it programmed, so a partial
/// sync diffs against memory and sends only what changed; a full sync reads the
/// kernel's table back (`GET_SERVICE`/`GET_DEST` dumps) and diffs against that.
pub struct IpvsProxier<H: Host = LinuxHost> {
    config: IpvsConfig,
    host: H,
    /// `None` until a full sync succeeded, and after any failure.
    current: Option<BTreeMap<VirtualServer, Current>>,
    bound: BTreeSet<IpAddr>,
    local: Vec<IpAddr>,
    nft_scripts: BTreeMap<&'static str, String>,
}

impl IpvsProxier<LinuxHost> {
    pub fn new(config: IpvsConfig) -> Self {
        IpvsProxier::with_host(config, LinuxHost::default())
    }
}

impl<H: Host> IpvsProxier<H> {
    pub fn with_host(config: IpvsConfig, host: H) -> Self {
        IpvsProxier {
            config,
            host,
            current: None,
            bound: BTreeSet::new(),
            local: Vec::new(),
            nft_scripts: BTreeMap::new(),
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Sets [`node_sysctls`]. Failures are logged: a missing knob (no IPv6, an older
    /// kernel) must not stop the proxy.
    fn sysctls(&mut self) {
        for (path, value) in node_sysctls(&self.config) {
            if let Err(err) = self.host.sysctl(path, value) {
                tracing::warn!(error = %err, "could not set sysctl");
            }
        }
    }

    fn sync_inner(&mut self, request: &SyncRequest) -> Result<SyncOutcome, IpvsError> {
        let full = request.full || self.current.is_none();
        if full {
            // Before creating anything: without IPVS, this mode cannot work at all.
            self.host.check_ipvs()?;
            self.sysctls();
            if self.config.timeouts.any() {
                self.host.set_timeouts(&self.config.timeouts)?;
            }
            self.host.ensure_dummy()?;
            self.bound = self.host.bound()?;
        }
        if full || request.node_changed {
            // Where NodePorts answer: re-read when the node's facts may have moved.
            self.local = self.host.local_addresses()?;
        }
        let node_addresses =
            plan::nodeport_addresses(&self.config, &request.state.node, &self.local);
        let plan = plan::plan(&self.config, &request.state, &node_addresses);

        for addr in plan.bound.difference(&self.bound.clone()) {
            self.host.bind(*addr)?;
            self.bound.insert(*addr);
        }

        let mut current = match self.current.take() {
            Some(current) if !full => current,
            _ => {
                // Ours: virtual servers on addresses we bind or on node addresses,
                // except those in --ipvs-exclude-cidrs.
                let excluded =
                    |ip: &IpAddr| self.config.exclude_cidrs.iter().any(|c| c.contains(ip));
                let ours: BTreeSet<IpAddr> = self
                    .bound
                    .iter()
                    .chain(&node_addresses)
                    .filter(|ip| !excluded(ip))
                    .copied()
                    .collect();
                let mut all = self.host.dump()?;
                all.retain(|vs, _| ours.contains(&vs.addr));
                all
            }
        };
        // Draining real servers: read their connection counts so drained ones go.
        for vs in plan::draining(&plan.services, &current) {
            let dests = self.host.dests(&vs)?;
            if let Some(cur) = current.get_mut(&vs) {
                cur.dests = dests;
            }
        }
        let ops = plan::diff(&plan.services, &current);
        if !ops.is_empty() {
            tracing::debug!(operations = ops.len(), full, "programming IPVS");
        }
        let mut bytes = self.host.apply(&ops)?;
        plan::apply_to(&mut current, &ops);
        self.current = Some(current);

        let stale: Vec<IpAddr> = self.bound.difference(&plan.bound).copied().collect();
        for addr in stale {
            self.host.unbind(addr)?;
            self.bound.remove(&addr);
        }

        for family in self.config.families.clone() {
            let ops = plan::nft_ops(&self.config, &plan, family);
            let script = backend_nftables::netlink::ops_text_in(plan::TABLE, &ops);
            let key = match family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            if full || self.nft_scripts.get(key) != Some(&script) {
                self.host.nft(&ops)?;
                bytes += script.len();
                self.nft_scripts.insert(key, script);
            }
        }
        Ok(SyncOutcome {
            full,
            transaction_bytes: bytes,
            service_ports: request.state.services.len(),
            ..SyncOutcome::default()
        })
    }
}

impl<H: Host + 'static> Proxier for IpvsProxier<H> {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        self.sync_inner(request).map_err(|err| {
            // What the kernel holds is unknown now: the next sync reads it back.
            self.current = None;
            self.nft_scripts.clear();
            err.into()
        })
    }

    /// Removes the virtual servers, the dummy interface and the nftables tables. IPVS
    /// is flushed only when `kube-ipvs0` exists (this mode ran here), so other modes'
    /// cleanup does not wipe virtual servers someone else made.
    fn cleanup(&mut self) -> Result<(), ProxierError> {
        if self.host.dummy_exists()? {
            match self.host.flush() {
                Ok(()) | Err(IpvsError::Unavailable) => {}
                Err(err) => return Err(err.into()),
            }
            self.host.delete_dummy()?;
        }
        self.host.nft(&plan::nft_cleanup_ops())?;
        self.current = None;
        self.bound.clear();
        self.nft_scripts.clear();
        Ok(())
    }
}

/// The sysctls upstream sets in ipvs mode (also what `--init-only` sets).
pub fn node_sysctls(config: &IpvsConfig) -> Vec<(&'static str, &'static str)> {
    let mut knobs = vec![
        // Let conntrack (and so nftables masquerade) see IPVS connections.
        ("net/ipv4/vs/conntrack", "1"),
        // Drop connections to deleted real servers at once rather than hanging.
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ];
    if config.strict_arp {
        // Do not answer ARP for the Service IPs on kube-ipvs0 from other interfaces.
        knobs.push(("net/ipv4/conf/all/arp_ignore", "1"));
        knobs.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    knobs
}
