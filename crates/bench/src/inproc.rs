//! In-process measurements: the real proxiers (planner + applier) driven the way the sync
//! runner drives them, timed around `Proxier::sync`. A sync's time is "from the change
//! arriving at the backend to the kernel commit returning": planning, rendering, spawning
//! the tool, its parse and the kernel's commit.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use backend_iptables::apply::{Backend, IptablesCommand};
use backend_iptables::plan::IptConfig;
use backend_iptables::IptablesProxier;
use backend_nftables::apply::{NftCommand, RecordingRunner};
use backend_nftables::plan::NftConfig;
use backend_nftables::NftablesProxier;
use proxy_core::model::{IpFamily, LocalDetector, ProxyState, ServiceName};
use proxy_core::proxier::{Proxier, SyncRequest};
use testkit::synth::{self, SynthService};

use crate::stats::percentile_ms;

/// Which backend, and through which tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    IptablesLegacy,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::IptablesLegacy => "iptables (legacy)",
        }
    }
}

/// What one mode measured at one size, in process.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InProcess {
    /// Planning and rendering the full state, no kernel (best of three).
    pub plan_ms: f64,
    /// The same in CPU time of the planning thread (best of three).
    pub plan_cpu_ms: f64,
    /// First full sync, kernel included.
    pub full_sync_ms: f64,
    /// CPU time of the syncing thread in the first full sync: in user space (planning,
    /// encoding) and in the kernel (the batch is processed in the sending thread's
    /// system call). Less disturbed than wall time by other work on the machine.
    pub full_sync_user_ms: f64,
    pub full_sync_kernel_ms: f64,
    pub full_sync_bytes: usize,
    /// Peak resident set of the tool the full sync runs (none in nftables mode, which
    /// sends everything over netlink; `iptables-restore` otherwise), measured by replaying
    /// its input from a small helper process: a child spawned by this large process would
    /// report this process's size.
    pub tool_child_peak_mib: f64,
    pub endpoint_change_samples: usize,
    pub endpoint_change_p50_ms: f64,
    pub endpoint_change_p99_ms: f64,
    /// Transaction size of one endpoint change (the median).
    pub endpoint_change_bytes: usize,
    pub add_service_samples: usize,
    pub add_service_p50_ms: f64,
    pub add_service_p99_ms: f64,
    /// Transaction size of adding one Service (the median).
    pub add_service_bytes: usize,
}

const CLUSTER_CIDR: &str = "10.244.0.0/16";

pub fn nft_config() -> NftConfig {
    NftConfig {
        local: LocalDetector::ClusterCidr(vec![CLUSTER_CIDR.parse().expect("constant CIDR")]),
        service_counters: SERVICE_COUNTERS.load(std::sync::atomic::Ordering::Relaxed),
        ..NftConfig::default()
    }
}

/// `bench --service-counters`: measure nftables mode with per-Service counters.
pub static SERVICE_COUNTERS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn ipt_config() -> IptConfig {
    IptConfig {
        local: LocalDetector::ClusterCidr(vec![CLUSTER_CIDR.parse().expect("constant CIDR")]),
        families: vec![IpFamily::V4],
        ..IptConfig::default()
    }
}

fn full_request(state: &Arc<ProxyState>) -> SyncRequest {
    SyncRequest {
        state: Arc::clone(state),
        changed: BTreeSet::new(),
        node_changed: false,
        full: true,
        periodic: false,
    }
}

fn partial_request(state: ProxyState, changed: ServiceName) -> SyncRequest {
    SyncRequest {
        state: Arc::new(state),
        changed: BTreeSet::from([changed]),
        node_changed: false,
        full: false,
        periodic: false,
    }
}

/// Planning alone: the proxier with a recording runner, best of `runs`: wall and CPU
/// time (ms).
pub fn plan_only(mode: Mode, state: &Arc<ProxyState>, runs: usize) -> Result<(f64, f64)> {
    let mut best = f64::INFINITY;
    let mut best_cpu = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let cpu = thread_cpu_ms();
        let took = match mode {
            Mode::Nftables => {
                let mut p = NftablesProxier::new(nft_config(), RecordingRunner::default());
                let t = Instant::now();
                p.sync(&full_request(state))?;
                t.elapsed()
            }
            Mode::IptablesLegacy => {
                let mut p = IptablesProxier::new(
                    ipt_config(),
                    backend_iptables::apply::RecordingRunner::default(),
                );
                let t = Instant::now();
                p.sync(&full_request(state))?;
                t.elapsed()
            }
        };
        best = best.min(took.as_secs_f64() * 1e3);
        let (user, kernel) = thread_cpu_ms();
        best_cpu = best_cpu.min(user + kernel - cpu.0 - cpu.1);
    }
    Ok((best, best_cpu))
}

