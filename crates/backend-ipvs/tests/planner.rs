//! Planner tests: no root, no IPVS kernel. Netlink messages against golden bytes, the
//! diff (incremental, draining, reconcile) against a recording host, nft rules as text.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use backend_ipvs::apply::RecordingHost;
use backend_ipvs::netlink;
use backend_ipvs::plan::{self, IpvsConfig, Op, RealServer, ServiceSpec, VirtualServer};
use backend_ipvs::IpvsProxier;
use proxy_core::model::{
    Endpoint, IpFamily, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName,
};
use proxy_core::proxier::{Proxier, SyncRequest};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(ns: &str, name: &str, cluster_ip: &str, port: u16, proto: Protocol) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new(ns, name),
        port: "".into(),
        protocol: proto,
    };
    ServicePort::new(name, vec![ip(cluster_ip)], port)
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint::ready(ip(addr), port)
}

fn add(state: &mut ProxyState, svc: ServicePort, eps: Vec<Endpoint>) {
    state.endpoints.insert(svc.name.clone(), Arc::new(eps));
    state.services.insert(svc.name.clone(), Arc::new(svc));
}

fn vs(addr: &str, protocol: Protocol, port: u16) -> VirtualServer {
    VirtualServer {
        addr: ip(addr),
        protocol,
        port,
    }
}

fn rs(addr: &str, port: u16) -> RealServer {
    RealServer {
        addr: ip(addr),
        port,
    }
}

fn config() -> IpvsConfig {
    IpvsConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        families: vec![IpFamily::V4],
        ..IpvsConfig::default()
    }
}

fn sample_state() -> ProxyState {
    let mut state = ProxyState::default();
    let mut web = port("default", "web", "10.96.0.10", 80, Protocol::Tcp);
    web.node_port = Some(30080);
    add(
        &mut state,
        web,
        vec![ep("10.244.1.2", 8080), ep("10.244.2.2", 8080)],
    );
    add(
        &mut state,
        port("kube-system", "dns", "10.96.0.53", 53, Protocol::Udp),
        vec![ep("10.244.1.2", 5353)],
    );
    state
}

