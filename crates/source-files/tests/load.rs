use std::fs;
use std::path::{Path, PathBuf};

use source_files::{load, LoadReport, ManifestProblem, SourceError, MAX_FILE_BYTES};

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
    - port: 80
      protocol: TCP
";

const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
  - addresses: [10.0.0.1]
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn service(name: &str, namespace: Option<&str>) -> String {
    let ns = namespace
        .map(|ns| format!("  namespace: {ns}\n"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n{ns}spec:\n  ports:\n    - port: 80\n")
}

fn names(report: &LoadReport) -> Vec<String> {
    report
        .objects
        .services
        .iter()
        .map(|s| s.name.to_string())
        .collect()
}

fn only_problem(report: &LoadReport) -> &ManifestProblem {
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    &report.problems[0]
}

#[test]
fn multi_document_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "# leading comment\n---\n{SERVICE}---\n{SLICE}---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  podCIDR: 10.244.0.0/24\n\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n---\n"
    );
    let file = write(dir.path(), "all.yaml", &text);

    let report = load(&file, "node-a").unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.files, 1);
    assert_eq!(names(&report), ["shop/web"]);
    let service = &report.objects.services[0];
    assert_eq!(service.ports[0].port, 80);
    assert_eq!(report.objects.endpoint_slices.len(), 1);
    // Kept as a record: its owner, and no endpoints (the slice lists no ports).
    let slice = &report.objects.endpoint_slices[0];
    assert_eq!(
        slice.owner.as_ref().map(ToString::to_string).as_deref(),
        Some("shop/web")
    );
    assert!(slice.endpoints.is_empty());
    let node = report.objects.node.as_ref().unwrap();
    assert_eq!(node.metadata.name.as_deref(), Some("node-a"));
}

#[test]
fn service_cidrs_of_both_api_versions_and_in_lists() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/16, fd00:96::/108]}
---
apiVersion: networking.k8s.io/v1beta1
kind: ServiceCIDR
metadata: {name: old}
spec: {cidrs: [10.97.0.0/16, not-a-cidr]}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: networking.k8s.io/v1, kind: ServiceCIDR, metadata: {name: listed}, spec: {cidrs: [10.98.0.0/16]}}
---
apiVersion: networking.k8s.io/v2
kind: ServiceCIDR
metadata: {name: future}
spec: {cidrs: [10.99.0.0/16]}
";
    let file = write(dir.path(), "cidrs.yaml", text);
    let report = load(&file, "node-a").unwrap();
    let cidrs: Vec<String> = report
        .objects
        .service_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    // Sorted, as the tracker keeps them.
    assert_eq!(
        cidrs,
        [
            "10.96.0.0/16",
            "10.97.0.0/16",
            "10.98.0.0/16",
            "fd00:96::/108"
        ]
    );
    let problems: Vec<&str> = report.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("\"not-a-cidr\" is not a CIDR"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("networking.k8s.io/v2"),
        "{problems:#?}"
    );
}

#[test]
fn single_file_with_any_extension() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "manifests.txt", SERVICE);
    let report = load(&file, "n").unwrap();
    assert_eq!(names(&report), ["shop/web"]);
}

#[test]
fn directory_reads_manifest_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.yml", &service("second", Some("ns")));
    write(dir.path(), "a.yaml", &service("first", Some("ns")));
    write(
        dir.path(),
        "c.json",
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "third", "namespace": "ns"}}"#,
    );
    // None of these are read: wrong extension, hidden, editor leftovers, subdirectory.
    let bad = "this: is: not: yaml";
    write(dir.path(), "notes.txt", bad);
    write(dir.path(), ".hidden.yaml", bad);
    write(dir.path(), ".#a.yaml", bad);
    write(dir.path(), "a.yaml~", bad);
    write(dir.path(), ".a.yaml.swp", bad);
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write(&dir.path().join("sub.yaml"), "x.yaml", bad);

    let report = load(dir.path(), "n").unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.files, 3);
    assert_eq!(names(&report), ["ns/first", "ns/second", "ns/third"]);
}

