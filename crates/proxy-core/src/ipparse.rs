//! IP addresses and CIDRs as the Kubernetes API stores them.
//!
//! The API accepted IPv4 written with leading zeros (`010.096.000.041`) for years, and
//! objects written then are still stored that way. Upstream kube-proxy reads these fields
//! with `k8s.io/utils/net`'s `ParseIPSloppy` / `ParseCIDRSloppy`, a fork of Go 1.16's
//! `net.ParseIP` / `net.ParseCIDR`, so it serves them. Rust's parsers (like Go's since
//! 1.17) refuse those forms, so every API field upstream reads sloppily comes through here.
//!
//! The grammar is Go 1.16's, exactly:
//! - IPv4: four runs of decimal digits joined by `.`; a run may have any number of leading
//!   zeros (they are ignored: decimal, never octal) and its value is at most 255.
//! - IPv6: runs of hex digits joined by `:`; a run may be longer than four digits as long
//!   as its value fits 16 bits. One `::` may stand for one or more zero groups. The last
//!   32 bits may be written as an IPv4 address, with the IPv4 rules above.
//! - Nothing else: no zone (`%eth0`), no brackets, no surrounding whitespace (callers trim
//!   where upstream trims).
//! - CIDR: an address, `/`, then the prefix length as decimal digits (leading zeros
//!   allowed). Host bits are dropped, as Go's `ParseCIDR` returns the masked network.
//!
//! An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`) comes back as the IPv4 address
//! (`1.2.3.4`). Go keeps both in the same 16 bytes, and upstream decides the family with
//! `To4()` (`IPFamilyOf`, `IsIPv6String`) and writes rules with `String()`, which prints
//! `1.2.3.4`: to upstream such a value is IPv4 everywhere. A CIDR whose masked network is
//! IPv4-mapped (prefix 96 or more) likewise comes back as the IPv4 network with the prefix
//! less 96 (`::ffff:10.0.0.0/104` is `10.0.0.0/8`); that is how Go prints it and which
//! family upstream files it under.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Parses an IP address as upstream's `ParseIPSloppy` does; see the module documentation.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    // Like Go, the first separator decides which grammar applies.
    match text.bytes().find(|b| matches!(b, b'.' | b':'))? {
        b'.' => parse_v4(text.as_bytes()).map(IpAddr::V4),
        _ => parse_v6(text.as_bytes()).map(unmap),
    }
}

/// Parses a CIDR as upstream's `ParseCIDRSloppy` does and returns its network (host bits
/// cleared); see the module documentation.
pub fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (addr, prefix) = text.split_once('/')?;
    if let Some(v4) = parse_v4(addr.as_bytes()) {
        let len = decimal(prefix.as_bytes(), 32)?;
        return Some(IpNet::V4(Ipv4Net::new(v4, len).ok()?.trunc()));
    }
    // An address written in IPv6 form takes a prefix out of 128, even if it is v4-mapped.
    let v6 = parse_v6(addr.as_bytes())?;
    let net = Ipv6Net::new(v6, decimal(prefix.as_bytes(), 128)?)
        .ok()?
        .trunc();
    Some(match net.network().to_ipv4_mapped() {
        // Masking kept the ::ffff: marker, so the prefix is at least 96.
        Some(v4) => IpNet::V4(Ipv4Net::new(v4, net.prefix_len().checked_sub(96)?).ok()?),
        None => IpNet::V6(net),
    })
}

fn unmap(v6: Ipv6Addr) -> IpAddr {
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A non-empty run of decimal digits, nothing else, with value at most `max`.
fn decimal(digits: &[u8], max: u8) -> Option<u8> {
    if digits.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        // Checked at every digit, so any number of leading zeros is fine and nothing
        // overflows however long the run.
        value = value * 10 + u32::from(b - b'0');
        if value > u32::from(max) {
            return None;
        }
    }
    u8::try_from(value).ok()
}

/// Exactly four decimal fields, nothing before or after.
fn parse_v4(text: &[u8]) -> Option<Ipv4Addr> {
    let mut fields = text.split(|b| *b == b'.');
    let mut octets = [0u8; 4];
    for octet in &mut octets {
        *octet = decimal(fields.next()?, 255)?;
    }
    match fields.next() {
        None => Some(Ipv4Addr::from(octets)),
        Some(_) => None,
    }
}

