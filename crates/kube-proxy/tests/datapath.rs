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
use testkit::{spread, Netns, Proto, ProxyProcess, RequestError, ServerGuard, Topology};

const BACKEND_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
const SYNCED: &str = "synced rules";

/// A proxy mode, as `--proxy-mode` spells it.
#[derive(Debug, Clone, Copy)]
struct Mode(&'static str);

impl Mode {
    const ALL: [Mode; 2] = [Mode("nftables"), Mode("iptables")];

    /// Whether this mode's rules are present in `node`'s kernel.
    fn rules_present(self, node: &Netns) -> bool {
        match self.0 {
            "nftables" => node
                .exec(&["nft", "list", "tables"])
                .expect("nft list tables")
                .contains("kube-proxy"),
            // Either iptables backend, either family.
            "iptables" => [":KUBE-SERVICES ", ":KUBE-PROXY-CANARY ", ":KUBE-SEP-"]
                .iter()
                .any(|chain| iptables_dump(node).contains(chain)),
            other => panic!("no rule check for mode {other}"),
        }
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
        let servers = topo.serve_all(BACKEND_PORT).expect("backend servers");
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

    /// Stops the proxy and starts it again in `mode`, on the same manifests.
    fn restart_proxy(&mut self, mode: Mode) {
        let status = self.stop_proxy();
        assert!(status.success(), "proxy exit status {status}");
        self.proxy = start_proxy(&self.topo, self.dir.path(), mode, &[]);
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
    let mode_flag = format!("--proxy-mode={}", mode.0);
    let manifests_dir = dir.join("manifests");
    let mut args = vec![
        mode_flag.as_str(),
        "--manifests",
        manifests_dir.to_str().expect("utf-8 path"),
        "--hostname-override=node-a",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/48",
        "--iptables-min-sync-period=0s",
        "--v=2",
    ];
    args.extend_from_slice(extra_args);
    ProxyProcess::start(&topo.node, &binary(), &args, &dir.join("proxy.log")).expect("start proxy")
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
    let counts = spread(
        cluster.client(),
        addr("10.96.0.10", 80),
        Proto::Tcp,
        20,
        TIMEOUT,
    )
    .expect("spread");
    assert_spread(&counts, &["be0", "be1"], "web next to bad objects");
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
    // Rules survive the proxy's exit (traffic keeps flowing during restarts).
    assert!(mode.rules_present(&topo.node), "{}", cluster.ruleset());
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
        cluster.restart_proxy(mode);
        assert!(
            !other.rules_present(&cluster.topo.node),
            "{} rules left after starting in {} mode:\n{}",
            other.0,
            mode.0,
            cluster.ruleset()
        );
        let counts = spread(
            cluster.client(),
            addr("10.96.0.10", 80),
            Proto::Tcp,
            20,
            TIMEOUT,
        )
        .expect("spread");
        assert_spread(&counts, &["be0", "be1"], "after switching modes");
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
    let counts = spread(
        cluster.client(),
        addr("10.96.0.10", 80),
        Proto::Tcp,
        20,
        TIMEOUT,
    )
    .expect("spread");
    assert_spread(&counts, &["be1"], "after the flush");
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
            fn starting_removes_the_other_modes_rules() {
                super::starting_removes_the_other_modes_rules(MODE)
            }
        }
    };
}

datapath_suite!(nftables);
datapath_suite!(iptables);
