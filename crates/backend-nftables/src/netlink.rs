//! Element changes as an nfnetlink batch: the fast path for syncs that add and delete map
//! elements only (an endpoint change, a new Service of a known shape). It skips `nft`'s
//! start, its parse and its fetch of the table, and the socket stays open between syncs.
//!
//! Pure: bytes only, tested without root; the socket is in [`crate::apply`]. Numbers are
//! from the kernel's `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`.

use netlink::{DecodeError, Message, NLM_F_ACK, NLM_F_REQUEST};
use proxy_core::model::IpFamily;

use crate::plan::{family_names, Element, Field, Fields, MapId, Value, COUNTER_NAME_MAX, TABLE};
use crate::render::ElementVerb;
use crate::rule::{
    encode_verdict, interval_elements, ip_proto, proto_of, AnonKind, ExprWriter, Rule, Verdict,
    NF_ACCEPT,
};

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_DELOBJ: u16 = 20;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const TYPE_INTEGER: u32 = 4;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
const NLM_F_APPEND: u16 = 0x800;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_MAP: u32 = 0x8;
/// A map whose values name stateful objects (`: counter`).
const NFT_SET_OBJECT: u32 = 0x40;
const NFTA_SET_OBJ_TYPE: u16 = 15;
const NLM_F_CREATE: u16 = 0x400;

pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_SET_ELEM_OBJREF: u16 = 9;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NFTA_VERDICT_CHAIN: u16 = 2;
pub(crate) use crate::rule::{NFT_GOTO, NF_DROP};

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// Elements per message: keeps each message's nested list below the 64 KiB an attribute
/// length can express (an IPv6 endpoint element is about 100 bytes).
const ELEMENTS_PER_MESSAGE: usize = 400;

/// One map's elements to add or delete, in one family's table.
#[derive(Debug, Clone)]
pub struct ElementOp<'a> {
    pub family: IpFamily,
    pub verb: ElementVerb,
    pub map: MapId,
    pub elements: Vec<&'a Element>,
}

/// A chain, a (named) set or map, or a named counter of our table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Chain(String),
    Set { name: String, is_map: bool },
    Counter(String),
}

impl Object {
    pub fn name(&self) -> &str {
        match self {
            Object::Chain(name) | Object::Set { name, .. } | Object::Counter(name) => name,
        }
    }
}

/// An object to delete, in one family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub family: IpFamily,
    pub object: Object,
}

/// Requests to list the chains, then the sets, of one family (dumps).
pub fn list_requests(family: IpFamily, mut next_seq: impl FnMut() -> u32) -> [Vec<u8>; 2] {
    let header = nfgen_header(nfproto(family), 0);
    let dump = |kind: u16, seq: u32| {
        Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | netlink::NLM_F_DUMP,
            seq,
            &header,
        )
        .finish()
    };
    [
        dump(NFT_MSG_GETCHAIN, next_seq()),
        dump(NFT_MSG_GETSET, next_seq()),
    ]
}

fn string_attr(
    list: &[(u16, &[u8])],
    kind: u16,
    name: &'static str,
) -> Result<String, DecodeError> {
    let raw = netlink::find(list, kind, name)?;
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Unsupported(name))
}

/// Our table's chain from one reply to the chain dump, if it is one of ours.
pub fn parse_chain(payload: &[u8]) -> Result<Option<Object>, DecodeError> {
    let list = netlink::attrs(payload.get(4..).ok_or(DecodeError::Truncated)?)?;
    if string_attr(&list, NFTA_CHAIN_TABLE, "NFTA_CHAIN_TABLE")? != TABLE {
        return Ok(None);
    }
    Ok(Some(Object::Chain(string_attr(
        &list,
        NFTA_CHAIN_NAME,
        "NFTA_CHAIN_NAME",
    )?)))
}

/// Our table's named set or map from one reply to the set dump (anonymous sets belong
/// to rules and go with them).
pub fn parse_set(payload: &[u8]) -> Result<Option<Object>, DecodeError> {
    let list = netlink::attrs(payload.get(4..).ok_or(DecodeError::Truncated)?)?;
    if string_attr(&list, NFTA_SET_TABLE, "NFTA_SET_TABLE")? != TABLE {
        return Ok(None);
    }
    let flags = netlink::find(&list, NFTA_SET_FLAGS, "NFTA_SET_FLAGS")
        .ok()
        .and_then(|raw| raw.try_into().ok())
        .map_or(0, u32::from_be_bytes);
    if flags & NFT_SET_ANONYMOUS != 0 {
        return Ok(None);
    }
    Ok(Some(Object::Set {
        name: string_attr(&list, NFTA_SET_NAME, "NFTA_SET_NAME")?,
        is_map: flags & (NFT_SET_MAP | NFT_SET_OBJECT) != 0,
    }))
}

