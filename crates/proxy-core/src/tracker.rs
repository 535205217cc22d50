//! The change tracker: raw objects in, desired state out, with a record of what changed.
//!
//! It converts the Services and EndpointSlices a source reports as they arrive and keeps
//! only what the proxy uses of them (a raw object costs many times its converted form:
//! at 10,000 Services the raw objects alone took over 100 MiB), derives the
//! [`ProxyState`] for exactly the Services an update touched, and remembers which Services
//! changed since the last sync and when each change was first seen (for network
//! programming latency).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use tokio::time::Instant;

use crate::convert;
use crate::model::{ProxyState, ServiceName, ServicePort};
use crate::source::{Changes, Objects, ServiceRecord, SliceRecord, SourceUpdate};

/// Key of an EndpointSlice: namespace and slice name (shared with its record).
type SliceKey = (Arc<str>, Arc<str>);

pub use crate::source::LAST_CHANGE_TRIGGER_TIME;

/// Node taint the cluster autoscaler sets before it deletes a node.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Changes not yet handed to a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingChanges {
    /// Services whose ports changed (added, removed or updated), with the time first seen.
    pub services: BTreeMap<ServiceName, Instant>,
    /// Services whose endpoints changed, with the time first seen.
    pub endpoints: BTreeMap<ServiceName, Instant>,
    /// The node's own facts (zone, pod CIDRs, addresses) changed.
    pub node: bool,
    /// The cluster's Service IP ranges changed.
    pub service_cidrs: bool,
    /// Per changed Service, when its changes were triggered (for network programming
    /// latency): EndpointSlice trigger-time annotations, and when a Service change was
    /// first seen.
    pub trigger_times: BTreeMap<ServiceName, BTreeSet<SystemTime>>,
}

impl PendingChanges {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoints.is_empty() && !self.node && !self.service_cidrs
    }

    /// Every Service that needs reprogramming.
    pub fn touched(&self) -> BTreeSet<ServiceName> {
        self.services
            .keys()
            .chain(self.endpoints.keys())
            .cloned()
            .collect()
    }

    /// When the oldest pending change was first seen.
    pub fn oldest(&self) -> Option<Instant> {
        self.services
            .values()
            .chain(self.endpoints.values())
            .min()
            .copied()
    }
}

/// Tracks converted objects and the state derived from them.
#[derive(Debug)]
pub struct ChangeTracker {
    node_name: String,
    /// Each Service's ports, shared with the state (one copy of each port in memory).
    services: HashMap<ServiceName, Vec<Arc<ServicePort>>>,
    slices: HashMap<SliceKey, SliceRecord>,
    /// Sorted; nearly always one slice (a B-tree set's smallest node holds eleven keys).
    slices_by_service: HashMap<ServiceName, Vec<SliceKey>>,
    node: Option<Node>,
    state: Arc<ProxyState>,
    /// Bumped by every change of `state`.
    version: u64,
    pending: PendingChanges,
    /// Trigger times older than this are ignored, as upstream does: after a restart they
    /// measure the downtime, not programming.
    started: SystemTime,
    service_changes_total: u64,
    endpoint_changes_total: u64,
    /// False when the `AllowServiceExternalIPs` feature gate is off: Services' externalIPs
    /// are then left out of the state, so no backend serves them.
    external_ips: bool,
}

