//! End to end, as root: the real binary in a network namespace programs the kernel from
//! a manifests directory, and real TCP and UDP packets from other namespaces reach the
//! backends through Service IPs.
//!
//! One suite for every mode: each behaviour is a function taking the mode, and
//! `datapath_suite!` instantiates all of them per mode, so a new mode gets the whole suite
//! by adding one line at the bottom.
//!
//! Topology (testkit): client 192.168.100.2 → node 192.168.100.1 → backends be0
//! (10.244.1.2) and be1 (10.244.2.2), all serving port 8080 with their own name.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::manifests::{render, PortSpec, ServiceSpec};
use testkit::{
    spread, Netns, Proto, ProxyProcess, RequestError, ServeMode, ServerGuard, Tools, Topology,
};

const BACKEND_PORT: u16 = 8080;
/// Backends also answer here with their name and the client address they saw.
const PEER_PORT: u16 = 9090;
const TIMEOUT: Duration = Duration::from_secs(2);
const SYNCED: &str = "synced rules";

/// A proxy mode, as `--proxy-mode` spells it.
#[derive(Debug, Clone, Copy)]
struct Mode(&'static str);

impl Mode {
    const ALL: [Mode; 3] = [Mode("nftables"), Mode("iptables"), Mode("userspace")];

    /// Whether this mode's rules are present in `node`'s kernel.
    fn rules_present(self, node: &Netns) -> bool {
        match self.0 {
            "nftables" => node
                .exec(&["nft", "list", "tables"])
                .expect("nft list tables")
                .lines()
                .any(|l| l.trim() == "table ip kube-proxy" || l.trim() == "table ip6 kube-proxy"),
            "userspace" => node
                .exec(&["nft", "list", "tables"])
                .expect("nft list tables")
                .contains("kube-proxy-userspace"),
            // Either iptables backend, either family.
            "iptables" => [":KUBE-SERVICES ", ":KUBE-PROXY-CANARY ", ":KUBE-SEP-"]
                .iter()
                .any(|chain| iptables_dump(node).contains(chain)),
            other => panic!("no rule check for mode {other}"),
        }
    }

    /// Behaviours a mode does not implement; the suite skips them loudly for that mode
    /// rather than copying or weakening a test.
    fn skips(self, behaviour: &str) -> bool {
        let skipped: &[&str] = match self.0 {
            // The proxy process itself connects to the endpoint: a client's address is
            // never kept, so there is no masquerade decision and no Local policy to
            // honour; source ranges are not implemented in this mode.
            "userspace" => &[
                // UDP sessions live in the proxy process and end with it.
                "restart_keeps_udp_flows_on_their_endpoint",
                "external_traffic_policy_local",
                "internal_traffic_policy_local",
                "load_balancer_source_ranges",
                "masquerade_follows_detect_local_mode",
                "service_ip_checks",
                "internal_traffic_policy_local_masquerades_like_cluster",
                "external_traffic_policy_local_short_circuits_pods_and_node",
                "detect_local_mode_decides_who_is_a_pod",
                // The proxy process holds the UDP sessions; conntrack only redirects to it.
                "udp_stale_flows_reconciled_like_upstream",
            ],
            // Upstream's iptables mode has no rule for Service IPs without a Service
            // port: such packets are routed on, untranslated. Kernel modes keep a UDP
            // flow when its Service scales to zero, as upstream's conntrack reconciler:
            // udp_stale_flows_reconciled_like_upstream covers them.
            "iptables" => &["service_ip_checks", "udp_client_follows_replaced_endpoint"],
            "nftables" => &["udp_client_follows_replaced_endpoint"],
            _ => &[],
        };
        let skip = skipped.contains(&behaviour);
        if skip {
            eprintln!("SKIPPED: {behaviour} does not apply to {} mode", self.0);
        }
        skip
    }

    /// Whether the rules outlive the proxy process. Userspace mode removes its redirects
    /// on exit: they point at listeners that die with the process.
    fn keeps_rules_on_exit(self) -> bool {
        self.0 != "userspace"
    }

    /// Every other mode.
    fn others(self) -> impl Iterator<Item = Mode> {
        Mode::ALL.into_iter().filter(move |m| m.0 != self.0)
    }
}

/// `iptables-save` of both backends and both families.
fn iptables_dump(node: &Netns) -> String {
    let mut out = String::new();
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        out.push_str(&node.exec(&[tool]).unwrap_or_default());
    }
    out
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn addr(ip_text: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_text), port)
}

/// A node running the proxy on a manifests directory, two backends and a client.
struct Cluster {
    topo: Topology,
    _servers: Vec<ServerGuard>,
    dir: tempfile::TempDir,
    proxy: ProxyProcess,
    syncs: usize,
}

impl Cluster {
    /// Stops the proxy with SIGTERM, as the kubelet does, and returns its exit status.
    fn stop_proxy(&mut self) -> std::process::ExitStatus {
        self.proxy.terminate().expect("terminate proxy")
    }
}

impl Cluster {
    /// Starts everything; `None` when the test must be skipped (not root, outside CI).
    fn start(mode: Mode, name: &str, manifests: &str, extra_args: &[&str]) -> Option<Cluster> {
        if !testkit::root_or_skip(name) {
            return None;
        }
        let topo = Topology::new(2).expect("topology");
        let mut servers = topo.serve_all(BACKEND_PORT).expect("backend servers");
        for backend in &topo.backends {
            let peer_server = backend
                .serve_with(PEER_PORT, &[Proto::Tcp, Proto::Udp], ServeMode::NameAndPeer)
                .expect("peer-reporting servers");
            servers.push(peer_server);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        write_manifests(dir.path(), manifests);
        let proxy = start_proxy(&topo, dir.path(), mode, extra_args);
        let mut cluster = Cluster {
            topo,
            _servers: servers,
            dir,
            proxy,
            syncs: 0,
        };
        cluster.wait_for_sync();
        Some(cluster)
    }

    fn wait_for_sync(&mut self) {
        self.syncs += 1;
        let ok = self
            .proxy
            .wait_for_log(SYNCED, self.syncs, Duration::from_secs(20));
        assert!(
            ok,
            "proxy did not sync (#{}); log:\n{}",
            self.syncs,
            self.proxy.log()
        );
    }

    /// Replaces the manifests and waits for the proxy to program them.
    fn update(&mut self, manifests: &str) {
        write_manifests(self.dir.path(), manifests);
        self.wait_for_sync();
    }

    fn client(&self) -> &Netns {
        &self.topo.client
    }

    /// Every rule of every mode in the node: `nft list ruleset` and the iptables dumps.
    fn ruleset(&self) -> String {
        let mut out = self
            .topo
            .node
            .exec(&["nft", "list", "ruleset"])
            .expect("nft list ruleset");
        out.push_str(&iptables_dump(&self.topo.node));
        out
    }

    /// Stops the proxy and starts it again in `mode` with `extra_args` and `tools`, on
    /// the same manifests.
    fn restart_proxy_with(&mut self, mode: Mode, extra_args: &[&str], tools: Tools) {
        let status = self.stop_proxy();
        assert!(status.success(), "proxy exit status {status}");
        self.proxy = start_proxy_with(&self.topo, self.dir.path(), mode, extra_args, tools);
        self.syncs = 0;
        self.wait_for_sync();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- proxy log ---\n{}\n--- ruleset ---\n{}",
                self.proxy.log(),
                self.ruleset()
            );
        }
    }
}

/// Starts the proxy in the node on `dir`'s manifests, logging to `dir`/proxy.log.
fn start_proxy(topo: &Topology, dir: &Path, mode: Mode, extra_args: &[&str]) -> ProxyProcess {
    start_proxy_with(topo, dir, mode, extra_args, Tools::Needed)
}

/// [`start_proxy`] with the given tools on the proxy's `PATH`.
fn start_proxy_with(
    topo: &Topology,
    dir: &Path,
    mode: Mode,
    extra_args: &[&str],
    tools: Tools,
) -> ProxyProcess {
    let mode_flag = format!("--proxy-mode={}", mode.0);
    let manifests_dir = dir.join("manifests");
    let mut args = vec![
        mode_flag.as_str(),
        "--manifests",
        manifests_dir.to_str().expect("utf-8 path"),
        "--hostname-override=node-a",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/48",
        "--iptables-min-sync-period=0s",
    ];
    if !extra_args.iter().any(|a| a.starts_with("--v=")) {
        args.push("--v=2");
    }
    args.extend_from_slice(extra_args);
    ProxyProcess::start_with(&topo.node, &binary(), &args, &dir.join("proxy.log"), tools)
        .expect("start proxy")
}

/// Writes atomically (write then rename) so the proxy never reads half a file.
fn write_manifests(dir: &Path, content: &str) {
    let target = dir.join("manifests");
    std::fs::create_dir_all(&target).expect("manifests dir");
    let tmp = dir.join("services.yaml.tmp");
    std::fs::write(&tmp, content).expect("write manifests");
    std::fs::rename(&tmp, target.join("services.yaml")).expect("rename manifests");
}

fn backends() -> Vec<IpAddr> {
    vec![
        ip("10.244.1.2"),
        ip("10.244.2.2"),
        ip("fd00:244:1::2"),
        ip("fd00:244:2::2"),
    ]
}

/// `web`: TCP and UDP on a dual-stack ClusterIP, a NodePort, an externalIP and a
/// load-balancer IP; `empty`: no endpoints.
fn standard_services(web_endpoints: &[IpAddr]) -> String {
    let mut web = ServiceSpec::new(
        "default",
        "web",
        &[ip("10.96.0.10"), ip("fd00:96::10")],
        vec![
            PortSpec::new("http", "TCP", 80, BACKEND_PORT).node_port(30080),
            PortSpec::new("dns", "UDP", 53, BACKEND_PORT).node_port(30053),
        ],
    )
    .endpoints(web_endpoints);
    web.type_ = "LoadBalancer".into();
    web.external_ips = vec![ip("192.168.200.50"), ip("fd00:200::50")];
    web.load_balancer_ips = vec![ip("192.168.200.60")];
    let empty = ServiceSpec::new(
        "default",
        "empty",
        &[ip("10.96.0.99"), ip("fd00:96::99")],
        vec![
            PortSpec::new("http", "TCP", 80, BACKEND_PORT).node_port(30099),
            PortSpec::new("dns", "UDP", 53, BACKEND_PORT),
        ],
    );
    render(&[web, empty])
}

