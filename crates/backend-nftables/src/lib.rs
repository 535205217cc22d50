//! The nftables proxier: [`plan`] decides the rules (pure), [`apply`] hands them to the
//! kernel (the only code that runs `nft`).
#![forbid(unsafe_code)]

pub mod apply;
pub mod netlink;
pub mod plan;
pub mod render;

use std::collections::BTreeSet;
use std::fmt::Write as _;

use proxy_core::model::{IpFamily, ServicePortName};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};

use crate::apply::NftRunner;
use crate::netlink::ElementOp;
use crate::plan::{family_names, replan, Delta, FamilyPlan, NftConfig, TABLE};
use crate::render::{by_map, render_delta, render_full, ElementVerb};

/// At most this many conflict warnings are logged per sync; the rest are counted.
const MAX_WARNINGS_LOGGED: usize = 20;

/// The nftables backend: keeps what it programmed last and sends only the difference.
pub struct NftablesProxier<R: NftRunner> {
    config: NftConfig,
    runner: R,
    /// What the kernel holds, per family; `None` until the first full sync succeeds, and
    /// again after any failure (the next sync then rewrites the tables).
    programmed: Option<Vec<FamilyPlan>>,
}

impl<R: NftRunner> NftablesProxier<R> {
    pub fn new(config: NftConfig, runner: R) -> Self {
        NftablesProxier {
            config,
            runner,
            programmed: None,
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    fn full_script(
        &self,
        request: &SyncRequest,
        warnings: &mut Vec<String>,
    ) -> (String, Vec<FamilyPlan>) {
        let mut script = String::new();
        let mut plans = Vec::new();
        for &family in &self.config.families {
            let previous = self
                .programmed
                .iter()
                .flatten()
                .find(|p| p.family() == family);
            let plan = FamilyPlan::full(family, &request.state, &self.config, previous, warnings);
            render_full(&mut script, &plan);
            plans.push(plan);
        }
        (script, plans)
    }
}

/// What a sync hands to the kernel.
enum Change {
    /// An `nft` script: a full rewrite, or a delta that creates or removes objects.
    Script(String),
    /// Element additions and deletions only, per family (in the order of the plans).
    Elements(Vec<Delta>),
}

impl Change {
    fn of(plans: &[FamilyPlan], deltas: Vec<Delta>) -> Change {
        if deltas.iter().all(Delta::elements_only) {
            return Change::Elements(deltas);
        }
        let mut script = String::new();
        for (plan, delta) in plans.iter().zip(&deltas) {
            render_delta(&mut script, plan, delta);
        }
        Change::Script(script)
    }
}

/// Element-only deltas as operations: per family, deletions before additions (a changed
/// value is a deletion and an addition of the same key).
fn element_ops<'a>(plans: &[FamilyPlan], deltas: &'a [Delta]) -> Vec<ElementOp<'a>> {
    let mut ops = Vec::new();
    for (plan, delta) in plans.iter().zip(deltas) {
        for (verb, set) in [
            (ElementVerb::Delete, &delta.deleted),
            (ElementVerb::Add, &delta.added),
        ] {
            for (map, elements) in by_map(set) {
                ops.push(ElementOp {
                    family: plan.family(),
                    verb,
                    map,
                    elements,
                });
            }
        }
    }
    ops
}

/// Every Service port, old and new, of the Services named in the request.
fn changed_ports(request: &SyncRequest, plans: &[FamilyPlan]) -> BTreeSet<ServicePortName> {
    let mut names = BTreeSet::new();
    for service in &request.changed {
        names.extend(request.state.ports_of(service).map(|(n, _)| n.clone()));
        for plan in plans {
            names.extend(plan.ports.keys().filter(|n| &n.service == service).cloned());
        }
    }
    names
}

fn log_warnings(warnings: &[String]) {
    for w in warnings.iter().take(MAX_WARNINGS_LOGGED) {
        tracing::warn!("{w}");
    }
    if warnings.len() > MAX_WARNINGS_LOGGED {
        tracing::warn!(
            more = warnings.len() - MAX_WARNINGS_LOGGED,
            "further conflicts not logged"
        );
    }
}

impl<R: NftRunner + Send + 'static> Proxier for NftablesProxier<R> {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let started = std::time::Instant::now();
        let mut warnings = Vec::new();
        // A node change can alter what "local" means everywhere: rewrite.
        let full = request.full || request.node_changed || self.programmed.is_none();
        let (change, plans) = if full {
            let (script, plans) = self.full_script(request, &mut warnings);
            (Change::Script(script), plans)
        } else {
            // Take the plans out: if the kernel refuses the delta, they no longer describe
            // it, and the next sync must be full.
            let mut plans = self.programmed.take().unwrap_or_default();
            let names = changed_ports(request, &plans);
            let deltas: Vec<Delta> = plans
                .iter_mut()
                .map(|plan| replan(plan, &request.state, &names, &mut warnings))
                .collect();
            (Change::of(&plans, deltas), plans)
        };
        log_warnings(&warnings);
        let planned_at = std::time::Instant::now();
        self.programmed = None;
        let transaction_bytes = match &change {
            Change::Script(script) if script.is_empty() => 0,
            Change::Script(script) => {
                self.runner.run(script)?;
                script.len()
            }
            Change::Elements(deltas) => {
                let ops = element_ops(&plans, deltas);
                if ops.is_empty() {
                    0
                } else {
                    self.runner.apply_elements(&ops)?
                }
            }
        };
        tracing::debug!(
            plan_ms = (planned_at - started).as_secs_f64() * 1e3,
            apply_ms = planned_at.elapsed().as_secs_f64() * 1e3,
            "nftables sync"
        );
        let service_ports = plans.first().map_or(0, |p| p.ports.len());
        self.programmed = Some(plans);
        Ok(SyncOutcome {
            full,
            transaction_bytes,
            service_ports,
        })
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.programmed = None;
        self.runner.run(&cleanup_script())
    }
}

/// Deletes our tables in both families; succeeds whether or not they exist.
pub fn cleanup_script() -> String {
    let mut script = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let f = family_names(family).table_family;
        let _ = writeln!(script, "add table {f} {TABLE}\ndelete table {f} {TABLE}");
    }
    script
}
