//! Traffic policies and masquerading, checked the way upstream's proxier tests check them:
//! a packet (source, destination, port) is traced through the planned rules, and where it
//! ends up (its endpoints, or DROP / REJECT) and whether it is marked for masquerade are
//! compared with what upstream kube-proxy (iptables mode, v1.33–v1.35) does for the same
//! Services.
//!
//! Conventions (upstream's test fixtures): pods 10.0.0.0/8, node 192.168.0.2, outside
//! client 203.0.113.2, endpoints 10.180.0.x on this node and 10.180.1.x elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use backend_iptables::plan::{Chain, FamilyPlan, IptConfig, Table};
use ipnet::IpNet;
use proxy_core::model::{
    Endpoint, IpFamily, LocalDetector, Protocol, ProxyState, ServiceName, ServicePort,
    ServicePortName, TrafficPolicy,
};

const POD: &str = "10.0.0.2";
const NODE: &str = "192.168.0.2";
const LOCALHOST: &str = "127.0.0.1";
const OUTSIDE: &str = "203.0.113.2";
/// Outside `loadBalancerSourceRanges` 203.0.113.0/25.
const OUTSIDE_BLOCKED: &str = "203.0.113.130";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

/// One LoadBalancer Service port: `n` names it (`ns<n>/svc<n>`) and numbers its
/// addresses: cluster IP 172.30.0.4n, NodePort 300n, LB IP 1.2.3.n; endpoints
/// 10.180.0.n (this node, when `local_ep`) and 10.180.1.n (another node).
struct Svc {
    n: u8,
    internal: TrafficPolicy,
    external: TrafficPolicy,
    local_ep: bool,
    source_ranges: &'static [&'static str],
}

impl Svc {
    fn new(n: u8) -> Svc {
        Svc {
            n,
            internal: TrafficPolicy::Cluster,
            external: TrafficPolicy::Cluster,
            local_ep: true,
            source_ranges: &[],
        }
    }

    fn add_to(&self, state: &mut ProxyState) {
        let n = self.n;
        let name = ServicePortName {
            service: ServiceName::new(format!("ns{n}"), format!("svc{n}")),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        };
        let mut port = ServicePort::new(name.clone(), vec![ip(&format!("172.30.0.4{n}"))], 80);
        port.node_port = Some(3000 + u16::from(n));
        port.load_balancer_ips = vec![ip(&format!("1.2.3.{n}"))];
        port.load_balancer_source_ranges = self.source_ranges.iter().map(|r| net(r)).collect();
        port.internal_traffic_policy = self.internal;
        port.external_traffic_policy = self.external;
        if self.external == TrafficPolicy::Local {
            port.health_check_node_port = Some(30000 + u16::from(n));
        }
        let mut eps = vec![Endpoint::ready(ip(&format!("10.180.1.{n}")), 80)];
        if self.local_ep {
            eps.insert(
                0,
                Endpoint {
                    is_local: true,
                    ..Endpoint::ready(ip(&format!("10.180.0.{n}")), 80)
                },
            );
        }
        state.endpoints.insert(name.clone(), Arc::new(eps));
        state.services.insert(name, Arc::new(port));
    }
}

fn config(pod_cidr: bool, masquerade_all: bool) -> IptConfig {
    IptConfig {
        masquerade_all,
        local: if pod_cidr {
            LocalDetector::ClusterCidr(vec![net("10.0.0.0/8")])
        } else {
            LocalDetector::None
        },
        families: vec![IpFamily::V4],
        ..IptConfig::default()
    }
}

/// One match of a rule; `None` from [`Rule::matches`] means "maybe" (a random choice).
#[derive(Debug)]
enum Match {
    Src(bool, IpNet),
    Dst(bool, IpNet),
    /// `-i NAME`; `NAME+` is a prefix.
    InInterface(bool, String),
    Proto(String),
    Dport(u16),
    SrcLocal,
    DstLocal,
    Random,
    /// `-m recent --rcheck`: no affinity is remembered here, so never.
    Recent,
}

#[derive(Debug)]
struct Rule {
    matches: Vec<Match>,
    target: String,
    to: Option<String>,
}

/// Splits a rule into words; a double-quoted string is one word.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn host_net(s: &str) -> IpNet {
    s.parse()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .unwrap_or_else(|_| panic!("address {s}"))
}