impl ChangeTracker {
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        let state = ProxyState {
            node: convert::node_info(&node_name, None),
            ..ProxyState::default()
        };
        ChangeTracker {
            node_name,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            node: None,
            state: Arc::new(state),
            version: 0,
            pending: PendingChanges::default(),
            started: SystemTime::now(),
            service_changes_total: 0,
            endpoint_changes_total: 0,
            external_ips: true,
        }
    }

    /// Whether Services' `externalIPs` are served (upstream's `AllowServiceExternalIPs`).
    pub fn with_external_ips(mut self, serve: bool) -> Self {
        self.external_ips = serve;
        self
    }

    /// The current desired state; cheap to clone and never changes under the holder.
    pub fn state(&self) -> Arc<ProxyState> {
        Arc::clone(&self.state)
    }

    /// Copies the state now if others (the last sync's observers) still hold it, so the
    /// next change is applied without that copy (one pass over every Service port) on
    /// its way to the kernel.
    pub fn unshare_state(&mut self) {
        Arc::make_mut(&mut self.state);
    }

    /// Counts changes of the state: the same version is the same content.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn state_mut(&mut self) -> &mut ProxyState {
        self.version += 1;
        Arc::make_mut(&mut self.state)
    }

    pub fn pending(&self) -> &PendingChanges {
        &self.pending
    }

    /// Service changes seen since start: one per Service whose ports an update changed.
    pub fn service_changes_total(&self) -> u64 {
        self.service_changes_total
    }

    /// Endpoint changes seen since start: one per Service whose endpoints an update changed.
    pub fn endpoint_changes_total(&self) -> u64 {
        self.endpoint_changes_total
    }

    /// Whether this node may receive load-balancer traffic: not being deleted and not
    /// tainted for deletion by the cluster autoscaler. True while the Node is unknown.
    pub fn node_eligible(&self) -> bool {
        let Some(node) = &self.node else {
            return true;
        };
        if node.metadata.deletion_timestamp.is_some() {
            return false;
        }
        !node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
    }

    /// Hands the pending changes to the caller (a sync is starting).
    pub fn take_pending(&mut self) -> PendingChanges {
        std::mem::take(&mut self.pending)
    }

    /// Applies one update from a source. Returns true when the desired state changed.
    pub fn apply(&mut self, update: SourceUpdate) -> bool {
        let now = Instant::now();
        match update {
            SourceUpdate::Replace(objects) => self.replace(objects, now),
            // Single objects go the same way as a batch of changes.
            SourceUpdate::ServiceUpsert(svc) => self.apply_changes(
                Changes {
                    services: vec![ServiceRecord::new(&svc)],
                    ..Changes::default()
                },
                now,
            ),
            SourceUpdate::ServiceDelete { namespace, name } => self.apply_changes(
                Changes {
                    removed_services: vec![ServiceName::new(namespace, name)],
                    ..Changes::default()
                },
                now,
            ),
            SourceUpdate::EndpointSliceUpsert(slice) => self.apply_changes(
                Changes {
                    slices: vec![SliceRecord::new(&slice, &self.node_name)],
                    ..Changes::default()
                },
                now,
            ),
            SourceUpdate::EndpointSliceDelete { namespace, name } => self.apply_changes(
                Changes {
                    removed_slices: vec![(namespace, name)],
                    ..Changes::default()
                },
                now,
            ),
            SourceUpdate::Changes(changes) => self.apply_changes(changes, now),
            SourceUpdate::Node(node) => self.set_node(node.map(|n| *n)),
            SourceUpdate::ServiceCidrs(cidrs) => self.set_service_cidrs(cidrs),
        }
    }

    fn set_service_cidrs(&mut self, mut cidrs: Vec<IpNet>) -> bool {
        cidrs.sort_unstable();
        cidrs.dedup();
        if cidrs == self.state.service_cidrs {
            return false;
        }
        self.state_mut().service_cidrs = cidrs;
        self.pending.service_cidrs = true;
        true
    }

    fn replace(&mut self, objects: Objects, now: Instant) -> bool {
        let mut touched: BTreeSet<ServiceName> = BTreeSet::new();
        let mut new_services: HashMap<ServiceName, Vec<Arc<ServicePort>>> = objects
            .services
            .into_iter()
            .map(|record| (record.name, shared(record.ports, self.external_ips)))
            .collect();
        for (key, svc) in new_services.iter_mut() {
            match self.services.get(key) {
                // Unchanged: keep the ports the state already shares.
                Some(old) if old == svc => svc.clone_from(old),
                _ => {
                    touched.insert(key.clone());
                }
            }
        }
        touched.extend(
            self.services
                .keys()
                .filter(|k| !new_services.contains_key(*k))
                .cloned(),
        );
        self.services = new_services;

        let new_slices: HashMap<SliceKey, SliceRecord> = objects
            .endpoint_slices
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect();
        for (key, slice) in &new_slices {
            match self.slices.get(key) {
                Some(old) if old == slice => {}
                old => {
                    touched.extend(old.and_then(|o| o.owner.clone()));
                    touched.extend(slice.owner.clone());
                }
            }
        }
        for (key, old) in &self.slices {
            if !new_slices.contains_key(key) {
                touched.extend(old.owner.clone());
            }
        }
        self.slices = new_slices;
        self.slices_by_service.clear();
        for (key, slice) in &self.slices {
            if let Some(svc) = slice.owner.clone() {
                insert_sorted(self.slices_by_service.entry(svc).or_default(), key.clone());
            }
        }

        let mut changed = self.set_node(objects.node);
        changed |= self.set_service_cidrs(objects.service_cidrs);
        for key in &touched {
            changed |= self.refresh_service(key, now);
        }
        changed
    }

    /// Stores the records, then re-derives each Service they touch once.
    fn apply_changes(&mut self, changes: Changes, now: Instant) -> bool {
        let mut touched: BTreeSet<ServiceName> = BTreeSet::new();
        for key in changes.removed_services {
            self.services.remove(&key);
            touched.insert(key);
        }
        for (namespace, name) in changes.removed_slices {
            touched.extend(self.take_slice(&(namespace.into(), name.into())));
        }
        for record in changes.services {
            let ports = shared(record.ports, self.external_ips);
            if self.services.get(&record.name) == Some(&ports) {
                continue; // unchanged: the state keeps sharing the ports it has
            }
            touched.insert(record.name.clone());
            self.services.insert(record.name, ports);
        }
        for slice in changes.slices {
            let (old_owner, new_owner) = self.put_slice(slice);
            touched.extend(old_owner);
            touched.extend(new_owner);
        }
        let mut changed = false;
        for key in &touched {
            changed |= self.refresh_service(key, now);
        }
        changed
    }

    /// Stores a slice record; returns its previous and its new owner.
    fn put_slice(&mut self, slice: SliceRecord) -> (Option<ServiceName>, Option<ServiceName>) {
        let key = (slice.namespace.clone(), slice.name.clone());
        let new_owner = slice.owner.clone();
        let old_owner = self.slices.insert(key.clone(), slice).and_then(|s| s.owner);
        if old_owner != new_owner {
            if let Some(owner) = &old_owner {
                self.unlink_slice(owner, &key);
            }
        }
        if let Some(owner) = &new_owner {
            insert_sorted(
                self.slices_by_service.entry(owner.clone()).or_default(),
                key,
            );
        }
        (old_owner, new_owner)
    }

    /// Forgets a slice record; returns the Service it belonged to.
    fn take_slice(&mut self, key: &SliceKey) -> Option<ServiceName> {
        let owner = self.slices.remove(key)?.owner?;
        self.unlink_slice(&owner, key);
        Some(owner)
    }

    fn unlink_slice(&mut self, owner: &ServiceName, key: &SliceKey) {
        if let Some(keys) = self.slices_by_service.get_mut(owner) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.slices_by_service.remove(owner);
            }
        }
    }

    fn set_node(&mut self, node: Option<Node>) -> bool {
        // A Node whose name is not ours is not ours to use.
        let node = node.filter(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        let info = convert::node_info(&self.node_name, node.as_ref());
        self.node = node;
        if info == self.state.node {
            return false;
        }
        self.state_mut().node = info;
        self.pending.node = true;
        true
    }

    /// Re-derives one Service's ports and endpoints; records what changed.
    fn refresh_service(&mut self, key: &ServiceName, now: Instant) -> bool {
        let ports = self.services.get(key).cloned().unwrap_or_default();
        let slices = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .map(|s| &s.endpoints);
        let by_port = convert::merge_endpoints(slices);

        let old_ports: Vec<_> = self
            .state
            .ports_of(key)
            .map(|(_, p)| Arc::clone(p))
            .collect();
        let ports_changed =
            old_ports.len() != ports.len() || old_ports.iter().zip(&ports).any(|(a, b)| a != b);
        let mut endpoints_changed = false;
        let mut new_endpoints = Vec::with_capacity(ports.len());
        for port in &ports {
            let eps = by_port
                .get(&(port.name.port.clone(), port.name.protocol))
                .cloned()
                .unwrap_or_default();
            if self.state.endpoints_of(&port.name) != eps.as_slice() {
                endpoints_changed = true;
            }
            new_endpoints.push(eps);
        }
        // Endpoints of removed ports count as endpoint changes too.
        if old_ports.iter().any(|p| {
            !self.state.endpoints_of(&p.name).is_empty() && !ports.iter().any(|n| n.name == p.name)
        }) {
            endpoints_changed = true;
        }
        if !ports_changed && !endpoints_changed {
            return false;
        }

        let state = self.state_mut();
        for old in &old_ports {
            state.services.remove(&old.name);
            state.endpoints.remove(&old.name);
        }
        for (port, eps) in ports.into_iter().zip(new_endpoints) {
            if !eps.is_empty() {
                state.endpoints.insert(port.name.clone(), eps);
            }
            state.services.insert(port.name.clone(), port);
        }
        if ports_changed {
            self.service_changes_total += 1;
            self.pending.services.entry(key.clone()).or_insert(now);
            self.pending
                .trigger_times
                .entry(key.clone())
                .or_default()
                .insert(SystemTime::now());
        }
        if endpoints_changed {
            self.endpoint_changes_total += 1;
            self.pending.endpoints.entry(key.clone()).or_insert(now);
            if let Some(at) = self.endpoint_trigger_time(key) {
                self.pending
                    .trigger_times
                    .entry(key.clone())
                    .or_default()
                    .insert(at);
            }
        }
        true
    }
}

