//! ipvs mode with real traffic, inside a small VM: this host's kernel may have no IPVS,
//! so the test boots Debian's kernel (`linux-image-amd64`) under qemu (TCG, no KVM
//! needed) with an initramfs holding our binary, `ip`, `nft`, busybox and the IPVS
//! modules; the proxy runs with a `PATH` holding only the tools ipvs mode still runs
//! (`testkit::MODE_TOOLS`), so `kube-ipvs0` is made without `ip`.
//! `tests/ipvs-vm/init.sh` runs the scenario inside the VM and prints
//! `IPVS-TEST PASS|FAIL name` lines; this test checks them and shows the console on
//! failure. Everything is bounded by `timeout`. About 15 s on 2 cores.

use std::path::Path;
use std::process::{Command, Stdio};

const EXPECTED: &[&str] = &[
    "clusterip",
    "nodeport",
    "ipv6-programmed",
    "clusterip-v6",
    "affinity",
    "scheduler",
    "persistence",
    "drain-weight-zero",
    "drain-delete-idle",
    "drain-keeps-busy",
    "drain-new-connections",
    "incremental",
    "cleanup",
];

/// Why the VM cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    for tool in [
        "qemu-system-x86_64",
        "strip",
        "cpio",
        "gzip",
        "modprobe",
        "timeout",
        "nft",
        "ip",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("needs {tool}"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("needs busybox-static".into());
    }
    let has_kernel = std::fs::read_dir("/boot").is_ok_and(|dir| {
        dir.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-").is_some_and(|v| {
                Path::new("/lib/modules")
                    .join(v)
                    .join("kernel/net/netfilter/ipvs")
                    .exists()
                    // Debian's kernel images are readable by root only.
                    && std::fs::File::open(e.path()).is_ok()
            })
        })
    });
    if !has_kernel {
        return Some("needs linux-image-amd64 (a readable kernel with IPVS modules)".into());
    }
    None
}

#[test]
fn ipvs_mode_in_a_vm() {
    if let Some(why) = missing_tools() {
        let ci = std::env::var("CI").unwrap_or_default();
        if ci.eq_ignore_ascii_case("true") || ci == "1" {
            panic!("ipvs_mode_in_a_vm: {why}, and CI={ci} forbids skipping");
        }
        eprintln!("SKIPPED: ipvs_mode_in_a_vm: {why}");
        return;
    }
    let work = tempfile::tempdir().expect("temp dir");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/ipvs-vm/build-initramfs.sh"
    );
    let tools = testkit::mode_tools("ipvs", testkit::Tools::Needed).expect("ipvs tools");
    let built = Command::new("timeout")
        .arg("120")
        .arg(script)
        .arg(work.path())
        .arg(env!("CARGO_BIN_EXE_kube-proxy"))
        .arg(tools.join(" "))
        .output()
        .expect("run build-initramfs.sh");
    assert!(
        built.status.success(),
        "building the initramfs failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let kernel = String::from_utf8_lossy(&built.stdout).trim().to_string();
    let initrd = work.path().join("initramfs.gz");

    let started = std::time::Instant::now();
    let run = Command::new("timeout")
        .args(["-k", "5", "180", "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-m", "512", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-kernel", &kernel, "-initrd"])
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("run qemu");
    let console = String::from_utf8_lossy(&run.stdout).into_owned();
    let results: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("IPVS-TEST ").map(|(_, r)| r.trim()))
        .collect();
    let failed: Vec<&&str> = results.iter().filter(|r| r.starts_with("FAIL")).collect();
    let missing: Vec<&&str> = EXPECTED
        .iter()
        .filter(|name| !results.contains(&format!("PASS {name}").as_str()))
        .collect();
    assert!(
        failed.is_empty() && missing.is_empty() && results.contains(&"DONE"),
        "VM test failed (exit {:?}, {:?}): failed {failed:?}, missing {missing:?}\n--- console\n{console}\n--- stderr\n{}",
        run.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("ipvs VM test passed in {:?}", started.elapsed());
}
