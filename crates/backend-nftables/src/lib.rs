//! The nftables proxier: [`plan`] decides the rules (pure), [`apply`] hands them to the
//! kernel (the only code that runs `nft`).
#![forbid(unsafe_code)]

pub mod adopt;
pub mod apply;
pub mod netlink;
pub mod plan;
pub mod readback;
pub mod render;
pub mod resync;
pub mod rule;
pub mod verify;

use std::collections::BTreeSet;

use proxy_core::model::{ports_of_service, IpFamily, ServicePortName};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};

use crate::adopt::Found;
use crate::apply::{KernelTable, NftRunner};
use crate::netlink::{ordered_deletions, Deletion, ElementOp, Object, TableOp};
use crate::plan::{
    counter_names, replan, ClassObject, CounterName, Delta, Element, Elements, FamilyPlan, KeyKind,
    MapId, NftConfig, PreviousSlots,
};
use crate::readback::{RawElement, SetDigest};
use crate::render::{
    chain_names, cleanup_ops, counter_ops, delta_ops, skeleton_ops, table_maps, ElementVerb,
    FullMode,
};
use crate::resync::{checked_maps, compare, Expected, Finding, MapDiff};

/// At most this many conflict warnings are logged per sync; the rest are counted.
const MAX_WARNINGS_LOGGED: usize = 20;

/// The nftables backend: keeps what it programmed last and sends only the difference.
pub struct NftablesProxier<R: NftRunner> {
    config: NftConfig,
    runner: R,
    /// What the kernel holds, per family; `None` until the first full sync succeeds, and
    /// again after any failure (the next sync then rewrites the tables).
    programmed: Option<Vec<FamilyPlan>>,
    /// Digests of what the kernel should hold, per family as in `programmed`, for the
    /// periodic re-sync to compare with what it reads back.
    expected: Vec<Expected>,
    /// What the last periodic check found differing (see [`SyncOutcome::drift`]).
    drift: u64,
    /// Our tables as a previous process left them, read by [`Proxier::prepare`] for the
    /// first sync; dropped by it.
    found: Vec<Found>,
}

