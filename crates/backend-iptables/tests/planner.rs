//! Planner tests: state in, `iptables-restore` input out, through the recording runner.
//! No root needed, except `kernel_accepts_the_generated_rules` (`iptables-restore --test`
//! in a throw-away network namespace).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use backend_iptables::apply::{Backend, IptablesCommand, IptablesRunner, RecordingRunner};
use backend_iptables::plan::{FamilyPlan, IptConfig};
use backend_iptables::IptablesProxier;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, Protocol, ProxyState, ServiceName, ServicePort,
    ServicePortName, TrafficPolicy,
};
use proxy_core::proxier::{Proxier, SyncRequest};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(ns: &str, name: &str, cluster_ips: &[&str], port: u16, proto: Protocol) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new(ns, name),
        port: format!("p{port}").into(),
        protocol: proto,
    };
    ServicePort::new(name, cluster_ips.iter().map(|s| ip(s)).collect(), port)
}

fn ep(addr: &str, port: u16, is_local: bool) -> Endpoint {
    Endpoint {
        is_local,
        ..Endpoint::ready(ip(addr), port)
    }
}

fn add(state: &mut ProxyState, svc: ServicePort, eps: Vec<Endpoint>) {
    if !eps.is_empty() {
        state.endpoints.insert(svc.name.clone(), Arc::new(eps));
    }
    state.services.insert(svc.name.clone(), Arc::new(svc));
}

fn config() -> IptConfig {
    IptConfig {
        local: LocalDetector::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()]),
        families: vec![IpFamily::V4],
        ..IptConfig::default()
    }
}

/// Every feature at once: ClusterIP with two endpoints, NodePort, externalIP, an LB IP
/// with source ranges, affinity, external-Local with a health check node port, and a
/// Service without endpoints.
fn sample_state() -> ProxyState {
    let mut state = ProxyState::default();
    let mut web = port("ns1", "svc1", &["172.30.0.41"], 80, Protocol::Tcp);
    web.node_port = Some(30080);
    web.external_ips = vec![ip("192.168.99.11")];
    add(
        &mut state,
        web,
        vec![ep("10.180.0.1", 80, false), ep("10.180.1.1", 80, true)],
    );
    let mut lb = port("ns2", "lb", &["172.30.0.42"], 443, Protocol::Tcp);
    lb.load_balancer_ips = vec![ip("1.2.3.4")];
    lb.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
    lb.node_port = Some(30443);
    lb.session_affinity_timeout = Some(10800);
    lb.external_traffic_policy = TrafficPolicy::Local;
    lb.health_check_node_port = Some(30000);
    add(
        &mut state,
        lb,
        vec![ep("10.180.0.2", 8443, true), ep("10.180.2.2", 8443, false)],
    );
    let mut empty = port("ns3", "empty", &["172.30.0.43"], 53, Protocol::Udp);
    empty.node_port = Some(30053);
    add(&mut state, empty, vec![]);
    state
}

fn request(state: &ProxyState, changed: &[(&str, &str)], full: bool) -> SyncRequest {
    SyncRequest {
        state: Arc::new(state.clone()),
        changed: changed
            .iter()
            .map(|(ns, n)| ServiceName::new(*ns, *n))
            .collect::<BTreeSet<_>>(),
        node_changed: false,
        full,
        periodic: false,
    }
}

fn last_input(proxier: &IptablesProxier<RecordingRunner>) -> String {
    proxier
        .runner()
        .restores
        .last()
        .map(|(_, s)| s.clone())
        .unwrap_or_default()
}

#[test]
fn full_sync_golden() {
    let state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    let outcome = proxier.sync(&request(&state, &[], true)).unwrap();
    assert!(outcome.full);
    assert_eq!(proxier.runner().prepared, 1);
    insta::assert_snapshot!("full_sync", last_input(&proxier));
}

#[test]
fn endpoint_change_rewrites_only_that_services_chains() {
    let mut state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let full_len = last_input(&proxier).len();

    // ns1/svc1 loses 10.180.1.1 and gains 10.180.3.1.
    let name = state.services.keys().next().unwrap().clone();
    state.endpoints.insert(
        name,
        Arc::new(vec![
            ep("10.180.0.1", 80, false),
            ep("10.180.3.1", 80, false),
        ]),
    );
    let outcome = proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .unwrap();
    assert!(!outcome.full);
    let delta = last_input(&proxier);
    assert!(delta.len() < full_len / 2, "{delta}");
    // No shared chain changed (the Service had and has endpoints); the other Services'
    // chains are not mentioned at all.
    assert!(!delta.contains(":KUBE-SERVICES"), "{delta}");
    assert!(!delta.contains("ns2/lb"), "{delta}");
    insta::assert_snapshot!("endpoint_change", delta);
    let counters = proxier.counters().snapshot();
    assert_eq!(counters.rules_last.get("nat"), Some(&5));
    assert!(counters.rules_total["nat"] > 20);
}

#[test]
fn losing_all_endpoints_moves_the_service_to_reject_and_deletes_its_chains() {
    let mut state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let name = state.services.keys().next().unwrap().clone();
    state.endpoints.remove(&name);
    proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .unwrap();
    let delta = last_input(&proxier);
    insta::assert_snapshot!("endpoints_gone", delta);
    assert!(delta.contains("-X KUBE-SVC-"), "{delta}");
    assert!(delta.contains("has no endpoints\" -m tcp -p tcp -d 172.30.0.41"));
}

#[test]
fn nothing_changed_writes_nothing() {
    let state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let outcome = proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .unwrap();
    assert_eq!(outcome.transaction_bytes, 0);
    assert_eq!(proxier.runner().restores.len(), 1);
}