fn insert_sorted(keys: &mut Vec<SliceKey>, key: SliceKey) {
    if let Err(at) = keys.binary_search(&key) {
        // Exact room: nearly every Service has one slice, and a vector grown by one
        // element would keep room for four (10,000 Services: ~1 MiB).
        keys.reserve_exact(1);
        keys.insert(at, key);
    }
}

impl ChangeTracker {
    /// The newest trigger-time annotation among a Service's slices: the slice that just
    /// changed carries the latest one. Unparseable values and times before start are
    /// ignored.
    fn endpoint_trigger_time(&self, key: &ServiceName) -> Option<SystemTime> {
        self.slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .filter_map(|slice| slice.trigger_time)
            .filter(|at| *at >= self.started)
            .max()
    }
}

/// Ports as the tracker and the state share them. Collected into a new vector: `collect`
/// would reuse the ports' own buffer in place, keeping ~200 bytes per pointer it holds
/// (8 MB at 10,000 Services).
fn shared(ports: Vec<ServicePort>, external_ips: bool) -> Vec<Arc<ServicePort>> {
    let mut out = Vec::with_capacity(ports.len());
    out.extend(ports.into_iter().map(|mut port| {
        if !external_ips {
            port.external_ips.clear();
        }
        Arc::new(port)
    }));
    out
}