fn assert_spread(counts: &BTreeMap<String, usize>, expected: &[&str], what: &str) {
    let answered: Vec<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(answered, expected, "{what}: answers {counts:?}");
}

fn every_service_ip_reaches_every_backend(mode: Mode) {
    let Some(cluster) = Cluster::start(
        mode,
        "every_service_ip_reaches_every_backend",
        &standard_services(&backends()),
        &[],
    ) else {
        return;
    };
    let destinations = [
        (
            "ClusterIP v4",
            addr("10.96.0.10", 80),
            addr("10.96.0.10", 53),
        ),
        (
            "ClusterIP v6",
            addr("fd00:96::10", 80),
            addr("fd00:96::10", 53),
        ),
        (
            "NodePort v4",
            addr("192.168.100.1", 30080),
            addr("192.168.100.1", 30053),
        ),
        (
            "NodePort v6",
            addr("fd00:100::1", 30080),
            addr("fd00:100::1", 30053),
        ),
        (
            "externalIP v4",
            addr("192.168.200.50", 80),
            addr("192.168.200.50", 53),
        ),
        (
            "externalIP v6",
            addr("fd00:200::50", 80),
            addr("fd00:200::50", 53),
        ),
        (
            "LoadBalancer IP",
            addr("192.168.200.60", 80),
            addr("192.168.200.60", 53),
        ),
    ];
    for (what, tcp, udp) in destinations {
        let counts = spread(cluster.client(), tcp, Proto::Tcp, 40, TIMEOUT).expect("tcp spread");
        assert_spread(&counts, &["be0", "be1"], &format!("{what} TCP"));
        let counts = spread(cluster.client(), udp, Proto::Udp, 40, TIMEOUT).expect("udp spread");
        assert_spread(&counts, &["be0", "be1"], &format!("{what} UDP"));
    }
    // From inside the cluster CIDR too (no masquerade needed).
    let counts = spread(
        &cluster.topo.pod_client,
        addr("10.96.0.10", 80),
        Proto::Tcp,
        20,
        TIMEOUT,
    )
    .expect("pod spread");
    assert_spread(&counts, &["be0", "be1"], "pod to ClusterIP");
}

fn service_without_endpoints_is_refused_not_dropped(mode: Mode) {
    let Some(cluster) = Cluster::start(
        mode,
        "service_without_endpoints_is_refused_not_dropped",
        &standard_services(&backends()),
        &[],
    ) else {
        return;
    };
    for dest in [
        addr("10.96.0.99", 80),
        addr("fd00:96::99", 80),
        addr("192.168.100.1", 30099),
    ] {
        match testkit::tcp_request(cluster.client(), dest, TIMEOUT) {
            Err(RequestError::Refused) => {}
            other => panic!("TCP to {dest}: expected refused, got {other:?}"),
        }
    }
    match testkit::udp_request(cluster.client(), addr("10.96.0.99", 53), TIMEOUT) {
        Err(RequestError::Refused) => {}
        other => panic!("UDP to empty Service: expected refused, got {other:?}"),
    }
}

fn removed_endpoint_stops_getting_new_connections(mode: Mode) {
    let Some(mut cluster) = Cluster::start(
        mode,
        "removed_endpoint_stops_getting_new_connections",
        &standard_services(&backends()),
        &[],
    ) else {
        return;
    };
    let web = addr("10.96.0.10", 80);
    let counts = spread(cluster.client(), web, Proto::Tcp, 30, TIMEOUT).expect("spread");
    assert_spread(&counts, &["be0", "be1"], "before");

    // be0 leaves: only be1 answers, and nothing fails along the way.
    cluster.update(&standard_services(&[ip("10.244.2.2"), ip("fd00:244:2::2")]));
    for (proto, dest) in [
        (Proto::Tcp, web),
        (Proto::Udp, addr("10.96.0.10", 53)),
        (Proto::Tcp, addr("fd00:96::10", 80)),
    ] {
        let counts = spread(cluster.client(), dest, proto, 30, TIMEOUT).expect("spread");
        assert_spread(
            &counts,
            &["be1"],
            &format!("after removing be0, {proto} {dest}"),
        );
    }
    // The update was incremental: the table was not rewritten.
    let log = cluster.proxy.log();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains(SYNCED))
        .unwrap_or_default();
    assert!(
        last.contains("full=false"),
        "expected an incremental sync: {last}"
    );

    // No endpoints at all: refused. Then back: both answer again.
    cluster.update(&standard_services(&[]));
    assert!(matches!(
        testkit::tcp_request(cluster.client(), web, TIMEOUT),
        Err(RequestError::Refused)
    ));
    cluster.update(&standard_services(&backends()));
    let counts = spread(cluster.client(), web, Proto::Tcp, 30, TIMEOUT).expect("spread");
    assert_spread(&counts, &["be0", "be1"], "after restoring");
}

fn pod_reaching_itself_through_its_service_is_masqueraded(mode: Mode) {
    // Hairpin: be0 connects to a Service whose only endpoint is be0 itself.
    let only_be0 = ServiceSpec::new(
        "default",
        "self",
        &[ip("10.96.0.20")],
        vec![PortSpec::new("http", "TCP", 80, BACKEND_PORT)],
    )
    .endpoints(&[ip("10.244.1.2")]);
    let Some(cluster) = Cluster::start(
        mode,
        "pod_reaching_itself_through_its_service_is_masqueraded",
        &render(&[only_be0]),
        &[],
    ) else {
        return;
    };
    let reply = testkit::tcp_request(
        &cluster.topo.backends[0].ns,
        addr("10.96.0.20", 80),
        TIMEOUT,
    );
    assert_eq!(reply.expect("hairpin request"), "be0");
}

fn bad_manifests_and_hostile_names_do_not_disturb_other_services(mode: Mode) {
    let hostile = r#"---
apiVersion: v1
kind: Service
metadata:
  name: "evil\"; flush ruleset; \""
  namespace: default
spec:
  clusterIP: 10.96.0.66
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: default}
spec:
  clusterIP: 10.96.0.67
  ports: [{port: 99999}]
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: default}
spec:
  clusterIP: "10.96.0.300"
  ports: [{port: 80}]
---
this is: [not valid yaml
"#;
    let manifests = format!("{}{hostile}", standard_services(&backends()));
    let Some(cluster) = Cluster::start(
        mode,
        "bad_manifests_and_hostile_names_do_not_disturb_other_services",
        &manifests,
        &[],
    ) else {
        return;
    };
    web_reaches(&cluster, &["be0", "be1"], "web next to bad objects");
    let ruleset = cluster.ruleset();
    assert!(
        !ruleset.contains("10.96.0.66") && !ruleset.contains("10.96.0.67"),
        "{ruleset}"
    );
    let log = cluster.proxy.log();
    for needle in ["evil", "badport", "badip", "services.yaml"] {
        assert!(log.contains(needle), "log should name {needle}: {log}");
    }
}

fn cleanup_removes_all_rules_and_succeeds_when_there_are_none(mode: Mode) {
    let Some(cluster) = Cluster::start(
        mode,
        "cleanup_removes_all_rules_and_succeeds_when_there_are_none",
        &standard_services(&backends()),
        &[],
    ) else {
        return;
    };
    let mut cluster = cluster;
    let status = cluster.stop_proxy();
    let topo = &cluster.topo;
    assert!(status.success(), "proxy exit status {status}");
    // Rules survive the proxy's exit (traffic keeps flowing during restarts), in the
    // modes where the kernel forwards.
    assert_eq!(
        mode.rules_present(&topo.node),
        mode.keeps_rules_on_exit(),
        "rules after exit: {}",
        cluster.ruleset()
    );
    for round in 0..2 {
        let out = topo
            .node
            .command(&binary().to_string_lossy())
            .arg("--cleanup")
            .output()
            .expect("run --cleanup");
        assert!(
            out.status.success(),
            "cleanup round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !mode.rules_present(&topo.node),
            "round {round}: {}",
            cluster.ruleset()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Service semantics: affinity, traffic policies, source ranges, endpoint selection,
// masquerading, dual-stack, stale conntrack entries.
// ---------------------------------------------------------------------------------------

/// One endpoint of a hand-written EndpointSlice.
#[derive(Clone, Copy)]
struct Ep {
    ip: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: &'static str,
    zone_hint: Option<&'static str>,
    node_hint: Option<&'static str>,
}

impl Ep {
    fn ready(ip: &'static str, node: &'static str) -> Ep {
        Ep {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node,
            zone_hint: None,
            node_hint: None,
        }
    }
}

const BE0: &str = "10.244.1.2";
const BE1: &str = "10.244.2.2";

/// A Service (ClusterIP unless `spec` says otherwise) with one port and one IPv4 slice.
fn service_yaml(
    name: &str,
    cluster_ip: &str,
    protocol: &str,
    port: u16,
    target: u16,
    spec: &str,
    eps: &[Ep],
) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: p, protocol: {protocol}, port: {port}, targetPort: {target}}}]\n{spec}"
    );
    if !y.ends_with('\n') {
        y.push('\n');
    }
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, protocol: {protocol}, port: {target}}}]\nendpoints:\n"
    ));
    for ep in eps {
        y.push_str(&format!(
            "  - addresses: [{}]\n    nodeName: {}\n    conditions: {{ready: {}, serving: {}, terminating: {}}}\n",
            ep.ip, ep.node, ep.ready, ep.serving, ep.terminating
        ));
        let mut hints = Vec::new();
        if let Some(zone) = ep.zone_hint {
            hints.push(format!("forZones: [{{name: {zone}}}]"));
        }
        if let Some(node) = ep.node_hint {
            hints.push(format!("forNodes: [{{name: {node}}}]"));
        }
        if !hints.is_empty() {
            y.push_str(&format!("    hints: {{{}}}\n", hints.join(", ")));
        }
    }
    if eps.is_empty() {
        y.push_str("  []\n");
        y = y.replace("endpoints:\n  []\n", "endpoints: []\n");
    }
    y
}

