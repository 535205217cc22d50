//! `bench deployed`: the release binary as a user runs it, fed by a real source, watched
//! across periodic syncs. Per source (`--manifests` files, or the fake API server over
//! HTTP inside the node's namespace) and size, in a fresh network namespace:
//!
//! 1. **first sync**: from launching the process to the first "synced rules" line (its
//!    own timestamp), then a kernel check that `service-ips` holds every cluster IP (when
//!    it does not yet, the kernel is polled and the time of the complete check counts);
//! 2. **memory** (`VmRSS`, `VmHWM`) `--settle` seconds after that;
//! 3. **idle**: CPU (utime + stime, and the `nft` children's) over `--idle` seconds with
//!    nothing changing but the periodic syncs (`--sync-period`);
//! 4. **endpoint changes**: `--changes` EndpointSlice updates (API) or file renames
//!    (manifests), each timed from the event to the commit of the element carrying the new
//!    endpoint, as an nftables netlink monitor in the node's namespace sees it (or, past
//!    `--monitor-window`, a lookup of the element: see [`crate::probe`]);
//! 5. **added Services**: `--adds` new Services, timed to their cluster IP's first element,
//!    and to the one that gives it endpoints;
//! 6. memory again, and the periodic syncs' own `took_ms` from the log (the lines after
//!    the first that carry no change), with the changes that met one.
//!
//! The JSON report is written again after each run, so a failure keeps the runs before.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use fake_apiserver::FakeApiServer;
use serde_json::Value;
use testkit::synth::{self, SynthService};
use testkit::{Netns, ProxyProcess};

use crate::monitor::{Monitor, MonitorStats, Seen, Target, Via};
use crate::objects::{self, ManifestsDir};
use crate::probe::{Observer, Probe, Prober};
use crate::proxylog::{self, Synced};
use crate::stats::percentile_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `--manifests DIR`: YAML files, changed by writing a temporary file and renaming it.
    Manifests,
    /// `--kubeconfig`: the fake API server over HTTP, changed through its `apply`.
    Api,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Manifests => "manifests",
            Source::Api => "API",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster sizes, in Services (one port each).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Endpoints per Service: `N`, or `A-B` to spread counts over the range.
    #[arg(long, default_value = "10")]
    endpoints: String,
    /// Sources, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "manifests,api"
    )]
    source: Vec<Source>,
    /// The proxy's `--iptables-sync-period`, in seconds (a periodic sync this often).
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    sync_period: f64,
    /// The proxy's `--iptables-min-sync-period`, in seconds (its default: 1).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    min_sync_period: f64,
    /// Seconds after the first sync before reading the proxy's memory.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    settle: f64,
    /// Seconds of idle (no changes) over which the proxy's CPU time is read.
    #[arg(long, default_value_t = 60.0, value_parser = non_negative)]
    idle: f64,
    /// One-endpoint changes timed per run.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Services added (and timed) per run.
    #[arg(long, default_value_t = 100)]
    adds: usize,
    /// Seconds between changes. A change also waits until `--min-sync-period` has passed
    /// since the previous change was committed, so it is never held back by its
    /// predecessor's sync, only by the proxy's own periodic syncs.
    #[arg(long, default_value_t = 1.5, value_parser = non_negative)]
    change_interval: f64,
    /// Milliseconds the nftables monitor listens after each change (see `probe.rs`).
    #[arg(long, default_value_t = 50.0, value_parser = non_negative)]
    monitor_window: f64,
    /// Milliseconds between element lookups after that (at least; 1% of the time since the
    /// change when that is longer).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    poll_interval: f64,
    /// Seconds to wait for a change to reach the kernel before counting it as lost.
    #[arg(long, default_value_t = 30.0, value_parser = non_negative)]
    change_timeout: f64,
    /// Seconds to wait for the first sync.
    #[arg(long, default_value_t = 900.0, value_parser = non_negative)]
    start_timeout: f64,
    /// Services per manifest file (the source refuses files over 64 MiB).
    #[arg(long, default_value_t = 5000)]
    services_per_file: usize,
    /// Seconds between the fake API server's watch bookmarks (kube-apiserver: about one
    /// a minute).
    #[arg(long, default_value_t = 60.0, value_parser = positive)]
    bookmark_interval: f64,
    /// The proxy binary; default: `kube-proxy` next to this program.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "bench-deployed.json")]
    json: PathBuf,
    /// One more flag for the proxy, e.g. `--proxy-arg=--kube-api-qps=50` (repeatable;
    /// later flags win over the bench's own).
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
    /// Keep each run's proxy logs in this directory (`SOURCE-SERVICES.log`, and
    /// `SOURCE-SERVICES-restart.log` for the restarted process).
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Skip the last phase: a SIGTERM restart with one endpoint change made at launch.
    #[arg(long)]
    no_restart: bool,
}

/// A number of seconds (or milliseconds) ≥ 0.
fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("want a number ≥ 0, not {text:?}")),
    }
}

/// A number of seconds > 0.
fn positive(text: &str) -> Result<f64, String> {
    match non_negative(text)? {
        v if v > 0.0 => Ok(v),
        _ => Err("want a number > 0".into()),
    }
}

impl Args {
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn binary(&self) -> Option<&Path> {
        self.binary.as_deref()
    }
}

/// Memory of the proxy process, MiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub rss_mib: f64,
    pub hwm_mib: f64,
}

