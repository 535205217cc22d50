//! Conntrack: deleting stale flows with the `conntrack` tool, and the `--conntrack-*`
//! sysctls.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proxy_core::model::{IpFamily, Protocol};
use proxy_core::stale::{ConntrackCleaner, StaleFlow};

/// Deletes flows by running `conntrack -D` (conntrack-tools).
#[derive(Debug, Clone)]
pub struct ConntrackTool {
    program: String,
}

impl Default for ConntrackTool {
    fn default() -> Self {
        ConntrackTool {
            program: "conntrack".into(),
        }
    }
}

fn family_arg(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

/// The `conntrack -D` arguments that select exactly the flow's entries.
pub fn delete_args(flow: &StaleFlow) -> Vec<String> {
    let mut args: Vec<String> = vec!["-D".into()];
    let mut push = |a: &str, b: String| {
        args.push(a.into());
        args.push(b);
    };
    let protocol = |p: Protocol| p.as_str().to_string();
    match flow {
        StaleFlow::ServiceToEndpoint {
            protocol: p,
            service_ip,
            port,
            endpoint,
        } => {
            push("-f", family_arg(IpFamily::of(service_ip)).into());
            push("-p", protocol(*p));
            push("--orig-dst", service_ip.to_string());
            push("--orig-port-dst", port.to_string());
            push("--reply-src", endpoint.to_string());
        }
        StaleFlow::NodePortToEndpoint {
            protocol: p,
            family,
            node_port,
            endpoint,
        } => {
            push("-f", family_arg(*family).into());
            push("-p", protocol(*p));
            push("--orig-port-dst", node_port.to_string());
            push("--reply-src", endpoint.to_string());
        }
        StaleFlow::Service {
            protocol: p,
            service_ip,
            port,
        } => {
            push("-f", family_arg(IpFamily::of(service_ip)).into());
            push("-p", protocol(*p));
            push("--orig-dst", service_ip.to_string());
            push("--orig-port-dst", port.to_string());
        }
        StaleFlow::NodePort {
            protocol: p,
            family,
            node_port,
        } => {
            push("-f", family_arg(*family).into());
            push("-p", protocol(*p));
            push("--orig-port-dst", node_port.to_string());
        }
    }
    args
}

impl ConntrackCleaner for ConntrackTool {
    fn delete(&mut self, flow: &StaleFlow) -> Result<(), String> {
        let output = Command::new(&self.program)
            .args(delete_args(flow))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // conntrack exits 1 when nothing matched: that is success for us.
        if output.status.success() || stderr.contains("0 flow entries") {
            return Ok(());
        }
        Err(format!(
            "{} {:?}: {}",
            self.program,
            delete_args(flow),
            stderr.trim()
        ))
    }
}

/// The `--conntrack-*` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// Entries per CPU core (0: leave the limit alone).
    pub max_per_core: u32,
    /// Lower bound for the limit.
    pub min: u32,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

const NETFILTER: &str = "/proc/sys/net/netfilter";

/// Writes one sysctl if it differs; describes what could not be done.
fn set(path: &Path, value: u64, warnings: &mut Vec<String>) {
    let current = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if current == Some(value) {
        return;
    }
    match std::fs::write(path, value.to_string()) {
        Ok(()) => tracing::info!(sysctl = %path.display(), value, "set conntrack sysctl"),
        // Inside a network namespace the global ones are read-only: say so, go on.
        Err(e) => warnings.push(format!("cannot set {} to {value}: {e}", path.display())),
    }
}

/// Applies the settings where writable; returns a warning per setting that was not.
pub fn apply_sysctls(settings: &ConntrackSettings, cpus: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    let dir = Path::new(NETFILTER);
    if settings.max_per_core > 0 {
        let max = (u64::from(settings.max_per_core) * cpus as u64).max(u64::from(settings.min));
        set(&dir.join("nf_conntrack_max"), max, &mut warnings);
        // The hash table should hold a quarter of the entries, as upstream sets it; only
        // ever grow it.
        let hashsize = Path::new("/sys/module/nf_conntrack/parameters/hashsize");
        let current = std::fs::read_to_string(hashsize)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if current.is_some_and(|c| c < max / 4) {
            set(hashsize, max / 4, &mut warnings);
        }
    }
    let seconds = [
        (
            "nf_conntrack_tcp_timeout_established",
            settings.tcp_established_timeout,
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            settings.tcp_close_wait_timeout,
        ),
        ("nf_conntrack_udp_timeout", settings.udp_timeout),
        (
            "nf_conntrack_udp_timeout_stream",
            settings.udp_stream_timeout,
        ),
    ];
    for (name, value) in seconds {
        if let Some(d) = value.filter(|d| !d.is_zero()) {
            set(&dir.join(name), d.as_secs(), &mut warnings);
        }
    }
    if settings.tcp_be_liberal {
        set(&dir.join("nf_conntrack_tcp_be_liberal"), 1, &mut warnings);
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_args_select_the_flow() {
        let flow = StaleFlow::ServiceToEndpoint {
            protocol: Protocol::Udp,
            service_ip: "10.96.0.53".parse().unwrap(),
            port: 53,
            endpoint: "10.244.1.2".parse().unwrap(),
        };
        assert_eq!(
            delete_args(&flow).join(" "),
            "-D -f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 10.244.1.2"
        );
        let flow = StaleFlow::NodePort {
            protocol: Protocol::Sctp,
            family: IpFamily::V6,
            node_port: 30053,
        };
        assert_eq!(
            delete_args(&flow).join(" "),
            "-D -f ipv6 -p sctp --orig-port-dst 30053"
        );
    }
}
