//! Turning documents into Kubernetes objects, collecting problems along the way.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_core::convert;
use proxy_core::source::{ServiceRecord, SliceRecord};
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::{MessageFormatter, Spanned};

use crate::split::{split_documents, Document};
use crate::ManifestProblem;

/// Namespace given to namespaced objects that do not name one, as `kubectl apply` does.
const DEFAULT_NAMESPACE: &str = "default";

/// Parser limits for one document. The defaults of serde-saphyr are already bounded; these
/// are tightened where a manifest has no business coming close, so a hostile file costs
/// little memory and time.
fn yaml_options() -> serde_saphyr::Options {
    let mut alias_limits = serde_saphyr::options::AliasLimits::default();
    alias_limits.max_total_replayed_events = 100_000;
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: 64,
            max_nodes: 1_000_000,
            max_events: 4_000_000,
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_documents: 1,
            max_total_scalar_bytes: 64 * 1024 * 1024,
        },
        alias_limits: alias_limits,
        // Our own problem messages carry the location; a snippet would be noise in logs.
        with_snippet: false,
    }
}

/// The two fields that say what a document is; everything else is ignored at this stage.
#[derive(Debug, Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
    List,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
            Kind::List => "List",
        }
    }

    /// The API versions read as this kind; the first is the current one.
    fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            // v1beta1 (before Kubernetes 1.33) has the same `spec.cidrs`.
            Kind::ServiceCidr => &["networking.k8s.io/v1", "networking.k8s.io/v1beta1"],
            Kind::Service | Kind::Node | Kind::List => &["v1"],
        }
    }
}

/// The kind a document most likely is, from its top-level `apiVersion:` and `kind:`
/// lines read as text: each must be there once, at the start of a line, with a plain
/// value. Only a guess (those lines could sit inside a multi-line flow value): the
/// document is then parsed as that kind, whose type refuses another `apiVersion` or
/// `kind`, and whatever does not parse is read the careful way, kind first.
fn guess_kind(text: &str) -> Option<Kind> {
    let (mut api_version, mut kind) = (None, None);
    for line in text.lines() {
        let (field, rest) = if let Some(rest) = line.strip_prefix("apiVersion:") {
            (&mut api_version, rest)
        } else if let Some(rest) = line.strip_prefix("kind:") {
            (&mut kind, rest)
        } else {
            continue;
        };
        let value = rest.trim();
        let plain = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'-'));
        if field.is_some() || !plain {
            return None;
        }
        *field = Some(value.to_owned());
    }
    let meta = TypeMeta { api_version, kind };
    classify(&meta, false).ok().flatten()
}

/// Which kind a document is: `Ok(None)` for kinds this source does not use.
fn classify(meta: &TypeMeta, allow_list: bool) -> Result<Option<Kind>, String> {
    let kind = meta.kind.as_deref().filter(|k| !k.is_empty());
    let api_version = meta.api_version.as_deref().filter(|v| !v.is_empty());
    let (kind, api_version) = match (kind, api_version) {
        (Some(k), Some(v)) => (k, v),
        (None, None) => return Err("missing apiVersion and kind".to_owned()),
        (None, Some(_)) => return Err("missing kind".to_owned()),
        (Some(_), None) => return Err("missing apiVersion".to_owned()),
    };
    let known = match kind {
        "Service" => Kind::Service,
        "EndpointSlice" => Kind::EndpointSlice,
        "Node" => Kind::Node,
        "ServiceCIDR" => Kind::ServiceCidr,
        "List" if allow_list => Kind::List,
        _ => return Ok(None),
    };
    if !known.api_versions().contains(&api_version) {
        return Err(format!(
            "{kind} has apiVersion {api_version:?}, expected {:?}",
            known.api_versions()[0]
        ));
    }
    Ok(Some(known))
}

/// Identity of an object among all the files: kind, namespace, name.
pub(crate) type ObjectKey = (Kind, String, String);

/// Where in its file an object is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spot {
    pub document: usize,
    pub line: u64,
}

/// Where an object was read, to name both places when a duplicate shows up.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub file: PathBuf,
    pub document: usize,
    pub line: u64,
}

