//! Turns the three watch streams' events into `SourceUpdate`s. Pure, so the ordering
//! rules are tested without a server:
//!
//! * nothing is sent until Services, EndpointSlices, the Node and ServiceCIDRs have each
//!   been listed completely (ServiceCIDRs count as listed, and empty, when the server has
//!   no such resource or refuses us it); then one `Replace` with all of them;
//! * after that, each watch event becomes one upsert or delete;
//! * a relist of any kind (after 410 Gone or a broken watch) is collected on the side and,
//!   when its list is complete, replaces what that kind held: for Services and
//!   EndpointSlices one `Changes` (every listed record, and the removal of what the list
//!   no longer has), for the Node and ServiceCIDRs their new state; a list that fails
//!   halfway leaves the last state as it was (no update at all).
//!
//! Services and EndpointSlices are converted to records as they are listed, and only
//! their keys are kept afterwards (the tracker holds the records): a cluster's raw
//! objects never stay in memory.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use kube::runtime::watcher::Event;
use proxy_core::model::ServiceName;
use proxy_core::source::{Changes, Objects, ServiceRecord, SliceRecord, SourceUpdate};

/// Objects with this label belong to another proxy (upstream's `LabelServiceProxyName`).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless Services carry this label (upstream's `IsHeadlessService`).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label selector upstream uses for Services and EndpointSlices.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The field selector upstream (v1.32+) adds for Services: headless ones are DNS's
/// business, so the server does not even send them.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";

/// One event from one of the three watches.
// Each event is moved once, from the watcher into the merger: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    Service(Event<Service>),
    Slice(Event<EndpointSlice>),
    Node(Event<Node>),
    ServiceCidr(Event<ServiceCIDR>),
    /// The server has no ServiceCIDR resource (before Kubernetes 1.33 without the beta
    /// API) or forbids us to list it: proceed without Service IP ranges.
    ServiceCidrsUnavailable,
}

type Key = (String, String);

/// The objects of one kind, plus a list in progress.
#[derive(Debug)]
struct Store<K> {
    live: BTreeMap<Key, K>,
    /// Some while a (re)list is in progress.
    listing: Option<BTreeMap<Key, K>>,
    listed: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            live: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

fn key<K: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    obj: &K,
) -> Key {
    let meta = obj.metadata();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Whether the proxy handles this Service or EndpointSlice. The API server already
/// filters with `LABEL_SELECTOR` (and `SERVICE_FIELD_SELECTOR`); checking again costs
/// nothing and keeps a server that ignores selectors from feeding us another proxy's
/// objects or headless Services.
trait Wanted: Metadata<Ty = ObjectMeta> {
    fn wanted(&self) -> bool {
        labels_wanted(self.metadata())
    }
}

fn labels_wanted(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_none_or(|labels| {
        !labels.contains_key(SERVICE_PROXY_NAME_LABEL) && !labels.contains_key(HEADLESS_LABEL)
    })
}

impl Wanted for EndpointSlice {}

impl Wanted for Service {
    fn wanted(&self) -> bool {
        let headless = self.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
        !headless && labels_wanted(&self.metadata)
    }
}

/// Where a kind's event leaves things.
enum Step<K> {
    Nothing,
    /// A (re)list completed.
    Listed,
    Upsert(K),
    Delete,
}

impl<K: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>> Store<K> {
    fn apply(&mut self, event: Event<K>, filter: impl Fn(&K) -> bool) -> Step<K>
    where
        K: Clone,
    {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                Step::Nothing
            }
            Event::InitApply(obj) => {
                if filter(&obj) {
                    self.listing
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&obj), obj);
                }
                Step::Nothing
            }
            Event::InitDone => {
                self.live = self.listing.take().unwrap_or_default();
                self.listed = true;
                Step::Listed
            }
            Event::Apply(obj) => {
                let k = key(&obj);
                if filter(&obj) {
                    self.live.insert(k, obj.clone());
                    Step::Upsert(obj)
                } else if self.live.remove(&k).is_some() {
                    // Relabelled away from us: gone as far as we are concerned.
                    Step::Delete
                } else {
                    Step::Nothing
                }
            }
            Event::Delete(obj) => {
                let k = key(&obj);
                match self.live.remove(&k) {
                    Some(_) => Step::Delete,
                    None => Step::Nothing,
                }
            }
        }
    }
}

