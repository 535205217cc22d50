//! A small Kubernetes API server for tests, over real HTTP/1.1, speaking the protocol
//! kube-rs and client-go speak for Services, EndpointSlices, Nodes and ServiceCIDRs (any
//! other path answers 404 with a Status, as the real server does for unknown resources):
//!
//! * lists: `{"kind":"ServiceList","metadata":{"resourceVersion","continue"},"items":[..]}`,
//!   chunked by `limit` + `continue` (pages are cut from a consistent snapshot at the
//!   list's resourceVersion), `resourceVersionMatch=Exact` honoured; `resourceVersion=0` is
//!   answered whole (the watch cache ignores `limit`);
//! * watches (`?watch=true`): newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":..}`
//!   from a resourceVersion (replayed from the event log), `allowWatchBookmarks`,
//!   `timeoutSeconds`; objects moving out of a selector are sent as DELETED, as the real
//!   server does;
//! * `410 Gone`: a watch or continue token older than the last compaction gets an ERROR
//!   event / a 410 Status; [`FakeApiServer::expire_watches`] ends every open watch that way;
//! * label selectors (`k`, `!k`, `k=v`, `k!=v`) and field selectors (`=`, `==`, `!=`) on
//!   `metadata.name`, `metadata.namespace`, and for Services `spec.clusterIP` and
//!   `spec.type` (others answer 400 `field label not supported`, as the real server);
//! * failures on demand: dropped connections, slow responses, stop and restart on the same
//!   address with the same data.
//!
//! The server runs on its own tokio runtime, so plain (non-async) tests can drive it.
//! Objects are JSON values; the caller builds them.

pub mod selector;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

use crate::selector::{FieldLabel, FieldSelector, LabelSelector, METADATA_FIELDS};

/// The resources this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    ServiceCidrs,
}

impl Resource {
    fn from_kind(kind: &str) -> Option<Resource> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            "ServiceCIDR" => Some(Resource::ServiceCidrs),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
            Resource::ServiceCidrs => "ServiceCIDR",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ServiceCidrs => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Resource::Nodes | Resource::ServiceCidrs)
    }

    /// The field labels the real server accepts in a field selector on this resource
    /// (the ones the proxy's callers use; others are refused as unsupported).
    fn field_labels(self) -> &'static [FieldLabel] {
        const SERVICE_FIELDS: [FieldLabel; 4] = [
            METADATA_FIELDS[0],
            METADATA_FIELDS[1],
            FieldLabel {
                name: "spec.clusterIP",
                pointer: "/spec/clusterIP",
            },
            FieldLabel {
                name: "spec.type",
                pointer: "/spec/type",
            },
        ];
        match self {
            Resource::Services => &SERVICE_FIELDS,
            _ => &METADATA_FIELDS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object has no kind this server serves: {0:?}")]
    UnknownKind(String),
    #[error("object has no metadata.name")]
    NoName,
    #[error("starting the server: {0}")]
    Io(#[from] std::io::Error),
}

type Key = (Resource, String, String);

/// One change, kept so watches can resume from any resourceVersion after it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    resource: Resource,
    key: Key,
    /// The object after the change; None when deleted.
    object: Option<Value>,
    /// The object before the change; None when created.
    previous: Option<Value>,
}

/// An object and its JSON as a list item, serialized once when written: a real API
/// server serves lists from its watch cache, and re-encoding every object for each list
/// made this stand-in use a core for half a second per 10,000 objects, on the cores the
/// proxy being measured runs on.
#[derive(Debug, Clone)]
struct Stored {
    object: Value,
    item: Arc<str>,
}

impl Stored {
    fn new(object: Value) -> Stored {
        // Real lists carry kind and apiVersion on the list only.
        let mut item = object.clone();
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        Stored {
            object,
            item: item.to_string().into(),
        }
    }
}

#[derive(Debug, Default)]
struct Data {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    log: Vec<Change>,
    /// Changes at or below this resourceVersion are gone ("compacted").
    compacted: u64,
}

