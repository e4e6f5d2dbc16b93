//! ClusterIP allocation over one CIDR: CIDR <-> offset mapping, bands, caps.
//!
//! Input: an `ipnetwork` CIDR. Output: IPs from a [`Bitmap`]. No I/O.
//!
//! Layout as upstream `ipallocator.Range`: offset 0 is the first address after
//! the network address. IPv4 excludes the network and broadcast addresses,
//! IPv6 only the network address; both are reported as not in range, so they
//! can never be allocated or released.
//!
//! Size caps (see README.md for the reasoning):
//! - IPv4 prefixes shorter than /12 are refused, as kube-apiserver's flag
//!   validation does ("for 32-bit addresses, the mask must be >= 12"): a /12
//!   is a 2^20-bit, 128 KiB bitmap, and larger persisted bitmaps broke etcd
//!   (kubernetes #12820, #94029).
//! - IPv6 prefixes of /108 and longer are tracked whole. Shorter prefixes
//!   (a /64, say) are truncated to their first 2^20 addresses, where upstream's
//!   bitmap truncated to 2^16: the same 128 KiB bound as the largest IPv4
//!   range, 16 times upstream's room, and the static band is unaffected.
//!   Addresses beyond the tracked part are reported as not in range.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::allocator::{Allocator, Pool};
use crate::bitmap::Snapshot;
use crate::dualstack::IpFamily;
use crate::error::IpamError;

/// Shortest IPv4 prefix accepted: upstream's `--service-cluster-ip-range`
/// limit of 20 host bits.
pub const IPV4_MIN_PREFIX: u8 = 12;

/// Host bits of the largest IPv6 block tracked; shorter prefixes are
/// truncated to their first `2^IPV6_MAX_HOST_BITS` addresses.
pub const IPV6_MAX_HOST_BITS: u8 = 20;

/// Size of the static (lower) band of an IP range, KEP-3070:
/// `min(max(16, size/16), 256)`, and 0 when `size <= 16`.
///
/// `cidr_size` is the *full* CIDR size as upstream's `netutils.RangeSize`
/// computes it (network and broadcast included, see [`upstream_range_size`]),
/// not the usable count. A /28 (16 addresses) therefore has no static band,
/// a /27 a band of 16.
pub fn ip_static_band(cidr_size: u64) -> usize {
    const MIN: u64 = 16;
    const MAX: u64 = 256;
    const STEP: u64 = 16;
    if cidr_size <= MIN {
        return 0;
    }
    // Bounded by MAX, so the cast cannot truncate.
    (cidr_size / STEP).clamp(MIN, MAX) as usize
}

/// Upstream `netutils.RangeSize`: `2^host_bits`, except 0 for IPv4 /0–/1 and
/// IPv6 /0–/1 and `i64::MAX` from 63 host bits on.
pub fn upstream_range_size(cidr: &IpNetwork) -> u64 {
    let bits: u8 = if cidr.is_ipv4() { 32 } else { 128 };
    let host = bits - cidr.prefix();
    if (bits == 32 && host >= 31) || (bits == 128 && host >= 127) {
        0
    } else if host >= 63 {
        i64::MAX as u64
    } else {
        1 << host
    }
}

/// The usable addresses of one CIDR, as a [`Pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPool {
    /// The CIDR, normalised to its network address.
    cidr: IpNetwork,
    /// The address of offset 0 (network address + 1) as an integer.
    base: u128,
    /// Number of usable addresses tracked.
    size: usize,
}

impl fmt::Display for IpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cidr.fmt(f)
    }
}

impl Pool for IpPool {
    type Value = IpAddr;

    /// Inside the CIDR, not the network or IPv4 broadcast address, and within
    /// the tracked size.
    fn offset_of(&self, ip: IpAddr) -> Option<usize> {
        if !self.cidr.contains(ip) {
            return None;
        }
        let value = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let offset = usize::try_from(value.checked_sub(self.base)?).ok()?;
        (offset < self.size).then_some(offset)
    }