/// Services or EndpointSlices: their keys once handed to the tracker, records while a
/// list is in progress or before the first complete state went out.
#[derive(Debug)]
struct RecordStore<R> {
    live: BTreeSet<Key>,
    /// Some while a (re)list is in progress.
    listing: Option<BTreeMap<Key, R>>,
    /// The first list's records, until every kind is listed and they go out together.
    unsent: Option<BTreeMap<Key, R>>,
    listed: bool,
}

impl<R> Default for RecordStore<R> {
    fn default() -> Self {
        RecordStore {
            live: BTreeSet::new(),
            listing: None,
            unsent: None,
            listed: false,
        }
    }
}

/// Where a Service or EndpointSlice event leaves things.
enum RecordStep<K, R> {
    Nothing,
    /// A relist after the first completed: every listed record, and the keys it no
    /// longer has.
    Relisted(Vec<R>, Vec<Key>),
    /// The first list completed.
    FirstListed,
    Upsert(K),
    Delete(Key),
}

impl<R> RecordStore<R> {
    fn apply<K: Wanted>(&mut self, event: Event<K>, record: impl Fn(&K) -> R) -> RecordStep<K, R> {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                RecordStep::Nothing
            }
            Event::InitApply(obj) => {
                if obj.wanted() {
                    self.listing
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&obj), record(&obj));
                }
                RecordStep::Nothing
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let keys: BTreeSet<Key> = listed.keys().cloned().collect();
                let gone: Vec<Key> = self.live.difference(&keys).cloned().collect();
                self.live = keys;
                if self.listed {
                    return RecordStep::Relisted(listed.into_values().collect(), gone);
                }
                self.listed = true;
                self.unsent = Some(listed);
                RecordStep::FirstListed
            }
            Event::Apply(obj) => {
                let k = key(&obj);
                if obj.wanted() {
                    self.live.insert(k.clone());
                    if let Some(unsent) = &mut self.unsent {
                        unsent.insert(k, record(&obj));
                    }
                    RecordStep::Upsert(obj)
                } else if self.forget(&k) {
                    // Relabelled away from us: gone as far as we are concerned.
                    RecordStep::Delete(k)
                } else {
                    RecordStep::Nothing
                }
            }
            Event::Delete(obj) => {
                let k = key(&obj);
                if self.forget(&k) {
                    RecordStep::Delete(k)
                } else {
                    RecordStep::Nothing
                }
            }
        }
    }

    fn forget(&mut self, k: &Key) -> bool {
        if let Some(unsent) = &mut self.unsent {
            unsent.remove(k);
        }
        self.live.remove(k)
    }

    /// The first list's records, once.
    fn take_unsent(&mut self) -> Vec<R> {
        self.unsent
            .take()
            .map(|m| m.into_values().collect())
            .unwrap_or_default()
    }
}

/// The merged state of the four watches.
#[derive(Debug)]
pub struct Merger {
    node_name: String,
    services: RecordStore<ServiceRecord>,
    slices: RecordStore<SliceRecord>,
    node: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    /// The first `Replace` went out.
    initial_sent: bool,
}

impl Merger {
    pub fn new(node_name: impl Into<String>) -> Self {
        Merger {
            node_name: node_name.into(),
            services: RecordStore::default(),
            slices: RecordStore::default(),
            node: Store::default(),
            service_cidrs: Store::default(),
            initial_sent: false,
        }
    }

    /// Whether the first complete state has been handed out.
    pub fn initial_sent(&self) -> bool {
        self.initial_sent
    }

