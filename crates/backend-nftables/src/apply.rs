//! The applier: the one place that hands rules to the kernel.

use std::io::Write as _;
use std::process::{Command, Stdio};

use std::collections::{BTreeMap, HashMap};

use proxy_core::proxier::{DestinationKind, ProxierError, ServiceTraffic};

use proxy_core::model::{IpFamily, ProxyState};

use crate::netlink::{
    encode_ops_in, list_requests, ops_text_in, parse_chain, parse_set, Object, TableOp,
};
use crate::plan::service_counter_name;
use crate::plan::TABLE;
use crate::readback::{
    counters_request, elements_request, generation_request, parse_counter_values, parse_elements,
    parse_generation, rules_request, CounterValues, RawElement, RulesDigest, SetDigest,
};

/// Hands changes to the kernel: [`TableOp`]s, as one transaction each (the nftables,
/// userspace and ipvs modes' tables).
pub trait NftRunner {
    /// Runs one `nft` script as one atomic transaction: what the default [`apply_in`]
    /// does with the ops' text (a recording runner records it; `nft --check` in tests).
    /// The product's runner ([`NftCommand`]) never reaches it outside check mode.
    ///
    /// [`apply_in`]: NftRunner::apply_in
    fn run(&mut self, script: &str) -> Result<(), ProxierError>;

    /// Applies `ops` on our tables in order as one atomic transaction; returns its size
    /// in bytes.
    fn apply(&mut self, ops: &[TableOp<'_>]) -> Result<usize, ProxierError> {
        self.apply_in(TABLE, ops)
    }

    /// Applies `ops` on the tables named `table` (one per family) in order as one atomic
    /// transaction; returns its size in bytes. By default as `nft` commands.
    fn apply_in(&mut self, table: &str, ops: &[TableOp<'_>]) -> Result<usize, ProxierError> {
        let script = ops_text_in(table, ops);
        self.run(&script)?;
        Ok(script.len())
    }

    /// The chains and named sets our table of `family` has in the kernel; `None` when
    /// this runner cannot tell (then nothing is deleted).
    fn existing_objects(&mut self, family: IpFamily) -> Result<Option<Vec<Object>>, ProxierError> {
        let _ = family;
        Ok(None)
    }

    /// The named counters our table of `family` has in the kernel; `None` when this
    /// runner cannot tell (then none is deleted).
    fn existing_counters(&mut self, family: IpFamily) -> Result<Option<Vec<String>>, ProxierError> {
        let _ = family;
        Ok(None)
    }

    /// Our table of `family` as the kernel holds it: its chains and named sets, a digest
    /// of its rules, and a digest of the elements of each map in `maps`. `None` when this
    /// runner cannot read the kernel back (a re-sync then rewrites everything).
    fn read_back(
        &mut self,
        family: IpFamily,
        maps: &[String],
    ) -> Result<Option<KernelTable>, ProxierError> {
        let _ = (family, maps);
        Ok(None)
    }

    /// Whether nothing anywhere in nftables has been committed since this runner's last
    /// commit; `false` when it cannot tell.
    fn unchanged_since_last_commit(&mut self) -> Result<bool, ProxierError> {
        Ok(false)
    }

    /// The elements of one map of our table of `family`, as the kernel holds them.
    fn map_elements(
        &mut self,
        family: IpFamily,
        map: &str,
    ) -> Result<Option<Vec<RawElement>>, ProxierError> {
        let _ = (family, map);
        Ok(None)
    }

    /// Our table of `family` read back once, as [`read_back`] with a digest of every named
    /// set and map `want` does not skip, and also the elements of those it keeps (so a
    /// restarted proxy reads each map once for its slots and its digest). `None` as for
    /// [`read_back`]. By default from those two calls.
    ///
    /// [`read_back`]: NftRunner::read_back
    fn read_table(
        &mut self,
        family: IpFamily,
        want: &dyn Fn(&str) -> Want,
    ) -> Result<Option<TableRead>, ProxierError> {
        let Some(objects) = self.existing_objects(family)? else {
            return Ok(None);
        };
        let (digests, kept) = wanted_sets(&objects, want);
        let Some(table) = self.read_back(family, &digests)? else {
            return Ok(None);
        };
        let mut elements = BTreeMap::new();
        for name in kept {
            if let Some(found) = self.map_elements(family, &name)? {
                elements.insert(name, found);
            }
        }
        Ok(Some(TableRead { table, elements }))
    }

    /// The kernel's nftables ruleset generation (it grows with every commit, in any
    /// table); `None` when this runner cannot tell.
    fn generation(&mut self) -> Result<Option<u32>, ProxierError> {
        Ok(None)
    }
}

/// What [`NftRunner::read_table`] does with one named set or map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Skip,
    Digest,
    /// Its digest and its elements.
    Elements,
}

/// What [`NftRunner::read_table`] found: the table, and the elements of the maps kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableRead {
    pub table: KernelTable,
    pub elements: BTreeMap<String, Vec<RawElement>>,
}

