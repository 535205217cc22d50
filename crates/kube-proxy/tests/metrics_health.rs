//! End to end, as root: the real binary's metrics and health servers, reached from
//! inside its network namespace. `promtool` lints a live scrape, a real Prometheus
//! scrapes it, `/healthz` follows syncs made to fail by another program taking our
//! nftables table (owned by its netlink socket, the kernel refuses everyone else), and
//! the per-Service health check follows local endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::{Netns, ProxyProcess};

const METRICS: &str = "127.0.0.1:10249";
const HEALTHZ: &str = "127.0.0.1:10256";
const NODE: &str = "node-a";

/// An HTTP answer: status, raw header block, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// A plain HTTP/1.1 GET from inside `ns` (the servers bind in the node's namespace).
fn get(ns: &Netns, addr: &str, path: &str) -> Option<Answer> {
    let addr: SocketAddr = addr.parse().expect("test address");
    let path = path.to_owned();
    ns.run(move || -> Option<Answer> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some(Answer {
            status,
            headers: head.to_ascii_lowercase(),
            body: body.to_owned(),
        })
    })
    .ok()
    .flatten()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        testkit::wait_until(timeout, Duration::from_millis(100), &mut f),
        "timed out waiting for {what}"
    );
}

/// The value of an unlabelled sample in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Replaces our `ip kube-proxy` table, in one batch, by an empty one owned by the
/// returned netlink socket (`NFT_TABLE_F_OWNER`): until that socket closes, the kernel
/// refuses every change to the table from anyone else, as it would for a table another
/// program claimed. Numbers from the kernel's `nf_tables.h`.
fn take_table() -> Result<netlink::Socket, netlink::RequestError> {
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFT_MSG_DELTABLE: u16 = 2;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFTA_TABLE_FLAGS: u16 = 2;
    const NFT_TABLE_F_OWNER: u32 = 0x2;
    const NLM_F_CREATE: u16 = 0x400;
    let mut socket = netlink::Socket::open(libc::NETLINK_NETFILTER)?;
    let subsys = 10u16 << 8; // NFNL_SUBSYS_NFTABLES
    let batch_header = [0, 0, 0, 10];
    let ipv4 = [2, 0, 0, 0];
    let begin = socket.next_seq();
    let mut bytes =
        netlink::Message::new(0x10, netlink::NLM_F_REQUEST, begin, &batch_header).finish();
    let mut last = begin;
    for (kind, flags, table_flags) in [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, None),
        (NFT_MSG_DELTABLE, 0, None),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, Some(NFT_TABLE_F_OWNER)),
    ] {
        last = socket.next_seq();
        let ack = if table_flags.is_some() {
            netlink::NLM_F_ACK
        } else {
            0
        };
        let mut msg = netlink::Message::new(
            subsys | kind,
            netlink::NLM_F_REQUEST | flags | ack,
            last,
            &ipv4,
        );
        msg.str(NFTA_TABLE_NAME, "kube-proxy");
        if let Some(f) = table_flags {
            msg.be32(NFTA_TABLE_FLAGS, f);
        }
        bytes.extend(msg.finish());
    }
    let end = socket.next_seq();
    bytes.extend(netlink::Message::new(0x11, netlink::NLM_F_REQUEST, end, &batch_header).finish());
    socket.send_batch(&bytes, begin, last)?;
    Ok(socket)
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"))
}

/// A proxy in its own namespace on a manifests directory.
struct Node {
    ns: Netns,
    dir: tempfile::TempDir,
    proxy: ProxyProcess,
}

impl Node {
    fn start(test: &str, manifests: &str) -> Option<Node> {
        Node::start_with(test, manifests, &[])
    }

    fn start_with(test: &str, manifests: &str, extra: &[&str]) -> Option<Node> {
        if !testkit::root_or_skip(test) {
            return None;
        }
        let ns = Netns::new().expect("netns");
        let dir = tempfile::tempdir().expect("tempdir");
        let mdir = dir.path().join("manifests");
        std::fs::create_dir(&mdir).expect("manifests dir");
        std::fs::write(mdir.join("cluster.yaml"), manifests).expect("manifests");
        let bin_path = binary();
        let mut args = vec![
            bin_path.to_str().expect("utf-8 path"),
            "--manifests",
            mdir.to_str().expect("utf-8 path"),
            "--hostname-override",
            NODE,
            "--iptables-sync-period=1s",
            "--iptables-min-sync-period=0s",
            "--metrics-bind-address",
            METRICS,
            "--healthz-bind-address",
            HEALTHZ,
        ];
        args.extend_from_slice(extra);
        let log = dir.path().join("proxy.log");
        let mut proxy =
            ProxyProcess::start(&ns, Path::new("/usr/bin/env"), &args, &log).expect("start proxy");
        assert!(
            proxy.wait_for_log("synced rules", 1, Duration::from_secs(10)),
            "no first sync:\n{}",
            proxy.log()
        );
        Some(Node { ns, dir, proxy })
    }