    /// Feeds one event; returns the update to send, if any.
    pub fn apply(&mut self, input: Input) -> Option<SourceUpdate> {
        match input {
            Input::Service(event) => match self.services.apply(event, ServiceRecord::new) {
                RecordStep::Nothing => None,
                RecordStep::FirstListed => self.replace(),
                RecordStep::Relisted(services, gone) => Some(SourceUpdate::Changes(Changes {
                    services,
                    removed_services: gone
                        .into_iter()
                        .map(|(ns, name)| ServiceName::new(ns, name))
                        .collect(),
                    ..Changes::default()
                })),
                RecordStep::Upsert(svc) => self
                    .live()
                    .then(|| SourceUpdate::ServiceUpsert(Box::new(svc))),
                RecordStep::Delete((namespace, name)) => self
                    .live()
                    .then_some(SourceUpdate::ServiceDelete { namespace, name }),
            },
            Input::Slice(event) => {
                let node_name = self.node_name.clone();
                let record = move |s: &EndpointSlice| SliceRecord::new(s, &node_name);
                match self.slices.apply(event, record) {
                    RecordStep::Nothing => None,
                    RecordStep::FirstListed => self.replace(),
                    RecordStep::Relisted(slices, gone) => Some(SourceUpdate::Changes(Changes {
                        slices,
                        removed_slices: gone,
                        ..Changes::default()
                    })),
                    RecordStep::Upsert(slice) => self
                        .live()
                        .then(|| SourceUpdate::EndpointSliceUpsert(Box::new(slice))),
                    RecordStep::Delete((namespace, name)) => self
                        .live()
                        .then_some(SourceUpdate::EndpointSliceDelete { namespace, name }),
                }
            }
            Input::Node(event) => {
                let name = self.node_name.clone();
                // The field selector asks for our Node only; anything else is ignored.
                let ours = move |n: &Node| n.metadata.name.as_deref() == Some(name.as_str());
                match self.node.apply(event, ours) {
                    Step::Nothing => None,
                    Step::Listed if self.live() => Some(SourceUpdate::Node(
                        self.node.live.values().next().cloned().map(Box::new),
                    )),
                    Step::Listed => self.replace(),
                    Step::Upsert(node) => self
                        .live()
                        .then(|| SourceUpdate::Node(Some(Box::new(node)))),
                    Step::Delete => self.live().then_some(SourceUpdate::Node(None)),
                }
            }
            Input::ServiceCidr(event) => match self.service_cidrs.apply(event, |_| true) {
                Step::Nothing => None,
                Step::Listed if self.live() => {
                    Some(SourceUpdate::ServiceCidrs(self.service_cidr_ranges()))
                }
                Step::Listed => self.replace(),
                Step::Upsert(_) | Step::Delete => self
                    .live()
                    .then(|| SourceUpdate::ServiceCidrs(self.service_cidr_ranges())),
            },
            Input::ServiceCidrsUnavailable => {
                if self.service_cidrs.listed {
                    return None;
                }
                self.service_cidrs.listed = true;
                if self.live() {
                    return None; // was never listed, so nothing to take back
                }
                self.replace()
            }
        }
    }

    /// The ranges of every ServiceCIDR object held.
    fn service_cidr_ranges(&self) -> Vec<ipnet::IpNet> {
        let mut warnings = Vec::new();
        let ranges = self
            .service_cidrs
            .live
            .values()
            .flat_map(|object| proxy_core::convert::service_cidr_ranges(object, &mut warnings))
            .collect();
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        ranges
    }

    /// Whether incremental updates can go out: the tracker has had a complete state.
    fn live(&self) -> bool {
        self.initial_sent
    }

    /// A `Replace` of everything, once every kind has been listed.
    fn replace(&mut self) -> Option<SourceUpdate> {
        if self.initial_sent
            || !(self.services.listed
                && self.slices.listed
                && self.node.listed
                && self.service_cidrs.listed)
        {
            return None;
        }
        self.initial_sent = true;
        Some(SourceUpdate::Replace(Objects {
            services: self.services.take_unsent(),
            endpoint_slices: self.slices.take_unsent(),
            node: self.node.live.values().next().cloned(),
            service_cidrs: self.service_cidr_ranges(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proxy_core::source::ServiceRecord;

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: (!ns.is_empty()).then(|| ns.to_string()),
            name: Some(name.to_string()),
            labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..ObjectMeta::default()
        }
    }

    fn svc(name: &str, labels: &[(&str, &str)]) -> Service {
        Service {
            metadata: meta("ns", name, labels),
            ..Service::default()
        }
    }

    fn slice(name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: meta("ns", name, &[("kubernetes.io/service-name", "a")]),
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        }
    }

    fn node(name: &str) -> Node {
        Node {
            metadata: meta("", name, &[]),
            ..Node::default()
        }
    }

    fn replace_of(update: Option<SourceUpdate>) -> Objects {
        match update {
            Some(SourceUpdate::Replace(objects)) => objects,
            other => panic!("expected a Replace, got {other:?}"),
        }
    }

    fn names(services: &[ServiceRecord]) -> Vec<&str> {
        services.iter().map(|s| &*s.name.name).collect()
    }

    /// Lists all three kinds; returns the Replace.
    fn initial(m: &mut Merger) -> Objects {
        assert!(m.apply(Input::Service(Event::Init)).is_none());
        assert!(m
            .apply(Input::Service(Event::InitApply(svc("a", &[]))))
            .is_none());
        assert!(m
            .apply(Input::Service(Event::InitApply(svc(
                "other",
                &[(SERVICE_PROXY_NAME_LABEL, "x")]
            ))))
            .is_none());
        // Headless, from a server that ignored the field selector.
        let mut headless = svc("headless", &[]);
        headless.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some("None".into()),
            ..Default::default()
        });
        assert!(m
            .apply(Input::Service(Event::InitApply(headless)))
            .is_none());
        assert!(m.apply(Input::Service(Event::InitDone)).is_none());
        assert!(m.apply(Input::Slice(Event::Init)).is_none());
        assert!(m
            .apply(Input::Slice(Event::InitApply(slice("a-1"))))
            .is_none());
        assert!(m.apply(Input::Slice(Event::InitDone)).is_none());
        assert!(!m.initial_sent());
        assert!(m.apply(Input::Node(Event::Init)).is_none());
        assert!(m.apply(Input::Node(Event::InitApply(node("n1")))).is_none());
        assert!(m.apply(Input::Node(Event::InitDone)).is_none());
        assert!(m.apply(Input::ServiceCidr(Event::Init)).is_none());
        assert!(m
            .apply(Input::ServiceCidr(Event::InitApply(cidr(
                "kubernetes",
                &["10.96.0.0/16", "fd00:96::/108"]
            ))))
            .is_none());
        replace_of(m.apply(Input::ServiceCidr(Event::InitDone)))
    }

