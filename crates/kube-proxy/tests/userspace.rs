//! Userspace mode without root: the real binary runs as `nobody` (uid 65534) in a test
//! node namespace and serves each Service port on `--bind-address` at the Service's port
//! (NodePort where set), forwarding to the backend pods. The harness itself needs root
//! to build the namespaces; the proxy does not. (Userspace mode as root, through Service
//! IPs, runs the shared suite in `datapath.rs`.)

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::manifests::{render, PortSpec, ServiceSpec};
use testkit::{spread, Proto, ProxyProcess, RequestError, ServeMode, ServerGuard, Topology};

const BACKEND_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const NODE: &str = "192.168.100.1";
const TIMEOUT: Duration = Duration::from_secs(2);
const SYNCED: &str = "synced rules";
const NOBODY: &str = "65534";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn node(port: u16) -> SocketAddr {
    SocketAddr::new(ip(NODE), port)
}

fn be0() -> IpAddr {
    ip("10.244.1.2")
}

fn be1() -> IpAddr {
    ip("10.244.2.2")
}

/// web (TCP 18080, UDP 18053), np (port 80, NodePort 30080), sticky (ClientIP affinity,
/// TCP 18081), echo (TCP 19000 → 9000) and low (TCP 81: not bindable without root).
fn services(web_endpoints: &[IpAddr]) -> String {
    let both = [be0(), be1()];
    let web = ServiceSpec::new(
        "default",
        "web",
        &[ip("10.96.0.10")],
        vec![
            PortSpec::new("http", "TCP", 18080, BACKEND_PORT),
            PortSpec::new("dns", "UDP", 18053, BACKEND_PORT),
        ],
    )
    .endpoints(web_endpoints);
    let mut np = ServiceSpec::new(
        "default",
        "np",
        &[ip("10.96.0.11")],
        vec![PortSpec::new("http", "TCP", 80, BACKEND_PORT).node_port(30080)],
    )
    .endpoints(&both);
    np.type_ = "NodePort".into();
    let mut sticky = ServiceSpec::new(
        "default",
        "sticky",
        &[ip("10.96.0.12")],
        vec![PortSpec::new("http", "TCP", 18081, BACKEND_PORT)],
    )
    .endpoints(&both);
    sticky.extra_spec = vec![
        "  sessionAffinity: ClientIP".into(),
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}".into(),
    ];
    let echo = ServiceSpec::new(
        "default",
        "echo",
        &[ip("10.96.0.13")],
        vec![PortSpec::new("echo", "TCP", 19000, ECHO_PORT)],
    )
    .endpoints(&both);
    let low = ServiceSpec::new(
        "default",
        "low",
        &[ip("10.96.0.14")],
        vec![PortSpec::new("http", "TCP", 81, BACKEND_PORT)],
    )
    .endpoints(&both);
    render(&[web, np, sticky, echo, low])
}

/// The node with an unprivileged proxy, two backends (names on 8080, echo on 9000) and
/// a client.
struct Unprivileged {
    topo: Topology,
    _servers: Vec<ServerGuard>,
    dir: tempfile::TempDir,
    proxy: ProxyProcess,
    syncs: usize,
}

