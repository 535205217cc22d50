//! The change tracker and the sync runner, with a paused clock: no sleeps, exact timing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort as ApiServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as ApiEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_core::model::{Protocol, ServiceName, ServicePortName};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};
use proxy_core::runner::{self, RunnerConfig};
use proxy_core::source::{Changes, Objects, ServiceRecord, SliceRecord, SourceUpdate};
use proxy_core::status::SyncStatus;
use proxy_core::tracker::ChangeTracker;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

fn service(name: &str, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            ports: Some(vec![ApiServicePort {
                name: Some("http".into()),
                port: 80,
                ..ApiServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(service: &str, name: &str, ips: &[&str], ready: bool) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..EndpointPort::default()
        }]),
        endpoints: ips
            .iter()
            .map(|ip| ApiEndpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    ..EndpointConditions::default()
                }),
                ..ApiEndpoint::default()
            })
            .collect(),
    }
}

fn port_name(service: &str) -> ServicePortName {
    ServicePortName {
        service: ServiceName::new("default", service),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

#[test]
fn tracker_derives_ports_and_merges_slices() {
    let mut tracker = ChangeTracker::new("node-a");
    let changed = tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[service("web", "10.96.0.10")],
        &[
            slice("web", "web-1", &["10.244.1.2"], true),
            slice("web", "web-2", &["10.244.2.2", "10.244.1.2"], true),
        ],
        None,
        "node-a",
    )));
    assert!(changed);
    let state = tracker.state();
    let eps = state.endpoints_of(&port_name("web"));
    assert_eq!(
        eps.len(),
        2,
        "duplicate endpoint across slices kept once: {eps:?}"
    );
    assert_eq!(state.services[&port_name("web")].port, 80);
    let pending = tracker.take_pending();
    assert!(pending
        .services
        .contains_key(&ServiceName::new("default", "web")));
    assert!(pending
        .endpoints
        .contains_key(&ServiceName::new("default", "web")));

    // The same objects again: nothing changes, nothing pending.
    let again = tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[service("web", "10.96.0.10")],
        &[
            slice("web", "web-1", &["10.244.1.2"], true),
            slice("web", "web-2", &["10.244.2.2", "10.244.1.2"], true),
        ],
        None,
        "node-a",
    )));
    assert!(!again);
    assert!(tracker.pending().is_empty());

    // Deleting one slice is an endpoint change only.
    assert!(tracker.apply(SourceUpdate::EndpointSliceDelete {
        namespace: "default".into(),
        name: "web-2".into(),
    }));
    let pending = tracker.take_pending();
    assert!(pending.services.is_empty());
    assert_eq!(pending.endpoints.len(), 1);
    assert_eq!(tracker.state().endpoints_of(&port_name("web")).len(), 1);
}