/// The value of the run of hex digits at the start of `text` and its length; `None` when
/// there is no digit or the value does not fit 16 bits.
fn hex_group(text: &[u8]) -> Option<(u16, usize)> {
    let len = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if len == 0 {
        return None;
    }
    let mut value: u32 = 0;
    for &b in &text[..len] {
        let digit = char::from(b).to_digit(16)?;
        value = value * 16 + digit;
        if value > 0xFFFF {
            return None;
        }
    }
    Some((u16::try_from(value).ok()?, len))
}

/// Scans groups left to right, remembering where `::` was, then moves the groups after
/// it to the end, as Go 1.16 does.
fn parse_v6(text: &[u8]) -> Option<Ipv6Addr> {
    let mut bytes = [0u8; 16];
    let mut filled = 0; // bytes written so far
    let mut gap: Option<usize> = None; // where `::` stands, in bytes
    let mut rest = text;
    if let Some(after) = rest.strip_prefix(b"::") {
        gap = Some(0);
        rest = after;
    }
    while !rest.is_empty() && filled < 16 {
        let (group, len) = hex_group(rest)?;
        if rest.get(len) == Some(&b'.') {
            // The rest is an IPv4 address for the next 32 bits. That they are the last
            // 32 (directly, or once `::` is expanded) is checked after the loop.
            if filled + 4 > 16 {
                return None;
            }
            bytes[filled..filled + 4].copy_from_slice(&parse_v4(rest)?.octets());
            filled += 4;
            rest = &[];
            break;
        }
        bytes[filled..filled + 2].copy_from_slice(&group.to_be_bytes());
        filled += 2;
        rest = &rest[len..];
        if rest.is_empty() {
            break;
        }
        // A group is followed by `:` and more, or by `::` (possibly ending the text).
        rest = match rest {
            [b':', b':', after @ ..] if gap.is_none() => {
                gap = Some(filled);
                after
            }
            [b':', b':', ..] => return None,
            [b':', after @ ..] if !after.is_empty() => after,
            _ => return None,
        };
    }
    if !rest.is_empty() {
        return None;
    }
    match gap {
        // Without `::` every group must be written; with it, it must stand for at
        // least one.
        None if filled == 16 => {}
        Some(at) if filled < 16 => {
            let moved = filled - at;
            bytes.copy_within(at..filled, 16 - moved);
            bytes[at..16 - moved].fill(0);
        }
        _ => return None,
    }
    Some(Ipv6Addr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Option<String> {
        parse_ip_sloppy(text).map(|ip| ip.to_string())
    }

    fn cidr(text: &str) -> Option<String> {
        parse_cidr_sloppy(text).map(|net| net.to_string())
    }

    #[test]
    fn ipv4_with_leading_zeros_is_decimal() {
        assert_eq!(ip("010.096.000.041").as_deref(), Some("10.96.0.41"));
        assert_eq!(ip("1.2.3.004").as_deref(), Some("1.2.3.4"));
        assert_eq!(ip("0000000255.0.00.1").as_deref(), Some("255.0.0.1"));
        // Would be 8.8.8.8 if read as octal, as inet_aton does.
        assert_eq!(ip("010.010.010.010").as_deref(), Some("10.10.10.10"));
        assert_eq!(ip("192.168.1.1").as_deref(), Some("192.168.1.1"));
    }

    #[test]
    fn ipv4_near_misses_are_refused() {
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.256",
            "1.2.3.0256",
            "1..2.3",
            ".1.2.3",
            "1.2.3.4.",
            " 1.2.3.4",
            "1.2.3.4 ",
            "1.2.3.4\n",
            "0x1.2.3.4",
            "1.2.3.0x4",
            "+1.2.3.4",
            "1.2.3.-4",
            "1.2.3.4/32",
            "1.2.3.4:80",
            "1.2.3.4%eth0",
            "1.2.3.a",
            "1.2.3.٣",
            "1",
            "localhost",
        ] {
            assert_eq!(ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ipv6_groups_may_be_long_while_they_fit() {
        assert_eq!(ip("fd00::1").as_deref(), Some("fd00::1"));
        assert_eq!(ip("00000fd00::0001").as_deref(), Some("fd00::1"));
        assert_eq!(ip("FD00:0:0:0:0:0:0:0FFFF").as_deref(), Some("fd00::ffff"));
        assert_eq!(ip("::").as_deref(), Some("::"));
        assert_eq!(ip("1::").as_deref(), Some("1::"));
        assert_eq!(ip("1:2:3:4:5:6:7::").as_deref(), Some("1:2:3:4:5:6:7:0"));
        assert_eq!(ip("::2:3:4:5:6:7:8").as_deref(), Some("0:2:3:4:5:6:7:8"));
        assert_eq!(ip("1:2:3:4:5:6:7:8").as_deref(), Some("1:2:3:4:5:6:7:8"));
    }

    #[test]
    fn ipv6_embedded_ipv4_uses_the_ipv4_rules() {
        assert_eq!(ip("::1.2.3.4").as_deref(), Some("::102:304"));
        assert_eq!(
            ip("64:ff9b::010.0.0.001").as_deref(),
            Some("64:ff9b::a00:1")
        );
        assert_eq!(
            ip("1:2:3:4:5:6:1.2.3.4").as_deref(),
            Some("1:2:3:4:5:6:102:304")
        );
        assert_eq!(
            ip("1:2:3:4:5::1.2.3.4").as_deref(),
            Some("1:2:3:4:5:0:102:304")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        assert_eq!(
            parse_ip_sloppy("::ffff:1.2.3.4"),
            Some(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(ip("::FFFF:010.000.000.001").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip("0:0:0:0:0:ffff:a00:1").as_deref(), Some("10.0.0.1"));
        // IPv4-compatible (deprecated) and NAT64 addresses stay IPv6.
        assert_eq!(ip("::1.2.3.4").as_deref(), Some("::102:304"));
        assert_eq!(ip("::fffe:1.2.3.4").as_deref(), Some("::fffe:102:304"));
    }

    #[test]
    fn ipv6_near_misses_are_refused() {
        for bad in [
            ":",
            ":::",
            "1:",
            ":1",
            ":1::",
            "1:::2",
            "1::2::3",
            "10000::",
            "0x1::",
            "fe80::1%eth0",
            "[fd00::1]",
            " fd00::1",
            "fd00::1 ",
            "1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:8:9",
            "1:2:3:4:5:6:7:8::",
            "::1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6:7:1.2.3.4",
            "1:2:3:4:5:6::1.2.3.4",
            "1:2:3:4:5:1.2.3.4",
            "::1.2.3",
            "::1.2.3.256",
            "::1.2.3.4:5",
            "::1.2.3.4.5",
            "1.2.3.4::",
            "::a.2.3.4",
            "::ffff:1.2.3.4%eth0",
            "g::",
            "fd00::/64",
        ] {
            assert_eq!(ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cidrs_are_masked_and_take_leading_zeros() {
        assert_eq!(
            cidr("010.244.001.000/024").as_deref(),
            Some("10.244.1.0/24")
        );
        assert_eq!(cidr("10.244.1.7/24").as_deref(), Some("10.244.1.0/24"));
        assert_eq!(cidr("1.2.3.4/0000000032").as_deref(), Some("1.2.3.4/32"));
        assert_eq!(cidr("1.2.3.4/0").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(cidr("fd00:1::5/064").as_deref(), Some("fd00:1::/64"));
        assert_eq!(cidr("::/0").as_deref(), Some("::/0"));
    }

    #[test]
    fn ipv4_mapped_cidrs_are_ipv4_when_the_network_is() {
        assert_eq!(cidr("::ffff:10.1.2.3/104").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(cidr("::ffff:1.2.3.4/128").as_deref(), Some("1.2.3.4/32"));
        assert_eq!(cidr("::ffff:1.2.3.4/96").as_deref(), Some("0.0.0.0/0"));
        // Masking removed the ::ffff: marker: an IPv6 network.
        assert_eq!(cidr("::ffff:1.2.3.4/95").as_deref(), Some("::fffe:0:0/95"));
        assert_eq!(cidr("::ffff:1.2.3.4/80").as_deref(), Some("::/80"));
    }

    #[test]
    fn cidr_near_misses_are_refused() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "/24",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-8",
            "10.0.0.0/8 ",
            " 10.0.0.0/8",
            "10.0.0.0/ 8",
            "10.0.0.0 /8",
            "10.0.0.0/8/8",
            "10.0.0.0/0x8",
            "10.0.0.256/8",
            "fe80::1%eth0/64",
            "[fd00::]/64",
            "10.0.0.0/99999999999999999999",
        ] {
            assert_eq!(cidr(bad), None, "{bad:?}");
        }
    }
}
