use std::sync::Arc;

use super::*;
use crate::model::NodeInfo;
use crate::model::{ServiceName, ServicePortName};

const NODE_IP: &str = "192.168.0.10";

fn name(ns: &str, svc: &str, proto: Protocol) -> ServicePortName {
    ServicePortName {
        service: ServiceName::new(ns, svc),
        port: "http".into(),
        protocol: proto,
    }
}

fn ep(ip: &str, local: bool) -> Endpoint {
    let mut e = Endpoint::ready(ip.parse().unwrap(), 8080);
    e.is_local = local;
    e
}

/// `web` (10.96.0.10:80, NodePort 30080, LB 203.0.113.5 with source range
/// 198.51.100.0/24, eTP Local) with endpoints 10.244.1.2 (this node) and 10.244.2.2;
/// `empty` (10.96.0.20:80) without endpoints.
fn state() -> ProxyState {
    let mut s = ProxyState {
        node: NodeInfo {
            name: "n1".into(),
            addresses: vec![NODE_IP.parse().unwrap()],
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            ..Default::default()
        },
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let web = name("default", "web", Protocol::Tcp);
    let mut port = ServicePort::new(web.clone(), vec!["10.96.0.10".parse().unwrap()], 80);
    port.node_port = Some(30080);
    port.load_balancer_ips = vec!["203.0.113.5".parse().unwrap()];
    port.external_ips = vec!["203.0.113.9".parse().unwrap()];
    port.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    port.external_traffic_policy = TrafficPolicy::Local;
    s.services.insert(web.clone(), Arc::new(port));
    s.endpoints.insert(
        web,
        Arc::new(vec![ep("10.244.1.2", true), ep("10.244.2.2", false)]),
    );
    let empty = name("default", "empty", Protocol::Tcp);
    s.services.insert(
        empty.clone(),
        Arc::new(ServicePort::new(
            empty,
            vec!["10.96.0.20".parse().unwrap()],
            80,
        )),
    );
    s
}

fn settings(mode: Mode) -> Settings {
    Settings {
        local: LocalDetector::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()]),
        families: vec![IpFamily::V4],
        ..Settings::new(mode)
    }
}

fn ask(state: &ProxyState, mode: Mode, src: &str, dst: &str) -> Explanation {
    let q = Query::parse(src, dst, "tcp", None).unwrap();
    explain(state, &settings(mode), &q)
}

fn addresses(e: &Explanation) -> Vec<String> {
    e.endpoints.iter().map(|c| c.address.to_string()).collect()
}

#[test]
fn cluster_ip_from_outside_the_pods_is_masqueraded_in_kernel_modes() {
    for mode in [Mode::Nftables, Mode::Iptables] {
        let e = ask(&state(), mode, "192.168.0.99", "10.96.0.10:80");
        assert_eq!(e.outcome, Outcome::Forwarded, "{e}");
        assert_eq!(e.matched.as_ref().unwrap().kind, DestinationKind::ClusterIp);
        assert_eq!(addresses(&e), ["10.244.1.2:8080", "10.244.2.2:8080"]);
        assert!(e
            .endpoints
            .iter()
            .all(|c| (c.probability - 0.5).abs() < 1e-9));
        assert!(e.masquerade.as_ref().unwrap().masqueraded, "{e}");
        // From a pod: not masqueraded.
        let e = ask(&state(), mode, "10.244.1.7", "10.96.0.10:80");
        assert!(!e.masquerade.as_ref().unwrap().masqueraded, "{e}");
    }
}

#[test]
fn hairpin_and_masquerade_all() {
    let e = ask(&state(), Mode::Nftables, "10.244.1.2", "10.96.0.10:80");
    let hairpins: Vec<bool> = e.endpoints.iter().map(|c| c.hairpin).collect();
    assert_eq!(hairpins, [true, false]);
    assert!(e.to_string().contains("Hairpin"), "{e}");
    let mut s = settings(Mode::Nftables);
    s.masquerade_all = true;
    let q = Query::parse("10.244.1.7", "10.96.0.10:80", "tcp", None).unwrap();
    let e = explain(&state(), &s, &q);
    assert_eq!(e.masquerade.unwrap().reason, "--masquerade-all");
}

