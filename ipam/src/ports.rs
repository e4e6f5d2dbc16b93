//! NodePort allocation over a port range, and the static band of KEP-3668.
//!
//! Input: a [`PortRange`] (default 30000-32767). Output: ports from a
//! [`Bitmap`] where offset *k* is port `first + k`; no port is excluded.
//! No I/O. Assigning the ports of a whole Service is in `assign.rs`.

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::allocator::{Allocator, Pool};
use crate::bitmap::Snapshot;
use crate::error::IpamError;

/// Size of the static (lower) band of a port range, KEP-3668:
/// `min(max(16, size/32), 128)`, and 0 when `size <= 16`.
/// The default range (2768 ports) gets 86: 30000-30085.
pub fn port_static_band(size: usize) -> usize {
    const MIN: usize = 16;
    const MAX: usize = 128;
    const STEP: usize = 32;
    if size <= MIN {
        return 0;
    }
    (size / STEP).clamp(MIN, MAX)
}

/// An inclusive range of ports, spelled `first-last` as upstream's
/// `--service-node-port-range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// kube-apiserver's default NodePort range, 30000-32767.
    pub const DEFAULT_NODE_PORTS: PortRange = PortRange { first: 30000, last: 32767 };

    /// The range `first..=last`; fails if `first > last` or `first == 0`.
    pub fn new(first: u16, last: u16) -> Result<Self, IpamError> {
        if first == 0 || first > last {
            return Err(IpamError::InvalidPortRange {
                range: format!("{first}-{last}"),
                reason: "need 1 <= first <= last <= 65535".to_owned(),
            });
        }
        Ok(Self { first, last })
    }

    /// The first port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last port (inclusive).
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Number of ports.
    pub fn size(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT_NODE_PORTS
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = IpamError;

    /// Parses `first-last`, `first+count` or a single port, as upstream's
    /// `net.ParsePortRange`.
    fn from_str(text: &str) -> Result<Self, IpamError> {
        let invalid =
            |reason: &str| IpamError::InvalidPortRange { range: text.to_owned(), reason: reason.to_owned() };
        let port = |part: &str| part.trim().parse::<u16>().map_err(|_| invalid("not a port number"));
        if let Some((first, last)) = text.split_once('-') {
            Self::new(port(first)?, port(last)?)
        } else if let Some((first, count)) = text.split_once('+') {
            let first = port(first)?;
            let count: u16 = count.trim().parse().map_err(|_| invalid("bad port count"))?;
            let last = count
                .checked_sub(1)
                .and_then(|extra| first.checked_add(extra))
                .ok_or_else(|| invalid("range is empty or ends past 65535"))?;
            Self::new(first, last)
        } else {
            let single = port(text)?;
            Self::new(single, single)
        }
    }
}

impl Pool for PortRange {
    type Value = u16;

    fn offset_of(&self, port: u16) -> Option<usize> {
        self.contains(port).then(|| usize::from(port - self.first))
    }

    fn value_at(&self, offset: usize) -> u16 {
        // offset < size, so first + offset <= last.
        self.first + offset as u16
    }

    fn is_named(&self, range: &str) -> bool {
        range.parse::<PortRange>().ok() == Some(*self)
    }
}

/// Allocates NodePorts (and health-check NodePorts) from one port range.
pub type NodePortAllocator = Allocator<PortRange>;

impl Allocator<PortRange> {
    /// Creates an empty allocator for `range`.
    pub fn new(range: PortRange) -> Self {
        Self::with_rng(range, SmallRng::from_os_rng())
    }

    /// Like [`NodePortAllocator::new`] with a fixed seed, for tests.
    pub fn with_seed(range: PortRange, seed: u64) -> Self {
        Self::with_rng(range, SmallRng::seed_from_u64(seed))
    }

    /// Restores an allocator from a snapshot (ours or upstream's
    /// `servicenodeports` RangeAllocation).
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self, IpamError> {
        let mut allocator = Self::new(snapshot.range.parse()?);
        allocator.restore(snapshot)?;
        Ok(allocator)
    }

    fn with_rng(range: PortRange, rng: SmallRng) -> Self {
        let size = range.size();
        Self::from_parts(range, size, port_static_band(size), rng)
    }

    /// The port range.
    pub fn range(&self) -> PortRange {
        self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_alloc() -> NodePortAllocator {
        NodePortAllocator::with_seed(PortRange::default(), 3)
    }

    #[test]
    fn default_range_has_an_86_port_static_band() {
        let allocator = default_alloc();
        assert_eq!(allocator.size(), 2768);
        assert_eq!(allocator.static_band(), 86);
        assert!(allocator.is_static(30085));
        assert!(!allocator.is_static(30086));
    }

    #[test]
    fn port_band_sizes_follow_kep_3668() {
        for (range, band) in [
            ("30000-30015", 0),
            ("30000-30016", 16),
            ("32567-32767", 16),
            ("20000-32767", 128),
            ("1-65535", 128),
        ] {
            let range: PortRange = range.parse().unwrap();
            assert_eq!(NodePortAllocator::new(range).static_band(), band, "{range}");
        }
    }

    #[test]
    fn dynamic_ports_come_from_the_upper_band_first() {
        let mut allocator = default_alloc();
        for _ in 0..(2768 - 86) {
            assert!(allocator.allocate_next().unwrap() >= 30086);
        }
        for _ in 0..86 {
            assert!(allocator.allocate_next().unwrap() <= 30085);
        }
        assert_eq!(allocator.allocate_next().unwrap_err().to_string(), "range 30000-32767 is full");
    }

    #[test]
    fn edges_of_the_range() {
        let mut allocator = default_alloc();
        allocator.allocate(30000).unwrap();
        allocator.allocate(32767).unwrap();
        assert_eq!(allocator.allocate(29999).unwrap_err().to_string(), "29999 is not in range 30000-32767");
        assert_eq!(allocator.allocate(32768).unwrap_err().reason(), "NotInRange");
        assert_eq!(allocator.iter().collect::<Vec<_>>(), vec![30000, 32767]);
        assert!(!allocator.release(29999));
    }

    #[test]
    fn single_port_range_has_no_band() {
        let mut allocator = NodePortAllocator::with_seed("30000".parse().unwrap(), 1);
        assert_eq!(allocator.allocate_next().unwrap(), 30000);
        assert!(allocator.is_full());
    }

    #[test]
    fn port_range_parsing() {
        assert_eq!("30000+2768".parse::<PortRange>().unwrap(), PortRange::default());
        assert_eq!(PortRange::default().to_string(), "30000-32767");
        assert!("32767-30000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("65535+2".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
    }

    #[test]
    fn snapshot_round_trips_and_checks_the_range() {
        let mut allocator = default_alloc();
        allocator.allocate(30001).unwrap();
        let snapshot = allocator.snapshot();
        assert_eq!(snapshot.data, vec![0x02]);
        let restored = NodePortAllocator::from_snapshot(&snapshot).unwrap();
        assert!(restored.has(30001));
        assert_eq!(restored.used(), 1);
        let mut other = NodePortAllocator::new("30000-32766".parse().unwrap());
        assert_eq!(other.restore(&snapshot).unwrap_err().reason(), "SnapshotMismatch");
    }
}