fn svc_key(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

fn slice_key(name: &str) -> (String, String) {
    ("default".into(), name.into())
}

#[test]
fn changes_touch_only_the_services_they_name() {
    let mut tracker = ChangeTracker::new("node-a");
    tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[
            service("web", "10.96.0.10"),
            service("db", "10.96.0.11"),
            service("idle", "10.96.0.12"),
        ],
        &[
            slice("web", "web-1", &["10.244.1.2"], true),
            slice("web", "web-2", &["10.244.2.2"], true),
            slice("idle", "idle-1", &["10.244.3.2"], true),
        ],
        None,
        "node-a",
    )));
    tracker.take_pending();
    let idle_before = tracker.state().endpoints_of(&port_name("idle")).to_vec();

    // One slice updated, one removed, a Service removed and one added, in one update.
    let changes = Changes {
        services: vec![ServiceRecord::new(&service("api", "10.96.0.13"))],
        removed_services: vec![svc_key("db")],
        slices: vec![SliceRecord::new(
            &slice("web", "web-1", &["10.244.1.9"], true),
            "node-a",
        )],
        removed_slices: vec![slice_key("web-2")],
    };
    assert!(tracker.apply(SourceUpdate::Changes(changes)));
    let state = tracker.state();
    let web: Vec<String> = state
        .endpoints_of(&port_name("web"))
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(web, ["10.244.1.9"]);
    assert!(!state.services.contains_key(&port_name("db")));
    assert!(state.services.contains_key(&port_name("api")));
    assert_eq!(
        state.endpoints_of(&port_name("idle")),
        idle_before.as_slice()
    );
    let pending = tracker.take_pending();
    assert_eq!(
        pending.services.keys().cloned().collect::<Vec<_>>(),
        [svc_key("api"), svc_key("db")]
    );
    assert_eq!(
        pending.endpoints.keys().cloned().collect::<Vec<_>>(),
        [svc_key("web")]
    );

    // The same records again (a file re-read without a change): nothing to do.
    let same = Changes {
        services: vec![ServiceRecord::new(&service("api", "10.96.0.13"))],
        slices: vec![SliceRecord::new(
            &slice("web", "web-1", &["10.244.1.9"], true),
            "node-a",
        )],
        ..Changes::default()
    };
    assert!(!tracker.apply(SourceUpdate::Changes(same)));
    assert!(tracker.pending().is_empty());

    // Removing what is not there changes nothing either.
    let absent = Changes {
        removed_services: vec![svc_key("nope")],
        removed_slices: vec![slice_key("nope-1")],
        ..Changes::default()
    };
    assert!(!tracker.apply(SourceUpdate::Changes(absent)));
    assert!(tracker.pending().is_empty());
}

#[test]
fn changes_move_a_slice_between_services_and_keep_what_is_both_removed_and_upserted() {
    let mut tracker = ChangeTracker::new("node-a");
    tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[service("web", "10.96.0.10"), service("db", "10.96.0.11")],
        &[slice("web", "shared-1", &["10.244.1.2"], true)],
        None,
        "node-a",
    )));
    tracker.take_pending();

    // The slice's service-name label now names db: both Services are re-derived.
    let moved = Changes {
        slices: vec![SliceRecord::new(
            &slice("db", "shared-1", &["10.244.1.2"], true),
            "node-a",
        )],
        ..Changes::default()
    };
    assert!(tracker.apply(SourceUpdate::Changes(moved)));
    let state = tracker.state();
    assert!(state.endpoints_of(&port_name("web")).is_empty());
    assert_eq!(state.endpoints_of(&port_name("db")).len(), 1);
    let pending = tracker.take_pending();
    assert_eq!(
        pending.endpoints.keys().cloned().collect::<Vec<_>>(),
        [svc_key("db"), svc_key("web")]
    );

    // Removed and upserted in the same update: the upsert wins.
    let both = Changes {
        services: vec![ServiceRecord::new(&service("db", "10.96.0.21"))],
        removed_services: vec![svc_key("db")],
        slices: vec![SliceRecord::new(
            &slice("db", "shared-1", &["10.244.1.3"], true),
            "node-a",
        )],
        removed_slices: vec![slice_key("shared-1")],
    };
    assert!(tracker.apply(SourceUpdate::Changes(both)));
    let state = tracker.state();
    assert_eq!(
        state.services[&port_name("db")].cluster_ips[0].to_string(),
        "10.96.0.21"
    );
    assert_eq!(
        state.endpoints_of(&port_name("db"))[0].ip.to_string(),
        "10.244.1.3"
    );
}

#[test]
fn invalid_service_is_dropped_without_touching_others() {
    let mut tracker = ChangeTracker::new("node-a");
    let mut bad = service("bad", "10.96.0.300");
    bad.metadata.name = Some("bad".into());
    tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[service("web", "10.96.0.10"), bad],
        &[],
        None,
        "node-a",
    )));
    let state = tracker.state();
    assert!(state.services.contains_key(&port_name("web")));
    assert_eq!(state.services.len(), 1);
}