/// A batch ready to send: its bytes, and the sequence numbers of its first message and
/// of the last one, the only one acknowledged (errors are reported for any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub begin_seq: u32,
    pub last_seq: u32,
}

pub(crate) fn nfgen_header(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

pub(crate) fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

/// A concatenation as the kernel holds it: each field in its own 32-bit registers,
/// zero-padded, in network order.
pub fn encode_fields(fields: &Fields) -> Vec<u8> {
    field_bytes(fields).to_vec()
}

/// [`encode_fields`] without a heap allocation: a full load encodes and hashes a few
/// hundred thousand keys and values.
#[derive(Clone, Copy)]
pub struct FieldBytes {
    buf: [u8; 48],
    len: usize,
}

impl std::ops::Deref for FieldBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl FieldBytes {
    fn push(&mut self, bytes: &[u8]) {
        // Three fields of at most 16 bytes each: never past the end.
        let end = self.len + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
            self.len = end;
        }
    }
}

pub fn field_bytes(fields: &Fields) -> FieldBytes {
    let mut out = FieldBytes {
        buf: [0; 48],
        len: 0,
    };
    for field in fields.iter() {
        match field {
            Field::Addr(std::net::IpAddr::V4(ip)) => out.push(&ip.octets()),
            Field::Addr(std::net::IpAddr::V6(ip)) => out.push(&ip.octets()),
            Field::Proto(p) => out.push(&[ip_proto(*p), 0, 0, 0]),
            Field::Port(port) => {
                let be = port.to_be_bytes();
                out.push(&[be[0], be[1], 0, 0]);
            }
        }
    }
    out
}

/// The inverse of [`encode_fields`] for a concatenation of `types`: `None` when the
/// bytes do not have that shape (not an element we could have written).
pub fn decode_fields(types: &[DataType], bytes: &[u8]) -> Option<Fields> {
    let mut fields = Vec::with_capacity(types.len());
    let mut rest = bytes;
    for ty in types {
        let len = match ty {
            DataType::Ipv6 => 16,
            DataType::Ipv4 | DataType::InetProto | DataType::InetService => 4,
        };
        let (this, tail) = (rest.get(..len)?, rest.get(len..)?);
        rest = tail;
        fields.push(match ty {
            DataType::Ipv4 => Field::Addr(<[u8; 4]>::try_from(this).ok()?.into()),
            DataType::Ipv6 => Field::Addr(<[u8; 16]>::try_from(this).ok()?.into()),
            DataType::InetProto => Field::Proto(proto_of(this[0])?),
            DataType::InetService => Field::Port(u16::from_be_bytes([this[0], this[1]])),
        });
    }
    (rest.is_empty() && fields.len() <= 3).then(|| Fields::new(&fields))
}

fn encode_element(msg: &mut Message, element: &Element, with_value: bool) {
    msg.begin_nested(NFTA_LIST_ELEM);
    msg.begin_nested(NFTA_SET_ELEM_KEY);
    msg.attr(NFTA_DATA_VALUE, &field_bytes(&element.key));
    msg.end_nested();
    if let (true, Some(Value::Counter(name))) = (with_value, &element.value) {
        msg.str(NFTA_SET_ELEM_OBJREF, name.spell(&mut [0; COUNTER_NAME_MAX]));
    } else if let (true, Some(value)) = (with_value, &element.value) {
        msg.begin_nested(NFTA_SET_ELEM_DATA);
        match value {
            Value::Data(fields) => msg.attr(NFTA_DATA_VALUE, &field_bytes(fields)),
            Value::Goto(chain) => encode_verdict(msg, &Verdict::Goto(chain.clone())),
            Value::Drop => encode_verdict(msg, &Verdict::Drop),
            Value::Counter(_) => {}
        }
        msg.end_nested();
    }
    msg.end_nested();
}

/// A data type of a set's key or a map's data, with `nft`'s number for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    Ipv4,
    Ipv6,
    InetProto,
    InetService,
}

