//! Plans as changes to the kernel's tables ([`TableOp`]s): the whole table for a full
//! sync, or a delta. They go to the kernel as one nfnetlink batch each, and read as
//! `nft` commands in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use proxy_core::model::{IpFamily, Protocol};

use crate::netlink::{
    add_rules, drop_tables, DataType, Deletion, ElementOp, Hook, HookPoint, MapData, Object,
    SetDecl, TableOp,
};
use crate::plan::{
    affinity_set_name, class_objects, cluster_ips_check_rules, family_names, slot_chain_name,
    slot_chains, ClassObject, CounterName, Delta, Element, FamilyPlan, FamilySettings, KeyKind,
    MapId, PickClass, Role, CLUSTER_IPS_CHECK, TABLE,
};
use crate::rule::{ip_key, nodeport_key, Key, Rule, Sel, Stmt, Verdict};

/// Whether elements are added or deleted, or a map emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementVerb {
    Add,
    Delete,
    /// Every element goes (the op carries none).
    Flush,
}

/// How a destination of this kind is read from the packet.
fn packet_key(kind: KeyKind) -> Key {
    match kind {
        KeyKind::Ip => ip_key(),
        KeyKind::NodePort => nodeport_key(),
    }
}

/// The declaration of a map or set.
fn map_decl(id: MapId, family: IpFamily) -> SetDecl {
    let addr = DataType::addr(family);
    let dest = |kind: KeyKind| match kind {
        KeyKind::Ip => vec![addr, DataType::InetProto, DataType::InetService],
        KeyKind::NodePort => vec![DataType::InetProto, DataType::InetService],
    };
    let (key, data) = match id {
        MapId::ServiceIps | MapId::FirewallIps => (dest(KeyKind::Ip), Some(MapData::Verdict)),
        MapId::ServiceNodeports => (dest(KeyKind::NodePort), Some(MapData::Verdict)),
        MapId::Picks(kind) | MapId::ShortCircuits(kind) => (dest(kind), Some(MapData::Verdict)),
        MapId::NoEndpointServices => (dest(KeyKind::Ip), None),
        MapId::NoEndpointNodeports | MapId::LocalhostNodeportRejects => {
            (dest(KeyKind::NodePort), None)
        }
        MapId::Slot(kind, _, _) => (
            dest(kind),
            Some(MapData::Fields(vec![addr, DataType::InetService])),
        ),
        MapId::Counters(kind) => (dest(kind), Some(MapData::Counter)),
        MapId::Hairpin => (vec![addr, addr], None),
        MapId::ClusterIps => (vec![addr], None),
    };
    SetDecl {
        name: id.name(),
        key,
        data,
        dynamic: false,
    }
}

/// The types of a map's key, to read its elements' keys back.
pub fn key_types(id: MapId, family: IpFamily) -> Vec<DataType> {
    map_decl(id, family).key
}

fn is_map(id: MapId) -> bool {
    map_decl(id, IpFamily::V4).is_map()
}

/// Keyed by client and destination, so one set serves every Service. No `size`: the
/// kernel would allocate a hash table of that many buckets up front.
fn affinity_decl(slot: usize, family: IpFamily) -> SetDecl {
    let addr = DataType::addr(family);
    SetDecl {
        name: affinity_set_name(slot),
        key: vec![addr, addr, DataType::InetProto, DataType::InetService],
        data: None,
        dynamic: true,
    }
}

fn class_object_op(object: ClassObject, family: IpFamily) -> TableOp<'static> {
    let set = match object {
        ClassObject::Map(id) => map_decl(id, family),
        ClassObject::AffinitySet(slot) => affinity_decl(slot, family),
    };
    TableOp::AddSet { family, set }
}

/// Above this many endpoints a pick chain chooses its slot through an anonymous verdict
/// map (one lookup) rather than a rule per slot; below it, rules avoid the cost of a set.
const MAX_SLOT_RULES: usize = 32;

fn goto(chain: String) -> Stmt {
    Stmt::Verdict(Verdict::Goto(chain))
}

