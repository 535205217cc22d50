//! The Kubernetes API source: watches Services and EndpointSlices (with upstream's label
//! selector), this node's Node and the cluster's ServiceCIDRs, and sends `SourceUpdate`s.
//!
//! Built on kube-rs's `watcher` (list in chunks, then watch from the list's
//! resourceVersion; relist on 410 Gone; bookmarks). [`merge`] decides what to send:
//! nothing until all four initial lists are complete, then one `Replace`, then
//! incremental updates; a `Replace` again after each relist. While the API server is
//! unreachable nothing is sent, so the programmed rules stay as they are.

pub mod merge;
pub mod observe;
pub mod ratelimit;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use proxy_core::source::SourceUpdate;
use tokio::sync::mpsc;

use crate::merge::{Input, Merger, LABEL_SELECTOR, SERVICE_FIELD_SELECTOR};
use crate::observe::ObserveLayer;
use crate::ratelimit::RateLimitLayer;
use proxy_core::observer::ApiRequestObserver;

/// How to reach the API server (upstream's `clientConnection` plus `--master`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    /// `--kubeconfig`; with neither this nor `master`, the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: overrides the kubeconfig's server.
    pub master: Option<String>,
    /// `--kube-api-qps`; zero or less: no limit.
    pub qps: f32,
    /// `--kube-api-burst`.
    pub burst: i32,
    /// `--kube-api-content-type`; this client speaks JSON whatever it says.
    pub content_type: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig or --master given, and the in-cluster configuration is unusable: {0}"
    )]
    InCluster(#[from] kube::config::InClusterError),
    #[error("--master {value:?} is not a URL: {reason}")]
    Master { value: String, reason: String },
    #[error("building the API client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds the client: see [`config`]; rate limited by qps and burst; every request is
/// reported to `observer` when given.
pub async fn client(
    conn: &Connection,
    observer: Option<Arc<dyn ApiRequestObserver>>,
) -> Result<Client, Error> {
    let config = config(conn).await?;
    let content_type = conn.content_type.trim();
    if !content_type.is_empty() && content_type != "application/json" {
        tracing::info!(
            content_type,
            "--kube-api-content-type is not supported by this client; using application/json"
        );
    }
    tracing::info!(
        server = %config.cluster_url,
        qps = conn.qps,
        burst = conn.burst,
        "connecting to the Kubernetes API"
    );
    let host = config
        .cluster_url
        .authority()
        .map_or_else(String::new, |a| a.to_string());
    let builder =
        ClientBuilder::try_from(config)?.with_layer(&RateLimitLayer::new(conn.qps, conn.burst));
    let client = match observer {
        Some(observer) => builder
            .with_layer(&ObserveLayer::new(observer, &host))
            .build(),
        None => builder.build(),
    };
    Ok(client)
}

/// The connection as upstream resolves it: the kubeconfig (with `--master` overriding
/// its server), `--master` alone, or the in-cluster service account.
pub async fn config(conn: &Connection) -> Result<Config, Error> {
    let master = match conn.master.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => Some(parse_master(url)?),
    };
    let mut config = match (&conn.kubeconfig, master.clone()) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        (None, Some(url)) => Config::new(url),
        (None, None) => {
            tracing::info!("no --kubeconfig or --master given: using the in-cluster configuration");
            Config::incluster()?
        }
    };
    if let Some(url) = master {
        config.cluster_url = url;
    }
    // Fail fast on a dead address; the watcher's backoff does the waiting.
    config.connect_timeout = Some(Duration::from_secs(10));
    Ok(config)
}

fn parse_master(url: &str) -> Result<http::Uri, Error> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| Error::Master {
            value: url.to_string(),
            reason: e.to_string(),
        })?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(Error::Master {
            value: url.to_string(),
            reason: "expected scheme://host[:port]".into(),
        });
    }
    Ok(uri)
}

/// What the health endpoints want to know about the source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceSnapshot {
    /// Services, EndpointSlices and the Node have all been listed and sent.
    pub initial_sync_done: bool,
    /// When the API server last answered successfully (a list completed or a watch event).
    pub last_success: Option<SystemTime>,
    /// The last error from the API server, cleared by the next success.
    pub last_error: Option<String>,
}

/// Shared status of the source; cheap to read.
#[derive(Debug, Default)]
pub struct SourceStatus {
    inner: Mutex<SourceSnapshot>,
}