impl Place {
    pub fn new(file: &Path, spot: Spot) -> Self {
        Place {
            file: file.to_owned(),
            document: spot.document,
            line: spot.line,
        }
    }

    fn spot(&self) -> Spot {
        Spot {
            document: self.document,
            line: self.line,
        }
    }

    /// A problem at this place.
    pub fn problem(&self, message: String) -> ManifestProblem {
        ManifestProblem {
            file: self.file.clone(),
            document: self.document,
            line: Some(self.line),
            column: None,
            message,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (document {})",
            self.file.display(),
            self.line,
            self.document
        )
    }
}

/// The problem text for a second definition of `key`.
pub(crate) fn duplicate_message(key: &ObjectKey, first: &Place) -> String {
    match key.0 {
        Kind::Node => format!("duplicate Node {:?}: first defined at {first}", key.2),
        kind => format!(
            "duplicate {} {}/{}: first defined at {first}",
            kind.name(),
            key.1,
            key.2
        ),
    }
}

/// An object as this source keeps it, converted as it is read.
#[derive(Debug)]
pub(crate) enum Object {
    Service(ServiceRecord),
    Slice(SliceRecord),
    Node(Box<Node>),
    ServiceCidr(Vec<IpNet>),
}

/// One object a file defines.
#[derive(Debug)]
pub(crate) struct Defined {
    pub key: ObjectKey,
    pub spot: Spot,
    /// `None`: its document's text is the same as when the file was last read (see
    /// [`KnownDocuments`]), so the object is the one read then.
    pub object: Option<Object>,
    /// Its document's hash, when the document defines this one Service or EndpointSlice
    /// and nothing is wrong with it: the next read of the file can then skip it.
    pub document: Option<u64>,
}

/// The documents of a file as last read, by their text's hash (see
/// [`Defined::document`]): a document whose text hashes the same when the file is read
/// again is not parsed again. Hashed with a per-process random key, so no file can be
/// written to collide with another's document.
pub(crate) type KnownDocuments<'a> = HashMap<u64, &'a ObjectKey>;

fn document_hash(doc: &Document<'_>) -> u64 {
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(doc.text)
}

/// Reads the documents of one file: its objects (within the file, the first definition of
/// a name wins and later ones are problems) and its problems.
pub(crate) struct Loader<'a> {
    node_name: &'a str,
    objects: Vec<Defined>,
    problems: Vec<ManifestProblem>,
    seen: HashMap<ObjectKey, Place>,
}

impl<'a> Loader<'a> {
    pub fn new(node_name: &'a str) -> Self {
        Self {
            node_name,
            objects: Vec::new(),
            problems: Vec::new(),
            seen: HashMap::new(),
        }
    }

    pub fn finish(self) -> (Vec<Defined>, Vec<ManifestProblem>) {
        (self.objects, self.problems)
    }

    /// Reads `text`, parsing only the documents not `known` from the file's last read.
    pub fn add_file(&mut self, file: &Path, text: &str, known: &KnownDocuments<'_>) {
        self.add_file_on(file, text, known, parse_workers());
    }

    /// Documents are parsed a batch at a time on `workers` threads (the YAML parse is
    /// nearly all the cost of a load), then applied in file order, so problems and
    /// duplicates come out as a sequential read gives them. Batches bound how many
    /// parsed objects wait at once.
    fn add_file_on(&mut self, file: &Path, text: &str, known: &KnownDocuments<'_>, workers: usize) {
        // A UTF-8 byte order mark would hide a `---` on the first line from the splitter.
        let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
        let docs = split_documents(text);
        for batch in docs.chunks(PARSE_BATCH) {
            let hashes = on_threads(batch, workers, document_hash);
            let fresh: Vec<Document<'_>> = batch
                .iter()
                .zip(&hashes)
                .filter(|(_, hash)| !known.contains_key(hash))
                .map(|(doc, _)| doc.clone())
                .collect();
            let mut parsed = on_threads(&fresh, workers, parse_document).into_iter();
            for (doc, hash) in batch.iter().zip(hashes) {
                if let Some(key) = known.get(&hash) {
                    self.add_known(file, doc, hash, key);
                    continue;
                }
                // `fresh` holds exactly the documents not known, in order.
                let Some(parsed) = parsed.next() else { break };
                let (objects, problems) = (self.objects.len(), self.problems.len());
                let single = matches!(
                    parsed,
                    Parsed::Service(_)
                        | Parsed::Slice(_)
                        | Parsed::Meta(_, Typed::Service(Ok(_)) | Typed::Slice(Ok(_)))
                );
                self.add_document(file, doc, parsed);
                if single && self.objects.len() == objects + 1 && self.problems.len() == problems {
                    self.objects[objects].document = Some(hash);
                }
            }
        }
    }