impl<R: NftRunner> NftablesProxier<R> {
    pub fn new(config: NftConfig, runner: R) -> Self {
        NftablesProxier {
            config,
            runner,
            programmed: None,
            expected: Vec::new(),
            drift: 0,
            found: Vec::new(),
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    fn full_plans(
        &mut self,
        request: &SyncRequest,
        found: &[Found],
        warnings: &mut Vec<String>,
    ) -> (Vec<FamilyPlan>, Vec<Elements>) {
        let families = self.config.families.clone();
        families
            .into_iter()
            .map(|family| {
                let previous = self
                    .programmed
                    .iter()
                    .flatten()
                    .find(|p| p.family() == family);
                if let Some(plan) = previous {
                    let previous = PreviousSlots::Plan(plan);
                    return FamilyPlan::full(
                        family,
                        &request.state,
                        &self.config,
                        previous,
                        warnings,
                    );
                }
                // Nothing programmed by this process: keep the slots the kernel holds.
                let adopted = found
                    .iter()
                    .find(|f| f.family == family)
                    .map(|f| f.slots.slots(family, &request.state))
                    .unwrap_or_default();
                let previous = PreviousSlots::Adopted(&adopted);
                FamilyPlan::full(family, &request.state, &self.config, previous, warnings)
            })
            .unzip()
    }

    /// Our tables as the kernel holds them, for a first full sync: what
    /// [`Proxier::prepare`] read if nothing was committed since, else read now.
    fn adoption(&mut self) -> Vec<Found> {
        let mut prepared = std::mem::take(&mut self.found);
        let now = if prepared.is_empty() {
            None
        } else {
            self.runner.generation().ok().flatten()
        };
        let families = self.config.families.clone();
        families
            .into_iter()
            .filter_map(|family| {
                let still = prepared.iter().position(|f| {
                    f.family == family && f.generation.is_some() && f.generation == now
                });
                let found = match still {
                    Some(i) => Some(prepared.swap_remove(i)),
                    None => Found::read(&mut self.runner, family),
                }?;
                if !found.slots.is_empty() {
                    tracing::info!(
                        ?family,
                        "adopting the endpoint slots of the existing nftables table"
                    );
                }
                Some(found)
            })
            .collect()
    }

    /// Loads whole tables: in place first, keeping what exists so traffic flows until
    /// the new elements are in; if that is refused (e.g. an older layout whose maps have
    /// other types), by replacing the tables.
    fn apply_full(
        &mut self,
        plans: &[FamilyPlan],
        elements: &[Elements],
        expected: &[Expected],
        found: &[Found],
    ) -> Result<usize, ProxierError> {
        let unchanged: Vec<BTreeSet<String>> = plans
            .iter()
            .zip(expected)
            .map(|(plan, expected)| {
                let family = plan.family();
                match found.iter().find(|f| f.family == family) {
                    Some(found) => loaded(expected, &found.table),
                    None => self.maps_already_loaded(plan, expected),
                }
            })
            .collect();
        let kept: usize = unchanged.iter().map(BTreeSet::len).sum();
        if kept > 0 {
            tracing::info!(
                maps = kept,
                "nftables maps already hold the planned elements; not reloaded"
            );
        }
        // Existing counters are kept with their values (an adopted table keeps counting).
        let counters: Vec<BTreeSet<CounterName>> = elements
            .iter()
            .map(|e| {
                counter_names(
                    [KeyKind::Ip, KeyKind::NodePort]
                        .iter()
                        .filter_map(|k| e.get(&MapId::Counters(*k)))
                        .flatten(),
                )
            })
            .collect();
        let (deletions, existing) = self.obsolete_objects(plans, &counters);
        let shared: Vec<Elements> = plans
            .iter()
            .zip(&unchanged)
            .map(|(plan, unchanged)| plan.shared_elements(|map| !unchanged.contains(&map.name())))
            .collect();
        let loads = self.map_loads(plans, elements, &shared, &unchanged, &existing, found);
        let mut ops = load_ops(&loads);
        // A counter map that goes is emptied first: its elements hold its counters,
        // which could not be deleted in the same transaction otherwise.
        for d in &deletions {
            let Object::Set { name, .. } = &d.object else {
                continue;
            };
            for kind in [KeyKind::Ip, KeyKind::NodePort] {
                if *name == MapId::Counters(kind).name() {
                    ops.push(ElementOp {
                        family: d.family,
                        verb: ElementVerb::Flush,
                        map: MapId::Counters(kind),
                        elements: Vec::new(),
                    });
                }
            }
        }
        let update = full_transaction(
            plans,
            &existing,
            &counters,
            FullMode::Update,
            &ops,
            &deletions,
        );
        match self.runner.apply(&update) {
            Ok(bytes) => Ok(bytes),
            Err(err) => {
                tracing::warn!(error = %err, "updating the tables in place failed; replacing them");
                // A new table is empty: every map is loaded (and counters start at 0).
                let shared: Vec<Elements> =
                    plans.iter().map(|p| p.shared_elements(|_| true)).collect();
                let none = vec![BTreeSet::new(); plans.len()];
                let loads = whole_loads(plans, elements, &shared, &none);
                let replace = full_transaction(
                    plans,
                    &existing,
                    &counters,
                    FullMode::Replace,
                    &load_ops(&loads),
                    &[],
                );
                self.runner.apply(&replace)
            }
        }
    }

    /// How each map of a full load gets its elements, but those `unchanged` names: a map
    /// the kernel has gets only the difference from what it holds (as `found` read it,
    /// or read back now), so a restart after one change sends that change; others are
    /// loaded whole.
    fn map_loads<'e>(
        &mut self,
        plans: &[FamilyPlan],
        elements: &'e [Elements],
        shared: &'e [Elements],
        unchanged: &[BTreeSet<String>],
        existing: &[BTreeSet<String>],
        found: &[Found],
    ) -> Vec<MapLoad<'e>> {
        let mut loads = whole_loads(plans, elements, shared, unchanged);
        for load in &mut loads {
            let MapLoad::Whole {
                family,
                map,
                elements,
            } = load
            else {
                continue;
            };
            let name = map.name();
            let exists = plans
                .iter()
                .position(|p| p.family() == *family)
                .and_then(|i| existing.get(i))
                .is_some_and(|e| e.contains(&name));
            if !exists {
                continue;
            }
            let read = found
                .iter()
                .find(|f| f.family == *family)
                .and_then(|f| f.shared.get(&name));
            let read_now;
            let kernel = match read {
                Some(kernel) => kernel,
                None => match self.runner.map_elements(*family, &name) {
                    Ok(Some(kernel)) => {
                        read_now = kernel;
                        &read_now
                    }
                    Ok(None) => continue,
                    Err(err) => {
                        tracing::debug!(error = %err, map = %name, "cannot read a map back; loading it whole");
                        continue;
                    }
                },
            };
            *load = MapLoad::against(*family, *map, kernel, std::mem::take(elements));
        }
        loads
    }