/// CPU seconds from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Cpu {
    /// utime + stime of the process (all its threads).
    pub process_s: f64,
    /// cutime + cstime: its children it waited for (`nft`, `conntrack`).
    pub children_s: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            process_s: self.process_s - o.process_s,
            children_s: self.children_s - o.children_s,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FirstSync {
    /// Launch → the kernel holds every cluster IP.
    pub launch_to_synced_ms: f64,
    /// How that point was found: `"log line, kernel checked"` or `"kernel poll"`.
    pub method: String,
    /// The proxy's own `took_ms` for the sync.
    pub took_ms: f64,
    /// Launch → the source delivered its initial state (the log's clock): listing, for
    /// the API source also the fake server's answering, on the same cores.
    pub launch_to_state_ms: Option<f64>,
    /// Cluster IPs found in `service-ips` by the check.
    pub kernel_cluster_ips: usize,
    /// CPU the proxy used up to then.
    pub proxy_cpu: Cpu,
    /// CPU this bench process used meanwhile: for the API source, mostly the fake server
    /// answering the lists (it shares the machine's two cores with the proxy).
    pub bench_cpu_s: f64,
}

/// A restart on the same source (SIGTERM, start again) with one endpoint change made
/// right at launch.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Restart {
    /// Launch → the first "synced rules" line (the log's clock).
    pub launch_to_first_sync_ms: f64,
    /// The proxy's own `took_ms` for its first sync.
    pub first_sync_took_ms: f64,
    /// Launch → the source delivered its initial state (the log's clock).
    pub launch_to_state_ms: Option<f64>,
    /// CPU the restarted proxy used up to its first sync.
    pub proxy_cpu_s: f64,
    /// Launch → the kernel holds the change (the monitor's clock).
    pub launch_to_change_ms: Option<f64>,
    /// Maps the first sync found already loaded and left alone (from the log).
    pub maps_kept: usize,
}

/// The periodic syncs, as the log reports them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Resyncs {
    pub count: usize,
    pub took_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
}

impl Resyncs {
    fn of(syncs: &[&Synced]) -> Resyncs {
        let took: Vec<f64> = syncs.iter().map(|s| s.took_ms).collect();
        let durations: Vec<Duration> = took
            .iter()
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
            .collect();
        Resyncs {
            count: took.len(),
            p50_ms: percentile_ms(&durations, 50.0),
            max_ms: took.iter().copied().fold(0.0, f64::max),
            took_ms: took,
        }
    }
}

/// One timed change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Unix time of the event, seconds.
    pub at_unix_s: f64,
    /// Event → commit; None when not seen within `--change-timeout`.
    pub latency_ms: Option<f64>,
    /// For added Services: event → the commit that gave it its endpoints.
    pub with_endpoints_ms: Option<f64>,
    /// The map or set it first showed up in.
    pub set: String,
    /// Whether the monitor saw the commit, or a lookup the element.
    pub via: Option<Via>,
    /// Whether the event met a periodic sync: it came while one ran, or less than the min
    /// sync period after one started.
    pub during_resync: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latencies {
    pub samples: usize,
    pub lost: usize,
    /// How many the monitor saw (the others: lookups).
    pub by_monitor: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Changes that met a periodic sync (see [`Sample::during_resync`]), and their worst
    /// latency.
    pub during_resync: usize,
    pub during_resync_max_ms: f64,
    /// The median of the other changes, to compare with.
    pub others_p50_ms: f64,
    /// For added Services: to the commit with their endpoints.
    pub with_endpoints_p50_ms: Option<f64>,
    pub with_endpoints_p99_ms: Option<f64>,
    pub all: Vec<Sample>,
}

impl Sample {
    fn new(t0: Instant, seen: Option<Seen>, ready: Option<Seen>) -> Sample {
        let ms = |s: &Seen| s.at.saturating_duration_since(t0).as_secs_f64() * 1e3;
        Sample {
            at_unix_s: unix_s(SystemTime::now() - t0.elapsed()),
            latency_ms: seen.as_ref().map(ms),
            with_endpoints_ms: ready.as_ref().map(ms),
            set: seen.as_ref().map(|s| s.set.clone()).unwrap_or_default(),
            via: seen.map(|s| s.via),
            during_resync: false,
        }
    }
}

impl Latencies {
    fn of(all: Vec<Sample>) -> Latencies {
        let ms = |s: &Sample| s.latency_ms.map(|v| Duration::from_secs_f64(v / 1e3));
        let seen: Vec<Duration> = all.iter().filter_map(ms).collect();
        let during: Vec<Duration> = all
            .iter()
            .filter(|s| s.during_resync)
            .filter_map(ms)
            .collect();
        let others: Vec<Duration> = all
            .iter()
            .filter(|s| !s.during_resync)
            .filter_map(ms)
            .collect();
        let with_eps: Vec<Duration> = all
            .iter()
            .filter_map(|s| {
                s.with_endpoints_ms
                    .map(|v| Duration::from_secs_f64(v / 1e3))
            })
            .collect();
        let max = |d: &[Duration]| d.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3);
        Latencies {
            samples: all.len(),
            lost: all.len() - seen.len(),
            by_monitor: all.iter().filter(|s| s.via == Some(Via::Monitor)).count(),
            p50_ms: percentile_ms(&seen, 50.0),
            p99_ms: percentile_ms(&seen, 99.0),
            max_ms: max(&seen),
            during_resync: all.iter().filter(|s| s.during_resync).count(),
            during_resync_max_ms: max(&during),
            others_p50_ms: percentile_ms(&others, 50.0),
            with_endpoints_p50_ms: (!with_eps.is_empty()).then(|| percentile_ms(&with_eps, 50.0)),
            with_endpoints_p99_ms: (!with_eps.is_empty()).then(|| percentile_ms(&with_eps, 99.0)),
            all,
        }
    }
}

