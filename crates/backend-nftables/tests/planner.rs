//! Planner tests: state in, nft script out. No root needed, except for the `nft --check`
//! test, which asks the kernel to validate the generated ruleset without committing it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use backend_nftables::apply::{NftCommand, NftRunner, RecordingRunner};
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use proxy_core::model::{
    Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName,
};
use proxy_core::proxier::{Proxier, SyncRequest};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(ns: &str, name: &str, cluster_ips: &[&str], port: u16, proto: Protocol) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new(ns, name),
        port: "".into(),
        protocol: proto,
    };
    ServicePort::new(name, cluster_ips.iter().map(|s| ip(s)).collect(), port)
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint::ready(ip(addr), port)
}

fn add(state: &mut ProxyState, svc: ServicePort, eps: Vec<Endpoint>) {
    if !eps.is_empty() {
        state.endpoints.insert(svc.name.clone(), Arc::new(eps));
    }
    state.services.insert(svc.name.clone(), Arc::new(svc));
}

fn config() -> NftConfig {
    NftConfig {
        local: proxy_core::model::LocalDetector::ClusterCidr(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ]),
        ..NftConfig::default()
    }
}

/// A small cluster that uses every kind of destination.
fn sample_state() -> ProxyState {
    let mut state = ProxyState::default();
    let mut web = port(
        "default",
        "web",
        &["10.96.0.10", "fd00:96::10"],
        80,
        Protocol::Tcp,
    );
    web.node_port = Some(30080);
    web.external_ips = vec![ip("192.168.100.50")];
    web.load_balancer_ips = vec![ip("192.168.100.60")];
    add(
        &mut state,
        web,
        vec![
            ep("10.244.1.2", 8080),
            ep("10.244.2.2", 8080),
            ep("fd00:244:1::2", 8080),
        ],
    );
    add(
        &mut state,
        port("kube-system", "dns", &["10.96.0.53"], 53, Protocol::Udp),
        vec![ep("10.244.1.2", 5353)],
    );
    let mut empty = port("default", "empty", &["10.96.0.99"], 443, Protocol::Sctp);
    empty.node_port = Some(30443);
    add(&mut state, empty, vec![]);
    state
}

fn request(state: ProxyState, changed: &[&str], full: bool) -> SyncRequest {
    SyncRequest {
        state: Arc::new(state),
        changed: changed
            .iter()
            .map(|s| {
                let (ns, name) = s.split_once('/').unwrap();
                ServiceName::new(ns, name)
            })
            .collect::<BTreeSet<_>>(),
        node_changed: false,
        full,
        periodic: false,
    }
}

#[test]
fn full_sync_golden() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    let outcome = proxier.sync(&request(sample_state(), &[], true)).unwrap();
    assert!(outcome.full);
    insta::assert_snapshot!(proxier.runner().scripts[0]);
}

#[test]
fn one_endpoint_change_touches_only_that_service() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(sample_state(), &[], true)).unwrap();

    let mut state = sample_state();
    let name = ServicePortName {
        service: ServiceName::new("kube-system", "dns"),
        port: "".into(),
        protocol: Protocol::Udp,
    };
    state
        .endpoints
        .insert(name, Arc::new(vec![ep("10.244.2.2", 5353)]));
    let outcome = proxier
        .sync(&request(state, &["kube-system/dns"], false))
        .unwrap();
    assert!(!outcome.full);
    let script = &proxier.runner().scripts[1];
    insta::assert_snapshot!(script);
    assert!(
        !script.contains("table ip kube-proxy {"),
        "must not rewrite the table"
    );
    assert!(!script.contains("10.96.0.10"), "other Services untouched");
}

#[test]
fn endpoint_count_change_moves_service_to_a_new_class() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(sample_state(), &[], true)).unwrap();
    let mut state = sample_state();
    let name = ServicePortName {
        service: ServiceName::new("kube-system", "dns"),
        port: "".into(),
        protocol: Protocol::Udp,
    };
    state.endpoints.insert(
        name,
        Arc::new(vec![
            ep("10.244.1.2", 5353),
            ep("10.244.2.2", 5353),
            ep("10.244.3.2", 5353),
        ]),
    );
    proxier
        .sync(&request(state, &["kube-system/dns"], false))
        .unwrap();
    let script = &proxier.runner().scripts[1];
    assert!(
        script.contains("map ip kube-proxy slot-2 ")
            && script.contains("chain ip kube-proxy pick-ip-3\n"),
        "class 3 created: {script}"
    );
    assert!(script.contains("goto pick-ip-3"), "{script}");
    // The endpoint that stays keeps its slot: its element is not touched.
    assert!(
        !script.contains("delete element ip kube-proxy slot-0"),
        "{script}"
    );
}

