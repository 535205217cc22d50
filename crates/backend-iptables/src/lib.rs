//! The iptables proxier, with upstream's chain names and layout: [`plan`] decides the
//! chains (pure), [`apply`] runs `iptables-restore --noflush` (the only code that
//! touches the kernel).
//!
//! Syncs: a full sync declares (and so rewrites) every chain of ours and deletes stale
//! per-Service chains; a partial sync rewrites only the chains of the changed Services
//! and the shared chains (`KUBE-SERVICES`, ...) whose content changed. Chains not named
//! in the input are left as they are by `--noflush`. Full syncs run first, every sync
//! period, after any failure, when the node changed, and when the `KUBE-PROXY-CANARY`
//! chain in mangle is gone (someone flushed the tables).
#![forbid(unsafe_code)]

pub mod apply;
pub mod names;
pub mod plan;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use proxy_core::model::{ports_of_service, IpFamily, ServicePortName};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};

use crate::apply::IptablesRunner;
use crate::names::KUBE_PROXY_CANARY;
use crate::plan::{
    full_input, parse_save, render_restore, rule_counts, FamilyPlan, IptConfig, Table, TableInput,
    TopChain,
};

/// Counters for the metrics server (`sync_proxy_rules_iptables_*`), as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IptablesCounters {
    /// Failed `iptables-restore` runs, full or partial.
    pub restore_failures: u64,
    /// Failed `iptables-restore` runs of partial syncs.
    pub partial_restore_failures: u64,
    /// Rules programmed per table (`iptables_total{table}`), all families together.
    pub rules_total: BTreeMap<&'static str, usize>,
    /// Rules written by the last restore per table (`iptables_last{table}`).
    pub rules_last: BTreeMap<&'static str, usize>,
}

/// A cheap, shareable handle on the counters; readers never block a sync for long.
#[derive(Debug, Clone, Default)]
pub struct CountersHandle(Arc<Mutex<IptablesCounters>>);