/// Parses `-A CHAIN <matches> -j TARGET [...]` as the planner writes it.
fn parse(line: &str) -> (String, Rule) {
    let w = words(line);
    assert_eq!(w[0], "-A", "{line}");
    let mut rule = Rule {
        matches: Vec::new(),
        target: String::new(),
        to: None,
    };
    let mut negate = false;
    let mut i = 2;
    while i < w.len() {
        let arg = |k: usize| w.get(i + k).map(String::as_str).unwrap_or_default();
        let mut step = 2;
        match w[i].as_str() {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-s" => rule.matches.push(Match::Src(negate, host_net(arg(1)))),
            "-d" => rule.matches.push(Match::Dst(negate, host_net(arg(1)))),
            "-i" => rule
                .matches
                .push(Match::InInterface(negate, arg(1).to_string())),
            "-p" => rule.matches.push(Match::Proto(arg(1).to_string())),
            "--dport" => rule
                .matches
                .push(Match::Dport(arg(1).parse().expect("port"))),
            "--src-type" => rule.matches.push(Match::SrcLocal),
            "--dst-type" => rule.matches.push(Match::DstLocal),
            "--probability" => rule.matches.push(Match::Random),
            "--rcheck" => {
                rule.matches.push(Match::Recent);
                step = 1;
            }
            "-j" => rule.target = arg(1).to_string(),
            "--to-destination" => rule.to = Some(arg(1).to_string()),
            // Modules, comments, affinity bookkeeping: nothing to decide on.
            "-m" | "--comment" | "--mode" | "--name" | "--seconds" => {}
            "--reap" | "--set" => step = 1,
            other => panic!("tracer does not know {other:?} in {line}"),
        }
        negate = false;
        i += step;
    }
    (w[1].clone(), rule)
}

struct Packet {
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    /// Where it came in; empty when the node sent it.
    in_interface: String,
}

/// The node's addresses, for `-m addrtype --*-type LOCAL`.
fn is_local(a: IpAddr) -> bool {
    a == ip(NODE) || net("127.0.0.0/8").contains(&a)
}

impl Rule {
    fn matches(&self, p: &Packet) -> Option<bool> {
        let mut maybe = false;
        for m in &self.matches {
            let ok = match m {
                Match::Src(neg, n) => n.contains(&p.src) != *neg,
                Match::Dst(neg, n) => n.contains(&p.dst) != *neg,
                Match::InInterface(neg, name) => {
                    // The node's own packets have no input interface: no name matches.
                    let hit = !p.in_interface.is_empty()
                        && match name.strip_suffix('+') {
                            Some(prefix) => p.in_interface.starts_with(prefix),
                            None => p.in_interface == *name,
                        };
                    hit != *neg
                }
                Match::Proto(proto) => proto == "tcp",
                Match::Dport(port) => *port == p.dport,
                Match::SrcLocal => is_local(p.src),
                Match::DstLocal => is_local(p.dst),
                Match::Random => {
                    maybe = true;
                    true
                }
                Match::Recent => false,
            };
            if !ok {
                return Some(false);
            }
        }
        (!maybe).then_some(true)
    }
}

struct Tracer {
    chains: BTreeMap<(Table, String), Vec<Rule>>,
    /// The interface pods' packets come in on (outside clients': `eth0`).
    pod_interface: String,
}

/// Where one path through a chain ends: a verdict (DNAT target, DROP, REJECT) or back in
/// the calling chain (`None`), with the masquerade mark as it is then.
type Path = (Option<String>, bool);

impl Tracer {
    fn new(chains: Vec<Chain>) -> Tracer {
        let mut out: BTreeMap<(Table, String), Vec<Rule>> = BTreeMap::new();
        // The mark and postrouting chains are applied by the tracer itself.
        let fixed = [
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
            "KUBE-FORWARD",
            "KUBE-FIREWALL",
            "KUBE-PROXY-CANARY",
        ];
        for chain in chains
            .into_iter()
            .filter(|c| !fixed.contains(&c.name.as_str()))
        {
            let rules = out.entry((chain.table, chain.name.clone())).or_default();
            for line in &chain.rules {
                let (name, rule) = parse(line);
                assert_eq!(name, chain.name, "{line}");
                rules.push(rule);
            }
        }
        Tracer {
            chains: out,
            pod_interface: "cbr0".into(),
        }
    }

