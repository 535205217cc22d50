//! Our nfnetlink encoding of the ruleset against `nft`'s: the same plan loaded through
//! our batches and through `nft -f` of its text must list the same (as root, each in its
//! own network namespace). Random plans must encode to batches the kernel takes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use backend_nftables::apply::{NftCommand, NftRunner, RecordingRunner};
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use proptest::prelude::*;
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
        port: "".into(),
        protocol: proto,
    };
    ServicePort::new(name, cluster_ips.iter().map(|s| ip(s)).collect(), port)
}

fn add(state: &mut ProxyState, svc: ServicePort, eps: &[(&str, u16)]) {
    if !eps.is_empty() {
        let eps = eps
            .iter()
            .map(|(a, p)| Endpoint::ready(ip(a), *p))
            .collect();
        state.endpoints.insert(svc.name.clone(), Arc::new(eps));
    }
    state.services.insert(svc.name.clone(), Arc::new(svc));
}

/// A cluster that reaches every statement our layout has: all destination kinds, no
/// endpoints, affinity, `externalTrafficPolicy: Local`, source ranges, many endpoints (a
/// spread through an anonymous verdict map), ServiceCIDRs.
fn rich_state() -> ProxyState {
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
    web.load_balancer_ips = vec![ip("192.168.100.60"), ip("fd00:100::60")];
    web.load_balancer_source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "198.51.100.0/25".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    web.external_traffic_policy = TrafficPolicy::Local;
    add(
        &mut state,
        web,
        &[
            ("10.244.1.2", 8080),
            ("10.244.2.2", 8080),
            ("fd00:244:1::2", 8080),
        ],
    );
    add(
        &mut state,
        port("kube-system", "dns", &["10.96.0.53"], 53, Protocol::Udp),
        &[("10.244.1.2", 5353)],
    );
    let mut empty = port("default", "empty", &["10.96.0.99"], 443, Protocol::Sctp);
    empty.node_port = Some(30443);
    add(&mut state, empty, &[]);
    let mut sticky = port("default", "sticky", &["10.96.0.30"], 80, Protocol::Tcp);
    sticky.session_affinity_timeout = Some(600);
    sticky.node_port = Some(30030);
    add(
        &mut state,
        sticky,
        &[("10.244.0.1", 80), ("10.244.0.2", 80), ("10.244.0.3", 80)],
    );
    let many: Vec<String> = (0..40).map(|i| format!("10.244.9.{i}")).collect();
    let many: Vec<(&str, u16)> = many.iter().map(|a| (a.as_str(), 80)).collect();
    add(
        &mut state,
        port("default", "many", &["10.96.0.40"], 80, Protocol::Tcp),
        &many,
    );
    state.service_cidrs = vec![
        "10.96.0.0/16".parse().unwrap(),
        "10.97.0.0/16".parse().unwrap(),
        "fd00:96::/108".parse().unwrap(),
    ];
    state
}

/// One configuration per way of telling local traffic, with the other options on
/// (`--service-counters` in two of them).
fn configs() -> Vec<NftConfig> {
    let base = NftConfig {
        localhost_nodeports: vec![IpFamily::V4, IpFamily::V6],
        ..NftConfig::default()
    };
    vec![
        NftConfig {
            local: LocalDetector::ClusterCidr(vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.250.0.0/15".parse().unwrap(),
                "fd00:244::/48".parse().unwrap(),
            ]),
            service_counters: true,
            ..base.clone()
        },
        NftConfig {
            local: LocalDetector::BridgeInterface("cbr0".into()),
            nodeport_cidrs: vec![
                "127.0.0.0/8".parse().unwrap(),
                "192.168.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            ..base.clone()
        },
        NftConfig {
            local: LocalDetector::InterfaceNamePrefix("veth".into()),
            masquerade_all: true,
            nodeport_cidrs: vec!["10.0.0.0/9".parse().unwrap()],
            service_counters: true,
            ..base.clone()
        },
        NftConfig {
            local: LocalDetector::None,
            masquerade_bit: 0,
            ..base
        },
    ]
}

fn full(state: ProxyState) -> SyncRequest {
    SyncRequest {
        state: Arc::new(state),
        changed: BTreeSet::new(),
        node_changed: false,
        full: true,
        periodic: false,
    }
}

/// Both tables as `nft` lists them, lines sorted: hash sets list their elements in an
/// order of their own.
fn listing(ns: &testkit::Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for family in ["ip", "ip6"] {
        let text = ns
            .exec(&["nft", "list", "table", family, "kube-proxy"])
            .unwrap();
        lines.extend(
            text.split(['\n', ',', '{', '}'])
                .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|t| !t.is_empty()),
        );
    }
    lines.sort();
    lines
}

#[test]
fn netlink_load_lists_as_nft_load_of_the_same_plan() {
    if !testkit::root_or_skip("netlink_load_lists_as_nft_load_of_the_same_plan") {
        return;
    }
    for config in configs() {
        let mut recorder = NftablesProxier::new(config.clone(), RecordingRunner::default());
        recorder.sync(&full(rich_state())).unwrap();
        let script = recorder.runner().scripts[0].clone();

        // `nft` started from a thread in the namespace runs in it.
        let by_nft = testkit::Netns::new().unwrap();
        by_nft
            .run(|| NftCommand::default().run(&script))
            .unwrap()
            .unwrap_or_else(|e| panic!("nft -f: {e}\n{script}"));

        let by_us = testkit::Netns::new().unwrap();
        by_us
            .run(|| {
                let mut proxier = NftablesProxier::new(config.clone(), NftCommand::default());
                proxier.sync(&full(rich_state())).unwrap();
            })
            .unwrap();

        let (want, got) = (listing(&by_nft), listing(&by_us));
        assert!(want.len() > 100, "{want:?}");
        if config.service_counters {
            assert!(
                want.iter().any(|l| l.contains(": \"svc-")),
                "no counter map element: {want:?}"
            );
        }
        if want != got {
            let only_nft: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
            let only_us: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
            panic!(
                "{:?}: listings differ\nonly nft: {only_nft:#?}\nonly ours: {only_us:#?}",
                config.local
            );
        }
    }
}