    /// A document with the same text as in the file's last read, where it defined `key`.
    fn add_known(&mut self, file: &Path, doc: &Document<'_>, hash: u64, key: &ObjectKey) {
        let place = Place {
            file: file.to_owned(),
            document: doc.index,
            line: doc.content_line,
        };
        if self.claim(key, &place) {
            self.objects.push(Defined {
                key: key.clone(),
                spot: place.spot(),
                object: None,
                document: Some(hash),
            });
        }
    }

    fn add_document(&mut self, file: &Path, doc: &Document<'_>, parsed: Parsed) {
        let place = Place {
            file: file.to_owned(),
            document: doc.index,
            line: doc.content_line,
        };
        let (meta, typed) = match parsed {
            Parsed::Service(service) => return self.add_service(*service, place),
            Parsed::Slice(slice) => return self.add_endpoint_slice(*slice, place),
            Parsed::Yaml(err) => return self.yaml_problem(file, doc, &err, ""),
            Parsed::Meta(meta, typed) => (meta, typed),
        };
        match typed {
            Typed::Invalid(message) => self.problem(&place, message),
            Typed::Unrelated => tracing::debug!(
                file = %file.display(),
                document = doc.index,
                api_version = meta.api_version.as_deref().unwrap_or_default(),
                kind = meta.kind.as_deref().unwrap_or_default(),
                "ignoring object of an unrelated kind"
            ),
            Typed::Service(Ok(service)) => self.add_service(*service, place),
            Typed::Service(Err(err)) => self.yaml_problem(file, doc, &err, "Service: "),
            Typed::Slice(Ok(slice)) => self.add_endpoint_slice(*slice, place),
            Typed::Slice(Err(err)) => self.yaml_problem(file, doc, &err, "EndpointSlice: "),
            Typed::Node(Ok(node)) => self.add_node(*node, place),
            Typed::Node(Err(err)) => self.yaml_problem(file, doc, &err, "Node: "),
            Typed::ServiceCidr(Ok(cidr)) => self.add_service_cidr((*cidr).into(), place),
            Typed::ServiceCidr(Err(err)) => self.yaml_problem(file, doc, &err, "ServiceCIDR: "),
            Typed::List => self.add_list(file, doc),
        }
    }

    /// A `v1` `List`: read the items' kinds first, then parse only the interesting items into
    /// their types in a second pass, so type errors keep exact locations.
    fn add_list(&mut self, file: &Path, doc: &Document<'_>) {
        #[derive(Deserialize)]
        struct ListHeader {
            #[serde(default)]
            items: Option<Vec<Spanned<TypeMeta>>>,
        }

        let header: ListHeader = match parse(doc.text) {
            Ok(header) => header,
            Err(err) => return self.yaml_problem(file, doc, &err, "List: "),
        };
        let mut kinds = Vec::new();
        let mut places = Vec::new();
        for (i, item) in header.items.unwrap_or_default().iter().enumerate() {
            let line = match item.referenced.line() {
                0 => doc.content_line,
                line => doc.file_line(line),
            };
            let place = Place {
                file: file.to_owned(),
                document: doc.index,
                line,
            };
            let kind = match classify(&item.value, false) {
                Ok(kind) => kind,
                Err(message) => {
                    self.problem(&place, format!("List item {}: {message}", i + 1));
                    None
                }
            };
            if kind.is_none() {
                tracing::debug!(
                    file = %file.display(),
                    document = doc.index,
                    item = i + 1,
                    "ignoring List item of an unrelated or invalid kind"
                );
            }
            kinds.push(kind);
            places.push(place);
        }
        if kinds.iter().all(Option::is_none) {
            return;
        }

        let seed = ListSeed { kinds: &kinds };
        let result =
            serde_saphyr::with_deserializer_from_str_with_options(doc.text, yaml_options(), |de| {
                seed.deserialize(de)
            });
        let items = match result {
            Ok(items) => items,
            // serde cannot resume after a failed element, so one bad item costs the List.
            Err(err) => return self.yaml_problem(file, doc, &err, "List (skipped): "),
        };
        for (item, place) in items.into_iter().zip(places) {
            match item {
                Item::Service(service) => self.add_service(*service, place),
                Item::EndpointSlice(slice) => self.add_endpoint_slice(*slice, place),
                Item::Node(node) => self.add_node(*node, place),
                Item::ServiceCidr(cidr) => self.add_service_cidr(*cidr, place),
                Item::Skipped => {}
            }
        }
    }