/// The sets among `objects` to digest (kept ones included), and those to keep.
fn wanted_sets(objects: &[Object], want: &dyn Fn(&str) -> Want) -> (Vec<String>, Vec<String>) {
    let (mut digests, mut kept) = (Vec::new(), Vec::new());
    for object in objects {
        let Object::Set { name, .. } = object else {
            continue;
        };
        match want(name) {
            Want::Skip => {}
            Want::Digest => digests.push(name.clone()),
            Want::Elements => {
                digests.push(name.clone());
                kept.push(name.clone());
            }
        }
    }
    (digests, kept)
}

/// What [`NftRunner::read_back`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelTable {
    pub objects: Vec<Object>,
    pub rules: RulesDigest,
    pub maps: BTreeMap<String, SetDigest>,
}

/// Sends changes to the kernel as nfnetlink batches over a socket that stays open, and
/// reads the table back the same way. `nft` runs only in check mode and for a script
/// handed to `run` (tests).
pub struct NftCommand {
    program: String,
    /// `--check`: parse and validate against the kernel without committing.
    check_only: bool,
    socket: Option<netlink::Socket>,
    /// The ruleset generation right after our last commit, when nobody else committed
    /// around it: while the kernel still reports it, nothing anywhere has changed.
    generation: Option<u32>,
    /// Elements added or deleted since start (flushes not counted).
    elements_sent: u64,
    /// Sets and maps whose elements were read back since start.
    sets_read: u64,
}

impl std::fmt::Debug for NftCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftCommand")
            .field("program", &self.program)
            .field("check_only", &self.check_only)
            .field("socket_open", &self.socket.is_some())
            .finish()
    }
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: "nft".into(),
            check_only: false,
            socket: None,
            generation: None,
            elements_sent: 0,
            sets_read: 0,
        }
    }
}

impl NftCommand {
    /// Whether changes have gone over netlink (for tests).
    pub fn netlink_open(&self) -> bool {
        self.socket.is_some()
    }

    /// Whether it knows the ruleset generation of its last commit (the periodic re-sync
    /// then needs one request while nobody else commits), for tests.
    pub fn generation_known(&self) -> bool {
        self.generation.is_some()
    }

    /// Elements added or deleted over netlink so far (for tests and benchmarks).
    pub fn elements_sent(&self) -> u64 {
        self.elements_sent
    }

    /// Sets and maps whose elements were read back so far (each dump counts; for tests).
    pub fn sets_read(&self) -> u64 {
        self.sets_read
    }

    /// A runner that only validates (`nft --check`), for tests.
    pub fn check_only() -> Self {
        NftCommand {
            check_only: true,
            ..NftCommand::default()
        }
    }
}

/// Keeps the first lines of the tool's complaint: enough to see what failed, bounded so
/// a huge error does not flood the log.
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().take(12).collect();
    let mut out = lines.join("\n");
    if out.len() > 4000 {
        out.truncate(4000);
    }
    out
}