#[test]
fn not_ready_endpoints_fall_back_to_serving_terminating() {
    let mut tracker = ChangeTracker::new("node-a");
    let mut terminating = slice("web", "web-1", &["10.244.1.2"], false);
    terminating.endpoints[0].conditions = Some(EndpointConditions {
        ready: Some(false),
        serving: Some(true),
        terminating: Some(true),
    });
    tracker.apply(SourceUpdate::Replace(Objects::from_raw(
        &[service("web", "10.96.0.10")],
        &[terminating, slice("web", "web-2", &["10.244.2.2"], false)],
        None,
        "node-a",
    )));
    let state = tracker.state();
    let port = &state.services[&port_name("web")];
    let selection = proxy_core::select::select(
        port,
        state.endpoints_of(&port_name("web")),
        proxy_core::model::IpFamily::V4,
        &state.node,
    );
    let usable: Vec<_> = selection.cluster.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(usable, vec!["10.244.1.2"]);
}

/// A backend that records each request and can be told to fail.
#[derive(Clone, Default)]
struct FakeProxier {
    log: Arc<Mutex<Vec<(Instant, SyncRequest)>>>,
    fail: Arc<Mutex<usize>>,
    /// Times `prepare` ran, and what that count was at each sync.
    prepared: Arc<Mutex<usize>>,
    prepared_at_sync: Arc<Mutex<Vec<usize>>>,
}

impl Proxier for FakeProxier {
    fn mode(&self) -> &'static str {
        "fake"
    }
    fn prepare(&mut self) {
        *self.prepared.lock().unwrap() += 1;
    }
    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        let prepared = *self.prepared.lock().unwrap();
        self.prepared_at_sync.lock().unwrap().push(prepared);
        self.log
            .lock()
            .unwrap()
            .push((Instant::now(), request.clone()));
        let mut fail = self.fail.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(ProxierError::Other("injected".into()));
        }
        Ok(SyncOutcome {
            full: request.full,
            ..SyncOutcome::default()
        })
    }
    fn cleanup(&mut self) -> Result<(), ProxierError> {
        Ok(())
    }
}

struct Harness {
    tx: mpsc::Sender<SourceUpdate>,
    fake: FakeProxier,
    status: Arc<SyncStatus>,
    _shutdown: watch::Sender<bool>,
}

fn start(config: RunnerConfig) -> Harness {
    let (tx, rx) = mpsc::channel(16);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let fake = FakeProxier::default();
    let status = Arc::new(SyncStatus::default());
    tokio::spawn(runner::run(
        rx,
        ChangeTracker::new("node-a"),
        Box::new(fake.clone()),
        config,
        Arc::clone(&status),
        shutdown_rx,
    ));
    Harness {
        tx,
        fake,
        status,
        _shutdown: shutdown_tx,
    }
}

impl Harness {
    fn syncs(&self) -> Vec<(Instant, SyncRequest)> {
        self.fake.log.lock().unwrap().clone()
    }
}

const CONFIG: RunnerConfig = RunnerConfig {
    min_sync_period: Duration::from_secs(1),
    sync_period: Duration::from_secs(30),
    retry_delay: Duration::from_secs(1),
    after_full_sync: None,
};