impl DataType {
    fn id(self) -> u32 {
        match self {
            DataType::Ipv4 => 7,
            DataType::Ipv6 => 8,
            DataType::InetProto => 12,
            DataType::InetService => 13,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::Ipv4 => "ipv4_addr",
            DataType::Ipv6 => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
        }
    }

    pub fn addr(family: IpFamily) -> DataType {
        match family {
            IpFamily::V4 => DataType::Ipv4,
            IpFamily::V6 => DataType::Ipv6,
        }
    }

    /// Bytes in registers: whole 32-bit words.
    fn len(self) -> u32 {
        match self {
            DataType::Ipv6 => 16,
            _ => 4,
        }
    }
}

/// What a map maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapData {
    Verdict,
    Fields(Vec<DataType>),
    /// Named counters (an object map: the lookup selects the counter to update).
    Counter,
}

/// A named set or map of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDecl {
    pub name: String,
    pub key: Vec<DataType>,
    pub data: Option<MapData>,
    /// `flags dynamic,timeout`: filled by the datapath, elements expire.
    pub dynamic: bool,
}

fn concat_id(types: &[DataType]) -> u32 {
    // `nft` folds a concatenation's types 6 bits apart.
    types.iter().fold(0, |acc, t| (acc << 6) | t.id())
}

fn types_text(types: &[DataType]) -> String {
    types
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(" . ")
}

impl SetDecl {
    pub fn is_map(&self) -> bool {
        self.data.is_some()
    }

    /// The body of its declaration as `nft` text: `type ...; flags ...;`.
    pub fn text(&self) -> String {
        let mut out = format!("type {}", types_text(&self.key));
        match &self.data {
            None => {}
            Some(MapData::Verdict) => out.push_str(" : verdict"),
            Some(MapData::Counter) => out.push_str(" : counter"),
            Some(MapData::Fields(types)) => {
                out.push_str(" : ");
                out.push_str(&types_text(types));
            }
        }
        out.push(';');
        if self.dynamic {
            out.push_str(" flags dynamic,timeout;");
        }
        out
    }
}

/// A chain's hook: base chains are where packets enter the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    pub hook: HookPoint,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    Prerouting,
    Forward,
    Output,
    Postrouting,
}

impl HookPoint {
    fn number(self) -> u32 {
        match self {
            HookPoint::Prerouting => 0,
            HookPoint::Forward => 2,
            HookPoint::Output => 3,
            HookPoint::Postrouting => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HookPoint::Prerouting => "prerouting",
            HookPoint::Forward => "forward",
            HookPoint::Output => "output",
            HookPoint::Postrouting => "postrouting",
        }
    }
}

/// One change to one family's table, in a transaction of many.
#[derive(Debug, Clone)]
pub enum TableOp<'a> {
    /// Creates the table if it does not exist (an existing one is kept as it is).
    AddTable {
        family: IpFamily,
        comment: Option<String>,
    },
    DeleteTable(IpFamily),
    /// A named packet counter.
    AddCounter {
        family: IpFamily,
        name: String,
    },
    /// Creates a set or map; an existing one of the same type is kept with its elements.
    AddSet {
        family: IpFamily,
        set: SetDecl,
    },
    /// Creates a chain; an existing one is kept with its rules.
    AddChain {
        family: IpFamily,
        name: String,
        hook: Option<Hook>,
        comment: Option<String>,
    },
    /// Deletes every rule of the table (chains, sets and elements stay).
    FlushTable(IpFamily),
    FlushChain {
        family: IpFamily,
        name: String,
    },
    AddRule {
        family: IpFamily,
        chain: String,
        rule: Rule,
    },
    Elements(ElementOp<'a>),
    /// Adds keys to a named set (of a table other than ours: ours go as `Elements`).
    AddElements {
        family: IpFamily,
        set: String,
        keys: Vec<Fields>,
    },
    Delete(Deletion),
}

/// Deletes the tables (both families); succeeds whether or not they exist: each is
/// added first.
pub fn drop_tables<'a>() -> Vec<TableOp<'a>> {
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|family| {
            [
                TableOp::AddTable {
                    family,
                    comment: None,
                },
                TableOp::DeleteTable(family),
            ]
        })
        .collect()
}

/// `rules` appended to `chain` of the table of `family`, in order.
pub fn add_rules<'a>(
    family: IpFamily,
    chain: &str,
    rules: impl IntoIterator<Item = Rule>,
) -> impl Iterator<Item = TableOp<'a>> {
    let chain = chain.to_string();
    rules.into_iter().map(move |rule| TableOp::AddRule {
        family,
        chain: chain.clone(),
        rule,
    })
}

