//! What the kernel holds, read back over netlink: a digest of each map's elements and of
//! the table's rules, so a periodic re-sync can tell in one pass of dumps whether anything
//! differs from what was programmed, and the elements of one map, to repair only it.
//!
//! Pure: bytes in, values out; the dumps are requested in [`crate::apply`]. Elements are
//! compared as the kernel returns them (register bytes, verdict code and chain), so our
//! side encodes its elements the same way ([`RawElement::of`]).

use std::collections::BTreeMap;

use netlink::{DecodeError, Message, NLM_F_REQUEST};
use proxy_core::model::IpFamily;

use crate::netlink::{
    encode_fields, field_bytes, nfgen_header, nfproto, NFNL_SUBSYS_NFTABLES, NFTA_DATA_VALUE,
    NFTA_DATA_VERDICT, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_OBJREF, NFTA_VERDICT_CHAIN,
    NFTA_VERDICT_CODE, NFT_GOTO, NF_DROP,
};
use crate::plan::{Element, Value, COUNTER_NAME_MAX, TABLE};

const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFT_MSG_GETSETELEM: u16 = 13;

const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;

/// An element as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawElement {
    pub key: Vec<u8>,
    pub value: RawValue,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RawValue {
    /// A set element.
    None,
    Data(Vec<u8>),
    Verdict {
        code: i32,
        chain: Option<String>,
    },
    /// The name of a counter (an object map's element): the counter's values are not
    /// part of the element, so counting never makes a digest differ.
    Counter(String),
}

impl RawElement {
    /// Our element as the kernel would return it.
    pub fn of(element: &Element) -> RawElement {
        let value = match &element.value {
            None => RawValue::None,
            Some(Value::Data(fields)) => RawValue::Data(encode_fields(fields)),
            Some(Value::Goto(chain)) => RawValue::Verdict {
                code: NFT_GOTO,
                chain: Some(chain.clone()),
            },
            Some(Value::Drop) => RawValue::Verdict {
                code: NF_DROP,
                chain: None,
            },
            Some(Value::Counter(name)) => RawValue::Counter(name.to_string()),
        };
        RawElement {
            key: encode_fields(&element.key),
            value,
        }
    }

    pub(crate) fn hash(&self) -> u64 {
        let value = match &self.value {
            RawValue::None => ValueRef::None,
            RawValue::Data(data) => ValueRef::Data(data),
            RawValue::Verdict { code, chain } => {
                ValueRef::Verdict(*code, chain.as_deref().unwrap_or("").as_bytes())
            }
            RawValue::Counter(name) => ValueRef::Counter(name.as_bytes()),
        };
        element_hash(&self.key, value)
    }
}

/// The hash of our element as the kernel would return it ([`RawElement::of`]'s), without
/// building that copy: a full load hashes every element for its digests.
pub(crate) fn planned_hash(element: &Element) -> u64 {
    let key = field_bytes(&element.key);
    let data;
    let mut counter = [0; COUNTER_NAME_MAX];
    let value = match &element.value {
        None => ValueRef::None,
        Some(Value::Data(fields)) => {
            data = field_bytes(fields);
            ValueRef::Data(&data)
        }
        Some(Value::Goto(chain)) => ValueRef::Verdict(NFT_GOTO, chain.as_bytes()),
        Some(Value::Drop) => ValueRef::Verdict(NF_DROP, b""),
        Some(Value::Counter(name)) => ValueRef::Counter(name.spell(&mut counter).as_bytes()),
    };
    element_hash(&key, value)
}

/// An element's value as it lies in a reply (the verdict's chain without its NUL).
#[derive(Debug, Clone, Copy)]
enum ValueRef<'a> {
    None,
    Data(&'a [u8]),
    Verdict(i32, &'a [u8]),
    Counter(&'a [u8]),
}

fn element_hash(key: &[u8], value: ValueRef<'_>) -> u64 {
    let mut h = Fnv::new();
    h.bytes(key);
    match value {
        ValueRef::None => h.bytes(&[0]),
        ValueRef::Data(data) => {
            h.bytes(&[1]);
            h.bytes(data);
        }
        ValueRef::Verdict(code, chain) => {
            h.bytes(&[2]);
            h.bytes(&code.to_be_bytes());
            h.bytes(chain);
        }
        ValueRef::Counter(name) => {
            h.bytes(&[3]);
            h.bytes(name);
        }
    }
    h.finish()
}

/// FNV-1a, 64 bits: a stable hash for digests (not a defence against crafted input:
/// a digest only decides whether to look closer).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Length-delimited, so ("ab","c") and ("a","bc") differ.
        self.0 ^= data.len() as u64;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Order-free digest of a set of elements: their count and the XOR of their hashes, so
/// it can be kept up to date element by element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetDigest {
    pub count: u64,
    pub xor: u64,
}

impl SetDigest {
    pub fn add(&mut self, element: &RawElement) {
        self.count += 1;
        self.xor ^= element.hash();
    }

    /// Folds in every element of one reply to an elements dump, without copying them.
    pub fn add_reply(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        each_element(payload, |key, value| {
            self.count += 1;
            self.xor ^= element_hash(key, value);
        })
    }

    /// Folds in the elements another digest holds (none of them already here).
    pub fn merge(&mut self, other: SetDigest) {
        self.count += other.count;
        self.xor ^= other.xor;
    }

    /// Folds in one of our elements.
    pub fn add_planned(&mut self, element: &Element) {
        self.count += 1;
        self.xor ^= planned_hash(element);
    }

    /// Takes out one of our elements.
    pub fn remove_planned(&mut self, element: &Element) {
        self.count = self.count.saturating_sub(1);
        self.xor ^= planned_hash(element);
    }

    pub fn of<'a>(elements: impl IntoIterator<Item = &'a Element>) -> SetDigest {
        let mut d = SetDigest::default();
        for e in elements {
            d.add_planned(e);
        }
        d
    }
}