impl NftRunner for NftCommand {
    fn run(&mut self, script: &str) -> Result<(), ProxierError> {
        self.committing(1, |me| me.run_nft(script))
    }

    /// One nfnetlink batch: a full load (skeleton, every element, deletions) or a delta
    /// commits at once, so old elements serve traffic until the new ones are in.
    fn apply_in(&mut self, table: &str, ops: &[TableOp<'_>]) -> Result<usize, ProxierError> {
        if self.check_only {
            let script = ops_text_in(table, ops);
            self.run_nft(&script)?;
            return Ok(script.len());
        }
        self.committing(1, |me| me.send_batch(table, ops))
    }

    fn unchanged_since_last_commit(&mut self) -> Result<bool, ProxierError> {
        let Some(ours) = self.generation else {
            return Ok(false);
        };
        Ok(self.read_generation()? == ours)
    }

    fn existing_objects(&mut self, family: IpFamily) -> Result<Option<Vec<Object>>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        let socket = self.socket()?;
        let failed = |e: netlink::RequestError| {
            ProxierError::Other(format!("listing our nftables objects: {e}"))
        };
        let [chains, sets] = list_requests(family, || socket.next_seq());
        let mut out = Vec::new();
        for payload in socket.request(&chains).map_err(failed)? {
            out.extend(parse_chain(&payload).map_err(|e| failed(e.into()))?);
        }
        for payload in socket.request(&sets).map_err(failed)? {
            out.extend(parse_set(&payload).map_err(|e| failed(e.into()))?);
        }
        Ok(Some(out))
    }

    fn existing_counters(&mut self, family: IpFamily) -> Result<Option<Vec<String>>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        let socket = self.socket()?;
        let counters = dump_counters(socket, family)
            .map_err(|e| ProxierError::Other(format!("listing our nftables counters: {e}")))?;
        Ok(Some(counters.into_iter().map(|c| c.name).collect()))
    }

    fn read_back(
        &mut self,
        family: IpFamily,
        maps: &[String],
    ) -> Result<Option<KernelTable>, ProxierError> {
        let wanted = |name: &str| {
            if maps.iter().any(|m| m == name) {
                Want::Digest
            } else {
                Want::Skip
            }
        };
        Ok(self.read_table(family, &wanted)?.map(|read| read.table))
    }

    fn read_table(
        &mut self,
        family: IpFamily,
        want: &dyn Fn(&str) -> Want,
    ) -> Result<Option<TableRead>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        match self.read_table_over_netlink(family, want) {
            Ok(read) => Ok(read),
            // No table at all: the caller rewrites it.
            Err(netlink::RequestError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                Ok(Some(TableRead::default()))
            }
            Err(e) => Err(ProxierError::Other(format!(
                "reading our nftables table back: {e}"
            ))),
        }
    }

    fn generation(&mut self) -> Result<Option<u32>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        self.read_generation().map(Some)
    }

    fn map_elements(
        &mut self,
        family: IpFamily,
        map: &str,
    ) -> Result<Option<Vec<RawElement>>, ProxierError> {
        if self.check_only {
            return Ok(None);
        }
        self.sets_read += 1;
        let socket = self.socket()?;
        let request = elements_request(family, map, socket.next_seq());
        let mut out = Vec::new();
        socket
            .request_each(&request, |payload| {
                parse_elements(payload, |element| out.push(element))
            })
            .map_err(|e| ProxierError::Other(format!("reading map {map} back: {e}")))?;
        Ok(Some(out))
    }
}

