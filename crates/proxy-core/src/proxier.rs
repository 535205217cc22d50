//! The contract between the sync runner and a datapath backend.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{ProxyState, ServiceName};

/// What one sync must program.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// The complete desired state.
    pub state: Arc<ProxyState>,
    /// Services whose ports or endpoints changed since the last successful sync.
    pub changed: BTreeSet<ServiceName>,
    /// The node's own facts changed (zone, pod CIDRs, addresses).
    pub node_changed: bool,
    /// Rewrite everything rather than only what changed: the first sync, after a failure,
    /// and every sync period.
    pub full: bool,
    /// This full sync is only the periodic one (`--iptables-sync-period`): a backend that
    /// can read the kernel back may check it against what it programmed and repair only
    /// the differences instead of rewriting everything.
    pub periodic: bool,
}

/// What a successful sync did, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Whether the whole ruleset was rewritten (a backend may decide to, e.g. on first use).
    pub full: bool,
    /// Size of what was sent to the kernel, in bytes of transaction text or equivalent.
    pub transaction_bytes: usize,
    /// Service ports programmed in total after this sync.
    pub service_ports: usize,
    /// Loopback NodePort listeners per family, where a kernel mode runs them.
    pub localhost_nodeports: Vec<LocalhostNodePortCounts>,
    /// Objects a periodic check found differing from what was programmed (each map
    /// repaired, or 1 per table rewritten): someone else changed our rules.
    pub drift: u64,
}

/// The user-space listeners that serve NodePorts on one family's loopback address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalhostNodePortCounts {
    pub family: crate::model::IpFamily,
    /// Listening after the sync.
    pub listeners: usize,
    /// Listeners this sync failed to open (e.g. another program holds the port).
    pub failures: u64,
}

/// How a new connection reached a Service port (`--service-counters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancerIp,
}

impl DestinationKind {
    pub const ALL: [DestinationKind; 4] = [
        DestinationKind::ClusterIp,
        DestinationKind::NodePort,
        DestinationKind::ExternalIp,
        DestinationKind::LoadBalancerIp,
    ];

    /// The metric label value and JSON key.
    pub fn label(self) -> &'static str {
        match self {
            DestinationKind::ClusterIp => "cluster_ip",
            DestinationKind::NodePort => "node_port",
            DestinationKind::ExternalIp => "external_ip",
            DestinationKind::LoadBalancerIp => "load_balancer_ip",
        }
    }
}

/// New connections counted for one Service port and destination kind, summed over the
/// IP families (`--service-counters`): the packets that opened them and their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub port: crate::model::ServicePortName,
    pub destination: DestinationKind,
    pub packets: u64,
    pub bytes: u64,
}

/// Why a sync failed. The previous rules stay in place; the runner retries with a full sync.
#[derive(Debug, thiserror::Error)]
pub enum ProxierError {
    /// A kernel tool (`nft`, `iptables-restore`, ...) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel or the tool refused the transaction.
    #[error("{program} failed: {message}")]
    Rejected { program: String, message: String },
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

impl ProxierError {
    /// Whether the tool is not installed (as opposed to failing or being refused).
    pub fn is_missing_tool(&self) -> bool {
        matches!(self, ProxierError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A datapath backend: nftables, iptables, ipvs or userspace.
///
/// Implementations keep what they programmed last so that `sync` can send only the
/// difference; a failed `sync` must leave the kernel as it was (one atomic transaction).
pub trait Proxier: Send + 'static {
    /// The mode's name as `/proxyMode` reports it (`nftables`, `iptables`, ...).
    fn mode(&self) -> &'static str;

    /// Work that needs no state, run once at start while the sources load theirs (e.g.
    /// reading back what a previous process programmed), so the first sync is shorter.
    /// Failures are the backend's to log: the first sync then does without.
    fn prepare(&mut self) {}

    /// Programs the kernel to match `request.state`.
    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError>;

    /// Removes everything this backend ever created. Succeeds when there is nothing.
    fn cleanup(&mut self) -> Result<(), ProxierError>;
}