/// The script of the first full sync of `cluster` in nftables mode.
pub fn nft_full_script(cluster: &[SynthService]) -> Result<String> {
    let state = Arc::new(synth::state(cluster));
    let mut p = NftablesProxier::new(nft_config(), RecordingRunner::default());
    p.sync(&full_request(&state))?;
    Ok(p.runner().scripts.concat())
}

/// Peak resident set of the largest child reaped so far, in MiB (0 if unknown).
#[allow(unsafe_code)]
pub fn children_peak_mib() -> f64 {
    // SAFETY: rusage is plain data (all zeroes is valid) and getrusage only writes to it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    // ru_maxrss is in KiB on Linux.
    usage.ru_maxrss as f64 / 1024.0
}

/// Runs the full sync, then `changes` one-endpoint changes, then `adds` new Services,
/// each a separate sync, with `proxier` (whose runner decides whether a kernel is involved).
pub fn churn(
    proxier: &mut dyn Proxier,
    cluster: &[SynthService],
    changes: usize,
    adds: usize,
) -> Result<InProcess> {
    let mut out = InProcess::default();
    let mut state = synth::state(cluster);
    let shared = Arc::new(state.clone());
    let cpu = thread_cpu_ms();
    let t = Instant::now();
    let outcome = proxier.sync(&full_request(&shared)).context("full sync")?;
    out.full_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    let (user, kernel) = thread_cpu_ms();
    out.full_sync_user_ms = user - cpu.0;
    out.full_sync_kernel_ms = kernel - cpu.1;
    out.full_sync_bytes = outcome.transaction_bytes;
    drop(shared);

    // One endpoint of one Service is replaced by a new address, Services spread over the
    // whole cluster (a prime stride so each change hits a different one).
    let mut samples = Vec::with_capacity(changes);
    let mut bytes = Vec::with_capacity(changes);
    for k in 0..changes {
        let s = &cluster[(k * 7919) % cluster.len()];
        let name = s.port_name();
        let mut eps = synth::endpoints(s);
        if let Some(first) = eps.first_mut() {
            first.ip = synth::endpoint_ip(s.index, synth::MAX_ENDPOINTS - 1 - k % 4).into();
        }
        state.endpoints.insert(name.clone(), Arc::new(eps));
        let request = partial_request(state.clone(), name.service.clone());
        let t = Instant::now();
        let outcome = proxier.sync(&request).context("endpoint change")?;
        samples.push(t.elapsed());
        bytes.push(outcome.transaction_bytes);
        // Put it back so the next change starts from the original cluster.
        state.endpoints.insert(name, Arc::new(synth::endpoints(s)));
        let restore = partial_request(state.clone(), s.port_name().service);
        proxier.sync(&restore).context("endpoint restore")?;
    }
    bytes.sort_unstable();
    out.endpoint_change_samples = samples.len();
    out.endpoint_change_p50_ms = percentile_ms(&samples, 50.0);
    out.endpoint_change_p99_ms = percentile_ms(&samples, 99.0);
    out.endpoint_change_bytes = bytes.get(bytes.len() / 2).copied().unwrap_or(0);

    let mut samples = Vec::with_capacity(adds);
    let mut bytes = Vec::with_capacity(adds);
    for k in 0..adds {
        // Same mix as the cluster, with indexes past its end (new IPs, new NodePorts).
        let endpoints = cluster[k % cluster.len()].endpoints.len();
        let s = synth::service(cluster.len() + k, endpoints);
        state
            .services
            .insert(s.port_name(), Arc::new(synth::service_port(&s)));
        state
            .endpoints
            .insert(s.port_name(), Arc::new(synth::endpoints(&s)));
        let request = partial_request(state.clone(), s.port_name().service);
        let t = Instant::now();
        let outcome = proxier.sync(&request).context("add service")?;
        samples.push(t.elapsed());
        bytes.push(outcome.transaction_bytes);
    }
    bytes.sort_unstable();
    out.add_service_bytes = bytes.get(bytes.len() / 2).copied().unwrap_or(0);
    out.add_service_samples = samples.len();
    out.add_service_p50_ms = percentile_ms(&samples, 50.0);
    out.add_service_p99_ms = percentile_ms(&samples, 99.0);
    Ok(out)
}