impl NftCommand {
    /// Runs one `nft -f -` transaction (no generation bookkeeping: see `committing`).
    fn run_nft(&mut self, script: &str) -> Result<(), ProxierError> {
        let mut cmd = Command::new(&self.program);
        if self.check_only {
            cmd.arg("--check");
        }
        let mut child = cmd
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ProxierError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let write_result = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(script.as_bytes()),
            None => Ok(()),
        };
        let output = child
            .wait_with_output()
            .map_err(|source| ProxierError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(ProxierError::Rejected {
                program: self.program.clone(),
                message: format!("{}: {}", output.status, summarize(&output.stderr)),
            });
        }
        write_result.map_err(|e| ProxierError::Other(format!("writing to nft: {e}")))
    }

    /// Runs `op`, which commits `commits` transactions, and remembers the ruleset
    /// generation after it if nobody else committed in between (the generation then grew
    /// by exactly `commits`); otherwise forgets it, so the next re-sync reads back.
    fn committing<T>(
        &mut self,
        commits: u32,
        op: impl FnOnce(&mut Self) -> Result<T, ProxierError>,
    ) -> Result<T, ProxierError> {
        let before = self.read_generation().ok();
        let result = op(self);
        let after = self.read_generation().ok();
        self.generation = match (before, after, &result) {
            (Some(b), Some(a), Ok(_)) if a == b.wrapping_add(commits) => Some(a),
            _ => None,
        };
        result
    }

    /// The kernel's nftables ruleset generation (it grows with every commit, in any table).
    fn read_generation(&mut self) -> Result<u32, ProxierError> {
        if self.check_only {
            return Err(ProxierError::Other("no generation in check mode".into()));
        }
        let socket = self.socket()?;
        let request = generation_request(socket.next_seq());
        let mut generation = None;
        socket
            .request_each(&request, |payload| {
                generation = Some(parse_generation(payload)?);
                Ok(())
            })
            .map_err(|e| ProxierError::Other(format!("reading the nftables generation: {e}")))?;
        generation.ok_or_else(|| ProxierError::Other("no nftables generation in the reply".into()))
    }

    /// The objects, then one dump for the rules and one per wanted set: its digest, and
    /// its elements when kept.
    fn read_table_over_netlink(
        &mut self,
        family: IpFamily,
        want: &dyn Fn(&str) -> Want,
    ) -> Result<Option<TableRead>, netlink::RequestError> {
        let Some(objects) = self
            .existing_objects(family)
            .map_err(|e| netlink::RequestError::Socket(std::io::Error::other(e.to_string())))?
        else {
            return Ok(None);
        };
        let (digests, kept) = wanted_sets(&objects, want);
        self.sets_read += digests.len() as u64;
        let socket = self
            .socket()
            .map_err(|e| netlink::RequestError::Socket(std::io::Error::other(e.to_string())))?;
        let mut read = TableRead {
            table: KernelTable {
                objects,
                ..KernelTable::default()
            },
            elements: BTreeMap::new(),
        };
        let request = rules_request(family, socket.next_seq());
        socket.request_each(&request, |payload| read.table.rules.add_reply(payload))?;
        // Only sets that exist: a missing one is told by the objects.
        for map in digests {
            let mut digest = SetDigest::default();
            let request = elements_request(family, &map, socket.next_seq());
            if kept.contains(&map) {
                let mut found = Vec::new();
                socket.request_each(&request, |payload| {
                    parse_elements(payload, |element| {
                        digest.add(&element);
                        found.push(element);
                    })
                })?;
                read.elements.insert(map.clone(), found);
            } else {
                socket.request_each(&request, |payload| digest.add_reply(payload))?;
            }
            read.table.maps.insert(map, digest);
        }
        Ok(Some(read))
    }

    /// The netlink socket, opened on first use and kept.
    fn socket(&mut self) -> Result<&mut netlink::Socket, ProxierError> {
        if self.socket.is_none() {
            let socket = netlink::Socket::open(libc::NETLINK_NETFILTER)
                .map_err(|e| ProxierError::Other(format!("nftables netlink socket: {e}")))?;
            self.socket = Some(socket);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| ProxierError::Other("nftables netlink socket missing".into()))
    }

    /// Sends `ops` over the netlink socket, as one transaction.
    fn send_batch(&mut self, table: &str, ops: &[TableOp<'_>]) -> Result<usize, ProxierError> {
        self.elements_sent += ops
            .iter()
            .map(|op| match op {
                TableOp::Elements(op) => op.elements.len() as u64,
                _ => 0,
            })
            .sum::<u64>();
        let socket = self.socket()?;
        let batch = encode_ops_in(table, ops, || socket.next_seq());
        if batch.last_seq == batch.begin_seq {
            // Nothing between begin and end: the kernel would acknowledge nothing, and
            // waiting for it would time out.
            return Ok(0);
        }
        match socket.send_batch(&batch.bytes, batch.begin_seq, batch.last_seq) {
            Ok(()) => Ok(batch.bytes.len()),
            Err(err) => {
                // A socket left in an unknown state is not reused.
                if matches!(err, netlink::RequestError::Socket(_)) {
                    self.socket = None;
                }
                Err(ProxierError::Rejected {
                    program: "nftables netlink".into(),
                    message: err.to_string(),
                })
            }
        }
    }
}