impl TableOp<'_> {
    /// This change to our table as one `nft` command (for tests and `nft --check`).
    pub fn text(&self, out: &mut String) {
        self.text_in(TABLE, out);
    }

    /// This change to the tables named `table` as one `nft` command.
    pub fn text_in(&self, table: &str, out: &mut String) {
        use std::fmt::Write as _;
        let t = |family: IpFamily| format!("{} {table}", family_names(family).table_family);
        let _ = match self {
            TableOp::AddTable {
                family,
                comment: Some(comment),
            } => writeln!(out, "add table {} {{ comment \"{comment}\"; }}", t(*family)),
            TableOp::AddTable {
                family,
                comment: None,
            } => writeln!(out, "add table {}", t(*family)),
            TableOp::AddElements { family, set, keys } => {
                if keys.is_empty() {
                    Ok(())
                } else {
                    let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
                    writeln!(
                        out,
                        "add element {} {set} {{ {} }}",
                        t(*family),
                        keys.join(", ")
                    )
                }
            }
            TableOp::DeleteTable(family) => writeln!(out, "delete table {}", t(*family)),
            TableOp::AddCounter { family, name } => {
                writeln!(out, "add counter {} {name}", t(*family))
            }
            TableOp::AddSet { family, set } => {
                let kind = if set.is_map() { "map" } else { "set" };
                writeln!(
                    out,
                    "add {kind} {} {} {{ {} }}",
                    t(*family),
                    set.name,
                    set.text()
                )
            }
            TableOp::AddChain {
                family,
                name,
                hook,
                comment,
            } => {
                let mut body = String::new();
                if let Some(h) = hook {
                    body.push_str(&format!(
                        " type {} hook {} priority {}; policy accept;",
                        h.kind,
                        h.hook.name(),
                        h.priority
                    ));
                }
                if let Some(c) = comment {
                    body.push_str(&format!(" comment \"{c}\";"));
                }
                if body.is_empty() {
                    writeln!(out, "add chain {} {name}", t(*family))
                } else {
                    writeln!(out, "add chain {} {name} {{{body} }}", t(*family))
                }
            }
            TableOp::FlushTable(family) => writeln!(out, "flush table {}", t(*family)),
            TableOp::FlushChain { family, name } => {
                writeln!(out, "flush chain {} {name}", t(*family))
            }
            TableOp::AddRule {
                family,
                chain,
                rule,
            } => writeln!(
                out,
                "add rule {} {chain} {}",
                t(*family),
                rule.text(*family)
            ),
            TableOp::Elements(op) => {
                if !op.elements.is_empty() || op.verb == ElementVerb::Flush {
                    crate::render::render_element_command(
                        out,
                        op.verb,
                        op.family,
                        op.map,
                        &op.elements,
                    );
                }
                Ok(())
            }
            TableOp::Delete(d) => {
                let kind = match d.object {
                    Object::Chain(_) => "chain",
                    Object::Counter(_) => "counter",
                    Object::Set { is_map: true, .. } => "map",
                    Object::Set { is_map: false, .. } => "set",
                };
                writeln!(out, "delete {kind} {} {}", t(d.family), d.object.name())
            }
        };
    }
}