#[test]
fn no_detector_means_no_cluster_ip_masquerade() {
    let mut s = settings(Mode::Iptables);
    s.local = LocalDetector::None;
    let q = Query::parse("192.168.0.99", "10.96.0.10:80", "tcp", None).unwrap();
    assert!(!explain(&state(), &s, &q).masquerade.unwrap().masqueraded);
}

#[test]
fn interface_detection_needs_the_interface() {
    let mut s = settings(Mode::Nftables);
    s.local = LocalDetector::InterfaceNamePrefix("veth".into());
    let q = Query::parse("10.244.1.7", "10.96.0.10:80", "tcp", Some("veth12")).unwrap();
    assert!(!explain(&state(), &s, &q).masquerade.unwrap().masqueraded);
    let q = Query::parse("10.244.1.7", "10.96.0.10:80", "tcp", None).unwrap();
    let e = explain(&state(), &s, &q);
    assert!(e.masquerade.unwrap().masqueraded);
    assert!(
        e.steps.iter().any(|s| s.contains("no iif given")),
        "{:?}",
        e.steps
    );
}

#[test]
fn iptables_uses_the_first_cluster_cidr_only() {
    let two = LocalDetector::ClusterCidr(vec![
        "10.244.0.0/16".parse().unwrap(),
        "10.250.0.0/16".parse().unwrap(),
    ]);
    for (mode, masqueraded) in [(Mode::Iptables, true), (Mode::Nftables, false)] {
        let mut s = settings(mode);
        s.local = two.clone();
        let q = Query::parse("10.250.0.3", "10.96.0.10:80", "tcp", None).unwrap();
        let e = explain(&state(), &s, &q);
        assert_eq!(e.masquerade.unwrap().masqueraded, masqueraded, "{mode:?}");
    }
}

#[test]
fn external_local_from_outside_a_pod_and_the_node() {
    for mode in [Mode::Nftables, Mode::Iptables] {
        // Outside client to the NodePort: this node's endpoint, address kept.
        let e = ask(&state(), mode, "172.16.0.1", "192.168.0.10:30080");
        assert_eq!(
            e.matched.as_ref().unwrap().kind,
            DestinationKind::NodePort,
            "{e}"
        );
        assert_eq!(addresses(&e), ["10.244.1.2:8080"]);
        assert!(!e.masquerade.as_ref().unwrap().masqueraded);
        // A pod: short-circuited to every endpoint, not masqueraded.
        let e = ask(&state(), mode, "10.244.1.7", "192.168.0.10:30080");
        assert_eq!(addresses(&e).len(), 2);
        assert!(!e.masquerade.as_ref().unwrap().masqueraded);
        // The node: every endpoint, masqueraded.
        let e = ask(&state(), mode, NODE_IP, "203.0.113.9:80");
        assert_eq!(
            e.matched.as_ref().unwrap().kind,
            DestinationKind::ExternalIp
        );
        assert_eq!(addresses(&e).len(), 2);
        assert!(e.masquerade.as_ref().unwrap().masqueraded);
    }
}

#[test]
fn external_local_without_a_local_endpoint_drops_outside_clients() {
    let mut s = state();
    let web = name("default", "web", Protocol::Tcp);
    s.endpoints
        .insert(web, Arc::new(vec![ep("10.244.2.2", false)]));
    let e = ask(&s, Mode::Iptables, "172.16.0.1", "192.168.0.10:30080");
    assert_eq!(e.outcome, Outcome::Dropped, "{e}");
}

