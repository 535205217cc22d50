//! Scale benchmarks (as root): synthetic clusters programmed by the real appliers in
//! network namespaces, and by the real binary with a client measuring connect latency.
//!
//! ```sh
//! cargo build --release -p kube-proxy -p bench
//! ./target/release/bench --services 1000,10000,50000 --endpoints 10 --mode all
//! ```
//!
//! `bench deployed` runs the release binary as deployed instead: fed by manifest files or
//! the fake API server over HTTP, across periodic full syncs (see [`deployed`]).
//!
//! Prints a markdown table and writes the figures as JSON (`--json`).
//!
//! The manifests source alone (idle CPU, one changed file of one per Service):
//!
//! ```sh
//! ./target/release/bench --manifests-changes 100 --services 10000 --endpoints 10
//! ```

mod binary;
mod deployed;
mod inproc;
mod leak;
mod manifests;
mod monitor;
mod objects;
mod probe;
mod proxylog;
mod soak;
mod stats;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use testkit::synth;

use crate::binary::BinaryRun;
use crate::inproc::{InProcess, Mode};

#[derive(Debug, Parser)]
#[command(
    about = "Scale benchmarks for kube-proxy-rs (run as root)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    inproc: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The release binary as deployed: fed by manifests or the fake API server, first
    /// sync, memory, idle CPU, endpoint-change and add-Service latency to the kernel's
    /// commit, across periodic full syncs.
    Deployed(deployed::Args),
    /// Real traffic through one Service while the release binary runs with thousands of
    /// others, phase by phase: churn, restarts, re-syncs, bulk changes. Nothing may be lost.
    Soak(soak::Args),
    /// The release binary under endpoint churn for minutes: RSS, open fds and threads
    /// sampled, the drift reported.
    Leak(leak::Args),
}

/// The in-process benchmark (the default, for profiling) and the binary's start.
#[derive(Debug, clap::Args)]
struct Args {
    /// Cluster sizes, in Services (one port each).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    services: Vec<usize>,
    /// Endpoints per Service: `N`, or `A-B` to spread counts over the range.
    #[arg(long, default_value = "10")]
    endpoints: String,
    /// `nftables`, `iptables` (the legacy backend) or `all`.
    #[arg(long, default_value = "nftables")]
    mode: String,
    /// One-endpoint changes and Service additions timed per size (nftables).
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// The same for iptables, whose partial syncs take a large fraction of a second.
    #[arg(long, default_value_t = 20)]
    iptables_changes: usize,
    /// iptables is measured only up to this size.
    #[arg(long, default_value_t = 10_000)]
    iptables_max_services: usize,
    /// nftables mode in process with `--service-counters` (the binary runs take it as
    /// `--proxy-arg=--service-counters`).
    #[arg(long)]
    service_counters: bool,
    /// TCP connects timed to each of the first and last ClusterIP (0: skip).
    #[arg(long, default_value_t = 1000)]
    connects: usize,
    /// Skip the runs of the real binary (memory, connect latency).
    #[arg(long)]
    no_binary: bool,
    /// The proxy binary; default: `kube-proxy` next to this program.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Write the nftables full-sync script of the first size to this file and stop
    /// (to profile `nft` by hand).
    #[arg(long)]
    dump_nft: Option<PathBuf>,
    /// Measure only the manifests source with the binary: one file per Service, its CPU
    /// time while idle for `--idle-secs`, then this many one-file changes (renamed into
    /// place), from the rename to the sync.
    #[arg(long, default_value_t = 0)]
    manifests_changes: usize,
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Another argument for the binary (repeatable), in its runs and with
    /// `--manifests-changes`: e.g. `--proxy-arg=--iptables-sync-period=1h` to keep
    /// periodic full syncs out of the idle CPU time, `--proxy-arg=--service-counters`.
    #[arg(long, allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
    /// With `--manifests-changes`: copy the binary's log here at the end.
    #[arg(long)]
    proxy_log: Option<PathBuf>,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    mode: &'static str,
    services: usize,
    endpoints: String,
    in_process: InProcess,
    binary: Option<BinaryRun>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    command: String,
    kernel: String,
    nft: String,
    idle_rss_mib: Option<f64>,
    rows: Vec<Row>,
}