impl Unprivileged {
    fn start(name: &str, extra_args: &[&str]) -> Option<Unprivileged> {
        if !testkit::root_or_skip(name) {
            return None;
        }
        let topo = Topology::new(2).expect("topology");
        let mut servers = topo.serve_all(BACKEND_PORT).expect("backend servers");
        for b in &topo.backends {
            servers.push(
                b.serve_with(ECHO_PORT, &[Proto::Tcp], ServeMode::Echo)
                    .expect("echo server"),
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // nobody must be able to read the manifests.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        write_manifests(dir.path(), &services(&[be0(), be1()]));
        let manifests = dir.path().join("manifests");
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"));
        let mut args = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            binary.to_str().expect("utf-8 path"),
            "--proxy-mode=userspace",
            "--manifests",
            manifests.to_str().expect("utf-8 path"),
            "--hostname-override=node-a",
            "--bind-address=192.168.100.1",
            "--iptables-min-sync-period=0s",
        ];
        args.extend_from_slice(extra_args);
        let proxy = ProxyProcess::start(
            &topo.node,
            Path::new("setpriv"),
            &args,
            &dir.path().join("proxy.log"),
        )
        .expect("start proxy");
        let mut me = Unprivileged {
            topo,
            _servers: servers,
            dir,
            proxy,
            syncs: 0,
        };
        me.wait_for_sync();
        Some(me)
    }

    fn wait_for_sync(&mut self) {
        self.syncs += 1;
        let ok = self
            .proxy
            .wait_for_log(SYNCED, self.syncs, Duration::from_secs(20));
        assert!(ok, "no sync #{}; log:\n{}", self.syncs, self.proxy.log());
    }

    fn update(&mut self, manifests: &str) {
        write_manifests(self.dir.path(), manifests);
        self.wait_for_sync();
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}", self.proxy.log());
        }
    }
}

/// Writes atomically (write then rename), readable by everyone.
fn write_manifests(dir: &Path, content: &str) {
    let target = dir.join("manifests");
    std::fs::create_dir_all(&target).expect("manifests dir");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tmp = dir.join("services.yaml.tmp");
    std::fs::write(&tmp, content).expect("write manifests");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::rename(&tmp, target.join("services.yaml")).expect("rename manifests");
}

fn names(counts: &BTreeMap<String, usize>) -> Vec<&str> {
    counts.keys().map(String::as_str).collect()
}

#[test]
fn unprivileged_proxy_serves_tcp_udp_nodeport_and_affinity_on_bind_address() {
    let Some(mut cluster) = Unprivileged::start(
        "unprivileged_proxy_serves_tcp_udp_nodeport_and_affinity_on_bind_address",
        // Long enough that the session test below sees a live session, not an expired one.
        &["--udp-timeout=30s"],
    ) else {
        return;
    };
    // It really runs as nobody, and programs nothing in the kernel.
    let status = std::fs::read_to_string(format!("/proc/{}/status", cluster.proxy.pid()))
        .expect("proxy status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == NOBODY),
        "{uid}"
    );
    let tables = cluster
        .topo
        .node
        .exec(&["nft", "list", "tables"])
        .expect("nft");
    assert!(!tables.contains("kube-proxy"), "{tables}");

    let client = &cluster.topo.client;
    for (what, dest, proto) in [
        ("TCP", node(18080), Proto::Tcp),
        ("UDP", node(18053), Proto::Udp),
        ("NodePort", node(30080), Proto::Tcp),
    ] {
        let counts = spread(client, dest, proto, 20, TIMEOUT).expect("spread");
        assert_eq!(names(&counts), ["be0", "be1"], "{what}: {counts:?}");
    }
    // A NodePort Service is served on its NodePort, not its port.
    assert!(matches!(
        testkit::tcp_request(client, node(80), TIMEOUT),
        Err(RequestError::Refused)
    ));
    // ClientIP affinity: every connection from the client lands on one backend.
    let counts = spread(client, node(18081), Proto::Tcp, 20, TIMEOUT).expect("spread");
    assert_eq!(counts.len(), 1, "affinity: {counts:?}");
    // Port 81 needs privileges: reported with the Service's name, the rest still works.
    let log = cluster.proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("default/low") && l.contains("cannot listen")),
        "{log}"
    );
    // Half-close: the echo server sees our end of stream only after all the data, and
    // its reply still comes back.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let back = testkit::tcp_echo(client, node(19000), &data, Duration::from_secs(10))
        .expect("echo through the proxy");
    assert!(
        back == data,
        "echo: {} bytes back of {}",
        back.len(),
        data.len()
    );

    // UDP under an endpoint change: a session (fixed client port) pinned to one backend
    // moves to the remaining one at the first datagram after the sync, although its idle
    // timeout has not passed; a stream of requests meanwhile all get answers.
    let first = testkit::udp_request_from(client, 40000, node(18053), TIMEOUT).expect("udp");
    let (gone, stays) = if first == "be0" {
        (be0(), "be1")
    } else {
        (be1(), "be0")
    };
    let remaining: Vec<IpAddr> = [be0(), be1()].into_iter().filter(|i| *i != gone).collect();
    let manifests = services(&remaining);
    let client_ns = cluster.topo.client.name().to_string();
    let answers = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            let mut answers = BTreeMap::new();
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let key = match testkit::udp_request(&cluster.topo.client, node(18053), TIMEOUT) {
                    Ok(name) => name,
                    Err(e) => e.label().to_string(),
                };
                *answers.entry(key).or_insert(0usize) += 1;
            }
            answers
        });
        std::thread::sleep(Duration::from_millis(300));
        write_manifests(cluster.dir.path(), &manifests);
        stream.join().expect("udp stream")
    });
    cluster.syncs += 1;
    assert!(cluster
        .proxy
        .wait_for_log(SYNCED, cluster.syncs, Duration::from_secs(20)));
    assert!(
        answers.keys().all(|k| !k.starts_with('!')),
        "failures during the change ({client_ns}): {answers:?}"
    );
    let after = testkit::udp_request_from(&cluster.topo.client, 40000, node(18053), TIMEOUT)
        .expect("udp after change");
    assert_eq!(after, stays, "the session should have left {first}");
    let counts =
        spread(&cluster.topo.client, node(18053), Proto::Udp, 10, TIMEOUT).expect("spread");
    assert_eq!(names(&counts), [stays], "{counts:?}");

    // All endpoints gone: refused, for TCP and UDP.
    cluster.update(&services(&[]));
    assert!(matches!(
        testkit::tcp_request(&cluster.topo.client, node(18080), TIMEOUT),
        Err(RequestError::Refused)
    ));
    let udp = testkit::udp_request(&cluster.topo.client, node(18053), TIMEOUT);
    assert!(matches!(udp, Err(RequestError::Refused)), "UDP: {udp:?}");
}

