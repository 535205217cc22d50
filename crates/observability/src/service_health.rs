//! Health checks for `externalTrafficPolicy: Local` load-balancer Services: one HTTP
//! server per `healthCheckNodePort`, answering 200 while the node has a local ready
//! endpoint for the Service and the proxy is healthy, else 503, so the cloud load
//! balancer only sends traffic to nodes that can serve it locally.
//!
//! Servers open and close as Services come and go; a port that cannot be bound is
//! logged and retried, never fatal.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use proxy_core::model::{ProxyState, ServiceName, TrafficPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health::Health;

/// How long before a port that could not be bound is tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// What the health checks should serve: per Service, its port and local ready endpoints.
pub type Targets = BTreeMap<ServiceName, Target>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub local_endpoints: usize,
}

/// The health-check targets of a state: Services with `externalTrafficPolicy: Local`
/// and a `healthCheckNodePort`, counting local ready endpoints over all their ports.
pub fn targets(state: &ProxyState) -> Targets {
    let mut out = Targets::new();
    for (name, port) in &state.services {
        let Some(hc_port) = port.health_check_node_port else {
            continue;
        };
        if port.external_traffic_policy != TrafficPolicy::Local {
            continue;
        }
        let local = state
            .endpoints_of(name)
            .iter()
            .filter(|e| e.is_local && e.ready)
            .count();
        let entry = out.entry(name.service.clone()).or_insert(Target {
            port: hc_port,
            local_endpoints: 0,
        });
        entry.local_endpoints += local;
    }
    out
}

struct Running {
    port: u16,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct HandlerState {
    name: ServiceName,
    counts: Arc<RwLock<Targets>>,
    health: Arc<Health>,
}

/// Runs until `targets` is closed: keeps one server per target, restarting those whose
/// port changed and retrying ports that could not be bound.
pub async fn run(mut targets: watch::Receiver<Targets>, health: Arc<Health>) {
    let counts: Arc<RwLock<Targets>> = Arc::default();
    let mut running: HashMap<ServiceName, Running> = HashMap::new();
    loop {
        let wanted = targets.borrow_and_update().clone();
        *counts.write().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        running.retain(|name, r| {
            let keep = wanted.get(name).is_some_and(|t| t.port == r.port);
            if !keep {
                tracing::info!(service = %name, port = r.port, "closing health check");
                r.task.abort();
            }
            keep
        });
        let mut failed = false;
        for (name, target) in &wanted {
            if running.contains_key(name) {
                continue;
            }
            match bind(target.port).await {
                Ok(listener) => {
                    tracing::info!(service = %name, port = target.port, "opened health check");
                    let router = Router::new().fallback(get(serve)).with_state(HandlerState {
                        name: name.clone(),
                        counts: Arc::clone(&counts),
                        health: Arc::clone(&health),
                    });
                    let service = name.clone();
                    let task = tokio::spawn(async move {
                        if let Err(err) = axum::serve(listener, router).await {
                            tracing::error!(service = %service, error = %err, "health check server stopped");
                        }
                    });
                    running.insert(
                        name.clone(),
                        Running {
                            port: target.port,
                            task,
                        },
                    );
                }
                Err(err) => {
                    failed = true;
                    tracing::error!(service = %name, port = target.port, error = %err,
                        retry_in = ?RETRY_INTERVAL, "cannot open health check port");
                }
            }
        }
        tokio::select! {
            changed = targets.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(RETRY_INTERVAL), if failed => {}
        }
    }
    for r in running.values() {
        r.task.abort();
    }
}

/// All addresses, both families when IPv6 is available (a `[::]` socket also takes IPv4).
async fn bind(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await,
    }
}

async fn serve(State(s): State<HandlerState>) -> Response {
    let count = s
        .counts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&s.name)
        .map(|t| t.local_endpoints);
    let Some(count) = count else {
        // Closed between accept and answer; upstream answers nothing useful either.
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let healthy = s.health.check(SystemTime::now()).healthy;
    let status = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        serde_json::Value::String(s.name.namespace.to_string()),
        serde_json::Value::String(s.name.name.to_string()),
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("X-Load-Balancing-Endpoint-Weight", HeaderValue::from(count));
    response
}
