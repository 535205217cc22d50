//! A hook for metrics and health: the runner reports what it queued and how each sync
//! went. The default observer does nothing, so proxy-core needs no metrics library.

use std::time::{Duration, SystemTime};

use crate::model::{IpFamily, ProxyState};
use crate::proxier::{ProxierError, SyncOutcome};

/// The tracker's change bookkeeping after source updates were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSummary {
    /// Wall-clock time of the update.
    pub at: SystemTime,
    /// The desired state changed: a sync is now queued.
    pub queued: bool,
    /// Service changes seen since start (each Service whose ports changed, per update).
    pub service_changes_total: u64,
    /// Endpoint changes seen since start (each Service whose endpoints changed, per update).
    pub endpoint_changes_total: u64,
    /// Services with port changes not yet handed to a sync.
    pub services_pending: usize,
    /// Services with endpoint changes not yet handed to a sync.
    pub endpoints_pending: usize,
    /// False when this node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`.
    pub node_eligible: bool,
}

/// How one sync attempt went.
#[derive(Debug)]
pub struct SyncReport<'a> {
    /// Whether the attempt was (or, on success, turned into) a full rewrite.
    pub full: bool,
    pub duration: Duration,
    pub finished_at: SystemTime,
    pub result: Result<&'a SyncOutcome, &'a ProxierError>,
    /// The state the sync programmed (or failed to).
    pub state: &'a std::sync::Arc<ProxyState>,
    /// On success: when each change this sync programmed was triggered (EndpointSlice
    /// `endpoints.kubernetes.io/last-change-trigger-time`, or when a Service change was
    /// first seen). Empty on failure: those changes are carried to the next attempt.
    pub programmed_trigger_times: &'a [SystemTime],
}

/// Receives the runner's reports. Called on the runner's task: implementations must be
/// quick and must not block (copy what they need and return).
pub trait SyncObserver: Send + Sync {
    fn changes_applied(&self, _changes: &ChangeSummary) {}
    fn sync_finished(&self, _report: &SyncReport<'_>) {}
    /// One family's conntrack reconciliation after a sync (`stale::CleaningProxier`): how
    /// long listing and deleting took and how many entries were deleted. Upstream's
    /// `kubeproxy_conntrack_reconciler_sync_duration_seconds` and
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total`, labelled by `ip_family`.
    fn conntrack_reconciled(&self, _family: IpFamily, _duration: Duration, _deleted: u64) {}
}

/// The observer used when nobody listens.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl SyncObserver for NoopObserver {}

/// Hears about every request the API source makes (for `rest_client_*` metrics).
pub trait ApiRequestObserver: Send + Sync {
    /// One finished request: its HTTP method, the API server's `host:port`, the status
    /// code (`None` when no response came back) and how long it took.
    fn request_done(&self, method: &str, host: &str, status: Option<u16>, elapsed: Duration);
}