    fn cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        ServiceCIDR {
            metadata: meta("", name, &[]),
            spec: Some(k8s_openapi::api::networking::v1::ServiceCIDRSpec {
                cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
            }),
            status: None,
        }
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn service_cidrs_are_listed_with_the_rest_then_sent_whole_on_each_change() {
        let mut m = Merger::new("n1");
        let objects = initial(&mut m);
        assert_eq!(
            objects.service_cidrs,
            nets(&["10.96.0.0/16", "fd00:96::/108"])
        );
        match m.apply(Input::ServiceCidr(Event::Apply(cidr(
            "extra",
            &["10.97.0.0/16"],
        )))) {
            Some(SourceUpdate::ServiceCidrs(all)) => assert_eq!(
                all,
                nets(&["10.97.0.0/16", "10.96.0.0/16", "fd00:96::/108"]),
                "every object's ranges"
            ),
            other => panic!("expected ServiceCidrs, got {other:?}"),
        }
        match m.apply(Input::ServiceCidr(Event::Delete(cidr("kubernetes", &[])))) {
            Some(SourceUpdate::ServiceCidrs(all)) => assert_eq!(all, nets(&["10.97.0.0/16"])),
            other => panic!("expected ServiceCidrs, got {other:?}"),
        }
        // A list that fails for good (no such resource, or forbidden) does not block.
        assert!(m.apply(Input::ServiceCidrsUnavailable).is_none());
    }

    #[test]
    fn unavailable_service_cidrs_do_not_hold_back_the_first_replace() {
        let mut m = Merger::new("n1");
        for input in [
            Input::Service(Event::Init),
            Input::Service(Event::InitDone),
            Input::Slice(Event::Init),
            Input::Slice(Event::InitDone),
            Input::Node(Event::Init),
            Input::Node(Event::InitDone),
        ] {
            assert!(m.apply(input).is_none(), "waits for ServiceCIDRs");
        }
        let objects = replace_of(m.apply(Input::ServiceCidrsUnavailable));
        assert!(objects.service_cidrs.is_empty());
        // The resource appears later (RBAC granted): its list is a change like any other.
        assert!(m.apply(Input::ServiceCidr(Event::Init)).is_none());
        assert!(m
            .apply(Input::ServiceCidr(Event::InitApply(cidr(
                "k",
                &["10.96.0.0/16"]
            ))))
            .is_none());
        match m.apply(Input::ServiceCidr(Event::InitDone)) {
            Some(SourceUpdate::ServiceCidrs(all)) => assert_eq!(all, nets(&["10.96.0.0/16"])),
            other => panic!("expected ServiceCidrs, got {other:?}"),
        }
    }

    #[test]
    fn nothing_before_all_lists_then_one_replace() {
        let mut m = Merger::new("n1");
        let objects = initial(&mut m);
        assert!(m.initial_sent());
        assert_eq!(
            names(&objects.services),
            ["a"],
            "labelled and headless Services skipped"
        );
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert_eq!(
            objects.node.and_then(|n| n.metadata.name).as_deref(),
            Some("n1")
        );
    }

