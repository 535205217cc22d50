//! Which file defines which object, so that one changed file can be applied on its own.
//!
//! Each file is parsed alone. Across files the first definition in file name order wins
//! and later ones are reported as duplicates, as when every file was read in order. The
//! catalog keeps, per file, the keys of the objects it defines (winning or not) and, per
//! key, the files defining it in name order; not the records, which the tracker holds. When
//! a winning definition goes away while another file still defines the object, that file
//! is read again for its record ([`Delta::promoted`]): rare, it takes a duplicate.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use proxy_core::model::ServiceName;
use proxy_core::source::{Changes, Objects, ServiceRecord, SliceRecord, SourceUpdate};

use crate::parse::{
    duplicate_message, Defined, Kind, KnownDocuments, Object, ObjectKey, Place, Spot,
};
use crate::ManifestProblem;

/// What a file looked like when it was read: a different stamp means read it again.
/// Symlinks are followed, so a swap of a mounted ConfigMap's `..data` shows as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub len: u64,
    pub modified: Option<SystemTime>,
    pub inode: u64,
}

#[derive(Debug, Default)]
struct FileEntry {
    /// `None` when the file must be read again whatever its stamp (its last read failed).
    stamp: Option<FileStamp>,
    /// Every object the file defines, whether its definition wins or not, with its
    /// document's hash when that document can be skipped next time ([`Defined::document`]).
    keys: Vec<(Arc<ObjectKey>, Option<u64>)>,
    /// Its ServiceCIDRs' ranges: all ranges are sent whenever one changes.
    service_cidrs: Vec<(Arc<ObjectKey>, Vec<IpNet>)>,
}

/// One definition of an object.
#[derive(Debug)]
struct Def {
    file: Arc<Path>,
    spot: Spot,
}

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    files: HashMap<Arc<Path>, FileEntry>,
    /// Per object, its definitions in file name order: the first wins.
    defs: HashMap<Arc<ObjectKey>, Vec<Def>>,
    /// The ServiceCIDR ranges last sent (sorted, without duplicates).
    service_cidrs: Vec<IpNet>,
}