/// The rules of a pick chain. Without affinity: slot k with probability 1/(N-k), which is
/// uniform over the N. With it: a known client (its `client . destination` in the set of
/// a slot) goes back to that slot; a new one is spread the same way and remembered. Every
/// new connection refreshes the timeout.
fn pick_rules(class: &PickClass) -> Vec<Rule> {
    let n = class.n;
    let slot = |k: usize| slot_chain_name(class.key, class.role, k);
    let spread = |k: usize, mut action: Vec<Stmt>| {
        let remaining = n - k;
        if remaining > 1 {
            action.insert(0, Stmt::OneIn(remaining as u32));
        }
        Rule(action)
    };
    let Some(timeout) = class.affinity else {
        if n > MAX_SLOT_RULES {
            return vec![Rule::new([Stmt::SpreadVmap((0..n).map(slot).collect())])];
        }
        return (0..n).map(|k| spread(k, vec![goto(slot(k))])).collect();
    };
    let client = vec![Sel::Saddr, Sel::Daddr, Sel::L4proto, Sel::Dport];
    let go = |k: usize| {
        vec![
            Stmt::Update {
                set: affinity_set_name(k),
                key: client.clone(),
                timeout,
            },
            goto(slot(k)),
        ]
    };
    let mut rules: Vec<Rule> = (0..n)
        .map(|k| {
            let mut stmts = vec![Stmt::InSet {
                key: client.clone(),
                set: affinity_set_name(k),
                negate: false,
            }];
            stmts.extend(go(k));
            Rule(stmts)
        })
        .collect();
    rules.extend((0..n).map(|k| spread(k, go(k))));
    rules
}

/// The rule of a slot chain: DNAT to the destination's endpoint in that slot.
fn slot_rule(key: KeyKind, role: Role, slot: usize) -> Rule {
    Rule::new([Stmt::DnatMap {
        key: packet_key(key),
        map: MapId::Slot(key, role, slot).name(),
    }])
}

fn vmap(kind: KeyKind, map: MapId) -> Stmt {
    Stmt::Vmap {
        key: packet_key(kind),
        map: map.name(),
    }
}

/// The entry chains: masquerade marks by traffic policy, then the pick.
fn entry_chains(settings: &FamilySettings) -> Vec<ChainDef> {
    let mark = Stmt::MarkOr(settings.mark);
    let internal_mark: Option<Rule> = if settings.masquerade_all {
        Some(Rule::new([mark.clone()]))
    } else {
        settings
            .local
            .as_ref()
            .map(|local| Rule::new([local.not_local.clone(), mark.clone()]))
    };
    let fib_local = Stmt::FibLocal(Sel::Saddr);
    let mut chains = Vec::new();
    for kind in [KeyKind::Ip, KeyKind::NodePort] {
        let picks = vmap(kind, MapId::Picks(kind));
        let short = vmap(kind, MapId::ShortCircuits(kind));
        // Counted where a destination is known to be a Service's: only its packets pay
        // for the lookup, and nat chains see a connection's first packet only.
        let count: Vec<Rule> = settings
            .service_counters
            .then(|| {
                Rule::new([
                    Stmt::CtNew,
                    Stmt::CounterMap {
                        key: packet_key(kind),
                        map: MapId::Counters(kind).name(),
                    },
                ])
            })
            .into_iter()
            .collect();
        let (plain, local_name) = match kind {
            KeyKind::Ip => ("external", "external-local"),
            KeyKind::NodePort => ("nodeport", "nodeport-local"),
        };
        if kind == KeyKind::Ip {
            let mut rules = count.clone();
            rules.extend(internal_mark.iter().cloned());
            rules.push(Rule::new([picks.clone()]));
            chains.push(ChainDef::new("internal", rules));
        }
        let mut rules = count.clone();
        rules.extend([Rule::new([mark.clone()]), Rule::new([picks.clone()])]);
        chains.push(ChainDef::new(plain, rules));
        // Outside clients keep their source address and reach this node's endpoints;
        // pods and the node itself are sent as if they had used the cluster IP.
        let mut rules = count;
        rules.extend(
            settings
                .local
                .iter()
                .map(|l| Rule::new([l.is_local.clone(), short.clone()])),
        );
        rules.push(Rule::new([fib_local.clone(), mark.clone()]));
        rules.push(Rule::new([fib_local.clone(), short]));
        rules.push(Rule::new([picks]));
        chains.push(ChainDef::new(local_name, rules));
    }
    chains
}