fn request(state: &ProxyState, changed: &[&str], full: bool) -> SyncRequest {
    SyncRequest {
        state: Arc::new(state.clone()),
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

fn proxier() -> IpvsProxier<RecordingHost> {
    let host = RecordingHost {
        local: vec![ip("192.168.100.1"), ip("127.0.0.1")],
        ..RecordingHost::default()
    };
    IpvsProxier::with_host(config(), host)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn web_spec() -> ServiceSpec {
    ServiceSpec {
        vs: vs("10.96.0.10", Protocol::Tcp, 80),
        scheduler: "rr".into(),
        persistence_timeout: None,
    }
}

#[cfg(target_endian = "little")]
#[test]
fn new_service_message_golden_bytes() {
    let msg = netlink::service(0x24, 7, &web_spec(), false);
    let expected = [
        // nlmsghdr: length 104, family 0x24, flags REQUEST|ACK, seq 7, port id 0
        "68 00 00 00 24 00 05 00 07 00 00 00 00 00 00 00",
        // genlmsghdr: IPVS_CMD_NEW_SERVICE, version 1
        "01 01 00 00",
        // IPVS_CMD_ATTR_SERVICE (nested), length 84
        "54 00 01 80",
        "06 00 01 00 02 00 00 00", // AF_INET
        "06 00 02 00 06 00 00 00", // TCP
        "14 00 03 00 0a 60 00 0a 00 00 00 00 00 00 00 00 00 00 00 00", // 10.96.0.10
        "06 00 04 00 00 50 00 00", // port 80, big endian
        "07 00 06 00 72 72 00 00", // "rr\0"
        "0c 00 07 00 00 00 00 00 ff ff ff ff", // flags 0, mask all
        "08 00 08 00 00 00 00 00", // timeout 0
        "08 00 09 00 ff ff ff ff", // netmask /32
    ]
    .join(" ");
    assert_eq!(hex(&msg), expected);
}

#[cfg(target_endian = "little")]
#[test]
fn dest_messages_golden_bytes() {
    let msg = netlink::dest(
        0x24,
        9,
        &vs("10.96.0.10", Protocol::Tcp, 80),
        &rs("10.244.1.2", 8080),
        0,
        true,
    );
    let expected = [
        "8c 00 00 00 24 00 05 00 09 00 00 00 00 00 00 00",
        "06 01 00 00", // IPVS_CMD_SET_DEST
        // the service key
        "30 00 01 80",
        "06 00 01 00 02 00 00 00",
        "06 00 02 00 06 00 00 00",
        "14 00 03 00 0a 60 00 0a 00 00 00 00 00 00 00 00 00 00 00 00",
        "06 00 04 00 00 50 00 00",
        // IPVS_CMD_ATTR_DEST (nested)
        "48 00 02 80",
        "14 00 01 00 0a f4 01 02 00 00 00 00 00 00 00 00 00 00 00 00", // 10.244.1.2
        "06 00 02 00 1f 90 00 00",                                     // port 8080
        "08 00 03 00 00 00 00 00",                                     // masquerading
        "08 00 04 00 00 00 00 00",                                     // weight 0
        "08 00 05 00 00 00 00 00",                                     // upper threshold
        "08 00 06 00 00 00 00 00",                                     // lower threshold
        "06 00 0b 00 02 00 00 00",                                     // AF_INET
    ]
    .join(" ");
    assert_eq!(hex(&msg), expected);

    let del = netlink::del_dest(
        0x24,
        10,
        &vs("10.96.0.10", Protocol::Tcp, 80),
        &rs("10.244.1.2", 8080),
    );
    // Header, service key, then only address, port and family of the destination.
    assert_eq!(del.len(), 16 + 4 + 48 + 4 + 20 + 8 + 8);
    assert_eq!(del[16], 7, "IPVS_CMD_DEL_DEST");

    let family = netlink::get_family(1);
    assert_eq!(
        hex(&family),
        "20 00 00 00 10 00 05 00 01 00 00 00 00 00 00 00 03 01 00 00 09 00 02 00 49 50 56 53 00 00 00 00"
    );
}

#[test]
fn service_replies_decode() {
    // A dump reply carries the same nested attributes as the request that made it.
    let mut spec = web_spec();
    spec.persistence_timeout = Some(10800);
    spec.scheduler = "sh".into();
    let msg = netlink::service(0x24, 1, &spec, false);
    let parts = netlink::split(&msg).unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(
        netlink::parse_service(parts[0].payload).unwrap(),
        Some(spec)
    );

    let v6 = ServiceSpec {
        vs: vs("fd00:96::10", Protocol::Sctp, 443),
        scheduler: "rr".into(),
        persistence_timeout: None,
    };
    let msg = netlink::service(0x24, 1, &v6, true);
    let parts = netlink::split(&msg).unwrap();
    assert_eq!(netlink::parse_service(parts[0].payload).unwrap(), Some(v6));

    let msg = netlink::dest(0x24, 2, &web_spec().vs, &rs("10.244.1.2", 8080), 1, false);
    let parts = netlink::split(&msg).unwrap();
    let state = netlink::parse_dest(parts[0].payload, false).unwrap();
    assert_eq!(state.rs, rs("10.244.1.2", 8080));
    assert_eq!((state.weight, state.active, state.inactive), (1, 0, 0));

    // Garbage never panics.
    assert!(netlink::split(&[0xff; 7]).unwrap().is_empty());
    assert!(netlink::split(&[0xff; 20]).is_err());
    assert!(netlink::parse_service(&[1, 2]).is_err());
}

#[test]
fn full_sync_programs_cluster_ips_and_node_ports() {
    let mut p = proxier();
    let outcome = p.sync(&request(&sample_state(), &[], true)).unwrap();
    assert!(outcome.full);
    let host = p.host();
    assert!(host.dummy);
    assert_eq!(
        host.bound,
        [ip("10.96.0.10"), ip("10.96.0.53")].into_iter().collect()
    );
    let keys: Vec<VirtualServer> = host.services.keys().copied().collect();
    assert_eq!(
        keys,
        vec![
            vs("10.96.0.10", Protocol::Tcp, 80),
            vs("10.96.0.53", Protocol::Udp, 53),
            // NodePort on the node's address, not on loopback.
            vs("192.168.100.1", Protocol::Tcp, 30080),
        ]
    );
    let web = &host.services[&vs("10.96.0.10", Protocol::Tcp, 80)];
    assert_eq!(web.spec.scheduler, "rr");
    assert_eq!(
        web.dests.keys().copied().collect::<Vec<_>>(),
        vec![rs("10.244.1.2", 8080), rs("10.244.2.2", 8080)]
    );
    assert!(host
        .sysctls
        .contains(&("net/ipv4/vs/conntrack".into(), "1".into())));
    assert_eq!(host.scripts.len(), 1, "one family");
    assert_eq!(host.dumps, 1);
}

#[test]
fn endpoint_removal_drains_then_deletes_touching_only_that_service() {
    let mut p = proxier();
    let mut state = sample_state();
    p.sync(&request(&state, &[], true)).unwrap();
    p.host_mut().ops.clear();

    let web = state
        .services
        .keys()
        .find(|k| &*k.service.name == "web")
        .cloned();
    let web = web.unwrap();
    state
        .endpoints
        .insert(web.clone(), Arc::new(vec![ep("10.244.1.2", 8080)]));
    p.sync(&request(&state, &["default/web"], false)).unwrap();
    let cip = vs("10.96.0.10", Protocol::Tcp, 80);
    let np = vs("192.168.100.1", Protocol::Tcp, 30080);
    assert_eq!(
        p.host().ops,
        vec![
            Op::SetWeight(cip, rs("10.244.2.2", 8080), 0),
            Op::SetWeight(np, rs("10.244.2.2", 8080), 0),
        ]
    );
    assert_eq!(p.host().dumps, 1, "a partial sync does not dump");

    // Still a connection on the cluster IP: only the NodePort's real server goes.
    p.host_mut()
        .services
        .get_mut(&cip)
        .unwrap()
        .dests
        .get_mut(&rs("10.244.2.2", 8080))
        .unwrap()
        .active = 1;
    p.host_mut().ops.clear();
    p.sync(&request(&state, &[], false)).unwrap();
    assert_eq!(p.host().ops, vec![Op::DelDest(np, rs("10.244.2.2", 8080))]);

    // Connection gone: deleted.
    p.host_mut()
        .services
        .get_mut(&cip)
        .unwrap()
        .dests
        .get_mut(&rs("10.244.2.2", 8080))
        .unwrap()
        .active = 0;
    p.host_mut().ops.clear();
    p.sync(&request(&state, &[], false)).unwrap();
    assert_eq!(p.host().ops, vec![Op::DelDest(cip, rs("10.244.2.2", 8080))]);

    // Back again before it drained: weight 1 rather than a new destination.
    p.host_mut().ops.clear();
    state.endpoints.insert(
        web,
        Arc::new(vec![ep("10.244.1.2", 8080), ep("10.244.3.3", 8080)]),
    );
    p.sync(&request(&state, &["default/web"], false)).unwrap();
    assert!(p
        .host()
        .ops
        .contains(&Op::AddDest(cip, rs("10.244.3.3", 8080))));
}

#[test]
fn affinity_and_scheduler_set_the_virtual_server() {
    let mut state = sample_state();
    let key = state
        .services
        .keys()
        .find(|k| &*k.service.name == "web")
        .cloned()
        .unwrap();
    let mut web = (*state.services[&key]).clone();
    web.session_affinity_timeout = Some(600);
    state.services.insert(key, Arc::new(web));
    let mut p = IpvsProxier::with_host(
        IpvsConfig {
            scheduler: "lc".into(),
            ..config()
        },
        RecordingHost::default(),
    );
    p.sync(&request(&state, &[], true)).unwrap();
    let spec = &p.host().services[&vs("10.96.0.10", Protocol::Tcp, 80)].spec;
    assert_eq!(spec.persistence_timeout, Some(600));
    assert_eq!(spec.scheduler, "lc");
    let dns = &p.host().services[&vs("10.96.0.53", Protocol::Udp, 53)].spec;
    assert_eq!(dns.persistence_timeout, None);
}

#[test]
fn full_sync_reconciles_with_the_kernel_and_leaves_foreign_servers() {
    let mut p = proxier();
    let state = sample_state();
    let foreign = ServiceSpec {
        vs: vs("172.16.0.1", Protocol::Tcp, 80),
        scheduler: "wrr".into(),
        persistence_timeout: None,
    };
    plan::apply_to(
        &mut p.host_mut().services,
        &[Op::AddService(foreign.clone())],
    );
    p.sync(&request(&state, &[], true)).unwrap();
    // Someone deletes a virtual server and a real server behind our back.
    let cip = vs("10.96.0.10", Protocol::Tcp, 80);
    p.host_mut()
        .services
        .remove(&vs("10.96.0.53", Protocol::Udp, 53));
    plan::apply_to(
        &mut p.host_mut().services,
        &[Op::DelDest(cip, rs("10.244.1.2", 8080))],
    );
    p.host_mut().ops.clear();
    p.sync(&request(&state, &[], false)).unwrap();
    assert!(p.host().ops.is_empty(), "a partial sync trusts its memory");
    p.sync(&request(&state, &[], true)).unwrap();
    assert_eq!(
        p.host().ops,
        vec![
            Op::AddDest(cip, rs("10.244.1.2", 8080)),
            Op::AddService(ServiceSpec {
                vs: vs("10.96.0.53", Protocol::Udp, 53),
                scheduler: "rr".into(),
                persistence_timeout: None
            }),
            Op::AddDest(vs("10.96.0.53", Protocol::Udp, 53), rs("10.244.1.2", 5353)),
        ]
    );
    assert!(p.host().services.contains_key(&foreign.vs));

    // A deleted Service takes its virtual servers and its address with it.
    let mut smaller = state.clone();
    smaller.services.retain(|k, _| &*k.service.name != "dns");
    p.host_mut().ops.clear();
    p.sync(&request(&smaller, &["kube-system/dns"], false))
        .unwrap();
    assert_eq!(
        p.host().ops,
        vec![Op::DelService(vs("10.96.0.53", Protocol::Udp, 53))]
    );
    assert!(!p.host().bound.contains(&ip("10.96.0.53")));
}

#[test]
fn cleanup_removes_everything() {
    let mut p = proxier();
    p.sync(&request(&sample_state(), &[], true)).unwrap();
    p.cleanup().unwrap();
    assert!(!p.host().dummy);
    assert!(p.host().services.is_empty());
    assert!(p.host().bound.is_empty());
    let last = p.host().scripts.last().unwrap();
    assert!(last.contains("delete table ip kube-proxy-ipvs"));
    assert!(last.contains("delete table ip6 kube-proxy-ipvs"));

    // Without kube-ipvs0 (this mode never ran), IPVS is left alone.
    let mut other = proxier();
    plan::apply_to(
        &mut other.host_mut().services,
        &[Op::AddService(web_spec())],
    );
    other.cleanup().unwrap();
    assert_eq!(other.host().services.len(), 1);
}

#[test]
fn nft_table_golden() {
    let state = sample_state();
    let plan = plan::plan(&config(), &state, &[ip("192.168.100.1")]);
    let script = plan::render_nft(&config(), &plan, IpFamily::V4);
    let expected = "\
add table ip kube-proxy-ipvs
delete table ip kube-proxy-ipvs
add table ip kube-proxy-ipvs
add set ip kube-proxy-ipvs cluster-ips { type ipv4_addr . inet_proto . inet_service; }
add element ip kube-proxy-ipvs cluster-ips { 10.96.0.10 . tcp . 80, 10.96.0.53 . udp . 53 }
add set ip kube-proxy-ipvs node-ports { type inet_proto . inet_service; }
add element ip kube-proxy-ipvs node-ports { tcp . 30080 }
add chain ip kube-proxy-ipvs prerouting { type nat hook prerouting priority -100; policy accept; }
add rule ip kube-proxy-ipvs prerouting ip daddr . meta l4proto . th dport @cluster-ips ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x4000
add rule ip kube-proxy-ipvs prerouting fib daddr type local meta l4proto . th dport @node-ports meta mark set meta mark | 0x4000
add chain ip kube-proxy-ipvs output { type nat hook output priority -100; policy accept; }
add rule ip kube-proxy-ipvs output ip daddr . meta l4proto . th dport @cluster-ips ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x4000
add rule ip kube-proxy-ipvs output fib daddr type local meta l4proto . th dport @node-ports meta mark set meta mark | 0x4000
add chain ip kube-proxy-ipvs postrouting { type nat hook postrouting priority 100; policy accept; }
add rule ip kube-proxy-ipvs postrouting meta mark & 0x4000 == 0x4000 masquerade
";
    assert_eq!(script, expected);
}

/// The masquerade table as the kernel takes it: `nft --check` accepts its text, and
/// loaded by our netlink batch (in a namespace) it lists as `nft -f` of that text does.
#[test]
fn kernel_accepts_generated_nft_table() {
    if !testkit::root_or_skip("kernel_accepts_generated_nft_table") {
        return;
    }
    use backend_nftables::apply::{NftCommand, NftRunner};
    let state = sample_state();
    let plan = plan::plan(&config(), &state, &[ip("192.168.100.1")]);
    let mut checker = NftCommand::check_only();
    for family in [IpFamily::V4, IpFamily::V6] {
        let script = plan::render_nft(&config(), &plan, family);
        checker
            .run(&script)
            .unwrap_or_else(|e| panic!("{e}\n{script}"));
    }
    checker.run(&plan::render_nft_cleanup()).unwrap();

    let listing = |ns: &testkit::Netns| -> String {
        ["ip", "ip6"]
            .iter()
            .map(|f| ns.exec(&["nft", "list", "table", f, plan::TABLE]).unwrap())
            .collect()
    };
    // `nft` started from a thread in the namespace runs in it.
    let by_nft = testkit::Netns::new().unwrap();
    let script: String = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .map(|family| plan::render_nft(&config(), &plan, family))
        .collect();
    by_nft
        .run(|| NftCommand::default().run(&script))
        .unwrap()
        .unwrap();
    let by_us = testkit::Netns::new().unwrap();
    by_us
        .run(|| {
            let mut runner = NftCommand::default();
            for family in [IpFamily::V4, IpFamily::V6] {
                let ops = plan::nft_ops(&config(), &plan, family);
                runner.apply_in(plan::TABLE, &ops).unwrap();
            }
        })
        .unwrap();
    let want = listing(&by_nft);
    assert!(want.contains("tcp . 30080"), "{want}");
    assert_eq!(listing(&by_us), want);
    by_us
        .run(|| {
            let mut runner = NftCommand::default();
            runner
                .apply_in(plan::TABLE, &plan::nft_cleanup_ops())
                .unwrap();
        })
        .unwrap();
    let tables = by_us.exec(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains(plan::TABLE), "{tables}");
}

#[cfg(target_endian = "little")]
#[test]
fn set_config_message_golden_bytes() {
    let msg = netlink::set_timeouts(
        0x24,
        3,
        &plan::Timeouts {
            tcp: 900,
            tcp_fin: 0,
            udp: 60,
        },
    );
    let expected = [
        "2c 00 00 00 24 00 05 00 03 00 00 00 00 00 00 00",
        "0c 01 00 00",             // IPVS_CMD_SET_CONFIG
        "08 00 04 00 84 03 00 00", // TCP 900 s
        "08 00 05 00 00 00 00 00", // TCP FIN: unchanged
        "08 00 06 00 3c 00 00 00", // UDP 60 s
    ]
    .join(" ");
    assert_eq!(hex(&msg), expected);
}

#[test]
fn timeouts_are_set_and_excluded_cidrs_survive_reconcile() {
    let timeouts = plan::Timeouts {
        tcp: 900,
        tcp_fin: 0,
        udp: 60,
    };
    let stale = ServiceSpec {
        vs: vs("192.168.100.1", Protocol::Tcp, 31000),
        scheduler: "rr".into(),
        persistence_timeout: None,
    };
    let run = |exclude: Vec<ipnet::IpNet>| {
        let host = RecordingHost {
            local: vec![ip("192.168.100.1")],
            ..RecordingHost::default()
        };
        let mut p = IpvsProxier::with_host(
            IpvsConfig {
                timeouts,
                exclude_cidrs: exclude,
                ..config()
            },
            host,
        );
        plan::apply_to(&mut p.host_mut().services, &[Op::AddService(stale.clone())]);
        p.sync(&request(&sample_state(), &[], true)).unwrap();
        p
    };
    let p = run(vec![]);
    assert_eq!(p.host().timeouts, Some(timeouts));
    assert!(p.host().ops.contains(&Op::DelService(stale.vs)));
    let p = run(vec!["192.168.100.0/24".parse().unwrap()]);
    assert!(!p.host().ops.contains(&Op::DelService(stale.vs)));
    assert!(p.host().services.contains_key(&stale.vs));
}
