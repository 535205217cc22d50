//! End-to-end test harness: hosts in network namespaces joined by veth pairs,
//! small TCP/UDP/SCTP servers, and clients whose failures say whether a
//! request was refused or timed out.
//!
//! Everything needs root and iproute2; start each test with
//! `if !testkit::root_or_skip("name") { return; }`. All addresses live only
//! inside namespaces the test created.
//!
//! ```no_run
//! use std::time::Duration;
//! use testkit::*;
//! let topo = Topology::new(2).unwrap();
//! let _servers = topo.serve_all(8080).unwrap();
//! let addr = (topo.backends[0].ipv4, 8080).into();
//! assert_eq!(tcp_request(&topo.client, addr, Duration::from_secs(1)).unwrap(), "be0");
//! ```

#![forbid(unsafe_code)]

mod client;
pub mod manifests;
mod netns;
mod proxy;
mod server;
pub mod synth;
mod topology;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use client::{
    request, request_here, sctp_request, spread, tcp_echo, tcp_request, udp_request,
    udp_request_from, RequestError,
};
pub use netns::{link, Netns};
pub use proxy::{mode_tools, tools_path, which, ProxyProcess, Tools, LEFTOVER_TOOLS, MODE_TOOLS};
pub use server::{sctp_available, serve, Proto, ServeMode, ServerGuard};
pub use topology::{
    backend_ipv4, backend_ipv6, node_backend_if, Backend, Topology, CLIENT_IPV4, CLIENT_IPV6,
    CLUSTER_CIDR_V4, CLUSTER_CIDR_V6, MAX_BACKENDS, NODE_CLIENT_IF, NODE_IPV4, NODE_IPV6,
    NODE_POD_CLIENT_IF, POD_CLIENT_IPV4, POD_CLIENT_IPV6, POD_IF,
};

/// Whether the harness can run here: effective uid 0 and `ip` (iproute2)
/// present. If not, prints a loud "SKIPPED" line and returns false, except
/// when `CI` is `true` (or `1`): then it panics, because CI must never
/// silently skip.
pub fn root_or_skip(test_name: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("needs root")
    } else if !ip_available() {
        Some("needs iproute2 (`ip`)")
    } else {
        None
    };
    let Some(why) = missing else {
        return true;
    };
    let ci = std::env::var("CI").unwrap_or_default();
    if ci.eq_ignore_ascii_case("true") || ci == "1" {
        panic!("{test_name}: {why}, and CI={ci} forbids skipping");
    }
    // Written to the real stderr, not through eprintln!, so the test
    // harness's output capture does not hide it.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test_name}: {why}");
    false
}

fn ip_available() -> bool {
    Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Calls `condition` every `poll` until it returns true (then returns true)
/// or `timeout` has passed (then returns false). Checks at least once.
pub fn wait_until(timeout: Duration, poll: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(poll);
    }
}
