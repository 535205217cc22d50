//! `kube-proxy explain`: where a connection goes, for people. Asks the running proxy's
//! `/debug/explain` (`--metrics-address`, default `127.0.0.1:10249`), or, with
//! `--manifests DIR`, reads the manifests and the mode's flags itself and calls the same
//! [`proxy_core::explain::explain`], with no proxy running. `--verify` needs the proxy:
//! only it sees the node's kernel.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use proxy_core::explain::{explain, Query};
use proxy_core::source::SourceUpdate;
use proxy_core::tracker::ChangeTracker;

use crate::app::BackendSettings;

/// The metrics server's default address (`--metrics-bind-address`).
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10249";

/// `explain`'s own flags; the rest are kube-proxy's (for `--manifests`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExplainArgs {
    pub src: Option<String>,
    pub dst: Option<String>,
    pub proto: Option<String>,
    pub iif: Option<String>,
    pub metrics_address: Option<String>,
    pub verify: bool,
    pub json: bool,
}

pub const USAGE: &str = "usage: kube-proxy explain --src IP[:PORT] --dst IP:PORT --proto tcp|udp|sctp [--iif NAME] \
[--verify] [--json] [--metrics-address HOST:PORT | --manifests DIR [kube-proxy flags: --proxy-mode, --cluster-cidr, \
--detect-local-mode, --masquerade-all, --nodeport-addresses, --hostname-override, --config ...]]";

/// Takes `explain`'s flags out of `args` (after the word `explain`); returns them and
/// the others, for kube-proxy's parser.
pub fn split_args(args: Vec<OsString>) -> anyhow::Result<(ExplainArgs, Vec<OsString>)> {
    let mut out = ExplainArgs::default();
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str().map(str::to_owned) else {
            rest.push(arg);
            continue;
        };
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (text.clone(), None),
        };
        let slot = match flag.as_str() {
            "--src" => &mut out.src,
            "--dst" => &mut out.dst,
            "--proto" => &mut out.proto,
            "--iif" => &mut out.iif,
            "--metrics-address" => &mut out.metrics_address,
            "--verify" | "--json" => {
                let on = match inline.as_deref() {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(v) => bail!("{flag}={v:?}: expected true or false"),
                };
                if flag == "--verify" {
                    out.verify = on;
                } else {
                    out.json = on;
                }
                continue;
            }
            "-h" | "--help" => bail!("{USAGE}"),
            _ => {
                rest.push(arg);
                continue;
            }
        };
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .and_then(|v| v.into_string().ok())
                .with_context(|| format!("{flag} needs a value"))?,
        };
        *slot = Some(value);
    }
    Ok((out, rest))
}

impl ExplainArgs {
    fn required(&self) -> anyhow::Result<(&str, &str, &str)> {
        match (&self.src, &self.dst, &self.proto) {
            (Some(s), Some(d), Some(p)) => Ok((s, d, p)),
            _ => bail!("--src, --dst and --proto are required\n{USAGE}"),
        }
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks the running proxy. Returns the HTTP status and the answer's body.
pub fn remote(address: &str, args: &ExplainArgs) -> anyhow::Result<(u16, String)> {
    let (src, dst, proto) = args.required()?;
    let mut path = format!(
        "/debug/explain?src={}&dst={}&proto={}",
        encode(src),
        encode(dst),
        encode(proto)
    );
    if let Some(iif) = &args.iif {
        path.push_str(&format!("&iif={}", encode(iif)));
    }
    if args.verify {
        path.push_str("&verify=1");
    }
    if !args.json {
        path.push_str("&format=text");
    }
    let target = address
        .to_socket_addrs()
        .with_context(|| format!("--metrics-address {address:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("--metrics-address {address:?} resolves to nothing"))?;
    let timeout = Duration::from_secs(30);
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to the proxy's metrics server at {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("reading the proxy's answer")?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the proxy's answer is not HTTP")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the proxy's answer has no status")?;
    Ok((status, body.to_string()))
}

/// Explains from a manifests directory with the mode's settings: no proxy, no kernel.
pub fn offline(
    backend: &BackendSettings,
    node_name: &str,
    serve_external_ips: bool,
    manifests: &Path,
    args: &ExplainArgs,
) -> anyhow::Result<String> {
    if args.verify {
        bail!("--verify reads the node's kernel through the running proxy: use --metrics-address, not --manifests");
    }
    let (src, dst, proto) = args.required()?;
    let query = Query::parse(src, dst, proto, args.iif.as_deref())?;
    let report = source_files::load(manifests, node_name)
        .with_context(|| format!("reading manifests {}", manifests.display()))?;
    for problem in &report.problems {
        tracing::warn!("{problem}");
    }
    let mut tracker = ChangeTracker::new(node_name).with_external_ips(serve_external_ips);
    tracker.apply(SourceUpdate::Replace(report.objects));
    let explanation = explain(&tracker.state(), &backend.explain_settings(), &query);
    Ok(if args.json {
        format!("{}\n", serde_json::to_string_pretty(&explanation)?)
    } else {
        explanation.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_flags_are_taken_and_the_rest_kept() {
        let args = [
            "--src",
            "10.0.0.1",
            "--dst=10.96.0.1:80",
            "--proto",
            "tcp",
            "--json",
            "--proxy-mode",
            "iptables",
        ]
        .map(OsString::from)
        .to_vec();
        let (e, rest) = split_args(args).unwrap();
        assert_eq!(e.dst.as_deref(), Some("10.96.0.1:80"));
        assert!(e.json && !e.verify);
        assert_eq!(rest, ["--proxy-mode", "iptables"].map(OsString::from));
        assert!(split_args(vec!["--src".into()]).is_err());
        assert_eq!(encode("[fd00::1]:80"), "%5Bfd00%3A%3A1%5D%3A80");
    }
}
