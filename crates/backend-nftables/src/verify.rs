//! `explain --verify` in nftables mode: the elements our table holds for one
//! destination, read back over netlink, against what the planner programs for it.
//!
//! The expected elements come from the planner itself ([`FamilyPlan::full`] with the
//! kernel's slots adopted, as a restart would plan, then [`FamilyPlan::port_elements`]),
//! so there is no second model to drift. Compared: every per-destination map and set
//! (`service-ips`, `service-nodeports`, picks, short-circuits, slot maps, no-endpoint
//! sets, `firewall-ips`, loopback rejects) filtered to the destination's keys, the
//! port's `cluster-ips` and `hairpin` elements, and its own chains (`fw-*`) by name.
//! The dynamic affinity sets are not compared (the kernel fills them).

use std::collections::{BTreeMap, BTreeSet};

use proxy_core::explain::{DestinationKind, Explanation, Verify};
use proxy_core::model::{IpFamily, ProxyState, ServicePortName};

use crate::adopt::{decode_endpoint, read_slots};
use crate::apply::{NftCommand, NftRunner};
use crate::netlink::{encode_fields, Object, NFT_GOTO, NF_DROP};
use crate::plan::{ip_key, Element, FamilyPlan, Fields, NftConfig, PreviousSlots, Shared};
use crate::readback::{RawElement, RawValue};

/// Verifies against the kernel of the node this runs on.
pub struct Verifier {
    config: NftConfig,
}

impl Verifier {
    pub fn new(config: NftConfig) -> Self {
        Verifier { config }
    }
}

impl Verify for Verifier {
    fn verify(&self, state: &ProxyState, explanation: &Explanation) -> Result<Vec<String>, String> {
        differences(&mut NftCommand::default(), &self.config, state, explanation)
    }
}

/// Sets the kernel fills itself, or that hold elements of many destinations.
fn per_destination(name: &str) -> bool {
    !name.starts_with("aff-") && name != "cluster-ips" && name != "hairpin"
}

/// What the plan wants for the explained destination: its keys, elements and chains.
struct Wanted {
    keys: BTreeMap<Vec<u8>, Fields>,
    elements: Vec<Element>,
    /// Shared elements this port needs: must be there, others may be too.
    shared: Vec<Element>,
    chains: Vec<String>,
}

fn wanted(plan: &FamilyPlan, state: &ProxyState, explanation: &Explanation) -> Wanted {
    let q = &explanation.query;
    let mut out = Wanted {
        keys: BTreeMap::new(),
        elements: Vec::new(),
        shared: Vec::new(),
        chains: Vec::new(),
    };
    let name = explanation.matched.as_ref().and_then(|m| {
        let name = ServicePortName {
            service: proxy_core::model::ServiceName::new(&m.namespace, &m.service),
            port: m.port.as_str().into(),
            protocol: m.protocol,
        };
        state.services.contains_key(&name).then_some(name)
    });
    // The destination asked about is always compared, matched or not.
    let dst = ip_key(q.dst.ip(), q.proto, q.dst.port());
    if explanation.matched.as_ref().map(|m| m.kind) != Some(DestinationKind::NodePort) {
        out.keys.insert(encode_fields(&dst), dst);
    }
    let Some(port) = name.and_then(|n| plan.ports.get(&n)) else {
        return out;
    };
    for d in &port.destinations {
        let key = match d {
            crate::plan::Destination::Ip(ip, proto, p) => ip_key(*ip, *proto, *p),
            crate::plan::Destination::NodePort(proto, p) => crate::plan::nodeport_key(*proto, *p),
        };
        out.keys.insert(encode_fields(&key), key);
    }
    out.elements = plan.port_elements(port);
    out.shared = port.shared().map(Shared::element).collect();
    out.chains = port.chains.iter().map(|c| c.name.clone()).collect();
    out
}

fn describe(element: &Element) -> String {
    match &element.value {
        Some(v) => format!("{} element {} : {v}", element.map.name(), element.key),
        None => format!("{} element {}", element.map.name(), element.key),
    }
}