impl Data {
    /// The objects of `resource` as they were at `rv` (which is not compacted).
    fn snapshot(&self, resource: Resource, rv: u64) -> BTreeMap<Key, Stored> {
        if rv >= self.rv {
            return self
                .objects
                .iter()
                .filter(|(k, _)| k.0 == resource)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let mut out = BTreeMap::new();
        for change in self
            .log
            .iter()
            .take_while(|c| c.rv <= rv)
            .filter(|c| c.resource == resource)
        {
            match &change.object {
                Some(obj) => out.insert(change.key.clone(), Stored::new(obj.clone())),
                None => out.remove(&change.key),
            };
        }
        out
    }
}

/// Knobs for injected failures.
#[derive(Debug, Clone, Default)]
struct Faults {
    delay: Duration,
    /// Resources answered with 403 Forbidden (RBAC without the grant).
    forbidden: Vec<Resource>,
    /// Every request answered 200 with a body that is not JSON (a broken proxy or
    /// server in between).
    garbage: bool,
}

#[derive(Debug)]
struct Shared {
    data: Mutex<Data>,
    faults: Mutex<Faults>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch: `.0` counts drops, `.1` says whether with a 410.
    cut: watch::Sender<(u64, bool)>,
    requests: Mutex<Vec<String>>,
    bookmark_interval: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Test server: a panic in one handler must not wedge the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server: its data survives `stop` and `serve` again.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// Always Some until drop; taken there to shut down without blocking (the owner may be
    /// an async test).
    runtime: Option<tokio::runtime::Runtime>,
    running: Option<(SocketAddr, watch::Sender<bool>)>,
}

impl FakeApiServer {
    /// A server with no objects, not yet listening. Bookmarks go out every second.
    pub fn new() -> Result<Self, Error> {
        Self::with_bookmark_interval(Duration::from_secs(1))
    }

    pub fn with_bookmark_interval(bookmark_interval: Duration) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()?;
        Ok(FakeApiServer {
            shared: Arc::new(Shared {
                data: Mutex::new(Data::default()),
                faults: Mutex::new(Faults::default()),
                changes: broadcast::channel(16_384).0,
                cut: watch::channel((0, false)).0,
                requests: Mutex::new(Vec::new()),
                bookmark_interval,
            }),
            runtime: Some(runtime),
            running: None,
        })
    }