impl Catalog {
    /// The files read so far.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(|f| &**f)
    }

    pub fn contains(&self, file: &Path) -> bool {
        self.files.contains_key(file)
    }

    pub fn stamp(&self, file: &Path) -> Option<&FileStamp> {
        self.files.get(file).and_then(|e| e.stamp.as_ref())
    }

    /// The documents of `file`'s last read that need no parse if unchanged.
    pub fn known_documents(&self, file: &Path) -> KnownDocuments<'_> {
        let keys = self.files.get(file).map_or(&[][..], |e| &e.keys[..]);
        keys.iter()
            .filter_map(|(key, document)| Some((document.as_ref().copied()?, &**key)))
            .collect()
    }

    /// Makes the next read of `file` parse every document: it now holds the winning
    /// definition of an object whose record the tracker does not have from it.
    pub fn forget_documents(&mut self, file: &Path) {
        if let Some(entry) = self.files.get_mut(file) {
            for (_, document) in &mut entry.keys {
                *document = None;
            }
        }
    }

    /// Makes the next look at `file` read it whatever its stamp.
    pub fn forget_stamp(&mut self, file: &Path) {
        if let Some(entry) = self.files.get_mut(file) {
            entry.stamp = None;
        }
    }

    /// `file` now defines exactly `objects` (in the order read): records the changes.
    pub fn set_file(
        &mut self,
        file: &Path,
        stamp: FileStamp,
        objects: Vec<Defined>,
        delta: &mut Delta,
    ) {
        let (file, old) = match self.files.remove_entry(file) {
            Some((file, old)) => (file, old),
            None => (Arc::from(file), FileEntry::default()),
        };
        let kept: HashSet<&ObjectKey> = objects.iter().map(|d| &d.key).collect();
        for (key, _) in &old.keys {
            if !kept.contains(&**key) {
                self.undefine(key, &file, delta);
            }
        }
        let mut entry = FileEntry {
            stamp: Some(stamp),
            keys: Vec::with_capacity(objects.len()),
            service_cidrs: Vec::new(),
        };
        for Defined {
            key,
            spot,
            object,
            document,
        } in objects
        {
            let key = self.intern(key);
            let defs = self.defs.entry(Arc::clone(&key)).or_default();
            let pos = match defs.binary_search_by(|d| d.file.cmp(&file)) {
                Ok(pos) => {
                    defs[pos].spot = spot;
                    pos
                }
                Err(pos) => {
                    defs.insert(
                        pos,
                        Def {
                            file: Arc::clone(&file),
                            spot,
                        },
                    );
                    // A new first definition: the one that won until now is a duplicate.
                    if let (0, Some(former)) = (pos, defs.get(1)) {
                        let first = Place::new(&file, spot);
                        let later = Place::new(&former.file, former.spot);
                        delta
                            .problems
                            .push(later.problem(duplicate_message(&key, &first)));
                    }
                    pos
                }
            };
            if let Some(Object::ServiceCidr(ranges)) = &object {
                entry.service_cidrs.push((Arc::clone(&key), ranges.clone()));
            }
            if pos == 0 {
                // Without an object the definition is unchanged, and the tracker has it:
                // this file was already first (a file that becomes first is read whole).
                if let Some(object) = object {
                    delta.upsert(&key, object);
                }
            } else {
                let first = Place::new(&defs[0].file, defs[0].spot);
                let here = Place::new(&file, spot);
                delta
                    .problems
                    .push(here.problem(duplicate_message(&key, &first)));
            }
            entry.keys.push((key, document));
        }
        self.files.insert(file, entry);
    }

    /// `file` is gone: its objects go, unless another file defines them too.
    pub fn remove_file(&mut self, file: &Path, delta: &mut Delta) {
        let Some((file, old)) = self.files.remove_entry(file) else {
            return;
        };
        for (key, _) in &old.keys {
            self.undefine(key, &file, delta);
        }
    }

    /// Computes the ServiceCIDR ranges when one of them may have changed.
    pub fn finish(&mut self, delta: &mut Delta) {
        if !delta.service_cidrs_touched {
            return;
        }
        let mut ranges: Vec<IpNet> = Vec::new();
        for (file, entry) in &self.files {
            for (key, own) in &entry.service_cidrs {
                let wins = self
                    .defs
                    .get(key)
                    .and_then(|defs| defs.first())
                    .is_some_and(|first| first.file == *file);
                if wins {
                    ranges.extend(own);
                }
            }
        }
        ranges.sort_unstable();
        ranges.dedup();
        if ranges != self.service_cidrs {
            self.service_cidrs.clone_from(&ranges);
            delta.service_cidrs = Some(ranges);
        }
    }

    /// The shared key equal to `key`, so each key's strings are kept once.
    fn intern(&self, key: ObjectKey) -> Arc<ObjectKey> {
        match self.defs.get_key_value(&key) {
            Some((shared, _)) => Arc::clone(shared),
            None => Arc::new(key),
        }
    }

    /// `file` no longer defines `key`.
    fn undefine(&mut self, key: &Arc<ObjectKey>, file: &Arc<Path>, delta: &mut Delta) {
        let Some(defs) = self.defs.get_mut(key) else {
            return;
        };
        let Ok(pos) = defs.binary_search_by(|d| d.file.cmp(file)) else {
            return;
        };
        defs.remove(pos);
        match defs.first() {
            None => {
                self.defs.remove(key);
                delta.remove(key);
            }
            // The next definition applies now; its record is in its file.
            Some(next) if pos == 0 => {
                delta.promoted.insert(Arc::clone(&next.file));
            }
            Some(_) => {}
        }
        if key.0 == Kind::ServiceCidr {
            delta.service_cidrs_touched = true;
        }
    }
}

/// Upserts (`Some`) and deletions (`None`) by key; the last one for a key wins and keeps
/// the place of the first, so a first load lists objects in file order.
#[derive(Debug)]
struct Ops<K, V> {
    ops: Vec<(K, Option<V>)>,
    index: HashMap<K, usize>,
}

