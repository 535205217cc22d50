//! The applier: the one place that hands rules to the kernel.

use std::io::Write as _;
use std::process::{Command, Stdio};

use proxy_core::proxier::ProxierError;

use std::fmt::Write as _;

use proxy_core::model::IpFamily;

use crate::netlink::{
    encode_batch, list_requests, parse_chain, parse_set, Deletion, ElementOp, Object,
};
use crate::plan::{family_names, TABLE};
use crate::render::render_element_command;

/// Runs one `nft` script as one atomic transaction.
pub trait NftRunner {
    fn run(&mut self, script: &str) -> Result<(), ProxierError>;

    /// Adds and deletes elements, in order, as one atomic transaction; returns the
    /// transaction's size in bytes. By default as `nft` commands.
    fn apply_elements(&mut self, ops: &[ElementOp<'_>]) -> Result<usize, ProxierError> {
        let script = element_script(ops);
        self.run(&script)?;
        Ok(script.len())
    }

    /// A full sync: `skeleton` (an `nft` script: maps, sets, chains and rules), then
    /// `ops` (every element) and `deletions` (objects no longer used). By default one
    /// `nft` transaction holds all three.
    fn apply_full(
        &mut self,
        skeleton: &str,
        ops: &[ElementOp<'_>],
        deletions: &[Deletion],
    ) -> Result<usize, ProxierError> {
        let script = full_load_script(skeleton, ops, deletions);
        self.run(&script)?;
        Ok(script.len())
    }

    /// The chains and named sets our table of `family` has in the kernel; `None` when
    /// this runner cannot tell (then nothing is deleted).
    fn existing_objects(&mut self, family: IpFamily) -> Result<Option<Vec<Object>>, ProxierError> {
        let _ = family;
        Ok(None)
    }
}

/// A whole full load as one `nft` script.
fn full_load_script(skeleton: &str, ops: &[ElementOp<'_>], deletions: &[Deletion]) -> String {
    format!(
        "{skeleton}{}{}",
        element_script(ops),
        deletion_script(deletions)
    )
}

/// `deletions` as `nft` commands.
pub fn deletion_script(deletions: &[Deletion]) -> String {
    let mut script = String::new();
    let mut ordered: Vec<&Deletion> = deletions.iter().collect();
    ordered.sort_by_key(|d| matches!(d.object, Object::Set { .. }));
    for d in ordered {
        let kind = match d.object {
            Object::Chain(_) => "chain",
            Object::Set { is_map: true, .. } => "map",
            Object::Set { is_map: false, .. } => "set",
        };
        let family = family_names(d.family).table_family;
        let _ = writeln!(script, "delete {kind} {family} {TABLE} {}", d.object.name());
    }
    script
}

/// `ops` as `nft` commands.
pub fn element_script(ops: &[ElementOp<'_>]) -> String {
    let mut script = String::new();
    for op in ops {
        if op.elements.is_empty() && op.verb != crate::render::ElementVerb::Flush {
            continue;
        }
        render_element_command(&mut script, op.verb, op.family, op.map, &op.elements);
    }
    script
}

/// Runs the real `nft -f -`; element changes go straight to the kernel over a netlink
/// socket that stays open.
pub struct NftCommand {
    program: String,
    /// `--check`: parse and validate against the kernel without committing.
    check_only: bool,
    socket: Option<netlink::Socket>,
}

impl std::fmt::Debug for NftCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftCommand")
            .field("program", &self.program)
            .field("check_only", &self.check_only)
            .field("socket_open", &self.socket.is_some())
            .finish()
    }
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: "nft".into(),
            check_only: false,
            socket: None,
        }
    }
}

impl NftCommand {
    /// Whether element changes have gone over netlink (for tests).
    pub fn netlink_open(&self) -> bool {
        self.socket.is_some()
    }

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

    fn apply_elements(&mut self, ops: &[ElementOp<'_>]) -> Result<usize, ProxierError> {
        if self.check_only {
            let script = element_script(ops);
            self.run(&script)?;
            return Ok(script.len());
        }
        self.send_batch(ops, &[])
    }

    /// The skeleton through `nft` (small: a few dozen chains and maps), then every element
    /// as one netlink batch. Two transactions: the skeleton keeps existing maps and
    /// their elements (see `FullMode::Update`), so the old elements serve traffic until
    /// the batch replaces them all at once.
    fn apply_full(
        &mut self,
        skeleton: &str,
        ops: &[ElementOp<'_>],
        deletions: &[Deletion],
    ) -> Result<usize, ProxierError> {
        if self.check_only {
            let script = full_load_script(skeleton, ops, deletions);
            self.run(&script)?;
            return Ok(script.len());
        }
        self.run(skeleton)?;
        Ok(skeleton.len() + self.send_batch(ops, deletions)?)
    }

    fn existing_objects(&mut self, family: IpFamily) -> Result<Option<Vec<Object>>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        let socket = self.socket()?;
        let failed = |e: netlink::RequestError| {
            ProxierError::Other(format!("listing our nftables objects: {e}"))
        };
        let [chains, sets] = list_requests(family, || socket.next_seq());
        let mut out = Vec::new();
        for payload in socket.request(&chains).map_err(failed)? {
            out.extend(parse_chain(&payload).map_err(|e| failed(e.into()))?);
        }
        for payload in socket.request(&sets).map_err(failed)? {
            out.extend(parse_set(&payload).map_err(|e| failed(e.into()))?);
        }
        Ok(Some(out))
    }
}

impl NftCommand {
    /// The netlink socket, opened on first use and kept.
    fn socket(&mut self) -> Result<&mut netlink::Socket, ProxierError> {
        if self.socket.is_none() {
            let socket = netlink::Socket::open(libc::NETLINK_NETFILTER)
                .map_err(|e| ProxierError::Other(format!("nftables netlink socket: {e}")))?;
            self.socket = Some(socket);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| ProxierError::Other("nftables netlink socket missing".into()))
    }

    /// Sends element changes and deletions over the netlink socket, as one transaction.
    fn send_batch(
        &mut self,
        ops: &[ElementOp<'_>],
        deletions: &[Deletion],
    ) -> Result<usize, ProxierError> {
        let socket = self.socket()?;
        let batch = encode_batch(ops, deletions, || socket.next_seq());
        match socket.send_batch(&batch.bytes, batch.begin_seq, batch.last_seq) {
            Ok(()) => Ok(batch.bytes.len()),
            // Too large for the socket's buffer (no CAP_NET_ADMIN to raise it): `nft`
            // splits what it sends.
            Err(netlink::RequestError::Socket(e)) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                let script = format!("{}{}", element_script(ops), deletion_script(deletions));
                self.run(&script)?;
                Ok(script.len())
            }
            Err(err) => {
                // A socket left in an unknown state is not reused.
                if matches!(err, netlink::RequestError::Socket(_)) {
                    self.socket = None;
                }
                Err(ProxierError::Rejected {
                    program: "nftables netlink".into(),
                    message: err.to_string(),
                })
            }
        }
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