    /// The maps of `plan`'s table whose elements the kernel already holds exactly (by
    /// digest): a full load (after a restart, or a rewrite of rules) leaves them alone
    /// instead of reloading every element. Empty when the table cannot be read.
    fn maps_already_loaded(&mut self, plan: &FamilyPlan, expected: &Expected) -> BTreeSet<String> {
        match self.runner.read_back(plan.family(), &checked_maps(plan)) {
            Ok(Some(kernel)) => loaded(expected, &kernel),
            Ok(None) => BTreeSet::new(),
            Err(err) => {
                tracing::debug!(error = %err, "cannot read our nftables maps back; loading all of them");
                BTreeSet::new()
            }
        }
    }

    /// Chains and maps our tables hold that the plans no longer have (classes nobody
    /// uses, a removed Service's firewall chain, objects of an older layout), and the
    /// counters of Service ports that are gone: after a full load nothing refers to
    /// them. Listing failures only leave them in place. Also the names of the maps and
    /// sets that exist, per plan.
    fn obsolete_objects(
        &mut self,
        plans: &[FamilyPlan],
        counters: &[BTreeSet<CounterName>],
    ) -> (Vec<Deletion>, Vec<BTreeSet<String>>) {
        let mut deletions = Vec::new();
        let mut existing_sets = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let family = plan.family();
            let existing = match self.runner.existing_objects(family) {
                Ok(Some(existing)) => existing,
                Ok(None) => Vec::new(),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot list our nftables objects; obsolete ones stay");
                    Vec::new()
                }
            };
            existing_sets.push(
                existing
                    .iter()
                    .filter(|o| matches!(o, Object::Set { .. }))
                    .map(|o| o.name().to_string())
                    .collect(),
            );
            let chains: BTreeSet<String> = chain_names(plan).into_iter().collect();
            let maps: BTreeSet<String> = table_maps(plan).iter().map(ClassObject::name).collect();
            for object in existing {
                let wanted = match &object {
                    Object::Chain(name) => chains.contains(name),
                    Object::Set { name, .. } => maps.contains(name),
                    Object::Counter(_) => true,
                };
                if !wanted {
                    deletions.push(Deletion { family, object });
                }
            }
            let planned = counters.get(i);
            match self.runner.existing_counters(family) {
                Ok(Some(names)) => deletions.extend(
                    names
                        .into_iter()
                        .filter(|n| {
                            is_service_counter(n)
                                && planned.is_none_or(|p| {
                                    CounterName::parse(n).is_none_or(|c| !p.contains(&c))
                                })
                        })
                        .map(|name| Deletion {
                            family,
                            object: Object::Counter(name),
                        }),
                ),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot list our nftables counters; obsolete ones stay");
                }
            }
        }
        (deletions, existing_sets)
    }
}

/// The maps whose elements `kernel` holds exactly as `expected` (by digest).
fn loaded(expected: &Expected, kernel: &KernelTable) -> BTreeSet<String> {
    expected
        .maps
        .iter()
        .filter(|(name, digest)| kernel.maps.get(*name) == Some(*digest))
        .map(|(name, _)| name.clone())
        .collect()
}

/// How one map of a full load or a repair gets its elements.
enum MapLoad<'e> {
    /// Emptied, then every planned element added.
    Whole {
        family: IpFamily,
        map: MapId,
        elements: Vec<&'e Element>,
    },
    /// What it holds that is not planned deleted, then what it lacks added.
    Diff {
        family: IpFamily,
        map: MapId,
        diff: MapDiff<'e>,
    },
}

impl<'e> MapLoad<'e> {
    /// `planned` as the difference from the `kernel`'s elements, or whole when the map
    /// holds keys we could not have written.
    fn against(
        family: IpFamily,
        map: MapId,
        kernel: &[RawElement],
        planned: Vec<&'e Element>,
    ) -> MapLoad<'e> {
        match MapDiff::of(family, map, kernel, &planned) {
            Some(diff) => MapLoad::Diff { family, map, diff },
            None => MapLoad::Whole {
                family,
                map,
                elements: planned,
            },
        }
    }
}