    /// Serves on `listener` (bound by the caller, possibly inside a network namespace)
    /// until `stop`.
    pub fn serve(&mut self, listener: std::net::TcpListener) -> Result<SocketAddr, Error> {
        self.stop();
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let app = Router::new()
            .route("/api/v1/services", get(list_or_watch_services))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(list_or_watch_slices),
            )
            .route("/api/v1/nodes", get(list_or_watch_nodes))
            .route(
                "/apis/networking.k8s.io/v1/servicecidrs",
                get(list_or_watch_service_cidrs),
            )
            .fallback(not_found)
            .with_state(Arc::clone(&self.shared));
        let Some(runtime) = &self.runtime else {
            return Err(Error::Io(std::io::Error::other("server dropped")));
        };
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        runtime.spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(error = %err, "fake API server stopped");
            }
        });
        self.running = Some((addr, stop_tx));
        Ok(addr)
    }

    /// Stops listening and drops every connection (open watches end with a broken
    /// connection, as when the API server dies).
    pub fn stop(&mut self) {
        if let Some((_, stop)) = self.running.take() {
            self.drop_connections();
            let _ = stop.send(true);
            // Graceful shutdown closes idle keep-alive connections; give it a moment so a
            // restart on the same port finds the old listener gone.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|(a, _)| *a)
    }

    /// Creates or replaces an object (`kind`, `metadata.name`, and `metadata.namespace`
    /// for namespaced kinds). Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64, Error> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let resource = Resource::from_kind(&kind).ok_or(Error::UnknownKind(kind))?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or(Error::NoName)?
            .to_string();
        let namespace = if resource.namespaced() {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        object["apiVersion"] = json!(resource.api_version());
        let mut data = lock(&self.shared.data);
        data.rv += 1;
        let rv = data.rv;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            if resource.namespaced() {
                meta.insert("namespace".into(), json!(namespace));
            }
        }
        let key = (resource, namespace, name);
        let previous = data
            .objects
            .insert(key.clone(), Stored::new(object.clone()))
            .map(|s| s.object);
        self.record(
            &mut data,
            Change {
                rv,
                resource,
                key,
                object: Some(object),
                previous,
            },
        );
        Ok(rv)
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(resource) = Resource::from_kind(kind) else {
            return false;
        };
        let namespace = if resource.namespaced() { namespace } else { "" };
        let key = (resource, namespace.to_string(), name.to_string());
        let mut data = lock(&self.shared.data);
        let Some(Stored {
            object: mut previous,
            ..
        }) = data.objects.remove(&key)
        else {
            return false;
        };
        data.rv += 1;
        let rv = data.rv;
        // The DELETED event carries the object at its deletion resourceVersion.
        previous["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut data,
            Change {
                rv,
                resource,
                key,
                object: None,
                previous: Some(previous),
            },
        );
        true
    }

    fn record(&self, data: &mut Data, change: Change) {
        data.log.push(change.clone());
        // Sent under the data lock, so a watch that subscribes under it sees every change
        // either in the log or on the channel, never in neither.
        let _ = self.shared.changes.send(change);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.data).rv
    }

    /// Forgets history: watches and continue tokens from before now get 410 Gone.
    pub fn compact(&self) {
        let mut data = lock(&self.shared.data);
        data.compacted = data.rv;
    }

    /// Compacts, then ends every open watch with an ERROR event carrying a 410 Status,
    /// as the API server does when a watcher falls behind compaction. Clients must relist.
    pub fn expire_watches(&self) {
        self.compact();
        self.shared.cut.send_modify(|(n, gone)| {
            *n += 1;
            *gone = true;
        });
    }

    /// Breaks every open watch connection mid-stream (no final event).
    pub fn drop_connections(&self) {
        self.shared.cut.send_modify(|(n, gone)| {
            *n += 1;
            *gone = false;
        });
    }

    /// Delays every response by `delay` (a slow API server).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.faults).delay = delay;
    }

    /// Answers every request with 200 and a body that is not JSON while `on`.
    pub fn set_garbage(&self, on: bool) {
        lock(&self.shared.faults).garbage = on;
    }

    /// Answers every request for objects of `kind` with 403 Forbidden, as the real server
    /// does when the client's role lacks the grant; `false` lifts it.
    pub fn set_forbidden(&self, kind: &str, forbidden: bool) {
        let Some(resource) = Resource::from_kind(kind) else {
            return;
        };
        let mut faults = lock(&self.shared.faults);
        faults.forbidden.retain(|r| *r != resource);
        if forbidden {
            faults.forbidden.push(resource);
        }
    }

    /// Every request so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    limit: Option<u64>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    allow_watch_bookmarks: Option<String>,
    timeout_seconds: Option<u64>,
}