fn node_yaml(labels: &str, pod_cidrs: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {{{labels}}}\nspec:\n  podCIDRs: [{pod_cidrs}]\n"
    )
}

/// The distinct answers of `n` TCP requests from `ns`.
fn answers(ns: &Netns, dest: SocketAddr, n: usize) -> Vec<String> {
    spread(ns, dest, Proto::Tcp, n, TIMEOUT)
        .expect("spread")
        .into_keys()
        .collect()
}

fn session_affinity_keeps_a_client_on_one_endpoint(mode: Mode) {
    let sticky = service_yaml(
        "sticky",
        "10.96.0.30",
        "TCP",
        80,
        BACKEND_PORT,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}",
        &[Ep::ready(BE0, "node-b"), Ep::ready(BE1, "node-b")],
    );
    let Some(cluster) = Cluster::start(
        mode,
        "session_affinity_keeps_a_client_on_one_endpoint",
        &sticky,
        &[],
    ) else {
        return;
    };
    let dest = addr("10.96.0.30", 80);
    for client in [cluster.client(), &cluster.topo.pod_client] {
        let seen = answers(client, dest, 20);
        assert_eq!(
            seen.len(),
            1,
            "one client, one endpoint while the affinity lasts: {seen:?}"
        );
    }
    // After the timeout a new choice is made: within a few rounds the other one answers.
    let first = answers(cluster.client(), dest, 1);
    let moved = (0..12).any(|_| {
        std::thread::sleep(Duration::from_millis(1300));
        answers(cluster.client(), dest, 1) != first
    });
    assert!(moved, "affinity never expired");
}

fn external_traffic_policy_local(mode: Mode) {
    if mode.skips("external_traffic_policy_local") {
        return;
    }
    let spec = "  type: NodePort\n  externalTrafficPolicy: Local\n  externalIPs: [192.168.200.40]";
    let manifests = |be0_node: &'static str| {
        let mut svc = service_yaml(
            "local-ext",
            "10.96.0.40",
            "TCP",
            80,
            PEER_PORT,
            spec,
            &[Ep::ready(BE0, be0_node), Ep::ready(BE1, "node-b")],
        );
        svc = svc.replace("targetPort: 9090}", "targetPort: 9090, nodePort: 30040}");
        svc
    };
    let Some(mut cluster) = Cluster::start(
        mode,
        "external_traffic_policy_local",
        &manifests("node-a"),
        &[],
    ) else {
        return;
    };
    // From outside, via NodePort and externalIP: only the local endpoint, client IP kept.
    for dest in [addr("192.168.100.1", 30040), addr("192.168.200.40", 80)] {
        let seen = answers(cluster.client(), dest, 12);
        assert_eq!(seen, vec!["be0 192.168.100.2"], "{dest}");
    }
    // Cluster traffic to the cluster IP still uses every endpoint.
    let seen: Vec<String> = answers(&cluster.topo.pod_client, addr("10.96.0.40", 80), 30)
        .into_iter()
        .map(|a| a.split(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(seen, vec!["be0", "be1"]);
    // No local endpoint left: outside traffic is dropped (not refused), the cluster IP works.
    cluster.update(&manifests("node-b"));
    let nodeport = testkit::tcp_request(
        cluster.client(),
        addr("192.168.100.1", 30040),
        Duration::from_millis(700),
    );
    assert!(
        matches!(nodeport, Err(RequestError::Timeout)),
        "expected a drop, got {nodeport:?}"
    );
    assert_eq!(
        answers(&cluster.topo.pod_client, addr("10.96.0.40", 80), 30).len(),
        2
    );
}

fn internal_traffic_policy_local(mode: Mode) {
    if mode.skips("internal_traffic_policy_local") {
        return;
    }
    let manifests = |be0_node: &'static str| {
        service_yaml(
            "local-int",
            "10.96.0.41",
            "TCP",
            80,
            BACKEND_PORT,
            "  internalTrafficPolicy: Local",
            &[Ep::ready(BE0, be0_node), Ep::ready(BE1, "node-b")],
        )
    };
    let Some(mut cluster) = Cluster::start(
        mode,
        "internal_traffic_policy_local",
        &manifests("node-a"),
        &[],
    ) else {
        return;
    };
    let dest = addr("10.96.0.41", 80);
    assert_eq!(answers(&cluster.topo.pod_client, dest, 20), vec!["be0"]);
    cluster.update(&manifests("node-b"));
    let reply = testkit::tcp_request(&cluster.topo.pod_client, dest, Duration::from_millis(700));
    assert!(
        matches!(reply, Err(RequestError::Timeout)),
        "expected a drop, got {reply:?}"
    );
}

fn load_balancer_source_ranges(mode: Mode) {
    if mode.skips("load_balancer_source_ranges") {
        return;
    }
    let mut svc = ServiceSpec::new(
        "default",
        "fw",
        &[ip("10.96.0.42")],
        vec![PortSpec::new("http", "TCP", 80, BACKEND_PORT)],
    )
    .endpoints(&[ip(BE0), ip(BE1)]);
    svc.type_ = "LoadBalancer".into();
    svc.load_balancer_ips = vec![ip("192.168.200.42")];
    svc.extra_spec = vec!["  loadBalancerSourceRanges: [10.244.0.0/16]".into()];
    let Some(cluster) = Cluster::start(mode, "load_balancer_source_ranges", &render(&[svc]), &[])
    else {
        return;
    };
    let lb = addr("192.168.200.42", 80);
    assert_eq!(
        answers(&cluster.topo.pod_client, lb, 20),
        vec!["be0", "be1"],
        "listed source"
    );
    let outside = testkit::tcp_request(cluster.client(), lb, Duration::from_millis(700));
    assert!(
        matches!(outside, Err(RequestError::Timeout)),
        "unlisted source must be dropped: {outside:?}"
    );
    assert_eq!(
        answers(cluster.client(), addr("10.96.0.42", 80), 20),
        vec!["be0", "be1"],
        "cluster IP unaffected"
    );
}

fn endpoint_selection_like_upstream(mode: Mode) {
    let terminating = service_yaml(
        "term",
        "10.96.0.43",
        "TCP",
        80,
        BACKEND_PORT,
        "",
        &[
            Ep {
                ip: BE0,
                ready: false,
                serving: true,
                terminating: true,
                node: "node-b",
                zone_hint: None,
                node_hint: None,
            },
            Ep {
                ip: BE1,
                ready: false,
                serving: false,
                terminating: true,
                node: "node-b",
                zone_hint: None,
                node_hint: None,
            },
        ],
    );
    let topology = service_yaml(
        "topo",
        "10.96.0.44",
        "TCP",
        80,
        BACKEND_PORT,
        "  trafficDistribution: PreferSameZone",
        &[
            Ep {
                zone_hint: Some("zone-a"),
                ..Ep::ready(BE0, "node-b")
            },
            Ep {
                zone_hint: Some("zone-b"),
                ..Ep::ready(BE1, "node-c")
            },
        ],
    );
    let not_ready = service_yaml(
        "notready",
        "10.96.0.45",
        "TCP",
        80,
        BACKEND_PORT,
        "",
        &[
            Ep::ready(BE0, "node-b"),
            Ep {
                ready: false,
                serving: false,
                ..Ep::ready(BE1, "node-b")
            },
        ],
    );
    // (name, cluster IP, trafficDistribution, (node hint, zone hint) of be0 and be1, answers)
    type Hints = (Option<&'static str>, Option<&'static str>);
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        [Hints; 2],
        &'static [&'static str],
    );
    let same_node_cases: [Case; 4] = [
        // This node's hint wins over zone hints that would pick both.
        (
            "samenode",
            "10.96.0.54",
            "PreferSameNode",
            [
                (Some("node-b"), Some("zone-a")),
                (Some("node-a"), Some("zone-a")),
            ],
            &["be1"],
        ),
        // No node hint names this node: zone hints; hints count without trafficDistribution.
        (
            "othernode",
            "10.96.0.55",
            "",
            [
                (Some("node-b"), Some("zone-a")),
                (Some("node-c"), Some("zone-b")),
            ],
            &["be0"],
        ),
        // be1 has no node hint: zone hints, although be0 is hinted for this node.
        (
            "partialnode",
            "10.96.0.56",
            "PreferSameNode",
            [(Some("node-a"), Some("zone-b")), (None, Some("zone-a"))],
            &["be1"],
        ),
        // Neither kind complete: every endpoint.
        (
            "nohints",
            "10.96.0.57",
            "PreferSameNode",
            [(Some("node-a"), Some("zone-a")), (None, None)],
            &["be0", "be1"],
        ),
    ];
    let mut same_node = String::new();
    for (name, cluster_ip, distribution, hints, _) in same_node_cases {
        let spec = if distribution.is_empty() {
            String::new()
        } else {
            format!("  trafficDistribution: {distribution}")
        };
        let eps = [BE0, BE1]
            .into_iter()
            .zip(hints)
            .map(|(ip, (node_hint, zone_hint))| Ep {
                node_hint,
                zone_hint,
                ..Ep::ready(ip, "node-b")
            });
        let eps: Vec<Ep> = eps.collect();
        same_node.push_str(&service_yaml(
            name,
            cluster_ip,
            "TCP",
            80,
            BACKEND_PORT,
            &spec,
            &eps,
        ));
    }
    let node = node_yaml("topology.kubernetes.io/zone: zone-a", "10.244.0.0/16");
    let manifests = format!("{terminating}{topology}{not_ready}{same_node}{node}");
    let Some(cluster) = Cluster::start(mode, "endpoint_selection_like_upstream", &manifests, &[])
    else {
        return;
    };
    assert_eq!(
        answers(cluster.client(), addr("10.96.0.43", 80), 20),
        vec!["be0"],
        "serving-terminating fallback"
    );
    assert_eq!(
        answers(cluster.client(), addr("10.96.0.44", 80), 20),
        vec!["be0"],
        "zone hints"
    );
    assert_eq!(
        answers(cluster.client(), addr("10.96.0.45", 80), 20),
        vec!["be0"],
        "not-ready endpoint skipped"
    );
    for (name, cluster_ip, _, _, expected) in same_node_cases {
        assert_eq!(
            answers(cluster.client(), addr(cluster_ip, 80), 20),
            expected,
            "node hints: {name}"
        );
    }
}

