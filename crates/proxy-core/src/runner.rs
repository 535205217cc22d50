//! The sync runner: decides when the backend syncs, and runs one sync at a time.
//!
//! States, in order:
//! - **waiting for sources**: nothing is programmed until the source delivered its first
//!   complete state, so a restarting proxy never installs an empty ruleset;
//! - **idle**: the rules match the state; the next sync is the periodic full one;
//! - **pending**: changes are queued; the sync runs at once while the sync budget allows
//!   (upstream's bounded-frequency runner: a token every `min_sync_period`, at most two
//!   saved, so a Service and its EndpointSlice arriving together both sync at once),
//!   otherwise when the next token comes (bursts coalesce into one sync);
//! - **backing off**: the last sync failed; the previous rules are still in place; the
//!   next attempt is a full sync after an exponentially growing delay (capped at the
//!   sync period).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use crate::model::ProxyState;
use crate::observer::{ChangeSummary, NoopObserver, SyncObserver, SyncReport};
use crate::proxier::{Proxier, SyncRequest};
use crate::source::SourceUpdate;
use crate::status::SyncStatus;
use crate::tracker::ChangeTracker;

/// Timing of the sync loop, and what runs after a full sync.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Minimum time between the starts of two syncs (`--iptables-min-sync-period`).
    pub min_sync_period: Duration,
    /// Maximum time between two full syncs (`--iptables-sync-period`).
    pub sync_period: Duration,
    /// First retry delay after a failed sync; doubles up to `sync_period`.
    pub retry_delay: Duration,
    /// Run on a blocking thread after each successful full sync, when the transient
    /// peak of listing and rewriting is over (the binary returns the allocator's free
    /// pages to the kernel here).
    pub after_full_sync: Option<fn()>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
            after_full_sync: None,
        }
    }
}

/// Runs the sync loop until `shutdown` turns true or every sender of `updates` is gone
/// and nothing is left to do. Returns the backend so the caller can clean up.
pub async fn run(
    updates: mpsc::Receiver<SourceUpdate>,
    tracker: ChangeTracker,
    proxier: Box<dyn Proxier>,
    config: RunnerConfig,
    status: Arc<SyncStatus>,
    shutdown: watch::Receiver<bool>,
) -> Box<dyn Proxier> {
    let observer: Arc<dyn SyncObserver> = Arc::new(NoopObserver);
    run_observed(
        updates, tracker, proxier, config, status, shutdown, observer,
    )
    .await
}