#[test]
fn removing_last_endpoint_rejects_and_readding_restores() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(sample_state(), &[], true)).unwrap();
    let mut state = sample_state();
    let name = ServicePortName {
        service: ServiceName::new("kube-system", "dns"),
        port: "".into(),
        protocol: Protocol::Udp,
    };
    state.endpoints.remove(&name);
    proxier
        .sync(&request(state, &["kube-system/dns"], false))
        .unwrap();
    let script = proxier.runner().scripts[1].clone();
    assert!(
        script.contains(
            "add element ip kube-proxy no-endpoint-services {\n\t10.96.0.53 . udp . 53\n}"
        ),
        "{script}"
    );
    // 10.244.1.2 still backs default/web: its hairpin element stays.
    assert!(!script.contains("hairpin"), "{script}");
    proxier
        .sync(&request(sample_state(), &["kube-system/dns"], false))
        .unwrap();
    let script = &proxier.runner().scripts[2];
    assert!(
        script.contains("delete element ip kube-proxy no-endpoint-services"),
        "{script}"
    );
    assert!(!script.contains("hairpin"), "{script}");
}

#[test]
fn shared_endpoint_ip_keeps_hairpin_element_while_used() {
    // 10.244.1.2 backs both web and dns; removing dns must keep its hairpin element.
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(sample_state(), &[], true)).unwrap();
    let mut state = sample_state();
    state.services.retain(|k, _| &*k.service.name != "dns");
    state.endpoints.retain(|k, _| &*k.service.name != "dns");
    proxier
        .sync(&request(state, &["kube-system/dns"], false))
        .unwrap();
    let script = &proxier.runner().scripts[1];
    assert!(!script.contains("hairpin"), "{script}");
    assert!(
        script.contains("delete element ip kube-proxy service-ips"),
        "{script}"
    );
}

#[test]
fn cluster_ip_stays_checked_while_any_port_of_it_exists() {
    // web has TCP 80 and a second port on the same cluster IP.
    let mut state = sample_state();
    let mut second = port("default", "web", &["10.96.0.10"], 8443, Protocol::Tcp);
    second.name.port = "https".into();
    add(&mut state, second.clone(), vec![ep("10.244.1.2", 8443)]);
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(state.clone(), &[], true)).unwrap();
    assert!(proxier.runner().scripts[0].contains("10.96.0.10"));

    state.services.remove(&second.name);
    proxier
        .sync(&request(state.clone(), &["default/web"], false))
        .unwrap();
    let script = &proxier.runner().scripts[1];
    assert!(!script.contains("cluster-ips"), "still in use: {script}");

    state.services.retain(|k, _| &*k.service.name != "web");
    proxier
        .sync(&request(state, &["default/web"], false))
        .unwrap();
    let script = &proxier.runner().scripts[2];
    assert!(
        script.contains("delete element ip kube-proxy cluster-ips {\n\t10.96.0.10\n}"),
        "{script}"
    );
    assert!(
        script.contains("delete element ip6 kube-proxy cluster-ips {\n\tfd00:96::10\n}"),
        "{script}"
    );
}

#[test]
fn service_cidr_change_rewrites_only_the_check_chain() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    let mut state = sample_state();
    state.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    proxier.sync(&request(state.clone(), &[], true)).unwrap();
    assert!(proxier.runner().scripts[0].contains("ip daddr { 10.96.0.0/16 } drop"));

    state.service_cidrs.push("fd00:96::/108".parse().unwrap());
    let outcome = proxier.sync(&request(state, &[], false)).unwrap();
    assert!(!outcome.full);
    let script = &proxier.runner().scripts[1];
    assert_eq!(
        script,
        "flush chain ip6 kube-proxy cluster-ips-check\n\
         add rule ip6 kube-proxy cluster-ips-check ip6 daddr @cluster-ips reject\n\
         add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:96::/108 } drop\n",
        "only the family whose ranges changed"
    );
}

#[test]
fn conflicting_destinations_go_to_the_first_service_only() {
    let mut state = sample_state();
    // Same cluster IP and port as default/web: must not break the transaction.
    add(
        &mut state,
        port("default", "zz-copy", &["10.96.0.10"], 80, Protocol::Tcp),
        vec![ep("10.244.9.9", 1)],
    );
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(state, &[], true)).unwrap();
    let script = &proxier.runner().scripts[0];
    assert!(!script.contains("10.244.9.9"), "{script}");
    assert_eq!(
        script
            .matches("10.96.0.10 . tcp . 80 : goto internal")
            .count(),
        1,
        "{script}"
    );
}

#[test]
fn failed_sync_forces_a_full_rewrite_next_time() {
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(sample_state(), &[], true)).unwrap();
    proxier.runner_mut().fail_next = Some("boom".into());
    let mut changed = sample_state();
    changed.endpoints.clear();
    assert!(proxier
        .sync(&request(changed.clone(), &["default/web"], false))
        .is_err());
    let outcome = proxier
        .sync(&request(changed, &["default/web"], false))
        .unwrap();
    assert!(
        outcome.full,
        "after a failure the next sync rewrites everything"
    );
}