fn masquerade_follows_detect_local_mode(mode: Mode) {
    if mode.skips("masquerade_follows_detect_local_mode") {
        return;
    }
    let svc = service_yaml(
        "peer",
        "10.96.0.46",
        "TCP",
        80,
        PEER_PORT,
        "",
        &[Ep::ready(BE0, "node-b")],
    );
    let node = node_yaml("", "10.244.0.0/16");
    let manifests = format!("{svc}{node}");
    // (extra flags, pod client masqueraded?, outside client masqueraded?)
    let variants: [(&[&str], bool, bool); 5] = [
        (&[], false, true),
        (&["--masquerade-all"], true, true),
        (&["--detect-local-mode=NodeCIDR"], false, true),
        (
            &[
                "--detect-local-mode=BridgeInterface",
                "--pod-bridge-interface=vpodcl",
            ],
            false,
            true,
        ),
        (
            &[
                "--detect-local-mode=InterfaceNamePrefix",
                "--pod-interface-name-prefix=vpod",
            ],
            false,
            true,
        ),
    ];
    for (flags, pod_masq, outside_masq) in variants {
        let Some(cluster) = Cluster::start(
            mode,
            "masquerade_follows_detect_local_mode",
            &manifests,
            flags,
        ) else {
            return;
        };
        for (client, own_ip, masq) in [
            (&cluster.topo.pod_client, "10.244.200.2", pod_masq),
            (cluster.client(), "192.168.100.2", outside_masq),
        ] {
            let reply =
                testkit::tcp_request(client, addr("10.96.0.46", 80), TIMEOUT).expect("request");
            let seen = reply.split(' ').nth(1).unwrap_or_default().to_string();
            assert_eq!(
                seen != own_ip,
                masq,
                "{flags:?}: client {own_ip} seen as {seen}"
            );
        }
    }
}

/// `internalTrafficPolicy: Local` picks this node's endpoints but masquerades as the
/// Cluster policy does: traffic to the cluster IP from outside the pod network (the node
/// itself, a client routed to the node) reaches the endpoint from the node's address;
/// pod traffic keeps its source unless `--masquerade-all`.
fn internal_traffic_policy_local_masquerades_like_cluster(mode: Mode) {
    if mode.skips("internal_traffic_policy_local_masquerades_like_cluster") {
        return;
    }
    let svc = service_yaml(
        "itp-masq",
        "10.96.0.47",
        "TCP",
        80,
        PEER_PORT,
        "  internalTrafficPolicy: Local",
        &[Ep::ready(BE0, "node-a"), Ep::ready(BE1, "node-b")],
    );
    // be0's side of its link to the node: the address a masqueraded connection has.
    const NODE_TO_BE0: &str = "10.244.1.1";
    // (extra flags, what be0 sees of the pod client)
    let variants: [(&[&str], &str); 2] =
        [(&[], "10.244.200.2"), (&["--masquerade-all"], NODE_TO_BE0)];
    for (flags, pod_seen) in variants {
        let Some(cluster) = Cluster::start(
            mode,
            "internal_traffic_policy_local_masquerades_like_cluster",
            &svc,
            flags,
        ) else {
            return;
        };
        let dest = addr("10.96.0.47", 80);
        for (who, client, seen) in [
            ("pod", &cluster.topo.pod_client, pod_seen),
            ("outside client", cluster.client(), NODE_TO_BE0),
            ("node", &cluster.topo.node, NODE_TO_BE0),
        ] {
            assert_eq!(
                answers(client, dest, 10),
                vec![format!("be0 {seen}")],
                "{flags:?}: {who} to the cluster IP"
            );
        }
    }
}

/// `externalTrafficPolicy: Local`: pods and the node reaching the Service through an
/// external IP, load-balancer IP or NodePort are sent to all of its endpoints, as if
/// they had used the cluster IP, even when none is on this node; the node is
/// masqueraded, pods are not. Outside clients keep their address and reach only this
/// node's endpoints (none: dropped).
fn external_traffic_policy_local_short_circuits_pods_and_node(mode: Mode) {
    if mode.skips("external_traffic_policy_local_short_circuits_pods_and_node") {
        return;
    }
    // Two Services, internal policy Cluster and Local: the short-circuit goes to all
    // endpoints either way. (cluster IP, NodePort, externalIP, LB IP, internal policy)
    let services = [
        (
            "10.96.0.48",
            30048,
            "192.168.200.48",
            "192.168.200.148",
            "Cluster",
        ),
        (
            "10.96.0.49",
            30049,
            "192.168.200.49",
            "192.168.200.149",
            "Local",
        ),
    ];
    let manifests = |with_local_endpoint: bool| -> String {
        let specs: Vec<ServiceSpec> = services
            .iter()
            .map(|(cluster_ip, node_port, external_ip, lb_ip, itp)| {
                let mut svc = ServiceSpec::new(
                    "default",
                    &format!("etp-sc-{node_port}"),
                    &[ip(cluster_ip)],
                    vec![PortSpec::new("p", "TCP", 80, PEER_PORT).node_port(*node_port)],
                );
                svc.type_ = "LoadBalancer".into();
                svc.external_ips = vec![ip(external_ip)];
                svc.load_balancer_ips = vec![ip(lb_ip)];
                svc.extra_spec = vec![
                    "  externalTrafficPolicy: Local".into(),
                    format!("  internalTrafficPolicy: {itp}"),
                ];
                let mut eps = vec![ip(BE1)];
                let mut nodes = vec!["node-b".to_string()];
                if with_local_endpoint {
                    eps.insert(0, ip(BE0));
                    nodes.insert(0, "node-a".to_string());
                }
                svc = svc.endpoints(&eps);
                svc.endpoint_nodes = nodes;
                svc
            })
            .collect();
        render(&specs)
    };
    let Some(mut cluster) = Cluster::start(
        mode,
        "external_traffic_policy_local_short_circuits_pods_and_node",
        &manifests(false),
        &[],
    ) else {
        return;
    };
    for (_, node_port, external_ip, lb_ip, itp) in services {
        let external = [
            ("external IP", addr(external_ip, 80)),
            ("LB IP", addr(lb_ip, 80)),
            ("NodePort", addr("192.168.100.1", node_port)),
        ];
        for (what, dest) in external {
            // Only endpoint on another node: still reached, pods keep their address, the
            // node's connection leaves from its address on be1's link.
            for (who, client, seen) in [
                ("pod", &cluster.topo.pod_client, "10.244.200.2"),
                ("node", &cluster.topo.node, "10.244.2.1"),
            ] {
                assert_eq!(
                    answers(client, dest, 6),
                    vec![format!("be1 {seen}")],
                    "iTP {itp}: {who} to the {what} {dest}"
                );
            }
            let outside = testkit::tcp_request(cluster.client(), dest, Duration::from_millis(700));
            assert!(
                matches!(outside, Err(RequestError::Timeout)),
                "iTP {itp}: outside client to the {what} {dest} must be dropped: {outside:?}"
            );
        }
    }
    // With an endpoint here too: outside clients reach only it and keep their address;
    // pods still reach every endpoint.
    cluster.update(&manifests(true));
    for (_, node_port, external_ip, lb_ip, itp) in services {
        for (what, dest) in [
            ("external IP", addr(external_ip, 80)),
            ("LB IP", addr(lb_ip, 80)),
            ("NodePort", addr("192.168.100.1", node_port)),
        ] {
            assert_eq!(
                answers(cluster.client(), dest, 12),
                vec!["be0 192.168.100.2"],
                "iTP {itp}: outside client to the {what} {dest}"
            );
            assert_eq!(
                answers(&cluster.topo.pod_client, dest, 30),
                vec!["be0 10.244.200.2", "be1 10.244.200.2"],
                "iTP {itp}: pod to the {what} {dest}"
            );
        }
    }
}

/// `--detect-local-mode` decides who counts as a pod for the cluster IP's masquerade and
/// for the `externalTrafficPolicy: Local` short-circuit, in every mode that has them.
/// be1 (10.244.2.2, on vbe1) is inside the cluster CIDR but outside the node's pod CIDR
/// and not on the pod client's interface (vpodcl); the pod client is a pod every way.
fn detect_local_mode_decides_who_is_a_pod(mode: Mode) {
    if mode.skips("detect_local_mode_decides_who_is_a_pod") {
        return;
    }
    let peer = service_yaml(
        "dl-peer",
        "10.96.0.50",
        "TCP",
        80,
        PEER_PORT,
        "",
        &[Ep::ready(BE0, "node-b")],
    );
    let local_ext = service_yaml(
        "dl-ext",
        "10.96.0.51",
        "TCP",
        80,
        PEER_PORT,
        "  externalTrafficPolicy: Local\n  externalIPs: [192.168.200.51]",
        &[Ep::ready(BE0, "node-b")],
    );
    let node = node_yaml("", "10.244.200.0/24");
    let manifests = format!("{peer}{local_ext}{node}");
    // (extra flags, whether be1 counts as a pod)
    let variants: [(&[&str], bool); 4] = [
        (&[], true),
        (&["--detect-local-mode=NodeCIDR"], false),
        (
            &[
                "--detect-local-mode=BridgeInterface",
                "--pod-bridge-interface=vpodcl",
            ],
            false,
        ),
        (
            &[
                "--detect-local-mode=InterfaceNamePrefix",
                "--pod-interface-name-prefix=vpod",
            ],
            false,
        ),
    ];
    for (flags, be1_is_pod) in variants {
        let Some(cluster) = Cluster::start(
            mode,
            "detect_local_mode_decides_who_is_a_pod",
            &manifests,
            flags,
        ) else {
            return;
        };
        let be1 = &cluster.topo.backends[1].ns;
        for (who, client, own_ip, is_pod) in [
            ("pod client", &cluster.topo.pod_client, "10.244.200.2", true),
            ("be1", be1, BE1, be1_is_pod),
        ] {
            // Pods keep their address to the cluster IP; anything else arrives from the
            // node's address on be0's link.
            let seen = if is_pod { own_ip } else { "10.244.1.1" };
            assert_eq!(
                answers(client, addr("10.96.0.50", 80), 6),
                vec![format!("be0 {seen}")],
                "{flags:?}: {who} to the cluster IP"
            );
            // Only pods are short-circuited past the missing local endpoint.
            let reply = testkit::tcp_request(
                client,
                addr("192.168.200.51", 80),
                Duration::from_millis(700),
            );
            if is_pod {
                assert_eq!(
                    reply.expect("short-circuited"),
                    format!("be0 {own_ip}"),
                    "{flags:?}: {who} to the external IP"
                );
            } else {
                assert!(
                    matches!(reply, Err(RequestError::Timeout)),
                    "{flags:?}: {who} to the external IP must be dropped: {reply:?}"
                );
            }
        }
    }
}

