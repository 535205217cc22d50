//! The metrics server (`--metrics-bind-address`: `/metrics`, `/proxyMode`, `/configz`,
//! `/healthz`, and `/statusz`, `/flagz` behind their feature gates) and the health
//! server (`--healthz-bind-address`: `/healthz`, `/livez`).
//!
//! Bind errors follow upstream's `--bind-address-hard-fail`: with it, the first bind
//! error is returned (the proxy exits); without it, the error is logged and the bind
//! retried every 5 seconds while the proxy carries on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::health::Health;
use crate::metrics::ProxyMetrics;
use crate::textfmt;

/// Upstream retries a failed listen every 5 s when not in hard-fail mode.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid {what} address {address:?}: expected IP:port")]
    Address { what: &'static str, address: String },
    #[error("starting {what} server on {address} failed")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the metrics server shows.
#[derive(Clone)]
pub struct MetricsContext {
    pub metrics: ProxyMetrics,
    /// `/proxyMode`, e.g. `nftables`.
    pub mode: &'static str,
    /// The effective configuration, served by `/configz`.
    pub config: Arc<serde_json::Value>,
    pub zpages: Arc<crate::zpages::Zpages>,
    /// `/debug/services`.
    pub programmed: Arc<crate::debug::ProgrammedState>,
    /// `/debug/explain`; `None`: not served.
    pub explain: Option<Arc<crate::explain::Explainer>>,
}

/// The metrics server's paths without the gated z-pages (what `/statusz` lists).
pub const METRICS_PATHS: [&str; 4] = ["/configz", "/healthz", "/metrics", "/proxyMode"];

pub fn metrics_router(ctx: MetricsContext) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/configz", get(configz))
        .route("/healthz", get(|| async { plain("ok".to_owned()) }))
        .route("/debug/services", get(debug_services))
        .route("/debug/explain", get(debug_explain));
    // Without its gate a z-page is not there at all (404), as upstream.
    if ctx.zpages.statusz.is_some() {
        router = router.route("/statusz", get(statusz));
    }
    if ctx.zpages.flagz.is_some() {
        router = router.route("/flagz", get(flagz));
    }
    router.with_state(ctx)
}

/// `/debug/services`: JSON, or a text table with `?format=text` or `Accept: text/plain`;
/// `?namespace=` and `?name=` filter.
async fn debug_services(
    State(ctx): State<MetricsContext>,
    Query(query): Query<DebugQuery>,
    headers: HeaderMap,
) -> Response {
    let wants_text = query.format.as_deref() == Some("text")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"));
    let filter = crate::debug::Filter {
        namespace: query.namespace,
        name: query.name,
    };
    if wants_text {
        plain(ctx.programmed.text(&filter))
    } else {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            ctx.programmed.json(&filter).to_string(),
        )
            .into_response()
    }
}

