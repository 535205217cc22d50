//! End to end, as root: the real binary in a network namespace, fed by the fake API server
//! through kube-rs (a kubeconfig pointing at `http://127.0.0.1:PORT`). The fake server's
//! socket is bound inside the node namespace, so only the proxy there can reach it; the
//! proxy programs nftables in that namespace only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};
use testkit::{Netns, Proto, ProxyProcess, Topology};

const SYNCED: &str = "synced rules";
const NODE: &str = "node-a";

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"))
}

fn service(name: &str, cluster_ip: &str, port: u16, labels: Value) -> Value {
    json!({
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}],
        },
    })
}

fn slice(name: &str, service: &str, ips: &[String]) -> Value {
    json!({
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

fn node_object() -> Value {
    json!({
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.100.1"}]},
    })
}

fn ips(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A node namespace with the fake API server listening inside it and the proxy pointed
/// at it.
struct ApiNode {
    api: FakeApiServer,
    addr: SocketAddr,
    proxy: Option<ProxyProcess>,
    dir: tempfile::TempDir,
    /// Keeps the namespaces alive; `node` is the proxy's.
    topo: Option<Topology>,
    bare: Option<Netns>,
}

impl ApiNode {
    /// `with_topology`: a full topology (client, backends) for traffic; else a bare node.
    fn new(name: &str, with_topology: bool) -> Option<ApiNode> {
        if !testkit::root_or_skip(name) {
            return None;
        }
        let (topo, bare) = if with_topology {
            (Some(Topology::new(2).expect("topology")), None)
        } else {
            (None, Some(Netns::new().expect("netns")))
        };
        let node = topo
            .as_ref()
            .map(|t| &t.node)
            .or(bare.as_ref())
            .expect("a node");
        let listener = node
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("enter node namespace")
            .expect("bind in node namespace");
        let addr = listener.local_addr().expect("addr");
        drop(listener); // `serve` or `serve_later` binds again
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: proxy\n\
                 current-context: fake\nusers:\n- name: proxy\n  user: {{}}\n"
            ),
        )
        .expect("kubeconfig");
        Some(ApiNode {
            api: FakeApiServer::with_bookmark_interval(Duration::from_millis(500))
                .expect("fake server"),
            addr,
            proxy: None,
            dir,
            topo,
            bare,
        })
    }

    fn node(&self) -> &Netns {
        self.topo
            .as_ref()
            .map(|t| &t.node)
            .or(self.bare.as_ref())
            .expect("a node")
    }

    /// (Re)starts the fake server on its address, inside the node namespace.
    fn serve(&mut self) {
        let addr = self.addr;
        let listener = self
            .node()
            .run(move || std::net::TcpListener::bind(addr))
            .expect("enter node namespace")
            .expect("bind again");
        self.api.serve(listener).expect("serve");
    }

    fn start_proxy(&mut self, extra: &[&str]) {
        let kubeconfig = self.dir.path().join("kubeconfig");
        let mut args = vec![
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname-override",
            NODE,
            "--cluster-cidr=10.244.0.0/16",
            "--v=2",
        ];
        args.extend_from_slice(extra);
        let log = self.dir.path().join("proxy.log");
        self.proxy = Some(ProxyProcess::start(self.node(), &binary(), &args, &log).expect("start"));
    }

    fn proxy(&mut self) -> &mut ProxyProcess {
        self.proxy.as_mut().expect("proxy started")
    }

    fn log(&self) -> String {
        self.proxy
            .as_ref()
            .map(ProxyProcess::log)
            .unwrap_or_default()
    }

    fn syncs(&self) -> usize {
        self.log().matches(SYNCED).count()
    }

    fn ruleset(&self) -> String {
        self.node()
            .exec(&["nft", "list", "ruleset"])
            .expect("nft list ruleset")
    }

    /// Waits until the ruleset satisfies `check`.
    fn wait_rules(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) {
        let ok = testkit::wait_until(timeout, Duration::from_millis(50), || {
            check(&self.ruleset())
        });
        assert!(ok, "rules never showed {what}");
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- proxy log ---\n{}\n--- ruleset ---\n{}",
                self.log(),
                self.ruleset()
            );
        }
    }
}

/// A Service port in the rules (`ip . proto . port`: in the service-ips map, or in the
/// no-endpoint set when it has no endpoints).
fn has_service(rules: &str, ip: &str, port: u16) -> bool {
    rules.contains(&format!("{ip} . tcp . {port}"))
}

