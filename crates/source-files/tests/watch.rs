//! The watching source: a first `Replace`, then only what changed, woken by inotify.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proxy_core::source::{Changes, Objects, SourceUpdate};
use source_files::{watch, SourceError, WatchConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Long enough that only inotify can explain a prompt reaction.
const NEVER: Duration = Duration::from_secs(3600);

/// Inotify with timers that never fire during a test (not even the polling that replaces
/// inotify when it fails).
fn inotify_only() -> WatchConfig {
    WatchConfig {
        resync_interval: NEVER,
        poll_interval: NEVER,
        path_check_interval: NEVER,
        ..WatchConfig::default()
    }
}

fn polling() -> WatchConfig {
    WatchConfig {
        inotify: false,
        poll_interval: Duration::from_millis(20),
        ..WatchConfig::default()
    }
}

fn service(name: &str, port: u16) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n    - port: {port}\n")
}

fn slice(name: &str, service: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n  - addresses: [10.0.0.1]\n"
    )
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// Writes aside, then renames into place, as tools that update files atomically do.
fn replace(path: &Path, text: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let aside = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&aside, text).unwrap();
    fs::rename(&aside, path).unwrap();
}

fn start(
    path: &Path,
    config: WatchConfig,
) -> (
    mpsc::Receiver<SourceUpdate>,
    JoinHandle<Result<(), SourceError>>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(watch(path.to_owned(), "node-a".into(), config, tx));
    (rx, task)
}

async fn recv(rx: &mut mpsc::Receiver<SourceUpdate>) -> SourceUpdate {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(update)) => update,
        other => panic!("expected an update, got {other:?}"),
    }
}

async fn replace_update(rx: &mut mpsc::Receiver<SourceUpdate>) -> Objects {
    match recv(rx).await {
        SourceUpdate::Replace(objects) => objects,
        other => panic!("expected a Replace, got {other:?}"),
    }
}

async fn changes(rx: &mut mpsc::Receiver<SourceUpdate>) -> Changes {
    match recv(rx).await {
        SourceUpdate::Changes(changes) => changes,
        other => panic!("expected Changes, got {other:?}"),
    }
}

/// Waits a while and checks nothing was sent.
async fn assert_quiet(rx: &mut mpsc::Receiver<SourceUpdate>) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(update) = rx.try_recv() {
        panic!("unexpected update: {update:?}");
    }
}

fn names(objects: &Objects) -> Vec<&str> {
    objects.services.iter().map(|s| &*s.name.name).collect()
}

/// Names and ports of the upserted Services, names of the removed ones, names of the
/// upserted and removed slices.
type Summary = (Vec<(String, u16)>, Vec<String>, Vec<String>, Vec<String>);

fn summary(c: &Changes) -> Summary {
    (
        c.services
            .iter()
            .map(|s| {
                (
                    s.name.name.to_string(),
                    s.ports.first().map_or(0, |p| p.port),
                )
            })
            .collect(),
        c.removed_services
            .iter()
            .map(|s| s.name.to_string())
            .collect(),
        c.slices.iter().map(|s| s.name.to_string()).collect(),
        c.removed_slices.iter().map(|(_, n)| n.clone()).collect(),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The Services (name → first port) the updates so far amount to.
#[derive(Debug, Default)]
struct Model(BTreeMap<String, u16>);

impl Model {
    fn apply(&mut self, update: SourceUpdate) {
        let port = |r: &proxy_core::source::ServiceRecord| r.ports.first().map_or(0, |p| p.port);
        match update {
            SourceUpdate::Replace(objects) => {
                self.0 = objects
                    .services
                    .iter()
                    .map(|r| (r.name.name.to_string(), port(r)))
                    .collect();
            }
            SourceUpdate::Changes(c) => {
                for name in &c.removed_services {
                    self.0.remove(&*name.name);
                }
                for r in &c.services {
                    self.0.insert(r.name.name.to_string(), port(r));
                }
            }
            _ => {}
        }
    }

    /// Applies updates until the Services are `want`.
    async fn until(&mut self, rx: &mut mpsc::Receiver<SourceUpdate>, want: &[(&str, u16)]) {
        let want: BTreeMap<String, u16> = want.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0 != want {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(update)) => self.apply(update),
                _ => panic!("Services are {:?}, want {want:?}", self.0),
            }
        }
    }
}

