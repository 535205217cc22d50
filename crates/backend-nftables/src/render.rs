//! Plans as `nft` text: the whole table for a full sync, or a delta of commands.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proxy_core::model::{IpFamily, Protocol};

use crate::plan::{
    affinity_set_name, class_objects, cluster_ips_check_rules, family_names, slot_chain_name,
    slot_chains, ClassObject, Delta, Element, FamilyPlan, FamilySettings, KeyKind, MapId,
    PickClass, Role, CLUSTER_IPS_CHECK, TABLE,
};

/// Whether elements are added or deleted, or a map emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementVerb {
    Add,
    Delete,
    /// Every element goes (the op carries none).
    Flush,
}

/// How a destination of this kind is read from the packet.
fn packet_key(kind: KeyKind, addr: &str) -> String {
    match kind {
        KeyKind::Ip => format!("{addr} daddr . meta l4proto . th dport"),
        KeyKind::NodePort => "meta l4proto . th dport".into(),
    }
}

/// The type line of a map or set.
fn map_type(id: MapId, family: IpFamily) -> String {
    let f = family_names(family);
    let dest = |kind: KeyKind| match kind {
        KeyKind::Ip => format!("{} . inet_proto . inet_service", f.addr_type),
        KeyKind::NodePort => "inet_proto . inet_service".to_string(),
    };
    match id {
        MapId::ServiceIps | MapId::FirewallIps => format!("type {} : verdict", dest(KeyKind::Ip)),
        MapId::ServiceNodeports => format!("type {} : verdict", dest(KeyKind::NodePort)),
        MapId::Picks(kind) | MapId::ShortCircuits(kind) => {
            format!("type {} : verdict", dest(kind))
        }
        MapId::NoEndpointServices => format!("type {}", dest(KeyKind::Ip)),
        MapId::NoEndpointNodeports => format!("type {}", dest(KeyKind::NodePort)),
        // `type`, not `typeof`: nft 1.0.6 cannot read back a `typeof` map whose data is
        // `ip daddr . th dport`, and fails on any later rule that refers to it.
        MapId::Slot(kind, _, _) => {
            format!("type {} : {} . inet_service", dest(kind), f.addr_type)
        }
        MapId::Hairpin => format!("type {t} . {t}", t = f.addr_type),
        MapId::ClusterIps => format!("type {}", f.addr_type),
        MapId::LocalhostNodeportRejects => format!("type {}", dest(KeyKind::NodePort)),
    }
}

fn is_map(id: MapId) -> bool {
    !matches!(
        id,
        MapId::NoEndpointServices
            | MapId::NoEndpointNodeports
            | MapId::Hairpin
            | MapId::ClusterIps
            | MapId::LocalhostNodeportRejects
    )
}

fn render_map(out: &mut String, id: MapId, family: IpFamily, elements: &[&Element]) {
    let kind = if is_map(id) { "map" } else { "set" };
    let _ = writeln!(
        out,
        "\t{kind} {} {{\n\t\t{}",
        id.name(),
        map_type(id, family)
    );
    render_elements(out, elements);
    out.push_str("\t}\n");
}

/// Keyed by client and destination, so one set serves every Service. No `size`: the
/// kernel would allocate a hash table of that many buckets up front.
fn render_affinity_set(out: &mut String, slot: usize, family: IpFamily) {
    let t = family_names(family).addr_type;
    let _ = writeln!(
        out,
        "\tset {} {{ type {t} . {t} . inet_proto . inet_service; flags dynamic,timeout; }}",
        affinity_set_name(slot)
    );
}

fn render_class_object(
    out: &mut String,
    object: ClassObject,
    family: IpFamily,
    elements: &[&Element],
) {
    match object {
        ClassObject::Map(id) => render_map(out, id, family, elements),
        ClassObject::AffinitySet(slot) => render_affinity_set(out, slot, family),
    }
}

/// Above this many endpoints a pick chain chooses its slot through an anonymous verdict
/// map (one lookup) rather than a rule per slot; below it, rules avoid the cost of a set.
const MAX_SLOT_RULES: usize = 32;