/// `/debug/explain?src=IP[:port]&dst=IP:port&proto=tcp|udp|sctp[&iif=NAME][&verify=1]`:
/// JSON, or text with `?format=text` or `Accept: text/plain`. Bad input is a 400 naming it.
async fn debug_explain(
    State(ctx): State<MetricsContext>,
    Query(params): Query<crate::explain::ExplainParams>,
    headers: HeaderMap,
) -> Response {
    use crate::explain::{to_json, to_text, Answer};
    let Some(explainer) = ctx.explain.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let wants_text = params.format.as_deref() == Some("text")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"));
    let state = ctx.programmed.state();
    // Verifying reads the kernel (netlink, iptables-save): off the async workers.
    let answer = tokio::task::spawn_blocking(move || explainer.answer(state, &params)).await;
    match answer {
        Ok(Answer::BadRequest(message)) => {
            let mut r = plain(format!("bad query: {message}\n"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r
        }
        Ok(Answer::NotReady) => {
            let mut r = plain("no sync has succeeded yet\n".into());
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
        Ok(Answer::Explained {
            explanation,
            verify,
        }) => {
            if wants_text {
                plain(to_text(&explanation, &verify))
            } else {
                with_type(
                    to_json(&explanation, &verify).to_string().into_response(),
                    "application/json",
                )
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "explain task failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct DebugQuery {
    format: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

/// The health server's routes; counts every answer in `kubeproxy_proxy_{healthz,livez}_total`.
pub fn health_router(health: Arc<Health>, metrics: ProxyMetrics) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state((health, metrics))
}

/// Parses a bind address; an empty one means the server is off.
pub fn parse_address(what: &'static str, address: &str) -> Result<Option<SocketAddr>, ServerError> {
    if address.trim().is_empty() {
        return Ok(None);
    }
    address.parse().map(Some).map_err(|_| ServerError::Address {
        what,
        address: address.to_owned(),
    })
}

/// Binds `address` and serves `router` on a task of its own. A bind error is returned
/// when `hard_fail`; otherwise it is logged and retried every [`RETRY_INTERVAL`].
pub async fn spawn(
    what: &'static str,
    address: SocketAddr,
    router: Router,
    hard_fail: bool,
) -> Result<JoinHandle<()>, ServerError> {
    let first = TcpListener::bind(address).await;
    let first = match first {
        Ok(listener) => Some(listener),
        Err(source) if hard_fail => {
            return Err(ServerError::Bind {
                what,
                address,
                source,
            })
        }
        Err(source) => {
            let err = ServerError::Bind {
                what,
                address,
                source,
            };
            tracing::error!(error = %err, cause = %source_of(&err), retry_in = ?RETRY_INTERVAL, "server not started");
            None
        }
    };
    Ok(tokio::spawn(async move {
        let mut listener = first;
        loop {
            let l = match listener.take() {
                Some(l) => l,
                None => {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                    match TcpListener::bind(address).await {
                        Ok(l) => l,
                        Err(err) => {
                            tracing::error!(server = what, %address, error = %err, "bind failed; retrying");
                            continue;
                        }
                    }
                }
            };
            tracing::info!(server = what, %address, "serving");
            if let Err(err) = axum::serve(l, router.clone()).await {
                tracing::error!(server = what, %address, error = %err, "server stopped; restarting");
            }
        }
    }))
}

async fn metrics(State(ctx): State<MetricsContext>) -> Response {
    // Rendering reads process stats from /proc: keep it off the async workers.
    let m = ctx.metrics.clone();
    let body = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    with_type(body.into_response(), textfmt::CONTENT_TYPE)
}

async fn proxy_mode(State(ctx): State<MetricsContext>) -> Response {
    plain(ctx.mode.to_owned())
}

async fn configz(State(ctx): State<MetricsContext>) -> Response {
    // Upstream's configz shape: the configuration under its API group's name; the
    // configuration carries its apiVersion and kind (as upstream's does since v1.36).
    let body = serde_json::json!({ "kubeproxy.config.k8s.io": *ctx.config }).to_string();
    with_type(body.into_response(), "application/json")
}

async fn statusz(State(ctx): State<MetricsContext>, headers: HeaderMap) -> Response {
    match &ctx.zpages.statusz {
        Some(s) => crate::zpages::statusz(s, &headers, SystemTime::now()),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn flagz(State(ctx): State<MetricsContext>, headers: HeaderMap) -> Response {
    match &ctx.zpages.flagz {
        Some(flags) => crate::zpages::flagz(flags, &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn healthz(State((health, metrics)): State<(Arc<Health>, ProxyMetrics)>) -> Response {
    let (code, body) = health.healthz(SystemTime::now());
    metrics
        .proxy_healthz_total
        .with_label_values(&[code.to_string().as_str()])
        .inc();
    json(code, body)
}

async fn livez(State((health, metrics)): State<(Arc<Health>, ProxyMetrics)>) -> Response {
    let (code, body) = health.livez(SystemTime::now());
    metrics
        .proxy_livez_total
        .with_label_values(&[code.to_string().as_str()])
        .inc();
    json(code, body)
}

fn json(code: u16, body: String) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = with_type((status, body).into_response(), "application/json");
    response.headers_mut().insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn plain(body: String) -> Response {
    with_type(body.into_response(), "text/plain; charset=utf-8")
}

fn with_type(mut response: Response, content_type: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The underlying error's text, for a log line (the `Display` leaves it to the chain).
fn source_of(err: &ServerError) -> String {
    std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default()
}