#[tokio::test]
async fn a_changed_file_sends_only_its_objects_woken_by_inotify() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    fs::write(&a, docs(&[service("a", 80), slice("a-1", "a")])).unwrap();
    fs::write(&b, docs(&[service("b", 80), slice("b-1", "b")])).unwrap();
    let (mut rx, task) = start(dir.path(), inotify_only());

    let first = replace_update(&mut rx).await;
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first.endpoint_slices.len(), 2);
    assert_quiet(&mut rx).await;

    // a's Service changes, its slice goes, a new Service comes: b is not mentioned.
    let started = Instant::now();
    replace(&a, &docs(&[service("a", 81), service("a2", 80)]));
    let c = changes(&mut rx).await;
    let took = started.elapsed();
    assert_eq!(
        summary(&c),
        (
            vec![("a".into(), 81), ("a2".into(), 80)],
            vec![],
            vec![],
            s(&["a-1"])
        )
    );
    // Far below any timer (the safety net is an hour away): inotify woke the source.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert_quiet(&mut rx).await;

    // Written in place (no rename): its close-write event. Its slice's document is the
    // same as before, so the slice is not sent again.
    fs::write(&b, docs(&[service("b", 82), slice("b-1", "b")])).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("b".into(), 82)], vec![], vec![], vec![])
    );

    // A new file: its objects.
    fs::write(dir.path().join("c.yaml"), service("c", 80)).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("c".into(), 80)], vec![], vec![], vec![])
    );

    // A removed file: deletions of its objects, nothing else.
    fs::remove_file(&b).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![], s(&["b"]), vec![], s(&["b-1"]))
    );

    // Renamed away to a name that is not read: the same as removed.
    fs::rename(dir.path().join("c.yaml"), dir.path().join("c.yaml.bak")).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![], s(&["c"]), vec![], vec![])
    );

    // Files that are not manifests, and broken ones, change nothing.
    fs::write(dir.path().join("notes.txt"), "x").unwrap();
    fs::write(dir.path().join(".a.yaml.swp"), "x").unwrap();
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    assert_quiet(&mut rx).await;
    fs::write(dir.path().join("d.yaml"), "kind: [").unwrap();
    assert_quiet(&mut rx).await;

    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

#[tokio::test]
async fn node_and_service_cidrs_follow_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let cidr = |name: &str, range: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: {name}\nspec:\n  cidrs: [{range}]\n")
    };
    let node = |cidr: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  podCIDR: {cidr}\n")
    };
    fs::write(
        dir.path().join("a.yaml"),
        docs(&[cidr("one", "10.96.0.0/16"), node("10.244.1.0/24")]),
    )
    .unwrap();
    fs::write(dir.path().join("b.yaml"), cidr("two", "10.97.0.0/16")).unwrap();
    let (mut rx, _task) = start(dir.path(), inotify_only());
    let first = replace_update(&mut rx).await;
    assert!(first.node.is_some());
    let ranges = |v: &[&str]| {
        v.iter()
            .map(|r| r.parse().unwrap())
            .collect::<Vec<ipnet::IpNet>>()
    };
    assert_eq!(
        first.service_cidrs,
        ranges(&["10.96.0.0/16", "10.97.0.0/16"])
    );

    // One ServiceCIDR changes: all ranges are sent, nothing else.
    replace(&dir.path().join("b.yaml"), &cidr("two", "10.98.0.0/16"));
    match recv(&mut rx).await {
        SourceUpdate::ServiceCidrs(all) => {
            assert_eq!(all, ranges(&["10.96.0.0/16", "10.98.0.0/16"]));
        }
        other => panic!("expected ServiceCidrs, got {other:?}"),
    }
    assert_quiet(&mut rx).await;

    // The file with the Node and the first range goes.
    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let mut node_gone = false;
    let mut cidrs = None;
    while !(node_gone && cidrs.is_some()) {
        match recv(&mut rx).await {
            SourceUpdate::Node(None) => node_gone = true,
            SourceUpdate::ServiceCidrs(all) => cidrs = Some(all),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(cidrs, Some(ranges(&["10.98.0.0/16"])));
}

#[tokio::test]
async fn a_burst_of_renames_is_one_reload() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..50 {
        fs::write(
            dir.path().join(format!("s{i:02}.yaml")),
            service(&format!("s{i:02}"), 80),
        )
        .unwrap();
    }
    let config = WatchConfig {
        coalesce: Duration::from_millis(100),
        ..inotify_only()
    };
    let (mut rx, _task) = start(dir.path(), config);
    assert_eq!(replace_update(&mut rx).await.services.len(), 50);

    for i in 0..50 {
        replace(
            &dir.path().join(format!("s{i:02}.yaml")),
            &service(&format!("s{i:02}"), 81),
        );
    }
    let c = changes(&mut rx).await;
    assert_eq!(c.services.len(), 50, "{:?}", summary(&c));
    assert!(c.services.iter().all(|r| r.ports[0].port == 81));
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn duplicates_first_file_wins_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    fs::write(&a, service("web", 80)).unwrap();
    fs::write(&b, docs(&[service("web", 81), service("x", 80)])).unwrap();
    let (mut rx, _task) = start(dir.path(), inotify_only());
    let first = replace_update(&mut rx).await;
    assert_eq!(names(&first), ["web", "x"]);
    assert_eq!(first.services[0].ports[0].port, 80);

    // The duplicate in b changes: still a duplicate, and x's document is unchanged.
    replace(&b, &docs(&[service("web", 82), service("x", 80)]));
    assert_quiet(&mut rx).await;

    // The first definition goes: b's applies now (b is read again for it, so its other
    // objects are sent too).
    fs::remove_file(&a).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (
            vec![("web".into(), 82), ("x".into(), 80)],
            vec![],
            vec![],
            vec![]
        )
    );

    // An earlier file defines it again: that one wins; when it goes, b's is back.
    let early = dir.path().join("0.yaml");
    fs::write(&early, service("web", 90)).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("web".into(), 90)], vec![], vec![], vec![])
    );
    fs::remove_file(&early).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (
            vec![("web".into(), 82), ("x".into(), 80)],
            vec![],
            vec![],
            vec![]
        )
    );

    // b drops it: no definition is left.
    replace(&b, &service("x", 80));
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("x".into(), 80)], s(&["web"]), vec![], vec![])
    );
}

