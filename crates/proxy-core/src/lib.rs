//! The backend-agnostic heart of the proxy: the Service/endpoint model, change tracking,
//! the sync runner and the `Proxier` trait that every datapath backend implements.

pub mod source;