fn single_stack_services_stay_in_their_family(mode: Mode) {
    let v6 = ServiceSpec::new(
        "default",
        "v6only",
        &[ip("fd00:96::77")],
        vec![PortSpec::new("http", "TCP", 7777, BACKEND_PORT)],
    )
    .endpoints(&[ip("fd00:244:1::2"), ip("fd00:244:2::2")]);
    let Some(cluster) = Cluster::start(
        mode,
        "single_stack_services_stay_in_their_family",
        &render(&[v6]),
        &[],
    ) else {
        return;
    };
    assert_eq!(
        answers(cluster.client(), addr("fd00:96::77", 7777), 20),
        vec!["be0", "be1"]
    );
    if mode.0 == "nftables" {
        let v4 = cluster
            .topo
            .node
            .exec(&["nft", "list", "table", "ip", "kube-proxy"])
            .expect("v4 table");
        assert!(
            !v4.contains("7777"),
            "IPv6-only Service leaked into the IPv4 table:\n{v4}"
        );
    }
}

/// Addresses the API has long accepted and still stores: IPv4 with leading zeros. Upstream
/// reads them as decimal (Go 1.16's grammar, never octal), so each one below is served at
/// its plain address.
fn legacy_ip_forms_are_served_like_upstream(mode: Mode) {
    let svc = service_yaml(
        "legacy",
        "\"010.096.000.041\"",
        "TCP",
        80,
        BACKEND_PORT,
        "  externalIPs: [\"192.168.200.041\"]",
        &[
            Ep::ready("\"010.244.001.002\"", "node-b"),
            Ep::ready("\"0010.0244.0002.0002\"", "node-b"),
        ],
    );
    let Some(cluster) = Cluster::start(mode, "legacy_ip_forms_are_served_like_upstream", &svc, &[])
    else {
        return;
    };
    for dest in [addr("10.96.0.41", 80), addr("192.168.200.41", 80)] {
        assert_eq!(
            answers(cluster.client(), dest, 20),
            vec!["be0", "be1"],
            "{dest}"
        );
    }
}

/// Userspace mode: the proxy's own UDP sessions follow endpoint changes.
/// A restart adopts what the kernel holds: UDP flows keep their endpoint (upstream
/// #122740: a restart flushed them), so each of ten clients, keeping its source port,
/// still reaches the backend it reached before (chance that a flush goes unseen: 2⁻¹⁰).
fn restart_keeps_udp_flows_on_their_endpoint(mode: Mode) {
    if mode.skips("restart_keeps_udp_flows_on_their_endpoint") {
        return;
    }
    let dns = service_yaml(
        "dns",
        "10.96.0.53",
        "UDP",
        53,
        BACKEND_PORT,
        "",
        &[Ep::ready(BE0, "node-b"), Ep::ready(BE1, "node-b")],
    );
    let Some(mut cluster) =
        Cluster::start(mode, "restart_keeps_udp_flows_on_their_endpoint", &dns, &[])
    else {
        return;
    };
    let dest = addr("10.96.0.53", 53);
    let ask = |c: &Cluster, port: u16| {
        testkit::udp_request_from(c.client(), port, dest, TIMEOUT).expect("UDP answer")
    };
    let ports: Vec<u16> = (41000..41010).collect();
    let before: Vec<String> = ports.iter().map(|&p| ask(&cluster, p)).collect();
    assert!(before.contains(&"be0".to_string()) || before.contains(&"be1".to_string()));
    cluster.restart_proxy_with(mode, &[], Tools::Needed);
    let after: Vec<String> = ports.iter().map(|&p| ask(&cluster, p)).collect();
    assert_eq!(
        after, before,
        "flows moved to other endpoints across the restart"
    );
}

fn udp_client_follows_replaced_endpoint(mode: Mode) {
    if mode.skips("udp_client_follows_replaced_endpoint") {
        return;
    }
    let dns = |eps: &[Ep]| service_yaml("dns", "10.96.0.53", "UDP", 53, BACKEND_PORT, "", eps);
    let Some(mut cluster) = Cluster::start(
        mode,
        "udp_client_follows_replaced_endpoint",
        &dns(&[Ep::ready(BE0, "node-b")]),
        &[],
    ) else {
        return;
    };
    let dest = addr("10.96.0.53", 53);
    let ask = |c: &Cluster| testkit::udp_request_from(c.client(), 40000, dest, TIMEOUT);
    assert_eq!(ask(&cluster).expect("before"), "be0");
    // be0 is replaced by be1 (be0 keeps running, as a terminating pod would).
    cluster.update(&dns(&[Ep::ready(BE1, "node-b")]));
    assert_eq!(ask(&cluster).expect("after the endpoint change"), "be1");
    // No endpoints: refused; endpoints again: the same client port gets through at once.
    cluster.update(&dns(&[]));
    assert!(matches!(ask(&cluster), Err(RequestError::Refused)));
    cluster.update(&dns(&[Ep::ready(BE0, "node-b")]));
    assert_eq!(ask(&cluster).expect("after endpoints came back"), "be0");
}

/// The UDP conntrack entries in `node` whose original source port is `sport`, as the
/// address each was DNATed to (the reply's source).
fn udp_flows_from(node: &Netns, sport: u16) -> Vec<String> {
    let listing = node
        .exec(&["conntrack", "-L", "-p", "udp"])
        .expect("conntrack -L");
    let needle = format!("sport={sport} ");
    listing
        .lines()
        .filter(|l| {
            // The original tuple's source port is the first `sport=`.
            l.split_whitespace().find(|w| w.starts_with("sport=")) == Some(needle.trim_end())
        })
        .filter_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix("src="))
                .nth(1)
                .map(str::to_string)
        })
        .collect()
}

/// As upstream's conntrack reconciler (v1.32+): once a UDP Service's endpoints change,
/// flows to its cluster IP, external IP and NodePort that were DNATed to an endpoint no
/// longer serving are deleted and the others kept; a Service scaled to zero keeps its
/// flows (new clients are refused) until it has endpoints again.
fn udp_stale_flows_reconciled_like_upstream(mode: Mode) {
    if mode.skips("udp_stale_flows_reconciled_like_upstream") {
        return;
    }
    let dns = |eps: &[Ep]| {
        service_yaml(
            "dns",
            "10.96.0.53",
            "UDP",
            53,
            BACKEND_PORT,
            "  type: NodePort\n  externalIPs: [192.168.200.53]",
            eps,
        )
        .replace(
            &format!("targetPort: {BACKEND_PORT}}}"),
            &format!("targetPort: {BACKEND_PORT}, nodePort: 30053}}"),
        )
    };
    let node = node_yaml("", "10.244.0.0/16");
    let both = format!(
        "{}{node}",
        dns(&[Ep::ready(BE0, "node-b"), Ep::ready(BE1, "node-b")])
    );
    let Some(mut cluster) =
        Cluster::start(mode, "udp_stale_flows_reconciled_like_upstream", &both, &[])
    else {
        return;
    };
    let destinations = [
        addr("10.96.0.53", 53),
        addr("192.168.200.53", 53),
        addr("192.168.100.1", 30053),
    ];
    // Per destination, a client port whose flow went to be0 and one whose flow went to be1.
    let mut flows: Vec<(SocketAddr, u16, u16)> = Vec::new();
    let mut next_port = 41000;
    for dest in destinations {
        let (mut to_be0, mut to_be1) = (None, None);
        while to_be0.is_none() || to_be1.is_none() {
            assert!(next_port < 41200, "{dest}: no spread over both endpoints");
            let answer = testkit::udp_request_from(cluster.client(), next_port, dest, TIMEOUT)
                .expect("udp request");
            match answer.as_str() {
                "be0" if to_be0.is_none() => to_be0 = Some(next_port),
                "be1" if to_be1.is_none() => to_be1 = Some(next_port),
                _ => {}
            }
            next_port += 1;
        }
        flows.push((dest, to_be0.unwrap_or_default(), to_be1.unwrap_or_default()));
    }
    let node_ns = &cluster.topo.node;
    for (dest, p0, p1) in &flows {
        assert_eq!(udp_flows_from(node_ns, *p0), [BE0], "{dest} flow to be0");
        assert_eq!(udp_flows_from(node_ns, *p1), [BE1], "{dest} flow to be1");
    }

    // be0 leaves: its flows go, be1's stay.
    cluster.update(&format!("{}{node}", dns(&[Ep::ready(BE1, "node-b")])));
    let node_ns = &cluster.topo.node;
    for (dest, p0, p1) in &flows {
        assert!(
            udp_flows_from(node_ns, *p0).is_empty(),
            "{dest}: the flow to the removed endpoint must be deleted"
        );
        assert_eq!(
            udp_flows_from(node_ns, *p1),
            [BE1],
            "{dest}: be1's flow kept"
        );
        let again = testkit::udp_request_from(cluster.client(), *p0, *dest, TIMEOUT);
        assert_eq!(again.expect("after be0 left"), "be1", "{dest}");
    }

    // Scaled to zero: upstream leaves the flows alone; a new client is refused.
    cluster.update(&format!("{}{node}", dns(&[])));
    let node_ns = &cluster.topo.node;
    for (dest, p0, p1) in &flows {
        assert_eq!(udp_flows_from(node_ns, *p1), [BE1], "{dest}: kept at zero");
        assert_eq!(udp_flows_from(node_ns, *p0), [BE1], "{dest}: kept at zero");
    }
    let fresh = testkit::udp_request_from(cluster.client(), 41500, destinations[0], TIMEOUT);
    assert!(matches!(fresh, Err(RequestError::Refused)), "{fresh:?}");

    // Endpoints again (be0 only): every flow to be1 is stale now.
    cluster.update(&format!("{}{node}", dns(&[Ep::ready(BE0, "node-b")])));
    let node_ns = &cluster.topo.node;
    for (dest, p0, p1) in &flows {
        assert!(udp_flows_from(node_ns, *p0).is_empty(), "{dest}");
        assert!(udp_flows_from(node_ns, *p1).is_empty(), "{dest}");
        let again = testkit::udp_request_from(cluster.client(), *p1, *dest, TIMEOUT);
        assert_eq!(again.expect("after endpoints came back"), "be0", "{dest}");
    }
}