#[test]
fn syntax_error_in_middle_document_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    // Document 2 starts at line 9 (its `---`); the unclosed flow sequence is on line 13.
    let text = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [broken\nspec: {{}}\n---\n{}",
        service("one", None),
        service("three", None)
    );
    let file = write(dir.path(), "svc.yaml", &text);
    write(dir.path(), "z-other.yaml", SERVICE);

    let report = load(dir.path(), "n").unwrap();
    assert_eq!(names(&report), ["default/one", "default/three", "shop/web"]);
    let p = only_problem(&report);
    assert_eq!(p.file, file);
    assert_eq!(p.document, 2);
    // The flow sequence runs on until `spec:` on line 13 trips it.
    assert_eq!(p.line, Some(13), "{p}");
}

#[test]
fn type_error_carries_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\n{}",
        service("ok", Some("ns")),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports:\n    - port: banana\n"
    );
    let file = write(dir.path(), "svc.yaml", &text);
    let report = load(&file, "n").unwrap();
    assert_eq!(names(&report), ["ns/ok"]);
    let p = only_problem(&report);
    // service() is 8 lines, `---` is line 9, `port: banana` is line 16.
    assert_eq!(
        (p.document, p.line, p.column),
        (2, Some(16), Some(13)),
        "{p}"
    );
    assert!(p.message.contains("Service"), "{p}");
    assert!(
        p.to_string()
            .starts_with(&format!("{}:16:13: document 2: ", file.display())),
        "{p}"
    );
}

#[test]
fn wrong_or_missing_type_meta_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
---
kind: Service
metadata: {name: no-version}
---
apiVersion: v1
metadata: {name: no-kind}
---
- just
- a list
";
    let file = write(dir.path(), "x.yaml", text);
    let report = load(&file, "n").unwrap();
    assert!(report.objects.services.is_empty());
    assert!(report.objects.endpoint_slices.is_empty());
    let found: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.document, p.line))
        .collect();
    assert_eq!(
        found,
        [(1, Some(1)), (2, Some(5)), (3, Some(8)), (4, Some(11))],
        "{:#?}",
        report.problems
    );
    assert!(report.problems[0]
        .message
        .contains("discovery.k8s.io/v1beta1"));
    assert!(report.problems[1].message.contains("apiVersion"));
    assert!(report.problems[2].message.contains("kind"));
}

#[test]
fn missing_namespace_defaults_and_missing_name_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: ns\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\naddressType: IPv4\nendpoints: []\n",
        service("a", None),
        service("b", Some(""))
    );
    let file = write(dir.path(), "x.yaml", &text);
    let report = load(&file, "n").unwrap();
    assert_eq!(names(&report), ["default/a", "default/b"]);
    assert_eq!(
        report.objects.endpoint_slices[0].namespace.as_ref(),
        "default"
    );
    let p = only_problem(&report);
    assert_eq!(p.document, 3);
    assert!(p.message.contains("metadata.name"), "{p}");
}

#[test]
fn duplicates_first_wins_and_both_places_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // With a cluster IP, so the kept record has ports to tell the two apart.
    let with_ip = |s: String| s.replace("spec:\n", "spec:\n  clusterIP: 10.96.0.1\n");
    let first = write(dir.path(), "a.yaml", &with_ip(service("web", None)));
    let dup = format!(
        "{}---\n{}",
        with_ip(service("web", Some("other"))),
        with_ip(service("web", Some("default")).replace("port: 80", "port: 81"))
    );
    let second = write(dir.path(), "b.yaml", &dup);
    let report = load(dir.path(), "n").unwrap();
    assert_eq!(names(&report), ["default/web", "other/web"]);
    let kept = &report.objects.services[0];
    assert_eq!(kept.ports[0].port, 80);
    let p = only_problem(&report);
    assert_eq!(p.file, second);
    assert_eq!(p.document, 2);
    assert!(p.message.contains("default/web"), "{p}");
    assert!(p.message.contains(&format!("{}:1", first.display())), "{p}");

    // A Service and an EndpointSlice may share a name.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!("{}---\n{}", SERVICE, SLICE.replace("web-1", "web")),
    );
    assert!(load(dir.path(), "n").unwrap().problems.is_empty());
}

