//! The backend-agnostic heart of the proxy: the Service/endpoint model, change tracking,
//! the sync runner and the `Proxier` trait that every datapath backend implements.
#![forbid(unsafe_code)]

pub mod convert;
pub mod explain;
pub mod ipparse;
pub mod model;
pub mod observer;
pub mod proxier;
pub mod runner;
pub mod select;
pub mod source;
pub mod stale;
pub mod status;
pub mod tracker;