impl CountersHandle {
    pub fn snapshot(&self) -> IptablesCounters {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IptablesCounters> {
        // A panic while holding this lock cannot leave the counters inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the kernel holds for one family, as last programmed.
#[derive(Debug, Clone)]
struct Programmed {
    plan: FamilyPlan,
    top: BTreeMap<TopChain, Vec<String>>,
}

/// The iptables backend.
pub struct IptablesProxier<R: IptablesRunner> {
    config: IptConfig,
    runner: R,
    /// `None` until a full sync succeeds, and again after any failure.
    programmed: Option<Vec<Programmed>>,
    prepared: bool,
    counters: CountersHandle,
}

impl<R: IptablesRunner> IptablesProxier<R> {
    pub fn new(config: IptConfig, runner: R) -> Self {
        IptablesProxier {
            config,
            runner,
            programmed: None,
            prepared: false,
            counters: CountersHandle::default(),
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    /// The counters, for a metrics server to read while the proxier runs.
    pub fn counters(&self) -> CountersHandle {
        self.counters.clone()
    }

    /// Whether every family's canary chain is still there.
    fn canaries_present(&mut self) -> Result<bool, ProxierError> {
        for &family in &self.config.families {
            let text = self.runner.save(family, Some(Table::Mangle))?;
            let declared = format!(":{KUBE_PROXY_CANARY} ");
            if !text.lines().any(|l| l.starts_with(&declared)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn sync_full(
        &mut self,
        request: &SyncRequest,
        inputs: &mut Vec<(IpFamily, String)>,
        last: &mut BTreeMap<Table, usize>,
    ) -> Result<Vec<Programmed>, ProxierError> {
        let mut programmed = Vec::new();
        for &family in &self.config.families {
            let existing = parse_save(&self.runner.save(family, None)?);
            let plan = FamilyPlan::full(family, &request.state, &self.config);
            let (input, counts) = full_input(&plan, &self.config, &existing);
            add_counts(last, &counts);
            let top = TopChain::ALL
                .iter()
                .map(|&c| (c, plan.top_rules(c, &self.config)))
                .collect();
            inputs.push((family, input));
            programmed.push(Programmed { plan, top });
        }
        Ok(programmed)
    }

    fn partial_inputs(
        &self,
        request: &SyncRequest,
        programmed: &mut [Programmed],
        inputs: &mut Vec<(IpFamily, String)>,
        last: &mut BTreeMap<Table, usize>,
    ) {
        for prog in programmed {
            let names = changed_ports(request, &prog.plan);
            let mut tables: BTreeMap<Table, TableInput> = BTreeMap::new();
            for name in &names {
                let (old, new) = prog.plan.replan(name, &request.state, &self.config);
                let old_chains = old.map(|p| p.chains).unwrap_or_default();
                let empty = BTreeMap::new();
                let new_chains = new.map_or(&empty, |p| &p.chains);
                for (chain_name, chain) in new_chains {
                    if old_chains.get(chain_name) != Some(chain) {
                        tables.entry(chain.table).or_default().add_chain(chain);
                    }
                }
                for (chain_name, chain) in &old_chains {
                    if !new_chains.contains_key(chain_name) {
                        tables
                            .entry(chain.table)
                            .or_default()
                            .delete
                            .push(chain_name.clone());
                    }
                }
            }
            for chain in TopChain::ALL {
                let rules = prog.plan.top_rules(chain, &self.config);
                if prog.top.get(&chain) != Some(&rules) {
                    let input = tables.entry(chain.table()).or_default();
                    input.declare.push(chain.name().to_string());
                    input.rules.extend(rules.iter().cloned());
                    prog.top.insert(chain, rules);
                }
            }
            let counts = tables.iter().map(|(t, i)| (*t, i.rules.len())).collect();
            add_counts(last, &counts);
            let input = render_restore(&tables);
            if !input.is_empty() {
                inputs.push((prog.plan.family, input));
            }
        }
    }
}

fn add_counts(into: &mut BTreeMap<Table, usize>, counts: &BTreeMap<Table, usize>) {
    for (t, n) in counts {
        *into.entry(*t).or_default() += n;
    }
}

/// Every Service port, old and new, of the Services named in the request.
fn changed_ports(request: &SyncRequest, plan: &FamilyPlan) -> BTreeSet<ServicePortName> {
    let mut names = BTreeSet::new();
    for service in &request.changed {
        names.extend(request.state.ports_of(service).map(|(n, _)| n.clone()));
        names.extend(ports_of_service(&plan.ports, service).map(|(n, _)| n.clone()));
    }
    names
}

impl<R: IptablesRunner + Send + 'static> Proxier for IptablesProxier<R> {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        if !self.prepared {
            self.runner.prepare(self.config.localhost_node_ports)?;
            self.prepared = true;
        }
        let mut full = request.full || request.node_changed || self.programmed.is_none();
        if !full && !self.canaries_present()? {
            tracing::warn!(
                "{KUBE_PROXY_CANARY} is gone: rules were flushed by someone else; rewriting all"
            );
            full = true;
        }
        let mut inputs = Vec::new();
        let mut last = BTreeMap::new();
        // Taken out: if a restore fails, what the kernel holds is no longer known.
        let previous = self.programmed.take();
        let programmed = match previous {
            Some(mut programmed) if !full => {
                self.partial_inputs(request, &mut programmed, &mut inputs, &mut last);
                programmed
            }
            _ => self.sync_full(request, &mut inputs, &mut last)?,
        };
        for (family, input) in &inputs {
            if let Err(err) = self.runner.restore(*family, input) {
                let mut c = self.counters.lock();
                c.restore_failures += 1;
                if !full {
                    c.partial_restore_failures += 1;
                }
                return Err(err);
            }
        }
        let mut total = BTreeMap::new();
        for prog in &programmed {
            add_counts(&mut total, &rule_counts(&prog.plan, &self.config));
        }
        {
            let mut c = self.counters.lock();
            c.rules_total = total.iter().map(|(t, n)| (t.name(), *n)).collect();
            c.rules_last = last.iter().map(|(t, n)| (t.name(), *n)).collect();
        }
        let service_ports = request.state.services.len();
        self.programmed = Some(programmed);
        Ok(SyncOutcome {
            full,
            transaction_bytes: inputs.iter().map(|(_, i)| i.len()).sum(),
            service_ports,
            ..SyncOutcome::default()
        })
    }

    fn cleanup(&mut self) -> Result<(), ProxierError> {
        self.programmed = None;
        let families = [IpFamily::V4, IpFamily::V6];
        self.runner.cleanup(&families)
    }
}