/// `ops` on our tables as an `nft` script.
pub fn ops_text(ops: &[TableOp<'_>]) -> String {
    ops_text_in(TABLE, ops)
}

/// `ops` on the tables named `table` as an `nft` script.
pub fn ops_text_in(table: &str, ops: &[TableOp<'_>]) -> String {
    let mut out = String::new();
    for op in ops {
        op.text_in(table, &mut out);
    }
    out
}

/// Builds a batch message by message.
struct BatchWriter<'s> {
    /// The name of the tables (one per family) the ops change.
    table: &'s str,
    /// The batch so far, all but the newest message: messages are appended as soon as
    /// the next one starts instead of being held (a full load at 10,000 Services sends
    /// ~12 MB, ~15,000 of its messages small ones naming a counter each).
    bytes: Vec<u8>,
    /// The newest message, kept aside: only the last one of the batch asks for an
    /// acknowledgement.
    last: Option<Message>,
    next_seq: &'s mut dyn FnMut() -> u32,
    /// Ids of the sets created in this batch (anonymous ones are referred to by id).
    next_set_id: u32,
}

impl BatchWriter<'_> {
    /// A message of `kind` about our table of `family`: every kind names the table in
    /// its attribute 1 (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`, `NFTA_SET_TABLE`, ...).
    fn start(&mut self, family: IpFamily, kind: u16, flags: u16) -> Message {
        let seq = (self.next_seq)();
        let mut msg = Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            seq,
            &nfgen_header(nfproto(family), 0),
        );
        msg.str(NFTA_TABLE_NAME, self.table);
        msg
    }

    fn push(&mut self, msg: Message) {
        if let Some(previous) = self.last.replace(msg) {
            self.bytes.extend_from_slice(&previous.finish());
        }
    }

    fn op(&mut self, op: &TableOp<'_>) {
        match op {
            TableOp::AddTable { family, comment } => {
                let mut msg = self.start(*family, NFT_MSG_NEWTABLE, NLM_F_CREATE);
                msg.be32(NFTA_TABLE_FLAGS, 0);
                if let Some(comment) = comment {
                    msg.attr(NFTA_TABLE_USERDATA, &udata_comment(comment));
                }
                self.push(msg);
            }
            TableOp::DeleteTable(family) => {
                let msg = self.start(*family, NFT_MSG_DELTABLE, 0);
                self.push(msg);
            }
            TableOp::AddCounter { family, name } => {
                let mut msg = self.start(*family, NFT_MSG_NEWOBJ, NLM_F_CREATE);
                msg.str(NFTA_OBJ_NAME, name);
                msg.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
                // Required but may be empty: a new counter starts at zero without the
                // two values `nft` sends (24 bytes less per counter; a full sync at
                // 10,000 Services creates ~15,000).
                msg.begin_nested(NFTA_OBJ_DATA);
                msg.end_nested();
                self.push(msg);
            }
            TableOp::AddSet { family, set } => self.add_set(*family, set),
            TableOp::AddChain {
                family,
                name,
                hook,
                comment,
            } => {
                let mut msg = self.start(*family, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
                msg.str(NFTA_CHAIN_NAME, name);
                if let Some(h) = hook {
                    msg.begin_nested(NFTA_CHAIN_HOOK);
                    msg.be32(NFTA_HOOK_HOOKNUM, h.hook.number());
                    msg.be32(NFTA_HOOK_PRIORITY, h.priority as u32);
                    msg.end_nested();
                    msg.be32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
                    msg.str(NFTA_CHAIN_TYPE, h.kind);
                }
                if let Some(c) = comment {
                    msg.attr(NFTA_CHAIN_USERDATA, &udata_comment(c));
                }
                self.push(msg);
            }
            TableOp::FlushTable(family) => {
                let msg = self.start(*family, NFT_MSG_DELRULE, 0);
                self.push(msg);
            }
            TableOp::FlushChain { family, name } => {
                let mut msg = self.start(*family, NFT_MSG_DELRULE, 0);
                msg.str(NFTA_RULE_CHAIN, name);
                self.push(msg);
            }
            TableOp::AddRule {
                family,
                chain,
                rule,
            } => self.add_rule(*family, chain, rule),
            TableOp::Elements(op) => self.elements(op),
            TableOp::AddElements { family, set, keys } => {
                for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
                    let mut msg = self.start(*family, NFT_MSG_NEWSETELEM, NLM_F_CREATE);
                    msg.str(NFTA_SET_ELEM_LIST_SET, set);
                    msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
                    for key in chunk {
                        msg.begin_nested(NFTA_LIST_ELEM);
                        msg.begin_nested(NFTA_SET_ELEM_KEY);
                        msg.attr(NFTA_DATA_VALUE, &field_bytes(key));
                        msg.end_nested();
                        msg.end_nested();
                    }
                    msg.end_nested();
                    self.push(msg);
                }
            }
            TableOp::Delete(deletion) => {
                let (kind, name_attr) = match deletion.object {
                    Object::Chain(_) => (NFT_MSG_DELCHAIN, NFTA_CHAIN_NAME),
                    Object::Set { .. } => (NFT_MSG_DELSET, NFTA_SET_NAME),
                    Object::Counter(_) => (NFT_MSG_DELOBJ, NFTA_OBJ_NAME),
                };
                let mut msg = self.start(deletion.family, kind, 0);
                msg.str(name_attr, deletion.object.name());
                if let Object::Counter(_) = deletion.object {
                    msg.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
                }
                self.push(msg);
            }
        }
    }

    fn set_id(&mut self) -> u32 {
        self.next_set_id += 1;
        self.next_set_id
    }

    fn add_set(&mut self, family: IpFamily, set: &SetDecl) {
        let id = self.set_id();
        let mut msg = self.start(family, NFT_MSG_NEWSET, NLM_F_CREATE);
        msg.str(NFTA_SET_NAME, &set.name);
        let mut flags = 0;
        match set.data {
            Some(MapData::Counter) => flags |= NFT_SET_OBJECT,
            Some(_) => flags |= NFT_SET_MAP,
            None => {}
        }
        if set.dynamic {
            flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
        }
        msg.be32(NFTA_SET_FLAGS, flags);
        msg.be32(NFTA_SET_KEY_TYPE, concat_id(&set.key));
        msg.be32(NFTA_SET_KEY_LEN, set.key.iter().map(|t| t.len()).sum());
        match &set.data {
            None => {}
            Some(MapData::Verdict) => {
                msg.be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                msg.be32(NFTA_SET_DATA_LEN, 0);
            }
            Some(MapData::Fields(types)) => {
                msg.be32(NFTA_SET_DATA_TYPE, concat_id(types));
                msg.be32(NFTA_SET_DATA_LEN, types.iter().map(|t| t.len()).sum());
            }
            Some(MapData::Counter) => msg.be32(NFTA_SET_OBJ_TYPE, NFT_OBJECT_COUNTER),
        }
        msg.be32(NFTA_SET_ID, id);
        // As `nft` records it: a single address is big-endian; a concatenation has no
        // one byte order.
        let order = if set.key.len() == 1 { BYTEORDER_BIG } else { 0 };
        let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, order);
        if matches!(set.data, Some(MapData::Verdict | MapData::Fields(_))) {
            udata.extend(udata_u32(UDATA_SET_DATABYTEORDER, 0));
        }
        msg.attr(NFTA_SET_USERDATA, &udata);
        self.push(msg);
    }

    /// An anonymous set for one rule; returns its name and id.
    fn anon_set(&mut self, family: IpFamily, kind: &AnonKind) -> (String, u32) {
        let id = self.set_id();
        let (name, flags, key_type, key_len, data, byteorder, elements): (
            &str,
            u32,
            u32,
            u32,
            bool,
            u32,
            Vec<AnonElement>,
        ) = match kind {
            AnonKind::Intervals(f, ranges) => {
                let t = DataType::addr(*f);
                let elements = interval_elements(ranges)
                    .into_iter()
                    .map(|(key, end)| AnonElement {
                        key,
                        end,
                        goto: None,
                    })
                    .collect();
                (
                    "__set%d",
                    NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL,
                    t.id(),
                    t.len(),
                    false,
                    BYTEORDER_BIG,
                    elements,
                )
            }
            AnonKind::Spread(chains) => {
                let elements = chains
                    .iter()
                    .enumerate()
                    .map(|(k, c)| AnonElement {
                        key: (k as u32).to_ne_bytes().to_vec(),
                        end: false,
                        goto: Some(c.clone()),
                    })
                    .collect();
                (
                    "__map%d",
                    NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP,
                    TYPE_INTEGER,
                    4,
                    true,
                    BYTEORDER_HOST,
                    elements,
                )
            }
        };
        let mut msg = self.start(family, NFT_MSG_NEWSET, NLM_F_CREATE);
        msg.str(NFTA_SET_NAME, name);
        msg.be32(NFTA_SET_FLAGS, flags);
        msg.be32(NFTA_SET_KEY_TYPE, key_type);
        msg.be32(NFTA_SET_KEY_LEN, key_len);
        if data {
            msg.be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
            msg.be32(NFTA_SET_DATA_LEN, 0);
        }
        msg.be32(NFTA_SET_ID, id);
        msg.begin_nested(NFTA_SET_DESC);
        msg.be32(NFTA_SET_DESC_SIZE, elements.len() as u32);
        msg.end_nested();
        msg.attr(
            NFTA_SET_USERDATA,
            &udata_u32(UDATA_SET_KEYBYTEORDER, byteorder),
        );
        self.push(msg);
        let mut msg = self.start(family, NFT_MSG_NEWSETELEM, NLM_F_CREATE);
        msg.str(NFTA_SET_ELEM_LIST_SET, name);
        msg.be32(NFTA_SET_ELEM_LIST_SET_ID, id);
        msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in &elements {
            msg.begin_nested(NFTA_LIST_ELEM);
            if e.end {
                msg.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            msg.begin_nested(NFTA_SET_ELEM_KEY);
            msg.attr(NFTA_DATA_VALUE, &e.key);
            msg.end_nested();
            if let Some(chain) = &e.goto {
                msg.begin_nested(NFTA_SET_ELEM_DATA);
                encode_verdict(&mut msg, &Verdict::Goto(chain.clone()));
                msg.end_nested();
            }
            msg.end_nested();
        }
        msg.end_nested();
        self.push(msg);
        (name.to_string(), id)
    }

    fn add_rule(&mut self, family: IpFamily, chain: &str, rule: &Rule) {
        // Anonymous sets go first, in the order the rule's statements need them.
        let mut anons = Vec::new();
        let mut probe = Message::new(0, 0, 0, &[]);
        {
            let mut writer = ExprWriter::new(&mut probe, family);
            for stmt in &rule.0 {
                writer.stmt(stmt, &mut |kind| {
                    anons.push(kind);
                    (String::new(), 0)
                });
            }
        }
        let mut refs = Vec::new();
        for kind in &anons {
            refs.push(self.anon_set(family, kind));
        }
        let mut msg = self.start(family, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        msg.str(NFTA_RULE_CHAIN, chain);
        msg.begin_nested(NFTA_RULE_EXPRESSIONS);
        {
            let mut refs = refs.into_iter();
            let mut writer = ExprWriter::new(&mut msg, family);
            for stmt in &rule.0 {
                writer.stmt(stmt, &mut |_| refs.next().unwrap_or_default());
            }
        }
        msg.end_nested();
        self.push(msg);
    }

    fn elements(&mut self, op: &ElementOp<'_>) {
        let start = |me: &mut Self, kind: u16, flags: u16| {
            let mut msg = me.start(op.family, kind, flags);
            msg.str(NFTA_SET_ELEM_LIST_SET, &op.map.name());
            msg
        };
        let (kind, flags, with_value) = match op.verb {
            ElementVerb::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, true),
            ElementVerb::Delete => (NFT_MSG_DELSETELEM, 0, false),
            ElementVerb::Flush => {
                // A deletion without an element list empties the set.
                let msg = start(self, NFT_MSG_DELSETELEM, 0);
                self.push(msg);
                return;
            }
        };
        for chunk in op.elements.chunks(ELEMENTS_PER_MESSAGE) {
            let mut msg = start(self, kind, flags);
            msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
            for element in chunk {
                encode_element(&mut msg, element, with_value);
            }
            msg.end_nested();
            self.push(msg);
        }
    }
}