/// A dump request for the elements of one set or map of our table.
pub fn elements_request(family: IpFamily, set: &str, seq: u32) -> Vec<u8> {
    let mut msg = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | netlink::NLM_F_DUMP,
        seq,
        &nfgen_header(nfproto(family), 0),
    );
    msg.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
    msg.str(NFTA_SET_ELEM_LIST_SET, set);
    msg.finish()
}

/// A request for the ruleset generation (acknowledged, so the reply has an end).
pub fn generation_request(seq: u32) -> Vec<u8> {
    Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST | netlink::NLM_F_ACK,
        seq,
        &nfgen_header(0, 0),
    )
    .finish()
}

/// The generation from the reply to [`generation_request`].
pub fn parse_generation(payload: &[u8]) -> Result<u32, DecodeError> {
    let body = payload.get(4..).ok_or(DecodeError::Truncated)?;
    netlink::attr(body, NFTA_GEN_ID)?
        .and_then(|raw| raw.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(DecodeError::Missing("NFTA_GEN_ID"))
}

/// A dump request for every rule of our table.
pub fn rules_request(family: IpFamily, seq: u32) -> Vec<u8> {
    let mut msg = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
        NLM_F_REQUEST | netlink::NLM_F_DUMP,
        seq,
        &nfgen_header(nfproto(family), 0),
    );
    msg.str(NFTA_RULE_TABLE, TABLE);
    msg.finish()
}

/// A dump request for the named counters of our table.
pub fn counters_request(family: IpFamily, seq: u32) -> Vec<u8> {
    let mut msg = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
        NLM_F_REQUEST | netlink::NLM_F_DUMP,
        seq,
        &nfgen_header(nfproto(family), 0),
    );
    msg.str(NFTA_OBJ_TABLE, TABLE);
    msg.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
    msg.finish()
}

/// A named counter's name and packet count, from one reply to [`counters_request`];
/// `None` for an object that is not a counter.
pub fn parse_counter(payload: &[u8]) -> Result<Option<(String, u64)>, DecodeError> {
    Ok(parse_counter_values(payload)?.map(|c| (c.name, c.packets)))
}

/// A named counter as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterValues {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// A named counter's name, packets and bytes, from one reply to [`counters_request`];
/// `None` for an object that is not a counter.
pub fn parse_counter_values(payload: &[u8]) -> Result<Option<CounterValues>, DecodeError> {
    let body = payload.get(4..).ok_or(DecodeError::Truncated)?;
    let kind = netlink::attr(body, NFTA_OBJ_TYPE)?
        .and_then(|raw| raw.try_into().ok())
        .map(u32::from_be_bytes);
    if kind != Some(NFT_OBJECT_COUNTER) {
        return Ok(None);
    }
    let name = netlink::attr(body, NFTA_OBJ_NAME)?.ok_or(DecodeError::Missing("NFTA_OBJ_NAME"))?;
    let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned();
    let data = netlink::attr(body, NFTA_OBJ_DATA)?.ok_or(DecodeError::Missing("NFTA_OBJ_DATA"))?;
    let number = |kind: u16, what: &'static str| -> Result<u64, DecodeError> {
        netlink::attr(data, kind)?
            .and_then(|raw| raw.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or(DecodeError::Missing(what))
    };
    Ok(Some(CounterValues {
        name,
        packets: number(NFTA_COUNTER_PACKETS, "NFTA_COUNTER_PACKETS")?,
        bytes: number(NFTA_COUNTER_BYTES, "NFTA_COUNTER_BYTES")?,
    }))
}

/// Calls `each` with every element of one reply to an elements dump.
pub fn parse_elements(payload: &[u8], mut each: impl FnMut(RawElement)) -> Result<(), DecodeError> {
    each_element(payload, |key, value| {
        let value = match value {
            ValueRef::None => RawValue::None,
            ValueRef::Data(data) => RawValue::Data(data.to_vec()),
            ValueRef::Verdict(code, chain) => RawValue::Verdict {
                code,
                chain: (!chain.is_empty()).then(|| String::from_utf8_lossy(chain).into_owned()),
            },
            ValueRef::Counter(name) => {
                RawValue::Counter(String::from_utf8_lossy(name).into_owned())
            }
        };
        each(RawElement {
            key: key.to_vec(),
            value,
        });
    })
}