    fn run(&self, table: Table, chain: &str, p: &Packet, masq: bool) -> Vec<Path> {
        let rules = self
            .chains
            .get(&(table, chain.to_string()))
            .unwrap_or_else(|| panic!("jump to missing chain {chain}"));
        let mut ongoing = BTreeSet::from([masq]);
        let mut ended = Vec::new();
        for rule in rules {
            let mut next = BTreeSet::new();
            for &m in &ongoing {
                match rule.matches(p) {
                    Some(false) => {
                        next.insert(m);
                        continue;
                    }
                    Some(true) => {}
                    // A random choice: both ways.
                    None => {
                        next.insert(m);
                    }
                }
                match rule.target.as_str() {
                    "KUBE-MARK-MASQ" => {
                        next.insert(true);
                    }
                    "DNAT" => ended.push((rule.to.clone(), m)),
                    "DROP" | "REJECT" | "ACCEPT" => ended.push((Some(rule.target.clone()), m)),
                    "RETURN" => ended.push((None, m)),
                    sub => {
                        for (verdict, m2) in self.run(table, sub, p, m) {
                            match verdict {
                                Some(_) => ended.push((verdict, m2)),
                                None => {
                                    next.insert(m2);
                                }
                            }
                        }
                    }
                }
            }
            ongoing = next;
        }
        ended.extend(ongoing.into_iter().map(|m| (None, m)));
        ended
    }

    /// Upstream's packet-test answer: the endpoints reached ("ip:port, ip:port"), or the
    /// filter verdict for a packet left undNATed ("DROP", "REJECT", "" for none), and
    /// whether it was marked for masquerade.
    fn trace(&self, src: &str, dst: &str, dport: u16) -> (String, bool) {
        let src = ip(src);
        let in_interface = if net("10.0.0.0/8").contains(&src) {
            self.pod_interface.clone()
        } else if is_local(src) {
            String::new()
        } else {
            "eth0".into()
        };
        let p = Packet {
            src,
            dst: ip(dst),
            dport,
            in_interface,
        };
        let paths = self.run(Table::Nat, "KUBE-SERVICES", &p, false);
        let dnat: BTreeSet<&str> = paths.iter().filter_map(|(v, _)| v.as_deref()).collect();
        let masq: BTreeSet<bool> = paths.iter().map(|(_, m)| *m).collect();
        assert!(
            masq.len() == 1,
            "{src} -> {dst}:{dport}: paths disagree: {paths:?}"
        );
        let masq = masq.contains(&true);
        if !dnat.is_empty() {
            assert!(
                paths.iter().all(|(v, _)| v.is_some()),
                "{src} -> {dst}:{dport}: only some paths DNAT: {paths:?}"
            );
            return (dnat.into_iter().collect::<Vec<_>>().join(", "), masq);
        }
        // Not DNATed: the filter chains see the original destination.
        for chain in [
            "KUBE-PROXY-FIREWALL",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-SERVICES",
        ] {
            for (verdict, _) in self.run(Table::Filter, chain, &p, false) {
                if let Some(v) = verdict {
                    return (v, masq);
                }
            }
        }
        (String::new(), masq)
    }
}

fn tracer(state: &ProxyState, config: &IptConfig) -> Tracer {
    Tracer::new(FamilyPlan::full(IpFamily::V4, state, config).all_chains(config))
}

/// Upstream's three Services: policies Cluster, external Local, internal Local, each
/// with an endpoint here and one elsewhere.
fn upstream_state() -> ProxyState {
    let mut state = ProxyState::default();
    Svc::new(1).add_to(&mut state);
    Svc {
        external: TrafficPolicy::Local,
        ..Svc::new(2)
    }
    .add_to(&mut state);
    Svc {
        internal: TrafficPolicy::Local,
        ..Svc::new(3)
    }
    .add_to(&mut state);
    state
}

struct Flow {
    name: &'static str,
    src: &'static str,
    dst: String,
    dport: u16,
    output: &'static str,
    masq: bool,
}

/// A flow to Service `n`'s cluster IP, NodePort (on `via`) or LB IP.
fn flow(
    name: &'static str,
    src: &'static str,
    to: &str,
    n: u8,
    output: &'static str,
    masq: bool,
) -> Flow {
    let (dst, dport) = match to {
        "ClusterIP" => (format!("172.30.0.4{n}"), 80),
        "LB" => (format!("1.2.3.{n}"), 80),
        node_ip => (node_ip.to_string(), 3000 + u16::from(n)),
    };
    Flow {
        name,
        src,
        dst,
        dport,
        output,
        masq,
    }
}