/// A chain: its name, its hook if it is a base chain, a comment, its rules.
struct ChainDef {
    name: String,
    hook: Option<Hook>,
    comment: Option<String>,
    rules: Vec<Rule>,
}

impl ChainDef {
    fn new(name: impl Into<String>, rules: Vec<Rule>) -> Self {
        ChainDef {
            name: name.into(),
            hook: None,
            comment: None,
            rules,
        }
    }

    fn hooked(
        name: &str,
        kind: &'static str,
        hook: HookPoint,
        priority: i32,
        rules: Vec<Rule>,
    ) -> Self {
        ChainDef {
            hook: Some(Hook {
                kind,
                hook,
                priority,
            }),
            ..ChainDef::new(name, rules)
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
    if plan.settings.service_counters {
        for kind in [KeyKind::Ip, KeyKind::NodePort] {
            maps.push(ClassObject::Map(MapId::Counters(kind)));
        }
    }
    maps
}

/// Hook priorities, as `nft` names them.
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;

/// Every chain of the table, with its rules.
fn table_chains(plan: &FamilyPlan) -> Vec<ChainDef> {
    let settings = &plan.settings;
    let family = settings.family;
    // Both spellings parse: `127.0.0.0/8`, `::1`.
    let text = family_names(family).localhost;
    let localhost: IpNet = text
        .parse()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .unwrap_or_else(|_| IpNet::from(IpAddr::from([127, 0, 0, 1])));
    let mut chains: Vec<ChainDef> = slot_chains(&plan.classes)
        .into_iter()
        .map(|(key, role, k)| {
            ChainDef::new(slot_chain_name(key, role, k), vec![slot_rule(key, role, k)])
        })
        .collect();
    chains.extend(
        plan.classes
            .iter()
            .map(|class| ChainDef::new(class.chain(), pick_rules(class))),
    );
    for port in plan.ports.values() {
        for chain in &port.chains {
            chains.push(ChainDef {
                comment: Some(chain.comment.clone()),
                ..ChainDef::new(chain.name.clone(), chain.rules.clone())
            });
        }
    }
    chains.extend(entry_chains(settings));

    // NodePorts answer on the resolved local addresses; a family with none has no
    // NodePorts at all.
    let nodeport_match: Option<Vec<Stmt>> = match &settings.nodeport_addresses {
        None => Some(Vec::new()),
        Some(nets) if nets.is_empty() => None,
        Some(nets) => Some(vec![Stmt::AddrIn {
            sel: Sel::Daddr,
            nets: nets.clone(),
            negate: false,
        }]),
    };
    let nodeport_rule = |tail: Vec<Stmt>| {
        nodeport_match.as_ref().map(|np| {
            let mut stmts = vec![
                Stmt::FibLocal(Sel::Daddr),
                Stmt::AddrIs {
                    sel: Sel::Daddr,
                    net: localhost,
                    negate: true,
                },
            ];
            stmts.extend(np.iter().cloned());
            stmts.extend(tail);
            Rule(stmts)
        })
    };
    let reject_chain = || goto("reject-chain".into());
    let reject_nodeport = nodeport_rule(vec![
        Stmt::InSet {
            key: nodeport_key(),
            set: MapId::NoEndpointNodeports.name(),
            negate: false,
        },
        Stmt::CtNew,
        reject_chain(),
    ]);
    let dispatch_nodeport = nodeport_rule(vec![vmap(KeyKind::NodePort, MapId::ServiceNodeports)]);
    let reject_service = Rule::new([
        Stmt::CtNew,
        Stmt::InSet {
            key: ip_key(),
            set: MapId::NoEndpointServices.name(),
            negate: false,
        },
        reject_chain(),
    ]);
    let mark = settings.mark;

    chains.push(ChainDef::new(
        "reject-chain",
        vec![Rule::new([Stmt::Reject])],
    ));
    // Source ranges apply to the node's own connections too, as upstream's
    // firewall-check runs from both hooks.
    let firewall = Rule::new([vmap(KeyKind::Ip, MapId::FirewallIps)]);
    let mut prerouting = vec![firewall.clone(), reject_service.clone()];
    prerouting.extend(reject_nodeport.clone());
    // Loopback NodePorts no user-space listener serves (UDP, SCTP, no usable endpoint)
    // are refused as they arrive on `lo`, before any other program bound to the port
    // could answer; refused on input, the client sees "connection refused".
    if settings.localhost_nodeports {
        for protocol in LOCALHOST_NODEPORT_PROTOCOLS {
            prerouting.push(Rule::new([
                Stmt::IifLoopback,
                Stmt::AddrIs {
                    sel: Sel::Daddr,
                    net: localhost,
                    negate: false,
                },
                Stmt::L4proto(protocol),
                Stmt::InSet {
                    key: nodeport_key(),
                    set: MapId::LocalhostNodeportRejects.name(),
                    negate: false,
                },
                Stmt::Counter(localhost_nodeport_counter(protocol)),
                Stmt::Reject,
            ]));
        }
    }
    chains.push(ChainDef::hooked(
        "filter-prerouting",
        "filter",
        HookPoint::Prerouting,
        DSTNAT - 10,
        prerouting,
    ));
    let mut output = vec![firewall, reject_service];
    output.extend(reject_nodeport);
    chains.push(ChainDef::hooked(
        "filter-output",
        "filter",
        HookPoint::Output,
        -110,
        output,
    ));
    // After DNAT: forwarded and locally sent new connections still addressed to a
    // Service range found no Service port.
    let check = Rule::new([
        Stmt::CtNew,
        Stmt::Verdict(Verdict::Jump(CLUSTER_IPS_CHECK.into())),
    ]);
    chains.push(ChainDef::new(
        CLUSTER_IPS_CHECK,
        cluster_ips_check_rules(settings),
    ));
    chains.push(ChainDef::hooked(
        "filter-forward",
        "filter",
        HookPoint::Forward,
        -110,
        vec![check.clone()],
    ));
    chains.push(ChainDef::hooked(
        "filter-output-post-dnat",
        "filter",
        HookPoint::Output,
        -90,
        vec![check],
    ));
    let mut services = vec![Rule::new([vmap(KeyKind::Ip, MapId::ServiceIps)])];
    services.extend(dispatch_nodeport);
    chains.push(ChainDef::new("services", services));
    let jump_services = || vec![Rule::new([Stmt::Verdict(Verdict::Jump("services".into()))])];
    chains.push(ChainDef::hooked(
        "nat-prerouting",
        "nat",
        HookPoint::Prerouting,
        DSTNAT,
        jump_services(),
    ));
    chains.push(ChainDef::hooked(
        "nat-output",
        "nat",
        HookPoint::Output,
        -100,
        jump_services(),
    ));
    chains.push(ChainDef::hooked(
        "nat-postrouting",
        "nat",
        HookPoint::Postrouting,
        SRCNAT,
        vec![
            Rule::new([
                Stmt::MarkHas(mark),
                Stmt::MarkXor(mark),
                Stmt::Masquerade { fully_random: true },
            ]),
            Rule::new([
                Stmt::CtDnat,
                Stmt::InSet {
                    key: vec![Sel::Saddr, Sel::Daddr],
                    set: MapId::Hairpin.name(),
                    negate: false,
                },
                Stmt::Masquerade { fully_random: true },
            ]),
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

/// The comment of our tables.
const TABLE_COMMENT: &str = "rules for kube-proxy";

/// The table of one family without elements, as part of one atomic transaction:
/// declarations first (maps, sets, empty chains), then the rules. When updating, the
/// table and what it holds are kept (maps and sets named in `existing` are not declared
/// again) and every rule is replaced.
pub fn skeleton_ops(
    plan: &FamilyPlan,
    mode: FullMode,
    existing: &BTreeSet<String>,
) -> Vec<TableOp<'static>> {
    let family = plan.family();
    let mut ops = Vec::new();
    let add_table = || TableOp::AddTable {
        family,
        comment: Some(TABLE_COMMENT.into()),
    };
    if mode == FullMode::Replace {
        // Add, then delete: the delete succeeds whether or not the table existed.
        ops.push(add_table());
        ops.push(TableOp::DeleteTable(family));
    }
    ops.push(add_table());
    // Named counters, not anonymous ones in the rules: their values change with traffic,
    // and the rules must read back the same for a re-sync to find nothing to repair.
    if plan.settings.localhost_nodeports {
        for protocol in LOCALHOST_NODEPORT_PROTOCOLS {
            ops.push(TableOp::AddCounter {
                family,
                name: localhost_nodeport_counter(protocol),
            });
        }
    }
    for object in table_maps(plan) {
        if mode == FullMode::Update && existing.contains(&object.name()) {
            continue;
        }
        ops.push(class_object_op(object, family));
    }
    let chains = table_chains(plan);
    for chain in &chains {
        ops.push(TableOp::AddChain {
            family,
            name: chain.name.clone(),
            hook: chain.hook,
            comment: chain.comment.clone(),
        });
    }
    if mode == FullMode::Update {
        ops.push(TableOp::FlushTable(family));
    }
    for chain in chains {
        ops.extend(add_rules(family, &chain.name, chain.rules));
    }
    ops
}

/// Deletes our tables in both families; succeeds whether or not they exist.
pub fn cleanup_ops() -> Vec<TableOp<'static>> {
    drop_tables()
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

/// A delta as one transaction, ordered so every reference exists when it is made and
/// nothing is deleted while still referenced: new maps, sets and chains; flushes;
/// element deletions; rules; element additions; chain deletions.
pub fn delta_ops<'a>(plan: &FamilyPlan, delta: &'a Delta) -> Vec<TableOp<'a>> {
    let family = plan.family();
    let mut ops = counter_ops(family, &delta.counters_added, false);
    for object in &delta.new_objects {
        ops.push(class_object_op(*object, family));
    }
    let rules = |ops: &mut Vec<TableOp<'a>>, chain: String, list: Vec<Rule>| {
        ops.push(TableOp::AddChain {
            family,
            name: chain.clone(),
            hook: None,
            comment: None,
        });
        ops.extend(add_rules(family, &chain, list));
    };
    for (key, role, k) in &delta.new_slot_chains {
        rules(
            &mut ops,
            slot_chain_name(*key, *role, *k),
            vec![slot_rule(*key, *role, *k)],
        );
    }
    for class in &delta.new_classes {
        rules(&mut ops, class.chain(), pick_rules(class));
    }
    for chain in &delta.chains_added {
        ops.push(TableOp::AddChain {
            family,
            name: chain.name.clone(),
            hook: None,
            comment: Some(chain.comment.clone()),
        });
    }
    for name in delta
        .chains_changed
        .iter()
        .map(|c| &c.name)
        .chain(&delta.chains_deleted)
    {
        ops.push(TableOp::FlushChain {
            family,
            name: name.clone(),
        });
    }
    let elements = |verb, set| {
        element_ops(family, verb, set)
            .into_iter()
            .map(TableOp::Elements)
    };
    ops.extend(elements(ElementVerb::Delete, &delta.deleted));
    for chain in delta.chains_added.iter().chain(&delta.chains_changed) {
        ops.extend(add_rules(family, &chain.name, chain.rules.iter().cloned()));
    }
    ops.extend(elements(ElementVerb::Add, &delta.added));
    for name in &delta.chains_deleted {
        ops.push(TableOp::Delete(Deletion {
            family,
            object: Object::Chain(name.clone()),
        }));
    }
    ops.extend(counter_ops(family, &delta.counters_deleted, true));
    ops
}

/// Creates (an existing one keeps its values) or deletes the named counters.
pub fn counter_ops<'a>(
    family: IpFamily,
    names: &BTreeSet<CounterName>,
    delete: bool,
) -> Vec<TableOp<'a>> {
    names
        .iter()
        .map(|name| {
            if delete {
                TableOp::Delete(Deletion {
                    family,
                    object: Object::Counter(name.to_string()),
                })
            } else {
                TableOp::AddCounter {
                    family,
                    name: name.to_string(),
                }
            }
        })
        .collect()
}

/// One op per map adding or deleting `set`'s elements of that map.
pub fn element_ops(
    family: IpFamily,
    verb: ElementVerb,
    set: &BTreeSet<Element>,
) -> Vec<ElementOp<'_>> {
    by_map(set)
        .into_iter()
        .map(|(map, elements)| ElementOp {
            family,
            verb,
            map,
            elements,
        })
        .collect()
}

/// Elements grouped by map, sorted.
pub fn by_map(set: &BTreeSet<Element>) -> BTreeMap<MapId, Vec<&Element>> {
    let mut out: BTreeMap<MapId, Vec<&Element>> = BTreeMap::new();
    for e in set {
        out.entry(e.map).or_default().push(e);
    }
    out
}