/// The named counters of our table of `family` and their packet counts, read over a
/// netlink socket of its own (for scrapes, which must not wait for a sync). Empty when
/// the table does not exist.
pub fn read_named_counters(family: IpFamily) -> Result<Vec<(String, u64)>, netlink::RequestError> {
    let mut socket = netlink::Socket::open(libc::NETLINK_NETFILTER)?;
    Ok(dump_counters(&mut socket, family)?
        .into_iter()
        .map(|c| (c.name, c.packets))
        .collect())
}

/// Every named counter of our table of `family`; empty when there is no table.
fn dump_counters(
    socket: &mut netlink::Socket,
    family: IpFamily,
) -> Result<Vec<CounterValues>, netlink::RequestError> {
    let request = counters_request(family, socket.next_seq());
    let mut out = Vec::new();
    match socket.request_each(&request, |payload| {
        out.extend(parse_counter_values(payload)?);
        Ok(())
    }) {
        Ok(()) => Ok(out),
        Err(netlink::RequestError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// `--service-counters`: the new connections counted per Service port of `state` and
/// destination kind, summed over `families` (read over a socket of its own, at scrape
/// time). A port's counters are found by their names ([`service_counter_name`]), so a
/// Service no longer in `state` has no series, and one not yet programmed none yet.
pub fn read_service_traffic(
    families: &[IpFamily],
    state: &ProxyState,
) -> Result<Vec<ServiceTraffic>, netlink::RequestError> {
    let mut socket = netlink::Socket::open(libc::NETLINK_NETFILTER)?;
    let mut kernel: HashMap<String, (u64, u64)> = HashMap::new();
    for &family in families {
        for c in dump_counters(&mut socket, family)? {
            let sum = kernel.entry(c.name).or_default();
            sum.0 += c.packets;
            sum.1 += c.bytes;
        }
    }
    let mut out = Vec::new();
    if kernel.is_empty() {
        return Ok(out);
    }
    for name in state.services.keys() {
        for destination in DestinationKind::ALL {
            if let Some((packets, bytes)) = kernel.get(&service_counter_name(name, destination)) {
                out.push(ServiceTraffic {
                    port: name.clone(),
                    destination,
                    packets: *packets,
                    bytes: *bytes,
                });
            }
        }
    }
    Ok(out)
}

/// Records scripts instead of running them (planner tests, benchmarks of planning).
#[derive(Debug, Default, Clone)]
pub struct RecordingRunner {
    pub scripts: Vec<String>,
    /// When set, the next run fails with this message (and is not recorded).
    pub fail_next: Option<String>,
}

impl NftRunner for RecordingRunner {
    fn run(&mut self, script: &str) -> Result<(), ProxierError> {
        if let Some(message) = self.fail_next.take() {
            return Err(ProxierError::Rejected {
                program: "nft".into(),
                message,
            });
        }
        self.scripts.push(script.to_string());
        Ok(())
    }
}