/// The expectations of upstream's masquerade test for the normal case (pod CIDR known,
/// no --masquerade-all).
fn upstream_flows() -> Vec<Flow> {
    let both1 = "10.180.0.1:80, 10.180.1.1:80";
    let both2 = "10.180.0.2:80, 10.180.1.2:80";
    let both3 = "10.180.0.3:80, 10.180.1.3:80";
    vec![
        flow("pod to ClusterIP", POD, "ClusterIP", 1, both1, false),
        flow("pod to NodePort", POD, NODE, 1, both1, true),
        flow("pod to LB", POD, "LB", 1, both1, true),
        flow("node to ClusterIP", NODE, "ClusterIP", 1, both1, true),
        flow("node to NodePort", NODE, NODE, 1, both1, true),
        flow(
            "localhost to NodePort",
            LOCALHOST,
            LOCALHOST,
            1,
            both1,
            true,
        ),
        flow("node to LB", NODE, "LB", 1, both1, true),
        flow(
            "external to ClusterIP",
            OUTSIDE,
            "ClusterIP",
            1,
            both1,
            true,
        ),
        flow("external to NodePort", OUTSIDE, NODE, 1, both1, true),
        flow("external to LB", OUTSIDE, "LB", 1, both1, true),
        // externalTrafficPolicy: Local.
        flow("pod to ClusterIP, eTP", POD, "ClusterIP", 2, both2, false),
        flow("pod to NodePort, eTP", POD, NODE, 2, both2, false),
        flow("pod to LB, eTP", POD, "LB", 2, both2, false),
        flow("node to ClusterIP, eTP", NODE, "ClusterIP", 2, both2, true),
        flow("node to NodePort, eTP", NODE, NODE, 2, both2, true),
        flow(
            "localhost to NodePort, eTP",
            LOCALHOST,
            LOCALHOST,
            2,
            both2,
            true,
        ),
        flow("node to LB, eTP", NODE, "LB", 2, both2, true),
        flow(
            "external to ClusterIP, eTP",
            OUTSIDE,
            "ClusterIP",
            2,
            both2,
            true,
        ),
        flow(
            "external to NodePort, eTP",
            OUTSIDE,
            NODE,
            2,
            "10.180.0.2:80",
            false,
        ),
        flow(
            "external to LB, eTP",
            OUTSIDE,
            "LB",
            2,
            "10.180.0.2:80",
            false,
        ),
        // internalTrafficPolicy: Local: picks endpoints, not whether to masquerade.
        flow(
            "pod to ClusterIP, iTP",
            POD,
            "ClusterIP",
            3,
            "10.180.0.3:80",
            false,
        ),
        flow("pod to NodePort, iTP", POD, NODE, 3, both3, true),
        flow("pod to LB, iTP", POD, "LB", 3, both3, true),
        flow(
            "node to ClusterIP, iTP",
            NODE,
            "ClusterIP",
            3,
            "10.180.0.3:80",
            true,
        ),
        flow("node to NodePort, iTP", NODE, NODE, 3, both3, true),
        flow(
            "localhost to NodePort, iTP",
            LOCALHOST,
            LOCALHOST,
            3,
            both3,
            true,
        ),
        flow("node to LB, iTP", NODE, "LB", 3, both3, true),
        flow(
            "external to ClusterIP, iTP",
            OUTSIDE,
            "ClusterIP",
            3,
            "10.180.0.3:80",
            true,
        ),
        flow("external to NodePort, iTP", OUTSIDE, NODE, 3, both3, true),
        flow("external to LB, iTP", OUTSIDE, "LB", 3, both3, true),
    ]
}

