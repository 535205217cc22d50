//! `bench leak`: the release binary under endpoint churn for minutes (issue #17 item 6):
//! one file per Service, one endpoint changed every `--interval-ms`, each a sync of its
//! own; RSS, open file descriptors and threads sampled throughout. A leak shows as a
//! climb from the first samples (after warm-up) to the last.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::{synth, Netns, ProxyProcess};

use crate::objects::ManifestsDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// How long to churn, in minutes.
    #[arg(long, default_value_t = 60.0)]
    minutes: f64,
    /// Milliseconds between endpoint changes.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
    /// The proxy binary; default: `kube-proxy` next to this program.
    #[arg(long)]
    binary: Option<PathBuf>,
    #[arg(long, default_value = "bench-leak.json")]
    json: PathBuf,
}

impl Args {
    pub fn binary(&self) -> Option<&Path> {
        self.binary.as_deref()
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sample {
    at_s: f64,
    rss_mib: f64,
    fds: usize,
    threads: usize,
    syncs: usize,
}

fn sample(pid: u32, at_s: f64, syncs: usize) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Sample {
        at_s,
        rss_mib: field("VmRSS:").context("VmRSS")? / 1024.0,
        fds,
        threads: field("Threads:").context("Threads")? as usize,
        syncs,
    })
}

pub fn main(args: Args, binary: &Path) -> Result<()> {
    let node = Netns::new()?;
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    let mut cluster = synth::cluster(args.services, args.endpoints..=args.endpoints);
    let files = ManifestsDir::create(&manifests, &cluster, 1)?;
    let manifests_arg = manifests.display().to_string();
    let proxy_args = [
        "--proxy-mode=nftables",
        "--hostname-override=node-a",
        "--cluster-cidr=10.244.0.0/16",
        "--iptables-min-sync-period=0s",
        "--iptables-sync-period=30s",
        "--manifests",
        manifests_arg.as_str(),
    ];
    let log = dir.path().join("proxy.log");
    let mut proxy = ProxyProcess::start(&node, binary, &proxy_args, &log)?;
    if !proxy.wait_for_log("synced rules", 1, Duration::from_secs(600)) {
        bail!("no first sync; log:\n{}", proxy.log());
    }
    let pid = proxy.pid();
    let syncs = || std::fs::read_to_string(&log).map_or(0, |l| l.matches("synced rules").count());
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.minutes * 60.0);
    let every = Duration::from_millis(args.interval_ms);
    let sample_every = Duration::from_secs(args.sample_secs);
    let mut samples = vec![sample(pid, 0.0, syncs())?];
    let mut next_sample = started + sample_every;
    let mut k: usize = 0;
    while Instant::now() < end {
        // Move one endpoint of the next Service to a fresh address, and back later.
        let index = k % cluster.len();
        let s = &mut cluster[index];
        if let Some(ep) = s.endpoints.first_mut() {
            ep.0 = std::net::Ipv4Addr::from(0xac10_0000 | (k as u32 & 0xf_ffff));
        }
        files.stage_chunk(&cluster, index)?.commit()?;
        k += 1;
        std::thread::sleep(every);
        if Instant::now() >= next_sample {
            samples.push(sample(pid, started.elapsed().as_secs_f64(), syncs())?);
            next_sample += sample_every;
            if !proxy.is_running() {
                bail!("the proxy exited; log:\n{}", proxy.log());
            }
        }
    }
    samples.push(sample(pid, started.elapsed().as_secs_f64(), syncs())?);
    let _ = proxy.terminate();
    // Warm-up: the first tenth of the run (allocator pools, the first periodic syncs).
    let warm = samples
        .iter()
        .find(|s| s.at_s >= args.minutes * 6.0)
        .copied()
        .unwrap_or(samples[0]);
    let last = *samples.last().context("samples")?;
    let max_rss = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    println!(
        "Leak run: {} Services × {} endpoints, {:.1} min, {} changes, {} syncs\n\n| | after warm-up ({:.0} s) | end ({:.0} s) | drift | max |\n|---|---|---|---|---|\n| RSS | {:.1} MiB | {:.1} MiB | {:+.1} MiB | {:.1} MiB |\n| open fds | {} | {} | {:+} | {} |\n| threads | {} | {} | {:+} | {} |",
        args.services,
        args.endpoints,
        args.minutes,
        k,
        last.syncs,
        warm.at_s,
        last.at_s,
        warm.rss_mib,
        last.rss_mib,
        last.rss_mib - warm.rss_mib,
        max_rss,
        warm.fds,
        last.fds,
        last.fds as i64 - warm.fds as i64,
        samples.iter().map(|s| s.fds).max().unwrap_or(0),
        warm.threads,
        last.threads,
        last.threads as i64 - warm.threads as i64,
        samples.iter().map(|s| s.threads).max().unwrap_or(0),
    );
    std::fs::write(&args.json, serde_json::to_string_pretty(&samples)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    Ok(())
}
