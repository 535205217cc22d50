//! What sources (the manifests directory, the API server) hand to the change tracker.
//!
//! Sources speak in Kubernetes objects; the conversion to the proxy's model is done here
//! and in [`crate::convert`], the same for every source. A complete picture (`Replace`)
//! carries records, converted as the source reads each object: the raw objects of a
//! whole cluster at once would cost many times more memory than the proxy keeps.

use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::convert::{self, EndpointsByPort};
use crate::model::{ServiceName, ServicePort};

/// EndpointSlice annotation: when the change behind this slice's last update happened.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A Service as the tracker keeps it: its name and its converted ports (none when it is
/// invalid; the problem is logged when the record is made).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub name: ServiceName,
    pub ports: Vec<ServicePort>,
}

impl ServiceRecord {
    pub fn new(svc: &Service) -> Self {
        let name = ServiceName::new(
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref().unwrap_or(""),
        );
        let ports = match convert::service_ports(svc) {
            Ok(converted) => {
                // One line per Service, however many of its fields are bad.
                if !converted.warnings.is_empty() {
                    tracing::warn!(service = %name, "{}", converted.warnings.join("; "));
                }
                converted.ports
            }
            Err(err) => {
                // Refused as a whole: its rules go, everything else stays. The name
                // failed validation, so it is quoted: it could forge a log line.
                tracing::warn!(service = ?name.to_string(), error = %err, "ignoring invalid Service");
                Vec::new()
            }
        };
        ServiceRecord { name, ports }
    }
}

/// An EndpointSlice as the tracker keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRecord {
    /// Shared with the tracker's keys of the slice.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub owner: Option<ServiceName>,
    /// Its endpoints per port; `is_local` says whether they run on `node_name`.
    pub endpoints: EndpointsByPort,
    /// Its last-change-trigger-time annotation, when readable.
    pub trigger_time: Option<SystemTime>,
}

impl SliceRecord {
    pub fn new(slice: &EndpointSlice, node_name: &str) -> Self {
        let mut warnings = Vec::new();
        let endpoints = convert::slice_endpoints(slice, node_name, &mut warnings);
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        let trigger_time = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
            .and_then(|text| text.parse::<jiff::Timestamp>().ok())
            .map(SystemTime::from);
        SliceRecord {
            namespace: Arc::from(slice.metadata.namespace.as_deref().unwrap_or("default")),
            name: Arc::from(slice.metadata.name.as_deref().unwrap_or_default()),
            owner: convert::slice_service(slice),
            endpoints,
            trigger_time,
        }
    }
}

/// A complete picture of the objects a source currently holds.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<ServiceRecord>,
    pub endpoint_slices: Vec<SliceRecord>,
    /// This node's Node object, when the source has it.
    pub node: Option<Node>,
    /// Every `ServiceCIDR` object's ranges (duplicates allowed; the tracker sorts them).
    pub service_cidrs: Vec<IpNet>,
}

impl Objects {
    /// Records of raw objects (`node_name`: this node, for endpoints' locality).
    pub fn from_raw<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        node: Option<Node>,
        node_name: &str,
    ) -> Self {
        Objects {
            services: services.into_iter().map(ServiceRecord::new).collect(),
            endpoint_slices: slices
                .into_iter()
                .map(|s| SliceRecord::new(s, node_name))
                .collect(),
            node,
            service_cidrs: Vec::new(),
        }
    }
}

/// One message from a source to the change tracker.
// Replace is rare (one per reload or relist) and the big one: boxing it buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceUpdate {
    /// Everything the source holds now; objects not listed are gone. The file source sends
    /// this after its first load, the API source after each (re)list.
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
    /// The ranges of every `ServiceCIDR` object, after one of them changed.
    ServiceCidrs(Vec<IpNet>),
    /// Records that changed, already converted (the manifests source re-reading the files
    /// that changed). Objects not named stay as they are.
    Changes(Changes),
}

/// Upserts and deletions of records, applied together: deletions first, then upserts, so
/// an object named in both is kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub services: Vec<ServiceRecord>,
    pub removed_services: Vec<ServiceName>,
    pub slices: Vec<SliceRecord>,
    /// Namespace and name of each removed EndpointSlice.
    pub removed_slices: Vec<(String, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.removed_services.is_empty()
            && self.slices.is_empty()
            && self.removed_slices.is_empty()
    }
}