/// The rules of a pick chain. Without affinity: slot k with probability 1/(N-k), which is
/// uniform over the N. With it: a known client (its `client . destination` in the set of
/// a slot) goes back to that slot; a new one is spread the same way and remembered. Every
/// new connection refreshes the timeout.
fn pick_rules(class: &PickClass, family: IpFamily) -> Vec<String> {
    let a = family_names(family).addr;
    let n = class.n;
    let slot = |k: usize| slot_chain_name(class.key, class.role, k);
    let spread = |k: usize, action: String| {
        let remaining = n - k;
        if remaining > 1 {
            format!("numgen random mod {remaining} == 0 {action}")
        } else {
            action
        }
    };
    let Some(timeout) = class.affinity else {
        if n > MAX_SLOT_RULES {
            let targets: Vec<String> = (0..n).map(|k| format!("{k} : goto {}", slot(k))).collect();
            return vec![format!(
                "numgen random mod {n} vmap {{ {} }}",
                targets.join(", ")
            )];
        }
        return (0..n)
            .map(|k| spread(k, format!("goto {}", slot(k))))
            .collect();
    };
    let client = format!("{a} saddr . {a} daddr . meta l4proto . th dport");
    let go = |k: usize| {
        let set = affinity_set_name(k);
        format!(
            "update @{set} {{ {client} timeout {timeout}s }} goto {}",
            slot(k)
        )
    };
    let mut rules: Vec<String> = (0..n)
        .map(|k| format!("{client} @{} {}", affinity_set_name(k), go(k)))
        .collect();
    rules.extend((0..n).map(|k| spread(k, go(k))));
    rules
}

/// The rule of a slot chain: DNAT to the destination's endpoint in that slot.
fn slot_rule(key: KeyKind, role: Role, slot: usize, family: IpFamily) -> String {
    let a = family_names(family).addr;
    format!(
        "dnat {a} to {} map @{}",
        packet_key(key, a),
        MapId::Slot(key, role, slot).name()
    )
}

/// The entry chains: masquerade marks by traffic policy, then the pick.
fn entry_chains(settings: &FamilySettings) -> Vec<ChainText> {
    let a = family_names(settings.family).addr;
    let mark = format!("meta mark set meta mark | {:#x}", settings.mark);
    let internal_mark = if settings.masquerade_all {
        Some(mark.clone())
    } else {
        settings
            .local
            .as_ref()
            .map(|local| format!("{} {mark}", local.not_local))
    };
    let mut chains = Vec::new();
    for kind in [KeyKind::Ip, KeyKind::NodePort] {
        let key = packet_key(kind, a);
        let picks = format!("{key} vmap @{}", MapId::Picks(kind).name());
        let short = format!("{key} vmap @{}", MapId::ShortCircuits(kind).name());
        let (plain, local_name) = match kind {
            KeyKind::Ip => ("external", "external-local"),
            KeyKind::NodePort => ("nodeport", "nodeport-local"),
        };
        if kind == KeyKind::Ip {
            let mut rules: Vec<String> = internal_mark.iter().cloned().collect();
            rules.push(picks.clone());
            chains.push(ChainText::new("internal", rules));
        }
        chains.push(ChainText::new(plain, vec![mark.clone(), picks.clone()]));
        // Outside clients keep their source address and reach this node's endpoints;
        // pods and the node itself are sent as if they had used the cluster IP.
        let mut rules: Vec<String> = settings
            .local
            .iter()
            .map(|l| format!("{} {short}", l.is_local))
            .collect();
        rules.push(format!("fib saddr type local {mark}"));
        rules.push(format!("fib saddr type local {short}"));
        rules.push(picks);
        chains.push(ChainText::new(local_name, rules));
    }
    chains
}

fn render_elements(out: &mut String, elements: &[&Element]) {
    if elements.is_empty() {
        return;
    }
    out.push_str("\t\telements = {\n");
    for (i, e) in elements.iter().enumerate() {
        let _ = write!(out, "\t\t\t{}", e.key);
        if let Some(v) = &e.value {
            let _ = write!(out, " : {v}");
        }
        out.push_str(if i + 1 == elements.len() { "\n" } else { ",\n" });
    }
    out.push_str("\t\t}\n");
}

/// A chain as text: its name, its hook line if it is a base chain, a comment, its rules.
struct ChainText {
    name: String,
    hook: Option<&'static str>,
    comment: Option<String>,
    rules: Vec<String>,
}

