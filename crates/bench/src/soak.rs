//! `bench soak`: steady real traffic through one Service while the release binary runs
//! with thousands of other Services, phase by phase (issue #17): steady, endpoint churn,
//! SIGTERM and SIGKILL restarts, re-syncs that must read the kernel back, and 200
//! unrelated Services added and removed in one change. Every phase should lose nothing.
//!
//! Traffic, from a pod (cluster IP) and an outside client (NodePort): new TCP connections
//! (each one request and its answer), UDP requests, and long-lived TCP connections that
//! echo a byte every 100 ms. A long-lived connection counts as broken when a write or
//! read fails; it is then opened again. Backends never stop, so even one whose endpoint is
//! removed keeps its established connections: a correct proxy breaks none.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::{synth, Netns, Proto, ProxyProcess, ServeMode, ServerGuard, Topology};

use crate::objects::ManifestsDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Other Services in the cluster (one port, `--endpoints` endpoints each).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    phase_secs: u64,
    /// The proxy's `--iptables-sync-period` (periodic syncs), seconds.
    #[arg(long, default_value_t = 2.0)]
    sync_period: f64,
    /// New TCP connections per second to the cluster IP (NodePort: a fifth of it).
    #[arg(long, default_value_t = 50)]
    tcp_rate: u32,
    /// UDP requests per second to the cluster IP.
    #[arg(long, default_value_t = 20)]
    udp_rate: u32,
    /// Long-lived TCP connections kept open.
    #[arg(long, default_value_t = 10)]
    long_lived: usize,
    /// The proxy binary; default: `kube-proxy` next to this program.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "bench-soak.json")]
    json: PathBuf,
}

impl Args {
    pub fn binary(&self) -> Option<&Path> {
        self.binary.as_deref()
    }
}

const CLUSTER_IP: &str = "10.111.0.10";
const NODE_IP: &str = "192.168.100.1";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const NODE_PORT: u16 = 30080;
const TIMEOUT: Duration = Duration::from_secs(2);

/// An endpoint of the soak Service: a backend pod and its conditions.
#[derive(Debug, Clone, Copy)]
struct Ep {
    ip: IpAddr,
    ready: bool,
    terminating: bool,
}

/// The soak Service (TCP 80, UDP 53, TCP echo 9000, NodePort on 80) and its slice.
fn soak_yaml(endpoints: &[Ep]) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: soak}}\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: {HTTP_PORT}, nodePort: {NODE_PORT}}}\n  - {{name: dns, protocol: UDP, port: 53, targetPort: {HTTP_PORT}}}\n  - {{name: echo, protocol: TCP, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: soak\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, protocol: TCP, port: {HTTP_PORT}}}\n- {{name: dns, protocol: UDP, port: {HTTP_PORT}}}\n- {{name: echo, protocol: TCP, port: {ECHO_PORT}}}\nendpoints:\n"
    );
    for ep in endpoints {
        y.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: node-b\n  conditions: {{ready: {}, serving: true, terminating: {}}}\n",
            ep.ip, ep.ready, ep.terminating
        ));
    }
    y
}

/// 200 unrelated Services (no endpoints needed to change the ruleset) in one file.
fn bulk_yaml() -> String {
    let mut y = String::new();
    for i in 0..200 {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: bulk-{i}, namespace: soak}}\nspec:\n  clusterIP: 10.112.{}.{}\n  ports: [{{name: p, protocol: TCP, port: 80, targetPort: 80}}]\n",
            i / 250,
            i % 250 + 1
        ));
    }
    y
}

/// Writes `content` to `dir/name` atomically (the proxy never reads half a file).
fn write_file(dir: &Path, name: &str, content: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming into {name}"))
}

/// What one phase saw.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PhaseStats {
    pub name: String,
    pub seconds: f64,
    pub tcp_cluster_ip: (u64, u64),
    pub tcp_node_port: (u64, u64),
    pub udp: (u64, u64),
    /// Long-lived connections that broke (each reopened).
    pub long_lived_broken: u64,
    /// Echo round trips that went through on long-lived connections.
    pub long_lived_echoes: u64,
    /// Example failures, to say what went wrong.
    pub samples: Vec<String>,
}