#[tokio::test(start_paused = true)]
async fn no_sync_before_the_initial_state() {
    let h = start(CONFIG);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        h.syncs().is_empty(),
        "programmed before the source delivered anything"
    );
    h.tx.send(SourceUpdate::Replace(Objects::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 1);
    assert!(syncs[0].1.full);
    // The backend prepared once, before its first sync (while the source listed).
    assert_eq!(*h.fake.prepared_at_sync.lock().unwrap(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn bursts_coalesce_and_min_period_is_honoured() {
    let h = start(CONFIG);
    let t0 = Instant::now();
    h.tx.send(SourceUpdate::Replace(Objects::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // 50 services, one message each, within 100 ms: the first syncs at once (upstream's
    // burst of two), the other 49 in one sync once the budget has a token again.
    for i in 0..50 {
        h.tx.send(SourceUpdate::ServiceUpsert(Box::new(service(
            &format!("s{i}"),
            &format!("10.96.1.{i}"),
        ))))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let syncs = h.syncs();
    assert_eq!(
        syncs.len(),
        3,
        "{:?}",
        syncs.iter().map(|s| s.0 - t0).collect::<Vec<_>>()
    );
    assert!(syncs[1].0 - syncs[0].0 < Duration::from_millis(20));
    assert!(
        !syncs[1].1.full,
        "a change after a full sync is incremental"
    );
    assert_eq!(syncs[1].1.changed.len(), 1);
    // Two tokens spent at once: the third sync waits until one is back.
    assert!(syncs[2].0 - syncs[0].0 >= Duration::from_secs(1));
    assert_eq!(syncs[2].1.changed.len(), 49);
    assert_eq!(syncs[2].1.state.services.len(), 50);
}

#[tokio::test(start_paused = true)]
async fn a_service_and_its_slice_arriving_together_both_sync_at_once() {
    let h = start(CONFIG);
    h.tx.send(SourceUpdate::Replace(Objects::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = Instant::now();
    h.tx.send(SourceUpdate::ServiceUpsert(Box::new(service(
        "web",
        "10.96.0.10",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(13)).await;
    h.tx.send(SourceUpdate::EndpointSliceUpsert(Box::new(slice(
        "web",
        "web-1",
        &["10.244.1.2"],
        true,
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 3, "initial, Service, slice");
    assert!(syncs[2].0 - before < Duration::from_millis(15));
    assert_eq!(syncs[2].1.state.endpoints.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_isolated_change_syncs_at_once() {
    let h = start(CONFIG);
    h.tx.send(SourceUpdate::Replace(Objects::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = Instant::now();
    h.tx.send(SourceUpdate::ServiceUpsert(Box::new(service(
        "web",
        "10.96.0.10",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 2);
    assert!(syncs[1].0 - before < Duration::from_millis(1));
}

#[tokio::test(start_paused = true)]
async fn periodic_full_sync_and_retry_with_backoff() {
    let h = start(CONFIG);
    *h.fake.fail.lock().unwrap() = 3;
    h.tx.send(SourceUpdate::Replace(Objects::default()))
        .await
        .unwrap();
    // Fails at 0 s, retries at +1 s, +2 s (doubling), then succeeds at +4 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 4, "three failures then a success");
    let gaps: Vec<u64> = syncs
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs())
        .collect();
    assert_eq!(gaps, vec![1, 2, 4]);
    assert!(syncs.iter().all(|s| s.1.full), "every retry is a full sync");
    assert!(
        syncs.iter().all(|s| !s.1.periodic),
        "a first sync and retries rewrite; they are not the periodic check"
    );
    assert_eq!(h.status.snapshot().failed_syncs, 3);
    assert!(h.status.snapshot().initial_sync_done);
    // Nothing changes: the next sync is the periodic full one, a sync period later.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 5);
    assert!(syncs[4].1.full);
    assert!(syncs[4].1.periodic, "the timer's sync may only check");
    assert_eq!((syncs[4].0 - syncs[3].0).as_secs(), 30);
}

/// A sync with nothing new hands on the very state the last successful sync programmed,
/// so observers and conntrack cleaning see at once that nothing changed; a change gives
/// a new state.
#[tokio::test(start_paused = true)]
async fn a_sync_with_nothing_new_hands_on_the_programmed_state() {
    let h = start(CONFIG);
    h.tx.send(SourceUpdate::ServiceUpsert(Box::new(service(
        "web",
        "10.96.0.10",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 2, "the first and the periodic sync");
    assert!(syncs[1].1.periodic);
    assert!(Arc::ptr_eq(&syncs[0].1.state, &syncs[1].1.state));
    h.tx.send(SourceUpdate::ServiceUpsert(Box::new(service(
        "api",
        "10.96.0.11",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let syncs = h.syncs();
    assert_eq!(syncs.len(), 3);
    assert!(!Arc::ptr_eq(&syncs[1].1.state, &syncs[2].1.state));
    assert_eq!(syncs[2].1.state.services.len(), 2);
    assert_eq!(
        syncs[0].1.state.services.len(),
        1,
        "what was programmed stays as it was"
    );
}
