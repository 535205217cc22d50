//! Conntrack: deleting stale flows with the `conntrack` tool, and the `--conntrack-*`
//! sysctls.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;
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

/// What the cleanup needs of one conntrack entry: the original destination and where the
/// reply comes from (the endpoint, once NATed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub protocol: Protocol,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
}

/// Parses `conntrack -L` output: per line the protocol, then the original tuple's
/// `src= dst= sport= dport=`, then the reply tuple's. Lines it cannot read are skipped.
pub fn parse_entries(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let protocol = match words.next()? {
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                "tcp" => Protocol::Tcp,
                _ => return None,
            };
            let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
            let nth = |key: &str, n: usize| {
                fields
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .nth(n)
                    .map(|(_, v)| *v)
            };
            Some(Entry {
                protocol,
                orig_dst: nth("dst", 0)?.parse().ok()?,
                orig_dport: nth("dport", 0)?.parse().ok()?,
                reply_src: nth("src", 1)?.parse().ok()?,
            })
        })
        .collect()
}

/// Whether `entry` is one of the entries `flow` stands for.
pub fn matches(flow: &StaleFlow, entry: &Entry) -> bool {
    if flow.protocol() != entry.protocol || flow.family() != IpFamily::of(&entry.orig_dst) {
        return false;
    }
    match flow {
        StaleFlow::ServiceToEndpoint {
            service_ip,
            port,
            endpoint,
            ..
        } => {
            entry.orig_dst == *service_ip
                && entry.orig_dport == *port
                && entry.reply_src == *endpoint
        }
        StaleFlow::NodePortToEndpoint {
            node_port,
            endpoint,
            ..
        } => entry.orig_dport == *node_port && entry.reply_src == *endpoint,
        StaleFlow::Service {
            service_ip, port, ..
        } => entry.orig_dst == *service_ip && entry.orig_dport == *port,
        StaleFlow::NodePort { node_port, .. } => entry.orig_dport == *node_port,
    }
}

impl ConntrackTool {
    /// The entries of one family and protocol (`conntrack -L`).
    fn list(&self, family: IpFamily, protocol: Protocol) -> Result<Vec<Entry>, String> {
        let output = Command::new(&self.program)
            .args(["-L", "-f", family_arg(family), "-p", protocol.as_str()])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        if !output.status.success() {
            return Err(format!(
                "{} -L: {}",
                self.program,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(parse_entries(&String::from_utf8_lossy(&output.stdout)))
    }
}

impl ConntrackCleaner for ConntrackTool {
    /// Lists the table once per family and protocol and deletes only the flows that have
    /// entries: at start-up every UDP Service counts as new, and one `conntrack -D` per
    /// Service would take seconds at 10,000 Services.
    fn delete_all(&mut self, flows: &BTreeSet<StaleFlow>) -> Vec<String> {
        let kinds: BTreeSet<(IpFamily, Protocol)> =
            flows.iter().map(|f| (f.family(), f.protocol())).collect();
        let mut entries = Vec::new();
        for (family, protocol) in kinds {
            match self.list(family, protocol) {
                Ok(listed) => entries.extend(listed),
                // Without a listing, fall back to asking for every flow.
                Err(_) => {
                    return flows
                        .iter()
                        .filter_map(|flow| self.delete(flow).err())
                        .collect()
                }
            }
        }
        flows
            .iter()
            .filter(|flow| entries.iter().any(|e| matches(flow, e)))
            .filter_map(|flow| self.delete(flow).err())
            .collect()
    }

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
    fn listed_entries_select_the_flows_to_delete() {
        let listing = "udp      17 29 src=10.0.0.1 dst=10.96.0.53 sport=40000 dport=53 src=10.244.1.2 dst=10.0.0.1 sport=5353 dport=40000 mark=0 use=1\n\
                       udp      17 20 src=10.0.0.1 dst=192.168.1.1 sport=40001 dport=30053 [UNREPLIED] src=192.168.1.1 dst=10.0.0.1 sport=30053 dport=40001 mark=0 use=1\n\
                       garbage line\n";
        let entries = parse_entries(listing);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0].reply_src,
            "10.244.1.2".parse::<IpAddr>().unwrap()
        );
        let to_endpoint = StaleFlow::ServiceToEndpoint {
            protocol: Protocol::Udp,
            service_ip: "10.96.0.53".parse().unwrap(),
            port: 53,
            endpoint: "10.244.1.2".parse().unwrap(),
        };
        assert!(matches(&to_endpoint, &entries[0]));
        let other_endpoint = StaleFlow::ServiceToEndpoint {
            protocol: Protocol::Udp,
            service_ip: "10.96.0.53".parse().unwrap(),
            port: 53,
            endpoint: "10.244.9.9".parse().unwrap(),
        };
        assert!(!matches(&other_endpoint, &entries[0]));
        let node_port = StaleFlow::NodePort {
            protocol: Protocol::Udp,
            family: IpFamily::V4,
            node_port: 30053,
        };
        assert!(matches(&node_port, &entries[1]));
        let sctp = StaleFlow::NodePort {
            protocol: Protocol::Sctp,
            family: IpFamily::V4,
            node_port: 30053,
        };
        assert!(!matches(&sctp, &entries[1]));
    }

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
