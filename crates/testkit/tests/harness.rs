//! Tests of the harness itself, without a proxy: direct routing between the
//! namespaces of the standard topology.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use testkit::*;

const T: Duration = Duration::from_secs(2);
const PORT: u16 = 8080;
const CLOSED: u16 = 8081;

fn netns_exists(name: &str) -> bool {
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn direct_routing_all_protocols() {
    if !root_or_skip("direct_routing_all_protocols") {
        return;
    }
    let start = Instant::now();
    let topo = Topology::new(2).unwrap();
    let built = start.elapsed();
    assert!(built < Duration::from_secs(1), "topology took {built:?}");
    let _servers = topo.serve_all(PORT).unwrap();

    let be0 = &topo.backends[0];
    for ip in [IpAddr::from(be0.ipv4), IpAddr::from(be0.ipv6)] {
        let addr = SocketAddr::new(ip, PORT);
        for client in [&topo.client, &topo.pod_client] {
            assert_eq!(tcp_request(client, addr, T).unwrap(), "be0", "tcp {addr}");
            assert_eq!(udp_request(client, addr, T).unwrap(), "be0", "udp {addr}");
            if sctp_available() {
                assert_eq!(sctp_request(client, addr, T).unwrap(), "be0", "sctp {addr}");
            } else {
                let err = sctp_request(client, addr, T).unwrap_err();
                assert!(
                    matches!(&err, RequestError::Other(e) if e.kind() == std::io::ErrorKind::Unsupported),
                    "{err:?}"
                );
            }
        }
        let from = udp_request_from(&topo.client, 40000, addr, T).unwrap();
        assert_eq!(from, "be0");
    }
    let be1 = SocketAddr::new(topo.backends[1].ipv6.into(), PORT);
    assert_eq!(udp_request(&topo.client, be1, T).unwrap(), "be1");
    // The node reaches pods through its connected routes.
    let be1_v4 = SocketAddr::new(topo.backends[1].ipv4.into(), PORT);
    assert_eq!(tcp_request(&topo.node, be1_v4, T).unwrap(), "be1");
}

#[test]
fn closed_port_is_refused() {
    if !root_or_skip("closed_port_is_refused") {
        return;
    }
    let topo = Topology::new(1).unwrap();
    let _servers = topo.serve_all(PORT).unwrap();
    let be0 = &topo.backends[0];
    for ip in [IpAddr::from(be0.ipv4), IpAddr::from(be0.ipv6)] {
        let addr = SocketAddr::new(ip, CLOSED);
        let tcp = tcp_request(&topo.client, addr, T);
        assert!(
            matches!(tcp, Err(RequestError::Refused)),
            "tcp {addr}: {tcp:?}"
        );
        let udp = udp_request(&topo.client, addr, T);
        assert!(
            matches!(udp, Err(RequestError::Refused)),
            "udp {addr}: {udp:?}"
        );
        // ICMP rate limits are off, so a burst is refused every time.
        let counts = spread(&topo.client, addr, Proto::Udp, 100, T).unwrap();
        assert_eq!(counts.get("!refused"), Some(&100), "{counts:?}");
    }
}

#[test]
fn spread_counts_and_echo() {
    if !root_or_skip("spread_counts_and_echo") {
        return;
    }
    let topo = Topology::new(1).unwrap();
    let be0 = &topo.backends[0];
    let _name = be0.serve(PORT).unwrap();
    let _echo = be0
        .serve_with(9000, &[Proto::Tcp, Proto::Udp], ServeMode::Echo)
        .unwrap();
    let addr = SocketAddr::new(be0.ipv4.into(), PORT);
    let counts = spread(&topo.client, addr, Proto::Tcp, 10, T).unwrap();
    assert_eq!(counts.get("be0"), Some(&10), "{counts:?}");

    let echo_addr = SocketAddr::new(be0.ipv6.into(), 9000);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    let back = tcp_echo(&topo.client, echo_addr, &data, T).unwrap();
    assert!(
        back == data,
        "echo returned {} of {} bytes",
        back.len(),
        data.len()
    );
    assert_eq!(udp_request(&topo.client, echo_addr, T).unwrap(), "ping");

    // A Service IP nobody handles leaves the node by its default route and
    // the client (not forwarding) drops it: a timeout, not an error.
    let nowhere = SocketAddr::new("10.96.0.10".parse().unwrap(), 80);
    let res = tcp_request(&topo.client, nowhere, Duration::from_millis(200));
    assert!(matches!(res, Err(RequestError::Timeout)), "{res:?}");
}

#[test]
fn drop_removes_namespaces_and_processes() {
    if !root_or_skip("drop_removes_namespaces_and_processes") {
        return;
    }
    let topo = Topology::new(1).unwrap();
    let names: Vec<String> = [
        &topo.node,
        &topo.client,
        &topo.pod_client,
        &topo.backends[0].ns,
    ]
    .iter()
    .map(|ns| ns.name().to_string())
    .collect();
    assert!(names.iter().all(|n| n.len() <= 15), "{names:?}");
    assert!(names.iter().all(|n| netns_exists(n)), "{names:?}");

    // Namespace settings took effect.
    assert_eq!(
        topo.node
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(
        topo.client
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "0"
    );
    let err = topo.node.exec(&["false"]).unwrap_err().to_string();
    assert!(err.contains("false"), "{err}");

    let mut sleeper = topo.node.command("sleep").arg("60").spawn().unwrap();
    assert!(wait_until(T, Duration::from_millis(10), || {
        topo.node.pids().unwrap().contains(&(sleeper.id() as i32))
    }));
    drop(topo);
    // Killed by the drop, so wait() returns at once.
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
    for n in &names {
        assert!(!netns_exists(n), "{n} still exists");
    }
}

#[test]
fn link_between_plain_namespaces() {
    if !root_or_skip("link_between_plain_namespaces") {
        return;
    }
    let a = Netns::new().unwrap();
    let b = Netns::new().unwrap();
    link(
        &a,
        "va",
        &["10.9.0.1/24", "fd09::1/64"],
        &b,
        "vb",
        &["10.9.0.2/24", "fd09::2/64"],
    )
    .unwrap();
    let _s = serve(&b, "b", 7000, &[Proto::Udp], ServeMode::Name).unwrap();
    // Right after linking, IPv6 works at once (no DAD or carrier delay).
    let t0 = Instant::now();
    let reply = udp_request(&a, "[fd09::2]:7000".parse().unwrap(), T).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(reply, "b");
    // Second server on the same port and protocol fails with context.
    let err = serve(&b, "b2", 7000, &[Proto::Udp], ServeMode::Name).unwrap_err();
    assert!(format!("{err:#}").contains("7000"), "{err:#}");
}

#[test]
fn parallel_topologies() {
    if !root_or_skip("parallel_topologies") {
        return;
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let topo = Topology::new(2).unwrap();
                    let _servers = topo.serve_all(PORT).unwrap();
                    // Ask right away, over IPv6, from both clients: the
                    // topology must be usable as soon as new() returns.
                    for (i, be) in topo.backends.iter().enumerate() {
                        let addr = SocketAddr::new(be.ipv6.into(), PORT);
                        let short = Duration::from_millis(500);
                        assert_eq!(udp_request(&topo.client, addr, short).unwrap(), be.name);
                        assert_eq!(
                            tcp_request(&topo.pod_client, addr, short).unwrap(),
                            format!("be{i}")
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
}