/// A ConfigMap volume as the kubelet writes it: the files are symlinks through `..data`,
/// which is swapped atomically to a new timestamped directory.
#[tokio::test]
async fn configmap_data_swap_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write_version = |version: &str, files: &[(&str, String)]| {
        let v = d.join(version);
        fs::create_dir(&v).unwrap();
        for (name, text) in files {
            fs::write(v.join(name), text).unwrap();
        }
        // Swap `..data` as the kubelet does: a new link, renamed over the old one.
        std::os::unix::fs::symlink(version, d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    };
    write_version(
        "..2024_01_01_00_00_00.1",
        &[("a.yaml", service("a", 80)), ("b.yaml", service("b", 80))],
    );
    for name in ["a.yaml", "b.yaml"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), d.join(name)).unwrap();
    }
    let (mut rx, _task) = start(d, inotify_only());
    let mut model = Model::default();
    model.apply(recv(&mut rx).await);
    assert_eq!(
        model.0,
        BTreeMap::from([("a".into(), 80), ("b".into(), 80)])
    );

    // a changes, b goes: the new version, then the old one and b's link removed.
    write_version("..2024_01_01_00_00_00.2", &[("a.yaml", service("a", 81))]);
    fs::remove_file(d.join("b.yaml")).unwrap();
    fs::remove_dir_all(d.join("..2024_01_01_00_00_00.1")).unwrap();
    model.until(&mut rx, &[("a", 81)]).await;
    assert_quiet(&mut rx).await;
}

/// Log lines, captured for the whole test binary (the reading happens on blocking threads,
/// so a thread-local subscriber would miss them).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buffer
    }))
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needles: &[&str]) -> usize {
    let logs = logs();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[tokio::test]
async fn a_file_that_turns_unreadable_keeps_its_objects_and_is_reported_once() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    fs::write(&a, service("a", 80)).unwrap();
    fs::write(dir.path().join("b.yaml"), service("b", 80)).unwrap();
    // Rescans every 20 ms, so the unreadable file is tried again many times.
    let config = WatchConfig {
        resync_interval: Duration::from_millis(20),
        ..inotify_only()
    };
    let (mut rx, _task) = start(dir.path(), config);
    assert_eq!(names(&replace_update(&mut rx).await), ["a", "b"]);

    // A file that exists but whose read fails (EIO), even for root: a link to this
    // process's memory, read at address 0.
    let aside = dir.path().join(".a.tmp");
    std::os::unix::fs::symlink("/proc/self/mem", &aside).unwrap();
    fs::rename(&aside, &a).unwrap();
    assert_quiet(&mut rx).await;
    let a_text = a.display().to_string();
    assert_eq!(
        log_lines_with(&[&a_text, "keeping its objects"]),
        1,
        "reported once"
    );

    // Readable again: its new content applies.
    replace(&a, &service("a", 81));
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("a".into(), 81)], vec![], vec![], vec![])
    );

    // A symlink loop: not even its metadata can be read, so a directory listing skips
    // it; still unreadable, not gone.
    std::os::unix::fs::symlink("a.yaml", dir.path().join(".loop.tmp")).unwrap();
    fs::rename(dir.path().join(".loop.tmp"), &a).unwrap();
    assert_quiet(&mut rx).await;
    assert_eq!(log_lines_with(&[&a_text, "keeping its objects"]), 2);
    replace(&a, &service("a", 82));
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("a".into(), 82)], vec![], vec![], vec![])
    );
}