    fn add_service(&mut self, mut service: Service, place: Place) {
        if let Some(key) = self.register(Kind::Service, &mut service.metadata, &place) {
            // Converted at once: a cluster's raw objects are not kept (see `Objects`).
            self.define(key, &place, Object::Service(ServiceRecord::new(&service)));
        }
    }

    fn add_endpoint_slice(&mut self, mut slice: EndpointSlice, place: Place) {
        if let Some(key) = self.register(Kind::EndpointSlice, &mut slice.metadata, &place) {
            let record = SliceRecord::new(&slice, self.node_name);
            self.define(key, &place, Object::Slice(record));
        }
    }

    fn add_service_cidr(&mut self, mut object: ServiceCIDR, place: Place) {
        if let Some(key) = self.register(Kind::ServiceCidr, &mut object.metadata, &place) {
            let mut warnings = Vec::new();
            let ranges = convert::service_cidr_ranges(&object, &mut warnings);
            for message in warnings {
                self.problem(&place, message);
            }
            self.define(key, &place, Object::ServiceCidr(ranges));
        }
    }

    fn add_node(&mut self, node: Node, place: Place) {
        if node.metadata.name.as_deref() != Some(self.node_name) {
            tracing::debug!(
                file = %place.file.display(),
                document = place.document,
                node = node.metadata.name.as_deref().unwrap_or_default(),
                "ignoring the Node of another node"
            );
            return;
        }
        let key = (Kind::Node, String::new(), self.node_name.to_owned());
        if self.claim(&key, &place) {
            self.define(key, &place, Object::Node(Box::new(node)));
        }
    }

    fn define(&mut self, key: ObjectKey, place: &Place, object: Object) {
        self.objects.push(Defined {
            key,
            spot: place.spot(),
            object: Some(object),
            document: None,
        });
    }

    /// Defaults the namespace and checks name and uniqueness; `None` means skip the object.
    fn register(&mut self, kind: Kind, meta: &mut ObjectMeta, place: &Place) -> Option<ObjectKey> {
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            self.problem(place, format!("{} has no metadata.name", kind.name()));
            return None;
        };
        let namespace = match meta.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => {
                meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
                DEFAULT_NAMESPACE.to_owned()
            }
        };
        let key = (kind, namespace, name);
        self.claim(&key, place).then_some(key)
    }

    /// Whether `key` is new in this file; a second definition is a problem.
    fn claim(&mut self, key: &ObjectKey, place: &Place) -> bool {
        if let Some(first) = self.seen.get(key) {
            let message = duplicate_message(key, first);
            self.problem(place, message);
            return false;
        }
        self.seen.insert(key.clone(), place.clone());
        true
    }

    fn problem(&mut self, place: &Place, message: String) {
        self.problems.push(place.problem(message));
    }

    fn yaml_problem(
        &mut self,
        file: &Path,
        doc: &Document<'_>,
        err: &serde_saphyr::Error,
        prefix: &str,
    ) {
        let (line, column) = match err.location() {
            Some(loc) if loc.line() > 0 => (
                doc.file_line(loc.line()),
                Some(loc.column()).filter(|c| *c > 0),
            ),
            _ => (doc.content_line, None),
        };
        let message = serde_saphyr::DefaultMessageFormatter.format_message(err.without_snippet());
        self.problems.push(ManifestProblem {
            file: file.to_owned(),
            document: doc.index,
            line: Some(line),
            column,
            message: format!("{prefix}{message}"),
        });
    }
}