#[test]
fn only_this_nodes_node_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str, cidr: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n")
    };
    let text = format!(
        "{}---\n{}---\n{}",
        node("other", "10.0.1.0/24"),
        node("me", "10.0.2.0/24"),
        node("me", "10.0.3.0/24")
    );
    let file = write(dir.path(), "nodes.yaml", &text);

    let report = load(&file, "me").unwrap();
    let node = report.objects.node.as_ref().unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().pod_cidr.as_deref(),
        Some("10.0.2.0/24")
    );
    let p = only_problem(&report);
    assert_eq!(p.document, 3);
    assert!(p.message.contains("duplicate Node"), "{p}");

    let report = load(&file, "nobody").unwrap();
    assert!(report.objects.node.is_none());
    assert!(report.problems.is_empty());
}

#[test]
fn list_items_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
apiVersion: v1
kind: List
metadata: {}
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: a}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: ignored}
    data: {x: y}
  - apiVersion: discovery.k8s.io/v1beta1
    kind: EndpointSlice
    metadata: {name: old}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: a-1}
    addressType: IPv4
    endpoints: []
  - apiVersion: v1
    kind: Node
    metadata: {name: me}
";
    let file = write(dir.path(), "list.yaml", text);
    let report = load(&file, "me").unwrap();
    assert_eq!(names(&report), ["default/a"]);
    assert_eq!(report.objects.endpoint_slices.len(), 1);
    assert!(report.objects.node.is_some());
    let p = only_problem(&report);
    assert_eq!((p.document, p.line), (1, Some(12)), "{p}");
    assert!(p.message.contains("List item 3"), "{p}");
}

#[test]
fn list_with_a_bad_item_is_skipped_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\napiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {{name: a}}\n    spec:\n      ports:\n        - port: banana\n",
        SERVICE
    );
    let file = write(dir.path(), "list.yaml", &text);
    let report = load(&file, "me").unwrap();
    assert_eq!(names(&report), ["shop/web"]);
    let p = only_problem(&report);
    assert_eq!((p.document, p.line), (2, Some(20)), "{p}");
}

#[test]
fn hostile_input_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // Billion laughs: each level references the previous one ten times.
    let mut bomb =
        String::from("apiVersion: v1\nkind: Service\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        let refs = [prev.as_str(); 10].join(", ");
        bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    write(dir.path(), "a-bomb.yaml", &bomb);
    // Deep nesting.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    write(dir.path(), "b-deep.yaml", &deep);
    // Too large: a sparse file, so the test stays cheap.
    let big = fs::File::create(dir.path().join("c-big.yaml")).unwrap();
    big.set_len(MAX_FILE_BYTES + 1).unwrap();
    write(dir.path(), "d-binary.yaml", "\u{0}\u{1}");
    fs::write(dir.path().join("e-latin1.yaml"), b"kind: \xe9\n").unwrap();
    write(dir.path(), "z-ok.yaml", SERVICE);

    let started = std::time::Instant::now();
    let report = load(dir.path(), "n").unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(names(&report), ["shop/web"]);
    let files: Vec<_> = report
        .problems
        .iter()
        .map(|p| p.file.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        files,
        [
            "a-bomb.yaml",
            "b-deep.yaml",
            "c-big.yaml",
            "d-binary.yaml",
            "e-latin1.yaml"
        ],
        "{:#?}",
        report.problems
    );
    assert!(report.problems[2].message.contains("larger than"));
    assert!(report.problems[4].message.contains("UTF-8"));
}

#[test]
fn missing_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(&dir.path().join("nope"), "n").unwrap_err();
    assert!(matches!(err, SourceError::Access { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn empty_directory_and_empty_documents() {
    let dir = tempfile::tempdir().unwrap();
    let report = load(dir.path(), "n").unwrap();
    assert_eq!(report.files, 0);
    assert!(report.objects.services.is_empty());

    write(dir.path(), "empty.yaml", "---\n# nothing\n---\n\n...\n");
    let report = load(dir.path(), "n").unwrap();
    assert_eq!(report.files, 1);
    assert!(report.problems.is_empty());
}

#[test]
fn example_fixture_loads_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
    let report = load(&dir, "node-a").unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.files, 3);
    assert_eq!(names(&report), ["shop/web", "kube-system/dns"]);
    let slices: Vec<_> = report
        .objects
        .endpoint_slices
        .iter()
        .map(|s| &*s.name)
        .collect();
    assert_eq!(slices, ["web-abc12", "dns-xyz"]);
    assert!(report.objects.node.is_some());
}
