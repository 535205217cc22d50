//! Adopting the table a previous process left: which endpoint each Service port had in
//! each slot, read from the kernel's slot maps, so the first plan after a restart keeps
//! them. Kept slots mean the slot maps already hold what the new plan wants (nothing to
//! reload) and clients remembered in the affinity sets stay on their endpoint.
//!
//! Pure: elements in, slots out; [`crate::NftablesProxier`] reads the maps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_core::model::{IpFamily, ProxyState, ServicePortName};

use crate::apply::{KernelTable, NftRunner, Want};
use crate::netlink::{encode_fields, Object};
use crate::plan::{affinity_set_name, ip_key, nodeport_key, KeyKind, MapId, Role, SlotOf, Slots};
use crate::readback::{RawElement, RawValue};

/// The slot map a name stands for: `slot-K`, `local-slot-K`, `nodeport-slot-K`,
/// `local-nodeport-slot-K`.
pub fn slot_map(name: &str) -> Option<(KeyKind, Role, usize)> {
    let (role, rest) = match name.strip_prefix("local-") {
        Some(rest) => (Role::Local, rest),
        None => (Role::All, name),
    };
    let (key, rest) = match rest.strip_prefix("nodeport-") {
        Some(rest) => (KeyKind::NodePort, rest),
        None => (KeyKind::Ip, rest),
    };
    let slot: usize = rest.strip_prefix("slot-")?.parse().ok()?;
    (MapId::Slot(key, role, slot).name() == name).then_some((key, role, slot))
}

/// An endpoint as a slot map holds it: address, then the port in a 32-bit register.
pub(crate) fn decode_endpoint(family: IpFamily, data: &[u8]) -> Option<(IpAddr, u16)> {
    let len = match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 16,
    };
    let (addr, port) = (data.get(..len)?, data.get(len..len + 2)?);
    let ip = match family {
        IpFamily::V4 => IpAddr::from(Ipv4Addr::from(<[u8; 4]>::try_from(addr).ok()?)),
        IpFamily::V6 => IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(addr).ok()?)),
    };
    Some((ip, u16::from_be_bytes([port[0], port[1]])))
}

/// The slot maps among `objects` (our table of `family`), read back; a map that cannot
/// be read is left out (logged), so its ports get slots afresh.
pub fn read_slots<R: NftRunner + ?Sized>(
    runner: &mut R,
    family: IpFamily,
    objects: &[Object],
) -> KernelSlots {
    let mut slots = KernelSlots::default();
    for name in objects
        .iter()
        .map(Object::name)
        .filter(|n| slot_map(n).is_some())
    {
        match runner.map_elements(family, name) {
            Ok(Some(elements)) => slots.add_map(family, name, elements),
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(error = %err, map = %name, "cannot read a slot map back");
            }
        }
    }
    slots
}

/// Our table of one family as the kernel held it, read once (at start, while the
/// sources list, or by the first full sync): the slots the plan keeps and the digests
/// that tell which maps need no reload.
#[derive(Debug)]
pub struct Found {
    pub family: IpFamily,
    /// The ruleset generation the read saw from its start to its end; `None` when it
    /// changed meanwhile or cannot be told. A read is used later only while the kernel
    /// still reports this generation: nothing was committed since.
    pub generation: Option<u32>,
    pub table: KernelTable,
    pub slots: KernelSlots,
    /// The elements of the shared sets (hairpin pairs, cluster IPs): the largest sets,
    /// which one endpoint change alters, so the first sync sends their difference
    /// without dumping them again.
    pub shared: BTreeMap<String, Vec<RawElement>>,
}

impl Found {
    /// Reads our table of `family`: every named set's digest but the affinity sets'
    /// (their clients come and go), and the slot maps' elements. `None` when there is
    /// nothing to read or it cannot be read (logged): slots are then assigned afresh and
    /// every map loaded.
    pub fn read<R: NftRunner + ?Sized>(runner: &mut R, family: IpFamily) -> Option<Found> {
        let before = runner.generation().ok().flatten();
        let shared_sets = [MapId::Hairpin.name(), MapId::ClusterIps.name()];
        let want = |name: &str| {
            if slot_map(name).is_some() || shared_sets.iter().any(|s| s == name) {
                Want::Elements
            } else if is_affinity_set(name) {
                Want::Skip
            } else {
                Want::Digest
            }
        };
        let read = match runner.read_table(family, &want) {
            Ok(Some(read)) => read,
            Ok(None) => return None,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read our nftables table back; slots assigned afresh, every map loaded");
                return None;
            }
        };
        let after = runner.generation().ok().flatten();
        let mut slots = KernelSlots::default();
        let mut shared = BTreeMap::new();
        for (name, elements) in read.elements {
            if slot_map(&name).is_some() {
                slots.add_map(family, &name, elements);
            } else {
                shared.insert(name, elements);
            }
        }
        Some(Found {
            family,
            generation: before.filter(|_| before == after),
            table: read.table,
            slots,
            shared,
        })
    }
}

