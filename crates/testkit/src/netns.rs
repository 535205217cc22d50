//! Network namespaces managed with `ip netns`, and veth links between them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps the bind mounts that name namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Prefix of every namespace this crate creates (used to find stale ones).
const PREFIX: &str = "kpt";

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Interface index for the next veth created by [`link`].
static LINK_INDEX: AtomicU32 = AtomicU32::new(1000);
static CLEANUP: Once = Once::new();

/// Where `ip` is, found once on this process's `PATH` (`ip` when it is not there, so the
/// error comes from running it).
fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| crate::proxy::which(Path::new("ip")).unwrap_or_else(|| PathBuf::from("ip")))
}

/// Runs `ip` with `args` (and `stdin` fed to it, for `-batch -`), returning its stdout.
/// The error names the command and carries its stderr.
pub(crate) fn ip(args: &[&str], stdin: Option<&str>) -> Result<String> {
    run_command(Command::new("ip").args(args), stdin)
}

fn run_command(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {shown}"))?;
    if let Some(input) = stdin {
        // Dropping the handle after writing closes the pipe so `ip -batch -` sees EOF.
        let mut pipe = child.stdin.take().context("child stdin")?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of {shown}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin.map(|s| format!("\nstdin:\n{s}")).unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`). Dropping it kills every process
/// still running inside it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with a unique name (`kpt<pid>x<n>`, at most 15
    /// characters) and its loopback up. The first call in a process also deletes
    /// stale `kpt<pid>x<n>` namespaces whose process is gone.
    pub fn new() -> Result<Netns> {
        CLEANUP.call_once(remove_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}", std::process::id());
        ip(&["netns", "add", &name], None)?;
        // From here on Drop cleans up, even if bringing lo up fails.
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"], None)?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip netns exec NAME args...` and returns its stdout; the error names
    /// the command and carries its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("exec: empty command")?;
        run_command(self.command(program).args(rest), None)
    }

    /// A `Command` for `program` already wrapped in `ip netns exec NAME`, to
    /// spawn long-running processes (e.g. the proxy). `ip netns exec` execs the
    /// program, so the child's pid is the program's pid. Anything still running
    /// in the namespace is killed when the `Netns` is dropped.
    pub fn command(&self, program: &str) -> Command {
        // By path: a caller may give the command another PATH (Rust looks the program
        // up on the command's PATH).
        let mut cmd = Command::new(ip_program());
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a new thread that has joined this namespace, so sockets it
    /// creates live in the namespace (they stay there when moved out).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // setns on a thread only moves that thread, and it dies afterwards.
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns into {}", path.display()))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Sets a sysctl (`net.ipv4.ip_forward`-style key) inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(key, value)])
    }

    /// Sets several sysctls inside the namespace, in order.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        // /proc/sys/net shows the namespace of the thread that opens the file,
        // so writing from a thread inside the namespace is enough (and cheaper
        // than spawning `ip netns exec sysctl`).
        self.run(|| {
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value)
                    .with_context(|| format!("sysctl {key}={value} ({})", path.display()))?;
            }
            anyhow::Ok(())
        })?
        .with_context(|| format!("in namespace {}", self.name))
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = ip(&["netns", "pids", &self.name], None)?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let me = std::process::id() as i32;
        match self.pids() {
            Ok(pids) => {
                for pid in pids.into_iter().filter(|&p| p != me) {
                    // The process may have exited meanwhile; nothing to do then.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Err(e) => tracing::warn!("listing processes in {}: {e:#}", self.name),
        }
        if let Err(e) = ip(&["netns", "del", &self.name], None) {
            tracing::warn!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes `kpt<pid>x<n>` namespaces left behind by test processes that died
/// before dropping them (a pid that exists is left alone, even if reused).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        // Another test process may be removing the same one; ignore failures.
        match ip(&["netns", "del", &name], None) {
            Ok(_) => tracing::info!("removed stale namespace {name}"),
            Err(e) => tracing::debug!("removing stale namespace {name}: {e:#}"),
        }
    }
}

/// The pid in a name of the form `kpt<pid>x<n>`, if it has that form.
fn stale_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(PREFIX)?.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`), adds the addresses
/// (`"10.0.0.1/24"`, `"fd00::1/64"`; IPv6 ones without duplicate address
/// detection so they are usable at once) and brings both ends and both
/// loopbacks up. Interface names must be at most 15 characters.
pub fn link(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<()> {
    // Created directly inside the namespaces, so names never clash in the
    // root namespace when tests run in parallel.
    //
    // The `a` end gets an explicit index (1000, 1001, ... never reused by
    // this process) because fresh namespaces number interfaces alike: if both
    // ends had the same ifindex, the kernel would treat their carrier change
    // as non-urgent and apply it up to a second later, dropping the first
    // packets (IPv6 neighbour discovery with them). Kernel-chosen indexes
    // start low and ignore explicit ones, so the two ends never match.
    // (iproute2 ignores `index` for the peer, hence the `a` end.)
    let index = LINK_INDEX.fetch_add(1, Ordering::Relaxed).to_string();
    ip(
        &[
            "-n", &a.name, "link", "add", a_if, "index", &index, "type", "veth", "peer", "name",
            b_if, "netns", &b.name,
        ],
        None,
    )?;
    configure_end(a, a_if, a_addrs)?;
    configure_end(b, b_if, b_addrs)?;
    // The carrier change still goes through the kernel's link-watch work, which a busy
    // machine runs late: packets sent before it is done are dropped. Wait for it.
    for (ns, ifname) in [(a, a_if), (b, b_if)] {
        let up = || {
            ip(&["-n", &ns.name, "-o", "link", "show", "dev", ifname], None)
                .is_ok_and(|out| out.contains("state UP"))
        };
        if !crate::wait_until(Duration::from_secs(5), Duration::from_millis(5), up) {
            bail!("{ifname} in {} did not come up", ns.name);
        }
    }
    Ok(())
}

fn configure_end(ns: &Netns, ifname: &str, addrs: &[&str]) -> Result<()> {
    let mut batch = String::new();
    for addr in addrs {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        batch.push_str(&format!("addr add {addr} dev {ifname}{nodad}\n"));
    }
    batch.push_str(&format!("link set {ifname} up\nlink set lo up\n"));
    ip(&["-n", &ns.name, "-batch", "-"], Some(&batch))
        .with_context(|| format!("configuring {ifname} in {}", ns.name))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stale_pid;

    #[test]
    fn stale_names() {
        assert_eq!(stale_pid("kpt123x4"), Some(123));
        assert_eq!(stale_pid("kpttest"), None);
        assert_eq!(stale_pid("kpt12x"), None);
        assert_eq!(stale_pid("nfttry"), None);
    }
}