    #[test]
    fn events_before_the_first_replace_are_folded_into_it() {
        let mut m = Merger::new("n1");
        for input in [
            Input::Service(Event::Init),
            Input::Service(Event::InitDone),
            Input::Service(Event::Apply(svc("late", &[]))),
            Input::Node(Event::Init),
            Input::Node(Event::InitDone),
            Input::ServiceCidrsUnavailable,
            Input::Slice(Event::Init),
        ] {
            assert!(m.apply(input).is_none());
        }
        let objects = replace_of(m.apply(Input::Slice(Event::InitDone)));
        assert_eq!(names(&objects.services), ["late"]);
        assert!(objects.node.is_none());
    }

    #[test]
    fn incremental_after_replace() {
        let mut m = Merger::new("n1");
        initial(&mut m);
        assert!(matches!(
            m.apply(Input::Service(Event::Apply(svc("b", &[])))),
            Some(SourceUpdate::ServiceUpsert(_))
        ));
        assert!(matches!(
            m.apply(Input::Slice(Event::Delete(slice("a-1")))),
            Some(SourceUpdate::EndpointSliceDelete { ref name, .. }) if name == "a-1"
        ));
        // Deleting what we never had is not news.
        assert!(m.apply(Input::Slice(Event::Delete(slice("zz")))).is_none());
        // A Service relabelled to another proxy is a delete for us.
        assert!(matches!(
            m.apply(Input::Service(Event::Apply(svc("b", &[(HEADLESS_LABEL, "")])))),
            Some(SourceUpdate::ServiceDelete { ref name, .. }) if name == "b"
        ));
        assert!(matches!(
            m.apply(Input::Node(Event::Apply(node("n1")))),
            Some(SourceUpdate::Node(Some(_)))
        ));
        assert!(m.apply(Input::Node(Event::Apply(node("n2")))).is_none());
        assert!(matches!(
            m.apply(Input::Node(Event::Delete(node("n1")))),
            Some(SourceUpdate::Node(None))
        ));
    }

    #[test]
    fn relist_replaces_and_a_failed_relist_changes_nothing() {
        let mut m = Merger::new("n1");
        initial(&mut m);
        // A relist that dies halfway (list error, then a fresh Init) sends nothing.
        assert!(m.apply(Input::Service(Event::Init)).is_none());
        assert!(m
            .apply(Input::Service(Event::InitApply(svc("x", &[]))))
            .is_none());
        assert!(m.apply(Input::Service(Event::Init)).is_none());
        assert!(m
            .apply(Input::Service(Event::InitApply(svc("b", &[]))))
            .is_none());
        assert!(m
            .apply(Input::Service(Event::InitApply(svc("c", &[]))))
            .is_none());
        // The relist replaces the Services only: every listed record, and `a` removed.
        match m.apply(Input::Service(Event::InitDone)) {
            Some(SourceUpdate::Changes(changes)) => {
                assert_eq!(names(&changes.services), ["b", "c"], "x never was");
                assert_eq!(changes.removed_services, [ServiceName::new("ns", "a")]);
                assert!(changes.slices.is_empty() && changes.removed_slices.is_empty());
            }
            other => panic!("expected Changes, got {other:?}"),
        }
        // Only keys stay in the merger: a later delete of b is still recognised.
        assert!(matches!(
            m.apply(Input::Service(Event::Delete(svc("b", &[])))),
            Some(SourceUpdate::ServiceDelete { ref name, .. }) if name == "b"
        ));
        // A slice relist removes the slices the list no longer has.
        assert!(m.apply(Input::Slice(Event::Init)).is_none());
        match m.apply(Input::Slice(Event::InitDone)) {
            Some(SourceUpdate::Changes(changes)) => {
                assert!(changes.slices.is_empty());
                assert_eq!(
                    changes.removed_slices,
                    [("ns".to_string(), "a-1".to_string())]
                );
            }
            other => panic!("expected Changes, got {other:?}"),
        }
        // A Node relist hands over the Node alone.
        assert!(m.apply(Input::Node(Event::Init)).is_none());
        assert!(m.apply(Input::Node(Event::InitApply(node("n1")))).is_none());
        assert!(matches!(
            m.apply(Input::Node(Event::InitDone)),
            Some(SourceUpdate::Node(Some(_)))
        ));
    }
}
