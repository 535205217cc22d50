//! The demo without root: no namespaces, no kernel rules. Two small backends answer with
//! their names on 127.0.0.1 and 127.0.0.2 (same port), the real `kube-proxy` runs as the
//! current user in userspace mode and serves each Service on 127.0.0.1 at its port, and
//! this program sends requests to those ports.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::{request_here, Proto, RequestError};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Service ports: high, so no privilege is needed to serve them.
const WEB_PORT: u16 = 18080;
const WEB_NODE_PORT: u16 = 30080;
const DNS_PORT: u16 = 18053;
const DOWN_PORT: u16 = 18099;

/// Kills the proxy when the demo ends, however it ends.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `name` over TCP and UDP on `ip:port` from background threads (they end with
/// the process).
fn backend(name: &'static str, ip: &str, port: u16) -> Result<()> {
    let addr: SocketAddr = format!("{ip}:{port}").parse().context("backend address")?;
    let tcp = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let udp = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
    std::thread::spawn(move || {
        for mut conn in tcp.incoming().flatten() {
            let _ = conn.write_all(format!("{name}\n").as_bytes());
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let _ = conn.read(&mut [0u8; 64]);
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name}\n").as_bytes(), peer);
        }
    });
    Ok(())
}

fn manifests(backend_port: u16) -> String {
    let slice = |svc: &str, port_name: &str, proto: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {backend_port}, protocol: {proto}}}]\nendpoints:\n  - addresses: [127.0.0.1]\n  - addresses: [127.0.0.2]\n"
        )
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: {WEB_PORT}, protocol: TCP}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-np, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports: [{{name: http, port: 80, nodePort: {WEB_NODE_PORT}, protocol: TCP}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.53\n  ports: [{{name: dns, port: {DNS_PORT}, protocol: UDP}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: down, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.99\n  ports: [{{name: http, port: {DOWN_PORT}, protocol: TCP}}]\n\
         {}{}{}",
        slice("web", "http", "TCP"),
        slice("web-np", "http", "TCP"),
        slice("dns", "dns", "UDP"),
    )
}

pub fn run(proxy_bin: &Path) -> Result<()> {
    println!("Not running as root: the userspace demo, on localhost ports (no namespaces, no kernel rules).");
    // A free port for the backends, the same on both loopback addresses.
    let backend_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port();
    backend("be0", "127.0.0.1", backend_port)?;
    backend("be1", "127.0.0.2", backend_port)?;

    let dir = std::env::temp_dir().join(format!("kube-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("manifests"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let manifest_dir = dir.join("manifests");
    std::fs::write(manifest_dir.join("demo.yaml"), manifests(backend_port))
        .context("writing the demo manifests")?;
    let log_path = dir.join("kube-proxy.log");
    let log = std::fs::File::create(&log_path).context("creating the log")?;
    // The PATH a node would give it: only the tools userspace mode runs.
    let tools = testkit::tools_path("userspace", testkit::Tools::Needed, &dir.join("tools"))?;
    let child = Command::new(proxy_bin)
        .env("PATH", tools)
        .args([
            "--proxy-mode=userspace",
            "--hostname-override=demo",
            "--manifests",
        ])
        .arg(&manifest_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", proxy_bin.display()))?;
    let _proxy = Proxy(child);
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log().contains("synced rules") {
        if Instant::now() > deadline {
            bail!("kube-proxy did not start; its log:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "kube-proxy is running as you, in userspace mode (log: {}):",
        log_path.display()
    );
    for line in read_log().lines() {
        println!("  | {line}");
    }
    println!("\nBackends be0 (127.0.0.1:{backend_port}) and be1 (127.0.0.2:{backend_port}); requests from here, 6 each:");
    let checks: [(&str, Proto, u16); 4] = [
        ("demo/web", Proto::Tcp, WEB_PORT),
        ("demo/web-np NodePort", Proto::Tcp, WEB_NODE_PORT),
        ("demo/dns", Proto::Udp, DNS_PORT),
        ("demo/down (no endpoints)", Proto::Tcp, DOWN_PORT),
    ];
    let mut failures = 0;
    for (what, proto, port) in checks {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(match request_here(proto, addr, None, TIMEOUT) {
                Ok(name) => name,
                Err(RequestError::Refused) => "refused".to_string(),
                Err(e) => {
                    failures += 1;
                    format!("ERROR: {e}")
                }
            });
        }
        println!("  {what:<26} {proto} {addr:<17} -> {}", answers.join(" "));
    }
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    println!("\nDone. As root, `kube-proxy-demo` shows the same through ClusterIPs in network namespaces.");
    Ok(())
}