    fn value_at(&self, offset: usize) -> IpAddr {
        let value = self.base + offset as u128;
        match self.cidr {
            // In range by construction: base + offset is inside a v4 CIDR.
            IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
            IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    fn is_named(&self, range: &str) -> bool {
        range.parse::<IpNetwork>().is_ok_and(|net| net == self.cidr)
    }
}

/// Allocates ClusterIPs from one CIDR.
pub type ClusterIpAllocator = Allocator<IpPool>;

impl Allocator<IpPool> {
    /// Creates an empty allocator for `cidr` (host bits are ignored).
    /// Fails with [`IpamError::RangeTooLarge`] for IPv4 prefixes below /12.
    pub fn new(cidr: IpNetwork) -> Result<Self, IpamError> {
        Self::with_rng(cidr, SmallRng::from_os_rng())
    }

    /// Like [`ClusterIpAllocator::new`] with a fixed seed, for reproducible
    /// tests and benchmarks.
    pub fn with_seed(cidr: IpNetwork, seed: u64) -> Result<Self, IpamError> {
        Self::with_rng(cidr, SmallRng::seed_from_u64(seed))
    }

    /// Restores an allocator from a snapshot taken by [`Allocator::snapshot`] or
    /// from upstream RangeAllocation data.
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self, IpamError> {
        let cidr: IpNetwork =
            snapshot.range.parse().map_err(|_| IpamError::InvalidCidr { range: snapshot.range.clone() })?;
        let mut allocator = Self::new(cidr)?;
        allocator.restore(snapshot)?;
        Ok(allocator)
    }

    fn with_rng(cidr: IpNetwork, rng: SmallRng) -> Result<Self, IpamError> {
        let cidr = normalise(cidr);
        let (size, base) = match cidr {
            IpNetwork::V4(net) => {
                if net.prefix() < IPV4_MIN_PREFIX {
                    return Err(IpamError::RangeTooLarge {
                        range: cidr.to_string(),
                        reason: format!(
                            "IPv4 service ranges need a prefix of /{IPV4_MIN_PREFIX} or longer \
                             (at most 2^20 addresses, as kube-apiserver's flag validation)"
                        ),
                    });
                }
                let total = 1u64 << (32 - net.prefix());
                // Network and broadcast addresses are never allocatable.
                (total.saturating_sub(2), u128::from(u32::from(net.network())) + 1)
            }
            IpNetwork::V6(net) => {
                let host = (128 - net.prefix()).min(IPV6_MAX_HOST_BITS);
                // Only the network address is excluded.
                ((1u64 << host) - 1, u128::from(net.network()) + 1)
            }
        };
        let size = usize::try_from(size).map_err(|_| IpamError::RangeTooLarge {
            range: cidr.to_string(),
            reason: "the range does not fit this platform's address space".to_owned(),
        })?;
        let band = ip_static_band(upstream_range_size(&cidr));
        Ok(Self::from_parts(IpPool { cidr, base, size }, size, band, rng))
    }

    /// The CIDR, normalised to its network address.
    pub fn cidr(&self) -> IpNetwork {
        self.pool.cidr
    }

    /// The IP family of the range.
    pub fn family(&self) -> IpFamily {
        if self.pool.cidr.is_ipv4() { IpFamily::IPv4 } else { IpFamily::IPv6 }
    }
}

/// The CIDR with host bits cleared, so it prints as upstream's `cidr.String()`.
fn normalise(cidr: IpNetwork) -> IpNetwork {
    // Cannot fail: the prefix comes from a valid network of the same family.
    IpNetwork::new(cidr.network(), cidr.prefix()).unwrap_or(cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(cidr: &str) -> ClusterIpAllocator {
        ClusterIpAllocator::with_seed(cidr.parse().unwrap(), 1).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn drain(allocator: &mut ClusterIpAllocator) -> Vec<IpAddr> {
        let mut out = Vec::new();
        while let Ok(ip) = allocator.allocate_next() {
            out.push(ip);
        }
        out.sort();
        out
    }

    #[test]
    fn ipv4_slash_32_and_31_have_no_usable_address() {
        for cidr in ["10.0.0.1/32", "10.0.0.0/31"] {
            let mut allocator = alloc(cidr);
            assert_eq!(allocator.size(), 0, "{cidr}");
            assert!(allocator.is_full());
            assert_eq!(
                allocator.allocate_next().unwrap_err().to_string(),
                format!("range {} is full", allocator.cidr())
            );
            assert!(!allocator.contains(ip("10.0.0.0")));
        }
    }

    #[test]
    fn ipv4_slash_30_hands_out_only_the_two_hosts() {
        let mut allocator = alloc("10.0.0.0/30");
        assert_eq!(allocator.static_band(), 0);
        assert_eq!(drain(&mut allocator), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(allocator.used(), 2);
        assert_eq!(allocator.free(), 0);
    }

    #[test]
    fn network_and_broadcast_are_not_in_range() {
        let mut allocator = alloc("10.96.0.0/16");
        for reserved in ["10.96.0.0", "10.96.255.255"] {
            assert!(!allocator.contains(ip(reserved)));
            assert_eq!(
                allocator.allocate(ip(reserved)).unwrap_err().to_string(),
                format!("{reserved} is not in range 10.96.0.0/16")
            );
            assert!(!allocator.release(ip(reserved)));
        }
        assert!(allocator.contains(ip("10.96.0.1")));
        assert!(allocator.contains(ip("10.96.255.254")));
        assert!(!allocator.contains(ip("10.97.0.1")));
        assert!(!allocator.contains(ip("fd00::1")));
        assert_eq!(allocator.size(), 65534);
    }

    #[test]
    fn ipv6_slash_128_is_empty_and_127_has_one_address() {
        assert_eq!(alloc("fd00::/128").size(), 0);
        let mut allocator = alloc("fd00::/127");
        assert_eq!(drain(&mut allocator), vec![ip("fd00::1")]);
        assert!(!allocator.contains(ip("fd00::")));
    }

    #[test]
    fn ipv6_slash_120_keeps_the_last_address() {
        let mut allocator = alloc("fd00::/120");
        assert_eq!(allocator.size(), 255);
        assert_eq!(allocator.static_band(), 16);
        assert!(allocator.contains(ip("fd00::ff")));
        allocator.allocate(ip("fd00::ff")).unwrap();
        assert_eq!(drain(&mut allocator).len(), 254);
    }

    #[test]
    fn static_band_sizes_follow_kep_3070() {
        let cases = [
            ("10.0.0.0/29", 0),
            ("10.0.0.0/28", 0),
            ("10.0.0.0/27", 16),
            ("10.0.0.0/24", 16),
            ("10.0.0.0/22", 64),
            ("10.0.0.0/20", 256),
            ("10.0.0.0/12", 256),
            ("fd00::/124", 0),
            ("fd00::/123", 16),
            ("fd00::/112", 256),
            ("fd00::/64", 256),
        ];
        for (cidr, band) in cases {
            assert_eq!(alloc(cidr).static_band(), band, "{cidr}");
        }
    }

    #[test]
    fn band_boundary_addresses_of_a_slash_24() {
        let allocator = alloc("10.0.0.0/24");
        assert!(allocator.is_static(ip("10.0.0.1")));
        assert!(allocator.is_static(ip("10.0.0.16")));
        assert!(!allocator.is_static(ip("10.0.0.17")));
        assert!(!allocator.is_static(ip("10.0.0.0")));
    }

    #[test]
    fn dynamic_allocation_takes_the_static_band_last() {
        let mut allocator = alloc("10.0.0.0/27");
        for _ in 0..14 {
            let got = allocator.allocate_next().unwrap();
            assert!(!allocator.is_static(got), "{got} taken before upper band was full");
        }
        for _ in 0..16 {
            assert!(allocator.is_static(allocator.clone().allocate_next().unwrap()));
            allocator.allocate_next().unwrap();
        }
        assert!(allocator.is_full());
    }

    #[test]
    fn static_requests_may_take_any_free_value() {
        let mut allocator = alloc("10.0.0.0/24");
        allocator.allocate(ip("10.0.0.10")).unwrap();
        allocator.allocate(ip("10.0.0.200")).unwrap();
        assert_eq!(
            allocator.allocate(ip("10.0.0.10")).unwrap_err(),
            IpamError::Allocated { value: "10.0.0.10".into(), range: "10.0.0.0/24".into() }
        );
        assert!(allocator.has(ip("10.0.0.10")));
        assert!(allocator.release(ip("10.0.0.10")));
        assert!(!allocator.has(ip("10.0.0.10")));
    }

    #[test]
    fn static_band_allocation_reports_its_own_fullness() {
        let mut allocator = alloc("10.0.0.0/24");
        for _ in 0..16 {
            assert!(allocator.is_static(allocator.clone().allocate_next_static().unwrap()));
            allocator.allocate_next_static().unwrap();
        }
        assert_eq!(
            allocator.allocate_next_static().unwrap_err().to_string(),
            "range 10.0.0.0/24 static band is full"
        );
        assert_eq!(allocator.free(), 254 - 16);
    }

    #[test]
    fn full_range_refuses_and_recovers_after_release() {
        let mut allocator = alloc("10.0.0.0/28");
        assert_eq!(drain(&mut allocator).len(), 14);
        assert!(allocator.is_full());
        assert!(allocator.release(ip("10.0.0.7")));
        assert_eq!(allocator.allocate_next().unwrap(), ip("10.0.0.7"));
    }

    #[test]
    fn ipv4_shorter_than_slash_12_is_refused() {
        let err = ClusterIpAllocator::new("10.0.0.0/11".parse().unwrap()).unwrap_err();
        assert_eq!(err.reason(), "RangeTooLarge");
        assert!(err.to_string().starts_with("range 10.0.0.0/11 is too large"));
        assert_eq!(alloc("10.0.0.0/12").size(), (1 << 20) - 2);
    }

    #[test]
    fn large_ipv6_ranges_are_truncated_to_two_to_the_twenty() {
        let allocator = alloc("fd00::/64");
        assert_eq!(allocator.size(), (1 << 20) - 1);
        assert!(allocator.contains(ip("fd00::f:ffff")));
        assert!(!allocator.contains(ip("fd00::10:0")));
        assert_eq!(alloc("fd00::/108").size(), (1 << 20) - 1);
        assert_eq!(alloc("fd00::/109").size(), (1 << 19) - 1);
    }

    #[test]
    fn host_bits_in_the_cidr_are_ignored() {
        let allocator = alloc("10.96.3.4/16");
        assert_eq!(allocator.cidr().to_string(), "10.96.0.0/16");
        assert_eq!(allocator.snapshot().range, "10.96.0.0/16");
    }

    #[test]
    fn snapshot_round_trips_and_checks_the_range() {
        let mut allocator = alloc("10.96.0.0/16");
        allocator.allocate(ip("10.96.0.1")).unwrap();
        allocator.allocate(ip("10.96.0.10")).unwrap();
        let snapshot = allocator.snapshot();
        // Offsets 0 and 9, as Go's big.Int.Bytes() would encode them.
        assert_eq!(snapshot.data, vec![0x02, 0x01]);
        let restored = ClusterIpAllocator::from_snapshot(&snapshot).unwrap();
        assert_eq!(restored.iter().collect::<Vec<_>>(), vec![ip("10.96.0.1"), ip("10.96.0.10")]);
        let mut other = alloc("10.97.0.0/16");
        assert_eq!(
            other.restore(&snapshot).unwrap_err().to_string(),
            "snapshot of range 10.96.0.0/16 does not match range 10.97.0.0/16"
        );
        let mut small = alloc("10.0.0.0/30");
        let corrupt = Snapshot { range: "10.0.0.0/30".into(), data: vec![0x04] };
        assert_eq!(small.restore(&corrupt).unwrap_err().reason(), "CorruptSnapshot");
        let garbage = Snapshot { range: "not-a-cidr".into(), data: Vec::new() };
        assert_eq!(
            ClusterIpAllocator::from_snapshot(&garbage).unwrap_err().to_string(),
            r#"invalid CIDR "not-a-cidr""#
        );
    }
}
