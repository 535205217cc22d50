//! The real proxy binary, run inside a test namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// A running `kube-proxy`; killed on drop. Its log goes to a file so a failing test can
/// show it.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    log: PathBuf,
}

impl ProxyProcess {
    /// Starts `binary args...` in `ns`, logging to `log`.
    pub fn start(ns: &Netns, binary: &Path, args: &[&str], log: &Path) -> Result<ProxyProcess> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file")?;
        let child = ns
            .command(&binary.to_string_lossy())
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