/// `--feature-gates=AllowServiceExternalIPs=false` (upstream v1.36+): externalIPs are not
/// served; the cluster IP still is.
fn external_ips_not_served_without_their_feature_gate(mode: Mode) {
    let svc = service_yaml(
        "extip",
        "10.96.0.58",
        "TCP",
        80,
        BACKEND_PORT,
        "  externalIPs: [192.168.200.58]",
        &[Ep::ready(BE0, "node-b"), Ep::ready(BE1, "node-b")],
    );
    let Some(cluster) = Cluster::start(
        mode,
        "external_ips_not_served_without_their_feature_gate",
        &format!("{svc}{}", node_yaml("", "10.244.0.0/16")),
        &["--feature-gates=AllowServiceExternalIPs=false"],
    ) else {
        return;
    };
    assert_eq!(
        answers(cluster.client(), addr("10.96.0.58", 80), 20),
        vec!["be0", "be1"],
        "cluster IP"
    );
    let external = testkit::tcp_request(
        cluster.client(),
        addr("192.168.200.58", 80),
        Duration::from_millis(700),
    );
    assert!(
        external.is_err(),
        "externalIP must not be served: {external:?}"
    );
}

fn starting_removes_the_other_modes_rules(mode: Mode) {
    for other in mode.others() {
        let Some(mut cluster) = Cluster::start(
            other,
            "starting_removes_the_other_modes_rules",
            &standard_services(&backends()),
            &[],
        ) else {
            return;
        };
        assert!(other.rules_present(&cluster.topo.node), "{} rules", other.0);
        // Removing them takes the other mode's tool where it is installed.
        cluster.restart_proxy_with(mode, &[], Tools::WithLeftoverRemoval);
        assert!(
            !other.rules_present(&cluster.topo.node),
            "{} rules left after starting in {} mode:\n{}",
            other.0,
            mode.0,
            cluster.ruleset()
        );
        web_reaches(&cluster, &["be0", "be1"], "after switching modes");
    }
}

/// 20 connections from the client to the standard `web` Service reach `backends`.
fn web_reaches(cluster: &Cluster, backends: &[&str], what: &str) {
    let counts = spread(
        cluster.client(),
        addr("10.96.0.10", 80),
        Proto::Tcp,
        20,
        TIMEOUT,
    )
    .expect("spread");
    assert_spread(&counts, backends, what);
}

/// A node without the iptables tools: a mode that removes iptables mode's leftovers at
/// start skips that (logged at debug), starts, serves, and runs no other program for it.
#[test]
fn without_iptables_tools_other_modes_skip_their_leftovers_quietly() {
    for mode in [Mode("nftables"), Mode("userspace")] {
        let Some(mut cluster) = Cluster::start(
            Mode("iptables"),
            "without_iptables_tools_other_modes_skip_their_leftovers_quietly",
            &standard_services(&backends()),
            &[],
        ) else {
            return;
        };
        cluster.restart_proxy_with(mode, &["--v=4"], Tools::Needed);
        web_reaches(&cluster, &["be0", "be1"], mode.0);
        let log = cluster.proxy.log();
        let loud: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .filter(|l| l.contains("iptables") || l.contains("another mode"))
            .collect();
        assert!(
            loud.is_empty(),
            "{} mode: warnings or errors:\n{log}",
            mode.0
        );
        assert!(
            log.contains("not installed: no rules to remove") && log.contains("iptables-nft-save"),
            "{} mode: no debug line about the skipped removal:\n{log}",
            mode.0
        );
        // Nothing else removed them: they are still there for iptables tools to find.
        assert!(Mode("iptables").rules_present(&cluster.topo.node));
    }
}

/// iptables only: someone flushes the tables (a firewall reload); the canary chain's
/// loss turns the next sync into a full one, and Services work again.
#[test]
fn iptables_rules_flushed_by_someone_else_are_rewritten() {
    let mode = Mode("iptables");
    let Some(mut cluster) = Cluster::start(
        mode,
        "iptables_rules_flushed_by_someone_else_are_rewritten",
        &standard_services(&backends()),
        &[],
    ) else {
        return;
    };
    for args in [
        ["iptables-nft", "-t", "nat", "-F"],
        ["iptables-nft", "-t", "nat", "-X"],
        ["iptables-nft", "-t", "mangle", "-X"],
    ] {
        cluster.topo.node.exec(&args).expect("flush");
    }
    assert!(
        testkit::tcp_request(cluster.client(), addr("10.96.0.10", 80), TIMEOUT).is_err(),
        "flushed nat table should break the Service"
    );
    // Any change triggers a sync; the missing canary makes it full.
    cluster.update(&standard_services(&[ip("10.244.2.2"), ip("fd00:244:2::2")]));
    let log = cluster.proxy.log();
    assert!(log.contains("KUBE-PROXY-CANARY is gone"), "{log}");
    web_reaches(&cluster, &["be1"], "after the flush");
}

/// nftables: the periodic sync finds what someone else broke and repairs it without any
/// change arriving: a deleted element comes back alone (only its map is reloaded), a
/// deleted table is written again; both logged (issue #17, kernel faults).
#[test]
fn nftables_periodic_sync_repairs_what_others_broke() {
    let mode = Mode("nftables");
    let Some(cluster) = Cluster::start(
        mode,
        "nftables_periodic_sync_repairs_what_others_broke",
        &standard_services(&backends()),
        &["--iptables-sync-period=1s"],
    ) else {
        return;
    };
    let node = &cluster.topo.node;
    let reaches = || {
        spread(
            cluster.client(),
            addr("10.96.0.10", 80),
            Proto::Tcp,
            10,
            TIMEOUT,
        )
        .is_ok_and(|counts| counts.keys().all(|k| k == "be0" || k == "be1") && !counts.is_empty())
    };
    let wait_until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}:\n{}",
                cluster.proxy.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    node.exec(&[
        "nft",
        "delete",
        "element",
        "ip",
        "kube-proxy",
        "service-ips",
        "{ 10.96.0.10 . tcp . 80 }",
    ])
    .expect("delete an element");
    wait_until("the element back", &|| {
        node.exec(&["nft", "list", "map", "ip", "kube-proxy", "service-ips"])
            .is_ok_and(|m| m.contains("10.96.0.10 . tcp . 80"))
    });
    assert!(reaches());
    wait_until("the repair logged", &|| {
        cluster.proxy.log().contains("repairing them")
    });

    node.exec(&["nft", "delete", "table", "ip", "kube-proxy"])
        .expect("delete the table");
    wait_until("Services served again", &reaches);
    assert!(
        cluster.proxy.log().contains("rewriting it"),
        "{}",
        cluster.proxy.log()
    ); // Both found and counted: one map repaired, one table rewritten.
    let drift = scrape_metrics(node).lines().find_map(|l| {
        l.strip_prefix("kubeproxy_rules_drift_total ")?
            .parse::<f64>()
            .ok()
    });
    assert!(drift.is_some_and(|d| d >= 2.0), "drift {drift:?}");
}

// ---------------------------------------------------------------------------------------
// Packets to Service IPs that no Service port serves (nftables, as upstream's
// cluster-ips-check), and load-balancer source ranges seen from the load-balancer IP.
// ---------------------------------------------------------------------------------------

const SERVICE_CIDR: &str = "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16]}\n";

/// A host that answers, as "outside", for the addresses given: whatever the node routes
/// on (its default route leads to the client) arrives here instead of vanishing.
fn answer_beyond_node(cluster: &Cluster, ips: &[&str], port: u16) -> ServerGuard {
    for ip in ips {
        cluster
            .client()
            .exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .expect("address on the client");
    }
    testkit::serve(
        cluster.client(),
        "outside",
        port,
        &[Proto::Tcp],
        ServeMode::Name,
    )
    .expect("server beyond the node")
}

fn service_ip_checks(mode: Mode) {
    if mode.skips("service_ip_checks") {
        return;
    }
    let manifests = |with_cidr: bool| {
        let mut m = standard_services(&backends());
        if with_cidr {
            m.push_str(SERVICE_CIDR);
        }
        m
    };
    let Some(mut cluster) = Cluster::start(mode, "service_ip_checks", &manifests(true), &[]) else {
        return;
    };
    // The pod client's packets go through the node's forward path; the node's own
    // through its output path. Without the checks both reach "outside".
    let _outside = answer_beyond_node(&cluster, &["10.96.0.10", "10.96.0.200"], 81);
    let pod = &cluster.topo.pod_client;
    let node = &cluster.topo.node;
    let unserved_port = addr("10.96.0.10", 81);
    let unallocated = addr("10.96.0.200", 81);
    for (who, ns) in [("pod", pod), ("node", node)] {
        let reply = testkit::tcp_request(ns, unserved_port, TIMEOUT);
        assert!(
            matches!(reply, Err(RequestError::Refused)),
            "{who} to a cluster IP on a port no Service uses must be rejected: {reply:?}"
        );
        let reply = testkit::tcp_request(ns, unallocated, Duration::from_millis(700));
        assert!(
            matches!(reply, Err(RequestError::Timeout)),
            "{who} to an unallocated IP of the ServiceCIDR must be dropped: {reply:?}"
        );
    }
    assert_eq!(
        answers(pod, addr("10.96.0.10", 80), 20),
        vec!["be0", "be1"],
        "the served port is unaffected"
    );

    // Without the ServiceCIDR, unallocated addresses are routed on; the change is
    // incremental.
    cluster.update(&manifests(false));
    let pod = &cluster.topo.pod_client;
    assert_eq!(
        answers(pod, unallocated, 3),
        vec!["outside"],
        "no ServiceCIDR holds 10.96.0.200 any more"
    );
    let log = cluster.proxy.log();
    let last = log.lines().rev().find(|l| l.contains(SYNCED));
    assert!(
        last.is_some_and(|l| l.contains("full=false")),
        "expected an incremental sync: {last:?}"
    );
    assert!(
        matches!(
            testkit::tcp_request(pod, unserved_port, TIMEOUT),
            Err(RequestError::Refused)
        ),
        "cluster IPs are checked with or without ServiceCIDRs"
    );
    cluster.update(&manifests(true));
    let pod = &cluster.topo.pod_client;
    let reply = testkit::tcp_request(pod, unallocated, Duration::from_millis(700));
    assert!(
        matches!(reply, Err(RequestError::Timeout)),
        "ServiceCIDR back: dropped again, got {reply:?}"
    );
}