/// Documents parsed per batch (see [`Loader::add_file_on`]).
const PARSE_BATCH: usize = 512;

/// At most this many threads parse one file: past a few, the in-order apply and the
/// memory of parsed objects waiting for it outweigh the gain.
const MAX_PARSE_WORKERS: usize = 4;

fn parse_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_PARSE_WORKERS)
}

/// One document, parsed but not yet applied.
enum Parsed {
    /// Guessed and parsed in one go (see [`guess_kind`]).
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    /// Not YAML, or no mapping with string `apiVersion` and `kind`.
    Yaml(Box<serde_saphyr::Error>),
    Meta(TypeMeta, Typed),
}

/// A parsed document or its error, boxed: both are large, and a batch holds hundreds.
type Boxed<T> = Result<Box<T>, Box<serde_saphyr::Error>>;

fn parse_boxed<T: DeserializeOwned>(text: &str) -> Boxed<T> {
    parse(text).map(Box::new).map_err(Box::new)
}

/// A document as its kind's type.
enum Typed {
    /// A kind or API version this source refuses; the message says why.
    Invalid(String),
    Unrelated,
    Service(Boxed<Service>),
    Slice(Boxed<EndpointSlice>),
    Node(Boxed<Node>),
    ServiceCidr(Boxed<ServiceCidrDocument>),
    /// Parsed when applied: its items' kinds decide how.
    List,
}

/// Parses one document: one parse instead of two for the kinds that make up nearly all
/// of a large load; anything the guess or that parse does not settle takes the careful
/// way, its kind first, then as that kind's type.
fn parse_document(doc: &Document<'_>) -> Parsed {
    match guess_kind(doc.text) {
        Some(Kind::Service) => {
            if let Ok(service) = parse(doc.text) {
                return Parsed::Service(Box::new(service));
            }
        }
        Some(Kind::EndpointSlice) => {
            if let Ok(slice) = parse(doc.text) {
                return Parsed::Slice(Box::new(slice));
            }
        }
        _ => {}
    }
    let meta: TypeMeta = match parse(doc.text) {
        Ok(meta) => meta,
        Err(err) => return Parsed::Yaml(Box::new(err)),
    };
    let typed = match classify(&meta, true) {
        Err(message) => Typed::Invalid(message),
        Ok(None) => Typed::Unrelated,
        Ok(Some(Kind::Service)) => Typed::Service(parse_boxed(doc.text)),
        Ok(Some(Kind::EndpointSlice)) => Typed::Slice(parse_boxed(doc.text)),
        Ok(Some(Kind::Node)) => Typed::Node(parse_boxed(doc.text)),
        Ok(Some(Kind::ServiceCidr)) => Typed::ServiceCidr(parse_boxed(doc.text)),
        Ok(Some(Kind::List)) => Typed::List,
    };
    Parsed::Meta(meta, typed)
}

