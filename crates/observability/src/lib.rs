//! Observability for the proxy: upstream-compatible metrics, the metrics server
//! (`--metrics-bind-address`), the health server (`--healthz-bind-address`) and the
//! per-Service health checks of `externalTrafficPolicy: Local` load balancers.
//!
//! Everything here reads state the sync loop hands over through
//! [`proxy_core::observer::SyncObserver`]; servers run on their own tasks and never
//! hold anything a sync needs.
#![forbid(unsafe_code)]

pub mod debug;
pub mod explain;
pub mod gotime;
pub mod health;
pub mod localhost_nodeports;
pub mod metrics;
pub mod observer;
pub mod process;
pub mod server;
pub mod service_health;
pub mod service_traffic;
pub mod textfmt;
pub mod zpages;