fn each_element(
    payload: &[u8],
    mut each: impl FnMut(&[u8], ValueRef<'_>),
) -> Result<(), DecodeError> {
    let body = payload.get(4..).ok_or(DecodeError::Truncated)?;
    let Some(elements) = netlink::attr(body, NFTA_SET_ELEM_LIST_ELEMENTS)? else {
        return Ok(()); // an empty set
    };
    for item in netlink::Attrs(elements) {
        let (_, element) = item?;
        let key = netlink::attr(element, NFTA_SET_ELEM_KEY)?.ok_or(DecodeError::Missing("key"))?;
        let key = netlink::attr(key, NFTA_DATA_VALUE)?.ok_or(DecodeError::Missing("key value"))?;
        let objref = netlink::attr(element, NFTA_SET_ELEM_OBJREF)?;
        let value = match netlink::attr(element, NFTA_SET_ELEM_DATA)? {
            None => match objref {
                Some(name) => ValueRef::Counter(name.strip_suffix(&[0]).unwrap_or(name)),
                None => ValueRef::None,
            },
            Some(data) => match netlink::attr(data, NFTA_DATA_VALUE)? {
                Some(bytes) => ValueRef::Data(bytes),
                None => {
                    let verdict = netlink::attr(data, NFTA_DATA_VERDICT)?
                        .ok_or(DecodeError::Missing("verdict"))?;
                    let code = netlink::attr(verdict, NFTA_VERDICT_CODE)?
                        .and_then(|raw| raw.try_into().ok())
                        .map(i32::from_be_bytes)
                        .ok_or(DecodeError::Missing("verdict code"))?;
                    let chain = netlink::attr(verdict, NFTA_VERDICT_CHAIN)?.unwrap_or_default();
                    ValueRef::Verdict(code, chain.strip_suffix(&[0]).unwrap_or(chain))
                }
            },
        };
        each(key, value);
    }
    Ok(())
}

/// Digest of our table's rules, chain by chain in the kernel's order; rule handles are
/// left out (they change when the rules are written again, the packets do not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesDigest(pub BTreeMap<String, u64>);

impl RulesDigest {
    /// Folds one reply to the rules dump in.
    pub fn add_reply(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        let list = netlink::attrs(payload.get(4..).ok_or(DecodeError::Truncated)?)?;
        let table = netlink::find(&list, NFTA_RULE_TABLE, "rule table")?;
        if table.strip_suffix(&[0]).unwrap_or(table) != TABLE.as_bytes() {
            return Ok(());
        }
        let chain = netlink::find(&list, NFTA_RULE_CHAIN, "rule chain")?;
        let chain = String::from_utf8_lossy(chain.strip_suffix(&[0]).unwrap_or(chain));
        let expressions =
            netlink::find(&list, NFTA_RULE_EXPRESSIONS, "rule expressions").unwrap_or_default();
        let entry = self.0.entry(chain.into_owned()).or_insert(0);
        let mut h = Fnv::new();
        h.bytes(&entry.to_be_bytes());
        h.bytes(expressions);
        *entry = h.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Field, Fields, MapId};

    fn element(value: Option<Value>) -> Element {
        Element {
            map: MapId::ServiceIps,
            key: Fields::new(&[Field::Addr("10.96.0.1".parse().unwrap())]),
            value,
        }
    }

    #[test]
    fn digest_is_order_free_and_follows_removals() {
        let a = element(Some(Value::Goto("internal".into())));
        let b = element(Some(Value::Drop));
        let c = element(None);
        let mut one = SetDigest::of([&a, &b, &c]);
        let other = SetDigest::of([&c, &a, &b]);
        assert_eq!(one, other);
        one.remove_planned(&b);
        assert_eq!(one, SetDigest::of([&a, &c]));
        assert_ne!(
            one,
            SetDigest::of([&a, &b]),
            "another value is another element"
        );
    }

    /// An element encoded for a batch decodes back to what our side expects.
    #[test]
    fn decodes_what_the_batch_encodes() {
        let elements = [
            element(Some(Value::Goto("pick-ip-2".into()))),
            element(Some(Value::Drop)),
            element(Some(Value::Data(Fields::new(&[
                Field::Addr("10.244.1.2".parse().unwrap()),
                Field::Port(8080),
            ])))),
            element(Some(Value::Counter(
                crate::plan::CounterName::parse("svc-0123456789abcdef-cluster-ip").unwrap(),
            ))),
            element(None),
        ];
        for e in &elements {
            let ops = [crate::netlink::ElementOp {
                family: IpFamily::V4,
                verb: crate::render::ElementVerb::Add,
                map: e.map,
                elements: vec![e],
            }];
            let batch = crate::netlink::encode_batch(&ops, &[], || 1);
            let msgs = netlink::split(&batch.bytes).unwrap();
            let mut got = Vec::new();
            parse_elements(msgs[1].payload, |raw| got.push(raw)).unwrap();
            assert_eq!(got, vec![RawElement::of(e)]);
            assert_eq!(got[0].hash(), planned_hash(e), "{e:?}");
        }
    }
}