/// `work` over `docs` on up to `workers` threads, each a contiguous share; results in
/// order.
fn on_threads<T: Send>(
    docs: &[Document<'_>],
    workers: usize,
    work: fn(&Document<'_>) -> T,
) -> Vec<T> {
    if workers <= 1 || docs.len() < 2 * workers {
        return docs.iter().map(work).collect();
    }
    let share = docs.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = docs
            .chunks(share)
            .map(|part| scope.spawn(move || part.iter().map(work).collect::<Vec<_>>()))
            .collect();
        let mut out = Vec::with_capacity(docs.len());
        for handle in handles {
            match handle.join() {
                Ok(parsed) => out.extend(parsed),
                // As if the parse had run on this thread.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// A ServiceCIDR of either API version: k8s-openapi's type accepts only `v1`, and
/// `v1beta1` (before Kubernetes 1.33) has the same fields.
#[derive(Deserialize)]
struct ServiceCidrDocument {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<ServiceCIDRSpec>,
}

impl From<ServiceCidrDocument> for ServiceCIDR {
    fn from(doc: ServiceCidrDocument) -> Self {
        ServiceCIDR {
            metadata: doc.metadata,
            spec: doc.spec,
            status: None,
        }
    }
}

enum Item {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    ServiceCidr(Box<ServiceCIDR>),
    Skipped,
}

/// Deserializes a List document, reading `items[i]` as the type `kinds[i]` names.
struct ListSeed<'k> {
    kinds: &'k [Option<Kind>],
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<Item>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<Item>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = map.next_value_seed(ItemsSeed { kinds: self.kinds })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(items)
    }
}

struct ItemsSeed<'k> {
    kinds: &'k [Option<Kind>],
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<Item>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<Item>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(self.kinds.len());
        // The first pass read the same text, so the lengths agree; the early return and the
        // trailing drain only keep this function total without an unwrap.
        for kind in self.kinds {
            let item = match kind {
                Some(Kind::Service) => seq.next_element()?.map(|s| Item::Service(Box::new(s))),
                Some(Kind::EndpointSlice) => seq
                    .next_element()?
                    .map(|s| Item::EndpointSlice(Box::new(s))),
                Some(Kind::Node) => seq.next_element()?.map(|n| Item::Node(Box::new(n))),
                Some(Kind::ServiceCidr) => seq
                    .next_element::<ServiceCidrDocument>()?
                    .map(|c| Item::ServiceCidr(Box::new(c.into()))),
                Some(Kind::List) | None => seq.next_element::<IgnoredAny>()?.map(|_| Item::Skipped),
            };
            match item {
                Some(item) => items.push(item),
                None => return Ok(items),
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(items)
    }

    // `items: null` or `items: ~`.
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of many documents, with duplicates, broken documents and problems spread
    /// over several parse batches: parsed on four threads it gives exactly what a
    /// sequential read gives (objects, places, problems, their order).
    #[test]
    fn parallel_parse_reads_a_file_as_a_sequential_read_does() {
        let mut text = String::new();
        for i in 0..1300 {
            let name = if i % 97 == 0 { 0 } else { i };
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{name}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports:\n  - port: 80\n",
                i / 250,
                i % 250
            ));
            if i % 211 == 0 {
                text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: [unclosed\n");
            }
            if i % 307 == 0 {
                text.push_str("---\nkind: Service\nmetadata:\n  name: nokind\n");
            }
        }
        let read = |workers| {
            let mut loader = Loader::new("node");
            loader.add_file_on(Path::new("big.yaml"), &text, &HashMap::new(), workers);
            let (objects, problems) = loader.finish();
            (
                format!("{objects:?}"),
                format!("{problems:?}"),
                objects.len(),
                problems.len(),
            )
        };
        let sequential = read(1);
        assert!(sequential.2 > 1200, "{} objects", sequential.2);
        assert!(sequential.3 > 20, "{} problems", sequential.3);
        assert_eq!(read(4), sequential);
    }

    #[test]
    fn kind_is_guessed_only_from_plain_top_level_lines() {
        let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n";
        assert_eq!(guess_kind(service), Some(Kind::Service));
        let slice = "---\nkind: EndpointSlice  \napiVersion: discovery.k8s.io/v1\n";
        assert_eq!(guess_kind(slice), Some(Kind::EndpointSlice));
        for unsure in [
            "apiVersion: v1\nkind: \"Service\"\n",
            "apiVersion: v1\nkind: Service\nkind: Node\n",
            "apiVersion: v1\nmetadata:\n  kind: Service\n",
            "apiVersion: v1\nkind: Service # a comment\n",
            "apiVersion: discovery.k8s.io/v1\nkind: Service\n",
            "apiVersion: v1\nkind: List\n",
        ] {
            assert_eq!(guess_kind(unsure), None, "{unsure:?}");
        }
    }
}