/// Kernel validation of the generated rulesets (full and incremental), without
/// committing anything: `nft --check` needs CAP_NET_ADMIN.
#[test]
fn kernel_accepts_generated_rulesets() {
    if !testkit::root_or_skip("kernel_accepts_generated_rulesets") {
        return;
    }
    let mut recorder = NftablesProxier::new(config(), RecordingRunner::default());
    recorder.sync(&request(sample_state(), &[], true)).unwrap();
    let mut checker = NftCommand::check_only();
    let full = &recorder.runner().scripts[0];
    checker.run(full).unwrap_or_else(|e| panic!("{e}\n{full}"));
    checker
        .run(&backend_nftables::cleanup_script())
        .expect("cleanup script");
}

/// The endpoint in each affinity slot map of a script, e.g. `slot-1 → 10.244.0.2 . 80`,
/// from a full table or from `add element` commands.
fn affinity_targets(script: &str) -> BTreeSet<(String, String)> {
    let mut current: Option<String> = None;
    let mut out = BTreeSet::new();
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(name) = words.iter().find(|w| w.starts_with("slot-")) {
            current = Some(name.to_string());
        } else if line.trim() == "}" && !line.starts_with("\t\t") {
            current = None;
        } else if let (Some(map), Some((_, value))) = (&current, line.split_once(" : ")) {
            if line.contains("type") {
                continue;
            }
            out.insert((map.clone(), value.trim_end_matches(',').trim().to_string()));
        }
    }
    out
}

#[test]
fn affinity_slots_stay_with_their_endpoints() {
    let sticky = |eps: &[&str]| with_sticky(ProxyState::default(), eps);
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier
        .sync(&request(
            sticky(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]),
            &[],
            true,
        ))
        .unwrap();
    let before = affinity_targets(&proxier.runner().scripts[0]);
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(
        proxier.runner().scripts[0].contains("set ip kube-proxy aff-2 ")
            && proxier.runner().scripts[0].contains("chain ip kube-proxy pick-ip-3-affinity-600\n"),
        "one shared set per slot, one chain for every such Service"
    );

    // The first endpoint goes, a new one comes: the others keep their slots (so their
    // clients stay) and the newcomer takes the free slot: one element changes.
    let next = sticky(&["10.244.0.2", "10.244.0.3", "10.244.0.9"]);
    proxier
        .sync(&request(next.clone(), &["default/sticky"], false))
        .unwrap();
    let slot_of = |targets: &BTreeSet<(String, String)>, ep: &str| {
        targets
            .iter()
            .find(|(_, t)| t == ep)
            .map(|(s, _)| s.clone())
    };
    let added = affinity_targets(&proxier.runner().scripts[1]);
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(
        slot_of(&added, "10.244.0.9 . 80"),
        slot_of(&before, "10.244.0.1 . 80")
    );

    // A periodic full rewrite keeps them too.
    proxier.sync(&request(next, &[], true)).unwrap();
    let after = affinity_targets(&proxier.runner().scripts[2]);
    for kept in ["10.244.0.2 . 80", "10.244.0.3 . 80"] {
        assert_eq!(slot_of(&before, kept), slot_of(&after, kept), "{kept}");
    }
    assert_eq!(
        slot_of(&after, "10.244.0.9 . 80"),
        slot_of(&before, "10.244.0.1 . 80")
    );
}

/// A table as a sorted list of its tokens, so two listings compare equal whatever the
/// order the kernel lists hash elements in and however `nft` wraps them.
fn normalized(listing: &str) -> Vec<String> {
    let mut tokens: Vec<String> = listing
        .split(['\n', ',', '{', '}'])
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|t| !t.is_empty())
        .collect();
    tokens.sort();
    tokens
}

/// `state` plus default/sticky (10.96.0.30:80, `ClientIP` affinity) on `endpoints`.
fn with_sticky(mut state: ProxyState, endpoints: &[&str]) -> ProxyState {
    let mut svc = port("default", "sticky", &["10.96.0.30"], 80, Protocol::Tcp);
    svc.session_affinity_timeout = Some(600);
    add(
        &mut state,
        svc,
        endpoints.iter().map(|a| ep(a, 80)).collect(),
    );
    state
}

/// Full loads of `states` in `ns`, each by a fresh proxier (as after a restart).
fn load_fresh(ns: &testkit::Netns, states: Vec<ProxyState>) {
    ns.run(|| {
        for state in states {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            proxier.sync(&request(state, &[], true)).unwrap();
        }
    })
    .unwrap();
}

/// Both of our tables in `ns`, as `nft` lists them, normalized.
fn kernel_tables(ns: &testkit::Netns) -> Vec<String> {
    let v4 = ns
        .exec(&["nft", "list", "table", "ip", "kube-proxy"])
        .unwrap();
    let v6 = ns
        .exec(&["nft", "list", "table", "ip6", "kube-proxy"])
        .unwrap();
    normalized(&format!("{v4}\n{v6}"))
}