struct AnonElement {
    key: Vec<u8>,
    end: bool,
    goto: Option<String>,
}

/// One `nftnl` user-data entry: type, length, value.
fn udata(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, u8::try_from(value.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(value);
    out
}

fn udata_u32(kind: u8, value: u32) -> Vec<u8> {
    udata(kind, &value.to_ne_bytes())
}

/// A comment as `nft` stores it (NUL-terminated; at most 128 bytes are kept).
fn udata_comment(comment: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = comment.bytes().take(127).collect();
    bytes.push(0);
    udata(0, &bytes)
}

/// Encodes `ops` on our tables in order as one transaction.
pub fn encode_ops(ops: &[TableOp<'_>], next_seq: impl FnMut() -> u32) -> Batch {
    encode_ops_in(TABLE, ops, next_seq)
}

/// Encodes `ops` on the tables named `table` in order as one transaction.
pub fn encode_ops_in(table: &str, ops: &[TableOp<'_>], mut next_seq: impl FnMut() -> u32) -> Batch {
    let begin_seq = next_seq();
    let bytes = Message::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        begin_seq,
        &nfgen_header(0, NFNL_SUBSYS_NFTABLES),
    )
    .finish();
    let mut writer = BatchWriter {
        table,
        bytes,
        last: None,
        next_seq: &mut next_seq,
        next_set_id: 0,
    };
    for op in ops {
        writer.op(op);
    }
    let mut bytes = writer.bytes;
    let mut last_seq = begin_seq;
    if let Some(last) = writer.last {
        let mut msg = last.finish();
        last_seq = netlink::read_u32(&msg, 8).unwrap_or(last_seq);
        // Only the last message asks for an acknowledgement: one reply per message
        // would overflow the socket's receive buffer on a full load.
        let flags = netlink::read_u16(&msg, 6).unwrap_or(NLM_F_REQUEST) | NLM_F_ACK;
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&msg);
    }
    let end = Message::new(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next_seq(),
        &nfgen_header(0, NFNL_SUBSYS_NFTABLES),
    );
    bytes.extend_from_slice(&end.finish());
    Batch {
        bytes,
        begin_seq,
        last_seq,
    }
}

/// Encodes element `ops` in order, then `deletions` (chains before sets: a set may only
/// go once no rule refers to it), as one transaction.
pub fn encode_batch(
    ops: &[ElementOp<'_>],
    deletions: &[Deletion],
    next_seq: impl FnMut() -> u32,
) -> Batch {
    let mut all: Vec<TableOp<'_>> = ops.iter().cloned().map(TableOp::Elements).collect();
    all.extend(ordered_deletions(deletions));
    encode_ops(&all, next_seq)
}

/// Deletions as ops, chains first: a set may only go once no rule refers to it, and a
/// counter once no element does.
pub fn ordered_deletions<'a>(deletions: &[Deletion]) -> Vec<TableOp<'a>> {
    let mut ordered: Vec<&Deletion> = deletions.iter().collect();
    ordered.sort_by_key(|d| match d.object {
        Object::Chain(_) => 0,
        Object::Set { .. } => 1,
        Object::Counter(_) => 2,
    });
    ordered.into_iter().cloned().map(TableOp::Delete).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::KeyKind;
    use crate::plan::Role;
    use proxy_core::model::Protocol;

    #[test]
    fn fields_use_whole_registers() {
        let key = Fields::new(&[
            Field::Addr("10.96.0.1".parse().unwrap()),
            Field::Proto(Protocol::Udp),
            Field::Port(53),
        ]);
        let want = vec![10, 96, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0];
        assert_eq!(encode_fields(&key), want);
    }

    #[test]
    fn keys_read_back_decode_to_what_was_encoded() {
        let v6: std::net::IpAddr = "fd00::1".parse().unwrap();
        let types = [DataType::Ipv6, DataType::InetProto, DataType::InetService];
        let key = Fields::new(&[
            Field::Addr(v6),
            Field::Proto(Protocol::Sctp),
            Field::Port(9),
        ]);
        assert_eq!(decode_fields(&types, &encode_fields(&key)), Some(key));
        let v4 = Fields::new(&[Field::Addr("10.0.0.1".parse().unwrap())]);
        assert_eq!(decode_fields(&types, &encode_fields(&v4)), None, "short");
        let mut long = encode_fields(&key);
        long.push(0);
        assert_eq!(decode_fields(&types, &long), None, "long");
        let mut unknown = encode_fields(&key);
        unknown[16] = 1; // ICMP: no Service protocol
        assert_eq!(decode_fields(&types, &unknown), None);
    }

    #[test]
    fn batch_frames_each_map_and_acks_each_message() {
        let add = Element {
            map: MapId::Slot(KeyKind::Ip, Role::All, 1),
            key: Fields::new(&[Field::Addr("10.96.0.1".parse().unwrap())]),
            value: Some(Value::Goto("pick-ip-1".into())),
        };
        let ops = [ElementOp {
            family: IpFamily::V4,
            verb: ElementVerb::Add,
            map: add.map,
            elements: vec![&add],
        }];
        let mut seq = 0;
        let batch = encode_batch(&ops, &[], || {
            seq += 1;
            seq
        });
        assert_eq!(batch.begin_seq, 1);
        assert_eq!(batch.last_seq, 2);
        let msgs = netlink::split(&batch.bytes).unwrap();
        let kinds: Vec<u16> = msgs.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec![0x10, 0x0a0c, 0x11]);
        let body = msgs[1].payload;
        assert_eq!(&body[..4], &[2, 0, 0, 0], "ipv4, version 0");
        let attrs = netlink::attrs(&body[4..]).unwrap();
        assert_eq!(attrs[0], (1, &b"kube-proxy\0"[..]));
        assert_eq!(attrs[1], (2, &b"slot-1\0"[..]));
        let elem = netlink::attrs(attrs[2].1).unwrap();
        let parts = netlink::attrs(elem[0].1).unwrap();
        let verdict = netlink::attrs(netlink::attrs(parts[1].1).unwrap()[0].1).unwrap();
        assert_eq!(verdict[0], (1, &(-4i32).to_be_bytes()[..]));
        assert_eq!(verdict[1], (2, &b"pick-ip-1\0"[..]));
    }
}