/// Every map of each plan loaded whole (its own elements, or the shared ones), but
/// those `unchanged` names; affinity sets keep the clients they remember.
fn whole_loads<'e>(
    plans: &[FamilyPlan],
    elements: &'e [Elements],
    shared: &'e [Elements],
    unchanged: &[BTreeSet<String>],
) -> Vec<MapLoad<'e>> {
    let mut loads = Vec::new();
    for (((plan, elements), shared), unchanged) in
        plans.iter().zip(elements).zip(shared).zip(unchanged)
    {
        for object in table_maps(plan) {
            let ClassObject::Map(map) = object else {
                continue;
            };
            if unchanged.contains(&map.name()) {
                continue;
            }
            let elements = elements
                .get(&map)
                .or_else(|| shared.get(&map))
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            loads.push(MapLoad::Whole {
                family: plan.family(),
                map,
                elements,
            });
        }
    }
    loads
}

/// The element operations of `loads`, in order; within a map deletions come first (a
/// changed value is deleted and added under the same key).
fn load_ops<'a>(loads: &'a [MapLoad<'_>]) -> Vec<ElementOp<'a>> {
    let mut ops = Vec::new();
    for load in loads {
        let (family, map, steps) = match load {
            MapLoad::Whole {
                family,
                map,
                elements,
            } => (
                *family,
                *map,
                [
                    (ElementVerb::Flush, Vec::new()),
                    (ElementVerb::Add, elements.clone()),
                ],
            ),
            MapLoad::Diff { family, map, diff } => (
                *family,
                *map,
                [
                    (ElementVerb::Delete, diff.extra.iter().collect()),
                    (ElementVerb::Add, diff.missing.clone()),
                ],
            ),
        };
        for (verb, elements) in steps {
            let needed = verb == ElementVerb::Flush || !elements.is_empty();
            if needed {
                ops.push(ElementOp {
                    family,
                    verb,
                    map,
                    elements,
                });
            }
        }
    }
    ops
}

/// Whether a counter of our table is a Service port's (`--service-counters`), which a
/// full sync deletes when no planned element names it.
fn is_service_counter(name: &str) -> bool {
    name.starts_with("svc-")
}

/// Element-only deltas as operations: per family, deletions before additions (a changed
/// value is a deletion and an addition of the same key).
fn element_ops<'a>(plans: &[FamilyPlan], deltas: &'a [Delta]) -> Vec<ElementOp<'a>> {
    let mut ops = Vec::new();
    for (plan, delta) in plans.iter().zip(deltas) {
        ops.extend(render::element_ops(
            plan.family(),
            ElementVerb::Delete,
            &delta.deleted,
        ));
        ops.extend(render::element_ops(
            plan.family(),
            ElementVerb::Add,
            &delta.added,
        ));
    }
    ops
}

/// A full load as one transaction: the skeleton (in `Update` mode keeping the table, its
/// maps and their elements), every element, then what is no longer used.
fn full_transaction<'e>(
    plans: &[FamilyPlan],
    existing: &[BTreeSet<String>],
    counters: &[BTreeSet<CounterName>],
    mode: FullMode,
    elements: &[ElementOp<'e>],
    deletions: &[Deletion],
) -> Vec<TableOp<'e>> {
    let mut all: Vec<TableOp<'e>> = Vec::new();
    for ((plan, existing), counters) in plans.iter().zip(existing).zip(counters) {
        all.extend(skeleton_ops(plan, mode, existing));
        all.extend(counter_ops(plan.family(), counters, false));
    }
    all.extend(elements.iter().cloned().map(TableOp::Elements));
    all.extend(ordered_deletions(deletions));
    all
}