impl SourceStatus {
    pub fn snapshot(&self) -> SourceSnapshot {
        self.lock().clone()
    }

    fn success(&self, initial_sync_done: bool) {
        let mut s = self.lock();
        s.initial_sync_done |= initial_sync_done;
        s.last_success = Some(SystemTime::now());
        s.last_error = None;
    }

    fn failure(&self, error: String) {
        self.lock().last_error = Some(error);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SourceSnapshot> {
        // Plain copyable fields: a panic elsewhere cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Exponential backoff with jitter between failed API calls: 0.5–1 s, 1–2 s, … up to
/// 5–10 s; reset by the next success. The jitter keeps a fleet of proxies from hitting a
/// recovering API server in step.
#[derive(Debug, Clone)]
pub struct JitteredBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Default for JitteredBackoff {
    fn default() -> Self {
        JitteredBackoff::new(Duration::from_secs(1), Duration::from_secs(10))
    }
}

impl JitteredBackoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        JitteredBackoff {
            initial,
            max,
            next: initial,
        }
    }
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let nominal = self.next.min(self.max);
        self.next = nominal.saturating_mul(2);
        // Half fixed, half random: never less than half the nominal delay.
        let half = nominal / 2;
        Some(half + half.mul_f64(rand::random_range(0.0..=1.0)))
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Runs the watches until `updates` is closed. Never returns an error for the API
/// server's failures: they are logged and retried with backoff.
pub async fn watch(
    client: Client,
    node_name: String,
    updates: mpsc::Sender<SourceUpdate>,
    status: std::sync::Arc<SourceStatus>,
) {
    // Lists as client-go's reflectors get them: `resourceVersion=0`, which the API server
    // answers from its watch cache in one response (it ignores client-go's `limit=500`
    // there), without a consistent read of etcd; then a watch from that version. No page
    // size: kube-rs would drop `resourceVersion=0` for one. At 10,000 Services the
    // consistent paged reads took ~42 requests and 7 s behind the client-side rate limit.
    let from_cache = |config: watcher::Config| watcher::Config {
        page_size: None,
        ..config.list_semantic(watcher::ListSemantic::Any)
    };
    let selector = from_cache(watcher::Config::default().labels(LABEL_SELECTOR));
    let service_selector = selector.clone().fields(SERVICE_FIELD_SELECTOR);
    let node_selector =
        from_cache(watcher::Config::default().fields(&format!("metadata.name={node_name}")));
    let services = kind_stream(
        "Service",
        watcher(Api::<Service>::all(client.clone()), service_selector),
        Input::Service,
    );
    let slices = kind_stream(
        "EndpointSlice",
        watcher(Api::<EndpointSlice>::all(client.clone()), selector),
        Input::Slice,
    );
    let nodes = kind_stream(
        "Node",
        watcher(Api::<Node>::all(client.clone()), node_selector),
        Input::Node,
    );
    let service_cidrs = kind_stream(
        SERVICE_CIDR,
        watcher(
            Api::<ServiceCIDR>::all(client),
            from_cache(watcher::Config::default()),
        ),
        Input::ServiceCidr,
    );
    let mut events = futures::stream::select_all([services, slices, nodes, service_cidrs]);
    let mut merger = Merger::new(node_name);
    let mut service_cidrs_reported = false;
    while let Some(item) = events.next().await {
        let input = match item {
            Ok(input) => input,
            Err((SERVICE_CIDR, err)) if resource_unavailable(&err) => {
                // Older servers lack the resource, and an operator's ClusterRole may not
                // grant it: Services still work, only the drop of unallocated Service
                // IPs is missing. The watcher keeps trying, so granting it later works.
                if !service_cidrs_reported {
                    tracing::warn!(error = %err, "cannot list ServiceCIDRs; traffic to unallocated Service IPs will not be dropped");
                    service_cidrs_reported = true;
                } else {
                    tracing::debug!(error = %err, "ServiceCIDRs still unavailable");
                }
                Input::ServiceCidrsUnavailable
            }
            Err((kind, err)) => {
                // The watcher retries by itself after the backoff; the last state stays.
                tracing::warn!(kind, error = %err, "Kubernetes API watch failed; retrying");
                status.failure(format!("{kind}: {err}"));
                continue;
            }
        };
        let relisted = matches!(
            input,
            Input::Service(watcher::Event::InitDone)
                | Input::Slice(watcher::Event::InitDone)
                | Input::Node(watcher::Event::InitDone)
                | Input::ServiceCidr(watcher::Event::InitDone)
        );
        let update = merger.apply(input);
        status.success(merger.initial_sent());
        let Some(update) = update else { continue };
        if relisted {
            if let SourceUpdate::Changes(changes) = &update {
                tracing::info!(
                    services = changes.services.len(),
                    endpoint_slices = changes.slices.len(),
                    removed = changes.removed_services.len() + changes.removed_slices.len(),
                    "relisted from the API"
                );
            }
            if let SourceUpdate::Replace(objects) = &update {
                tracing::info!(
                    services = objects.services.len(),
                    endpoint_slices = objects.endpoint_slices.len(),
                    node = objects.node.is_some(),
                    service_cidrs = objects.service_cidrs.len(),
                    "listed Services, EndpointSlices, Node and ServiceCIDRs from the API"
                );
            }
        }
        if updates.send(update).await.is_err() {
            return; // The proxy is shutting down.
        }
    }
}

type KindItem = Result<Input, (&'static str, watcher::Error)>;

const SERVICE_CIDR: &str = "ServiceCIDR";

/// Whether a list failed because the server has no such resource or will not let us
/// read it (rather than being unreachable).
fn resource_unavailable(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => {
            status.is_not_found() || status.is_forbidden()
        }
        _ => false,
    }
}

/// One kind's watcher, tagged with its kind, pausing after each error.
///
/// Not kube-runtime's `StreamBackoff`: that resets on any success, and the watcher
/// reports `Init` (a success) before every list attempt, so during an outage the delay
/// would never grow. Here only data from the server (a listed object, the end of a list,
/// a watch event) resets it.
fn kind_stream<K, S>(
    kind: &'static str,
    stream: S,
    wrap: fn(watcher::Event<K>) -> Input,
) -> std::pin::Pin<Box<dyn Stream<Item = KindItem> + Send>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    let state = (
        Box::pin(stream),
        JitteredBackoff::default(),
        None::<Duration>,
    );
    futures::stream::unfold(state, move |(mut stream, mut backoff, pause)| async move {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let item = stream.next().await?;
        let pause = match &item {
            Err(_) => backoff.next(),
            Ok(watcher::Event::Init) => None,
            Ok(_) => {
                backoff.reset();
                None
            }
        };
        let item = item.map(wrap).map_err(|e| (kind, e));
        Some((item, (stream, backoff, pause)))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = JitteredBackoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = b.by_ref().take(6).collect();
        let nominal = [1, 2, 4, 8, 8, 8];
        for (d, n) in delays.iter().zip(nominal) {
            let n = Duration::from_secs(n);
            assert!(*d >= n / 2 && *d <= n, "{d:?} outside {:?}..={n:?}", n / 2);
        }
        b.reset();
        assert!(b.next().is_some_and(|d| d <= Duration::from_secs(1)));
        // Jitter: 50 draws are not all equal.
        let mut b = JitteredBackoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let first = b.next();
        assert!((0..50).any(|_| b.next() != first));
    }

    #[test]
    fn master_must_be_a_url() {
        assert!(parse_master("https://10.0.0.1:6443").is_ok());
        assert!(parse_master("http://127.0.0.1:8080").is_ok());
        for bad in ["10.0.0.1:6443", "not a url", "/path"] {
            assert!(
                matches!(parse_master(bad), Err(Error::Master { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn kubeconfig_with_master_override() {
        let dir = std::env::temp_dir().join(format!("source-kube-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n\
             users:\n- name: u\n  user: {}\n",
        )
        .unwrap();
        let conn = Connection {
            kubeconfig: Some(path.clone()),
            qps: 5.0,
            burst: 10,
            ..Connection::default()
        };
        let c = config(&conn).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:1/");
        assert!(client(&conn, None).await.is_ok());
        let conn = Connection {
            master: Some("http://127.0.0.2:8080".into()),
            ..conn
        };
        let c = config(&conn).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.2:8080/");
        let alone = Connection {
            master: Some("http://127.0.0.3:8080".into()),
            ..Connection::default()
        };
        let c = config(&alone).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.3:8080/");
        let missing = Connection {
            kubeconfig: Some(dir.join("absent")),
            ..Connection::default()
        };
        let err = client(&missing, None).await.err().unwrap().to_string();
        assert!(err.contains("absent"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
