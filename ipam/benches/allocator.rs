//! svcplane side of `ipam/bench.sh`: the same scenarios as
//! `ipam/bench-go/upstream_test.go` runs against upstream's bitmap.
//!
//! All on a 10.0.0.0/12 (1,048,574 addresses), filled by `allocate_next`:
//! - `allocate_next/{0,50,99}`: dynamic allocation at that fill. Every
//!   `BATCH` allocations the batch is released outside the timing, so the
//!   fill stays within 0.1 % of the target.
//! - `release_allocate/50`: release the oldest allocated IP, then
//!   `allocate_next`, at a steady 50 %.
//! - The heap bytes of a 50 % full range are printed as
//!   `svcplane_heap_bytes_50 <n>` for the table.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use svcplane_ipam::ClusterIpAllocator;

/// The range every scenario uses: upstream's largest IPv4 service range.
const CIDR: &str = "10.0.0.0/12";
/// Allocations between two untimed releases.
const BATCH: u64 = 1000;

fn filled(percent: usize) -> ClusterIpAllocator {
    let cidr = CIDR.parse().expect("valid CIDR");
    let mut allocator = ClusterIpAllocator::with_seed(cidr, 42).expect("a /12 is accepted");
    let target = allocator.size() * percent / 100;
    while allocator.used() < target {
        allocator.allocate_next().expect("not full yet");
    }
    allocator
}

fn allocate_next(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate_next");
    for percent in [0, 50, 99] {
        let start = filled(percent);
        group.bench_function(percent.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut allocator = start.clone();
                let mut batch: Vec<IpAddr> = Vec::with_capacity(BATCH as usize);
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = BATCH.min(iters - done);
                    let t = Instant::now();
                    for _ in 0..n {
                        batch.push(black_box(allocator.allocate_next().expect("room")));
                    }
                    total += t.elapsed();
                    for ip in batch.drain(..) {
                        allocator.release(ip);
                    }
                    done += n;
                }
                total
            })
        });
    }
    group.finish();
}

fn release_allocate(c: &mut Criterion) {
    let start = filled(50);
    let held: Vec<IpAddr> = start.iter().collect();
    println!("svcplane_heap_bytes_50 {}", start.heap_bytes());
    let mut group = c.benchmark_group("release_allocate");
    group.bench_function("50", |b| {
        b.iter_custom(|iters| {
            let mut allocator = start.clone();
            let mut ring = held.clone();
            let t = Instant::now();
            for i in 0..iters as usize {
                let slot = i % ring.len();
                allocator.release(ring[slot]);
                ring[slot] = black_box(allocator.allocate_next().expect("room"));
            }
            t.elapsed()
        })
    });
    group.finish();
}

fn config() -> Criterion {
    // Short runs: bench.sh should finish in a couple of minutes on 2 cores.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = allocate_next, release_allocate
}
criterion_main!(benches);