    fn write_manifests(&self, text: &str) {
        let mdir = self.dir.path().join("manifests");
        let tmp = self.dir.path().join("cluster.yaml.tmp");
        std::fs::write(&tmp, text).expect("write manifests");
        std::fs::rename(&tmp, mdir.join("cluster.yaml")).expect("replace manifests");
    }

    fn scrape(&self) -> String {
        let a = get(&self.ns, METRICS, "/metrics").expect("scrape");
        assert_eq!(a.status, 200);
        assert!(a
            .headers
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        a.body
    }
}

fn service(name: &str, ip: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
         spec:\n  clusterIP: \"{ip}\"\n  clusterIPs: [\"{ip}\"]\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}]\n{extra}"
    )
}

fn slice(service: &str, ep_node: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {service}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}}}\n  \
         annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"2020-01-01T00:00:00Z\"}}\n\
         addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\n\
         endpoints:\n  - addresses: [\"10.244.1.2\"]\n    conditions: {{ready: true}}\n    nodeName: {ep_node}\n"
    )
}

#[test]
fn live_scrape_passes_promtool_and_a_real_prometheus_scrapes_it() {
    let Some(node) = Node::start(
        "live_scrape_passes_promtool_and_a_real_prometheus_scrapes_it",
        &(service("web", "10.96.0.10", "  type: NodePort\n") + &slice("web", NODE)),
    ) else {
        return;
    };
    let scrape = node.scrape();
    // v1.33+: per-proxier metrics carry ip_family (both families here: IPv6 is on).
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_virtual_memory_max_bytes",
        "process_network_receive_bytes_total",
        "registered_metrics_total{deprecated_version=\"\",stability_level=\"ALPHA\"}",
    ] {
        assert!(sample(&scrape, name).is_some(), "{name} missing:\n{scrape}");
    }
    assert!(scrape.contains(
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0\"} "
    ));
    // Every known gate, given or not, with its stage (as upstream's feature metric).
    for line in [
        "kubernetes_feature_enabled{name=\"AllowServiceExternalIPs\",stage=\"DEPRECATED\"} 1",
        "kubernetes_feature_enabled{name=\"KubeProxyNFTablesLocalhostNodePorts\",stage=\"ALPHA\"} 0",
        "kubernetes_feature_enabled{name=\"TopologyAwareHints\",stage=\"\"} 1",
    ] {
        assert!(scrape.contains(line), "{line} missing:\n{scrape}");
    }
    // nftables mode registers no iptables metric (upstream's RegisterMetrics(mode)),
    // and the failure counters have no series before a failure.
    assert!(!scrape.contains("iptables"), "{scrape}");
    assert!(
        !scrape.contains("process_threads"),
        "not a Go process metric"
    );
    assert_eq!(
        get(&node.ns, METRICS, "/proxyMode").map(|a| a.body),
        Some("nftables".into())
    );
    assert_eq!(
        get(&node.ns, METRICS, "/healthz").map(|a| a.body),
        Some("ok".into())
    );
    let configz = get(&node.ns, METRICS, "/configz").expect("configz");
    let cfg: serde_json::Value = serde_json::from_str(&configz.body).expect("configz is JSON");
    let cfg = &cfg["kubeproxy.config.k8s.io"];
    assert_eq!(cfg["metricsBindAddress"], serde_json::json!(METRICS));
    assert_eq!(cfg["apiVersion"], "kubeproxy.config.k8s.io/v1alpha1");
    assert_eq!(cfg["kind"], "KubeProxyConfiguration");
    // The z-pages are alpha in v1.35: off unless their gates are given.
    for page in ["/statusz", "/flagz"] {
        assert_eq!(
            get(&node.ns, METRICS, page).map(|a| a.status),
            Some(404),
            "{page}"
        );
    }

    // promtool lints the live scrape. Upstream's own names draw one known lint (a gauge
    // named *_total); anything else fails.
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut promtool = promtool.expect("promtool (Debian package prometheus) installed");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let report = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let known = line == "kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have \"_total\" suffix";
        assert!(known, "promtool: {line}\n{report}");
    }

    // A real Prometheus, in the node's namespace, scrapes the proxy once a second.
    let data = node.dir.path().join("prometheus-data");
    let config = node.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: kube-proxy\n    static_configs: [{{targets: [\"{METRICS}\"]}}]\n"
        ),
    )
    .expect("prometheus config");
    let port = node
        .ns
        .run(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
        .expect("netns")
        .expect("free port");
    let web = format!("127.0.0.1:{port}");
    let mut prometheus = node
        .ns
        .command("prometheus")
        .args([
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            &format!("--web.listen-address={web}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus installed");
    let query = "/api/v1/query?query=kubeproxy_sync_proxy_rules_duration_seconds_count%7Bip_family%3D%22IPv4%22%7D";
    let mut last = String::new();
    let found = testkit::wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let Some(a) = get(&node.ns, &web, query) else {
            return false;
        };
        last = a.body;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&last) else {
            return false;
        };
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n > 0.0)
    });
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        found,
        "Prometheus never had a sync count > 0; last answer: {last}"
    );
}

