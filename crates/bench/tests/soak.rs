//! The soak's short form (`bench soak` at 1,000 Services, 4 s per phase): real traffic
//! through the debug binary while it is restarted, churned and re-synced; nothing may be
//! lost. The full form (10,000 Services) is a benchmark command in the README.

use std::process::Command;

#[test]
fn soak_short_form_loses_nothing() {
    if !testkit::root_or_skip("soak_short_form_loses_nothing") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("soak.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "soak",
            "--services",
            "1000",
            "--endpoints",
            "5",
            "--phase-secs",
            "4",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("read the report")).expect("json");
    assert_eq!(report["failed"], 0, "{stdout}");
    let phases = report["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 6);
    for p in phases {
        assert!(p["tcp_cluster_ip"][0].as_u64() > Some(100), "{p}");
        assert!(p["long_lived_echoes"].as_u64() > Some(100), "{p}");
    }
}
