//! Property tests: whatever the sequence of allocations and releases, no
//! value is handed out twice, used + free = size, the count matches the set
//! bits, snapshots round-trip, and a static request for a free in-range value
//! always succeeds.

use std::collections::BTreeSet;
use std::net::IpAddr;

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use svcplane_ipam::{Bitmap, ClusterIpAllocator, IpamError, NodePortAllocator, PortRange};

#[derive(Clone, Debug)]
enum Op {
    Next,
    NextStatic,
    Static(u32),
    Release(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Next),
        1 => Just(Op::NextStatic),
        2 => any::<u32>().prop_map(Op::Static),
        3 => any::<u32>().prop_map(Op::Release),
    ]
}

/// Small CIDRs around the band and word edges; the index picks one.
const CIDRS: &[&str] = &[
    "10.0.0.0/30",
    "10.0.0.0/28",
    "10.0.0.0/27",
    "10.0.0.0/25",
    "10.0.0.0/23",
    "fd00::/127",
    "fd00::/124",
    "fd00::/120",
];

/// An address near the CIDR (some outside it) picked by `pick`.
fn candidate(allocator: &ClusterIpAllocator, pick: u32) -> IpAddr {
    let size = allocator.size() as u32 + 4;
    let delta = pick % size;
    match allocator.cidr().network() {
        IpAddr::V4(net) => IpAddr::V4((u32::from(net) + delta).into()),
        IpAddr::V6(net) => IpAddr::V6((u128::from(net) + u128::from(delta)).into()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn cluster_ips_are_never_handed_out_twice(
        cidr in 0..CIDRS.len(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..400),
    ) {
        let mut allocator = ClusterIpAllocator::with_seed(CIDRS[cidr].parse().unwrap(), seed).unwrap();
        let mut model: BTreeSet<IpAddr> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Next => match allocator.allocate_next() {
                    Ok(ip) => {
                        prop_assert!(allocator.contains(ip));
                        prop_assert!(model.insert(ip), "{ip} handed out twice");
                    }
                    Err(IpamError::Full { .. }) => prop_assert_eq!(model.len(), allocator.size()),
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                },
                Op::NextStatic => {
                    if let Ok(ip) = allocator.allocate_next_static() {
                        prop_assert!(allocator.is_static(ip));
                        prop_assert!(model.insert(ip), "{ip} handed out twice");
                    }
                }
                Op::Static(pick) => {
                    let ip = candidate(&allocator, pick);
                    let result = allocator.allocate(ip);
                    if !allocator.contains(ip) {
                        let is_not_in_range = matches!(result, Err(IpamError::NotInRange { .. }));
                        prop_assert!(is_not_in_range);
                    } else if model.contains(&ip) {
                        let is_allocated = matches!(result, Err(IpamError::Allocated { .. }));
                        prop_assert!(is_allocated);
                    } else {
                        // A free in-range value: static requests never fail.
                        prop_assert!(result.is_ok(), "{ip}: {result:?}");
                        model.insert(ip);
                    }
                }
                Op::Release(pick) => {
                    let ip = candidate(&allocator, pick);
                    prop_assert_eq!(allocator.release(ip), model.remove(&ip));
                }
            }
            prop_assert_eq!(allocator.used() + allocator.free(), allocator.size());
            prop_assert_eq!(allocator.used(), model.len());
        }
        prop_assert_eq!(allocator.iter().collect::<BTreeSet<_>>(), model.clone());
        let restored = ClusterIpAllocator::from_snapshot(&allocator.snapshot()).unwrap();
        prop_assert_eq!(restored.iter().collect::<BTreeSet<_>>(), model);
        prop_assert_eq!(restored.used(), allocator.used());
    }

    #[test]
    fn bitmap_count_equals_set_bits_and_scan_prefers_the_upper_band(
        len in 0usize..300,
        band in 0usize..40,
        seed in any::<u64>(),
        ops in proptest::collection::vec((any::<bool>(), any::<usize>()), 1..600),
    ) {
        let mut bitmap = Bitmap::new(len, band);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut model = BTreeSet::new();
        for (allocate, pick) in ops {
            if allocate {
                let upper_free = (bitmap.static_band()..len).any(|o| !model.contains(&o));
                match bitmap.allocate_next(&mut rng) {
                    Some(offset) => {
                        prop_assert!(offset < len);
                        prop_assert!(model.insert(offset), "offset {offset} twice");
                        if upper_free {
                            prop_assert!(offset >= bitmap.static_band());
                        }
                    }
                    None => prop_assert_eq!(model.len(), len),
                }
            } else {
                let offset = pick % (len + 1);
                prop_assert_eq!(bitmap.release(offset), model.remove(&offset));
            }
            prop_assert_eq!(bitmap.used(), model.len());
            prop_assert_eq!(bitmap.free(), len - model.len());
            prop_assert_eq!(bitmap.is_full(), model.len() == len);
        }
        prop_assert_eq!(bitmap.iter().collect::<BTreeSet<_>>(), model);
        let mut restored = Bitmap::new(len, band);
        restored.restore(&bitmap.to_bytes()).unwrap();
        prop_assert_eq!(restored, bitmap);
    }

    #[test]
    fn node_ports_round_trip_and_static_requests_succeed_when_free(
        last in 30000u16..30300,
        seed in any::<u64>(),
        ops in proptest::collection::vec((0u8..3, 29990u16..30310), 1..300),
    ) {
        let range = PortRange::new(30000, last).unwrap();
        let mut allocator = NodePortAllocator::with_seed(range, seed);
        let mut model = BTreeSet::new();
        for (kind, port) in ops {
            match kind {
                0 => {
                    if let Ok(port) = allocator.allocate_next() {
                        prop_assert!(model.insert(port), "port {port} twice");
                    }
                }
                1 => {
                    let result = allocator.allocate(port);
                    if range.contains(port) && !model.contains(&port) {
                        prop_assert!(result.is_ok());
                        model.insert(port);
                    } else {
                        prop_assert!(result.is_err());
                    }
                }
                _ => prop_assert_eq!(allocator.release(port), model.remove(&port)),
            }
            prop_assert_eq!(allocator.used() + allocator.free(), allocator.size());
        }
        let restored = NodePortAllocator::from_snapshot(&allocator.snapshot()).unwrap();
        prop_assert_eq!(restored.iter().collect::<BTreeSet<_>>(), model);
    }
}