/// [`run`], reporting queued changes and every sync attempt to `observer` (metrics,
/// health).
pub async fn run_observed(
    mut updates: mpsc::Receiver<SourceUpdate>,
    mut tracker: ChangeTracker,
    mut proxier: Box<dyn Proxier>,
    config: RunnerConfig,
    status: Arc<SyncStatus>,
    mut shutdown: watch::Receiver<bool>,
    observer: Arc<dyn SyncObserver>,
) -> Box<dyn Proxier> {
    // Trigger times of changes taken by syncs that failed: the next success programs them.
    let mut unprogrammed: Vec<SystemTime> = Vec::new();
    let mut have_initial_state = false;
    let mut sources_open = true;
    let mut need_full = true;
    let mut budget = SyncBudget::new(config.min_sync_period, Instant::now());
    let mut last_start: Option<Instant> = None;
    let mut next_full = Instant::now();
    let mut retry_at: Option<Instant> = None;
    let mut retry_delay = config.retry_delay;
    // The state the last successful sync programmed, with the tracker's version then: a
    // sync with nothing new hands that same state on, so whoever compares states (the
    // observers, conntrack cleaning) sees at once that nothing changed.
    let mut programmed_state: Option<(u64, Arc<ProxyState>)> = None;
    // The backend prepares (e.g. reads back its tables) while the sources list.
    let mut backend = Backend::Preparing(tokio::task::spawn_blocking(move || {
        proxier.prepare();
        proxier
    }));

    loop {
        let due = if !have_initial_state {
            None
        } else if let Some(at) = retry_at {
            Some(at)
        } else if !tracker.pending().is_empty() || last_start.is_none() {
            Some(budget.ready_at(Instant::now()))
        } else {
            Some(next_full)
        };

        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
            update = updates.recv(), if sources_open => match update {
                Some(update) => {
                    let mut changed = tracker.apply(update);
                    // Take whatever else is already queued: one sync for a burst.
                    while let Ok(more) = updates.try_recv() {
                        changed |= tracker.apply(more);
                    }
                    if !have_initial_state {
                        tracing::info!("sources delivered their initial state");
                        have_initial_state = true;
                    }
                    let now = SystemTime::now();
                    if changed {
                        status.queued(now);
                    }
                    observer.changes_applied(&change_summary(&tracker, now, changed));
                }
                None => {
                    tracing::info!("all sources stopped; the last state stays programmed");
                    sources_open = false;
                    if !have_initial_state {
                        break;
                    }
                }
            },
            _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let pending = tracker.take_pending();
                unprogrammed.extend(pending.trigger_times.values().flatten().copied());
                observer.changes_applied(&change_summary(&tracker, SystemTime::now(), false));
                let periodic = Instant::now() >= next_full;
                let full = need_full || periodic;
                let version = tracker.version();
                let state = match &programmed_state {
                    Some((programmed, state)) if *programmed == version => Arc::clone(state),
                    _ => tracker.state(),
                };
                let request = SyncRequest {
                    state,
                    changed: pending.touched(),
                    node_changed: pending.node,
                    full,
                    periodic: periodic && !need_full,
                };
                let start = Instant::now();
                last_start = Some(start);
                budget.take(start);
                let mut proxier = backend.ready().await;
                let (returned, result, request) = joined(tokio::task::spawn_blocking(move || {
                    let result = proxier.sync(&request);
                    (proxier, result, request)
                })
                .await);
                backend = Backend::Ready(returned);
                let took = start.elapsed();
                let programmed = if result.is_ok() { std::mem::take(&mut unprogrammed) } else { Vec::new() };
                observer.sync_finished(&SyncReport {
                    full: result.as_ref().map_or(request.full, |o| o.full || request.full),
                    duration: took,
                    finished_at: SystemTime::now(),
                    result: result.as_ref(),
                    state: &request.state,
                    programmed_trigger_times: &programmed,
                });
                match result {
                    Ok(outcome) => {
                        tracing::info!(
                            full = outcome.full,
                            periodic = request.periodic,
                            services = pending.services.len(),
                            endpoints = pending.endpoints.len(),
                            bytes = outcome.transaction_bytes,
                            service_ports = outcome.service_ports,
                            took_ms = took.as_secs_f64() * 1e3,
                            "synced rules"
                        );
                        // A periodic sync counts whether the backend rewrote everything or
                        // found (and repaired) only differences.
                        if outcome.full || request.full {
                            next_full = start + config.sync_period;
                            if let Some(task) = config.after_full_sync {
                                tokio::task::spawn_blocking(task);
                            }
                        }
                        programmed_state = Some((version, Arc::clone(&request.state)));
                        need_full = false;
                        retry_at = None;
                        retry_delay = config.retry_delay;
                        status.succeeded(SystemTime::now(), took, !tracker.pending().is_empty());
                    }
                    Err(err) => {
                        tracing::error!(error = %err, retry_in = ?retry_delay, "sync failed; previous rules stay in place");
                        need_full = true;
                        retry_at = Some(Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(config.sync_period.max(config.retry_delay));
                        status.failed(err.to_string(), took);
                    }
                }
                drop(request);
                tracker.unshare_state();
            }
        }
    }
    backend.ready().await
}

/// The backend: preparing in a blocking task at start, then ready.
enum Backend {
    Preparing(tokio::task::JoinHandle<Box<dyn Proxier>>),
    Ready(Box<dyn Proxier>),
}

impl Backend {
    async fn ready(self) -> Box<dyn Proxier> {
        match self {
            Backend::Preparing(handle) => joined(handle.await),
            Backend::Ready(proxier) => proxier,
        }
    }
}

/// A blocking task's result; its panic goes on in the caller.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    result.unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

/// When syncs may start: upstream's bounded-frequency runner, a token bucket that gains
/// a token every `period` and holds at most [`SyncBudget::BURST`].
#[derive(Debug, Clone, Copy)]
struct SyncBudget {
    period: Duration,
    tokens: f64,
    at: Instant,
}

impl SyncBudget {
    /// Upstream's `burstSyncs` for the iptables and nftables proxiers.
    const BURST: f64 = 2.0;

    fn new(period: Duration, now: Instant) -> Self {
        SyncBudget {
            period,
            tokens: Self::BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.period.is_zero() {
            self.tokens = Self::BURST;
        } else {
            let gained =
                now.saturating_duration_since(self.at).as_secs_f64() / self.period.as_secs_f64();
            self.tokens = (self.tokens + gained).min(Self::BURST);
        }
        self.at = now;
    }

    /// The earliest time a sync may start.
    fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.period.mul_f64(1.0 - self.tokens)
        }
    }

    fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

fn change_summary(tracker: &ChangeTracker, at: SystemTime, queued: bool) -> ChangeSummary {
    ChangeSummary {
        at,
        queued,
        service_changes_total: tracker.service_changes_total(),
        endpoint_changes_total: tracker.endpoint_changes_total(),
        services_pending: tracker.pending().services.len(),
        endpoints_pending: tracker.pending().endpoints.len(),
        node_eligible: tracker.node_eligible(),
    }
}