#[test]
fn source_ranges_drop_other_sources() {
    for mode in [Mode::Nftables, Mode::Iptables] {
        let e = ask(&state(), mode, "172.16.0.1", "203.0.113.5:80");
        assert_eq!(e.outcome, Outcome::Dropped, "{e}");
        assert!(e.reason.contains("loadBalancerSourceRanges"));
        let e = ask(&state(), mode, "198.51.100.7", "203.0.113.5:80");
        assert_eq!(e.outcome, Outcome::Forwarded, "{e}");
    }
    let e = ask(&state(), Mode::Ipvs, "172.16.0.1", "203.0.113.5:80");
    assert_eq!(e.outcome, Outcome::Forwarded, "{e}");
    assert!(e.to_string().contains("not enforced in ipvs mode"), "{e}");
}

#[test]
fn source_ranges_without_endpoints_differ_between_nftables_and_iptables() {
    let mut s = state();
    s.endpoints.clear();
    let nft = ask(&s, Mode::Nftables, "172.16.0.1", "203.0.113.5:80");
    assert_eq!(nft.outcome, Outcome::Dropped, "{nft}");
    let ipt = ask(&s, Mode::Iptables, "172.16.0.1", "203.0.113.5:80");
    assert_eq!(ipt.outcome, Outcome::Rejected, "{ipt}");
}

#[test]
fn no_endpoints_reject_and_unused_addresses() {
    for mode in [Mode::Nftables, Mode::Iptables, Mode::Userspace] {
        let e = ask(&state(), mode, "10.244.1.7", "10.96.0.20:80");
        assert_eq!(e.outcome, Outcome::Rejected, "{mode:?}: {e}");
    }
    // An unused port of a cluster IP, and an unallocated Service address.
    let e = ask(&state(), Mode::Nftables, "10.244.1.7", "10.96.0.10:81");
    assert_eq!(e.outcome, Outcome::Rejected, "{e}");
    let e = ask(&state(), Mode::Nftables, "10.244.1.7", "10.96.0.99:80");
    assert_eq!(e.outcome, Outcome::Dropped, "{e}");
    let e = ask(&state(), Mode::Iptables, "10.244.1.7", "10.96.0.10:81");
    assert_eq!(e.outcome, Outcome::Untouched, "{e}");
    let e = ask(&state(), Mode::Nftables, "10.244.1.7", "8.8.8.8:53");
    assert_eq!(e.outcome, Outcome::Untouched, "{e}");
}

#[test]
fn terminating_fallback_and_local_internal_policy_come_from_select() {
    let mut s = state();
    let web = name("default", "web", Protocol::Tcp);
    let mut t = ep("10.244.2.3", false);
    t.ready = false;
    t.terminating = true;
    s.endpoints.insert(web.clone(), Arc::new(vec![t]));
    let e = ask(&s, Mode::Nftables, "10.244.1.7", "10.96.0.10:80");
    assert_eq!(addresses(&e), ["10.244.2.3:8080"]);
    assert!(e.endpoints[0].terminating);
    // internalTrafficPolicy Local with no endpoint here: dropped.
    let mut port = (*s.services[&web]).clone();
    port.internal_traffic_policy = TrafficPolicy::Local;
    s.services.insert(web, Arc::new(port));
    let e = ask(&s, Mode::Nftables, "10.244.1.7", "10.96.0.10:80");
    assert_eq!(e.outcome, Outcome::Dropped, "{e}");
}

#[test]
fn nodeport_addresses_and_loopback() {
    let mut s = settings(Mode::Nftables);
    s.nodeport_primary = true;
    let other = Query::parse("172.16.0.1", "192.168.7.7:30080", "tcp", None).unwrap();
    let mut st = state();
    st.node.addresses.push("192.168.7.7".parse().unwrap());
    let e = explain(&st, &s, &other);
    assert_eq!(e.outcome, Outcome::Untouched, "{e}");
    assert!(e.to_string().contains("--nodeport-addresses"), "{e}");
    let lo = Query::parse("127.0.0.1", "127.0.0.1:30080", "tcp", None).unwrap();
    assert_eq!(explain(&st, &s, &lo).outcome, Outcome::Untouched);
    s.localhost_nodeports = vec![IpFamily::V4];
    let e = explain(&st, &s, &lo);
    assert_eq!(e.outcome, Outcome::Forwarded, "{e}");
    assert!(e.masquerade.unwrap().masqueraded);
    // iptables serves 127.0.0.1 itself (route_localnet).
    let e = explain(&st, &settings(Mode::Iptables), &lo);
    assert_eq!(e.outcome, Outcome::Forwarded, "{e}");
}

