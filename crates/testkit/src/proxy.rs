//! The real proxy binary, run inside a test namespace, with a `PATH` holding only the
//! programs its mode still runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// The iptables tools: `-restore` and `-save` of each family, nft and legacy variants
/// (iptables mode detects which one the host uses and removes the other one's
/// leftovers), as upstream's image ships them.
const IPTABLES: &[&str] = &[
    "iptables-nft-restore",
    "iptables-nft-save",
    "ip6tables-nft-restore",
    "ip6tables-nft-save",
    "iptables-legacy-restore",
    "iptables-legacy-save",
    "ip6tables-legacy-restore",
    "ip6tables-legacy-save",
];

/// The programs each proxy mode still runs; everything else (conntrack, links and
/// addresses, IPVS) goes to the kernel over netlink. The one place to edit when a mode
/// stops needing a tool: the end-to-end tests give the proxy a `PATH` holding only
/// these, so an exec of anything else fails them.
///
/// nftables, userspace and ipvs modes write their nftables tables over nfnetlink: none.
pub const MODE_TOOLS: &[(&str, &[&str])] = &[
    ("nftables", &[]),
    ("userspace", &[]),
    ("ipvs", &[]),
    ("iptables", IPTABLES),
];

/// The programs a mode runs, where installed, only to remove other modes' leftovers at
/// start; without them it skips that (logged at debug). The iptables tools for iptables
/// mode's chains (the other modes' nftables tables go over nfnetlink).
pub const LEFTOVER_TOOLS: &[(&str, &[&str])] = &[
    ("nftables", IPTABLES),
    ("userspace", IPTABLES),
    ("ipvs", IPTABLES),
    ("iptables", &[]),
];

/// Which tools a proxy started by [`ProxyProcess::start_with`] finds on its `PATH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tools {
    /// Only those its mode needs ([`MODE_TOOLS`]): what every test runs with.
    Needed,
    /// Also those it uses to remove other modes' leftovers ([`LEFTOVER_TOOLS`]).
    WithLeftoverRemoval,
}

fn lookup(table: &'static [(&str, &[&str])], mode: &str) -> Result<&'static [&'static str]> {
    match table.iter().find(|(m, _)| *m == mode) {
        Some((_, tools)) => Ok(tools),
        None => bail!("unknown proxy mode {mode:?}"),
    }
}

/// The tools a proxy in `mode` finds with `tools`.
pub fn mode_tools(mode: &str, tools: Tools) -> Result<Vec<&'static str>> {
    let mut out = lookup(MODE_TOOLS, mode)?.to_vec();
    if tools == Tools::WithLeftoverRemoval {
        out.extend_from_slice(lookup(LEFTOVER_TOOLS, mode)?);
    }
    Ok(out)
}

/// `program`'s path: itself when it names a path, else the first match on this
/// process's `PATH`.
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

/// Makes `dir` (emptied first) a `PATH` entry holding links to the tools [`mode_tools`]
/// names, those installed here; returns it.
pub fn tools_path(mode: &str, tools: Tools, dir: &Path) -> Result<PathBuf> {
    let tools = mode_tools(mode, tools)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for tool in tools {
        // A tool missing here is missing for the proxy too: it must cope, as on a node.
        if let Some(found) = which(Path::new(tool)) {
            std::os::unix::fs::symlink(&found, dir.join(tool))
                .with_context(|| format!("linking {}", found.display()))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// The mode `args` ask for (`--proxy-mode`), else the default, nftables.
fn mode_of<'a>(args: &[&'a str]) -> &'a str {
    let mut mode = "nftables";
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if let Some(value) = arg.strip_prefix("--proxy-mode=") {
            mode = value;
        } else if *arg == "--proxy-mode" {
            if let Some(value) = iter.next() {
                mode = value;
            }
        }
    }
    mode
}

/// A running `kube-proxy`; killed on drop. Its log goes to a file so a failing test can
/// show it.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts `binary args...` in `ns`, logging to `log`, with only the tools its mode
    /// needs ([`Tools::Needed`]).
    pub fn start(ns: &Netns, binary: &Path, args: &[&str], log: &Path) -> Result<ProxyProcess> {
        ProxyProcess::start_with(ns, binary, args, log, Tools::Needed)
    }

    /// Starts `binary args...` in `ns`, logging to `log`. Its `PATH` is a directory
    /// next to the log (`<log>.tools`) holding only the `tools` of its mode
    /// (`--proxy-mode` in `args`, else nftables); `binary` itself is looked up on this
    /// process's `PATH`.
    pub fn start_with(
        ns: &Netns,
        binary: &Path,
        args: &[&str],
        log: &Path,
        tools: Tools,
    ) -> Result<ProxyProcess> {
        let mut dir = log.as_os_str().to_owned();
        dir.push(".tools");
        let tools = tools_path(mode_of(args), tools, Path::new(&dir))?;
        let program = which(binary).with_context(|| format!("{} not found", binary.display()))?;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file")?;
        let child = ns
            .command(&program.to_string_lossy())
            .env("PATH", &tools)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ProxyProcess {
            child,
            log: log.to_path_buf(),
        })
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle` `count` times (e.g. "synced rules").
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) -> bool {
        crate::wait_until(timeout, Duration::from_millis(20), || {
            self.log().matches(needle).count() >= count
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).context("pid")?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("SIGTERM")?;
        self.wait()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        self.child.wait().context("waiting for the proxy")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