#[tokio::test]
async fn keeps_last_state_while_directory_is_gone() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("manifests");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.yaml"), service("a", 80)).unwrap();
    let config = WatchConfig {
        path_check_interval: Duration::from_millis(20),
        ..inotify_only()
    };
    let (mut rx, _task) = start(&dir, config);
    let mut model = Model::default();
    model.apply(recv(&mut rx).await);

    fs::remove_dir_all(&dir).unwrap();
    assert_quiet(&mut rx).await;

    // Once it is back, its content applies, and it is watched again.
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("b.yaml"), service("b", 80)).unwrap();
    model.until(&mut rx, &[("b", 80)]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    replace(&dir.join("b.yaml"), &service("b", 81));
    model.until(&mut rx, &[("b", 81)]).await;

    // An existing but empty directory is a real, empty state.
    fs::remove_file(dir.join("b.yaml")).unwrap();
    model.until(&mut rx, &[]).await;
}

/// The directory behind a symlink that is swapped (as git-sync publishes a checkout): no
/// event reaches the old directory's watch; the path check finds the new one.
#[tokio::test]
async fn a_symlinked_directory_swapped_is_followed() {
    let root = tempfile::tempdir().unwrap();
    let (v1, v2) = (root.path().join("v1"), root.path().join("v2"));
    fs::create_dir(&v1).unwrap();
    fs::create_dir(&v2).unwrap();
    fs::write(v1.join("a.yaml"), service("a", 80)).unwrap();
    fs::write(v2.join("a.yaml"), service("a", 81)).unwrap();
    let link = root.path().join("current");
    std::os::unix::fs::symlink("v1", &link).unwrap();
    let config = WatchConfig {
        path_check_interval: Duration::from_millis(50),
        ..inotify_only()
    };
    let (mut rx, _task) = start(&link, config);
    let mut model = Model::default();
    model.apply(recv(&mut rx).await);

    std::os::unix::fs::symlink("v2", root.path().join("next")).unwrap();
    fs::rename(root.path().join("next"), &link).unwrap();
    model.until(&mut rx, &[("a", 81)]).await;

    // And the new directory's events arrive.
    fs::write(v2.join("b.yaml"), service("b", 80)).unwrap();
    model.until(&mut rx, &[("a", 81), ("b", 80)]).await;
}

#[tokio::test]
async fn watches_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    fs::write(&file, service("a", 80)).unwrap();
    let (mut rx, _task) = start(&file, inotify_only());
    assert_eq!(names(&replace_update(&mut rx).await), ["a"]);

    // Other files in its directory are none of its business.
    fs::write(dir.path().join("other.yaml"), service("o", 80)).unwrap();
    assert_quiet(&mut rx).await;

    // Replaced by rename, as editors and `kubectl`-style tools do: new inode.
    replace(&file, &docs(&[service("a", 80), service("b", 80)]));
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("b".into(), 80)], vec![], vec![], vec![])
    );

    // Gone: its objects stay.
    fs::remove_file(&file).unwrap();
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn polls_without_inotify() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), service("a", 80)).unwrap();
    let (mut rx, _task) = start(dir.path(), polling());
    assert_eq!(names(&replace_update(&mut rx).await), ["a"]);
    assert_quiet(&mut rx).await;

    // Changed in place with the same size: the stamp still differs (mtime).
    tokio::time::sleep(Duration::from_millis(20)).await;
    fs::write(dir.path().join("a.yaml"), service("a", 81)).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![("a".into(), 81)], vec![], vec![], vec![])
    );
    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert_eq!(
        summary(&changes(&mut rx).await),
        (vec![], s(&["a"]), vec![], vec![])
    );
}

#[tokio::test]
async fn first_load_failure_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel(1);
    let err = watch(dir.path().join("missing"), "n".into(), inotify_only(), tx)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Access { .. }), "{err}");
    assert!(rx.recv().await.is_none());
}