/// This thread's CPU time so far, in user space and in the kernel (ms).
#[allow(unsafe_code)]
fn thread_cpu_ms() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is this thread's.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ms(usage.ru_utime), ms(usage.ru_stime))
}

/// The whole in-process measurement of one mode at one size: planning without a kernel,
/// then the real tool in a fresh network namespace.
pub fn measure(
    mode: Mode,
    cluster: &[SynthService],
    changes: usize,
    adds: usize,
) -> Result<InProcess> {
    let state = Arc::new(synth::state(cluster));
    let (plan_ms, plan_cpu_ms) = plan_only(mode, &state, 3)?;
    drop(state);
    let ns = testkit::Netns::new()?;
    let mut out = ns.run(|| -> Result<InProcess> {
        match mode {
            Mode::Nftables => {
                let mut p = NftablesProxier::new(nft_config(), NftCommand::default());
                churn(&mut p, cluster, changes, adds)
            }
            Mode::IptablesLegacy => {
                let mut p =
                    IptablesProxier::new(ipt_config(), IptablesCommand::new(Backend::Legacy));
                churn(&mut p, cluster, changes, adds)
            }
        }
    })??;
    out.plan_ms = plan_ms;
    out.plan_cpu_ms = plan_cpu_ms;
    out.tool_child_peak_mib = tool_peak_mib(mode, cluster)?;
    Ok(out)
}

/// The peak RSS of the tool a full sync of `cluster` runs, replayed in a fresh namespace
/// through `bench --child-peak`.
fn tool_peak_mib(mode: Mode, cluster: &[SynthService]) -> Result<f64> {
    let state = Arc::new(synth::state(cluster));
    let (program, args, input): (&str, Vec<&str>, String) = match mode {
        // The whole full sync goes over netlink, in process: no tool runs.
        Mode::Nftables => return Ok(0.0),
        Mode::IptablesLegacy => {
            let mut p = IptablesProxier::new(
                ipt_config(),
                backend_iptables::apply::RecordingRunner::default(),
            );
            p.sync(&full_request(&state))?;
            let input = p
                .runner()
                .restores
                .iter()
                .find(|(family, _)| *family == IpFamily::V4)
                .map(|(_, input)| input.clone())
                .unwrap_or_default();
            ("iptables-legacy-restore", vec!["--noflush"], input)
        }
    };
    drop(state);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), input)?;
    let exe = std::env::current_exe()?;
    let ns = testkit::Netns::new()?;
    let mut command = vec![
        exe.to_str().context("exe path")?,
        CHILD_PEAK,
        file.path().to_str().context("temp path")?,
        program,
    ];
    command.extend(args);
    let out = ns.exec(&command)?;
    let kib: f64 = out.trim().parse().context("child peak output")?;
    Ok(kib / 1024.0)
}

/// `bench --child-peak FILE PROGRAM ARGS...`: runs PROGRAM with FILE as its input and
/// prints its peak RSS in KiB (it fails if the program does).
pub const CHILD_PEAK: &str = "--child-peak";

pub fn child_peak(args: &[String]) -> Result<()> {
    let [file, program, rest @ ..] = args else {
        anyhow::bail!("usage: bench {CHILD_PEAK} FILE PROGRAM [ARGS...]");
    };
    let status = std::process::Command::new(program)
        .args(rest)
        .stdin(std::fs::File::open(file)?)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        anyhow::bail!("{program} failed: {status}");
    }
    println!("{:.0}", children_peak_mib() * 1024.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The benchmark's code paths on a tiny cluster, without a kernel.
    #[test]
    fn churn_runs_on_a_small_cluster_without_a_kernel() {
        let cluster = synth::cluster(50, 1..=10);
        let mut p = NftablesProxier::new(nft_config(), RecordingRunner::default());
        let t = Instant::now();
        let out = churn(&mut p, &cluster, 5, 5).expect("churn");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(out.full_sync_bytes > 0);
        assert!(out.endpoint_change_bytes > 0);
        assert!(!p
            .runner()
            .scripts
            .last()
            .expect("a script")
            .contains("delete table"));
        assert_eq!(out.add_service_samples, 5);
        assert!(plan_only(Mode::IptablesLegacy, &Arc::new(synth::state(&cluster)), 1).is_ok());
    }
}