fn parse_endpoints(text: &str) -> Result<std::ops::RangeInclusive<usize>> {
    let (low, high) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse()?, b.trim().parse()?),
        None => {
            let n = text.trim().parse()?;
            (n, n)
        }
    };
    if low == 0 || high < low || high > synth::MAX_ENDPOINTS {
        bail!(
            "--endpoints: want N or A-B within 1..={}",
            synth::MAX_ENDPOINTS
        );
    }
    Ok(low..=high)
}

pub(crate) fn tool_version(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn markdown(report: &Report) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| mode | Services × endpoints | plan (no kernel) | first full sync | full sync bytes | tool child peak RSS (`iptables-restore`; nftables runs none) | endpoint change p50 / p99 | endpoint change bytes | add Service p50 / p99 | add Service bytes | binary: start → synced (its `took_ms`) | binary RSS after sync (peak) | connect first p50 / p99 | connect last p50 / p99 |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &report.rows {
        let p = &r.in_process;
        let b = r.binary.as_ref();
        let c = b.and_then(|b| b.connect.as_ref());
        let _ = writeln!(
            t,
            "| {} | {} × {} | {:.0} ms | {:.0} ms | {:.1} MB | {:.0} MiB | {:.1} / {:.1} ms (n={}) | {} B | {:.1} / {:.1} ms (n={}) | {} B | {} ms ({} ms) | {} MiB ({} MiB) | {} / {} ms | {} / {} ms |",
            r.mode,
            r.services,
            r.endpoints,
            p.plan_ms,
            p.full_sync_ms,
            p.full_sync_bytes as f64 / 1e6,
            p.tool_child_peak_mib,
            p.endpoint_change_p50_ms,
            p.endpoint_change_p99_ms,
            p.endpoint_change_samples,
            p.endpoint_change_bytes,
            p.add_service_p50_ms,
            p.add_service_p99_ms,
            p.add_service_samples,
            p.add_service_bytes,
            opt(b.map(|b| b.start_to_synced_ms), 0),
            opt(b.map(|b| b.first_sync_took_ms), 0),
            opt(b.map(|b| b.rss_mib), 1),
            opt(b.map(|b| b.peak_rss_mib), 1),
            opt(c.map(|c| c.first_p50_ms), 3),
            opt(c.map(|c| c.first_p99_ms), 3),
            opt(c.map(|c| c.last_p50_ms), 3),
            opt(c.map(|c| c.last_p99_ms), 3),
        );
    }
    if let Some(idle) = report.idle_rss_mib {
        let _ = writeln!(t, "\nIdle binary (no Services): RSS {idle:.1} MiB.");
    }
    t
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(inproc::CHILD_PEAK) {
        return inproc::child_peak(&raw[2..]);
    }
    let cli = Cli::parse();
    if !nix_is_root() {
        bail!("run as root: the benchmark builds network namespaces");
    }
    match cli.command {
        Some(Command::Deployed(args)) => {
            let endpoints = parse_endpoints(args.endpoints())?;
            let binary = proxy_binary(args.binary())?;
            return deployed::main(args, &binary, endpoints);
        }
        Some(Command::Leak(args)) => {
            let binary = proxy_binary(args.binary())?;
            return leak::main(args, &binary);
        }
        Some(Command::Soak(args)) => {
            let binary = proxy_binary(args.binary())?;
            return soak::main(args, &binary);
        }
        None => {}
    }
    let args = cli.inproc;
    inproc::SERVICE_COUNTERS.store(args.service_counters, std::sync::atomic::Ordering::Relaxed);
    let endpoints = parse_endpoints(&args.endpoints)?;
    let modes: Vec<Mode> = match args.mode.as_str() {
        "nftables" => vec![Mode::Nftables],
        "iptables" => vec![Mode::IptablesLegacy],
        "all" => vec![Mode::Nftables, Mode::IptablesLegacy],
        other => bail!("--mode: unknown {other:?} (nftables, iptables, all)"),
    };
    let binary = if args.no_binary {
        PathBuf::new()
    } else {
        proxy_binary(args.binary.as_deref())?
    };
    let mut sizes = args.services.clone();
    sizes.sort_unstable();
    if let Some(path) = &args.dump_nft {
        let cluster = synth::cluster(sizes.first().copied().unwrap_or(1000), endpoints);
        let script = inproc::nft_full_script(&cluster)?;
        std::fs::write(path, script).with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }

    if args.manifests_changes > 0 {
        let mut runs = Vec::new();
        for &n in &sizes {
            eprintln!("manifests: {n} Services, one file each...");
            let run = manifests::run(
                &binary,
                n,
                endpoints.clone(),
                std::time::Duration::from_secs(args.idle_secs),
                args.manifests_changes,
                &args.proxy_arg,
                args.proxy_log.as_deref(),
            )?;
            eprintln!("  {run:?}");
            runs.push(run);
        }
        std::fs::write(&args.json, serde_json::to_string_pretty(&runs)?)
            .with_context(|| format!("writing {}", args.json.display()))?;
        println!(
            "| Services (files) | start to synced | RSS (peak) | idle CPU | one file changed: p50 / p99 / max |"
        );
        println!("|---|---|---|---|---|");
        for r in &runs {
            println!(
                "| {} ({}) | {:.0} ms | {:.0} MiB ({:.0} MiB) | {:.0} ms in {} s | {:.1} / {:.1} / {:.1} ms ({} changes) |",
                r.services,
                r.files,
                r.start_to_synced_ms,
                r.rss_mib,
                r.peak_rss_mib,
                r.idle_cpu_ms,
                r.idle_secs,
                r.change_p50_ms,
                r.change_p99_ms,
                r.change_max_ms,
                r.changes
            );
        }
        return Ok(());
    }

    let mut rows = Vec::new();
    // Modes in turn, sizes increasing within each, so the children's peak RSS read after
    // each full sync belongs to that sync (it is a maximum over all children so far). The
    // binary runs come after, for the same reason.
    for &mode in &modes {
        for &n in &sizes {
            if mode == Mode::IptablesLegacy && n > args.iptables_max_services {
                eprintln!(
                    "{}: {n} Services skipped (--iptables-max-services)",
                    mode.label()
                );
                continue;
            }
            let changes = if mode == Mode::Nftables {
                args.changes
            } else {
                args.iptables_changes
            };
            eprintln!(
                "{}: {n} Services × {} endpoints...",
                mode.label(),
                args.endpoints
            );
            let cluster = synth::cluster(n, endpoints.clone());
            let in_process = inproc::measure(mode, &cluster, changes, changes)?;
            eprintln!("  {in_process:?}");
            rows.push(Row {
                mode: mode.label(),
                services: n,
                endpoints: args.endpoints.clone(),
                in_process,
                binary: None,
            });
        }
    }
    let mut idle_rss_mib = None;
    if !args.no_binary && modes.contains(&Mode::Nftables) {
        idle_rss_mib = Some(binary::idle_rss(&binary)?);
        for row in rows.iter_mut().filter(|r| r.mode == Mode::Nftables.label()) {
            eprintln!("binary: {} Services...", row.services);
            let cluster = synth::cluster(row.services, endpoints.clone());
            let run = binary::run(&binary, &cluster, args.connects, &args.proxy_arg)?;
            eprintln!("  {run:?}");
            row.binary = Some(run);
        }
    }
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        kernel: tool_version(&["uname", "-r"]),
        nft: tool_version(&["nft", "--version"]),
        idle_rss_mib,
        rows,
    };
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("{}", markdown(&report));
    Ok(())
}

/// `--binary`, or `kube-proxy` next to this program; it must exist.
fn proxy_binary(given: Option<&std::path::Path>) -> Result<PathBuf> {
    let binary = match given {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("kube-proxy"),
    };
    if !binary.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p kube-proxy`) or pass --binary (or --no-binary)",
            binary.display()
        );
    }
    Ok(binary)
}

fn nix_is_root() -> bool {
    // Reading our own status avoids another dependency for geteuid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ranges() {
        assert_eq!(parse_endpoints("10").unwrap(), 10..=10);
        assert_eq!(parse_endpoints("1-10").unwrap(), 1..=10);
        assert!(parse_endpoints("0").is_err());
        assert!(parse_endpoints("5-2").is_err());
    }

    #[test]
    fn table_renders_without_binary_runs() {
        let report = Report {
            command: "bench".into(),
            kernel: String::new(),
            nft: String::new(),
            idle_rss_mib: Some(9.5),
            rows: vec![Row {
                mode: "nftables",
                services: 10,
                endpoints: "2".into(),
                in_process: InProcess::default(),
                binary: None,
            }],
        };
        let t = markdown(&report);
        assert!(t.contains("| nftables | 10 × 2 |"));
        assert!(t.contains("9.5 MiB"));
    }
}