#[test]
fn missing_canary_forces_a_full_sync() {
    let state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    proxier.runner_mut().canary_present = false;
    let outcome = proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .unwrap();
    assert!(outcome.full);
    assert!(last_input(&proxier).contains(":KUBE-PROXY-CANARY - [0:0]"));
}

#[test]
fn failures_are_counted_and_force_a_full_sync() {
    let mut state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.runner_mut().fail_next = Some("boom".into());
    assert!(proxier.sync(&request(&state, &[], true)).is_err());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let name = state.services.keys().next().unwrap().clone();
    state.endpoints.remove(&name);
    proxier.runner_mut().fail_next = Some("boom".into());
    assert!(proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .is_err());
    let c = proxier.counters().snapshot();
    assert_eq!((c.restore_failures, c.partial_restore_failures), (2, 1));
    // The runner's next request after a failure is not full, but we know nothing.
    let outcome = proxier
        .sync(&request(&state, &[("ns1", "svc1")], false))
        .unwrap();
    assert!(outcome.full);
}

#[test]
fn full_sync_deletes_stale_chains_and_adds_only_missing_jumps() {
    let state = sample_state();
    let mut runner = RecordingRunner::default();
    runner.saved.insert(
        IpFamily::V4,
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SERVICES - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n"
            .into(),
    );
    let mut proxier = IptablesProxier::new(config(), runner);
    proxier.sync(&request(&state, &[], true)).unwrap();
    let input = last_input(&proxier);
    assert!(input.contains("-X KUBE-SVC-AAAAAAAAAAAAAAAA"), "{input}");
    assert!(!input.contains("-I PREROUTING"), "{input}");
    assert!(input.contains(
        "-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));
}

#[test]
fn localhost_nodeports_and_conntrack_liberal_shape_the_fixed_rules() {
    let state = sample_state();
    let mut cfg = config();
    cfg.localhost_node_ports = false;
    cfg.conntrack_tcp_be_liberal = true;
    let mut proxier = IptablesProxier::new(cfg, RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let input = last_input(&proxier);
    assert!(!input.contains("KUBE-FIREWALL"), "{input}");
    assert!(!input.contains("INVALID"), "{input}");
    assert!(input.contains("--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"));
}

#[test]
fn ipv6_rules_use_ipv6_addresses_only() {
    let mut state = ProxyState::default();
    add(
        &mut state,
        port("ns", "v6", &["10.96.0.1", "fd00::1"], 80, Protocol::Tcp),
        vec![ep("10.244.1.2", 80, false), ep("fd00:244::2", 80, false)],
    );
    let cfg = IptConfig {
        families: vec![IpFamily::V4, IpFamily::V6],
        local: LocalDetector::ClusterCidr(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ]),
        ..IptConfig::default()
    };
    let plan = FamilyPlan::full(IpFamily::V6, &state, &cfg);
    let text: String = plan
        .all_chains(&cfg)
        .iter()
        .flat_map(|c| c.rules.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("--to-destination [fd00:244::2]:80"), "{text}");
    assert!(text.contains("! -s fd00:244::/48"), "{text}");
    assert!(!text.contains("10.244.1.2"), "{text}");
    assert!(
        !text.contains("KUBE-FIREWALL"),
        "IPv4-only mitigation: {text}"
    );
}

/// A port is kept only in the plans of the families it has a cluster IP of (an IPv4-only
/// cluster holds no IPv6 entry per port); changes that add and remove a family leave the
/// plan as a full plan of the new state.
#[test]
fn a_service_gaining_and_losing_a_family_replans_as_a_full_plan() {
    let cfg = IptConfig {
        families: vec![IpFamily::V4, IpFamily::V6],
        ..IptConfig::default()
    };
    let state_of = |cluster_ips: &[&str]| {
        let mut state = ProxyState::default();
        add(
            &mut state,
            port("ns", "dns", cluster_ips, 53, Protocol::Udp),
            vec![ep("10.244.1.2", 53, false), ep("fd00:244::2", 53, false)],
        );
        state
    };
    let single = state_of(&["10.96.0.53"]);
    let dual = state_of(&["10.96.0.53", "fd00::53"]);
    let mut plan = FamilyPlan::full(IpFamily::V6, &single, &cfg);
    assert!(plan.ports.is_empty(), "{:?}", plan.ports);
    for (i, state) in [dual, single].into_iter().enumerate() {
        let name = state.services.keys().next().unwrap().clone();
        plan.replan(&name, &state, &cfg);
        assert_eq!(plan.ports.len(), 1 - i, "step {i}");
        assert_eq!(
            plan,
            FamilyPlan::full(IpFamily::V6, &state, &cfg),
            "step {i}"
        );
    }
}

#[test]
fn kernel_accepts_the_generated_rules() {
    if !testkit::root_or_skip("kernel_accepts_the_generated_rules") {
        return;
    }
    let state = sample_state();
    let mut proxier = IptablesProxier::new(config(), RecordingRunner::default());
    proxier.sync(&request(&state, &[], true)).unwrap();
    let input = last_input(&proxier);
    // In a namespace of its own, so nothing of this host is touched.
    let ns = testkit::Netns::new().expect("netns");
    for backend in [Backend::Nft, Backend::Legacy] {
        let result = ns
            .run(|| IptablesCommand::test_only(backend).restore(IpFamily::V4, &input))
            .expect("run in netns");
        assert!(result.is_ok(), "{backend:?}: {result:?}\n{input}");
        // And a broken input is refused: the check can fail.
        let broken = input.replace("--dport 80 ", "--dport 80x ");
        let result = ns
            .run(|| IptablesCommand::test_only(backend).restore(IpFamily::V4, &broken))
            .expect("run in netns");
        assert!(result.is_err(), "{backend:?} accepted a broken input");
    }
}
