//! The applier: the one place that hands rules to the kernel.

use std::io::Write as _;
use std::process::{Command, Stdio};

use proxy_core::proxier::ProxierError;

/// Runs one `nft` script as one atomic transaction.
pub trait NftRunner {
    fn run(&mut self, script: &str) -> Result<(), ProxierError>;
}

/// Runs the real `nft -f -`.
#[derive(Debug, Clone)]
pub struct NftCommand {
    program: String,
    /// `--check`: parse and validate against the kernel without committing.
    check_only: bool,
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: "nft".into(),
            check_only: false,
        }
    }
}

impl NftCommand {
    /// A runner that only validates (`nft --check`), for tests.
    pub fn check_only() -> Self {
        NftCommand {
            check_only: true,
            ..NftCommand::default()
        }
    }
}

/// Keeps the first lines of the tool's complaint: enough to see what failed, bounded so
/// a huge error does not flood the log.
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().take(12).collect();
    let mut out = lines.join("\n");
    if out.len() > 4000 {
        out.truncate(4000);
    }
    out
}

impl NftRunner for NftCommand {
    fn run(&mut self, script: &str) -> Result<(), ProxierError> {
        let mut cmd = Command::new(&self.program);
        if self.check_only {
            cmd.arg("--check");
        }
        let mut child = cmd
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ProxierError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let write_result = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(script.as_bytes()),
            None => Ok(()),
        };
        let output = child
            .wait_with_output()
            .map_err(|source| ProxierError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(ProxierError::Rejected {
                program: self.program.clone(),
                message: format!("{}: {}", output.status, summarize(&output.stderr)),
            });
        }
        write_result.map_err(|e| ProxierError::Other(format!("writing to nft: {e}")))
    }
}

/// Records scripts instead of running them (planner tests, benchmarks of planning).
#[derive(Debug, Default, Clone)]
pub struct RecordingRunner {
    pub scripts: Vec<String>,
    /// When set, the next run fails with this message (and is not recorded).
    pub fail_next: Option<String>,
}

impl NftRunner for RecordingRunner {
    fn run(&mut self, script: &str) -> Result<(), ProxierError> {
        if let Some(message) = self.fail_next.take() {
            return Err(ProxierError::Rejected {
                program: "nft".into(),
                message,
            });
        }
        self.scripts.push(script.to_string());
        Ok(())
    }
}