#[test]
fn cleanup_over_netlink_removes_both_tables() {
    if !testkit::root_or_skip("cleanup_over_netlink_removes_both_tables") {
        return;
    }
    let ns = testkit::Netns::new().unwrap();
    ns.run(|| {
        let mut proxier = NftablesProxier::new(configs()[0].clone(), NftCommand::default());
        proxier.sync(&full(rich_state())).unwrap();
        proxier.cleanup().unwrap();
        // Twice: nothing to delete is no error.
        proxier.cleanup().unwrap();
    })
    .unwrap();
    let tables = ns.exec(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("kube-proxy"), "{tables}");
}

/// A random small cluster: Services with random ports, protocols, endpoint counts,
/// affinity, policies and source ranges.
fn arb_state() -> impl Strategy<Value = ProxyState> {
    let svc = (
        1u16..65535,
        0usize..3,
        0usize..40,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..4),
    );
    prop::collection::vec(svc, 1..8).prop_map(|services| {
        let mut state = ProxyState::default();
        for (i, (p, proto, n, sticky, local, ranges)) in services.into_iter().enumerate() {
            let proto = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][proto];
            let cluster_ip = format!("10.96.1.{i}");
            let mut svc = port("default", &format!("s{i}"), &[&cluster_ip], p, proto);
            svc.node_port = Some(30000 + i as u16);
            svc.load_balancer_ips = vec![ip(&format!("192.168.7.{i}"))];
            svc.load_balancer_source_ranges = ranges
                .into_iter()
                .map(|(a, len)| {
                    ipnet::Ipv4Net::new(a.into(), len)
                        .map(|n| ipnet::IpNet::V4(n.trunc()))
                        .unwrap()
                })
                .collect();
            svc.session_affinity_timeout = sticky.then_some(100 + i as u32);
            if local {
                svc.external_traffic_policy = TrafficPolicy::Local;
            }
            let eps: Vec<String> = (0..n).map(|k| format!("10.244.{i}.{k}")).collect();
            let eps: Vec<(&str, u16)> = eps.iter().map(|a| (a.as_str(), 8080)).collect();
            add(&mut state, svc, &eps);
        }
        state
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_plans_encode_to_batches_the_kernel_takes(
        state in arb_state(),
        config in 0usize..4,
    ) {
        if !testkit::root_or_skip("random_plans_encode_to_batches_the_kernel_takes") {
            return Ok(());
        }
        let config = configs()[config].clone();
        let ns = testkit::Netns::new().unwrap();
        let result = ns
            .run(move || {
                let mut proxier = NftablesProxier::new(config, NftCommand::default());
                proxier.sync(&full(state)).map(|_| ()).map_err(|e| e.to_string())
            })
            .unwrap();
        prop_assert!(result.is_ok(), "{:?}", result);
    }
}

/// Issue #17: a large batch the kernel refuses in many of its messages. Each refused
/// message comes back as an error that quotes it; at a few thousand elements those replies
/// overflow a socket's default receive buffer (`ENOBUFS`), and the reason the kernel gave
/// is lost. The sync must report the kernel's own reason, change nothing (the transaction
/// is all or nothing), keep the socket usable, and the next sync must repair.
#[test]
fn a_large_refused_batch_reports_the_kernels_reason_and_the_next_sync_repairs() {
    if !testkit::root_or_skip("a_large_refused_batch_reports_the_kernels_reason") {
        return;
    }
    let services = testkit::synth::cluster(8_000, 1..=1);
    let state = testkit::synth::state(&services);
    let ns = testkit::Netns::new().unwrap();
    let mut proxier = NftablesProxier::new(configs()[0].clone(), NftCommand::default());
    ns.run(|| proxier.sync(&full(state.clone())).unwrap())
        .unwrap();
    // Behind the proxy's back: the endpoint slot map emptied.
    ns.exec(&["nft", "flush", "map", "ip", "kube-proxy", "slot-0"])
        .unwrap();
    let before = ns
        .exec(&["nft", "list", "map", "ip", "kube-proxy", "service-ips"])
        .unwrap();
    // Every Service goes: its slot-0 elements, which the kernel no longer has, cannot be
    // deleted, in each of the twenty messages that carry them.
    let changed: BTreeSet<ServiceName> = state.services.keys().map(|p| p.service.clone()).collect();
    let gone = SyncRequest {
        state: Arc::new(ProxyState::default()),
        changed,
        node_changed: false,
        full: false,
        periodic: false,
    };
    let err = ns
        .run(|| proxier.sync(&gone))
        .unwrap()
        .expect_err("deleting elements the kernel lacks must fail")
        .to_string();
    assert!(
        err.contains("No such file or directory") && !err.contains("No buffer space"),
        "{err}"
    );
    let after = ns
        .exec(&["nft", "list", "map", "ip", "kube-proxy", "service-ips"])
        .unwrap();
    assert_eq!(before, after, "a refused transaction changed the table");
    // The retry (full, as after any failure) goes through on the same runner.
    ns.run(|| proxier.sync(&full(ProxyState::default())).unwrap())
        .unwrap();
    let rules = ns
        .exec(&["nft", "list", "table", "ip", "kube-proxy"])
        .unwrap();
    assert!(!rules.contains("10.96.0.1 . tcp"), "Services left behind");
}
