//! The redirect tables as the kernel takes them (as root, in network namespaces): loaded
//! by our netlink batch and by `nft -f` of the same ops' text, they list the same.

use std::sync::Arc;

use backend_nftables::apply::{NftCommand, NftRunner};
use backend_userspace::rules::{cleanup_ops, ops, render, Target, TABLE};
use proxy_core::model::{IpFamily, Protocol, ServiceName, ServicePort, ServicePortName};

fn port(name: &str, proto: Protocol, node_port: Option<u16>) -> Arc<ServicePort> {
    let mut sp = ServicePort::new(
        ServicePortName {
            service: ServiceName::new("default", name),
            port: "p".into(),
            protocol: proto,
        },
        vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        80,
    );
    sp.node_port = node_port;
    sp.external_ips = vec!["192.168.200.50".parse().unwrap()];
    Arc::new(sp)
}

fn listing(ns: &testkit::Netns) -> String {
    ["ip", "ip6"]
        .iter()
        .map(|f| ns.exec(&["nft", "list", "table", f, TABLE]).unwrap())
        .collect()
}

#[test]
fn netlink_load_lists_as_nft_load() {
    if !testkit::root_or_skip("netlink_load_lists_as_nft_load") {
        return;
    }
    let (web, dns, sctp, gone) = (
        port("web", Protocol::Tcp, Some(30080)),
        port("dns", Protocol::Udp, None),
        port("s", Protocol::Sctp, Some(30090)),
        port("gone", Protocol::Tcp, Some(30070)),
    );
    let ports = [
        (&*web, Target::Redirect(40000)),
        (&*dns, Target::Reject),
        (&*sctp, Target::Redirect(40001)),
        (&*gone, Target::Reject),
    ];
    let families = [IpFamily::V4, IpFamily::V6];

    // `nft` started from a thread in the namespace runs in it.
    let by_nft = testkit::Netns::new().unwrap();
    let script = render(&families, &ports);
    by_nft
        .run(|| NftCommand::default().run(&script))
        .unwrap()
        .unwrap();

    let by_us = testkit::Netns::new().unwrap();
    by_us
        .run(|| {
            let mut runner = NftCommand::default();
            // Twice: the second replaces the first.
            for _ in 0..2 {
                runner.apply_in(TABLE, &ops(&families, &ports)).unwrap();
            }
        })
        .unwrap();
    let want = listing(&by_nft);
    assert!(want.contains("tcp dport 80 redirect to :40000"), "{want}");
    assert!(
        want.contains("tcp dport 30070 reject with tcp reset"),
        "{want}"
    );
    assert!(want.contains("udp dport 80 reject\n"), "{want}");
    assert_eq!(listing(&by_us), want);

    by_us
        .run(|| {
            let mut runner = NftCommand::default();
            runner.apply_in(TABLE, &cleanup_ops()).unwrap();
            runner.apply_in(TABLE, &cleanup_ops()).unwrap();
        })
        .unwrap();
    let tables = by_us.exec(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains(TABLE), "{tables}");
}