#[test]
fn affinity_and_mode_notes() {
    let mut s = state();
    let web = name("default", "web", Protocol::Tcp);
    let mut port = (*s.services[&web]).clone();
    port.session_affinity_timeout = Some(10800);
    s.services.insert(web, Arc::new(port));
    let e = ask(&s, Mode::Iptables, "10.244.1.7", "10.96.0.10:80");
    assert_eq!(e.affinity_seconds, Some(10800));
    assert!(e.to_string().contains("10800 s"), "{e}");
    let e = ask(&s, Mode::Userspace, "10.244.1.7", "10.96.0.10:80");
    assert!(e.masquerade.unwrap().masqueraded);
    let e = ask(&s, Mode::Ipvs, "172.16.0.1", "192.168.0.10:30080");
    assert!(e.masquerade.as_ref().unwrap().masqueraded, "{e}");
}

#[test]
fn first_service_in_name_order_keeps_a_contested_destination() {
    let mut s = state();
    let a = name("aaa", "thief", Protocol::Tcp);
    s.services.insert(
        a.clone(),
        Arc::new(ServicePort::new(a, vec!["10.96.0.10".parse().unwrap()], 80)),
    );
    let e = ask(&s, Mode::Nftables, "10.244.1.7", "10.96.0.10:80");
    assert_eq!(e.matched.unwrap().namespace, "aaa");
}

#[test]
fn bad_queries_are_named() {
    assert!(matches!(
        Query::parse("nope", "10.0.0.1:80", "tcp", None),
        Err(QueryError::Src(_))
    ));
    assert!(matches!(
        Query::parse("10.0.0.2", "10.0.0.1", "tcp", None),
        Err(QueryError::Dst(_))
    ));
    assert!(matches!(
        Query::parse("10.0.0.2", "10.0.0.1:80", "icmp", None),
        Err(QueryError::Proto(_))
    ));
    assert!(matches!(
        Query::parse("10.0.0.2", "10.0.0.1:80", "tcp", Some("a/b")),
        Err(QueryError::Iif(_))
    ));
    assert!(matches!(
        Query::parse("::1", "10.0.0.1:80", "tcp", None),
        Err(QueryError::Families { .. })
    ));
    let q = Query::parse("[fd00::1]:4000", "[fd00::2]:80", "UDP", Some("eth0")).unwrap();
    assert_eq!((q.src_port, q.proto), (Some(4000), Protocol::Udp));
}

#[test]
fn hostile_names_are_quoted_in_text() {
    let mut s = state();
    let evil = ServicePortName {
        service: ServiceName::new("a\"b", "x\ny\u{1b}[31m"),
        port: "p\"".into(),
        protocol: Protocol::Udp,
    };
    s.services.insert(
        evil.clone(),
        Arc::new(ServicePort::new(
            evil,
            vec!["10.96.0.30".parse().unwrap()],
            53,
        )),
    );
    let q = Query::parse("10.244.1.7", "10.96.0.30:53", "udp", None).unwrap();
    let text = explain(&s, &settings(Mode::Nftables), &q).to_string();
    assert!(text.contains(r#""a\"b/x\ny\u{1b}[31m""#), "{text}");
    assert_eq!(text.lines().count(), 4, "{text}");
}

#[test]
fn unprogrammed_family_is_untouched() {
    let q = Query::parse("fd00::1", "[fd00::10]:80", "tcp", None).unwrap();
    assert_eq!(
        explain(&state(), &settings(Mode::Nftables), &q).outcome,
        Outcome::Untouched
    );
}
