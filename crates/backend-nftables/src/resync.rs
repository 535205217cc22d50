//! The periodic re-sync without a rewrite: what the kernel should hold (kept up to date
//! with every change the proxier sends) against what it holds (read back over netlink).
//! Pure: the comparison decides; [`crate::NftablesProxier`] reads and repairs.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use proxy_core::model::IpFamily;

use crate::apply::KernelTable;
use crate::netlink::decode_fields;
use crate::plan::{ClassObject, Delta, Element, Elements, FamilyPlan, MapId};
use crate::readback::{RawElement, RulesDigest, SetDigest};
use crate::render::{chain_names, key_types, table_maps};

/// What one family's table should hold, beyond the plan itself: a digest of each map's
/// elements and of the rules as the kernel returned them after we wrote them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expected {
    pub maps: BTreeMap<String, SetDigest>,
    /// `None` until read back after the last change of rules (or when it cannot be).
    pub rules: Option<RulesDigest>,
}

/// The maps whose elements are ours to check: every map but the affinity sets, whose
/// elements the kernel adds and expires by itself.
pub fn checked_maps(plan: &FamilyPlan) -> Vec<String> {
    table_maps(plan)
        .iter()
        .filter(|o| matches!(o, ClassObject::Map(_)))
        .map(ClassObject::name)
        .collect()
}

impl Expected {
    /// After a full load of the ports' `elements` (per map) and the shared ones.
    pub fn after_full(plan: &FamilyPlan, elements: &Elements) -> Expected {
        let mut maps: BTreeMap<String, SetDigest> = checked_maps(plan)
            .into_iter()
            .map(|name| (name, SetDigest::default()))
            .collect();
        // Per map, not per element: a map's name is built on each call.
        for (map, elements) in elements {
            if let Some(digest) = maps.get_mut(&map.name()) {
                elements.iter().for_each(|e| digest.add_planned(e));
            }
        }
        let mut shared: BTreeMap<MapId, SetDigest> = BTreeMap::new();
        for element in plan.shared_refs.keys().map(|s| s.element()) {
            shared.entry(element.map).or_default().add_planned(&element);
        }
        for (map, digest) in shared {
            if let Some(d) = maps.get_mut(&map.name()) {
                d.merge(digest);
            }
        }
        Expected { maps, rules: None }
    }

    /// After a delta: its elements changed, and maps it created start empty.
    pub fn apply(&mut self, plan: &FamilyPlan, delta: &Delta) {
        for name in checked_maps(plan) {
            self.maps.entry(name).or_default();
        }
        for e in &delta.deleted {
            self.digest(e).remove_planned(e);
        }
        for e in &delta.added {
            self.digest(e).add_planned(e);
        }
        if !delta.elements_only() {
            self.rules = None; // rules changed: read them back again
        }
    }

    fn digest(&mut self, e: &Element) -> &mut SetDigest {
        self.maps.entry(e.map.name()).or_default()
    }
}

/// How one map gets from what the kernel holds to what is planned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MapDiff<'e> {
    /// The kernel's elements that are not planned, as keys to delete (sorted).
    pub extra: Vec<Element>,
    /// The planned elements the kernel lacks (a changed value is in both lists).
    pub missing: Vec<&'e Element>,
}

impl MapDiff<'_> {
    /// Compares the kernel's elements of `map` with the `planned` ones. `None` when the
    /// kernel holds a key we could not have written (a map of another layout): the map
    /// is then emptied and loaded whole.
    pub fn of<'e>(
        family: IpFamily,
        map: MapId,
        kernel: &[RawElement],
        planned: &[&'e Element],
    ) -> Option<MapDiff<'e>> {
        let raw: Vec<RawElement> = planned.iter().map(|e| RawElement::of(e)).collect();
        let kernel: HashSet<&RawElement> = kernel.iter().collect();
        let wanted: HashSet<&RawElement> = raw.iter().collect();
        let missing = planned
            .iter()
            .zip(&raw)
            .filter(|(_, r)| !kernel.contains(r))
            .map(|(e, _)| *e)
            .collect();
        let types = key_types(map, family);
        let mut extra = Vec::new();
        for element in kernel.iter().filter(|e| !wanted.contains(*e)) {
            extra.push(Element {
                map,
                key: decode_fields(&types, &element.key)?,
                value: None,
            });
        }
        extra.sort_unstable();
        Some(MapDiff { extra, missing })
    }
}

/// What a re-sync found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The kernel holds what we programmed.
    Matches,
    /// Only these maps' elements differ: repair them.
    Maps(Vec<String>),
    /// Chains, sets or rules differ (or the table is gone): rewrite it.
    Rewrite(String),
}

/// Compares one family's table in the kernel with what the plan says it should hold.
pub fn compare(plan: &FamilyPlan, expected: &Expected, kernel: &KernelTable) -> Finding {
    // Objects the plan needs; extra ones the kernel may hold change no packet unless a
    // rule reaches them, and the rules are compared below.
    let mut wanted: BTreeSet<String> = table_maps(plan).iter().map(ClassObject::name).collect();
    wanted.extend(chain_names(plan));
    let have: BTreeSet<&str> = kernel.objects.iter().map(|o| o.name()).collect();
    let missing: Vec<&str> = wanted
        .iter()
        .map(String::as_str)
        .filter(|n| !have.contains(n))
        .collect();
    if !missing.is_empty() {
        return Finding::Rewrite(format!("missing {}", missing.join(", ")));
    }
    let Some(rules) = &expected.rules else {
        return Finding::Rewrite("rules not known".into());
    };
    if rules != &kernel.rules {
        let changed: Vec<&str> = rules
            .0
            .iter()
            .filter(|(chain, digest)| kernel.rules.0.get(*chain) != Some(digest))
            .map(|(chain, _)| chain.as_str())
            .chain(
                kernel
                    .rules
                    .0
                    .keys()
                    .filter(|c| !rules.0.contains_key(*c))
                    .map(String::as_str),
            )
            .collect();
        return Finding::Rewrite(format!("rules differ in {}", changed.join(", ")));
    }
    let maps: Vec<String> = expected
        .maps
        .iter()
        .filter(|(name, digest)| kernel.maps.get(*name) != Some(digest))
        .map(|(name, _)| name.clone())
        .collect();
    if maps.is_empty() {
        Finding::Matches
    } else {
        Finding::Maps(maps)
    }
}