fn load_balancer_ips_pass_source_ranges_that_hold_the_node(mode: Mode) {
    if mode.skips("load_balancer_source_ranges") {
        return;
    }
    let lb_ip = "192.168.200.42";
    let manifests = |ranges: &str| {
        let mut svc = ServiceSpec::new(
            "default",
            "fw",
            &[ip("10.96.0.42")],
            vec![PortSpec::new("http", "TCP", 80, BACKEND_PORT)],
        )
        .endpoints(&[ip(BE0), ip(BE1)]);
        svc.type_ = "LoadBalancer".into();
        svc.load_balancer_ips = vec![ip(lb_ip)];
        svc.extra_spec = vec![format!("  loadBalancerSourceRanges: [{ranges}]")];
        let node = "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.100.1}]\n";
        format!("{}{node}", render(&[svc]))
    };
    // The node's own IP is in a range: the load-balancer IP may be a source too.
    let Some(mut cluster) = Cluster::start(
        mode,
        "load_balancer_ips_pass_source_ranges_that_hold_the_node",
        &manifests("192.168.100.1/32"),
        &[],
    ) else {
        return;
    };
    let lb = addr(lb_ip, 80);
    let client = cluster.client();
    let outside = testkit::tcp_request(client, lb, Duration::from_millis(700));
    assert!(
        matches!(outside, Err(RequestError::Timeout)),
        "the client's own address is not listed: {outside:?}"
    );
    assert_eq!(
        answers(&cluster.topo.node, lb, 30),
        vec!["be0", "be1"],
        "the node"
    );
    // A load balancer handing traffic back: the client's packets leave with the
    // load-balancer IP as their source, and replies to it come back to the client.
    for rule in [
        "add table ip lb".to_string(),
        "add chain ip lb post { type nat hook postrouting priority srcnat; }".to_string(),
        format!("add rule ip lb post ip daddr {lb_ip} snat to {lb_ip}"),
    ] {
        client.exec(&["nft", &rule]).expect("SNAT in the client");
    }
    cluster
        .topo
        .node
        .exec(&[
            "ip",
            "route",
            "add",
            &format!("{lb_ip}/32"),
            "via",
            "192.168.100.2",
        ])
        .expect("route back to the load balancer");
    assert_eq!(
        answers(client, lb, 20),
        vec!["be0", "be1"],
        "source = load-balancer IP, node IP in the ranges"
    );

    // The node's IP in no range: neither the load-balancer IP nor the node gets in.
    cluster.update(&manifests("10.244.0.0/16"));
    let client = cluster.client();
    let reply = testkit::tcp_request(client, lb, Duration::from_millis(700));
    assert!(
        matches!(reply, Err(RequestError::Timeout)),
        "source = load-balancer IP, node IP not in the ranges: {reply:?}"
    );
    let reply = testkit::tcp_request(&cluster.topo.node, lb, Duration::from_millis(700));
    assert!(
        matches!(reply, Err(RequestError::Timeout)),
        "the node itself, not in the ranges: {reply:?}"
    );
    assert_eq!(
        answers(&cluster.topo.pod_client, lb, 30),
        vec!["be0", "be1"],
        "a listed source still gets in"
    );
}

const LOCALHOST_NODEPORTS: [&str; 2] = [
    "--nodeport-addresses=primary,localhost",
    "--feature-gates=KubeProxyNFTablesLocalhostNodePorts=true",
];

/// nftables mode with `--nodeport-addresses=primary,localhost` and the gate (upstream
/// v1.37): TCP NodePorts answer on 127.0.0.1 and ::1 through user-space listeners;
/// UDP NodePorts and TCP ones without a usable endpoint are refused on loopback, even
/// when another program listens on the port.
#[test]
fn nftables_serves_nodeports_on_loopback_with_the_gate() {
    let local_ext = |be0_node: &'static str| {
        service_yaml(
            "local-ext",
            "10.96.0.40",
            "TCP",
            80,
            BACKEND_PORT,
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[Ep::ready(BE0, be0_node), Ep::ready(BE1, "node-b")],
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30040}")
    };
    let sticky = service_yaml(
        "sticky",
        "10.96.0.30",
        "TCP",
        80,
        BACKEND_PORT,
        "  type: NodePort\n  sessionAffinity: ClientIP",
        &[Ep::ready(BE0, "node-b"), Ep::ready(BE1, "node-b")],
    )
    .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30030}");
    let manifests = |web: &[IpAddr], be0_node: &'static str| {
        format!("{}{}{sticky}", standard_services(web), local_ext(be0_node))
    };
    let Some(mut cluster) = Cluster::start(
        Mode("nftables"),
        "nftables_serves_nodeports_on_loopback_with_the_gate",
        &manifests(&backends(), "node-b"),
        &LOCALHOST_NODEPORTS,
    ) else {
        return;
    };
    let node = &cluster.topo.node;
    // Another program on the UDP NodePort must not get the loopback traffic.
    let _squatter = testkit::serve(node, "squatter", 30053, &[Proto::Udp], ServeMode::Name)
        .expect("UDP server on the NodePort");
    for lo in ["127.0.0.1", "::1"] {
        assert_eq!(
            answers(node, addr(lo, 30080), 30),
            vec!["be0", "be1"],
            "{lo}"
        );
        let udp = testkit::udp_request(node, addr(lo, 30053), Duration::from_millis(700));
        assert!(
            matches!(udp, Err(RequestError::Refused)),
            "UDP on {lo}: {udp:?}"
        );
        let empty = testkit::tcp_request(node, addr(lo, 30099), TIMEOUT);
        assert!(
            matches!(empty, Err(RequestError::Refused)),
            "no endpoints on {lo}: {empty:?}"
        );
    }
    assert_eq!(
        answers(node, addr("127.0.0.1", 30030), 20).len(),
        1,
        "ClientIP affinity through the listener"
    );
    // externalTrafficPolicy: Local with no endpoint on this node: no listener.
    let local = testkit::tcp_request(node, addr("127.0.0.1", 30040), TIMEOUT);
    assert!(matches!(local, Err(RequestError::Refused)), "{local:?}");
    // The v1.37 metrics: listeners per family, rejections per family and protocol.
    let metrics = scrape_metrics(node);
    for line in [
        "kubeproxy_nftables_localhost_nodeport_listeners{ip_family=\"IPv4\"} 2",
        "kubeproxy_nftables_localhost_nodeport_listeners{ip_family=\"IPv6\"} 1",
        "kubeproxy_nftables_localhost_nodeport_rejected_packets_total{ip_family=\"IPv4\",protocol=\"UDP\"} 1",
        "kubeproxy_nftables_localhost_nodeport_rejected_packets_total{ip_family=\"IPv6\",protocol=\"UDP\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }

    // Endpoint changes reach the listeners; a local endpoint opens the Local one.
    cluster.update(&manifests(
        &[ip("10.244.2.2"), ip("fd00:244:2::2")],
        "node-a",
    ));
    let node = &cluster.topo.node;
    assert_eq!(answers(node, addr("127.0.0.1", 30080), 20), vec!["be1"]);
    assert_eq!(answers(node, addr("::1", 30080), 20), vec!["be1"]);
    assert_eq!(answers(node, addr("127.0.0.1", 30040), 20), vec!["be0"]);

    // The Service gone: its listeners are closed.
    cluster.update(&local_ext("node-a"));
    let gone = testkit::tcp_request(&cluster.topo.node, addr("127.0.0.1", 30080), TIMEOUT);
    assert!(matches!(gone, Err(RequestError::Refused)), "{gone:?}");
}

/// The proxy's `/metrics` on its default address, fetched from inside `node`.
fn scrape_metrics(node: &Netns) -> String {
    fetch(node, "/metrics")
}

