//! `--init-only`, as root in a fresh network namespace: the real binary sets the
//! conntrack sysctls and the mode's own (`route_localnet` for iptables with localhost
//! NodePorts), exits 0 without any source (no kubeconfig, no manifests), and programs
//! no rules.

use std::path::PathBuf;

use testkit::Netns;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-proxy"))
}

/// A per-namespace sysctl as the namespace sees it.
fn sysctl(ns: &Netns, key: &str) -> String {
    let path = format!("/proc/sys/{key}");
    ns.run(move || std::fs::read_to_string(&path))
        .expect("netns")
        .unwrap_or_else(|e| panic!("reading {key}: {e}"))
        .trim()
        .to_owned()
}

/// Runs `kube-proxy --init-only ARGS` in `ns`; returns (exit code, stderr).
fn init_only(ns: &Netns, args: &[&str]) -> (Option<i32>, String) {
    let bin = binary();
    let out = ns
        .command(bin.to_str().expect("utf-8 path"))
        .arg("--init-only")
        // nf_conntrack_max is global (read-only in a namespace): leave the host's alone.
        .args(["--conntrack-max-per-core=0", "--hostname-override=node-a"])
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kube-proxy");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_rules(ns: &Netns) {
    let nft = ns
        .exec(&["nft", "list", "ruleset"])
        .expect("nft list ruleset");
    assert!(
        nft.trim().is_empty(),
        "nftables rules were programmed:\n{nft}"
    );
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = ns.exec(&[save]).unwrap_or_default();
        assert!(!rules.contains("KUBE-"), "{save} shows rules:\n{rules}");
    }
    let links = ns.exec(&["ip", "-o", "link"]).expect("ip link");
    assert!(!links.contains("kube-ipvs0"), "{links}");
}

fn fresh_namespace(test: &str) -> Option<Netns> {
    if !testkit::root_or_skip(test) {
        return None;
    }
    // The conntrack sysctls exist in a namespace once the module is loaded.
    let _ = std::process::Command::new("modprobe")
        .arg("nf_conntrack")
        .status();
    let ns = Netns::new().expect("netns");
    assert_eq!(sysctl(&ns, "net/ipv4/conf/all/route_localnet"), "0");
    Some(ns)
}

#[test]
fn iptables_init_only_sets_sysctls_and_exits() {
    let Some(ns) = fresh_namespace("iptables_init_only_sets_sysctls_and_exits") else {
        return;
    };
    let (code, stderr) = init_only(
        &ns,
        &[
            "--proxy-mode=iptables",
            "--conntrack-tcp-timeout-established=4321s",
            "--conntrack-udp-timeout=77s",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("--init-only specified"), "{stderr}");
    assert_eq!(sysctl(&ns, "net/ipv4/conf/all/route_localnet"), "1");
    assert_eq!(
        sysctl(&ns, "net/netfilter/nf_conntrack_tcp_timeout_established"),
        "4321"
    );
    assert_eq!(sysctl(&ns, "net/netfilter/nf_conntrack_udp_timeout"), "77");
    assert_no_rules(&ns);
}

#[test]
fn nftables_init_only_needs_no_route_localnet() {
    let Some(ns) = fresh_namespace("nftables_init_only_needs_no_route_localnet") else {
        return;
    };
    let (code, stderr) = init_only(
        &ns,
        &[
            "--proxy-mode=nftables",
            "--conntrack-tcp-timeout-close-wait=1234s",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        sysctl(&ns, "net/netfilter/nf_conntrack_tcp_timeout_close_wait"),
        "1234"
    );
    // nftables mode has no localhost NodePorts, so it leaves route_localnet alone.
    assert_eq!(sysctl(&ns, "net/ipv4/conf/all/route_localnet"), "0");
    assert_no_rules(&ns);
}