/// The bytes of every echo stream: a cycle of 251 values (a prime, so it does not line
/// up with buffer sizes), long enough that any window of one chunk can be sliced out.
fn pattern_source() -> Vec<u8> {
    (0..CHUNK + 251).map(|k| ((k * 31) % 251) as u8).collect()
}

const CHUNK: usize = 64 * 1024;

/// Bytes `offset..offset + len` of connection `conn`'s stream. Connections start at
/// different points of the cycle, so data delivered to the wrong client would show.
fn pattern(source: &[u8], conn: usize, offset: usize, len: usize) -> &[u8] {
    let start = (offset + conn * 7) % 251;
    &source[start..start + len]
}

/// Sends `size` pattern bytes, closes its sending side, and checks the echo byte for byte
/// as it comes back. Returns the number of bytes that came back intact.
async fn echo_and_verify(
    stream: tokio::net::TcpStream,
    conn: usize,
    size: usize,
) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let source = pattern_source();
    let (mut rd, mut wr) = stream.into_split();
    let writer = async {
        let mut sent = 0;
        while sent < size {
            let n = CHUNK.min(size - sent);
            wr.write_all(pattern(&source, conn, sent, n)).await?;
            sent += n;
        }
        wr.shutdown().await
    };
    let reader = async {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<usize, std::io::Error>(got);
            }
            if buf[..n] != *pattern(&source, conn, got, n) {
                return Err(std::io::Error::other(format!(
                    "connection {conn}: wrong bytes after {got}"
                )));
            }
            got += n;
        }
    };
    let (sent, got) = tokio::join!(writer, reader);
    sent?;
    got
}