/// CPU time of the whole machine, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
struct MachineCpu {
    /// Every state but idle and iowait, all CPUs, seconds.
    busy_s: f64,
    /// Time the hypervisor gave to others, seconds.
    steal_s: f64,
}

fn machine_cpu() -> Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let field = |i: usize| v.get(i).copied().unwrap_or(0.0) / clock_ticks();
    Ok(MachineCpu {
        busy_s: field(0) + field(1) + field(2) + field(5) + field(6),
        steal_s: field(7),
    })
}

/// What else ran on the machine during a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    /// `/proc/loadavg` when the run started.
    pub loadavg_start: String,
    /// Cores busy on average with work other than the proxy (and its children) and this
    /// bench (which holds the fake API server): other builds and tests.
    pub others_cores: f64,
    /// Cores' worth of time stolen by the hypervisor, on average.
    pub steal_cores: f64,
    pub seconds: f64,
}

/// Everything measured in one run (a source at a size).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Run {
    pub source: String,
    pub services: usize,
    pub endpoints: String,
    pub first_sync: FirstSync,
    /// `--settle` seconds after the first sync.
    pub memory_settled: Memory,
    pub idle_s: f64,
    pub idle_cpu: Cpu,
    /// Periodic syncs while idle (no monitor open).
    pub resyncs_idle: Resyncs,
    /// Periodic syncs during the change phases (the monitor listens for at most
    /// `--monitor-window` after each change; a full sync committing then also builds a
    /// message per element for it).
    pub resyncs_changes: Resyncs,
    pub endpoint_change: Latencies,
    pub add_service: Latencies,
    /// At the end, after the changes and additions.
    pub memory_end: Memory,
    /// Cluster IPs in `service-ips` at the end (Services + added ones expected).
    pub kernel_cluster_ips_end: usize,
    pub monitor: MonitorStats,
    pub restart: Option<Restart>,
    /// This bench process's resident memory after loading the fake API server (API
    /// source): what holding the objects costs it.
    pub fake_server_rss_mib: Option<f64>,
    /// Seconds to load the objects into the fake API server.
    pub fake_server_load_s: Option<f64>,
    pub machine: Machine,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    command: String,
    kernel: String,
    nft: String,
    /// `/proc/loadavg` before and after: other work on the machine.
    loadavg_start: String,
    loadavg_end: String,
    sync_period_s: f64,
    min_sync_period_s: f64,
    runs: Vec<Run>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn main(args: Args, binary: &Path, endpoints: std::ops::RangeInclusive<usize>) -> Result<()> {
    if let Some(dir) = &args.logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        kernel: crate::tool_version(&["uname", "-r"]),
        nft: crate::tool_version(&["nft", "--version"]),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        sync_period_s: args.sync_period,
        min_sync_period_s: args.min_sync_period,
        runs: Vec::new(),
    };
    let mut sizes = args.services.clone();
    sizes.sort_unstable();
    for &n in &sizes {
        // The added Services are the next ones of the same mix.
        let all = synth::cluster(n + args.adds, endpoints.clone());
        for &source in &args.source {
            eprintln!(
                "deployed: {} × {} endpoints, {}...",
                n,
                args.endpoints,
                source.label()
            );
            let run = run(&args, binary, source, &all, n)
                .with_context(|| format!("{} Services from {}", n, source.label()))?;
            eprintln!(
                "  first sync {:.0} ms, RSS {:.1} MiB, idle CPU {:.2} s, endpoint change p50 {:.1} ms, add Service p50 {:.1} ms",
                run.first_sync.launch_to_synced_ms,
                run.memory_settled.rss_mib,
                run.idle_cpu.process_s + run.idle_cpu.children_s,
                run.endpoint_change.p50_ms,
                run.add_service.p50_ms
            );
            report.runs.push(run);
            report.loadavg_end = loadavg();
            std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", args.json.display()))?;
        }
    }
    println!("{}", markdown(&report));
    Ok(())
}

/// How the bench changes the cluster through a source.
enum Feed {
    Manifests(ManifestsDir),
    Api(FakeApiServer),
}

impl Feed {
    /// Publishes `cluster[index]` (whose endpoints the caller changed); returns the
    /// instant just before the event the proxy can see (the rename, or the apply).
    fn endpoints_changed(&self, cluster: &[SynthService], index: usize) -> Result<Instant> {
        match self {
            Feed::Manifests(dir) => {
                let staged = dir.stage_chunk(cluster, index)?;
                let t0 = Instant::now();
                staged.commit()?;
                Ok(t0)
            }
            Feed::Api(api) => {
                let s = cluster.get(index).context("no such Service")?;
                let slice = objects::service_objects(s)
                    .into_iter()
                    .nth(1)
                    .context("the Service has no EndpointSlice")?;
                let t0 = Instant::now();
                api.apply(slice).context("applying the EndpointSlice")?;
                Ok(t0)
            }
        }
    }