/// Element-only changes go to the kernel as a netlink batch written by us, not through
/// `nft`. What the kernel then holds must be exactly what a full rewrite of the new state
/// gives: same keys, same values (slots, endpoints, verdicts), nothing left over.
#[test]
fn netlink_element_changes_match_a_full_rewrite() {
    if !testkit::root_or_skip("netlink_element_changes_match_a_full_rewrite") {
        return;
    }
    // Affinity on a NodePort with `externalTrafficPolicy: Local`: slot maps of both
    // roles and key kinds.
    let local_sticky = |eps: &[&str]| {
        let mut state = with_sticky(sample_state(), eps);
        let name = state
            .services
            .keys()
            .find(|k| &*k.service.name == "sticky")
            .cloned();
        if let Some(svc) = name.and_then(|n| state.services.get_mut(&n)) {
            let svc = Arc::make_mut(svc);
            svc.node_port = Some(30030);
            svc.external_traffic_policy = proxy_core::model::TrafficPolicy::Local;
        }
        state
    };
    let before = local_sticky(&["10.244.0.1", "10.244.0.2"]);
    let mut after = local_sticky(&["10.244.0.2", "10.244.0.7"]);
    let dns = ServicePortName {
        service: ServiceName::new("kube-system", "dns"),
        port: "".into(),
        protocol: Protocol::Udp,
    };
    after
        .endpoints
        .insert(dns, Arc::new(vec![ep("10.244.2.9", 5353)]));
    let web = ServicePortName {
        service: ServiceName::new("default", "web"),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    after.endpoints.insert(
        web,
        Arc::new(vec![
            ep("10.244.1.2", 8080),
            ep("10.244.2.3", 8080),
            ep("fd00:244:1::3", 8080),
        ]),
    );
    after.services.retain(|k, _| &*k.service.name != "empty");
    let changed = [
        "kube-system/dns",
        "default/sticky",
        "default/empty",
        "default/web",
    ];

    let incremental = testkit::Netns::new().unwrap();
    let (bytes, used_netlink) = incremental
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            proxier.sync(&request(before, &[], true)).unwrap();
            let outcome = proxier
                .sync(&request(after.clone(), &changed, false))
                .unwrap();
            assert!(!outcome.full);
            (outcome.transaction_bytes, proxier.runner().netlink_open())
        })
        .unwrap();
    assert!(used_netlink, "element changes must take the netlink path");
    assert!(bytes > 0);
    let rewritten = testkit::Netns::new().unwrap();
    load_fresh(&rewritten, vec![after]);
    let got = kernel_tables(&incremental);
    let want = kernel_tables(&rewritten);
    assert!(got.iter().any(|t| t.contains("10.244.0.7 . 80")));
    assert_eq!(got, want);
}

/// A port is kept only in the plans of the families it has a cluster IP of. A Service
/// that becomes dual-stack and then single-stack again, as changes, must leave the
/// kernel as a full rewrite of each state would.
#[test]
fn a_service_gaining_and_losing_a_family_matches_a_full_rewrite() {
    if !testkit::root_or_skip("a_service_gaining_and_losing_a_family_matches_a_full_rewrite") {
        return;
    }
    let dns = |cluster_ips: &[&str], eps: Vec<Endpoint>| {
        let mut state = sample_state();
        add(
            &mut state,
            port("kube-system", "dns", cluster_ips, 53, Protocol::Udp),
            eps,
        );
        state
    };
    let single = dns(&["10.96.0.53"], vec![ep("10.244.1.2", 5353)]);
    let dual = dns(
        &["10.96.0.53", "fd00:96::53"],
        vec![ep("10.244.1.2", 5353), ep("fd00:244:1::9", 5353)],
    );
    let steps = [dual, single];
    let incremental = testkit::Netns::new().unwrap();
    let mut proxier = NftablesProxier::new(config(), NftCommand::default());
    incremental
        .run(|| proxier.sync(&request(sample_state(), &[], true)).map(drop))
        .unwrap()
        .unwrap();
    for (i, state) in steps.into_iter().enumerate() {
        let outcome = incremental
            .run(|| proxier.sync(&request(state.clone(), &["kube-system/dns"], false)))
            .unwrap()
            .unwrap();
        assert!(!outcome.full, "step {i}");
        let rewritten = testkit::Netns::new().unwrap();
        load_fresh(&rewritten, vec![state]);
        let got = kernel_tables(&incremental);
        assert_eq!(
            got.iter().any(|t| t.contains("fd00:96::53 . udp . 53")),
            i == 0,
            "step {i}: {got:?}"
        );
        assert_eq!(got, kernel_tables(&rewritten), "step {i}");
    }
}

