//! The applier: the one place that runs `iptables-restore` / `iptables-save`, and picks
//! the nft or legacy iptables backend.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use proxy_core::model::IpFamily;
use proxy_core::proxier::ProxierError;

use crate::plan::{cleanup_input, parse_save, Table};

/// Which kernel API the iptables tools speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: iptables rules stored as nftables tables `ip filter`, `ip nat`, ...
    Nft,
    /// `iptables-legacy`: the x_tables kernel API.
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Nft => Backend::Legacy,
            Backend::Legacy => Backend::Nft,
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-save`, ...
    pub fn program(self, family: IpFamily, tool: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{base}-{}-{tool}", self.name())
    }
}

/// Whether a dump holds the kubelet's marker chains (`KUBE-IPTABLES-HINT`,
/// `KUBE-KUBELET-CANARY`), or our own canary from an earlier run.
pub fn has_marker_chains(save: &str) -> bool {
    save.lines().any(|l| {
        l.starts_with(":KUBE-IPTABLES-HINT ")
            || l.starts_with(":KUBE-KUBELET-CANARY ")
            || l.starts_with(":KUBE-PROXY-CANARY ")
    })
}

/// Upstream's choice (kubernetes-sigs/iptables-wrappers): nft if its mangle table holds
/// the marker chains (IPv4, then IPv6); else legacy if a full legacy dump holds them
/// (a full dump, because `-t mangle` would create the legacy table); else nft.
pub fn detect_backend(mut save: impl FnMut(Backend, IpFamily, Option<Table>) -> String) -> Backend {
    for family in [IpFamily::V4, IpFamily::V6] {
        if has_marker_chains(&save(Backend::Nft, family, Some(Table::Mangle))) {
            return Backend::Nft;
        }
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        if has_marker_chains(&save(Backend::Legacy, family, None)) {
            return Backend::Legacy;
        }
    }
    Backend::Nft
}

/// Hands restore input to the kernel and reads the kernel's rules back.
pub trait IptablesRunner {
    /// `iptables-restore --noflush` (or `ip6tables-...`): one atomic commit per table.
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ProxierError>;

    /// `iptables-save`, of one table or of all.
    fn save(&mut self, family: IpFamily, table: Option<Table>) -> Result<String, ProxierError>;

    /// Once before the first sync: host settings and the other backend's leftovers.
    fn prepare(&mut self, _localhost_node_ports: bool) -> Result<(), ProxierError> {
        Ok(())
    }

    /// Removes every kube-proxy chain wherever this runner can see one.
    fn cleanup(&mut self, families: &[IpFamily]) -> Result<(), ProxierError> {
        cleanup_with(self, families)
    }
}

/// Removes kube-proxy chains, and jumps to them, through one runner.
pub fn cleanup_with<R: IptablesRunner + ?Sized>(
    runner: &mut R,
    families: &[IpFamily],
) -> Result<(), ProxierError> {
    for &family in families {
        let saved = parse_save(&runner.save(family, None)?);
        let input = cleanup_input(&saved);
        if !input.is_empty() {
            tracing::info!(?family, "removing iptables chains of kube-proxy");
            runner.restore(family, &input)?;
        }
    }
    Ok(())
}

/// Runs the real tools of one backend.
#[derive(Debug, Clone)]
pub struct IptablesCommand {
    backend: Backend,
    /// `--test`: parse and validate without committing (tests).
    test_only: bool,
}

impl IptablesCommand {
    pub fn new(backend: Backend) -> Self {
        IptablesCommand {
            backend,
            test_only: false,
        }
    }

    /// Picks the backend the host already uses, as upstream's wrapper does.
    pub fn detect() -> Self {
        let backend = detect_backend(|backend, family, table| {
            IptablesCommand::new(backend)
                .save(family, table)
                .unwrap_or_default()
        });
        tracing::info!(backend = backend.name(), "iptables backend chosen");
        IptablesCommand::new(backend)
    }

    pub fn test_only(backend: Backend) -> Self {
        IptablesCommand {
            backend,
            test_only: true,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// Keeps the first lines of the tool's complaint, bounded.
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut out = text.lines().take(12).collect::<Vec<_>>().join("\n");
    out.truncate(4000);
    out
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ProxierError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ProxierError::Spawn {
            program: program.to_string(),
            source,
        })?;
    // Write on this thread: the tools read all input before they write output.
    let write_result = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(text)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let output = child
        .wait_with_output()
        .map_err(|source| ProxierError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(ProxierError::Rejected {
            program: program.to_string(),
            message: format!("{}: {}", output.status, summarize(&output.stderr)),
        });
    }
    write_result.map_err(|e| ProxierError::Other(format!("writing to {program}: {e}")))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The sysctls this mode sets before it programs anything (also what `--init-only` sets).
pub fn node_sysctls(localhost_node_ports: bool) -> Vec<(&'static str, &'static str)> {
    if localhost_node_ports {
        // NodePorts on 127.0.0.1 need packets from 127/8 to be routable to pods.
        vec![("net/ipv4/conf/all/route_localnet", "1")]
    } else {
        Vec::new()
    }
}

/// Writes a sysctl under /proc/sys (`net/ipv4/conf/all/route_localnet`).
pub fn write_sysctl(key: &str, value: &str) -> Result<(), ProxierError> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).map_err(|e| ProxierError::Other(format!("setting {path}: {e}")))
}

/// Reads `net.netfilter.nf_conntrack_tcp_be_liberal`; false when absent.
pub fn conntrack_tcp_be_liberal() -> bool {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        .is_ok_and(|v| v.trim() == "1")
}

impl IptablesRunner for IptablesCommand {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ProxierError> {
        let program = self.backend.program(family, "restore");
        let mut args = vec!["-w", "5", "--noflush"];
        if self.test_only {
            args.push("--test");
        }
        run(&program, &args, Some(input)).map(drop)
    }

    fn save(&mut self, family: IpFamily, table: Option<Table>) -> Result<String, ProxierError> {
        let program = self.backend.program(family, "save");
        match table {
            Some(t) => run(&program, &["-t", t.name()], None),
            None => run(&program, &[], None),
        }
    }

    fn prepare(&mut self, localhost_node_ports: bool) -> Result<(), ProxierError> {
        for (key, value) in node_sysctls(localhost_node_ports) {
            write_sysctl(key, value)?;
        }
        // Rules left in the other backend (an earlier run, or upstream's kube-proxy)
        // would still see packets; remove them. IPv6 tools may be missing: best effort.
        let mut other = IptablesCommand::new(self.backend.other());
        for family in [IpFamily::V4, IpFamily::V6] {
            match cleanup_with(&mut other, &[family]) {
                Ok(()) => {}
                Err(err) if err.is_missing_tool() => {
                    tracing::debug!(backend = other.backend.name(), ?family, error = %err, "not installed: no leftovers to remove");
                }
                Err(err) => {
                    tracing::warn!(backend = other.backend.name(), ?family, error = %err, "could not remove leftovers");
                }
            }
        }
        Ok(())
    }

    /// Both backends, both families: `--cleanup` removes everything.
    fn cleanup(&mut self, families: &[IpFamily]) -> Result<(), ProxierError> {
        for backend in [Backend::Nft, Backend::Legacy] {
            let mut runner = IptablesCommand::new(backend);
            for &family in families {
                // A backend whose tool cannot list anything holds nothing to remove.
                let saved = match runner.save(family, None) {
                    Ok(text) => parse_save(&text),
                    Err(err) if err.is_missing_tool() => {
                        tracing::debug!(backend = backend.name(), ?family, error = %err, "not installed: no rules to remove");
                        continue;
                    }
                    Err(err) => {
                        tracing::debug!(backend = backend.name(), ?family, error = %err, "cannot list rules");
                        continue;
                    }
                };
                let input = cleanup_input(&saved);
                if !input.is_empty() {
                    tracing::info!(
                        backend = backend.name(),
                        ?family,
                        "removing iptables chains of kube-proxy"
                    );
                    runner.restore(family, &input)?;
                }
            }
        }
        Ok(())
    }
}

/// Records restore inputs instead of running them, and answers `save` from a fake
/// kernel: tests set `saved` and `canary_present`.
#[derive(Debug, Clone)]
pub struct RecordingRunner {
    pub restores: Vec<(IpFamily, String)>,
    /// What `save(family, None)` returns.
    pub saved: BTreeMap<IpFamily, String>,
    /// Whether `save(_, Some(Mangle))` shows the canary.
    pub canary_present: bool,
    /// When set, the next restore fails with this message (and is not recorded).
    pub fail_next: Option<String>,
    pub prepared: usize,
}

impl Default for RecordingRunner {
    fn default() -> Self {
        RecordingRunner {
            restores: Vec::new(),
            saved: BTreeMap::new(),
            canary_present: true,
            fail_next: None,
            prepared: 0,
        }
    }
}

impl IptablesRunner for RecordingRunner {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ProxierError> {
        if let Some(message) = self.fail_next.take() {
            return Err(ProxierError::Rejected {
                program: "iptables-restore".into(),
                message,
            });
        }
        self.restores.push((family, input.to_string()));
        Ok(())
    }

    fn save(&mut self, family: IpFamily, table: Option<Table>) -> Result<String, ProxierError> {
        match table {
            Some(Table::Mangle) if self.canary_present => {
                Ok("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n".into())
            }
            Some(_) => Ok(String::new()),
            None => Ok(self.saved.get(&family).cloned().unwrap_or_default()),
        }
    }

    fn prepare(&mut self, _localhost_node_ports: bool) -> Result<(), ProxierError> {
        self.prepared += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice_follows_the_kubelet_markers() {
        let with = |nft_mangle: &'static str, legacy: &'static str| {
            detect_backend(move |backend, _, table| match (backend, table) {
                (Backend::Nft, Some(Table::Mangle)) => nft_mangle.to_string(),
                (Backend::Legacy, None) => legacy.to_string(),
                _ => String::new(),
            })
        };
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        assert_eq!(with("", ""), Backend::Nft, "nothing anywhere: nft");
        assert_eq!(with("", hint), Backend::Legacy);
        assert_eq!(with(hint, hint), Backend::Nft, "nft is checked first");
        assert_eq!(
            with("", "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\n"),
            Backend::Legacy
        );
        assert_eq!(with("", "*filter\n:KUBE-SERVICES - [0:0]\n"), Backend::Nft);
    }

    #[test]
    fn program_names() {
        assert_eq!(
            Backend::Legacy.program(IpFamily::V6, "restore"),
            "ip6tables-legacy-restore"
        );
        assert_eq!(
            Backend::Nft.program(IpFamily::V4, "save"),
            "iptables-nft-save"
        );
    }
}