impl PhaseStats {
    fn failed(&self) -> u64 {
        self.tcp_cluster_ip.1 + self.tcp_node_port.1 + self.udp.1 + self.long_lived_broken
    }
}

/// Counters shared by the traffic threads; `phase` says which phase an outcome belongs to.
struct Tally {
    phase: AtomicUsize,
    stop: AtomicBool,
    phases: Mutex<Vec<PhaseStats>>,
}

enum Outcome {
    Cluster(bool),
    NodePort(bool),
    Udp(bool),
    Broken,
    Echo,
}

impl Tally {
    fn record(&self, outcome: Outcome, detail: impl FnOnce() -> String) {
        let phase = self.phase.load(Ordering::Relaxed);
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = phases.get_mut(phase) else {
            return;
        };
        let count = |pair: &mut (u64, u64), ok: bool| {
            pair.0 += 1;
            if !ok {
                pair.1 += 1;
            }
            ok
        };
        let ok = match outcome {
            Outcome::Cluster(ok) => count(&mut p.tcp_cluster_ip, ok),
            Outcome::NodePort(ok) => count(&mut p.tcp_node_port, ok),
            Outcome::Udp(ok) => count(&mut p.udp, ok),
            Outcome::Broken => {
                p.long_lived_broken += 1;
                false
            }
            Outcome::Echo => {
                p.long_lived_echoes += 1;
                true
            }
        };
        if !ok && p.samples.len() < 5 {
            p.samples.push(detail());
        }
    }
}

/// Runs `f` every `1/rate` seconds until the tally says stop.
fn paced(tally: &Tally, rate: u32, mut f: impl FnMut()) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut next = Instant::now();
    while !tally.stop.load(Ordering::Relaxed) {
        f();
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
}

