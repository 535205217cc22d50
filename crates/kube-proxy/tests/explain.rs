//! `kube-proxy explain` against real packets (issue #16): for each case the answer of the
//! running proxy (`/debug/explain` through the command) must match where real
//! connections go — which backends answer and which source address they see — in
//! nftables and iptables modes; `--verify` must report nothing, then the element or rule
//! the test deletes behind the proxy's back. The offline `--manifests` form runs without
//! root.
//!
//! Topology (testkit): client 192.168.100.2 → node 192.168.100.1 → be0 (10.244.1.2, on
//! this node) and be1 (10.244.2.2, another node's); pod client 10.244.200.2.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use testkit::manifests::{render, PortSpec, ServiceSpec};
use testkit::{spread, Netns, Proto, ProxyProcess, RequestError, ServeMode, Tools, Topology};

const PEER_PORT: u16 = 9090;
const BE0: &str = "10.244.1.2";
const BE1: &str = "10.244.2.2";
const CLIENT: &str = "192.168.100.2";
const POD: &str = "10.244.200.2";

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// `web` (ClusterIP + NodePort 30080), `local` (externalTrafficPolicy Local, NodePort
/// 30081), `fw` (LB IP with source range 10.244.0.0/16), `empty` (no endpoints).
fn manifests() -> String {
    let both = [ip(BE0), ip(BE1)];
    let nodes = vec!["node-a".to_string(), "node-b".to_string()];
    let mut web = ServiceSpec::new(
        "default",
        "web",
        &[ip("10.96.0.10")],
        vec![PortSpec::new("http", "TCP", 80, PEER_PORT).node_port(30080)],
    )
    .endpoints(&both);
    web.type_ = "NodePort".into();
    web.endpoint_nodes = nodes.clone();
    let mut local = ServiceSpec::new(
        "default",
        "local",
        &[ip("10.96.0.11")],
        vec![PortSpec::new("http", "TCP", 80, PEER_PORT).node_port(30081)],
    )
    .endpoints(&both);
    local.type_ = "NodePort".into();
    local.extra_spec = vec!["  externalTrafficPolicy: Local".into()];
    local.endpoint_nodes = nodes.clone();
    let mut fw = ServiceSpec::new(
        "default",
        "fw",
        &[ip("10.96.0.42")],
        vec![PortSpec::new("http", "TCP", 80, PEER_PORT)],
    )
    .endpoints(&both);
    fw.type_ = "LoadBalancer".into();
    fw.load_balancer_ips = vec![ip("192.168.200.42")];
    fw.extra_spec = vec!["  loadBalancerSourceRanges: [10.244.0.0/16]".into()];
    fw.endpoint_nodes = nodes;
    let empty = ServiceSpec::new(
        "default",
        "empty",
        &[ip("10.96.0.99")],
        vec![PortSpec::new("http", "TCP", 80, PEER_PORT)],
    );
    render(&[web, local, fw, empty])
}

fn write_manifests(dir: &Path) -> PathBuf {
    let target = dir.join("manifests");
    std::fs::create_dir_all(&target).expect("manifests dir");
    std::fs::write(target.join("services.yaml"), manifests()).expect("write manifests");
    target
}

/// `kube-proxy explain` in the node against the running proxy; its stdout, or the
/// failure with stderr.
fn explain(node: &Netns, args: &[&str]) -> Result<String, String> {
    let bin = binary();
    let mut full = vec![bin.to_str().expect("utf-8 path"), "explain"];
    full.extend_from_slice(args);
    node.exec(&full).map_err(|e| format!("{e:#}"))
}