#[test]
fn healthz_turns_503_when_syncs_fail_and_200_after_recovery() {
    let Some(mut node) = Node::start(
        "healthz_turns_503_when_syncs_fail_and_200_after_recovery",
        &service("web", "10.96.0.10", ""),
    ) else {
        return;
    };
    let a = get(&node.ns, HEALTHZ, "/healthz").expect("healthz");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.headers.contains("content-type: application/json"));
    // v1.33's body: compact JSON, per-family status once synced.
    assert!(a.body.starts_with("{\"lastUpdated\":\""), "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("healthz JSON");
    assert_eq!(v["nodeEligible"], true, "{v}");
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["status"]["IPv4"]["healthy"], true, "{v}");
    assert_eq!(v["lastUpdated"], v["currentTime"], "{v}");

    // Syncs fail from now on; a change is queued and stays unsynced past 2 × 1 s.
    let owner = node
        .ns
        .run(take_table)
        .expect("netns")
        .expect("take the table");
    node.write_manifests(
        &(service("web", "10.96.0.10", "")
            + &service("api", "10.96.0.11", "  sessionAffinity: ClientIP\n")
            + &slice("api", NODE)),
    );
    wait_for("healthz 503", Duration::from_secs(10), || {
        get(&node.ns, HEALTHZ, "/healthz").is_some_and(|a| a.status == 503)
    });
    let a = get(&node.ns, HEALTHZ, "/healthz").expect("healthz");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("healthz JSON");
    assert_eq!(v["healthy"], false, "{v}");
    assert_eq!(v["status"]["IPv4"]["healthy"], false, "{v}");
    assert_ne!(
        v["lastUpdated"], v["currentTime"],
        "the last sync, not now: {v}"
    );
    assert_eq!(
        get(&node.ns, HEALTHZ, "/livez").map(|a| a.status),
        Some(503)
    );
    let scrape = node.scrape();
    assert!(
        sample(
            &scrape,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{scrape}"
    );
    assert!(
        scrape.contains("kubeproxy_proxy_healthz_total{code=\"503\"} "),
        "{scrape}"
    );

    // The owner goes (the kernel deletes its table): the next retry syncs and health
    // comes back.
    drop(owner);
    wait_for("healthz 200", Duration::from_secs(10), || {
        get(&node.ns, HEALTHZ, "/healthz").is_some_and(|a| a.status == 200)
    });
    assert!(node.proxy.is_running());

    // A node tainted for deletion is not eligible: /healthz 503, /livez still 200.
    let tainted = format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\n\
         spec: {{taints: [{{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}}]}}\n"
    );
    node.write_manifests(&(service("web", "10.96.0.10", "") + &tainted));
    wait_for(
        "healthz 503 for a tainted node",
        Duration::from_secs(10),
        || {
            get(&node.ns, HEALTHZ, "/healthz")
                .is_some_and(|a| a.status == 503 && a.body.contains("\"nodeEligible\":false"))
        },
    );
    assert_eq!(
        get(&node.ns, HEALTHZ, "/livez").map(|a| a.status),
        Some(200)
    );
}

