//! Element changes as an nfnetlink batch: the fast path for syncs that add and delete map
//! elements only (an endpoint change, a new Service of a known shape). It skips `nft`'s
//! start, its parse and its fetch of the table, and the socket stays open between syncs.
//!
//! Pure: bytes only, tested without root; the socket is in [`crate::apply`]. Numbers are
//! from the kernel's `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`.

use netlink::{DecodeError, Message, NLM_F_ACK, NLM_F_REQUEST};
use proxy_core::model::{IpFamily, Protocol};

use crate::plan::{Element, Field, Fields, MapId, Value, TABLE};
use crate::render::ElementVerb;

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_MAP: u32 = 0x8;
const NLM_F_CREATE: u16 = 0x400;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NF_DROP: i32 = 0;
const NFT_GOTO: i32 = -4;

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

/// A chain or a (named) set or map of our table, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Chain(String),
    Set { name: String, is_map: bool },
}

impl Object {
    pub fn name(&self) -> &str {
        match self {
            Object::Chain(name) | Object::Set { name, .. } => name,
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
        is_map: flags & NFT_SET_MAP != 0,
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

fn ip_proto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// A concatenation as the kernel holds it: each field in its own 32-bit registers,
/// zero-padded, in network order.
pub fn encode_fields(fields: &Fields) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    for field in fields.iter() {
        match field {
            Field::Addr(std::net::IpAddr::V4(ip)) => out.extend_from_slice(&ip.octets()),
            Field::Addr(std::net::IpAddr::V6(ip)) => out.extend_from_slice(&ip.octets()),
            Field::Proto(p) => out.extend_from_slice(&[ip_proto(*p), 0, 0, 0]),
            Field::Port(port) => {
                let be = port.to_be_bytes();
                out.extend_from_slice(&[be[0], be[1], 0, 0]);
            }
        }
    }
    out
}

fn encode_element(msg: &mut Message, element: &Element, with_value: bool) {
    msg.begin_nested(NFTA_LIST_ELEM);
    msg.begin_nested(NFTA_SET_ELEM_KEY);
    msg.attr(NFTA_DATA_VALUE, &encode_fields(&element.key));
    msg.end_nested();
    if let (true, Some(value)) = (with_value, &element.value) {
        msg.begin_nested(NFTA_SET_ELEM_DATA);
        match value {
            Value::Data(fields) => msg.attr(NFTA_DATA_VALUE, &encode_fields(fields)),
            Value::Goto(chain) => {
                msg.begin_nested(NFTA_DATA_VERDICT);
                msg.be32(NFTA_VERDICT_CODE, NFT_GOTO as u32);
                msg.str(NFTA_VERDICT_CHAIN, chain);
                msg.end_nested();
            }
            Value::Drop => {
                msg.begin_nested(NFTA_DATA_VERDICT);
                msg.be32(NFTA_VERDICT_CODE, NF_DROP as u32);
                msg.end_nested();
            }
        }
        msg.end_nested();
    }
    msg.end_nested();
}

/// Encodes `ops` in order, then `deletions`, as one transaction.
pub fn encode_batch(
    ops: &[ElementOp<'_>],
    deletions: &[Deletion],
    mut next_seq: impl FnMut() -> u32,
) -> Batch {
    let begin_seq = next_seq();
    let mut bytes = Message::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        begin_seq,
        &nfgen_header(0, NFNL_SUBSYS_NFTABLES),
    )
    .finish();
    let mut messages: Vec<Message> = Vec::new();
    for op in ops {
        let header = nfgen_header(nfproto(op.family), 0);
        let start = |kind: u16, flags: u16, seq: u32| {
            let mut msg = Message::new(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                NLM_F_REQUEST | flags,
                seq,
                &header,
            );
            msg.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
            msg.str(NFTA_SET_ELEM_LIST_SET, &op.map.name());
            msg
        };
        let (kind, flags, with_value) = match op.verb {
            ElementVerb::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, true),
            ElementVerb::Delete => (NFT_MSG_DELSETELEM, 0, false),
            ElementVerb::Flush => {
                // A deletion without an element list empties the set.
                messages.push(start(NFT_MSG_DELSETELEM, 0, next_seq()));
                continue;
            }
        };
        for chunk in op.elements.chunks(ELEMENTS_PER_MESSAGE) {
            let mut msg = start(kind, flags, next_seq());
            msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
            for element in chunk {
                encode_element(&mut msg, element, with_value);
            }
            msg.end_nested();
            messages.push(msg);
        }
    }
    // Chains first: a set may only go once no rule refers to it.
    let mut ordered: Vec<&Deletion> = deletions.iter().collect();
    ordered.sort_by_key(|d| matches!(d.object, Object::Set { .. }));
    for deletion in ordered {
        let header = nfgen_header(nfproto(deletion.family), 0);
        let (kind, table_attr, name_attr) = match deletion.object {
            Object::Chain(_) => (NFT_MSG_DELCHAIN, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME),
            Object::Set { .. } => (NFT_MSG_DELSET, NFTA_SET_TABLE, NFTA_SET_NAME),
        };
        let mut msg = Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST,
            next_seq(),
            &header,
        );
        msg.str(table_attr, TABLE);
        msg.str(name_attr, deletion.object.name());
        messages.push(msg);
    }
    let count = messages.len();
    let mut last_seq = begin_seq;
    for (i, msg) in messages.into_iter().enumerate() {
        let mut msg = msg.finish();
        last_seq = netlink::read_u32(&msg, 8).unwrap_or(last_seq);
        if i + 1 == count {
            // Only the last message asks for an acknowledgement: one reply per
            // message would overflow the socket's receive buffer on a full load.
            let flags = netlink::read_u16(&msg, 6).unwrap_or(NLM_F_REQUEST) | NLM_F_ACK;
            msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::KeyKind;
    use crate::plan::Role;

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