#[test]
fn thousand_concurrent_tcp_connections_keep_their_bytes() {
    const CONNECTIONS: usize = 1000;
    const SIZE: usize = 1 << 20;
    let Some(cluster) =
        Unprivileged::start("thousand_concurrent_tcp_connections_keep_their_bytes", &[])
    else {
        return;
    };
    let started = Instant::now();
    let outcome = cluster
        .topo
        .client
        .run(|| -> std::io::Result<Vec<std::io::Result<usize>>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                // All connections are open before any data moves: 1,000 at once.
                let mut streams = Vec::with_capacity(CONNECTIONS);
                for _ in 0..CONNECTIONS {
                    let connect = tokio::net::TcpStream::connect(node(19000));
                    streams.push(
                        tokio::time::timeout(Duration::from_secs(10), connect)
                            .await
                            .map_err(|_| std::io::Error::other("connect timed out"))??,
                    );
                }
                let mut tasks = tokio::task::JoinSet::new();
                for (conn, stream) in streams.into_iter().enumerate() {
                    tasks.spawn(echo_and_verify(stream, conn, SIZE));
                }
                let all = tokio::time::timeout(Duration::from_secs(120), tasks.join_all())
                    .await
                    .map_err(|_| std::io::Error::other("echoes timed out"))?;
                Ok(all)
            })
        })
        .expect("client namespace")
        .expect("connections");
    let failed: Vec<String> = outcome
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(n) if *n == SIZE => None,
            Ok(n) => Some(format!("#{i}: {n} bytes back")),
            Err(e) => Some(format!("#{i}: {e}")),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {CONNECTIONS} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "{CONNECTIONS} concurrent connections x {SIZE} bytes echoed intact in {:?}",
        started.elapsed()
    );
}

/// One TCP stream's echo throughput (MiB/s each way) to `dest` from the client.
fn stream_throughput(cluster: &Unprivileged, dest: SocketAddr, size: usize) -> f64 {
    let took = cluster
        .topo
        .client
        .run(|| -> std::io::Result<Duration> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let stream = tokio::net::TcpStream::connect(dest).await?;
                stream.set_nodelay(true)?;
                let start = Instant::now();
                let got = echo_and_verify(stream, 0, size).await?;
                assert_eq!(got, size);
                Ok(start.elapsed())
            })
        })
        .expect("client namespace")
        .expect("stream");
    size as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// Completed request/response connections per second to `dest` (connect, read the
/// server's name, close) from `workers` parallel clients over `period`.
fn connection_rate(
    cluster: &Unprivileged,
    dest: SocketAddr,
    workers: usize,
    period: Duration,
) -> f64 {
    let client = &cluster.topo.client;
    let done: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    client
                        .run(|| {
                            let until = Instant::now() + period;
                            let mut n = 0usize;
                            while Instant::now() < until {
                                testkit::request_here(Proto::Tcp, dest, None, TIMEOUT)
                                    .expect("request");
                                n += 1;
                            }
                            n
                        })
                        .expect("client namespace")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    done as f64 / period.as_secs_f64()
}

/// The closing figures: `cargo test --release -p kube-proxy --test userspace -- --ignored
/// --nocapture` (as root). Direct connections to a backend pod and connections through the
/// unprivileged userspace proxy, in the same topology and run.
#[test]
#[ignore = "measurement, prints figures; run explicitly"]
fn measure_userspace_throughput_and_connection_rate() {
    let Some(cluster) =
        Unprivileged::start("measure_userspace_throughput_and_connection_rate", &[])
    else {
        return;
    };
    let size = 512 << 20;
    let period = Duration::from_secs(3);
    let direct_echo = SocketAddr::new(be0(), ECHO_PORT);
    let direct_name = SocketAddr::new(be0(), BACKEND_PORT);
    let direct_mib = stream_throughput(&cluster, direct_echo, size);
    let proxy_mib = stream_throughput(&cluster, node(19000), size);
    let direct_cps = connection_rate(&cluster, direct_name, 4, period);
    let proxy_cps = connection_rate(&cluster, node(18080), 4, period);
    println!("one TCP stream, 512 MiB echoed (MiB/s each way): direct {direct_mib:.0}, through userspace proxy {proxy_mib:.0} ({:.0}%)", 100.0 * proxy_mib / direct_mib);
    println!("connections/s (4 clients, connect + reply + close): direct {direct_cps:.0}, through userspace proxy {proxy_cps:.0} ({:.0}%)", 100.0 * proxy_cps / direct_cps);
}