fn describe_raw(
    family: IpFamily,
    map: &str,
    raw: &RawElement,
    keys: &BTreeMap<Vec<u8>, Fields>,
) -> String {
    let key = keys
        .get(&raw.key)
        .map_or_else(|| format!("{:02x?}", raw.key), ToString::to_string);
    let value = match &raw.value {
        RawValue::None => return format!("{map} element {key}"),
        RawValue::Data(data) => match decode_endpoint(family, data) {
            Some((ip, port)) => format!("{} . {port}", ip),
            None => format!("{data:02x?}"),
        },
        RawValue::Verdict { code, chain } => match (code, chain) {
            (&NFT_GOTO, Some(chain)) => format!("goto {}", chain.escape_debug()),
            (&NF_DROP, _) => "drop".into(),
            (code, _) => format!("verdict {code}"),
        },
        RawValue::Counter(name) => format!("counter {}", name.escape_debug()),
    };
    format!("{map} element {key} : {value}")
}

/// Every difference between the kernel and the plan for the explained destination.
pub fn differences<R: NftRunner + ?Sized>(
    runner: &mut R,
    config: &NftConfig,
    state: &ProxyState,
    explanation: &Explanation,
) -> Result<Vec<String>, String> {
    let family = IpFamily::of(&explanation.query.dst.ip());
    if !config.families.contains(&family) {
        return Ok(Vec::new());
    }
    let table = format!(
        "{} kube-proxy",
        crate::plan::family_names(family).table_family
    );
    let objects = match runner.existing_objects(family) {
        Ok(Some(objects)) => objects,
        Ok(None) => return Err("this runner cannot read the kernel back".into()),
        Err(err) if err.to_string().contains("No such file") => {
            return Ok(vec![format!("table {table} is missing")])
        }
        Err(err) => return Err(err.to_string()),
    };
    let slots = read_slots(runner, family, &objects).slots(family, state);
    let (plan, _) = FamilyPlan::full(
        family,
        state,
        config,
        PreviousSlots::Adopted(&slots),
        &mut Vec::new(),
    );
    let want = wanted(&plan, state, explanation);

    let mut diffs = Vec::new();
    let names: BTreeSet<&str> = objects.iter().map(Object::name).collect();
    for chain in &want.chains {
        if !names.contains(chain.as_str()) {
            diffs.push(format!("chain {chain} is missing"));
        }
    }
    let expected: BTreeSet<(String, RawElement)> = want
        .elements
        .iter()
        .map(|e| (e.map.name(), RawElement::of(e)))
        .collect();
    let mut held: BTreeSet<(String, RawElement)> = BTreeSet::new();
    let mut read = |map: &str| -> Result<Vec<RawElement>, String> {
        match runner.map_elements(family, map) {
            Ok(Some(elements)) => Ok(elements),
            Ok(None) => Ok(Vec::new()),
            Err(err) => Err(err.to_string()),
        }
    };
    for object in &objects {
        let Object::Set { name, .. } = object else {
            continue;
        };
        if !per_destination(name) {
            continue;
        }
        for raw in read(name)? {
            if want.keys.contains_key(&raw.key) {
                held.insert((name.clone(), raw));
            }
        }
    }
    // Missing maps show up as missing elements.
    for e in expected.difference(&held) {
        let element = want
            .elements
            .iter()
            .find(|w| w.map.name() == e.0 && RawElement::of(w) == e.1);
        diffs.push(match element {
            Some(element) => format!("missing in the kernel: {}", describe(element)),
            None => format!("missing in the kernel: {} element", e.0),
        });
    }
    for (map, raw) in held.difference(&expected) {
        diffs.push(format!(
            "in the kernel but not in the plan: {}",
            describe_raw(family, map, raw, &want.keys)
        ));
    }
    let mut shared_maps: BTreeMap<String, BTreeSet<RawElement>> = BTreeMap::new();
    for e in &want.shared {
        let map = e.map.name();
        if !shared_maps.contains_key(&map) {
            let elements = if names.contains(map.as_str()) {
                read(&map)?
            } else {
                Vec::new()
            };
            shared_maps.insert(map.clone(), elements.into_iter().collect());
        }
        if !shared_maps[&map].contains(&RawElement::of(e)) {
            diffs.push(format!("missing in the kernel: {}", describe(e)));
        }
    }
    Ok(diffs)
}
