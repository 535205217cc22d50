//! The README's first command: runs the real `kube-proxy` on the bundled example
//! manifests in a throw-away network namespace, with two small backends and a client, and
//! shows the Service IPs answering. As root (network namespaces, nftables) it touches
//! nothing outside the namespaces it creates, and removes them on exit. Without root it
//! runs the proxy in userspace mode on localhost ports instead (see [`userspace`]).

#[path = "kube-proxy-demo/userspace.rs"]
mod userspace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testkit::{request, Proto, ProxyProcess, RequestError, Topology};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kube-proxy-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let exe = std::env::current_exe().context("locating this program")?;
    let proxy_bin = exe.with_file_name("kube-proxy");
    if !proxy_bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            proxy_bin.display()
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return userspace::run(&proxy_bin);
    }
    let manifests = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../examples/manifests"
            ))
        });

    println!("Building a node, a client and two backend pods in network namespaces...");
    let topo = Topology::new(2)?;
    let _servers = topo.serve_all(8080)?;
    let log_dir = tempfile_dir()?;
    let log = log_dir.join("kube-proxy.log");
    let manifests = manifests
        .canonicalize()
        .with_context(|| format!("manifests {}", manifests.display()))?;
    let manifests_arg = manifests.to_string_lossy().into_owned();
    let mut proxy = ProxyProcess::start(
        &topo.node,
        &proxy_bin,
        &[
            "--manifests",
            &manifests_arg,
            "--hostname-override=node-a",
            "--cluster-cidr=10.244.0.0/16,fd00:244::/48",
        ],
        &log,
    )?;
    if !proxy.wait_for_log("synced rules", 1, Duration::from_secs(20)) {
        bail!(
            "kube-proxy did not program its rules; its log:\n{}",
            proxy.log()
        );
    }
    println!(
        "kube-proxy is running on the node (log: {}):",
        log.display()
    );
    for line in proxy.log().lines() {
        println!("  | {line}");
    }
    println!("\nRequests from the client (192.168.100.2), 6 each:");
    let checks: [(&str, Proto, &str); 6] = [
        ("demo/web ClusterIP", Proto::Tcp, "10.96.0.10:80"),
        ("demo/web ClusterIP (IPv6)", Proto::Tcp, "[fd00:96::10]:80"),
        ("demo/web NodePort", Proto::Tcp, "192.168.100.1:30080"),
        ("demo/web externalIP", Proto::Tcp, "192.168.200.50:80"),
        ("demo/dns ClusterIP", Proto::Udp, "10.96.0.53:53"),
        ("demo/down (no ready pod)", Proto::Tcp, "10.96.0.99:80"),
    ];
    let mut failures = 0;
    for (what, proto, dest) in checks {
        let addr: SocketAddr = dest.parse().context("demo address")?;
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(match request(&topo.client, proto, addr, TIMEOUT) {
                Ok(name) => name,
                Err(RequestError::Refused) => "refused".to_string(),
                Err(e) => {
                    failures += 1;
                    format!("ERROR: {e}")
                }
            });
        }
        println!("  {what:<28} {proto} {dest:<22} -> {}", answers.join(" "));
    }
    // Only a look at the result: the proxy does not need `nft` for it to be shown.
    if testkit::which(std::path::Path::new("nft")).is_some() {
        let ruleset = topo
            .node
            .exec(&["nft", "list", "table", "ip", "kube-proxy"])?;
        let elements = ruleset.lines().filter(|l| l.contains(" : ")).count();
        println!("\nThe node's nftables table `ip kube-proxy` holds {} lines ({} map entries); see it with `nft list ruleset` inside the node namespace.", ruleset.lines().count(), elements);
    }
    drop(proxy);
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    println!("\nDone: namespaces and rules are removed on exit.");
    Ok(())
}

/// A private directory for the proxy's log.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kube-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