impl<K, V> Default for Ops<K, V> {
    fn default() -> Self {
        Ops {
            ops: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Ops<K, V> {
    fn set(&mut self, key: K, value: Option<V>) {
        match self.index.get(&key) {
            Some(&i) => self.ops[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.ops.len());
                self.ops.push((key, value));
            }
        }
    }

    fn counts(&self) -> (usize, usize) {
        let upserts = self.ops.iter().filter(|(_, v)| v.is_some()).count();
        (upserts, self.ops.len() - upserts)
    }

    /// The upserted values and the removed keys.
    fn split(self) -> (Vec<V>, Vec<K>) {
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for (key, value) in self.ops {
            match value {
                Some(value) => upserts.push(value),
                None => removed.push(key),
            }
        }
        (upserts, removed)
    }
}

/// What one reload changed, for the tracker, and what it found wrong.
#[derive(Debug, Default)]
pub(crate) struct Delta {
    services: Ops<ServiceName, ServiceRecord>,
    slices: Ops<(String, String), SliceRecord>,
    /// This node's Node, when it changed (`Some(None)`: no file defines it any more).
    node: Option<Option<Box<Node>>>,
    service_cidrs_touched: bool,
    /// All ServiceCIDR ranges, when they changed.
    service_cidrs: Option<Vec<IpNet>>,
    /// Files to read again: they now hold the winning definition of an object.
    pub promoted: BTreeSet<Arc<Path>>,
    pub problems: Vec<ManifestProblem>,
    /// Files read.
    pub files_read: usize,
}

/// How much a delta changes, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub services: usize,
    pub removed_services: usize,
    pub endpoint_slices: usize,
    pub removed_endpoint_slices: usize,
    pub node: bool,
    pub service_cidrs: bool,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        *self == Summary::default()
    }
}

impl Delta {
    fn upsert(&mut self, key: &ObjectKey, object: Object) {
        match object {
            Object::Service(record) => self.services.set(record.name.clone(), Some(record)),
            Object::Slice(record) => self.slices.set(
                (record.namespace.to_string(), record.name.to_string()),
                Some(record),
            ),
            Object::Node(node) => self.node = Some(Some(node)),
            Object::ServiceCidr(_) => {}
        }
        if key.0 == Kind::ServiceCidr {
            self.service_cidrs_touched = true;
        }
    }

    fn remove(&mut self, key: &ObjectKey) {
        let (kind, namespace, name) = key;
        match kind {
            Kind::Service => self
                .services
                .set(ServiceName::new(namespace.clone(), name.clone()), None),
            Kind::EndpointSlice => self.slices.set((namespace.clone(), name.clone()), None),
            Kind::Node => self.node = Some(None),
            Kind::ServiceCidr => self.service_cidrs_touched = true,
            // Lists are containers, never objects of their own.
            Kind::List => {}
        }
    }

    pub fn summary(&self) -> Summary {
        let (services, removed_services) = self.services.counts();
        let (endpoint_slices, removed_endpoint_slices) = self.slices.counts();
        Summary {
            services,
            removed_services,
            endpoint_slices,
            removed_endpoint_slices,
            node: self.node.is_some(),
            service_cidrs: self.service_cidrs.is_some(),
        }
    }

    /// The updates that bring the tracker from the last state to this one.
    pub fn into_updates(self) -> Vec<SourceUpdate> {
        let mut updates = Vec::new();
        let (services, removed_services) = self.services.split();
        let (slices, removed_slices) = self.slices.split();
        let changes = Changes {
            services,
            removed_services,
            slices,
            removed_slices,
        };
        if !changes.is_empty() {
            updates.push(SourceUpdate::Changes(changes));
        }
        if let Some(node) = self.node {
            updates.push(SourceUpdate::Node(node));
        }
        if let Some(ranges) = self.service_cidrs {
            updates.push(SourceUpdate::ServiceCidrs(ranges));
        }
        updates
    }

    /// Everything, for a first load (which only adds).
    pub fn into_objects(self) -> Objects {
        Objects {
            services: self.services.split().0,
            endpoint_slices: self.slices.split().0,
            node: self.node.flatten().map(|node| *node),
            service_cidrs: self.service_cidrs.unwrap_or_default(),
        }
    }
}
