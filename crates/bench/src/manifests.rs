//! The manifests source at scale: the real binary reads a directory of one file per Service
//! (Service plus EndpointSlice); we measure its CPU time while nothing changes, then how
//! long one changed file (written aside and renamed into place, as tools do) takes to reach
//! the kernel: from the rename to the proxy's "synced rules" log line, by the log's own
//! timestamps.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use testkit::synth::{self, SynthService};
use testkit::{Netns, ProxyProcess};

use crate::binary::memory_mib;
use crate::stats::percentile_ms;

/// What one run showed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ManifestsRun {
    pub services: usize,
    pub files: usize,
    /// From starting the process to the first "synced rules" line.
    pub start_to_synced_ms: f64,
    /// VmRSS after the first sync settled, and VmHWM (peak) at the end.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// The proxy's CPU time (user + system) over `idle_secs` with nothing changing.
    pub idle_cpu_ms: f64,
    pub idle_secs: u64,
    pub changes: usize,
    /// Rename of one file to the "synced rules" line of the sync that programmed it.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
}

/// Writes `cluster` into `dir`, one `svc-N.yaml` per Service.
pub fn write_files(dir: &Path, cluster: &[SynthService]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for s in cluster {
        write_service(dir, s, None)?;
    }
    Ok(())
}

/// Writes one Service's file: straight, or (with `tmp`) aside under a hidden name, then
/// renamed into place.
fn write_service(dir: &Path, s: &SynthService, tmp: Option<&str>) -> Result<()> {
    let path = dir.join(format!("{}.yaml", s.name()));
    let yaml = synth::spec(s).to_yaml();
    match tmp {
        None => std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display())),
        Some(tmp) => {
            let aside = dir.join(tmp);
            std::fs::write(&aside, yaml).with_context(|| format!("writing {}", aside.display()))?;
            std::fs::rename(&aside, &path)
                .with_context(|| format!("renaming {} into place", aside.display()))
        }
    }
}

/// user + system CPU time of `pid`.
fn cpu_time(pid: u32, ticks_per_sec: f64) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {i} in /proc/{pid}/stat"))
    };
    Ok(Duration::from_secs_f64(
        (ticks(11)? + ticks(12)?) / ticks_per_sec,
    ))
}

fn clock_ticks() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("parsing getconf CLK_TCK")
}

/// Reads a growing log from where it last stopped.
struct LogTail {
    file: File,
    offset: u64,
    partial: String,
}

impl LogTail {
    fn open(path: &Path) -> Result<LogTail> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(LogTail {
            file,
            offset: 0,
            partial: String::new(),
        })
    }

    /// Complete lines written since the last call.
    fn lines(&mut self) -> Result<Vec<String>> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = String::new();
        let n = self.file.read_to_string(&mut buf)?;
        self.offset += n as u64;
        self.partial.push_str(&buf);
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(Vec::new());
        };
        let complete: String = self.partial.drain(..=end).collect();
        Ok(complete.lines().map(str::to_owned).collect())
    }

    /// Waits for a "synced rules" line that programmed an endpoint change; returns its
    /// timestamp.
    fn next_endpoint_sync(&mut self, timeout: Duration) -> Result<SystemTime> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            for line in self.lines()? {
                if line.contains("synced rules") && !line.contains(" endpoints=0 ") {
                    return timestamp(&line);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        bail!("no sync within {timeout:?}")
    }
}

/// The RFC 3339 timestamp that starts each log line.
fn timestamp(line: &str) -> Result<SystemTime> {
    let text = line.split_whitespace().next().context("empty log line")?;
    let at: jiff::Timestamp = text
        .parse()
        .with_context(|| format!("no timestamp in {line:?}"))?;
    Ok(SystemTime::from(at))
}