/// A new process (nothing programmed yet) finds the table of an earlier one: it loads its
/// own in place, and what the earlier state needed and this one does not (classes,
/// affinity maps and sets) is gone afterwards.
#[test]
fn full_load_over_an_older_table_leaves_nothing_behind() {
    if !testkit::root_or_skip("full_load_over_an_older_table_leaves_nothing_behind") {
        return;
    }
    let older = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
    let mut newer = sample_state();
    let web = ServicePortName {
        service: ServiceName::new("default", "web"),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    newer
        .endpoints
        .insert(web, Arc::new(vec![ep("10.244.1.2", 8080)]));

    let restarted_ns = testkit::Netns::new().unwrap();
    load_fresh(&restarted_ns, vec![older, newer.clone()]);
    let restarted = kernel_tables(&restarted_ns);
    let fresh_ns = testkit::Netns::new().unwrap();
    load_fresh(&fresh_ns, vec![newer]);
    let fresh = kernel_tables(&fresh_ns);
    assert!(
        !restarted.iter().any(|t| t.contains("aff-")),
        "{restarted:?}"
    );
    assert_eq!(restarted, fresh);
}

/// A full load updates the table in place: what clients the affinity sets remember
/// survives a restart of the proxy (a replaced table would forget them).
#[test]
fn full_load_keeps_remembered_affinity_clients() {
    if !testkit::root_or_skip("full_load_keeps_remembered_affinity_clients") {
        return;
    }
    let state = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.2"]);
    let ns = testkit::Netns::new().unwrap();
    load_fresh(&ns, vec![state.clone()]);
    ns.exec(&[
        "nft",
        "add element ip kube-proxy aff-1 { 192.168.7.7 . 10.96.0.30 . tcp . 80 timeout 600s }",
    ])
    .unwrap();
    load_fresh(&ns, vec![state]);
    let set = ns
        .exec(&["nft", "list", "set", "ip", "kube-proxy", "aff-1"])
        .unwrap();
    assert!(set.contains("192.168.7.7"), "{set}");
}

#[test]
fn local_external_policy_short_circuits_to_all_endpoints() {
    // Both policies Local and no endpoint on this node: outside clients find none, but
    // pods and the node reaching the NodePort or LB IP go to every endpoint (upstream's
    // short-circuit targets the Cluster-policy endpoints whatever the internal policy).
    let mut state = ProxyState::default();
    let mut svc = port("default", "local", &["10.96.0.70"], 80, Protocol::Tcp);
    svc.node_port = Some(30070);
    svc.load_balancer_ips = vec![ip("192.168.100.70")];
    svc.internal_traffic_policy = proxy_core::model::TrafficPolicy::Local;
    svc.external_traffic_policy = proxy_core::model::TrafficPolicy::Local;
    add(&mut state, svc, vec![ep("10.244.2.2", 8080)]);
    let mut proxier = NftablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(state, &[], true)).unwrap();
    let script = &proxier.runner().scripts[0];
    let elements = |map: &str| -> Vec<String> {
        let start = format!("add element ip kube-proxy {map} {{");
        script
            .lines()
            .skip_while(|l| *l != start)
            .skip(1)
            .take_while(|l| *l != "}")
            .map(|l| l.trim().trim_end_matches(',').to_string())
            .collect()
    };
    assert_eq!(
        elements("ip-picks"),
        [
            "10.96.0.70 . tcp . 80 : drop",
            "192.168.100.70 . tcp . 80 : drop"
        ]
    );
    assert_eq!(elements("nodeport-picks"), ["tcp . 30070 : drop"]);
    assert_eq!(
        elements("ip-short-circuits"),
        ["192.168.100.70 . tcp . 80 : goto pick-ip-1"]
    );
    assert_eq!(
        elements("nodeport-short-circuits"),
        ["tcp . 30070 : goto pick-nodeport-1"]
    );
    assert_eq!(
        elements("slot-0"),
        ["192.168.100.70 . tcp . 80 : 10.244.2.2 . 8080"]
    );
}

/// The periodic re-sync in a real kernel: nothing sent while the kernel holds what was
/// programmed; an element deleted or added behind our back comes back (only that map is
/// touched); a rule changed behind our back makes it rewrite the table.
#[test]
fn periodic_resync_reads_back_and_repairs_only_what_differs() {
    if !testkit::root_or_skip("periodic_resync_reads_back_and_repairs_only_what_differs") {
        return;
    }
    let ns = testkit::Netns::new().unwrap();
    let mut proxier = NftablesProxier::new(config(), NftCommand::default());
    let periodic = || SyncRequest {
        periodic: true,
        ..request(sample_state(), &[], true)
    };
    let mut sync = |req: SyncRequest| {
        ns.run(|| {
            let outcome = proxier.sync(&req).unwrap();
            (outcome, proxier.runner().generation_known())
        })
        .unwrap()
    };
    let (first, _) = sync(request(sample_state(), &[], true));
    assert!(first.full);
    let before = kernel_tables(&ns);

    let (quiet, generation_known) = sync(periodic());
    assert!(!quiet.full, "nothing to rewrite");
    assert_eq!(quiet.transaction_bytes, 0, "nothing to send");
    assert!(
        generation_known,
        "no commit since ours: the re-sync needs no read-back"
    );

    let element = "10.96.0.10 . tcp . 80";
    ns.exec(&[
        "nft",
        "delete",
        "element",
        "ip",
        "kube-proxy",
        "service-ips",
        &format!("{{ {element} }}"),
    ])
    .unwrap();
    assert_ne!(kernel_tables(&ns), before);
    let (repaired, _) = sync(periodic());
    assert!(!repaired.full);
    assert!(repaired.transaction_bytes > 0);
    assert_eq!(kernel_tables(&ns), before, "the deleted element is back");

    // An element we never wrote: the map is loaded again without it.
    ns.exec(&[
        "nft",
        "add",
        "element",
        "ip",
        "kube-proxy",
        "no-endpoint-services",
        "{ 10.96.7.7 . tcp . 80 }",
    ])
    .unwrap();
    let (repaired, _) = sync(periodic());
    assert!(!repaired.full);
    assert_eq!(kernel_tables(&ns), before, "the stray element is gone");

    // A flushed chain: rules differ, so the table is written again.
    ns.exec(&["nft", "flush", "chain", "ip", "kube-proxy", "services"])
        .unwrap();
    let (rewritten, _) = sync(periodic());
    assert!(rewritten.full);
    assert_eq!(kernel_tables(&ns), before);
    assert_eq!(sync(periodic()).0.transaction_bytes, 0);
}

