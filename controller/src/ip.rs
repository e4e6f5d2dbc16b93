//! IP families, and IP parsing and printing exactly as Go's
//! `netutils.ParseIPSloppy` and `net.IP.String()` do. Pure.
//!
//! All three controllers parse leniently and write the canonical form: mirroring
//! (user-written Endpoints addresses), Endpoints and EndpointSlices (Pod IPs:
//! upstream's `getEndpointAddresses` and `IsIPv6String` both call
//! `ParseIPSloppy`), so
//! that `01.02.03.04` becomes `1.2.3.4` and uncompressed IPv6 becomes RFC 5952.
//! This is a line-by-line port of the forked Go 1.16 parser in
//! `k8s.io/utils/internal/third_party/forked/golang/net/ip.go`, because `std`'s
//! parser is stricter (it refuses leading zeros and IPv6 groups longer than four
//! hex digits, both of which Go accepts).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IP family, i.e. an EndpointSlice `addressType` (svcplane never writes the
/// deprecated `FQDN` type for Pods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// `IPv4` (IPv4-mapped IPv6 addresses count as IPv4, as in Go's `net.IP`).
    V4,
    /// `IPv6`.
    V6,
}

impl IpFamily {
    /// The `addressType` / `ipFamilies` spelling: `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// Parses an `addressType` / `ipFamilies` value; anything else (e.g. `FQDN`) is `None`.
    pub fn from_name(name: &str) -> Option<IpFamily> {
        match name {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    /// The family of an address, with IPv4-mapped IPv6 counted as IPv4 (Go `IsIPv6`).
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Go's `big`: `dtoi`/`xtoi` give up once a number reaches this.
const BIG: u32 = 0x00FF_FFFF;

/// Parses `text` as Go's `ParseIPSloppy` does and folds IPv4-mapped IPv6 into IPv4
/// (Go's `ip.To4() != nil`), so the variant is the address family upstream uses.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let bytes = text.as_bytes();
    // Go decides the family by the first '.' or ':' it meets.
    let first = bytes.iter().find(|b| **b == b'.' || **b == b':')?;
    if *first == b'.' {
        return parse_ipv4(bytes).map(|octets| IpAddr::V4(Ipv4Addr::from(octets)));
    }
    let v6 = Ipv6Addr::from(parse_ipv6(bytes)?);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// `ip.String()` in Go: dotted IPv4, or IPv6 with the first longest run of two or
/// more zero groups written as `::` and lower-case hex without leading zeros.
pub fn canonical_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format_ipv6(v6.segments()),
        },
    }
}

/// Parses and re-prints an address; `None` when Go would return a nil IP.
pub fn canonicalize(text: &str) -> Option<(IpAddr, String)> {
    let ip = parse_ip_sloppy(text)?;
    Some((ip, canonical_ip(ip)))
}

fn format_ipv6(segments: [u16; 8]) -> String {
    // Longest run of zero groups; on a tie the first one wins.
    let (mut best_start, mut best_len) = (0usize, 0usize);
    let mut i = 0;
    while i < segments.len() {
        let start = i;
        while i < segments.len() && segments[i] == 0 {
            i += 1;
        }
        if i - start > best_len {
            best_start = start;
            best_len = i - start;
        }
        if i == start {
            i += 1;
        }
    }
    // RFC 5952: "::" must not shorten a single zero group.
    if best_len < 2 {
        return segments.iter().map(|s| format!("{s:x}")).collect::<Vec<_>>().join(":");
    }
    let hex = |part: &[u16]| part.iter().map(|s| format!("{s:x}")).collect::<Vec<_>>().join(":");
    format!("{}::{}", hex(&segments[..best_start]), hex(&segments[best_start + best_len..]))
}

/// Decimal to integer: (number, characters consumed), `None` on no digits or overflow.
fn dtoi(s: &[u8]) -> Option<(u32, usize)> {
    let mut n = 0u32;
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        n = n * 10 + u32::from(s[i] - b'0');
        if n >= BIG {
            return None;
        }
        i += 1;
    }
    (i > 0).then_some((n, i))
}