/// Starts the binary on `services` one-file Services, measures idle CPU for `idle`, then
/// `changes` single-file changes, each waited for before the next.
pub fn run(
    binary: &Path,
    services: usize,
    endpoints: std::ops::RangeInclusive<usize>,
    idle: Duration,
    changes: usize,
    extra_args: &[String],
    keep_log: Option<&Path>,
) -> Result<ManifestsRun> {
    let mut cluster = synth::cluster(services, endpoints);
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    write_files(&manifests, &cluster)?;

    let ns = Netns::new()?;
    let log_path = dir.path().join("proxy.log");
    let mut args = vec![
        "--proxy-mode=nftables".to_string(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--hostname-override=node-a".into(),
        "--v=2".into(),
    ];
    args.extend(extra_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut proxy = ProxyProcess::start(&ns, binary, &args, &log_path)?;
    let mut tail = LogTail::open(&log_path)?;
    if !testkit::wait_until(Duration::from_secs(600), Duration::from_millis(5), || {
        tail.lines()
            .is_ok_and(|lines| lines.iter().any(|l| l.contains("synced rules")))
    }) {
        bail!("no first sync; log:\n{}", proxy.log());
    }
    let start_to_synced_ms = started.elapsed().as_secs_f64() * 1e3;

    // Let the first sync's aftermath (conntrack, memory release) settle, then sit idle.
    std::thread::sleep(Duration::from_secs(2));
    let (rss_mib, _) = memory_mib(proxy.pid())?;
    let ticks = clock_ticks()?;
    let before = cpu_time(proxy.pid(), ticks)?;
    std::thread::sleep(idle);
    let idle_cpu = cpu_time(proxy.pid(), ticks)? - before;

    let mut samples = Vec::with_capacity(changes);
    let len = cluster.len();
    for j in 0..changes {
        // Services spread over the directory; one endpoint moves to a free address slot.
        let i = (j * 7919) % len;
        let s = &mut cluster[i];
        let Some(last) = s.endpoints.len().checked_sub(1) else {
            bail!("Service {i} has no endpoints to change");
        };
        let slot = synth::MAX_ENDPOINTS - 1 - (j % 4);
        let new_ip = if s.endpoints[last].0 == synth::endpoint_ip(i, slot) {
            synth::endpoint_ip(i, slot - 1)
        } else {
            synth::endpoint_ip(i, slot)
        };
        s.endpoints[last].0 = new_ip;
        // Past the runner's minimum sync period (1 s by default), so each change syncs at
        // once rather than waiting for the previous sync's period to end.
        std::thread::sleep(Duration::from_millis(1100));
        let renamed = SystemTime::now();
        write_service(&manifests, s, Some(".change.yaml.tmp"))?;
        let synced = tail
            .next_endpoint_sync(Duration::from_secs(120))
            .with_context(|| format!("change {j}"))?;
        samples.push(synced.duration_since(renamed).unwrap_or_default());
    }
    let (_, peak_rss_mib) = memory_mib(proxy.pid())?;
    if let Some(keep) = keep_log {
        std::fs::copy(&log_path, keep)
            .with_context(|| format!("copying the log to {}", keep.display()))?;
    }
    if !proxy.is_running() {
        bail!("the proxy exited; log:\n{}", proxy.log());
    }
    Ok(ManifestsRun {
        services,
        files: cluster.len(),
        start_to_synced_ms,
        rss_mib,
        peak_rss_mib,
        idle_cpu_ms: idle_cpu.as_secs_f64() * 1e3,
        idle_secs: idle.as_secs(),
        changes,
        change_p50_ms: percentile_ms(&samples, 50.0),
        change_p99_ms: percentile_ms(&samples, 99.0),
        change_max_ms: percentile_ms(&samples, 100.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_parse() {
        let line = "2026-12-04T03:00:25.962714Z  INFO proxy_core::runner: synced rules full=false";
        let at = timestamp(line).unwrap();
        let expected: jiff::Timestamp = "2026-12-04T03:00:25.962714Z".parse().unwrap();
        assert_eq!(at, SystemTime::from(expected));
    }
}