impl ChainText {
    fn new(name: impl Into<String>, rules: Vec<String>) -> Self {
        ChainText {
            name: name.into(),
            hook: None,
            comment: None,
            rules,
        }
    }

    fn hooked(name: &str, hook: &'static str, rules: Vec<String>) -> Self {
        ChainText {
            hook: Some(hook),
            ..ChainText::new(name, rules)
        }
    }
}

/// Every map and set of the table (per-port elements live in them).
pub fn table_maps(plan: &FamilyPlan) -> Vec<ClassObject> {
    let mut maps: Vec<ClassObject> = class_objects(&plan.classes).into_iter().collect();
    for kind in [KeyKind::Ip, KeyKind::NodePort] {
        maps.push(ClassObject::Map(MapId::Picks(kind)));
        maps.push(ClassObject::Map(MapId::ShortCircuits(kind)));
    }
    for id in [
        MapId::ServiceIps,
        MapId::ServiceNodeports,
        MapId::FirewallIps,
        MapId::NoEndpointServices,
        MapId::NoEndpointNodeports,
        MapId::Hairpin,
        MapId::ClusterIps,
        MapId::LocalhostNodeportRejects,
    ] {
        maps.push(ClassObject::Map(id));
    }
    maps
}

/// Every chain of the table, with its rules.
fn table_chains(plan: &FamilyPlan) -> Vec<ChainText> {
    let settings = &plan.settings;
    let family = settings.family;
    let f = family_names(family);
    let a = f.addr;
    let mut chains: Vec<ChainText> = slot_chains(&plan.classes)
        .into_iter()
        .map(|(key, role, k)| {
            ChainText::new(
                slot_chain_name(key, role, k),
                vec![slot_rule(key, role, k, family)],
            )
        })
        .collect();
    chains.extend(
        plan.classes
            .iter()
            .map(|class| ChainText::new(class.chain(), pick_rules(class, family))),
    );
    for port in plan.ports.values() {
        for chain in &port.chains {
            chains.push(ChainText {
                comment: Some(chain.comment.clone()),
                ..ChainText::new(chain.name.clone(), chain.rules.clone())
            });
        }
    }
    chains.extend(entry_chains(settings));

    // NodePorts answer on the resolved local addresses; a family with none has no
    // NodePorts at all.
    let nodeport_match = match &settings.nodeport_addresses {
        None => Some(String::new()),
        Some(nets) if nets.is_empty() => None,
        Some(nets) => {
            let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
            Some(format!("{a} daddr {{ {} }} ", list.join(", ")))
        }
    };
    let nodeport_rule = |verdict: &str| {
        nodeport_match.as_ref().map(|np| {
            format!(
                "fib daddr type local {a} daddr != {lo} {np}meta l4proto . th dport {verdict}",
                lo = f.localhost
            )
        })
    };
    let reject_nodeport = nodeport_rule("@no-endpoint-nodeports ct state new goto reject-chain");
    let dispatch_nodeport = nodeport_rule("vmap @service-nodeports");
    let key = packet_key(KeyKind::Ip, a);
    let reject_service = format!("ct state new {key} @no-endpoint-services goto reject-chain");
    let mark = settings.mark;

    chains.push(ChainText::new("reject-chain", vec!["reject".into()]));
    // Source ranges apply to the node's own connections too, as upstream's
    // firewall-check runs from both hooks.
    let firewall = format!("{key} vmap @firewall-ips");
    let mut prerouting = vec![firewall.clone(), reject_service.clone()];
    prerouting.extend(reject_nodeport.clone());
    // Loopback NodePorts no user-space listener serves (UDP, SCTP, no usable endpoint)
    // are refused as they arrive on `lo`, before any other program bound to the port
    // could answer; refused on input, the client sees "connection refused".
    if settings.localhost_nodeports {
        for protocol in LOCALHOST_NODEPORT_PROTOCOLS {
            prerouting.push(format!(
                "meta iiftype loopback {a} daddr {lo} meta l4proto {p} meta l4proto . th dport @{set} counter name \"{counter}\" reject",
                p = protocol.as_str(),
                set = MapId::LocalhostNodeportRejects.name(),
                counter = localhost_nodeport_counter(protocol),
                lo = f.localhost
            ));
        }
    }
    chains.push(ChainText::hooked(
        "filter-prerouting",
        "type filter hook prerouting priority dstnat - 10; policy accept;",
        prerouting,
    ));
    let mut output = vec![firewall, reject_service];
    output.extend(reject_nodeport);
    chains.push(ChainText::hooked(
        "filter-output",
        "type filter hook output priority -110; policy accept;",
        output,
    ));
    // After DNAT: forwarded and locally sent new connections still addressed to a
    // Service range found no Service port.
    let check = format!("ct state new jump {CLUSTER_IPS_CHECK}");
    chains.push(ChainText::new(
        CLUSTER_IPS_CHECK,
        cluster_ips_check_rules(settings),
    ));
    chains.push(ChainText::hooked(
        "filter-forward",
        "type filter hook forward priority -110; policy accept;",
        vec![check.clone()],
    ));
    chains.push(ChainText::hooked(
        "filter-output-post-dnat",
        "type filter hook output priority -90; policy accept;",
        vec![check],
    ));
    let mut services = vec![format!("{key} vmap @service-ips")];
    services.extend(dispatch_nodeport);
    chains.push(ChainText::new("services", services));
    chains.push(ChainText::hooked(
        "nat-prerouting",
        "type nat hook prerouting priority dstnat; policy accept;",
        vec!["jump services".into()],
    ));
    chains.push(ChainText::hooked(
        "nat-output",
        "type nat hook output priority -100; policy accept;",
        vec!["jump services".into()],
    ));
    chains.push(ChainText::hooked(
        "nat-postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
        vec![
            format!("meta mark & {mark:#x} == {mark:#x} meta mark set meta mark ^ {mark:#x} masquerade fully-random"),
            format!("ct status dnat {a} saddr . {a} daddr @hairpin masquerade fully-random"),
        ],
    ));
    chains
}

