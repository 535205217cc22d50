//! The real host's `kube-ipvs0` handling (rtnetlink, no `ip` tool) in a network
//! namespace, checked with `ip -j` from outside the code under test. Needs no IPVS.

use std::collections::BTreeSet;
use std::net::IpAddr;

use backend_ipvs::apply::{Host, LinuxHost};
use backend_ipvs::plan::DUMMY_INTERFACE;
use testkit::Netns;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// `(address, prefix length)` on `kube-ipvs0` as `ip -j addr` reports them.
fn addresses_seen_by_ip(ns: &Netns) -> BTreeSet<(IpAddr, u64)> {
    let text = ns
        .exec(&["ip", "-j", "addr", "show", "dev", DUMMY_INTERFACE])
        .expect("ip addr show");
    let json: serde_json::Value = serde_json::from_str(&text).expect("ip -j output");
    json.as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|info| {
            (
                ip(info["local"].as_str().expect("local")),
                info["prefixlen"].as_u64().expect("prefixlen"),
            )
        })
        .collect()
}

/// The link's kind as `ip -d -j link` reports it, `None` when there is no such link.
fn link_kind(ns: &Netns) -> Option<String> {
    let text = ns
        .exec(&["ip", "-d", "-j", "link", "show", DUMMY_INTERFACE])
        .ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).expect("ip -j output");
    json[0]["linkinfo"]["info_kind"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn dummy_link_and_its_addresses_over_rtnetlink() {
    if !testkit::root_or_skip("dummy_link_and_its_addresses_over_rtnetlink") {
        return;
    }
    let ns = Netns::new().expect("netns");
    let mut host = LinuxHost::default();
    // Every call runs on a thread inside the namespace (the socket is opened there).
    let mut in_ns =
        |f: &mut (dyn FnMut(&mut LinuxHost) + Send)| ns.run(|| f(&mut host)).expect("run");

    in_ns(&mut |h| {
        assert!(!h.dummy_exists().expect("exists"));
        assert!(h.bound().expect("bound").is_empty());
        let local = h.local_addresses().expect("local");
        assert!(
            local.contains(&ip("127.0.0.1")) && local.contains(&ip("::1")),
            "{local:?}"
        );
        assert!(h.bind(ip("10.96.0.10")).is_err(), "bind without the link");
    });

    // Kernels built without the dummy driver (this test machine's) refuse the kind;
    // there the address handling runs on a veth stand-in, and the ipvs VM test
    // (crates/kube-proxy/tests/ipvs_vm.rs) covers the creation.
    let has_dummy = ns
        .exec(&["ip", "link", "add", "probe0", "type", "dummy"])
        .and_then(|_| ns.exec(&["ip", "link", "del", "probe0"]))
        .is_ok();
    let kind = if has_dummy {
        in_ns(&mut |h| {
            h.ensure_dummy().expect("create");
            h.ensure_dummy().expect("create again: already there");
        });
        "dummy"
    } else {
        eprintln!("no dummy driver in this kernel: kube-ipvs0 is a veth stand-in");
        in_ns(&mut |h| {
            let err = h.ensure_dummy().expect_err("no dummy driver");
            assert!(err.to_string().contains("creating kube-ipvs0"), "{err}");
        });
        ns.exec(&[
            "ip",
            "link",
            "add",
            DUMMY_INTERFACE,
            "type",
            "veth",
            "peer",
            "name",
            "kipvs-peer",
        ])
        .expect("stand-in link");
        in_ns(&mut |h| h.ensure_dummy().expect("already there"));
        "veth"
    };
    in_ns(&mut |h| assert!(h.dummy_exists().expect("exists")));
    assert_eq!(link_kind(&ns).as_deref(), Some(kind));

    let wanted = [ip("10.96.0.10"), ip("10.96.0.11"), ip("fd00:96::10")];
    in_ns(&mut |h| {
        for addr in wanted {
            h.bind(addr).expect("bind");
        }
        h.bind(wanted[0]).expect("bind again: already there");
        assert_eq!(h.bound().expect("bound"), BTreeSet::from(wanted));
        let local = h.local_addresses().expect("local");
        assert!(wanted.iter().all(|a| !local.contains(a)), "{local:?}");
        assert!(local.contains(&ip("127.0.0.1")), "{local:?}");
    });
    assert_eq!(
        addresses_seen_by_ip(&ns),
        BTreeSet::from([(wanted[0], 32), (wanted[1], 32), (wanted[2], 128)])
    );

    in_ns(&mut |h| {
        h.unbind(wanted[1]).expect("unbind");
        h.unbind(wanted[1]).expect("unbind again: already gone");
        h.unbind(wanted[2]).expect("unbind v6");
        assert_eq!(h.bound().expect("bound"), BTreeSet::from([wanted[0]]));
    });
    assert_eq!(addresses_seen_by_ip(&ns), BTreeSet::from([(wanted[0], 32)]));

    in_ns(&mut |h| {
        h.delete_dummy().expect("delete");
        assert!(!h.dummy_exists().expect("exists"));
        h.delete_dummy().expect("delete again: nothing to do");
        assert!(h.bound().expect("bound").is_empty());
        let err = h.bind(wanted[0]).expect_err("bind without the link");
        assert!(err.to_string().contains(DUMMY_INTERFACE), "{err}");
    });
    assert_eq!(link_kind(&ns), None);
}
