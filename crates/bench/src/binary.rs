//! The real `kube-proxy` binary in a node namespace of testkit's topology (client → node →
//! backends): first full sync as the binary logs it, its memory, and TCP connect latency
//! from the client namespace through the first and the last ClusterIP.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proxy_core::model::Protocol;
use testkit::synth::{self, SynthService};
use testkit::{ProxyProcess, Topology};

use crate::stats::percentile_ms;

/// What the binary showed at one size.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BinaryRun {
    /// From starting the process to the "synced rules" line: reading and parsing the
    /// manifests, planning, `nft` and the commit.
    pub start_to_synced_ms: f64,
    /// The binary's own `took_ms` for that first sync (the backend's sync alone).
    pub first_sync_took_ms: f64,
    pub first_sync_bytes: usize,
    /// VmRSS of the proxy process just after the first full sync.
    pub rss_mib: f64,
    /// VmHWM: its peak resident set so far.
    pub peak_rss_mib: f64,
    pub connect: Option<Connect>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Connect {
    pub samples: usize,
    pub first_p50_ms: f64,
    pub first_p99_ms: f64,
    pub last_p50_ms: f64,
    pub last_p99_ms: f64,
}

fn proxy_args(manifests: &Path) -> Vec<String> {
    vec![
        "--proxy-mode=nftables".into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--hostname-override=node-a".into(),
        "--cluster-cidr=10.244.0.0/16".into(),
        "--v=2".into(),
    ]
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
pub fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad line {line:?}"))?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `key=value` field of the first "synced rules" log line.
fn synced_field(log: &str, key: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("synced rules"))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let value: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    value.parse().ok()
}

fn start_and_wait(
    topo_node: &testkit::Netns,
    binary: &Path,
    dir: &Path,
    timeout: Duration,
    extra_args: &[String],
) -> Result<(ProxyProcess, f64)> {
    let manifests = dir.join("manifests");
    let mut args = proxy_args(&manifests);
    args.extend(extra_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut proxy = ProxyProcess::start(topo_node, binary, &args, &dir.join("proxy.log"))?;
    // Poll less often than the test helper: the log of a big run is read whole each time.
    if !testkit::wait_until(timeout, Duration::from_millis(5), || {
        proxy.log().contains("synced rules")
    }) {
        bail!("no sync within {timeout:?}; log:\n{}", proxy.log());
    }
    let wall = started.elapsed().as_secs_f64() * 1e3;
    if !proxy.is_running() {
        bail!("the proxy exited; log:\n{}", proxy.log());
    }
    Ok((proxy, wall))
}

/// Resident memory of the binary with no Services, after it settled (MiB).
pub fn idle_rss(binary: &Path) -> Result<f64> {
    let ns = testkit::Netns::new()?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("manifests"))?;
    let (proxy, _) = start_and_wait(&ns, binary, dir.path(), Duration::from_secs(30), &[])?;
    std::thread::sleep(Duration::from_secs(2));
    Ok(memory_mib(proxy.pid())?.0)
}

/// Points `s` at the topology's two backends over TCP, with no policy that could keep a
/// client from reaching them.
fn reachable(s: &mut SynthService, topo: &Topology) {
    s.protocol = Protocol::Tcp;
    s.affinity = false;
    s.external_local = false;
    s.internal_local = false;
    s.endpoints = topo.backends.iter().map(|b| (b.ipv4, false)).collect();
}

fn connect_once(addr: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    let took = t.elapsed();
    drop(stream);
    Ok(took)
}

/// Starts the binary (with `extra_args`) on `cluster` (its first and last Services
/// rewired to real backends), waits for the first sync and, when `connects` > 0, times
/// TCP connects to both.
pub fn run(
    binary: &Path,
    cluster: &[SynthService],
    connects: usize,
    extra_args: &[String],
) -> Result<BinaryRun> {
    let topo = Topology::new(2)?;
    let _servers = topo.serve_all(synth::TARGET_PORT)?;
    let mut cluster = cluster.to_vec();
    let Some(last) = cluster.len().checked_sub(1) else {
        bail!("an empty cluster has no ClusterIP to connect to");
    };
    reachable(&mut cluster[0], &topo);
    reachable(&mut cluster[last], &topo);
    let first_ip = IpAddr::from(cluster[0].cluster_ip);
    let last_ip = IpAddr::from(cluster[last].cluster_ip);

    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("manifests"))?;
    // Several files: the manifests source refuses a file over 64 MiB (50,000 Services
    // with 10 endpoints each are about 100 MiB of YAML).
    for (i, chunk) in cluster.chunks(5000).enumerate() {
        let mut yaml = String::new();
        for s in chunk {
            yaml.push_str(&synth::spec(s).to_yaml());
        }
        std::fs::write(
            dir.path().join(format!("manifests/services-{i:02}.yaml")),
            yaml,
        )?;
    }

    let (proxy, wall) = start_and_wait(
        &topo.node,
        binary,
        dir.path(),
        Duration::from_secs(600),
        extra_args,
    )?;
    let log = proxy.log();
    let (rss, hwm) = memory_mib(proxy.pid())?;
    let mut out = BinaryRun {
        start_to_synced_ms: wall,
        first_sync_took_ms: synced_field(&log, "took_ms").unwrap_or(0.0),
        first_sync_bytes: synced_field(&log, "bytes").unwrap_or(0.0) as usize,
        rss_mib: rss,
        peak_rss_mib: hwm,
        connect: None,
    };
    if connects > 0 {
        let first = SocketAddr::new(first_ip, synth::SERVICE_PORT);
        let last = SocketAddr::new(last_ip, synth::SERVICE_PORT);
        let (a, b) = topo
            .client
            .run(|| -> Result<(Vec<Duration>, Vec<Duration>)> {
                // Warm up (ARP, routes, the servers' accept loops), then alternate so both
                // see the same conditions.
                for _ in 0..20 {
                    connect_once(first)?;
                    connect_once(last)?;
                }
                let mut a = Vec::with_capacity(connects);
                let mut b = Vec::with_capacity(connects);
                for _ in 0..connects {
                    a.push(connect_once(first)?);
                    b.push(connect_once(last)?);
                }
                Ok((a, b))
            })?
            .with_context(|| {
                let log = proxy.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "the proxy's last log lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })?;
        out.connect = Some(Connect {
            samples: connects,
            first_p50_ms: percentile_ms(&a, 50.0),
            first_p99_ms: percentile_ms(&a, 99.0),
            last_p50_ms: percentile_ms(&b, 50.0),
            last_p99_ms: percentile_ms(&b, 99.0),
        });
    }
    drop(proxy);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_synced_line() {
        let log = "x\n2025 INFO synced rules full=true services=3 endpoints=3 bytes=1234 service_ports=3 took_ms=12.5\n";
        assert_eq!(synced_field(log, "took_ms"), Some(12.5));
        assert_eq!(synced_field(log, "bytes"), Some(1234.0));
    }
}