/// Every Service port, old and new, of the Services named in the request.
fn changed_ports(request: &SyncRequest, plans: &[FamilyPlan]) -> BTreeSet<ServicePortName> {
    let mut names = BTreeSet::new();
    for service in &request.changed {
        names.extend(request.state.ports_of(service).map(|(n, _)| n.clone()));
        for plan in plans {
            names.extend(ports_of_service(&plan.ports, service).map(|(n, _)| n.clone()));
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

    /// Reads the tables a previous process left while the sources list: the first sync
    /// uses the read if nothing was committed since.
    fn prepare(&mut self) {
        if self.programmed.is_some() {
            return;
        }
        let families = self.config.families.clone();
        self.found = families
            .into_iter()
            .filter_map(|family| Found::read(&mut self.runner, family))
            .collect();
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        // The periodic sync checks the kernel against what was programmed and repairs
        // only what differs; it rewrites the tables only when chains, sets or rules do.
        if request.periodic && !request.node_changed && self.programmed.is_some() {
            let changes = SyncRequest {
                full: false,
                periodic: false,
                ..request.clone()
            };
            let mut outcome = self.sync_changes(&changes)?;
            self.drift = 0;
            match self.check_and_repair() {
                Ok(Some(bytes)) => {
                    outcome.transaction_bytes += bytes;
                    outcome.drift = std::mem::take(&mut self.drift);
                    return Ok(outcome);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot check the nftables tables; rewriting them");
                }
            }
        }
        let mut outcome = self.sync_changes(request)?;
        outcome.drift = std::mem::take(&mut self.drift);
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.programmed = None;
        self.expected.clear();
        self.runner.apply(&cleanup_ops()).map(|_| ())
    }
}

impl<R: NftRunner> NftablesProxier<R> {
    /// Reads each family's table back and compares it with what was programmed: `Some`
    /// (the bytes sent) when it matched or only map elements differed, which are then
    /// repaired; `None` when the tables must be rewritten.
    fn check_and_repair(&mut self) -> Result<Option<usize>, ProxierError> {
        let Some(plans) = self.programmed.take() else {
            return Ok(None);
        };
        let result = self.check_plans(&plans);
        if matches!(result, Ok(Some(_))) {
            self.programmed = Some(plans);
        }
        result
    }

    fn check_plans(&mut self, plans: &[FamilyPlan]) -> Result<Option<usize>, ProxierError> {
        // Nobody committed anything since our last change: nothing to read back.
        if self.runner.unchanged_since_last_commit()? {
            tracing::debug!("periodic re-sync: no nftables commit since ours");
            return Ok(Some(0));
        }
        let mut repairs: Vec<(usize, String)> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let Some(expected) = self.expected.get(i) else {
                return Ok(None);
            };
            let Some(kernel) = self.runner.read_back(plan.family(), &checked_maps(plan))? else {
                return Ok(None);
            };
            match compare(plan, expected, &kernel) {
                Finding::Matches => {}
                Finding::Maps(maps) => repairs.extend(maps.into_iter().map(|m| (i, m))),
                Finding::Rewrite(reason) => {
                    self.drift += 1;
                    tracing::warn!(family = ?plan.family(), %reason, "nftables table differs from what was programmed; rewriting it");
                    return Ok(None);
                }
            }
        }
        if repairs.is_empty() {
            tracing::debug!("periodic re-sync: the kernel holds what was programmed");
            return Ok(Some(0));
        }
        self.drift += repairs.len() as u64;
        self.repair_maps(plans, &repairs).map(Some)
    }

    /// Brings the named maps back to the plan: adds what is missing, or, when the kernel
    /// holds elements we never wrote, empties the map and loads it again (one batch).
    fn repair_maps(
        &mut self,
        plans: &[FamilyPlan],
        repairs: &[(usize, String)],
    ) -> Result<usize, ProxierError> {
        let mut wanted: Vec<(usize, MapId, Vec<Element>)> = Vec::new();
        for (i, map) in repairs {
            let Some(plan) = plans.get(*i) else { continue };
            let Some(id) = table_maps(plan).into_iter().find_map(|o| match o {
                ClassObject::Map(id) if id.name() == *map => Some(id),
                _ => None,
            }) else {
                continue;
            };
            let mut elements: Vec<Element> = plan
                .ports
                .values()
                .flat_map(|port| plan.port_elements(port))
                .filter(|e| e.map == id)
                .collect();
            elements.extend(
                plan.shared_elements(|m| m == id)
                    .remove(&id)
                    .unwrap_or_default(),
            );
            elements.sort();
            elements.dedup();
            wanted.push((*i, id, elements));
        }
        let mut loads = Vec::new();
        let mut summary = Vec::new();
        for (i, id, elements) in &wanted {
            let family = plans[*i].family();
            let kernel = self
                .runner
                .map_elements(family, &id.name())?
                .unwrap_or_default();
            let load = MapLoad::against(family, *id, &kernel, elements.iter().collect());
            summary.push(match &load {
                MapLoad::Diff { diff, .. } => format!(
                    "{} (missing {}, extra {})",
                    id.name(),
                    diff.missing.len(),
                    diff.extra.len()
                ),
                MapLoad::Whole { .. } => format!("{} (foreign elements; reloaded)", id.name()),
            });
            loads.push(load);
        }
        let ops = load_ops(&loads);
        tracing::warn!(maps = %summary.join(", "), "nftables maps differed from what was programmed; repairing them");
        let ops: Vec<TableOp<'_>> = ops.into_iter().map(TableOp::Elements).collect();
        let bytes = self.runner.apply(&ops)?;
        for (i, id, elements) in &wanted {
            if let Some(expected) = self.expected.get_mut(*i) {
                expected.maps.insert(id.name(), SetDigest::of(elements));
            }
        }
        Ok(bytes)
    }

    /// Reads back the rules of each family after they changed, for the next re-sync.
    fn remember_rules(&mut self, plans: &[FamilyPlan]) {
        for (plan, expected) in plans.iter().zip(self.expected.iter_mut()) {
            if expected.rules.is_some() {
                continue;
            }
            match self.runner.read_back(plan.family(), &[]) {
                Ok(table) => expected.rules = table.map(|t| t.rules),
                Err(err) => {
                    tracing::debug!(error = %err, "cannot read our nftables rules back; the next re-sync rewrites them");
                }
            }
        }
    }

    fn sync_changes(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let started = std::time::Instant::now();
        let mut warnings = Vec::new();
        // A node change can alter what "local" means everywhere: rewrite.
        let full = request.full || request.node_changed || self.programmed.is_none();
        let plans;
        let mut deltas = Vec::new();
        let mut full_elements = Vec::new();
        // A first full load adopts the tables a previous process left.
        let found = if full && self.programmed.is_none() {
            self.adoption()
        } else {
            // Only a first full load may use what `prepare` read.
            self.found = Vec::new();
            Vec::new()
        };
        if full {
            (plans, full_elements) = self.full_plans(request, &found, &mut warnings);
        } else {
            // Take the plans out: if the kernel refuses the delta, they no longer describe
            // it, and the next sync must be full.
            let mut previous = self.programmed.take().unwrap_or_default();
            let names = changed_ports(request, &previous);
            deltas = previous
                .iter_mut()
                .map(|plan| replan(plan, &request.state, &names, &mut warnings))
                .collect();
            plans = previous;
        }
        log_warnings(&warnings);
        let planned_at = std::time::Instant::now();
        self.programmed = None;
        let expected = if full {
            // Digests of the full load, computed once: to skip maps the kernel already
            // holds, then to check against at the next re-sync.
            plans
                .iter()
                .zip(&full_elements)
                .map(|(plan, elements)| Expected::after_full(plan, elements))
                .collect()
        } else {
            std::mem::take(&mut self.expected)
        };
        let transaction_bytes = if full {
            self.apply_full(&plans, &full_elements, &expected, &found)?
        } else if deltas.iter().all(Delta::elements_only) {
            // New counters before the elements that name them, gone ones after.
            let counters = |delete: bool| {
                plans.iter().zip(&deltas).flat_map(move |(plan, delta)| {
                    let names = if delete {
                        &delta.counters_deleted
                    } else {
                        &delta.counters_added
                    };
                    counter_ops(plan.family(), names, delete)
                })
            };
            let ops: Vec<TableOp<'_>> = counters(false)
                .chain(
                    element_ops(&plans, &deltas)
                        .into_iter()
                        .map(TableOp::Elements),
                )
                .chain(counters(true))
                .collect();
            if ops.is_empty() {
                0
            } else {
                self.runner.apply(&ops)?
            }
        } else {
            let ops: Vec<TableOp<'_>> = plans
                .iter()
                .zip(&deltas)
                .flat_map(|(plan, delta)| delta_ops(plan, delta))
                .collect();
            self.runner.apply(&ops)?
        };
        tracing::debug!(
            plan_ms = (planned_at - started).as_secs_f64() * 1e3,
            apply_ms = planned_at.elapsed().as_secs_f64() * 1e3,
            "nftables sync"
        );
        self.expected = if full {
            expected
        } else {
            let mut expected = expected;
            for ((plan, delta), e) in plans.iter().zip(&deltas).zip(expected.iter_mut()) {
                e.apply(plan, delta);
            }
            expected
        };
        self.remember_rules(&plans);
        let service_ports = request.state.services.len();
        self.programmed = Some(plans);
        Ok(SyncOutcome {
            full,
            transaction_bytes,
            service_ports,
            ..SyncOutcome::default()
        })
    }
}

/// Deletes our tables in both families as `nft` commands (for tests: `--cleanup` sends
/// [`cleanup_ops`] over netlink).
pub fn cleanup_script() -> String {
    netlink::ops_text(&cleanup_ops())
}