/// Localhost NodePorts on: a UDP NodePort's packets to 127.0.0.1 are rejected and counted
/// in the named counter that the metric reads; the counting does not make a periodic
/// re-sync see changed rules.
#[test]
fn loopback_nodeport_rejections_are_counted_without_disturbing_resyncs() {
    if !testkit::root_or_skip("loopback_nodeport_rejections_are_counted_without_disturbing_resyncs")
    {
        return;
    }
    let ns = testkit::Netns::new().unwrap();
    let config = NftConfig {
        localhost_nodeports: vec![proxy_core::model::IpFamily::V4],
        ..config()
    };
    let mut proxier = NftablesProxier::new(config, NftCommand::default());
    let state = || {
        let mut state = sample_state();
        let dns = ServicePortName {
            service: ServiceName::new("kube-system", "dns"),
            port: "".into(),
            protocol: Protocol::Udp,
        };
        let mut port = (*state.services[&dns]).clone();
        port.node_port = Some(30053);
        state.services.insert(dns, Arc::new(port));
        state
    };
    ns.run(|| proxier.sync(&request(state(), &[], true)).unwrap())
        .unwrap();
    let udp_counter = "localhost-nodeport-rejected-udp".to_string();
    let counted = || {
        ns.run(|| backend_nftables::apply::read_named_counters(proxy_core::model::IpFamily::V4))
            .unwrap()
            .unwrap()
    };
    assert!(
        counted().contains(&(udp_counter.clone(), 0)),
        "{:?}",
        counted()
    );
    let refused = ns
        .run(|| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            socket.connect("127.0.0.1:30053")?;
            socket.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
            socket.send(b"x")?;
            Ok::<_, std::io::Error>(socket.recv(&mut [0; 16]).map_err(|e| e.kind()))
        })
        .unwrap()
        .unwrap();
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    assert!(counted().contains(&(udp_counter, 1)), "{:?}", counted());

    resync_finds_nothing_to_repair(&ns, &mut proxier, state());
}

/// Someone else commits: a periodic re-sync reads our table back and finds it as it
/// was programmed, so nothing is rewritten or sent (counting must not look like drift).
fn resync_finds_nothing_to_repair(
    ns: &testkit::Netns,
    proxier: &mut NftablesProxier<NftCommand>,
    state: ProxyState,
) {
    ns.exec(&["nft", "add", "table", "ip", "someone-else"])
        .unwrap();
    let resync = ns
        .run(|| {
            proxier.sync(&SyncRequest {
                periodic: true,
                ..request(state, &[], true)
            })
        })
        .unwrap()
        .unwrap();
    assert!(!resync.full, "counting changed the table as read back");
    assert_eq!(resync.transaction_bytes, 0);
}

/// A restarted proxier adopts the table it finds: endpoints keep the slots they had (so
/// the clients the affinity sets remember stay on their endpoint), even where a fresh
/// plan would number them otherwise, and since the kernel already holds every planned
/// element, none is sent again.
#[test]
fn restart_adopts_the_table_and_reloads_no_element() {
    if !testkit::root_or_skip("restart_adopts_the_table_and_reloads_no_element") {
        return;
    }
    // History: the endpoint that sorts last arrived first and holds slot 0.
    let later = with_sticky(sample_state(), &["10.244.0.2"]);
    let now = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.2"]);
    let ns = testkit::Netns::new().unwrap();
    ns.run(|| {
        let mut proxier = NftablesProxier::new(config(), NftCommand::default());
        proxier.sync(&request(later, &[], true)).unwrap();
        proxier
            .sync(&request(now.clone(), &["default/sticky"], false))
            .unwrap();
    })
    .unwrap();
    let slot_maps = |ns: &testkit::Netns| {
        ["slot-0", "slot-1"].map(|map| {
            ns.exec(&["nft", "list", "map", "ip", "kube-proxy", map])
                .unwrap()
        })
    };
    let before = slot_maps(&ns);

    let fresh_ns = testkit::Netns::new().unwrap();
    load_fresh(&fresh_ns, vec![now.clone()]);
    assert_ne!(
        slot_maps(&fresh_ns),
        before,
        "a fresh plan numbers the slots otherwise (the test needs that)"
    );

    let (restart, elements_sent) = ns
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            let outcome = proxier.sync(&request(now, &[], true)).unwrap();
            (outcome, proxier.runner().elements_sent())
        })
        .unwrap();
    assert!(restart.full);
    assert_eq!(slot_maps(&ns), before, "slots adopted");
    assert_eq!(elements_sent, 0, "every map already held its elements");
}