/// A GET of `path` from the proxy's metrics server, from inside `node`: the whole answer.
fn fetch(node: &Netns, path: &str) -> String {
    use std::io::{Read, Write};
    node.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:10249")?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok::<_, std::io::Error>(body)
    })
    .expect("enter the node")
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `--service-counters` (issue #16): real connections through a cluster IP and a NodePort
/// are counted exactly, per destination kind, in `/metrics` and `/debug/services`; the
/// counting does not make the periodic re-sync rewrite anything (the rules keep their
/// handles); a deleted Service's series and counters go; without the flag there is no
/// series, no counter map and no counter.
#[test]
fn nftables_service_counters_count_real_connections() {
    let Some(mut cluster) = Cluster::start(
        Mode("nftables"),
        "nftables_service_counters_count_real_connections",
        &standard_services(&backends()),
        &["--service-counters", "--iptables-sync-period=1s"],
    ) else {
        return;
    };
    let web = |scrape: &str, what: &str, dest: &str| -> Option<f64> {
        let prefix = format!(
            "kubeproxy_service_new_connection_{what}_total{{destination=\"{dest}\",namespace=\"default\",port=\"http\",protocol=\"TCP\",service=\"web\"}} "
        );
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    };
    let node = &cluster.topo.node;
    let before = scrape_metrics(node);
    for dest in ["cluster_ip", "node_port", "external_ip", "load_balancer_ip"] {
        assert_eq!(web(&before, "packets", dest), Some(0.0), "{dest}\n{before}");
    }
    for (dest, n) in [
        (addr("10.96.0.10", 80), 5),
        (addr("192.168.100.1", 30080), 3),
    ] {
        let counts = spread(cluster.client(), dest, Proto::Tcp, n, TIMEOUT).expect("requests");
        let answered: usize = ["be0", "be1"].iter().filter_map(|b| counts.get(*b)).sum();
        assert_eq!(answered, n, "{dest}: {counts:?}");
    }
    let after = scrape_metrics(node);
    assert_eq!(web(&after, "packets", "cluster_ip"), Some(5.0), "{after}");
    assert_eq!(web(&after, "packets", "node_port"), Some(3.0), "{after}");
    assert_eq!(web(&after, "packets", "external_ip"), Some(0.0), "{after}");
    // A SYN is at least 40 bytes (IPv4 and TCP headers).
    let bytes = web(&after, "bytes", "cluster_ip").expect("bytes series");
    assert!(bytes >= 5.0 * 40.0, "{bytes}");

    let debug = fetch(node, "/debug/services?namespace=default&name=web");
    let body = debug.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
    let http = v["servicePorts"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "default/web:http/tcp"))
        .unwrap_or_else(|| panic!("no web:http in {v}"));
    assert_eq!(http["newConnections"]["cluster_ip"]["packets"], 5, "{v}");
    assert_eq!(http["newConnections"]["node_port"]["packets"], 3, "{v}");
    let text = fetch(node, "/debug/services?format=text&name=web");
    assert!(
        text.contains("NEW CONNECTIONS") && text.contains("cluster_ip=5/"),
        "{text}"
    );

    // Someone else commits: the periodic re-syncs read our table back (counters and
    // all) and find nothing to repair, so no rule is written again.
    let handles = || {
        node.exec(&["nft", "-a", "list", "chain", "ip", "kube-proxy", "internal"])
            .expect("list chain")
    };
    let rules_before = handles();
    node.exec(&["nft", "add", "table", "ip", "someone-else"])
        .expect("another table");
    let syncs = cluster.syncs + 3;
    assert!(
        cluster
            .proxy
            .wait_for_log(SYNCED, syncs, Duration::from_secs(10)),
        "no periodic syncs:\n{}",
        cluster.proxy.log()
    );
    assert_eq!(handles(), rules_before, "rules written again");
    let drift = scrape_metrics(node).lines().find_map(|l| {
        l.strip_prefix("kubeproxy_rules_drift_total ")?
            .parse::<f64>()
            .ok()
    });
    assert_eq!(drift, Some(0.0), "{}", cluster.proxy.log());

    // `web` deleted: its series and counters go.
    let svc_counters = |node: &Netns| {
        node.exec(&["nft", "list", "counters", "table", "ip", "kube-proxy"])
            .expect("list counters")
            .matches("counter svc-")
            .count()
    };
    let counters_before = svc_counters(&cluster.topo.node);
    cluster.syncs = syncs;
    cluster.update(&service_yaml(
        "other",
        "10.96.0.20",
        "TCP",
        80,
        BACKEND_PORT,
        "",
        &[Ep::ready(BE0, "node-b")],
    ));
    let node = &cluster.topo.node;
    let wait_until = |what: &str, f: &dyn Fn() -> bool| {
        assert!(
            testkit::wait_until(Duration::from_secs(5), Duration::from_millis(100), f),
            "{what}"
        );
    };
    wait_until("web's series gone", &|| {
        !scrape_metrics(node).contains("service=\"web\"")
    });
    let scrape = scrape_metrics(node);
    assert!(scrape.contains("service=\"other\""), "{scrape}");
    assert_eq!(
        svc_counters(node),
        1,
        "only other's cluster IP (before: {counters_before})"
    );

    // The flag off: no series, no counter map, no Service counter.
    cluster.restart_proxy_with(Mode("nftables"), &[], Tools::Needed);
    let node = &cluster.topo.node;
    assert!(!scrape_metrics(node).contains("kubeproxy_service_"));
    let table = node
        .exec(&["nft", "list", "table", "ip", "kube-proxy"])
        .expect("list table");
    assert!(!table.contains("counters"), "{table}");
    assert_eq!(svc_counters(node), 0);
}

/// Without the gate, nftables mode serves no NodePort on loopback (as upstream) and says
/// why once, instead of silently ignoring `localhost`.
#[test]
fn nftables_loopback_nodeports_need_the_gate() {
    let Some(cluster) = Cluster::start(
        Mode("nftables"),
        "nftables_loopback_nodeports_need_the_gate",
        &standard_services(&backends()),
        &LOCALHOST_NODEPORTS[..1],
    ) else {
        return;
    };
    let reply = testkit::tcp_request(&cluster.topo.node, addr("127.0.0.1", 30080), TIMEOUT);
    assert!(matches!(reply, Err(RequestError::Refused)), "{reply:?}");
    assert!(
        cluster
            .proxy
            .log()
            .contains("KubeProxyNFTablesLocalhostNodePorts"),
        "{}",
        cluster.proxy.log()
    );
    // NodePorts still answer on the node's primary IP.
    assert_eq!(
        answers(cluster.client(), addr("192.168.100.1", 30080), 20),
        vec!["be0", "be1"]
    );
}

/// Instantiates every behaviour of the suite for one mode.
macro_rules! datapath_suite {
    ($mode:ident) => {
        mod $mode {
            use super::*;
            const MODE: Mode = Mode(stringify!($mode));
            #[test]
            fn every_service_ip_reaches_every_backend() {
                super::every_service_ip_reaches_every_backend(MODE)
            }
            #[test]
            fn service_without_endpoints_is_refused_not_dropped() {
                super::service_without_endpoints_is_refused_not_dropped(MODE)
            }
            #[test]
            fn removed_endpoint_stops_getting_new_connections() {
                super::removed_endpoint_stops_getting_new_connections(MODE)
            }
            #[test]
            fn pod_reaching_itself_through_its_service_is_masqueraded() {
                super::pod_reaching_itself_through_its_service_is_masqueraded(MODE)
            }
            #[test]
            fn bad_manifests_and_hostile_names_do_not_disturb_other_services() {
                super::bad_manifests_and_hostile_names_do_not_disturb_other_services(MODE)
            }
            #[test]
            fn cleanup_removes_all_rules_and_succeeds_when_there_are_none() {
                super::cleanup_removes_all_rules_and_succeeds_when_there_are_none(MODE)
            }
            #[test]
            fn session_affinity_keeps_a_client_on_one_endpoint() {
                super::session_affinity_keeps_a_client_on_one_endpoint(MODE)
            }
            #[test]
            fn external_traffic_policy_local() {
                super::external_traffic_policy_local(MODE)
            }
            #[test]
            fn internal_traffic_policy_local() {
                super::internal_traffic_policy_local(MODE)
            }
            #[test]
            fn load_balancer_source_ranges() {
                super::load_balancer_source_ranges(MODE)
            }
            #[test]
            fn endpoint_selection_like_upstream() {
                super::endpoint_selection_like_upstream(MODE)
            }
            #[test]
            fn masquerade_follows_detect_local_mode() {
                super::masquerade_follows_detect_local_mode(MODE)
            }
            #[test]
            fn internal_traffic_policy_local_masquerades_like_cluster() {
                super::internal_traffic_policy_local_masquerades_like_cluster(MODE)
            }
            #[test]
            fn external_traffic_policy_local_short_circuits_pods_and_node() {
                super::external_traffic_policy_local_short_circuits_pods_and_node(MODE)
            }
            #[test]
            fn detect_local_mode_decides_who_is_a_pod() {
                super::detect_local_mode_decides_who_is_a_pod(MODE)
            }
            #[test]
            fn single_stack_services_stay_in_their_family() {
                super::single_stack_services_stay_in_their_family(MODE)
            }
            #[test]
            fn legacy_ip_forms_are_served_like_upstream() {
                super::legacy_ip_forms_are_served_like_upstream(MODE)
            }
            #[test]
            fn udp_client_follows_replaced_endpoint() {
                super::udp_client_follows_replaced_endpoint(MODE)
            }
            #[test]
            fn restart_keeps_udp_flows_on_their_endpoint() {
                super::restart_keeps_udp_flows_on_their_endpoint(MODE)
            }
            #[test]
            fn external_ips_not_served_without_their_feature_gate() {
                super::external_ips_not_served_without_their_feature_gate(MODE)
            }
            #[test]
            fn udp_stale_flows_reconciled_like_upstream() {
                super::udp_stale_flows_reconciled_like_upstream(MODE)
            }
            #[test]
            fn service_ip_checks() {
                super::service_ip_checks(MODE)
            }

            #[test]
            fn load_balancer_ips_pass_source_ranges_that_hold_the_node() {
                super::load_balancer_ips_pass_source_ranges_that_hold_the_node(MODE)
            }

            #[test]
            fn starting_removes_the_other_modes_rules() {
                super::starting_removes_the_other_modes_rules(MODE)
            }
        }
    };
}

datapath_suite!(nftables);
datapath_suite!(userspace);
datapath_suite!(iptables);

/// ipvs mode starts with upstream v1.35's deprecation warning and still syncs (the ipvs
/// datapath itself is tested in a VM: `ipvs_vm.rs`).
#[test]
fn ipvs_mode_logs_upstreams_deprecation_warning() {
    if !testkit::root_or_skip("ipvs_mode_logs_upstreams_deprecation_warning") {
        return;
    }
    let topo = Topology::new(0).expect("topology");
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), &node_yaml("", "10.244.0.0/16"));
    let mut proxy = start_proxy(&topo, dir.path(), Mode("ipvs"), &[]);
    let warning = kube_proxy::app::IPVS_DEPRECATION;
    assert!(
        proxy.wait_for_log(warning, 1, Duration::from_secs(10)),
        "no deprecation warning; log:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_default();
    assert!(
        line.contains("ERROR"),
        "logged at error level as upstream: {line}"
    );
    assert!(
        proxy.is_running(),
        "ipvs mode must keep running; log:\n{log}"
    );
}