#[test]
fn service_health_check_follows_local_endpoints() {
    let lb = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n";
    let Some(node) = Node::start(
        "service_health_check_follows_local_endpoints",
        &(service("web", "10.96.0.10", lb) + &slice("web", NODE)),
    ) else {
        return;
    };
    let hc = "127.0.0.1:32000";
    wait_for("health check 200", Duration::from_secs(10), || {
        get(&node.ns, hc, "/").is_some_and(|a| a.status == 200)
    });
    let a = get(&node.ns, hc, "/").expect("health check");
    assert!(
        a.headers.contains("x-load-balancing-endpoint-weight: 1"),
        "{a:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&a.body).expect("JSON body");
    assert_eq!(
        body,
        serde_json::json!({
            "service": {"namespace": "demo", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true
        })
    );

    // The endpoint moves to another node: no local endpoint, 503.
    node.write_manifests(&(service("web", "10.96.0.10", lb) + &slice("web", "node-b")));
    wait_for("health check 503", Duration::from_secs(10), || {
        get(&node.ns, hc, "/").is_some_and(|a| {
            a.status == 503
                && a.headers.contains("x-load-balancing-endpoint-weight: 0")
                && a.body.contains("\"localEndpoints\": 0")
        })
    });

    // The Service goes away: so does its health check port.
    node.write_manifests(&service("other", "10.96.0.12", ""));
    wait_for("health check port closed", Duration::from_secs(10), || {
        get(&node.ns, hc, "/").is_none()
    });
}

#[test]
fn zpages_follow_their_feature_gates() {
    let Some(node) = Node::start_with(
        "zpages_follow_their_feature_gates",
        &service("web", "10.96.0.10", ""),
        &["--feature-gates=ComponentStatusz=true,ComponentFlagz=true"],
    ) else {
        return;
    };
    let status = get(&node.ns, METRICS, "/statusz").expect("statusz");
    assert_eq!(status.status, 200, "{status:?}");
    assert!(status
        .headers
        .contains("content-type: text/plain; charset=utf-8"));
    assert!(
        status.body.starts_with("\nkube-proxy statusz\nWarning: "),
        "{}",
        status.body
    );
    for field in ["Started", "Up", "Binary version", "Emulation version"] {
        assert!(
            status.body.lines().any(|l| l.starts_with(field)),
            "{field}: {}",
            status.body
        );
    }
    assert!(status.body.contains("1.35"), "{}", status.body);
    let flags = get(&node.ns, METRICS, "/flagz").expect("flagz");
    assert_eq!(flags.status, 200);
    assert!(
        flags.body.starts_with("\nkube-proxy flags\n"),
        "{}",
        flags.body
    );
    assert!(
        flags
            .body
            .lines()
            .any(|l| l.starts_with("metrics-bind-address") && l.ends_with(METRICS)),
        "{}",
        flags.body
    );

    // The structured form, asked for exactly; plain JSON is not acceptable.
    let structured = node
        .ns
        .run(|| {
            let addr: SocketAddr = METRICS.parse().expect("address");
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            write!(
                s,
                "GET /statusz HTTP/1.1\r\nHost: x\r\nAccept: application/json;v=v1alpha1;g=config.k8s.io;as=Statusz\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut raw = String::new();
            s.read_to_string(&mut raw).ok()?;
            Some(raw)
        })
        .ok()
        .flatten()
        .expect("structured statusz");
    let body = structured
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).expect("statusz JSON");
    assert_eq!(v["kind"], "Statusz");
    assert_eq!(v["apiVersion"], "config.k8s.io/v1alpha1");
    assert_eq!(v["emulationVersion"], "1.35");
}

const LOCAL_NODEPORT: &str = "  type: NodePort\n  externalTrafficPolicy: Local\n";

/// `/debug/services` shows what was programmed (issue #16): the Service port with its
/// destinations and the endpoints cluster and local traffic use, as JSON and as a text
/// table, filtered by name; it follows an endpoint change.
#[test]
fn debug_services_shows_the_programmed_state() {
    let Some(node) = Node::start(
        "debug_services_shows_the_programmed_state",
        &(service("web", "10.96.0.10", LOCAL_NODEPORT)
            + &slice("web", NODE)
            + &service("api", "10.96.0.11", "")),
    ) else {
        return;
    };
    let a = get(&node.ns, METRICS, "/debug/services?namespace=demo&name=web").expect("debug");
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("JSON");
    let ports = v["servicePorts"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "{v}");
    let web = &ports[0];
    assert_eq!(web["name"], "demo/web:http/tcp", "{v}");
    assert_eq!(web["nodePort"], 30080, "{v}");
    for traffic in ["internalEndpoints", "externalEndpoints"] {
        assert_eq!(
            web["families"]["IPv4"][traffic],
            serde_json::json!(["10.244.1.2:8080"]),
            "{v}"
        );
    }
    assert!(web["lastProgrammed"].is_string(), "{v}");

    let text = get(&node.ns, METRICS, "/debug/services?format=text").expect("text");
    assert!(
        text.body
            .contains("demo/api:http/tcp\tIPv4\t10.96.0.11:80\t-\t-\t-\t"),
        "{}",
        text.body
    );

    // The endpoint moves to another node: external traffic (policy Local) has none left.
    node.write_manifests(
        &(service("web", "10.96.0.10", LOCAL_NODEPORT)
            + &slice("web", "node-b")
            + &service("api", "10.96.0.11", "")),
    );
    wait_for("the change programmed", Duration::from_secs(10), || {
        get(&node.ns, METRICS, "/debug/services?name=web").is_some_and(|a| {
            serde_json::from_str::<serde_json::Value>(&a.body).is_ok_and(|v| {
                v["servicePorts"][0]["families"]["IPv4"]["externalEndpoints"]
                    == serde_json::json!([])
            })
        })
    });
}