/// A restart after a change (here an endpoint replaced while the proxy was down): the
/// maps the change touches get only the difference (the old endpoint's elements
/// deleted, the new one's added), not emptied and loaded again, and the kernel ends up
/// holding what a proxier that saw the change live holds.
#[test]
fn restart_after_a_change_sends_only_the_difference() {
    if !testkit::root_or_skip("restart_after_a_change_sends_only_the_difference") {
        return;
    }
    let before = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.2"]);
    let after = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.3"]);
    let live = testkit::Netns::new().unwrap();
    live.run(|| {
        let mut proxier = NftablesProxier::new(config(), NftCommand::default());
        proxier.sync(&request(before.clone(), &[], true)).unwrap();
        proxier
            .sync(&request(after.clone(), &["default/sticky"], false))
            .unwrap();
    })
    .unwrap();
    let ns = testkit::Netns::new().unwrap();
    load_fresh(&ns, vec![before]);
    let whole = ns
        .exec(&["nft", "list", "map", "ip", "kube-proxy", "slot-1"])
        .unwrap()
        .matches(" : ")
        .count();
    let (restart, sent) = ns
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            let outcome = proxier.sync(&request(after, &[], true)).unwrap();
            (outcome, proxier.runner().elements_sent())
        })
        .unwrap();
    assert!(restart.full);
    assert_eq!(kernel_tables(&ns), kernel_tables(&live));
    // Slot 1 of the sticky Service and its hairpin pair: each deleted and added again.
    assert!(whole > 1, "the slot map holds other Services too");
    assert_eq!(sent, 4, "only the replaced endpoint's elements");
}

/// A restarted proxier reads its old table once: at start, while the sources list
/// (`prepare`), so that its first sync reads no set again; or, without that, in the
/// first sync, each set once. A commit between the two (here: a map emptied behind its
/// back) makes the first sync read afresh and load that map again.
#[test]
fn restart_reads_the_table_once_and_again_after_another_commit() {
    if !testkit::root_or_skip("restart_reads_the_table_once_and_again_after_another_commit") {
        return;
    }
    let state = with_sticky(sample_state(), &["10.244.0.1", "10.244.0.2"]);
    let ns = testkit::Netns::new().unwrap();
    load_fresh(&ns, vec![state.clone()]);
    // Both families' tables.
    let sets: u64 = ["ip", "ip6"]
        .iter()
        .map(|family| {
            let table = ns
                .exec(&["nft", "list", "table", family, "kube-proxy"])
                .unwrap();
            table
                .lines()
                .filter(|l| l.starts_with("\tmap ") || l.starts_with("\tset "))
                .count() as u64
        })
        .sum();
    let service_ips = |ns: &testkit::Netns| {
        ns.exec(&["nft", "list", "map", "ip", "kube-proxy", "service-ips"])
            .unwrap()
    };
    let loaded = service_ips(&ns);
    assert!(loaded.contains("10.96.0.10"), "{loaded}");

    // No prepare: the first sync reads each set at most once (slots and digests).
    let (reads, sent) = ns
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            proxier.sync(&request(state.clone(), &[], true)).unwrap();
            (
                proxier.runner().sets_read(),
                proxier.runner().elements_sent(),
            )
        })
        .unwrap();
    assert!(reads > 0 && reads <= sets, "{reads} set dumps, {sets} sets");
    assert_eq!(sent, 0);

    // Prepared: the first sync reads nothing more.
    let (prepared, synced, sent) = ns
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            proxier.prepare();
            let prepared = proxier.runner().sets_read();
            proxier.sync(&request(state.clone(), &[], true)).unwrap();
            (
                prepared,
                proxier.runner().sets_read(),
                proxier.runner().elements_sent(),
            )
        })
        .unwrap();
    assert!(prepared > 0);
    assert_eq!(synced, prepared, "the first sync used the prepared read");
    assert_eq!(sent, 0);

    // A commit after the read: the first sync reads again and reloads what differs.
    let (prepared, synced) = ns
        .run(|| {
            let mut proxier = NftablesProxier::new(config(), NftCommand::default());
            proxier.prepare();
            let prepared = proxier.runner().sets_read();
            let flushed = std::process::Command::new("nft")
                .args(["flush", "map", "ip", "kube-proxy", "service-ips"])
                .status()
                .unwrap();
            assert!(flushed.success());
            proxier.sync(&request(state.clone(), &[], true)).unwrap();
            (prepared, proxier.runner().sets_read())
        })
        .unwrap();
    assert_eq!(service_ips(&ns), loaded, "the emptied map is loaded again");
    assert!(synced > prepared, "read again after another commit");
}