fn check(tracer: &Tracer, flows: &[Flow], variant: &str) {
    let mut failures = Vec::new();
    for f in flows {
        let got = tracer.trace(f.src, &f.dst, f.dport);
        if got != (f.output.to_string(), f.masq) {
            failures.push(format!(
                "{variant}: {} ({} -> {}:{}): got {got:?}, want ({:?}, {})",
                f.name, f.src, f.dst, f.dport, f.output, f.masq
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Replaces the expectation of the named flows.
fn with(mut flows: Vec<Flow>, changes: &[(&str, Option<&'static str>, Option<bool>)]) -> Vec<Flow> {
    for (name, output, masq) in changes {
        let f = flows
            .iter_mut()
            .find(|f| f.name == *name)
            .unwrap_or_else(|| panic!("no flow {name}"));
        if let Some(o) = output {
            assert_ne!(f.output, *o, "{name}: same output as the base case");
            f.output = o;
        }
        if let Some(m) = masq {
            assert_ne!(f.masq, *m, "{name}: same masq as the base case");
            f.masq = *m;
        }
    }
    flows
}

#[test]
fn masquerading_matches_upstream() {
    check(
        &tracer(&upstream_state(), &config(true, false)),
        &upstream_flows(),
        "base",
    );
}

#[test]
fn masquerading_without_a_pod_cidr_matches_upstream() {
    // No way to tell pods: nothing to the cluster IP is masqueraded, and pods are not
    // short-circuited (so get only the local endpoint of an eTP:Local Service).
    let flows = with(
        upstream_flows(),
        &[
            ("node to ClusterIP", None, Some(false)),
            ("node to ClusterIP, eTP", None, Some(false)),
            ("node to ClusterIP, iTP", None, Some(false)),
            ("external to ClusterIP", None, Some(false)),
            ("external to ClusterIP, eTP", None, Some(false)),
            ("external to ClusterIP, iTP", None, Some(false)),
            ("pod to NodePort, eTP", Some("10.180.0.2:80"), None),
            ("pod to LB, eTP", Some("10.180.0.2:80"), None),
        ],
    );
    check(
        &tracer(&upstream_state(), &config(false, false)),
        &flows,
        "no pod CIDR",
    );
}

#[test]
fn masquerade_all_matches_upstream() {
    let all = [
        ("pod to ClusterIP", None, Some(true)),
        ("pod to ClusterIP, eTP", None, Some(true)),
        ("pod to ClusterIP, iTP", None, Some(true)),
    ];
    check(
        &tracer(&upstream_state(), &config(true, true)),
        &with(upstream_flows(), &all),
        "--masquerade-all",
    );
    let flows = with(
        upstream_flows(),
        &[
            all[0],
            all[1],
            all[2],
            ("pod to NodePort, eTP", Some("10.180.0.2:80"), None),
            ("pod to LB, eTP", Some("10.180.0.2:80"), None),
        ],
    );
    check(
        &tracer(&upstream_state(), &config(false, true)),
        &flows,
        "--masquerade-all, no pod CIDR",
    );
}

/// Services whose endpoints are all on other nodes.
fn remote_only_state() -> ProxyState {
    let mut state = ProxyState::default();
    // externalTrafficPolicy: Local.
    Svc {
        external: TrafficPolicy::Local,
        local_ep: false,
        ..Svc::new(4)
    }
    .add_to(&mut state);
    // internalTrafficPolicy: Local.
    Svc {
        internal: TrafficPolicy::Local,
        local_ep: false,
        ..Svc::new(5)
    }
    .add_to(&mut state);
    // Both Local, and loadBalancerSourceRanges.
    Svc {
        internal: TrafficPolicy::Local,
        external: TrafficPolicy::Local,
        local_ep: false,
        source_ranges: &["203.0.113.0/25"],
        ..Svc::new(6)
    }
    .add_to(&mut state);
    state
}

#[test]
fn no_local_endpoints_matches_upstream() {
    let ep4 = "10.180.1.4:80";
    let ep5 = "10.180.1.5:80";
    let ep6 = "10.180.1.6:80";
    let flows = vec![
        // eTP:Local: pods and the node still reach the Service by its external addresses
        // (short-circuited to all endpoints); outside clients are dropped.
        flow("pod to ClusterIP, eTP", POD, "ClusterIP", 4, ep4, false),
        flow("pod to NodePort, eTP", POD, NODE, 4, ep4, false),
        flow("pod to LB, eTP", POD, "LB", 4, ep4, false),
        flow("node to NodePort, eTP", NODE, NODE, 4, ep4, true),
        flow(
            "localhost to NodePort, eTP",
            LOCALHOST,
            LOCALHOST,
            4,
            ep4,
            true,
        ),
        flow("node to LB, eTP", NODE, "LB", 4, ep4, true),
        flow(
            "external to ClusterIP, eTP",
            OUTSIDE,
            "ClusterIP",
            4,
            ep4,
            true,
        ),
        flow("external to NodePort, eTP", OUTSIDE, NODE, 4, "DROP", false),
        flow("external to LB, eTP", OUTSIDE, "LB", 4, "DROP", false),
        // iTP:Local: the cluster IP drops everyone; external addresses work as usual.
        flow("pod to ClusterIP, iTP", POD, "ClusterIP", 5, "DROP", false),
        flow(
            "node to ClusterIP, iTP",
            NODE,
            "ClusterIP",
            5,
            "DROP",
            false,
        ),
        flow(
            "external to ClusterIP, iTP",
            OUTSIDE,
            "ClusterIP",
            5,
            "DROP",
            false,
        ),
        flow("pod to NodePort, iTP", POD, NODE, 5, ep5, true),
        flow("external to LB, iTP", OUTSIDE, "LB", 5, ep5, true),
        // Both Local: the short-circuit still goes to all endpoints; the LB IP admits
        // only listed sources, and those find no endpoint here.
        flow("pod to ClusterIP, both", POD, "ClusterIP", 6, "DROP", false),
        flow("pod to NodePort, both", POD, NODE, 6, ep6, false),
        flow("node to NodePort, both", NODE, NODE, 6, ep6, true),
        flow("pod to LB, both", POD, "LB", 6, "DROP", false),
        flow("external to LB, both", OUTSIDE, "LB", 6, "DROP", false),
        flow(
            "blocked to LB, both",
            OUTSIDE_BLOCKED,
            "LB",
            6,
            "DROP",
            false,
        ),
        flow(
            "external to NodePort, both",
            OUTSIDE,
            NODE,
            6,
            "DROP",
            false,
        ),
    ];
    check(
        &tracer(&remote_only_state(), &config(true, false)),
        &flows,
        "remote endpoints only",
    );
}

#[test]
fn no_local_endpoints_golden() {
    let config = config(true, false);
    let plan = FamilyPlan::full(IpFamily::V4, &remote_only_state(), &config);
    let text: Vec<String> = plan
        .all_chains(&config)
        .into_iter()
        .filter(|c| c.name.starts_with("KUBE-") && c.rules.iter().any(|r| r.contains("svc")))
        .flat_map(|c| {
            let mut lines = vec![format!("*{} :{}", c.table.name(), c.name)];
            lines.extend(c.rules);
            lines
        })
        .collect();
    insta::assert_snapshot!("no_local_endpoints", text.join("\n"));
}

#[test]
fn every_detect_local_mode_matches_upstream() {
    // Pods come in on cbr0 (a bridge) or veth* (one interface each); the node's pod CIDR
    // holds the pod. Each way of telling pods apart gives upstream's answers, and writes
    // the match upstream writes.
    let mut state = upstream_state();
    state.node.pod_cidrs = vec![net("10.0.0.0/24")];
    let modes = [
        (
            LocalDetector::ClusterCidr(vec![net("10.0.0.0/8")]),
            "cbr0",
            "-s 10.0.0.0/8",
        ),
        (LocalDetector::NodeCidr, "cbr0", "-s 10.0.0.0/24"),
        (
            LocalDetector::BridgeInterface("cbr0".into()),
            "cbr0",
            "-i cbr0",
        ),
        (
            LocalDetector::InterfaceNamePrefix("veth".into()),
            "veth12ab",
            "-i veth+",
        ),
    ];
    for (local, pod_interface, is_local) in modes {
        let config = IptConfig {
            local: local.clone(),
            ..config(false, false)
        };
        let chains = FamilyPlan::full(IpFamily::V4, &state, &config).all_chains(&config);
        let rules: Vec<&String> = chains.iter().flat_map(|c| c.rules.iter()).collect();
        let masq = format!(" ! {is_local} -m comment --comment \"ns1/svc1:p80 cluster IP\"");
        assert!(
            rules
                .iter()
                .any(|r| r.contains(&masq) && r.ends_with("-j KUBE-MARK-MASQ")),
            "{local:?}: no {masq:?}"
        );
        let pod = format!(" {is_local} -m comment --comment \"pod traffic for ns2/svc2:p80");
        assert!(
            rules.iter().any(|r| r.contains(&pod)),
            "{local:?}: no {pod:?}"
        );
        let mut tracer = Tracer::new(chains);
        tracer.pod_interface = pod_interface.into();
        check(&tracer, &upstream_flows(), &format!("{local:?}"));
    }
}