async fn list_or_watch_services(
    State(s): State<Arc<Shared>>,
    q: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Response {
    handle(s, Resource::Services, q, uri).await
}

async fn list_or_watch_slices(
    State(s): State<Arc<Shared>>,
    q: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Response {
    handle(s, Resource::EndpointSlices, q, uri).await
}

async fn list_or_watch_nodes(
    State(s): State<Arc<Shared>>,
    q: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Response {
    handle(s, Resource::Nodes, q, uri).await
}

async fn list_or_watch_service_cidrs(
    State(s): State<Arc<Shared>>,
    q: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Response {
    handle(s, Resource::ServiceCidrs, q, uri).await
}

async fn not_found(uri: axum::http::Uri) -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!(
            "the server could not find the requested resource ({})",
            uri.path()
        ),
    )
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        status(code, reason, message).to_string(),
    )
        .into_response()
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1"))
}

async fn handle(
    shared: Arc<Shared>,
    resource: Resource,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Response {
    lock(&shared.requests).push(uri.to_string());
    let (delay, forbidden, garbage) = {
        let faults = lock(&shared.faults);
        (
            faults.delay,
            faults.forbidden.contains(&resource),
            faults.garbage,
        )
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if garbage {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html>\u{0}{\"kind\": 42, garbage",
        )
            .into_response();
    }
    if forbidden {
        return status_response(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("{} is forbidden for this user", resource.kind()),
        );
    }
    let Ok(Query(params)) = query else {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "bad query");
    };
    let labels = match LabelSelector::parse(params.label_selector.as_deref().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let field_text = params.field_selector.as_deref().unwrap_or("");
    let fields = match FieldSelector::parse(field_text, resource.field_labels()) {
        Ok(s) => s,
        Err(e) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let filter = Filter { labels, fields };
    if truthy(&params.watch) {
        watch_response(shared, resource, params, filter)
    } else {
        list_response(&shared, resource, &params, &filter)
    }
}

#[derive(Debug, Clone)]
struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

fn parse_rv(text: Option<&str>) -> Result<Option<u64>, Box<Response>> {
    match text {
        None | Some("") | Some("0") => Ok(None),
        Some(t) => t.parse().map(Some).map_err(|_| {
            Box::new(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid resourceVersion {t:?}"),
            ))
        }),
    }
}

fn list_response(shared: &Shared, resource: Resource, p: &Params, filter: &Filter) -> Response {
    let data = lock(&shared.data);
    // A continue token is "<rv>|<namespace>|<name>": the snapshot and where the last page ended.
    let (rv, after) = match p.continue_.as_deref().filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            let (Some(rv), Some(ns), Some(name)) = (
                parts.next().and_then(|r| r.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) else {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue");
            };
            if rv < data.compacted {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                );
            }
            (rv, Some((resource, ns.to_string(), name.to_string())))
        }
        None => {
            let requested = match parse_rv(p.resource_version.as_deref()) {
                Ok(rv) => rv,
                Err(resp) => return *resp,
            };
            match (requested, p.resource_version_match.as_deref()) {
                (Some(rv), Some("Exact")) if rv < data.compacted || rv > data.rv => {
                    return status_response(
                        StatusCode::GONE,
                        "Expired",
                        &format!("too old resource version: {rv} ({})", data.compacted),
                    );
                }
                (Some(rv), Some("Exact")) => (rv, None),
                // NotOlderThan / unset / "0": the latest state is never older.
                _ => (data.rv, None),
            }
        }
    };
    // `resourceVersion=0` without `Exact` is served from the real server's watch cache,
    // which ignores `limit`: the whole list comes in one response.
    let from_cache = after.is_none()
        && p.resource_version.as_deref() == Some("0")
        && p.resource_version_match.as_deref() != Some("Exact");
    let limit = p
        .limit
        .filter(|l| *l > 0 && !from_cache)
        .unwrap_or(u64::MAX);
    let (items, last, more) = if rv >= data.rv {
        // The current state: walk this resource's objects from where the last page ended,
        // under the lock, copying only the page (not every object for every page).
        let from = after
            .clone()
            .unwrap_or((resource, String::new(), String::new()));
        let objects = data
            .objects
            .range(from..)
            .take_while(|(k, _)| k.0 == resource);
        page(objects, after.as_ref(), filter, limit)
    } else {
        let snapshot = data.snapshot(resource, rv);
        drop(data);
        page(snapshot.iter(), after.as_ref(), filter, limit)
    };
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if more {
        if let Some((_, ns, name)) = last {
            metadata["continue"] = json!(format!("{rv}|{ns}|{name}"));
        }
    }
    let head = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
    })
    .to_string();
    // The head's closing brace becomes the items' opening.
    let mut body =
        String::with_capacity(head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 16);
    body.push_str(head.strip_suffix('}').unwrap_or(&head));
    body.push_str(",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// One page of a list: up to `limit` objects after `after` that match `filter`, the key of
/// the last, and whether more follow.
fn page<'a>(
    objects: impl Iterator<Item = (&'a Key, &'a Stored)>,
    after: Option<&Key>,
    filter: &Filter,
    limit: u64,
) -> (Vec<Arc<str>>, Option<Key>, bool) {
    let mut items = Vec::new();
    let mut last = None;
    for (key, stored) in objects {
        if after.is_some_and(|a| key <= a) || !filter.matches(&stored.object) {
            continue;
        }
        if items.len() as u64 == limit {
            return (items, last, true);
        }
        items.push(stored.item.clone());
        last = Some(key.clone());
    }
    (items, last, false)
}