/// `--service-counters`: new connections to a cluster IP and to a NodePort are counted
/// in their Service port's named counters, selected through the counter maps; counting
/// does not make a periodic re-sync see a difference; a restarted proxier adopts the
/// counters with their values; a Service that goes takes its counters along; with the
/// flag off, the table has no counter map and no Service counter.
#[test]
fn service_counters_count_new_connections_and_survive_resyncs_and_restarts() {
    use backend_nftables::apply::{read_named_counters, read_service_traffic};
    use proxy_core::model::IpFamily;
    use proxy_core::proxier::DestinationKind;
    if !testkit::root_or_skip(
        "service_counters_count_new_connections_and_survive_resyncs_and_restarts",
    ) {
        return;
    }
    let ns = testkit::Netns::new().unwrap();
    // A node address for the NodePort, and a route for the Service range, so that the
    // datagrams reach the nat output hook (their DNAT target is unreachable: no matter).
    for cmd in [
        "ip link set lo up",
        "ip addr add 192.168.50.1/24 dev lo",
        "ip route add 10.96.0.0/16 dev lo",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    let counted = NftConfig {
        service_counters: true,
        families: vec![IpFamily::V4],
        ..config()
    };
    let dns = ServicePortName {
        service: ServiceName::new("kube-system", "dns"),
        port: "".into(),
        protocol: Protocol::Udp,
    };
    let state = || {
        let mut state = sample_state();
        let mut port = (*state.services[&dns]).clone();
        port.node_port = Some(30053);
        state.services.insert(dns.clone(), Arc::new(port));
        state
    };
    // Each datagram from a socket of its own: one new connection each.
    let send = |dest: &str, n: usize| {
        ns.run(|| {
            for _ in 0..n {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let _ = socket.send_to(b"x", dest);
            }
        })
        .unwrap();
    };
    let traffic = |state: &ProxyState| {
        let mut out: Vec<(String, DestinationKind, u64)> = ns
            .run(|| read_service_traffic(&[IpFamily::V4], state).unwrap())
            .unwrap()
            .into_iter()
            .filter(|t| t.packets > 0 || t.port == dns)
            .map(|t| (t.port.to_string(), t.destination, t.packets))
            .collect();
        out.sort();
        out
    };
    let service_counters = || -> Vec<String> {
        ns.run(|| read_named_counters(IpFamily::V4).unwrap())
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| n.starts_with("svc-"))
            .collect()
    };
    let mut proxier = NftablesProxier::new(counted.clone(), NftCommand::default());
    ns.run(|| proxier.sync(&request(state(), &[], true)).unwrap())
        .unwrap();
    send("10.96.0.53:53", 3);
    send("192.168.50.1:30053", 2);
    let want = vec![
        (
            "kube-system/dns/udp".to_string(),
            DestinationKind::ClusterIp,
            3,
        ),
        (
            "kube-system/dns/udp".to_string(),
            DestinationKind::NodePort,
            2,
        ),
    ];
    assert_eq!(traffic(&state()), want);

    resync_finds_nothing_to_repair(&ns, &mut proxier, state());

    // A restart adopts the table: the counters keep their values and go on counting.
    let mut proxier = NftablesProxier::new(counted.clone(), NftCommand::default());
    ns.run(|| proxier.sync(&request(state(), &[], true)).unwrap())
        .unwrap();
    assert_eq!(traffic(&state()), want);
    send("10.96.0.53:53", 1);
    assert_eq!(traffic(&state())[0].2, 4);

    // The Service goes: its elements and counters go in the same transaction.
    let before = service_counters();
    let mut without = state();
    without.services.remove(&dns);
    without.endpoints.remove(&dns);
    ns.run(|| {
        proxier
            .sync(&request(without.clone(), &["kube-system/dns"], false))
            .unwrap()
    })
    .unwrap();
    assert_eq!(
        traffic(&state()),
        vec![],
        "the counters of a removed Service"
    );
    let after = service_counters();
    assert_eq!(before.len() - after.len(), 2, "{before:?} → {after:?}");

    // The flag off: a full sync removes the counter maps and the Service counters.
    let mut plain = NftablesProxier::new(
        NftConfig {
            families: vec![IpFamily::V4],
            ..config()
        },
        NftCommand::default(),
    );
    ns.run(|| plain.sync(&request(state(), &[], true)).unwrap())
        .unwrap();
    let table = ns
        .exec(&["nft", "list", "table", "ip", "kube-proxy"])
        .unwrap();
    assert!(!table.contains("counter"), "{table}");
    assert_eq!(service_counters(), Vec::<String>::new());
}
