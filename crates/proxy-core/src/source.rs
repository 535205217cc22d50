//! What sources (the manifests directory, the API server) hand to the change tracker.
//!
//! Sources speak in raw Kubernetes objects; turning them into the proxy's model is the
//! tracker's job, so every source gets the same validation and the same semantics.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A complete picture of the objects a source currently holds.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This node's Node object, when the source has it.
    pub node: Option<Node>,
}

/// One message from a source to the change tracker.
// Replace is rare (one per reload or relist) and the big one: boxing it buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceUpdate {
    /// Everything the source holds now; objects not listed are gone. The file source sends
    /// this on every (re)load, the API source after each (re)list.
    Replace(Objects),
    ServiceUpsert(Box<Service>),
    ServiceDelete {
        namespace: String,
        name: String,
    },
    EndpointSliceUpsert(Box<EndpointSlice>),
    EndpointSliceDelete {
        namespace: String,
        name: String,
    },
    /// This node's Node object changed (or disappeared: `None`).
    Node(Option<Box<Node>>),
}