/// The event a watcher with `filter` sees for `change`: objects entering the selector are
/// ADDED, leaving it DELETED.
fn event_for(change: &Change, filter: &Filter) -> Option<Value> {
    let now = change.object.as_ref().filter(|o| filter.matches(o));
    let before = change.previous.as_ref().filter(|o| filter.matches(o));
    let (kind, object) = match (before, now) {
        (None, None) => return None,
        (None, Some(obj)) => ("ADDED", obj.clone()),
        (Some(_), Some(obj)) => ("MODIFIED", obj.clone()),
        (Some(old), None) => {
            let mut old = old.clone();
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", old)
        }
    };
    Some(json!({ "type": kind, "object": object }))
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

type Chunk = Result<Bytes, std::io::Error>;

fn watch_response(shared: Arc<Shared>, resource: Resource, p: Params, filter: Filter) -> Response {
    let from = match parse_rv(p.resource_version.as_deref()) {
        Ok(rv) => rv,
        Err(resp) => return *resp,
    };
    let (tx, rx) = mpsc::channel::<Chunk>(256);
    // Subscribe and read the backlog under one lock: no change is missed or sent twice.
    let (backlog, mut changes, mut last_rv) = {
        let data = lock(&shared.data);
        let changes = shared.changes.subscribe();
        let mut backlog = Vec::new();
        match from {
            Some(rv) if rv < data.compacted => {
                backlog.push(json!({
                    "type": "ERROR",
                    "object": status(StatusCode::GONE, "Expired",
                        &format!("too old resource version: {rv} ({})", data.compacted)),
                }));
                drop(data);
                return stream_response(rx, tx, backlog, true);
            }
            Some(rv) => {
                for change in data
                    .log
                    .iter()
                    .filter(|c| c.rv > rv && c.resource == resource)
                {
                    backlog.extend(event_for(change, &filter));
                }
            }
            // No resourceVersion: the current state as ADDED events, then changes.
            None => {
                for stored in data.snapshot(resource, data.rv).values() {
                    if filter.matches(&stored.object) {
                        backlog.push(json!({ "type": "ADDED", "object": stored.object }));
                    }
                }
            }
        }
        (backlog, changes, data.rv)
    };
    let bookmarks = truthy(&p.allow_watch_bookmarks);
    let timeout = p
        .timeout_seconds
        .filter(|t| *t > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    let interval = shared.bookmark_interval;
    let producer = tx.clone();
    tokio::spawn(async move {
        let tx = producer;
        for event in backlog {
            if tx.send(Ok(line(&event))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return, // clean end: the client re-watches
                _ = cut.changed() => {
                    let gone = cut.borrow().1;
                    let end = if gone {
                        Ok(line(&json!({
                            "type": "ERROR",
                            "object": status(StatusCode::GONE, "Expired", "too old resource version"),
                        })))
                    } else {
                        Err(std::io::Error::other("connection dropped by the test"))
                    };
                    let _ = tx.send(end).await;
                    return;
                }
                _ = ticker.tick(), if bookmarks => {
                    let mark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind(),
                            "apiVersion": resource.api_version(),
                            "metadata": { "resourceVersion": last_rv.to_string() },
                        },
                    });
                    if tx.send(Ok(line(&mark))).await.is_err() {
                        return;
                    }
                }
                change = changes.recv() => {
                    let change = match change {
                        Ok(c) => c,
                        // Too slow to keep up: as the real server, end the watch with 410.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let _ = tx.send(Ok(line(&json!({
                                "type": "ERROR",
                                "object": status(StatusCode::GONE, "Expired", "watcher fell behind"),
                            })))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    last_rv = last_rv.max(change.rv);
                    if change.resource != resource {
                        continue;
                    }
                    if let Some(event) = event_for(&change, &filter) {
                        if tx.send(Ok(line(&event))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    stream_response(rx, tx, Vec::new(), false)
}

/// A chunked JSON response fed by `rx`; `initial` events are queued first, and with
/// `close` the stream ends after them.
fn stream_response(
    rx: mpsc::Receiver<Chunk>,
    tx: mpsc::Sender<Chunk>,
    initial: Vec<Value>,
    close: bool,
) -> Response {
    for event in &initial {
        let _ = tx.try_send(Ok(line(event)));
    }
    if close {
        drop(tx);
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