/// Whether `name` is an affinity set (`aff-K`).
fn is_affinity_set(name: &str) -> bool {
    name.strip_prefix("aff-")
        .and_then(|k| k.parse::<usize>().ok())
        .is_some_and(|k| affinity_set_name(k) == name)
}

/// Every destination key's endpoints per role and slot, from the kernel's slot maps.
#[derive(Debug, Default)]
pub struct KernelSlots(HashMap<(Vec<u8>, Role), Vec<SlotOf>>);

impl KernelSlots {
    /// Adds the elements of one map; maps that are not slot maps are ignored.
    pub fn add_map(&mut self, family: IpFamily, name: &str, elements: Vec<RawElement>) {
        let Some((_, role, slot)) = slot_map(name) else {
            return;
        };
        for element in elements {
            let RawValue::Data(data) = &element.value else {
                continue;
            };
            if let Some(endpoint) = decode_endpoint(family, data) {
                self.0
                    .entry((element.key, role))
                    .or_default()
                    .push((endpoint, slot));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each Service port's slots per role, as the kernel holds them for the first of its
    /// destinations found there. A slot or endpoint claimed twice (a table edited by hand)
    /// keeps its first claim; the planner gives the rest new slots.
    pub fn slots(&self, family: IpFamily, state: &ProxyState) -> BTreeMap<ServicePortName, Slots> {
        let mut out = BTreeMap::new();
        for (name, port) in &state.services {
            let Some(cluster_ip) = port.cluster_ip(family) else {
                continue;
            };
            let proto = port.protocol();
            let mut keys = vec![encode_fields(&ip_key(cluster_ip, proto, port.port))];
            keys.extend(
                port.external_destinations(family)
                    .map(|ip| encode_fields(&ip_key(ip, proto, port.port))),
            );
            keys.extend(
                port.node_port
                    .map(|np| encode_fields(&nodeport_key(proto, np))),
            );
            let mut slots = Vec::new();
            for role in [Role::All, Role::Local] {
                let Some(found) = keys.iter().find_map(|key| self.0.get(&(key.clone(), role)))
                else {
                    continue;
                };
                let mut endpoints = BTreeSet::new();
                let mut taken = BTreeSet::new();
                let kept: Box<[SlotOf]> = found
                    .iter()
                    .filter(|(ep, slot)| endpoints.insert(*ep) && taken.insert(*slot))
                    .copied()
                    .collect();
                slots.push((role, kept));
            }
            if !slots.is_empty() {
                out.insert(name.clone(), slots.into_boxed_slice());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_map_names_round_trip() {
        for key in [KeyKind::Ip, KeyKind::NodePort] {
            for role in [Role::All, Role::Local] {
                for slot in [0, 7, 12] {
                    let name = MapId::Slot(key, role, slot).name();
                    assert_eq!(slot_map(&name), Some((key, role, slot)), "{name}");
                }
            }
        }
        for other in ["service-ips", "slot-", "slot-x", "local-slot-01", "aff-1"] {
            assert_eq!(slot_map(other), None, "{other}");
        }
    }

    #[test]
    fn endpoints_decode_as_encoded() {
        use crate::plan::{Field, Fields};
        for (ip, port) in [("10.244.1.2", 8080), ("fd00:244::2", 53)] {
            let ip: IpAddr = ip.parse().unwrap();
            let data = encode_fields(&Fields::new(&[Field::Addr(ip), Field::Port(port)]));
            let family = IpFamily::of(&ip);
            assert_eq!(decode_endpoint(family, &data), Some((ip, port)));
        }
        assert_eq!(decode_endpoint(IpFamily::V6, &[0; 8]), None);
    }
}
