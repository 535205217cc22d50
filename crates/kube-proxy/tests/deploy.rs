//! The `deploy/` manifests, checked offline (no cluster here):
//!
//! * each document parses into its k8s-openapi type and serializes back to exactly what
//!   the file says, so a misspelled or unknown field fails (k8s-openapi itself ignores
//!   unknown fields; the round trip does not);
//! * the ConfigMap's `config.conf` passes our own strict KubeProxyConfiguration loader;
//! * the DaemonSet has kubeadm's shape and the ClusterRole grants reads only;
//! * with `kubernetes-validate` (PyPI; bundles the Kubernetes OpenAPI schemas, works
//!   offline) installed, every file also validates strictly against the v1.33 schemas.
//!   CI installs it; outside CI a missing validator is reported as SKIPPED.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

const FILES: [&str; 3] = ["rbac.yaml", "configmap.yaml", "daemonset.yaml"];

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).expect("read manifest");
    text.split("\n---\n")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|doc| serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// Parses `doc` as `T` and checks nothing was lost on the way.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).expect("typed parse");
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(
        &back, doc,
        "fields lost in the typed round trip (unknown or misspelled?)"
    );
    typed
}

fn all_documents() -> Vec<Value> {
    FILES.iter().flat_map(|f| documents(f)).collect()
}

#[test]
fn every_document_round_trips_through_its_type() {
    let docs = all_documents();
    assert_eq!(docs.len(), 5);
    for doc in &docs {
        match doc["kind"].as_str() {
            Some("ServiceAccount") => drop(strict::<ServiceAccount>(doc)),
            Some("ClusterRole") => drop(strict::<ClusterRole>(doc)),
            Some("ClusterRoleBinding") => drop(strict::<ClusterRoleBinding>(doc)),
            Some("ConfigMap") => drop(strict::<ConfigMap>(doc)),
            Some("DaemonSet") => drop(strict::<DaemonSet>(doc)),
            other => panic!("unexpected kind {other:?}"),
        }
    }
}

#[test]
fn the_strict_check_catches_a_misspelled_field() {
    let mut doc = documents("daemonset.yaml").remove(0);
    doc["spec"]["template"]["spec"]["hostNetwrk"] = Value::Bool(true);
    let caught = std::panic::catch_unwind(|| drop(strict::<DaemonSet>(&doc)));
    assert!(caught.is_err());
}

#[test]
fn configmap_holds_a_valid_kube_proxy_configuration() {
    let cm: ConfigMap = strict(&documents("configmap.yaml")[0]);
    let conf = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.conf"))
        .expect("config.conf");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.conf");
    std::fs::write(&path, conf).expect("write");
    let config = kube_proxy::options::load_config_file(&path).expect("strict config load");
    assert_eq!(config.mode, kube_proxy::options::ProxyMode::NfTables);
    assert!(
        config.client_connection.kubeconfig.is_empty(),
        "in-cluster expected"
    );
}

#[test]
fn daemonset_is_shaped_like_kubeadms_and_rbac_only_reads() {
    let ds: DaemonSet = strict(&documents("daemonset.yaml")[0]);
    let spec = ds.spec.expect("spec");
    assert_eq!(
        spec.update_strategy.and_then(|u| u.type_).as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-proxy"));
    assert!(pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let container = &pod.containers[0];
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true)
    );
    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for path in ["/run/xtables.lock", "/lib/modules", "/var/lib/kube-proxy"] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }

    let role: ClusterRole = strict(&documents("rbac.yaml")[1]);
    let mut granted = Vec::new();
    for rule in role.rules.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "{verb} on {resource} is more than reading"
                );
                granted.push(format!("{verb} {resource}"));
            }
        }
    }
    for needed in [
        "list services",
        "watch services",
        "list endpointslices",
        "watch endpointslices",
        "get nodes",
        "list nodes",
        "watch nodes",
        "list servicecidrs",
        "watch servicecidrs",
    ] {
        assert!(granted.iter().any(|g| g == needed), "missing {needed}");
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let probe = std::process::Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            !ci,
            "kubernetes-validate is missing and CI forbids skipping"
        );
        eprintln!("SKIPPED: kubernetes-validate not installed (pip install kubernetes-validate)");
        return;
    }
    for file in FILES {
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.33.0"])
            .arg(deploy_dir().join(file))
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