    /// Publishes a new Service (the `n`-th added) with its slice.
    fn service_added(&self, n: usize, s: &SynthService) -> Result<Instant> {
        match self {
            Feed::Manifests(dir) => {
                let staged = dir.stage_added(n, s)?;
                let t0 = Instant::now();
                staged.commit()?;
                Ok(t0)
            }
            Feed::Api(api) => {
                // As in a cluster: the Service, then the slice the controller makes for it.
                let objects = objects::service_objects(s);
                let t0 = Instant::now();
                for object in objects {
                    api.apply(object).context("applying the new Service")?;
                }
                Ok(t0)
            }
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid`.
fn memory(pid: u32) -> Result<Memory> {
    let (rss_mib, hwm_mib) = crate::binary::memory_mib(pid)?;
    Ok(Memory { rss_mib, hwm_mib })
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU time of `pid` ("self" for this process) from `/proc/PID/stat`.
fn cpu(pid: &str) -> Result<Cpu> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses; the fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("odd {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    let tick = |i: usize| -> Result<f64> {
        let v: f64 = fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {} in {path}", i + 3))?;
        Ok(v / clock_ticks())
    };
    Ok(Cpu {
        process_s: tick(11)? + tick(12)?,
        children_s: tick(13)? + tick(14)?,
    })
}

/// The IPv4 addresses in the keys of `ip kube-proxy service-ips`.
fn kernel_service_ips(node: &Netns) -> Result<std::collections::HashSet<Ipv4Addr>> {
    let out = node.exec(&[
        "nft",
        "-j",
        "list",
        "map",
        "ip",
        "kube-proxy",
        "service-ips",
    ])?;
    let json: Value = serde_json::from_str(&out).context("parsing nft -j output")?;
    let mut ips = std::collections::HashSet::new();
    collect_ipv4(&json, &mut ips);
    Ok(ips)
}

/// Every string in `v` that is an IPv4 address (the map's data are chain names).
fn collect_ipv4(v: &Value, out: &mut std::collections::HashSet<Ipv4Addr>) {
    match v {
        Value::String(s) => {
            if let Ok(ip) = s.parse() {
                out.insert(ip);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_ipv4(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_ipv4(i, out)),
        _ => {}
    }
}

/// How many of `cluster`'s cluster IPs missing from `listed` an element lookup finds.
fn found_by_lookup(
    node: &Netns,
    listed: &std::collections::HashSet<Ipv4Addr>,
    cluster: &[SynthService],
) -> Result<usize> {
    let mut prober = node
        .run(Prober::open)
        .context("entering the node's namespace")??;
    let mut found = 0;
    for s in cluster.iter().filter(|s| !listed.contains(&s.cluster_ip)) {
        // In `service-ips`, the map the listing reads.
        let probe = Probe::new(
            Target::ServiceReady(s.cluster_ip),
            s.cluster_ip,
            s.protocol,
            synth::SERVICE_PORT,
            0,
        );
        if prober.find(&probe)?.is_some() {
            found += 1;
        }
    }
    Ok(found)
}

fn count_present(kernel: &std::collections::HashSet<Ipv4Addr>, cluster: &[SynthService]) -> usize {
    cluster
        .iter()
        .filter(|s| kernel.contains(&s.cluster_ip))
        .count()
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The proxy's command line for `source` (files in `dir`).
fn proxy_args(args: &Args, source: Source, dir: &Path) -> Vec<String> {
    let mut out = vec![
        "--proxy-mode=nftables".to_string(),
        format!("--hostname-override={}", objects::NODE),
        "--cluster-cidr=10.244.0.0/16".into(),
        "--v=2".into(),
        format!(
            "--iptables-sync-period={}ms",
            (args.sync_period * 1e3).round() as u64
        ),
        format!(
            "--iptables-min-sync-period={}ms",
            (args.min_sync_period * 1e3).round() as u64
        ),
    ];
    match source {
        Source::Manifests => {
            out.push("--manifests".into());
            out.push(dir.join("manifests").display().to_string());
        }
        Source::Api => {
            out.push("--kubeconfig".into());
            out.push(dir.join("kubeconfig").display().to_string());
        }
    }
    // A `--proxy-arg` replaces the bench's flag of the same name (the proxy would take
    // the later one anyway; this keeps the logged command line plain).
    let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_string();
    let given: Vec<String> = args.proxy_arg.iter().map(|a| flag(a)).collect();
    out.retain(|a| !given.contains(&flag(a)));
    out.extend(args.proxy_arg.iter().cloned());
    out
}

/// Starts the fake API server inside `node`, loaded with the Node and `cluster`, and
/// writes a kubeconfig for it into `dir`. Returns the server, its RSS cost and load time.
fn start_api(
    args: &Args,
    node: &Netns,
    dir: &Path,
    cluster: &[SynthService],
) -> Result<(FakeApiServer, f64, f64)> {
    let before = crate::binary::memory_mib(std::process::id())?.0;
    let started = Instant::now();
    let mut api =
        FakeApiServer::with_bookmark_interval(Duration::from_secs_f64(args.bookmark_interval))
            .context("creating the fake API server")?;
    api.apply(objects::node()).context("loading the Node")?;
    for s in cluster {
        for object in objects::service_objects(s) {
            api.apply(object).context("loading the cluster")?;
        }
    }
    let load_s = started.elapsed().as_secs_f64();
    let listener = node
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .context("entering the node's namespace")?
        .context("binding the fake API server in the node's namespace")?;
    let addr = api.serve(listener).context("serving the fake API server")?;
    std::fs::write(
        dir.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: proxy\n\
             current-context: fake\nusers:\n- name: proxy\n  user: {{}}\n"
        ),
    )
    .context("writing the kubeconfig")?;
    let after = crate::binary::memory_mib(std::process::id())?.0;
    Ok((api, after - before, load_s))
}

/// The proxy's log: read as bytes, so a stray invalid byte does not blank it.
fn read_log(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn log_tail(proxy: &ProxyProcess) -> String {
    let log = proxy.log();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// One source at one size: `all` holds the cluster (its first `n` Services) and the
/// Services to add after it.
fn run(args: &Args, binary: &Path, source: Source, all: &[SynthService], n: usize) -> Result<Run> {
    let mut cluster: Vec<SynthService> = all.get(..n).context("cluster size")?.to_vec();
    let added = all.get(n..).unwrap_or_default();
    let node = Netns::new()?;
    let dir = tempfile::tempdir()?;
    let mut out = Run {
        source: source.label().into(),
        services: n,
        endpoints: args.endpoints.clone(),
        idle_s: args.idle,
        ..Run::default()
    };
    let machine0 = (machine_cpu()?, cpu("self")?, Instant::now());
    out.machine.loadavg_start = loadavg();
    out.machine.cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let feed = match source {
        Source::Manifests => Feed::Manifests(ManifestsDir::create(
            &dir.path().join("manifests"),
            &cluster,
            args.services_per_file,
        )?),
        Source::Api => {
            let (api, rss, load_s) = start_api(args, &node, dir.path(), &cluster)?;
            out.fake_server_rss_mib = Some(rss);
            out.fake_server_load_s = Some(load_s);
            Feed::Api(api)
        }
    };

    // 1. First sync.
    let proxy_args = proxy_args(args, source, dir.path());
    let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
    let log_path = dir.path().join("proxy.log");
    let bench_cpu0 = cpu("self")?;
    let launched = SystemTime::now();
    let launched_at = Instant::now();
    let mut proxy = ProxyProcess::start(&node, binary, &proxy_args, &log_path)?;
    let pid = proxy.pid().to_string();
    let timeout = Duration::from_secs_f64(args.start_timeout);
    let mut first = None;
    while launched_at.elapsed() < timeout {
        if let Some(line) = proxylog::synced(&read_log(&log_path)?).into_iter().next() {
            first = Some(line);
            break;
        }
        if !proxy.is_running() {
            bail!("the proxy exited; log:\n{}", log_tail(&proxy));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(first) = first else {
        bail!("no sync within {timeout:?}; log:\n{}", log_tail(&proxy));
    };
    let proxy_cpu_first = cpu(&pid)?;
    out.first_sync.bench_cpu_s = (cpu("self")? - bench_cpu0).process_s;
    let mut kernel = kernel_service_ips(&node)?;
    let mut complete_at = first.at;
    out.first_sync.method = "log line, kernel checked".into();
    let listed = count_present(&kernel, &cluster);
    if listed < cluster.len() {
        // A dump of a hash set the kernel is still growing (after a bulk load) can miss
        // elements that lookups, as packets make them, find: the ones not listed are
        // looked up before the kernel is polled again.
        let looked_up = found_by_lookup(&node, &kernel, &cluster)?;
        eprintln!(
            "  the kernel listing after the proxy's first sync had {listed} of {} cluster IPs; lookups found {looked_up} of the rest",
            cluster.len()
        );
        // All there: the sync's log line stands, as when the listing is whole.
        if listed + looked_up == cluster.len() {
            kernel.extend(cluster.iter().map(|s| s.cluster_ip));
            out.first_sync.method = format!("log line, kernel listed and {looked_up} looked up");
        }
    }
    while count_present(&kernel, &cluster) < cluster.len() {
        if launched_at.elapsed() > timeout {
            bail!(
                "the kernel holds {} of {} cluster IPs after {timeout:?}",
                count_present(&kernel, &cluster),
                cluster.len()
            );
        }
        out.first_sync.method = "kernel poll".into();
        kernel = kernel_service_ips(&node)?;
        complete_at = SystemTime::now();
    }
    out.first_sync.launch_to_synced_ms = complete_at
        .duration_since(launched)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    out.first_sync.took_ms = first.took_ms;
    out.first_sync.launch_to_state_ms = proxylog::initial_state(&read_log(&log_path)?)
        .and_then(|at| at.duration_since(launched).ok())
        .map(|d| d.as_secs_f64() * 1e3);
    out.first_sync.kernel_cluster_ips = count_present(&kernel, &cluster);
    out.first_sync.proxy_cpu = proxy_cpu_first;

    // 2. Memory once settled.
    let settle_until = complete_at + Duration::from_secs_f64(args.settle);
    if let Ok(wait) = settle_until.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    out.memory_settled = memory(proxy.pid())?;

    // 3. Idle.
    let idle_start = SystemTime::now();
    let cpu0 = cpu(&pid)?;
    std::thread::sleep(Duration::from_secs_f64(args.idle));
    out.idle_cpu = cpu(&pid)? - cpu0;
    let idle_end = SystemTime::now();

    // 4. and 5. Changes, watched by the monitor, then by lookups (see `probe`).
    let fd = node
        .run(crate::monitor::open_socket)
        .context("entering the node's namespace")??;
    let prober = node
        .run(Prober::open)
        .context("entering the node's namespace")??;
    let mut observer = Observer {
        monitor: Monitor::start(fd)?,
        prober,
        window: Duration::from_secs_f64(args.monitor_window / 1e3),
        poll: Duration::from_secs_f64(args.poll_interval / 1e3),
        timeout: Duration::from_secs_f64(args.change_timeout),
    };
    let changes_start = SystemTime::now();
    let interval = Duration::from_secs_f64(args.change_interval);
    let min_gap = Duration::from_secs_f64(args.min_sync_period) + Duration::from_millis(50);
    let port = synth::SERVICE_PORT;

    // Endpoint changes: one endpoint of Services spread over the cluster, to a fresh
    // address. Services with `internalTrafficPolicy: Local` are skipped: a remote
    // endpoint of theirs is in no slot of the cluster IP, so it might reach no map.
    let candidates: Vec<usize> = cluster
        .iter()
        .filter(|s| !s.internal_local && !s.endpoints.is_empty())
        .map(|s| s.index)
        .collect();
    // The new endpoints' addresses: 172.16.0.0/12.
    if args.changes > 1 << 20 {
        bail!("--changes: at most {}", 1 << 20);
    }
    if args.changes > 0 && candidates.len() < args.changes {
        bail!(
            "{} Services to change, {} suitable ones",
            args.changes,
            candidates.len()
        );
    }
    let mut change_samples = Vec::new();
    let mut next = Instant::now();
    for k in 0..args.changes {
        let index = candidates[k * candidates.len() / args.changes];
        let s = &mut cluster[index];
        let slot = k % s.endpoints.len();
        let ip = Ipv4Addr::from(0xac10_0000 | k as u32);
        s.endpoints[slot].0 = ip;
        let probe = Probe::new(
            Target::Endpoint(ip),
            s.cluster_ip,
            s.protocol,
            port,
            s.endpoints.len(),
        );
        sleep_until(next);
        let (t0, seen) = observer.observe(&[probe], || feed.endpoints_changed(&cluster, index))?;
        let seen = seen.into_iter().next().flatten();
        next = (t0 + interval).max(seen.as_ref().map_or_else(Instant::now, |s| s.at) + min_gap);
        change_samples.push(Sample::new(t0, seen, None));
        if !proxy.is_running() {
            bail!("the proxy exited; log:\n{}", log_tail(&proxy));
        }
    }

    // Added Services: the next Services of the mix, with fresh addresses. Timed to their
    // cluster IP's first element, and to the one that says they have endpoints (the API
    // source gets the Service and its slice as two events, so these may be two syncs).
    let mut add_samples = Vec::new();
    for (k, s) in added.iter().enumerate() {
        let probes = [
            Probe::new(
                Target::Service(s.cluster_ip),
                s.cluster_ip,
                s.protocol,
                port,
                0,
            ),
            Probe::new(
                Target::ServiceReady(s.cluster_ip),
                s.cluster_ip,
                s.protocol,
                port,
                0,
            ),
        ];
        // With `internalTrafficPolicy: Local` and no endpoint on this node the cluster IP
        // has nothing to send to: it is programmed, but never "with endpoints".
        let reachable = !s.internal_local || s.endpoints.iter().any(|(_, local)| *local);
        let probes = if reachable { &probes[..] } else { &probes[..1] };
        sleep_until(next);
        let (t0, seen) = observer.observe(probes, || feed.service_added(k, s))?;
        let mut seen = seen.into_iter();
        let (first, ready) = (seen.next().flatten(), seen.next().flatten());
        let last = ready
            .as_ref()
            .or(first.as_ref())
            .map_or_else(Instant::now, |s| s.at);
        next = (t0 + interval).max(last + min_gap);
        add_samples.push(Sample::new(t0, first, ready));
        if !proxy.is_running() {
            bail!("the proxy exited; log:\n{}", log_tail(&proxy));
        }
    }
    out.monitor = observer.monitor.stats();
    let changes_end = SystemTime::now();

    // 6. The end: memory, the kernel, the log, the machine.
    out.memory_end = memory(proxy.pid())?;
    let proxy_cpu = cpu(&pid)?;
    let (machine1, bench1) = (machine_cpu()?, cpu("self")?);
    let seconds = machine0.2.elapsed().as_secs_f64();
    let ours = proxy_cpu.process_s + proxy_cpu.children_s + (bench1 - machine0.1).process_s;
    out.machine.seconds = seconds;
    out.machine.others_cores = (machine1.busy_s - machine0.0.busy_s - ours).max(0.0) / seconds;
    out.machine.steal_cores = (machine1.steal_s - machine0.0.steal_s) / seconds;
    let mut expected = cluster.clone();
    expected.extend_from_slice(added);
    out.kernel_cluster_ips_end = count_present(&kernel_service_ips(&node)?, &expected);
    let log = read_log(&log_path)?;
    let _ = proxy.terminate();
    if !args.no_restart {
        // 7. Restart: the change goes in at launch; the new process must adopt the table
        // and program it.
        let restart_log = dir.path().join("proxy-restart.log");
        let launched = SystemTime::now();
        let launched_at = Instant::now();
        let mut restarted = ProxyProcess::start(&node, binary, &proxy_args, &restart_log)?;
        let index = candidates
            .first()
            .copied()
            .context("no Service to change")?;
        let s = &mut cluster[index];
        let ip = Ipv4Addr::from(0xac1f_fff0);
        s.endpoints[0].0 = ip;
        let probe = Probe::new(
            Target::Endpoint(ip),
            s.cluster_ip,
            s.protocol,
            port,
            s.endpoints.len(),
        );
        let (_, seen) = observer.observe(&[probe], || feed.endpoints_changed(&cluster, index))?;
        let seen = seen.into_iter().next().flatten();
        let mut first = None;
        let restart_pid = restarted.pid().to_string();
        let mut restart_cpu = Cpu::default();
        while launched_at.elapsed() < timeout && first.is_none() {
            first = proxylog::synced(&read_log(&restart_log)?)
                .into_iter()
                .next();
            if first.is_some() {
                restart_cpu = cpu(&restart_pid)?;
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let restart_text = read_log(&restart_log)?;
        let _ = restarted.terminate();
        if let Some(dir) = &args.logs {
            let path = dir.join(format!("{}-{n}-restart.log", source.label().to_lowercase()));
            std::fs::write(&path, &restart_text)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let first =
            first.with_context(|| format!("no sync after the restart; log:\n{restart_text}"))?;
        out.restart = Some(Restart {
            launch_to_first_sync_ms: first
                .at
                .duration_since(launched)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3),
            first_sync_took_ms: first.took_ms,
            launch_to_state_ms: proxylog::initial_state(&restart_text)
                .and_then(|at| at.duration_since(launched).ok())
                .map(|d| d.as_secs_f64() * 1e3),
            proxy_cpu_s: restart_cpu.process_s + restart_cpu.children_s,
            launch_to_change_ms: seen.map(|s| (s.at - launched_at).as_secs_f64() * 1e3),
            maps_kept: proxylog::maps_kept(&restart_text),
        });
    }
    drop(observer);
    if let Some(dir) = &args.logs {
        let path = dir.join(format!("{}-{n}.log", source.label().to_lowercase()));
        std::fs::write(&path, &log).with_context(|| format!("writing {}", path.display()))?;
    }
    let syncs = proxylog::synced(&log);
    let periodic: Vec<&Synced> = syncs.iter().skip(1).filter(|s| s.periodic()).collect();
    let within = |from: SystemTime, to: SystemTime| -> Vec<&Synced> {
        periodic
            .iter()
            .copied()
            .filter(|s| s.started() >= from && s.at <= to)
            .collect()
    };
    out.resyncs_idle = Resyncs::of(&within(idle_start, idle_end));
    out.resyncs_changes = Resyncs::of(&within(changes_start, changes_end));
    for sample in change_samples.iter_mut().chain(add_samples.iter_mut()) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(sample.at_unix_s);
        sample.during_resync = periodic
            .iter()
            .any(|s| s.holds(at, Duration::from_secs_f64(args.min_sync_period)));
    }
    out.endpoint_change = Latencies::of(change_samples);
    out.add_service = Latencies::of(add_samples);
    drop(feed);
    Ok(out)
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn markdown(report: &Report) -> String {
    let mut t = String::new();
    let runs = &report.runs;
    let _ = write!(t, "| nftables, deployed |");
    for r in runs {
        let _ = write!(t, " {} × {}, {} |", r.services, r.endpoints, r.source);
    }
    let _ = write!(t, "\n|---|");
    for _ in runs {
        let _ = write!(t, "---|");
    }
    t.push('\n');
    let mut row = |name: &str, cell: &dyn Fn(&Run) -> String| {
        let _ = write!(t, "| {name} |");
        for r in runs {
            let _ = write!(t, " {} |", cell(r));
        }
        t.push('\n');
    };
    row(
        "first sync: launch → kernel holds every cluster IP (proxy's `took_ms`)",
        &|r| {
            format!(
                "{} ({})",
                fmt_ms(r.first_sync.launch_to_synced_ms),
                fmt_ms(r.first_sync.took_ms)
            )
        },
    );
    row("… launch → source's initial state", &|r| {
        r.first_sync
            .launch_to_state_ms
            .map_or_else(|| "–".into(), fmt_ms)
    });
    row("proxy CPU to the first sync", &|r| {
        format!(
            "{:.2} s",
            r.first_sync.proxy_cpu.process_s + r.first_sync.proxy_cpu.children_s
        )
    });
    row("RSS (peak) 10 s after the first sync", &|r| {
        format!(
            "{:.0} MiB ({:.0} MiB)",
            r.memory_settled.rss_mib, r.memory_settled.hwm_mib
        )
    });
    row("RSS (peak) at the end", &|r| {
        format!(
            "{:.0} MiB ({:.0} MiB)",
            r.memory_end.rss_mib, r.memory_end.hwm_mib
        )
    });
    row("CPU while idle (`nft` children)", &|r| {
        format!(
            "{:.2} s ({:.2} s) in {:.0} s",
            r.idle_cpu.process_s + r.idle_cpu.children_s,
            r.idle_cpu.children_s,
            r.idle_s
        )
    });
    row("periodic sync `took_ms`, p50 / max (n)", &|r| {
        format!(
            "{} / {} ({})",
            fmt_ms(r.resyncs_idle.p50_ms),
            fmt_ms(r.resyncs_idle.max_ms),
            r.resyncs_idle.count
        )
    });
    row("… during the change phases", &|r| {
        format!(
            "{} / {} ({})",
            fmt_ms(r.resyncs_changes.p50_ms),
            fmt_ms(r.resyncs_changes.max_ms),
            r.resyncs_changes.count
        )
    });
    row("one endpoint change, p50 / p99 / max (n)", &|r| {
        latency_cell(&r.endpoint_change)
    });
    row(
        "… meeting a periodic sync (during, or < min sync period after its start): count, max",
        &|r| during_cell(&r.endpoint_change),
    );
    row("add one Service (cluster IP), p50 / p99 / max (n)", &|r| {
        latency_cell(&r.add_service)
    });
    row("… with its endpoints, p50 / p99", &|r| match (
        r.add_service.with_endpoints_p50_ms,
        r.add_service.with_endpoints_p99_ms,
    ) {
        (Some(a), Some(b)) => format!("{} / {}", fmt_ms(a), fmt_ms(b)),
        _ => "–".into(),
    });
    row("… meeting a periodic sync: count, max", &|r| {
        during_cell(&r.add_service)
    });
    row(
        "restart (SIGTERM, start again, one endpoint change at launch): launch → first sync (`took_ms`), launch → change in the kernel, maps kept",
        &|r| match &r.restart {
            Some(x) => format!(
                "{} ({}), {}, {}",
                fmt_ms(x.launch_to_first_sync_ms),
                fmt_ms(x.first_sync_took_ms),
                x.launch_to_change_ms.map_or_else(|| "lost".into(), fmt_ms),
                x.maps_kept
            ),
            None => "–".into(),
        },
    );
    row(
        "… restart: launch → source's initial state, proxy CPU to the first sync",
        &|r| match &r.restart {
            Some(x) => format!(
                "{}, {:.2} s",
                x.launch_to_state_ms.map_or_else(|| "–".into(), fmt_ms),
                x.proxy_cpu_s
            ),
            None => "–".into(),
        },
    );
    row("other work on the machine (cores busy, avg), steal", &|r| {
        format!(
            "{:.2} of {}, {:.2}",
            r.machine.others_cores, r.machine.cpus, r.machine.steal_cores
        )
    });
    let _ = writeln!(
        t,
        "\nSync period {} s, min sync period {} s; load average {} → {}.",
        report.sync_period_s, report.min_sync_period_s, report.loadavg_start, report.loadavg_end
    );
    for r in runs {
        if r.endpoint_change.lost + r.add_service.lost > 0 || r.monitor.overruns > 0 {
            let _ = writeln!(
                t,
                "{} × {}, {}: {} changes not seen by the monitor, {} buffer overruns.",
                r.services,
                r.endpoints,
                r.source,
                r.endpoint_change.lost + r.add_service.lost,
                r.monitor.overruns
            );
        }
    }
    t
}

fn latency_cell(l: &Latencies) -> String {
    let lost = if l.lost > 0 {
        format!(", {} lost", l.lost)
    } else {
        String::new()
    };
    format!(
        "{} / {} / {} (n={}{lost}, {} by the monitor)",
        fmt_ms(l.p50_ms),
        fmt_ms(l.p99_ms),
        fmt_ms(l.max_ms),
        l.samples,
        l.by_monitor
    )
}

fn during_cell(l: &Latencies) -> String {
    if l.during_resync == 0 {
        "0".into()
    } else {
        format!(
            "{}, {} (others p50 {})",
            l.during_resync,
            fmt_ms(l.during_resync_max_ms),
            fmt_ms(l.others_p50_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_checked() {
        assert_eq!(non_negative("0"), Ok(0.0));
        assert_eq!(positive("1.5"), Ok(1.5));
        assert!(positive("0").is_err());
        for bad in ["-1", "NaN", "inf", "x"] {
            assert!(non_negative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_own_cpu() {
        let c = cpu("self").unwrap();
        assert!(c.process_s >= 0.0 && c.children_s >= 0.0);
    }

    #[test]
    fn finds_addresses_in_nft_json() {
        let json: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},{"map":{"name":"service-ips","elem":[[{"concat":["10.96.0.1","tcp",80]},{"goto":{"target":"internal"}}]]}}]}"#,
        )
        .unwrap();
        let mut ips = Default::default();
        collect_ipv4(&json, &mut ips);
        assert!(ips.contains(&Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(ips.len(), 1);
    }

    #[test]
    fn latencies_split_by_resync() {
        let sample = |ms: f64, during: bool| Sample {
            at_unix_s: 0.0,
            latency_ms: Some(ms),
            with_endpoints_ms: None,
            set: String::new(),
            via: Some(Via::Monitor),
            during_resync: during,
        };
        let mut all: Vec<Sample> = (1..=9).map(|i| sample(i as f64, false)).collect();
        all.push(sample(500.0, true));
        all.push(Sample {
            latency_ms: None,
            via: None,
            ..sample(0.0, false)
        });
        let l = Latencies::of(all);
        assert_eq!((l.samples, l.lost, l.during_resync), (11, 1, 1));
        assert_eq!(l.by_monitor, 10);
        assert_eq!(l.max_ms, 500.0);
        assert_eq!(l.during_resync_max_ms, 500.0);
        assert_eq!(l.others_p50_ms, 5.0);
        assert!(l.with_endpoints_p50_ms.is_none());
    }
}