/// One long-lived connection's life: connect, echo a byte every 100 ms, reconnect after
/// a failure. Runs inside the client's namespace.
fn long_lived(tally: &Tally, dest: SocketAddr) {
    while !tally.stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect_timeout(&dest, TIMEOUT) else {
            tally.record(Outcome::Broken, || "long-lived: connect failed".into());
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = conn.set_read_timeout(Some(TIMEOUT));
        let mut byte = [0u8; 1];
        while !tally.stop.load(Ordering::Relaxed) {
            let echoed = conn
                .write_all(b"x")
                .and_then(|()| conn.read_exact(&mut byte));
            match echoed {
                Ok(()) => tally.record(Outcome::Echo, String::new),
                Err(e) => {
                    tally.record(Outcome::Broken, || format!("long-lived: {e}"));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Starts every traffic thread; they run until `tally.stop`.
fn start_traffic(
    topo: &Arc<Topology>,
    tally: &Arc<Tally>,
    args: &Args,
) -> Vec<std::thread::JoinHandle<()>> {
    let cluster: SocketAddr = SocketAddr::new(CLUSTER_IP.parse().expect("constant IP"), 80);
    let udp: SocketAddr = SocketAddr::new(cluster.ip(), 53);
    let node_port: SocketAddr = SocketAddr::new(NODE_IP.parse().expect("constant IP"), NODE_PORT);
    let echo = SocketAddr::new(cluster.ip(), ECHO_PORT);
    let mut threads = Vec::new();
    let spawn = |f: Box<dyn FnOnce() + Send>| std::thread::spawn(f);
    let (t, k) = (Arc::clone(topo), Arc::clone(tally));
    let rate = args.tcp_rate;
    threads.push(spawn(Box::new(move || {
        paced(&k, rate, || {
            let r = testkit::tcp_request(&t.pod_client, cluster, TIMEOUT);
            k.record(Outcome::Cluster(r.is_ok()), || format!("cluster IP: {r:?}"));
        })
    })));
    let (t, k) = (Arc::clone(topo), Arc::clone(tally));
    let rate = (args.tcp_rate / 5).max(1);
    threads.push(spawn(Box::new(move || {
        paced(&k, rate, || {
            let r = testkit::tcp_request(&t.client, node_port, TIMEOUT);
            k.record(Outcome::NodePort(r.is_ok()), || format!("NodePort: {r:?}"));
        })
    })));
    let (t, k) = (Arc::clone(topo), Arc::clone(tally));
    let rate = args.udp_rate;
    threads.push(spawn(Box::new(move || {
        paced(&k, rate, || {
            let r = testkit::udp_request(&t.pod_client, udp, TIMEOUT);
            k.record(Outcome::Udp(r.is_ok()), || format!("UDP: {r:?}"));
        })
    })));
    for _ in 0..args.long_lived {
        let (t, k) = (Arc::clone(topo), Arc::clone(tally));
        threads.push(spawn(Box::new(move || {
            let _ = t.pod_client.run(|| long_lived(&k, echo));
        })));
    }
    threads
}

fn start_proxy(
    node: &Netns,
    binary: &Path,
    dir: &Path,
    args: &Args,
    n: usize,
) -> Result<ProxyProcess> {
    let manifests = dir.join("manifests").display().to_string();
    let sync = format!(
        "--iptables-sync-period={}ms",
        (args.sync_period * 1e3).round() as u64
    );
    let proxy_args = [
        "--proxy-mode=nftables",
        "--hostname-override=node-a",
        "--cluster-cidr=10.244.0.0/16",
        "--iptables-min-sync-period=0s",
        sync.as_str(),
        "--manifests",
        manifests.as_str(),
    ];
    let log = dir.join(format!("proxy-{n}.log"));
    let mut proxy = ProxyProcess::start(node, binary, &proxy_args, &log)?;
    if !proxy.wait_for_log("synced rules", 1, Duration::from_secs(300)) {
        bail!("the proxy did not sync; log:\n{}", proxy.log());
    }
    Ok(proxy)
}

pub fn main(args: Args, binary: &Path) -> Result<()> {
    let topo = Arc::new(Topology::new(3)?);
    let backends: Vec<IpAddr> = topo.backends.iter().map(|b| IpAddr::V4(b.ipv4)).collect();
    let mut servers: Vec<ServerGuard> = Vec::new();
    for b in &topo.backends {
        servers.push(b.serve_with(HTTP_PORT, &[Proto::Tcp, Proto::Udp], ServeMode::Name)?);
        servers.push(b.serve_with(ECHO_PORT, &[Proto::Tcp], ServeMode::Echo)?);
    }
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    let others = synth::cluster(args.services, args.endpoints..=args.endpoints);
    ManifestsDir::create(&manifests, &others, 5000)?;
    let ep = |i: usize, ready: bool, terminating: bool| Ep {
        ip: backends[i],
        ready,
        terminating,
    };
    let steady = [ep(0, true, false), ep(1, true, false)];
    write_file(&manifests, "soak.yaml", &soak_yaml(&steady))?;
    let started = Instant::now();
    let mut proxy = start_proxy(&topo.node, binary, dir.path(), &args, 0)?;
    eprintln!(
        "soak: {} other Services synced in {:.1} s",
        args.services,
        started.elapsed().as_secs_f64()
    );

    let names = [
        "steady",
        "endpoint churn (add, terminating, remove, re-add)",
        "restart, SIGTERM",
        "restart, SIGKILL",
        "re-syncs reading the kernel back (other commits every 0.5 s)",
        "200 unrelated Services added and removed in one change",
    ];
    let tally = Arc::new(Tally {
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        phases: Mutex::new(
            names
                .iter()
                .map(|n| PhaseStats {
                    name: (*n).into(),
                    ..PhaseStats::default()
                })
                .collect(),
        ),
    });
    let threads = start_traffic(&topo, &tally, &args);
    let phase_len = Duration::from_secs(args.phase_secs);
    let mut restarts = 0;
    for (i, name) in names.iter().enumerate() {
        tally.phase.store(i, Ordering::Relaxed);
        let begin = Instant::now();
        eprintln!("soak: phase {i}: {name}");
        match i {
            1 => {
                // Churn, one step a second: be2 added, be0 terminating, be0 removed, be0 back.
                let steps: [&[Ep]; 4] = [
                    &[ep(0, true, false), ep(1, true, false), ep(2, true, false)],
                    &[ep(0, false, true), ep(1, true, false), ep(2, true, false)],
                    &[ep(1, true, false), ep(2, true, false)],
                    &[ep(0, true, false), ep(1, true, false)],
                ];
                let mut k = 0;
                while begin.elapsed() < phase_len {
                    write_file(&manifests, "soak.yaml", &soak_yaml(steps[k % steps.len()]))?;
                    k += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                write_file(&manifests, "soak.yaml", &soak_yaml(&steady))?;
            }
            2 | 3 => {
                std::thread::sleep(phase_len / 4);
                if i == 2 {
                    proxy.terminate()?;
                } else {
                    drop(proxy); // SIGKILL
                }
                restarts += 1;
                proxy = start_proxy(&topo.node, binary, dir.path(), &args, restarts)?;
            }
            4 => {
                while begin.elapsed() < phase_len {
                    topo.node
                        .exec(&["nft", "add", "table", "ip", "soak-other"])?;
                    topo.node
                        .exec(&["nft", "delete", "table", "ip", "soak-other"])?;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            5 => {
                let mut on = false;
                while begin.elapsed() < phase_len {
                    if on {
                        std::fs::remove_file(manifests.join("bulk.yaml"))?;
                    } else {
                        write_file(&manifests, "bulk.yaml", &bulk_yaml())?;
                    }
                    on = !on;
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
            _ => {}
        }
        if let Some(rest) = phase_len.checked_sub(begin.elapsed()) {
            std::thread::sleep(rest);
        }
        let mut phases = tally.phases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = phases.get_mut(i) {
            p.seconds = begin.elapsed().as_secs_f64();
        }
    }
    // Outcomes of the last requests belong to the last phase.
    tally.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    if !proxy.is_running() {
        bail!("the proxy exited; log:\n{}", proxy.log());
    }
    drop(servers);
    let phases = tally
        .phases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!("{}", markdown(&args, &phases));
    let failed: u64 = phases.iter().map(PhaseStats::failed).sum();
    let report = BTreeMap::from([
        ("services", serde_json::json!(args.services)),
        ("endpoints", serde_json::json!(args.endpoints)),
        ("phases", serde_json::to_value(&phases)?),
        ("failed", serde_json::json!(failed)),
    ]);
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    for p in phases.iter().filter(|p| !p.samples.is_empty()) {
        eprintln!("{}: {}", p.name, p.samples.join("; "));
    }
    if failed > 0 {
        bail!("{failed} requests or connections failed");
    }
    Ok(())
}

fn markdown(args: &Args, phases: &[PhaseStats]) -> String {
    let mut t = format!(
        "Soak, {} other Services × {} endpoints, periodic sync every {} s; {} TCP/s to the cluster IP, {} to the NodePort, {} UDP/s, {} long-lived connections\n\n| phase | s | TCP cluster IP tried / failed | TCP NodePort tried / failed | UDP tried / lost | long-lived broken (echoes) |\n|---|---|---|---|---|---|\n",
        args.services,
        args.endpoints,
        args.sync_period,
        args.tcp_rate,
        (args.tcp_rate / 5).max(1),
        args.udp_rate,
        args.long_lived
    );
    for p in phases {
        t.push_str(&format!(
            "| {} | {:.0} | {} / {} | {} / {} | {} / {} | {} ({}) |\n",
            p.name,
            p.seconds,
            p.tcp_cluster_ip.0,
            p.tcp_cluster_ip.1,
            p.tcp_node_port.0,
            p.tcp_node_port.1,
            p.udp.0,
            p.udp.1,
            p.long_lived_broken,
            p.long_lived_echoes
        ));
    }
    t
}