/// The names of every chain of the table.
pub fn chain_names(plan: &FamilyPlan) -> Vec<String> {
    table_chains(plan).into_iter().map(|c| c.name).collect()
}

/// How a full sync treats the table that may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullMode {
    /// Delete it and create ours (needed when an existing map has another type).
    Replace,
    /// Keep it and its elements: add what is missing, then replace every rule. Traffic
    /// keeps flowing through the old elements until the new ones are loaded.
    Update,
}

/// The protocols whose loopback NodePort rejections are counted, each in its own counter.
pub const LOCALHOST_NODEPORT_PROTOCOLS: [Protocol; 3] =
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The named counter of loopback NodePort packets of `protocol` rejected
/// (`kubeproxy_nftables_localhost_nodeport_rejected_packets_total`).
pub fn localhost_nodeport_counter(protocol: Protocol) -> String {
    format!("localhost-nodeport-rejected-{}", protocol.as_str())
}

/// Renders the table of one family without elements, as one part of an atomic `nft -f`
/// transaction: declarations first (maps, sets, empty chains), then the rules. When
/// updating, maps and sets named in `existing` are not declared again: `nft` 1.0.6 fails
/// to compare a redeclared `typeof` map holding `th dport` with the kernel's.
pub fn render_skeleton(
    out: &mut String,
    plan: &FamilyPlan,
    mode: FullMode,
    existing: &BTreeSet<String>,
) {
    let family = plan.family();
    let t = format!("{} {TABLE}", family_names(family).table_family);
    if mode == FullMode::Replace {
        // `add` then `delete` makes the delete succeed whether or not the table existed.
        let _ = writeln!(out, "add table {t}\ndelete table {t}");
    }
    let _ = writeln!(out, "table {t} {{\n\tcomment \"rules for kube-proxy\"");
    // Named counters, not anonymous ones in the rules: their values change with traffic,
    // and the rules must read back the same for a re-sync to find nothing to repair.
    if plan.settings.localhost_nodeports {
        for protocol in LOCALHOST_NODEPORT_PROTOCOLS {
            let _ = writeln!(
                out,
                "\tcounter {} {{ }}",
                localhost_nodeport_counter(protocol)
            );
        }
    }
    for object in table_maps(plan) {
        if mode == FullMode::Update && existing.contains(&object.name()) {
            continue;
        }
        render_class_object(out, object, family, &[]);
    }
    let chains = table_chains(plan);
    for chain in &chains {
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        if let Some(hook) = chain.hook {
            let _ = writeln!(out, "\t\t{hook}");
        }
        if let Some(comment) = &chain.comment {
            let _ = writeln!(out, "\t\tcomment \"{comment}\"");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    if mode == FullMode::Update {
        let _ = writeln!(out, "flush table {t}");
    }
    let _ = writeln!(out, "table {t} {{");
    for chain in &chains {
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        for rule in &chain.rules {
            let _ = writeln!(out, "\t\t{rule}");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
}

/// `add element` (with values) or `delete element` (keys only) for one map.
pub fn render_element_command(
    out: &mut String,
    verb: ElementVerb,
    family: IpFamily,
    map: MapId,
    elems: &[&Element],
) {
    let target = format!(
        "{} {TABLE} {}",
        family_names(family).table_family,
        map.name()
    );
    let verb_text = match verb {
        ElementVerb::Add => "add",
        ElementVerb::Delete => "delete",
        ElementVerb::Flush => {
            let kind = if is_map(map) { "map" } else { "set" };
            let _ = writeln!(out, "flush {kind} {target}");
            return;
        }
    };
    let _ = writeln!(out, "{verb_text} element {target} {{");
    for (i, e) in elems.iter().enumerate() {
        let _ = write!(out, "\t{}", e.key);
        if let (Some(v), ElementVerb::Add) = (&e.value, verb) {
            let _ = write!(out, " : {v}");
        }
        out.push_str(if i + 1 == elems.len() { "\n" } else { ",\n" });
    }
    out.push_str("}\n");
}

/// Renders a delta as `nft` commands, ordered so every reference exists when it is
/// made and nothing is deleted while still referenced: new maps, sets and chains;
/// flushes; element deletions; rules; element additions; chain deletions.
pub fn render_delta(out: &mut String, plan: &FamilyPlan, delta: &Delta) {
    let family = plan.family();
    let f = family_names(family);
    let t = format!("{} {TABLE}", f.table_family);
    if !delta.new_classes.is_empty() || !delta.new_objects.is_empty() {
        // Redeclaring the table block with `table` adds objects without touching others.
        let _ = writeln!(out, "table {t} {{");
        for object in &delta.new_objects {
            render_class_object(out, *object, family, &[]);
        }
        for (key, role, k) in &delta.new_slot_chains {
            let _ = writeln!(
                out,
                "\tchain {} {{\n\t\t{}\n\t}}",
                slot_chain_name(*key, *role, *k),
                slot_rule(*key, *role, *k, family)
            );
        }
        for class in &delta.new_classes {
            let _ = writeln!(out, "\tchain {} {{", class.chain());
            for rule in pick_rules(class, family) {
                let _ = writeln!(out, "\t\t{rule}");
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
    }
    for chain in &delta.chains_added {
        let _ = writeln!(
            out,
            "add chain {t} {} {{ comment \"{}\"; }}",
            chain.name, chain.comment
        );
    }
    for name in delta
        .chains_changed
        .iter()
        .map(|c| &c.name)
        .chain(&delta.chains_deleted)
    {
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    for (map, elems) in by_map(&delta.deleted) {
        render_element_command(out, ElementVerb::Delete, family, map, &elems);
    }
    for chain in delta.chains_added.iter().chain(&delta.chains_changed) {
        for rule in &chain.rules {
            let _ = writeln!(out, "add rule {t} {} {rule}", chain.name);
        }
    }
    for (map, elems) in by_map(&delta.added) {
        render_element_command(out, ElementVerb::Add, family, map, &elems);
    }
    for name in &delta.chains_deleted {
        let _ = writeln!(out, "delete chain {t} {name}");
    }
}

/// Elements grouped by map, sorted.
pub fn by_map(set: &BTreeSet<Element>) -> BTreeMap<MapId, Vec<&Element>> {
    let mut out: BTreeMap<MapId, Vec<&Element>> = BTreeMap::new();
    for e in set {
        out.entry(e.map).or_default().push(e);
    }
    out
}
