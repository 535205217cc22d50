//! Properties of the API's legacy IP grammar (Go 1.16's `net.ParseIP` / `ParseCIDR`, kept
//! by upstream's `ParseIPSloppy` / `ParseCIDRSloppy`).
//!
//! Two independent checks of `proxy_core::ipparse`:
//! - strings built from generated values (octets and groups written with random leading
//!   zeros, case, `::` and embedded IPv4) parse to exactly those values, and near misses
//!   built from them (a field too large, missing or extra, junk around, a zone) are refused;
//! - on noisy strings the parser agrees with a reference model: strip the leading zeros
//!   Go 1.16 ignores, then hand the text to Rust's strict std parser, whose grammar is
//!   otherwise the same.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use proxy_core::ipparse::{parse_cidr_sloppy, parse_ip_sloppy};

// ------------------------------------------------------------------------------------
// Reference model.
// ------------------------------------------------------------------------------------

fn strip_zeros(run: &str) -> &str {
    match run.trim_start_matches('0') {
        "" => "0",
        rest => rest,
    }
}

/// The text with the leading zeros Go 1.16 ignores removed: in decimal fields of dotted
/// parts and in hex groups. Anything else is left for std to refuse.
fn normalise(text: &str) -> String {
    text.split(':')
        .map(|piece| {
            if piece.contains('.') {
                piece
                    .split('.')
                    .map(|f| {
                        if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) {
                            strip_zeros(f)
                        } else {
                            f
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            } else if !piece.is_empty() && piece.bytes().all(|b| b.is_ascii_hexdigit()) {
                strip_zeros(piece).to_string()
            } else {
                piece.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// Which form the address was written in: the prefix of a CIDR counts out of 32 or 128
/// by that, not by what the address turns out to be.
enum Written {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

fn model_written(text: &str) -> Option<Written> {
    let text = normalise(text);
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Some(Written::V4(v4));
    }
    text.parse::<Ipv6Addr>().ok().map(Written::V6)
}

fn model_ip(text: &str) -> Option<IpAddr> {
    Some(match model_written(text)? {
        Written::V4(v4) => IpAddr::V4(v4),
        Written::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
    })
}

fn model_cidr(text: &str) -> Option<IpNet> {
    let (addr, prefix) = text.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix = strip_zeros(prefix);
    if prefix.len() > 3 {
        return None;
    }
    let len: u8 = prefix.parse().ok()?;
    match model_written(addr)? {
        Written::V4(v4) => {
            if len > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some(net(IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)), len))
        }
        Written::V6(v6) => {
            if len > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let network = Ipv6Addr::from(u128::from(v6) & mask);
            Some(match network.to_ipv4_mapped() {
                Some(v4) => net(IpAddr::V4(v4), len - 96),
                None => net(IpAddr::V6(network), len),
            })
        }
    }
}

fn net(addr: IpAddr, len: u8) -> IpNet {
    IpNet::new(addr, len).expect("prefix within the family")
}

// ------------------------------------------------------------------------------------
// Generators of valid text with a known value.
// ------------------------------------------------------------------------------------

fn zeros(n: usize) -> String {
    "0".repeat(n)
}

/// A dotted IPv4 address, each octet with up to `max_zeros` leading zeros.
fn v4_text(max_zeros: usize) -> impl Strategy<Value = (String, Ipv4Addr)> {
    (any::<[u8; 4]>(), prop::array::uniform4(0..=max_zeros)).prop_map(|(octets, pad)| {
        let text = octets
            .iter()
            .zip(pad)
            .map(|(o, z)| format!("{}{o}", zeros(z)))
            .collect::<Vec<_>>()
            .join(".");
        (text, Ipv4Addr::from(octets))
    })
}

/// Groups of an IPv6 address: often zero (so `::` has runs to stand for), sometimes
/// the ::ffff:0:0/96 prefix of an IPv4-mapped address.
fn v6_groups() -> impl Strategy<Value = [u16; 8]> {
    let group = prop_oneof![Just(0u16), Just(0xffffu16), any::<u16>()];
    prop_oneof![
        prop::array::uniform8(group),
        any::<[u16; 2]>().prop_map(|[hi, lo]| [0, 0, 0, 0, 0, 0xffff, hi, lo]),
    ]
}

/// An IPv6 address in any legal spelling: groups padded with zeros (beyond four digits
/// too), either case, an optional `::` standing for one or more of its groups (which the
/// value then has as zeros), and optionally the last 32 bits as sloppy IPv4.
fn v6_text() -> impl Strategy<Value = (String, Ipv6Addr)> {
    (
        v6_groups(),
        prop::array::uniform8((0..5usize, any::<bool>())),
        any::<bool>(),
        prop::array::uniform4(0..4usize),
        any::<Option<(usize, usize)>>(),
    )
        .prop_map(|(mut groups, style, dotted_tail, tail_pad, gap)| {
            // Tokens as written: eight hex groups, or six and one dotted IPv4.
            let hex = |g: u16, (pad, upper): (usize, bool)| {
                let digits = format!("{}{g:x}", zeros(pad));
                if upper {
                    digits.to_uppercase()
                } else {
                    digits
                }
            };
            let hex_tokens = if dotted_tail { 6 } else { 8 };
            let tokens: Vec<(usize, String)> = (0..hex_tokens)
                .map(|i| (1, hex(groups[i], style[i])))
                .chain(dotted_tail.then(|| {
                    let [a, b] = groups[6].to_be_bytes();
                    let [c, d] = groups[7].to_be_bytes();
                    let text = [a, b, c, d]
                        .iter()
                        .zip(tail_pad)
                        .map(|(o, z)| format!("{}{o}", zeros(z)))
                        .collect::<Vec<_>>()
                        .join(".");
                    (2, text)
                }))
                .collect();
            // `::` replaces tokens start..end, never the dotted tail, and at least one
            // group; the value has zeros there.
            let gap = gap.map(|(a, b)| {
                let n = hex_tokens;
                let start = a % n;
                let end = start + 1 + b % (n - start);
                (start, end)
            });
            let text = match gap {
                None => join(&tokens),
                Some((start, end)) => {
                    groups[start..end].fill(0);
                    format!("{}::{}", join(&tokens[..start]), join(&tokens[end..]))
                }
            };
            (text, Ipv6Addr::from(groups))
        })
}

fn join(tokens: &[(usize, String)]) -> String {
    tokens
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(":")
}

fn expected_ip(v6: Ipv6Addr) -> IpAddr {
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

// ------------------------------------------------------------------------------------
// Noisy text: pieces of the grammar in random order, so that some strings are valid and
// most are near misses of every kind.
// ------------------------------------------------------------------------------------

fn noisy_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[0-9]{1,4}",
        3 => "0{0,3}(25[0-9]|2[0-4][0-9]|1?[0-9]?[0-9])",
        3 => "[0-9a-fA-F]{1,6}",
        4 => Just(".".to_string()),
        4 => Just(":".to_string()),
        2 => Just("::".to_string()),
        1 => Just("/".to_string()),
        1 => prop::sample::select(vec![
            " ", "\t", "%", "%eth0", "x", "0x", "g", "+", "-", "[", "]", "٣",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(piece, 1..14).prop_map(|pieces| pieces.concat())
}

/// Dotted text of four to five runs: mostly well-formed IPv4, some with values over 255,
/// a missing or extra field, or a prefix.
fn dotted_text() -> impl Strategy<Value = String> {
    (
        prop::collection::vec("0{0,4}[0-9]{1,3}", 3..=5),
        prop::option::of("/0{0,2}[0-9]{1,3}"),
    )
        .prop_map(|(fields, prefix)| fields.join(".") + prefix.as_deref().unwrap_or(""))
}

/// Valid text (an address or a CIDR) with one to three characters inserted, removed or
/// replaced: the strings right at the edge of the grammar.
fn edited_text() -> impl Strategy<Value = String> {
    let valid = prop_oneof![
        v4_text(3).prop_map(|(t, _)| t),
        v6_text().prop_map(|(t, _)| t),
        (v4_text(2), 0..40u8).prop_map(|((t, _), len)| format!("{t}/{len}")),
        (v6_text(), 0..140u8).prop_map(|((t, _), len)| format!("{t}/0{len}")),
    ];
    let edit = (
        any::<prop::sample::Index>(),
        0..3u8,
        prop::sample::select(vec![':', '.', '/', '0', '1', '9', 'f', 'F', 'g', '%', ' ']),
    );
    (valid, prop::collection::vec(edit, 1..=3)).prop_map(|(text, edits)| {
        let mut chars: Vec<char> = text.chars().collect();
        for (at, op, c) in edits {
            let i = at.index(chars.len() + 1);
            match op {
                0 => chars.insert(i, c),
                1 if i < chars.len() => {
                    chars.remove(i);
                }
                _ if i < chars.len() => chars[i] = c,
                _ => chars.push(c),
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn ipv4_with_leading_zeros_means_its_decimal_value((text, value) in v4_text(6)) {
        prop_assert_eq!(parse_ip_sloppy(&text), Some(IpAddr::V4(value)), "{}", text);
    }

    #[test]
    fn ipv6_in_any_legal_spelling_means_its_value((text, value) in v6_text()) {
        prop_assert_eq!(parse_ip_sloppy(&text), Some(expected_ip(value)), "{}", text);
    }

    #[test]
    fn cidr_means_its_masked_network(
        (text, addr) in prop_oneof![
            v4_text(3).prop_map(|(t, a)| (t, IpAddr::V4(a))),
            v6_text().prop_map(|(t, a)| (t, IpAddr::V6(a))),
        ],
        len in any::<u8>(),
        pad in 0..4usize,
    ) {
        let bits = if addr.is_ipv4() { 33 } else { 129 };
        let len = len % bits;
        let cidr = format!("{text}/{}{len}", zeros(pad));
        // Built from the generated value, not from the text.
        let expected = match addr {
            IpAddr::V4(v4) => net(IpAddr::V4(v4), len).trunc(),
            IpAddr::V6(v6) => {
                let network = net(IpAddr::V6(v6), len).trunc();
                match network {
                    IpNet::V6(n) => match n.network().to_ipv4_mapped() {
                        Some(v4) => net(IpAddr::V4(v4), len - 96),
                        None => network,
                    },
                    IpNet::V4(_) => unreachable!("built as IPv6"),
                }
            }
        };
        prop_assert_eq!(parse_cidr_sloppy(&cidr), Some(expected), "{}", cidr);
        // A CIDR is not an address, and the prefix may not exceed the written family.
        prop_assert_eq!(parse_ip_sloppy(&cidr), None, "{}", cidr);
        let too_long = format!("{text}/{}", bits);
        prop_assert_eq!(parse_cidr_sloppy(&too_long), None, "{}", too_long);
    }

    #[test]
    fn ipv4_near_misses_are_refused(
        (text, _) in v4_text(3),
        pick in 0..4usize,
        how in 0..9usize,
        big in 256u32..100_000,
        junk in prop::sample::select(vec![" ", ".", "\t", "\n", "x", "%eth0", ":80", "/", "0x", "+"]),
    ) {
        let mut fields: Vec<String> = text.split('.').map(str::to_string).collect();
        let bad = match how {
            0 => { fields[pick] = format!("0{big}"); fields.join(".") }
            1 => { fields.remove(pick); fields.join(".") }
            2 => { fields.insert(pick, "1".into()); fields.join(".") }
            3 => { fields[pick].clear(); fields.join(".") }
            4 => { fields[pick] = format!("0x{}", fields[pick]); fields.join(".") }
            5 => format!("{text}{junk}"),
            6 => format!("{junk}{text}"),
            7 => { fields[pick] = format!("-{}", fields[pick]); fields.join(".") }
            _ => { fields[pick].push('a'); fields.join(".") }
        };
        prop_assert_eq!(model_ip(&bad), None, "model accepts {:?}", bad);
        prop_assert_eq!(parse_ip_sloppy(&bad), None, "{:?}", bad);
    }

    #[test]
    fn ipv6_near_misses_are_refused(
        (text, _) in v6_text(),
        how in 0..7usize,
        pick in any::<usize>(),
        big in 0x1_0000u32..0x10_0000,
        junk in prop::sample::select(vec![" ", ":", ".", "x", "g", "0x", "[", "%1"]),
    ) {
        let bad = match how {
            // One group's value does not fit 16 bits, however it is padded.
            0 => {
                let mut pieces: Vec<String> = text.split(':').map(str::to_string).collect();
                let hex: Vec<usize> = (0..pieces.len())
                    .filter(|&i| !pieces[i].is_empty() && !pieces[i].contains('.'))
                    .collect();
                if hex.is_empty() {
                    // Only "::" or "::a.b.c.d": a group fits in front.
                    format!("{big:x}{text}")
                } else {
                    pieces[hex[pick % hex.len()]] = format!("000{big:x}");
                    pieces.join(":")
                }
            }
            1 => format!("{text}%eth0"),
            2 => format!("[{text}]"),
            // A second `::`, or a `::` standing for no group at all.
            3 => {
                if text.contains("::") {
                    format!("{text}::")
                } else {
                    let colons: Vec<usize> = text.match_indices(':').map(|(i, _)| i).collect();
                    match pick % (colons.len() + 2) {
                        0 => format!("::{text}"),
                        1 => format!("{text}::"),
                        n => {
                            let at = colons[n - 2];
                            format!("{}:{}", &text[..at], &text[at..])
                        }
                    }
                }
            }
            // A ninth group, or a dotted tail of five fields.
            4 => if text.contains("::") { format!("{text}:1.2.3.4.5") } else { format!("0:{text}") },
            5 => format!("{text}{junk}"),
            _ => format!("{junk}{text}"),
        };
        prop_assert_eq!(model_ip(&bad), None, "model accepts {:?}", bad);
        prop_assert_eq!(parse_ip_sloppy(&bad), None, "{:?}", bad);
    }

    #[test]
    fn agrees_with_the_reference_model_on_noisy_text(text in prop_oneof![noisy_text(), dotted_text()]) {
        prop_assert_eq!(parse_ip_sloppy(&text), model_ip(&text), "{:?}", text);
        prop_assert_eq!(parse_cidr_sloppy(&text), model_cidr(&text), "{:?}", text);
    }

    #[test]
    fn agrees_with_the_reference_model_next_to_valid_text(text in edited_text()) {
        prop_assert_eq!(parse_ip_sloppy(&text), model_ip(&text), "{:?}", text);
        prop_assert_eq!(parse_cidr_sloppy(&text), model_cidr(&text), "{:?}", text);
    }

    #[test]
    fn agrees_with_the_reference_model_on_any_short_text(text in "[0-9a-fA-F:./% x]{0,24}") {
        prop_assert_eq!(parse_ip_sloppy(&text), model_ip(&text), "{:?}", text);
        prop_assert_eq!(parse_cidr_sloppy(&text), model_cidr(&text), "{:?}", text);
    }
}

/// The reference model itself, on the examples that tell the sloppy grammar from the
/// strict one, so a broken model cannot make the comparisons above vacuous.
#[test]
fn reference_model_reads_legacy_forms() {
    assert_eq!(
        model_ip("010.096.000.041"),
        Some("10.96.0.41".parse().unwrap())
    );
    assert_eq!(model_ip("00000fd00::1"), Some("fd00::1".parse().unwrap()));
    assert_eq!(
        model_ip("::ffff:001.2.3.4"),
        Some("1.2.3.4".parse().unwrap())
    );
    assert_eq!(model_ip("1.2.3.256"), None);
    assert_eq!(model_ip("10000::"), None);
    assert_eq!(model_ip("fe80::1%eth0"), None);
    assert_eq!(
        model_cidr("010.0.0.7/08"),
        Some("10.0.0.0/8".parse().unwrap())
    );
    assert_eq!(
        model_cidr("::ffff:10.0.0.0/104"),
        Some("10.0.0.0/8".parse().unwrap())
    );
}
