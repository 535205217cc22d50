//! The `kube-proxy` binary's library half: command line and config file ([`options`]) and
//! the wiring of sources, sync runner and backend ([`app`]). Kept as a library so tests
//! and tools can drive them without a process.
#![forbid(unsafe_code)]

pub mod app;
pub mod explain;
pub mod options;
