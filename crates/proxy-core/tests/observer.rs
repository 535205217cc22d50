//! What the tracker records for metrics and health (change counts, trigger times, node
//! eligibility), and what the runner reports to a `SyncObserver`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Service, ServicePort, ServiceSpec, Taint};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_core::model::ServiceName;
use proxy_core::observer::{ChangeSummary, SyncObserver, SyncReport};
use proxy_core::proxier::{Proxier, ProxierError, SyncOutcome, SyncRequest};
use proxy_core::runner::{self, RunnerConfig};
use proxy_core::source::SourceUpdate;
use proxy_core::status::SyncStatus;
use proxy_core::tracker::{ChangeTracker, LAST_CHANGE_TRIGGER_TIME};
use tokio::sync::{mpsc, watch};

fn service(name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(service: &str, ip: &str, trigger: Option<&str>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-1")),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            annotations: trigger
                .map(|t| BTreeMap::from([(LAST_CHANGE_TRIGGER_TIME.to_string(), t.to_string())])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..EndpointPort::default()
        }]),
        endpoints: vec![Endpoint {
            addresses: vec![ip.into()],
            ..Endpoint::default()
        }],
    }
}

fn rfc3339(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at)
        .expect("timestamp")
        .to_string()
}

#[tokio::test]
async fn tracker_records_trigger_times_after_start_and_counts_changes() {
    let mut t = ChangeTracker::new("node-a");
    let key = ServiceName::new("default", "web");
    t.apply(SourceUpdate::ServiceUpsert(Box::new(service("web"))));
    assert_eq!(t.service_changes_total(), 1);
    assert_eq!(
        t.pending().trigger_times[&key].len(),
        1,
        "Service change: first seen"
    );
    t.take_pending();

    // A trigger time from before the proxy started is ignored (it would measure downtime).
    t.apply(SourceUpdate::EndpointSliceUpsert(Box::new(slice(
        "web",
        "10.0.0.1",
        Some("2020-01-01T00:00:00Z"),
    ))));
    assert_eq!(t.endpoint_changes_total(), 1);
    assert!(!t.pending().trigger_times.contains_key(&key));
    t.take_pending();

    let trigger = SystemTime::now() + Duration::from_secs(1);
    t.apply(SourceUpdate::EndpointSliceUpsert(Box::new(slice(
        "web",
        "10.0.0.2",
        Some(&rfc3339(trigger)),
    ))));
    assert_eq!(t.endpoint_changes_total(), 2);
    let recorded: Vec<_> = t.pending().trigger_times[&key].iter().copied().collect();
    assert_eq!(recorded.len(), 1);
    let diff = recorded[0]
        .duration_since(trigger)
        .unwrap_or_else(|e| e.duration());
    assert!(
        diff < Duration::from_millis(1),
        "{recorded:?} vs {trigger:?}"
    );
}

#[test]
fn node_eligibility_follows_deletion_and_autoscaler_taint() {
    let mut t = ChangeTracker::new("node-a");
    assert!(t.node_eligible(), "unknown node: eligible");
    let node = |taint: Option<&str>, deleting: bool| Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            deletion_timestamp: deleting.then(|| {
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
            }),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: taint.map(|k| {
                vec![Taint {
                    key: k.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        }),
        ..Node::default()
    };
    t.apply(SourceUpdate::Node(Some(Box::new(node(
        Some("other"),
        false,
    )))));
    assert!(t.node_eligible());
    t.apply(SourceUpdate::Node(Some(Box::new(node(
        Some("ToBeDeletedByClusterAutoscaler"),
        false,
    )))));
    assert!(!t.node_eligible());
    t.apply(SourceUpdate::Node(Some(Box::new(node(None, true)))));
    assert!(!t.node_eligible());
    t.apply(SourceUpdate::Node(Some(Box::new(node(None, false)))));
    assert!(t.node_eligible());
}

/// Fails the first `fail` syncs.
struct Flaky {
    fail: usize,
}

impl Proxier for Flaky {
    fn mode(&self) -> &'static str {
        "test"
    }
    fn sync(&mut self, request: &SyncRequest) -> Result<SyncOutcome, ProxierError> {
        if self.fail > 0 {
            self.fail -= 1;
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

#[derive(Default)]
struct Recorder {
    changes: Mutex<Vec<ChangeSummary>>,
    /// (ok, full, programmed trigger times)
    syncs: Mutex<Vec<(bool, bool, usize)>>,
}

impl SyncObserver for Recorder {
    fn changes_applied(&self, c: &ChangeSummary) {
        self.changes.lock().expect("lock").push(c.clone());
    }
    fn sync_finished(&self, r: &SyncReport<'_>) {
        self.syncs.lock().expect("lock").push((
            r.result.is_ok(),
            r.full,
            r.programmed_trigger_times.len(),
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn runner_reports_queued_changes_and_carries_trigger_times_across_failures() {
    let (tx, rx) = mpsc::channel(8);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let recorder = Arc::new(Recorder::default());
    let observer: Arc<dyn SyncObserver> = recorder.clone();
    let task = tokio::spawn(runner::run_observed(
        rx,
        ChangeTracker::new("node-a"),
        Box::new(Flaky { fail: 1 }),
        RunnerConfig::default(),
        Arc::new(SyncStatus::default()),
        stop_rx,
        observer,
    ));
    tx.send(SourceUpdate::ServiceUpsert(Box::new(service("web"))))
        .await
        .expect("send");
    // First sync fails; the retry after 1 s succeeds and programs the carried change.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let syncs = recorder.syncs.lock().expect("lock").clone();
    assert_eq!(syncs[0], (false, true, 0), "{syncs:?}");
    assert_eq!(syncs[1], (true, true, 1), "{syncs:?}");
    let changes = recorder.changes.lock().expect("lock").clone();
    assert!(
        changes[0].queued && changes[0].services_pending == 1,
        "{changes:?}"
    );
    assert_eq!(changes[0].service_changes_total, 1);
    assert!(changes[0].node_eligible);
    drop(tx);
    task.abort();
}