/// Hexadecimal to integer: (number, characters consumed), `None` on no digits or overflow.
fn xtoi(s: &[u8]) -> Option<(u32, usize)> {
    let mut n = 0u32;
    let mut i = 0;
    while i < s.len() {
        let digit = match s[i] {
            b @ b'0'..=b'9' => b - b'0',
            b @ b'a'..=b'f' => b - b'a' + 10,
            b @ b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        n = n * 16 + u32::from(digit);
        if n >= BIG {
            return None;
        }
        i += 1;
    }
    (i > 0).then_some((n, i))
}

fn parse_ipv4(mut s: &[u8]) -> Option<[u8; 4]> {
    let mut octets = [0u8; 4];
    for (i, octet) in octets.iter_mut().enumerate() {
        if s.is_empty() {
            return None;
        }
        if i > 0 {
            if s[0] != b'.' {
                return None;
            }
            s = &s[1..];
        }
        // Leading zeros are accepted and read as decimal (the "sloppy" part).
        let (n, consumed) = dtoi(s)?;
        *octet = u8::try_from(n).ok()?;
        s = &s[consumed..];
    }
    s.is_empty().then_some(octets)
}

fn parse_ipv6(mut s: &[u8]) -> Option<[u8; 16]> {
    let mut ip = [0u8; 16];
    let mut ellipsis: Option<usize> = None;
    if s.len() >= 2 && s[0] == b':' && s[1] == b':' {
        ellipsis = Some(0);
        s = &s[2..];
        if s.is_empty() {
            return Some(ip);
        }
    }
    let mut i = 0;
    while i < 16 {
        let (n, consumed) = xtoi(s)?;
        if n > 0xFFFF {
            return None;
        }
        // A dot after the number means a trailing dotted IPv4 part.
        if consumed < s.len() && s[consumed] == b'.' {
            if ellipsis.is_none() && i != 12 {
                return None;
            }
            if i + 4 > 16 {
                return None;
            }
            let v4 = parse_ipv4(s)?;
            ip[i..i + 4].copy_from_slice(&v4);
            s = &[];
            i += 4;
            break;
        }
        let [hi, lo] = u16::try_from(n).ok()?.to_be_bytes();
        ip[i] = hi;
        ip[i + 1] = lo;
        i += 2;
        s = &s[consumed..];
        if s.is_empty() {
            break;
        }
        if s[0] != b':' || s.len() == 1 {
            return None;
        }
        s = &s[1..];
        if s[0] == b':' {
            if ellipsis.is_some() {
                return None;
            }
            ellipsis = Some(i);
            s = &s[1..];
            if s.is_empty() {
                break;
            }
        }
    }
    if !s.is_empty() {
        return None;
    }
    if i < 16 {
        let at = ellipsis?;
        let gap = 16 - i;
        ip.copy_within(at..i, at + gap);
        ip[at..at + gap].fill(0);
    } else if ellipsis.is_some() {
        // The ellipsis must stand for at least one zero group.
        return None;
    }
    Some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> Option<String> {
        canonicalize(text).map(|(_, s)| s)
    }

    #[test]
    fn sloppy_parse_matches_go() {
        let cases: &[(&str, Option<&str>)] = &[
            ("1.2.3.4", Some("1.2.3.4")),
            ("01.02.03.004", Some("1.2.3.4")),
            ("010.0.0.1", Some("10.0.0.1")),
            ("256.0.0.1", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1.2.3.4 ", None),
            ("", None),
            ("abc", None),
            ("::", Some("::")),
            ("::1", Some("::1")),
            ("1234::5678:0000:0000:9abc:def0", Some("1234::5678:0:0:9abc:def0")),
            ("2001:DB8:0:0:0:0:0:1", Some("2001:db8::1")),
            ("2001:db8:0:1:0:0:0:1", Some("2001:db8:0:1::1")),
            ("2001:db8::1:0:0:1", Some("2001:db8::1:0:0:1")),
            ("1:0:1:1:1:1:1:1", Some("1:0:1:1:1:1:1:1")),
            ("::ffff:1.2.3.4", Some("1.2.3.4")),
            ("::ffff:01.2.3.4", Some("1.2.3.4")),
            ("::1.2.3.4", Some("::102:304")),
            ("00001::1", Some("1::1")),
            ("fe80::1%eth0", None),
            ("1:2:3:4:5:6:7:8::", None),
            ("1:2:3:4:5:6:7::", Some("1:2:3:4:5:6:7:0")),
            (":1::", None),
            ("1::2::3", None),
        ];
        for (input, want) in cases {
            assert_eq!(canon(input).as_deref(), *want, "input {input:?}");
        }
    }

    #[test]
    fn family_folds_ipv4_mapped_into_ipv4() {
        assert!(matches!(parse_ip_sloppy("::ffff:10.0.0.1"), Some(IpAddr::V4(_))));
        assert!(matches!(parse_ip_sloppy("fd00::1"), Some(IpAddr::V6(_))));
    }
}