/// An endpoint in the endpoints maps (`... : ip . port`).
fn has_endpoint(rules: &str, ip: &str) -> bool {
    rules.contains(&format!(": {ip} . 8080"))
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn api_initial_sync_then_changes_reach_the_kernel_and_traffic() {
    let Some(mut n) = ApiNode::new("api_initial_sync_then_changes_reach_the_kernel", true) else {
        return;
    };
    let (servers, be0, be1) = {
        let topo = n.topo.as_ref().expect("topology");
        (
            topo.serve_all(8080).expect("backends"),
            topo.backends[0].ipv4.to_string(),
            topo.backends[1].ipv4.to_string(),
        )
    };
    n.api
        .apply(service("web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api
        .apply(slice("web-1", "web", &ips(&[be0.as_str()])))
        .expect("apply");
    // Another proxy's Service and a headless one's slice: never ours.
    n.api
        .apply(service(
            "theirs",
            "10.96.0.20",
            80,
            json!({"service.kubernetes.io/service-proxy-name": "other"}),
        ))
        .expect("apply");
    let mut headless = service("dns-only", "None", 53, json!({}));
    headless["spec"]["clusterIPs"] = json!(["None"]);
    n.api.apply(headless).expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    let rules = n.ruleset();
    assert!(has_service(&rules, "10.96.0.10", 80), "web missing");
    assert!(has_endpoint(&rules, &be0));
    assert!(
        !has_service(&rules, "10.96.0.20", 80),
        "other proxy's Service programmed"
    );

    // Real traffic through the ClusterIP reaches be0 only.
    let target: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let spread = testkit::spread(
        &n.topo.as_ref().expect("topology").client,
        target,
        Proto::Tcp,
        6,
        Duration::from_secs(2),
    )
    .expect("requests");
    assert_eq!(spread.keys().collect::<Vec<_>>(), ["be0"], "{spread:?}");

    // Update: a second endpoint; add: a Service; delete: the first one's slice and Service.
    n.api
        .apply(slice("web-1", "web", &ips(&[be0.as_str(), be1.as_str()])))
        .expect("apply");
    n.wait_rules("be1", WAIT, |r| has_endpoint(r, &be1));
    let spread = testkit::spread(
        &n.topo.as_ref().expect("topology").client,
        target,
        Proto::Tcp,
        20,
        Duration::from_secs(2),
    )
    .expect("requests");
    assert_eq!(
        spread.keys().collect::<Vec<_>>(),
        ["be0", "be1"],
        "{spread:?}"
    );

    n.api
        .apply(service("api", "10.96.0.11", 443, json!({})))
        .expect("apply");
    n.wait_rules("new Service", WAIT, |r| has_service(r, "10.96.0.11", 443));
    assert!(n.api.delete("Service", "default", "web"));
    assert!(n.api.delete("EndpointSlice", "default", "web-1"));
    n.wait_rules("web gone", WAIT, |r| !has_service(r, "10.96.0.10", 80));
    assert!(has_service(&n.ruleset(), "10.96.0.11", 443));
    // The initial lists were served as client-go's reflectors get them (from the watch
    // cache, `resourceVersion=0`: one response, no paging), and the Node asked by name.
    let requests = n.api.requests();
    let lists: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && !r.contains("watch="))
        .collect();
    assert!(
        !lists.is_empty()
            && lists
                .iter()
                .all(|r| r.contains("resourceVersion=0") && !r.contains("limit=")),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/nodes")
            && r.contains("fieldSelector=metadata.name%3Dnode-a")),
        "{requests:?}"
    );
    // Headless Services are left out by the server (upstream v1.32+'s field selector, which
    // the fake server applies), on the list and the watch alike.
    let services: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?"))
        .collect();
    assert!(
        services.iter().any(|r| r.contains("watch=true"))
            && services
                .iter()
                .all(|r| r.contains("fieldSelector=spec.clusterIP%21%3DNone")),
        "{services:?}"
    );
    // Every API request is counted as upstream's client does (rest_client_* metrics).
    let host = n.addr.to_string();
    let scrape = scrape_metrics(n.node());
    let requests_line =
        format!("rest_client_requests_total{{code=\"200\",host=\"{host}\",method=\"GET\"}}");
    assert!(
        scrape.contains(&requests_line),
        "{requests_line} missing:\n{scrape}"
    );
    let duration_line =
        format!("rest_client_request_duration_seconds_count{{host=\"{host}\",verb=\"GET\"}}");
    assert!(scrape.contains(&duration_line), "{duration_line} missing");
    assert!(n.proxy().is_running());
    drop(servers);
}

/// `/metrics` from the proxy's default metrics address, inside the node namespace.
fn scrape_metrics(node: &Netns) -> String {
    use std::io::{Read, Write};
    node.run(|| {
        let mut stream = std::net::TcpStream::connect("127.0.0.1:10249").expect("metrics server");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("response");
        body
    })
    .expect("enter the node namespace")
}

#[test]
fn api_gone_relists_without_dropping_rules() {
    let Some(mut n) = ApiNode::new("api_gone_relists_without_dropping_rules", false) else {
        return;
    };
    n.api
        .apply(service("web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api
        .apply(slice("web-1", "web", &ips(&["10.244.1.2"])))
        .expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    let lists_before = n.log().matches("relisted from the API").count();
    // A slow relist: the rules must stay while it is in progress.
    n.api.set_delay(Duration::from_millis(1500));
    n.api.expire_watches();
    n.api
        .apply(slice("web-1", "web", &ips(&["10.244.1.2", "10.244.2.2"])))
        .expect("apply");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(
            has_endpoint(&n.ruleset(), "10.244.1.2"),
            "rules dropped during the relist"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    n.api.set_delay(Duration::ZERO);
    n.wait_rules("the change made before the relist", WAIT, |r| {
        has_endpoint(r, "10.244.2.2") && has_endpoint(r, "10.244.1.2")
    });
    // Each kind relists on its own; the Services' may finish after the slices'.
    assert!(
        testkit::wait_until(WAIT, Duration::from_millis(50), || {
            n.log().matches("relisted from the API").count() > lists_before
        }),
        "no relist after 410"
    );
    assert!(
        n.log().contains("410") || n.log().contains("Expired"),
        "410 not logged"
    );
}

#[test]
fn api_down_at_start_programs_nothing_until_it_answers() {
    let Some(mut n) = ApiNode::new("api_down_at_start_programs_nothing", false) else {
        return;
    };
    n.api
        .apply(service("web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(n.proxy().is_running(), "proxy gave up: {}", n.log());
    assert_eq!(n.syncs(), 0, "synced without the API");
    assert!(
        !n.node()
            .exec(&["nft", "list", "tables"])
            .expect("nft")
            .contains("kube-proxy"),
        "rules programmed before the API answered"
    );
    assert!(
        n.log().contains("watch failed"),
        "no retry logged:\n{}",
        n.log()
    );
    n.serve();
    assert!(
        n.proxy().wait_for_log(SYNCED, 1, WAIT),
        "no sync after the API came up"
    );
    assert!(has_service(&n.ruleset(), "10.96.0.10", 80));
}

/// The IPv4 ranges `cluster-ips-check` drops (nft lists one without braces).
fn dropped_ranges(rules: &str) -> Vec<String> {
    rules
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("ip daddr ")?.strip_suffix(" drop"))
        .map(|set| {
            set.trim_matches(|c| c == '{' || c == '}' || c == ' ')
                .split(", ")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn service_cidr(name: &str, cidr: &str) -> Value {
    json!({
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": [cidr]},
    })
}

#[test]
fn api_service_cidrs_reach_the_kernel_and_a_refusal_does_not_block() {
    let Some(mut n) = ApiNode::new("api_service_cidrs", false) else {
        return;
    };
    n.api
        .apply(service("web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.api
        .apply(service_cidr("kubernetes", "10.96.0.0/16"))
        .expect("apply");
    // RBAC without the grant: the proxy still programs its Services.
    n.api.set_forbidden("ServiceCIDR", true);
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "{}", n.log());
    let rules = n.ruleset();
    assert!(has_service(&rules, "10.96.0.10", 80));
    assert!(!rules.contains("10.96.0.0/16"), "{rules}");
    assert!(n.log().contains("cannot list ServiceCIDRs"), "{}", n.log());

    // Granted later: the watcher's retry lists them and the drop appears; later changes
    // follow.
    n.api.set_forbidden("ServiceCIDR", false);
    n.wait_rules("the ServiceCIDR", Duration::from_secs(30), |r| {
        dropped_ranges(r) == ["10.96.0.0/16"]
    });
    n.api
        .apply(service_cidr("extra", "10.100.0.0/16"))
        .expect("apply");
    n.wait_rules("both ServiceCIDRs", WAIT, |r| {
        dropped_ranges(r) == ["10.96.0.0/16", "10.100.0.0/16"]
    });
    assert!(n.api.delete("ServiceCIDR", "", "kubernetes"));
    n.wait_rules("the remaining ServiceCIDR", WAIT, |r| {
        dropped_ranges(r) == ["10.100.0.0/16"]
    });
}

#[test]
fn api_restart_mid_watch_loses_no_rules_and_catches_up() {
    let Some(mut n) = ApiNode::new("api_restart_mid_watch", false) else {
        return;
    };
    for i in 0..3 {
        n.api
            .apply(service(
                &format!("s{i}"),
                &format!("10.96.0.{}", 10 + i),
                80,
                json!({}),
            ))
            .expect("apply");
        n.api
            .apply(slice(
                &format!("s{i}-1"),
                &format!("s{i}"),
                &ips(&[&format!("10.244.1.{}", 2 + i)]),
            ))
            .expect("apply");
    }
    n.api.apply(node_object()).expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    n.wait_rules("all three", WAIT, |r| {
        (0..3).all(|i| has_service(r, &format!("10.96.0.{}", 10 + i), 80))
    });
    let syncs = n.syncs();

    n.api.stop();
    // Changes written while this proxy cannot see the server (as through another replica).
    assert!(n.api.delete("Service", "default", "s0"));
    n.api
        .apply(service("s3", "10.96.0.13", 80, json!({})))
        .expect("apply");
    std::thread::sleep(Duration::from_secs(2));
    let rules = n.ruleset();
    assert!(
        (0..3).all(|i| has_service(&rules, &format!("10.96.0.{}", 10 + i), 80)),
        "rules lost while the server was down"
    );
    assert_eq!(n.syncs(), syncs, "synced on an error");
    n.serve();
    n.wait_rules("catch-up", WAIT, |r| {
        has_service(r, "10.96.0.13", 80)
            && !has_service(r, "10.96.0.10", 80)
            && has_service(r, "10.96.0.11", 80)
            && has_service(r, "10.96.0.12", 80)
    });
}

/// CPU seconds (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Faults of the API server one after another (issue #17): slow answers during a relist,
/// down and up again and again, every watch ended with 410 Gone, answers that are not
/// JSON. Throughout, the programmed rules stay; once the server answers properly the last
/// state wins; the proxy does not spin (CPU stays low); `/healthz` stays healthy, as
/// upstream's, since no change waits for a sync.
#[test]
fn api_faults_keep_rules_and_the_last_state_wins() {
    let Some(mut n) = ApiNode::new("api_faults_keep_rules", false) else {
        return;
    };
    n.api.apply(node_object()).expect("apply");
    n.api
        .apply(service("s0", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    n.wait_rules("s0", WAIT, |r| has_service(r, "10.96.0.10", 80));
    let pid = n.proxy().pid();
    let cpu0 = cpu_seconds(pid);
    let (rss0, _) = memory_mib(pid);
    let started = std::time::Instant::now();
    let add = |n: &ApiNode, i: u8| {
        n.api
            .apply(service(
                &format!("s{i}"),
                &format!("10.96.0.{}", 10 + i),
                80,
                json!({}),
            ))
            .expect("apply");
    };
    let all_there =
        |r: &str, upto: u8| (0..=upto).all(|i| has_service(r, &format!("10.96.0.{}", 10 + i), 80));

    // Slow: every answer takes 5 s, and the watches are cut, so the proxy must relist.
    n.api.set_delay(Duration::from_secs(5));
    n.api.drop_connections();
    add(&n, 1);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        has_service(&n.ruleset(), "10.96.0.10", 80),
        "rules lost while slow"
    );
    n.api.set_delay(Duration::ZERO);
    n.wait_rules("s1 after the slow server", WAIT, |r| all_there(r, 1));

    // Down and up, five times a second apart; a change made while it is down.
    for round in 0..5u8 {
        n.api.stop();
        if round == 2 {
            add(&n, 2);
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            all_there(&n.ruleset(), 1),
            "rules lost while the server was down"
        );
        n.serve();
        std::thread::sleep(Duration::from_millis(500));
    }
    n.wait_rules("s2 after the outages", WAIT, |r| all_there(r, 2));

    // Every watch ends with 410 Gone (history compacted): relists.
    n.api.compact();
    n.api.expire_watches();
    add(&n, 3);
    n.wait_rules("s3 after 410 Gone", WAIT, |r| all_there(r, 3));

    // Garbage instead of JSON, while a change is made; then proper answers again.
    n.api.set_garbage(true);
    n.api.drop_connections();
    add(&n, 4);
    assert!(n.api.delete("Service", "default", "s0"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        all_there(&n.ruleset(), 3),
        "rules lost while the server sent garbage"
    );
    n.api.set_garbage(false);
    n.wait_rules("the last state after the garbage", WAIT, |r| {
        !has_service(r, "10.96.0.10", 80)
            && (1..=4).all(|i| has_service(r, &format!("10.96.0.{}", 10 + i), 80))
    });

    let cpu = cpu_seconds(pid) - cpu0;
    let wall = started.elapsed().as_secs_f64();
    assert!(
        cpu < wall * 0.25,
        "{cpu:.2} s of CPU in {wall:.1} s: a retry loop spins"
    );
    // Bounded: failed attempts leave nothing behind.
    let (rss, hwm) = memory_mib(pid);
    eprintln!("faults: VmRSS {rss0} MiB before, {rss} MiB after, VmHWM {hwm} MiB");
    assert!(
        rss < rss0 + 32 && hwm < 128,
        "VmRSS {rss0} -> {rss} MiB, VmHWM {hwm} MiB"
    );
    assert!(n.proxy().is_running(), "the proxy exited:\n{}", n.log());
    let health = n
        .node()
        .run(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:10256")?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .expect("enter node")
        .expect("healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

#[test]
fn api_burst_of_1000_slice_updates_coalesces() {
    let Some(mut n) = ApiNode::new("api_burst_coalesces", false) else {
        return;
    };
    n.api
        .apply(service("web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api
        .apply(slice("web-1", "web", &ips(&["10.244.0.1"])))
        .expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.serve();
    // Upstream's default nftables minSyncPeriod.
    n.start_proxy(&["--iptables-min-sync-period=1s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    let before = n.syncs();
    let start = Instant::now();
    for i in 0..1000u32 {
        let ip = format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250);
        n.api
            .apply(slice("web-1", "web", &ips(&[ip.as_str()])))
            .expect("apply");
    }
    let last = format!("10.244.{}.{}", 1 + 999 / 250, 1 + 999 % 250);
    n.wait_rules("the last update", WAIT, |r| has_endpoint(r, &last));
    let took = start.elapsed();
    // Let a trailing sync, if any, show up in the log.
    std::thread::sleep(Duration::from_millis(1500));
    let syncs = n.syncs() - before;
    eprintln!("1000 EndpointSlice updates: {syncs} syncs, last update programmed after {took:?}");
    assert!((1..=15).contains(&syncs), "{syncs} syncs for 1000 updates");
    assert!(
        !has_endpoint(&n.ruleset(), "10.244.0.1"),
        "stale endpoint left"
    );
}

#[test]
fn api_bad_objects_are_logged_and_skipped() {
    let Some(mut n) = ApiNode::new("api_bad_objects", false) else {
        return;
    };
    n.api
        .apply(service("good", "10.96.0.10", 80, json!({})))
        .expect("apply");
    n.api
        .apply(slice("good-1", "good", &ips(&["10.244.1.2"])))
        .expect("apply");
    let mut bad_ip = service("bad-ip", "10.96.0.300", 80, json!({}));
    bad_ip["spec"]["clusterIPs"] = json!(["10.96.0.300"]);
    n.api.apply(bad_ip).expect("apply");
    n.api
        .apply(service("bad-port", "10.96.0.21", 80, json!({})))
        .and_then(|_| {
            let mut s = service("bad-port", "10.96.0.21", 80, json!({}));
            s["spec"]["ports"][0]["port"] = json!(70000);
            n.api.apply(s)
        })
        .expect("apply");
    let mut dup = service("dup-ports", "10.96.0.22", 80, json!({}));
    dup["spec"]["ports"] = json!([
        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
        {"name": "http", "protocol": "TCP", "port": 81, "targetPort": 8080},
    ]);
    n.api.apply(dup).expect("apply");
    n.api
        .apply(slice("orphan-1", "no-such-service", &ips(&["10.244.9.9"])))
        .expect("apply");
    let huge: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.245.{}.{}", i / 250, 1 + i % 250))
        .collect();
    n.api
        .apply(service("huge", "10.96.0.30", 80, json!({})))
        .expect("apply");
    n.api.apply(slice("huge-1", "huge", &huge)).expect("apply");
    n.api.apply(node_object()).expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    let rules = n.ruleset();
    let log = n.log();
    assert!(
        has_service(&rules, "10.96.0.10", 80),
        "good Service disturbed"
    );
    assert!(has_endpoint(&rules, "10.244.1.2"));
    for name in ["bad-ip", "bad-port", "dup-ports", "huge-1"] {
        assert!(log.contains(name), "{name} not named in the log");
    }
    assert!(
        !has_service(&rules, "10.96.0.21", 80),
        "bad-port programmed"
    );
    assert!(
        !has_endpoint(&rules, "10.244.9.9"),
        "orphan slice programmed"
    );
    // The oversized slice is clamped to the API's 1000 endpoints.
    assert!(has_service(&rules, "10.96.0.30", 80), "huge not programmed");
    assert!(rules.contains("pick-ip-1000"), "huge not clamped to 1000");
    assert!(n.proxy().is_running());
}

/// A property-generated hostile object, and what it must do to the proxy.
struct Hostile {
    /// Opens the object's name, so the log lines about it can be counted.
    id: String,
    kind: &'static str,
    namespace: String,
    name: String,
    object: Value,
    /// Whether the proxy must log it (exactly once).
    logged: bool,
    /// The cluster IP and port it must be served on, if it is valid.
    serves: Option<(String, u16)>,
}

/// Text with quotes, backslashes, newlines, braces: what a name or an address from the
/// API may hold when nobody validated it.
fn junk() -> impl proptest::strategy::Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9\"'\\\\\n\t {}$;.:/-]{0,16}").expect("regex")
}

fn hostile_service(ns: &str, name: &str, ip: &str, port: Value) -> Value {
    json!({
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}],
        },
    })
}

fn hostile_slice(name: &str, owner: &str, addresses: Vec<String>, ports: Value) -> Value {
    json!({
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "hostile",
            "name": name,
            "labels": {"kubernetes.io/service-name": owner},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": addresses.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>(),
    })
}

/// Object `i` of the hostile set: its kind cycles through ten sorts of bad (or merely
/// odd but valid) input; the details are drawn by proptest from a fixed seed.
fn hostile(i: usize, runner: &mut proptest::test_runner::TestRunner) -> Hostile {
    use proptest::prelude::*;
    let mut draw = |s: BoxedStrategy<Value>| s.new_tree(runner).expect("draw").current();
    let id = format!("hx{i:04}");
    let served_ip = format!("10.97.{}.{}", i / 250, 1 + i % 250);
    let svc = |name: &str, object: Value, logged: bool, serves: Option<(String, u16)>| Hostile {
        id: id.clone(),
        kind: "Service",
        namespace: object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        name: name.to_string(),
        object,
        logged,
        serves,
    };
    match i % 10 {
        // A cluster IP that is no IP.
        0 => {
            let ip = draw(
                prop_oneof![
                    (256u32..100_000).prop_map(|o| format!("10.96.1.{o}")),
                    junk().prop_map(|j| format!("x{j}")),
                ]
                .prop_map(Value::from)
                .boxed(),
            );
            let ip = ip.as_str().unwrap_or_default().to_string();
            svc(
                &id,
                hostile_service("hostile", &id, &ip, json!(80)),
                true,
                None,
            )
        }
        // A port out of range.
        1 => {
            let port = draw(
                prop_oneof![Just(0i64), 65_536i64..2_000_000_000, -2_000_000_000i64..0]
                    .prop_map(Value::from)
                    .boxed(),
            );
            svc(
                &id,
                hostile_service("hostile", &id, &served_ip, port),
                true,
                None,
            )
        }
        // A name (or namespace) with quotes and a line that pretends to be a log line.
        2 => {
            let tail = draw(junk().prop_map(Value::from).boxed());
            let name = format!("{id}\"\nFORGED level=ERROR {}", tail.as_str().unwrap_or(""));
            let ns = if i % 20 == 2 {
                "hostile"
            } else {
                "ho\"stile\n"
            };
            svc(
                &name,
                hostile_service(ns, &name, &served_ip, json!(80)),
                true,
                None,
            )
        }
        // A cluster IP and port a good Service already has (the good one sorts first).
        3 => {
            let good = format!("10.96.0.{}", 10 + i % GOOD);
            svc(
                &id,
                hostile_service("hostile", &id, &good, json!(80)),
                true,
                None,
            )
        }
        // Valid, with fields no schema knows and an annotation of up to 256 KiB.
        4 | 7 => {
            let size = draw((0usize..262_144).prop_map(Value::from).boxed());
            let size = size.as_u64().unwrap_or(0) as usize;
            let mut object = hostile_service("hostile", &id, &served_ip, json!(80));
            object["metadata"]["annotations"] = json!({"huge": "a".repeat(size)});
            object["unknownTop"] = json!({"x": [1, 2, {"y": null}]});
            object["spec"]["unknownSpec"] = json!("z\n\"");
            object["spec"]["ports"][0]["unknownPort"] = json!(7);
            let logged = i % 10 == 7;
            if logged {
                // ... and externalIPs that are no IPs: served, the bad field logged.
                let bad = draw(junk().prop_map(|j| Value::from(format!("x{j}"))).boxed());
                object["spec"]["externalIPs"] = json!([bad, "also not an IP"]);
            }
            svc(&id, object, logged, Some((served_ip, 80)))
        }
        // An EndpointSlice whose addresses are no IPs.
        5 => {
            let addresses = draw(
                prop::collection::vec(junk().prop_map(|j| format!("x{j}")), 1..40)
                    .prop_map(Value::from)
                    .boxed(),
            );
            let addresses: Vec<String> = addresses
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            let name = format!("{id}-slice");
            let owner = format!("hx{:04}", i - 1);
            Hostile {
                id: id.clone(),
                kind: "EndpointSlice",
                namespace: "hostile".into(),
                name: name.clone(),
                object: hostile_slice(
                    &name,
                    &owner,
                    addresses,
                    json!([{"name": "http", "protocol": "TCP", "port": 8080}]),
                ),
                logged: true,
                serves: None,
            }
        }
        // An EndpointSlice whose ports are out of range or of no known protocol.
        6 => {
            let ports = draw(
                prop::collection::vec(
                    prop_oneof![
                        (65_536i64..1_000_000).prop_map(|p| json!({"port": p, "protocol": "TCP"})),
                        junk().prop_map(|j| json!({"port": 8080, "protocol": format!("X{j}")})),
                    ],
                    1..5,
                )
                .prop_map(Value::from)
                .boxed(),
            );
            // Every other one also has a name that would forge a log line.
            let name = if i % 20 == 6 {
                format!("{id}-slice\nFORGED level=ERROR")
            } else {
                format!("{id}-slice")
            };
            Hostile {
                id: id.clone(),
                kind: "EndpointSlice",
                namespace: "hostile".into(),
                name: name.clone(),
                object: hostile_slice(
                    &name,
                    &format!("hx{:04}", i - 2),
                    ips(&["10.244.7.7"]),
                    ports,
                ),
                logged: true,
                serves: None,
            }
        }
        // A LoadBalancer whose source ranges and ingress IPs are no CIDRs and IPs.
        8 => {
            let bad = draw(junk().prop_map(|j| Value::from(format!("x{j}"))).boxed());
            let mut object = hostile_service("hostile", &id, &served_ip, json!(80));
            object["spec"]["type"] = json!("LoadBalancer");
            object["spec"]["ports"][0]["nodePort"] = json!(30000 + i % 2000);
            object["spec"]["loadBalancerSourceRanges"] = json!([bad, "10.0.0.0/33"]);
            object["status"] =
                json!({"loadBalancer": {"ingress": [{"ip": bad}, {"ip": "300.1.1.1"}]}});
            svc(&id, object, true, Some((served_ip, 80)))
        }
        // A field with a value no version of the API has.
        _ => {
            let value = draw(junk().prop_map(|j| Value::from(format!("X{j}"))).boxed());
            let field = [
                "sessionAffinity",
                "externalTrafficPolicy",
                "internalTrafficPolicy",
            ][(i / 10) % 3];
            let mut object = hostile_service("hostile", &id, &served_ip, json!(80));
            object["spec"][field] = value;
            // The external policy matters only where there is external traffic.
            object["spec"]["type"] = json!("NodePort");
            object["spec"]["ports"][0]["nodePort"] = json!(30000 + i % 2000);
            svc(&id, object, true, None)
        }
    }
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How many good Services `api_hostile_objects_over_a_watch` keeps beside the hostile ones.
const GOOD: usize = 20;

/// Issue #17: a thousand property-generated hostile objects arrive over a watch (bad IPs
/// and ports, names with quotes and forged log lines, duplicate cluster IPs, unknown
/// fields, huge annotations, 60,000-endpoint slices). The proxy stays up, logs each bad
/// one once (names escaped, so no line can be forged), serves the valid ones and every
/// good Service, keeps its memory bounded, and drops the hostile objects' rules when they
/// are deleted.
#[test]
fn api_hostile_objects_over_a_watch() {
    let Some(mut n) = ApiNode::new("api_hostile_objects", false) else {
        return;
    };
    let good_ip = |k: usize| format!("10.96.0.{}", 10 + k);
    let good_ep = |k: usize| format!("10.244.1.{}", 10 + k);
    for k in 0..GOOD {
        let name = format!("good{k}");
        n.api
            .apply(service(&name, &good_ip(k), 80, json!({})))
            .expect("apply");
        n.api
            .apply(slice(
                &format!("{name}-1"),
                &name,
                &ips(&[good_ep(k).as_str()]),
            ))
            .expect("apply");
    }
    n.api.apply(node_object()).expect("apply");
    n.serve();
    n.start_proxy(&["--iptables-min-sync-period=0s", "--iptables-sync-period=2s"]);
    assert!(n.proxy().wait_for_log(SYNCED, 1, WAIT), "no first sync");
    let pid = n.proxy().pid();
    let (_, hwm_before) = memory_mib(pid);

    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut objects: Vec<Hostile> = (0..1000).map(|i| hostile(i, &mut runner)).collect();
    // Three slices of 60,000 endpoints (the API allows 1,000) for valid hostile Services.
    for i in [4usize, 14, 24] {
        let owner = format!("hx{i:04}");
        let id = format!("hx{:04}", 1000 + i);
        let addresses: Vec<String> = (0..60_000u32)
            .map(|e| format!("10.250.{}.{}", e / 250, 1 + e % 250))
            .collect();
        let name = format!("{id}-slice");
        objects.push(Hostile {
            id,
            kind: "EndpointSlice",
            namespace: "hostile".into(),
            object: hostile_slice(
                &name,
                &owner,
                addresses,
                json!([{"name": "http", "protocol": "TCP", "port": 8080}]),
            ),
            name,
            logged: true,
            serves: None,
        });
    }
    for h in &objects {
        n.api.apply(h.object.clone()).expect("apply hostile object");
    }
    let served: Vec<&(String, u16)> = objects.iter().filter_map(|h| h.serves.as_ref()).collect();
    n.wait_rules(
        "every valid hostile Service",
        Duration::from_secs(60),
        |r| served.iter().all(|(ip, port)| has_service(r, ip, *port)),
    );
    // Two periodic re-syncs more: nothing may be logged again.
    std::thread::sleep(Duration::from_secs(5));
    let (rss, hwm) = memory_mib(pid);
    eprintln!(
        "hostile objects: VmRSS {rss} MiB, VmHWM {hwm} MiB (before them: VmHWM {hwm_before} MiB)"
    );

    assert!(n.proxy().is_running(), "the proxy exited:\n{}", n.log());
    let rules = n.ruleset();
    for k in 0..GOOD {
        assert!(has_service(&rules, &good_ip(k), 80), "good{k} lost");
        assert!(has_endpoint(&rules, &good_ep(k)), "good{k}'s endpoint lost");
    }
    // The 60,000-endpoint slices are cut to the API's 1,000.
    assert!(rules.contains("pick-ip-1000"), "a huge slice not clamped");
    let log = n.log();
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED"),
            "a name forged a log line: {line:?}"
        );
    }
    let mut missing = Vec::new();
    let mut repeated = Vec::new();
    for h in &objects {
        let lines = log.lines().filter(|l| l.contains(&h.id)).count();
        if h.logged && lines == 0 {
            missing.push(h.id.as_str());
        }
        if lines > 1 {
            repeated.push(format!("{} ({lines} lines)", h.id));
        }
    }
    assert!(missing.is_empty(), "never logged: {missing:?}");
    assert!(repeated.is_empty(), "logged more than once: {repeated:?}");
    // Bounded: a thousand objects, three of them 60,000 endpoints long, cost tens of MiB.
    assert!(hwm < 256, "VmHWM {hwm} MiB after the hostile objects");

    // Deleted, they leave no rule behind; the good Services stay.
    for h in &objects {
        assert!(
            n.api.delete(h.kind, &h.namespace, &h.name),
            "delete {}",
            h.id
        );
    }
    n.wait_rules("the hostile Services gone", WAIT, |r| {
        served.iter().all(|(ip, port)| !has_service(r, ip, *port)) && !r.contains("10.250.")
    });
    let rules = n.ruleset();
    for k in 0..GOOD {
        assert!(has_service(&rules, &good_ip(k), 80), "good{k} lost");
    }
    assert!(n.proxy().is_running());
}

#[test]
fn manifests_and_kubeconfig_are_exclusive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(binary())
        .args(["--manifests", "/nonexistent", "--kubeconfig"])
        .arg(Path::new(dir.path()).join("kubeconfig"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exclusive"), "{stderr}");
}