fn explain_json(node: &Netns, src: &str, dst: SocketAddr) -> Value {
    let dst = dst.to_string();
    let out = explain(
        node,
        &["--src", src, "--dst", &dst, "--proto", "tcp", "--json"],
    )
    .expect("explain --json");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The backend's name for an endpoint IP, and the node's address on its link (what it
/// sees when masqueraded).
fn backend(endpoint: &str) -> (&'static str, &'static str) {
    match endpoint {
        BE0 => ("be0", "10.244.1.1"),
        BE1 => ("be1", "10.244.2.1"),
        other => panic!("unknown endpoint {other}"),
    }
}

/// What explain predicts the backends answer: "beN <source seen>" for each endpoint.
fn predicted(answer: &Value, src: &str) -> Vec<String> {
    let masq = answer["masquerade"]["masqueraded"]
        .as_bool()
        .expect("masquerade");
    let mut out: Vec<String> = answer["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            let address: SocketAddr = e["address"]
                .as_str()
                .expect("address")
                .parse()
                .expect("addr");
            let (name, node_side) = backend(&address.ip().to_string());
            format!("{name} {}", if masq { node_side } else { src })
        })
        .collect();
    out.sort();
    out
}

/// Checks one connection against explain's answer.
fn agrees(topo: &Topology, what: &str, from_pod: bool, dst: SocketAddr, outcome: &str) {
    let (ns, src) = if from_pod {
        (&topo.pod_client, POD)
    } else {
        (&topo.client, CLIENT)
    };
    let answer = explain_json(&topo.node, src, dst);
    assert_eq!(answer["outcome"], outcome, "{what}: {answer:#}");
    let timeout = Duration::from_millis(800);
    match outcome {
        "forwarded" => {
            let seen: Vec<String> = spread(ns, dst, Proto::Tcp, 16, timeout)
                .expect("spread")
                .into_keys()
                .collect();
            assert_eq!(seen, predicted(&answer, src), "{what}: {answer:#}");
        }
        "rejected" => {
            let r = testkit::tcp_request(ns, dst, timeout);
            assert!(
                matches!(r, Err(RequestError::Refused)),
                "{what}: {r:?} vs {answer:#}"
            );
        }
        "dropped" => {
            let r = testkit::tcp_request(ns, dst, timeout);
            assert!(
                matches!(r, Err(RequestError::Timeout)),
                "{what}: {r:?} vs {answer:#}"
            );
        }
        // Routed on untranslated: no backend answers.
        _ => {
            let r = testkit::tcp_request(ns, dst, timeout);
            assert!(r.is_err(), "{what}: {r:?} vs {answer:#}");
        }
    }
}

fn explain_agrees_with_packets(mode: &str) {
    if !testkit::root_or_skip("explain_agrees_with_packets") {
        return;
    }
    let topo = Topology::new(2).expect("topology");
    let mut servers = Vec::new();
    for b in &topo.backends {
        servers.push(
            b.serve_with(PEER_PORT, &[Proto::Tcp], ServeMode::NameAndPeer)
                .expect("servers"),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = write_manifests(dir.path());
    let mode_flag = format!("--proxy-mode={mode}");
    let args = [
        mode_flag.as_str(),
        "--manifests",
        manifests.to_str().expect("utf-8"),
        "--hostname-override=node-a",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/48",
        "--v=2",
    ];
    let mut proxy = ProxyProcess::start_with(
        &topo.node,
        &binary(),
        &args,
        &dir.path().join("proxy.log"),
        Tools::Needed,
    )
    .expect("start proxy");
    assert!(
        proxy.wait_for_log("synced rules", 1, Duration::from_secs(20)),
        "no sync: {}",
        proxy.log()
    );
    let node_ip = "192.168.100.1";
    let sa = |ip: &str, port: u16| SocketAddr::new(self::ip(ip), port);
    agrees(
        &topo,
        "ClusterIP from outside",
        false,
        sa("10.96.0.10", 80),
        "forwarded",
    );
    agrees(
        &topo,
        "ClusterIP from a pod",
        true,
        sa("10.96.0.10", 80),
        "forwarded",
    );
    agrees(&topo, "NodePort", false, sa(node_ip, 30080), "forwarded");
    agrees(
        &topo,
        "eTP Local NodePort from outside",
        false,
        sa(node_ip, 30081),
        "forwarded",
    );
    agrees(
        &topo,
        "eTP Local NodePort from a pod",
        true,
        sa(node_ip, 30081),
        "forwarded",
    );
    agrees(
        &topo,
        "source range",
        false,
        sa("192.168.200.42", 80),
        "dropped",
    );
    agrees(
        &topo,
        "source range, listed source",
        true,
        sa("192.168.200.42", 80),
        "forwarded",
    );
    agrees(
        &topo,
        "no endpoints",
        false,
        sa("10.96.0.99", 80),
        "rejected",
    );
    let unused = if mode == "nftables" {
        "rejected"
    } else {
        "untouched"
    };
    agrees(
        &topo,
        "unused cluster-IP port",
        false,
        sa("10.96.0.10", 81),
        unused,
    );

    // The words, as a person reads them (the README quotes one).
    let text = explain(
        &topo.node,
        &[
            "--src",
            CLIENT,
            "--dst",
            "192.168.100.1:30081",
            "--proto",
            "tcp",
        ],
    )
    .expect("explain text");
    eprintln!("--- kube-proxy explain ({mode}) ---\n{text}");
    assert!(text.contains("\"default/local\""), "{text}");

    // Bad input: a 400 with the reason, through the command.
    for (dst, proto, needle) in [
        ("10.96.0.10", "tcp", "destination port is required"),
        ("10.96.0.10:80", "icmp", "not one of tcp, udp, sctp"),
        ("nonsense:80", "tcp", "is not IP:port"),
    ] {
        let err = explain(
            &topo.node,
            &["--src", CLIENT, "--dst", dst, "--proto", proto],
        )
        .expect_err("bad query accepted");
        assert!(err.contains("400") && err.contains(needle), "{err}");
    }

    // --verify: nothing differs; then one element / rule goes behind the proxy's back.
    let verify = || {
        explain(
            &topo.node,
            &[
                "--src",
                POD,
                "--dst",
                "10.96.0.10:80",
                "--proto",
                "tcp",
                "--verify",
            ],
        )
        .expect("explain --verify")
    };
    let clean = verify();
    assert!(
        clean.contains("Verify: the kernel holds what the plan says"),
        "{clean}"
    );
    let expected = if mode == "nftables" {
        topo.node
            .exec(&[
                "nft",
                "delete",
                "element",
                "ip",
                "kube-proxy",
                "slot-0",
                "{ 10.96.0.10 . tcp . 80 }",
            ])
            .expect("delete element");
        "missing in the kernel: slot-0 element 10.96.0.10 . tcp . 80".to_string()
    } else {
        let save = topo
            .node
            .exec(&["iptables-save", "-t", "nat"])
            .expect("iptables-save");
        let rule = save
            .lines()
            .find(|l| {
                l.starts_with("-A KUBE-SEP-")
                    && l.contains("\"default/web:http\"")
                    && l.contains("DNAT")
            })
            .expect("web's DNAT rule")
            .to_string();
        let delete = format!("iptables -t nat -D {}", &rule[3..]);
        topo.node.exec(&["sh", "-c", &delete]).expect("delete rule");
        "missing in the kernel: -A KUBE-SEP-".to_string()
    };
    let drifted = verify();
    eprintln!("--- kube-proxy explain --verify ({mode}) after the deletion ---\n{drifted}");
    assert!(drifted.contains("difference(s) from the plan"), "{drifted}");
    assert!(drifted.contains(&expected), "{drifted}");
    drop(servers);
}

#[test]
fn explain_agrees_with_packets_nftables() {
    explain_agrees_with_packets("nftables");
}

#[test]
fn explain_agrees_with_packets_iptables() {
    explain_agrees_with_packets("iptables");
}

/// The offline form: manifests and the mode's flags, no proxy, no root.
#[test]
fn explain_offline_reads_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = write_manifests(dir.path());
    let run = |mode: &str, src: &str, dst: &str, json: bool| {
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["explain", "--manifests"]).arg(&manifests).args([
            &format!("--proxy-mode={mode}"),
            "--hostname-override=node-a",
            "--cluster-cidr=10.244.0.0/16",
            "--src",
            src,
            "--dst",
            dst,
            "--proto",
            "tcp",
        ]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("run explain");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text, err) = run("nftables", CLIENT, "10.96.0.10:80", false);
    assert!(ok, "{err}");
    assert!(text.contains("(nftables mode): FORWARDED"), "{text}");
    assert!(text.contains("10.244.1.2:9090, 10.244.2.2:9090"), "{text}");
    assert!(text.contains("Masquerade: yes"), "{text}");
    let (ok, json, err) = run("iptables", CLIENT, "10.96.0.10:81", true);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["outcome"], "untouched", "{v}");
    assert_eq!(v["mode"], "iptables", "{v}");
    let (ok, json, _) = run("nftables", CLIENT, "10.96.0.10:81", true);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&json).expect("JSON")["outcome"],
        "rejected"
    );
    // Bad input names the problem; --verify needs the running proxy.
    let (ok, _, err) = run("nftables", "not-an-ip", "10.96.0.10:80", false);
    assert!(
        !ok && err.contains("\"not-an-ip\" is not an IP address"),
        "{err}"
    );
    let out = std::process::Command::new(binary())
        .args(["explain", "--manifests"])
        .arg(&manifests)
        .args([
            "--src",
            CLIENT,
            "--dst",
            "10.96.0.10:80",
            "--proto",
            "tcp",
            "--verify",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-address"));
}
