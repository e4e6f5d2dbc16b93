//! The allocator over one pool of values (IPs of a CIDR, ports of a range): the
//! [`Bitmap`] plus the pool's value ↔ offset mapping. No I/O.
//!
//! Both [`crate::ClusterIpAllocator`] and [`crate::NodePortAllocator`] are this
//! type; only their pools (and constructors) differ.

use std::fmt;

use rand::rngs::SmallRng;

use crate::bitmap::{Bitmap, Snapshot};
use crate::error::IpamError;

/// A set of allocatable values laid out on bitmap offsets `0..size`.
pub trait Pool: Copy + fmt::Display {
    /// What is allocated: an IP, a port.
    type Value: Copy + fmt::Display;
    /// The offset of `value`, if it is allocatable in this pool.
    fn offset_of(&self, value: Self::Value) -> Option<usize>;
    /// The value at `offset` (below the pool's size).
    fn value_at(&self, offset: usize) -> Self::Value;
    /// Whether a snapshot's range text names this pool.
    fn is_named(&self, range: &str) -> bool;
}

/// Allocates values of a [`Pool`] with upstream's two-band strategy.
#[derive(Clone, Debug)]
pub struct Allocator<P> {
    pub(crate) pool: P,
    bitmap: Bitmap,
    /// Random starts for dynamic allocation; seeded per allocator as upstream.
    rng: SmallRng,
}

impl<P: Pool> Allocator<P> {
    pub(crate) fn from_parts(pool: P, size: usize, static_band: usize, rng: SmallRng) -> Self {
        Self { pool, bitmap: Bitmap::new(size, static_band), rng }
    }

    /// Number of allocatable values tracked.
    pub fn size(&self) -> usize {
        self.bitmap.len()
    }

    /// Number of values in the static (lower) band.
    pub fn static_band(&self) -> usize {
        self.bitmap.static_band()
    }

    /// Number of allocated values.
    pub fn used(&self) -> usize {
        self.bitmap.used()
    }

    /// Number of free values.
    pub fn free(&self) -> usize {
        self.bitmap.free()
    }

    /// Whether no value is free. O(1).
    pub fn is_full(&self) -> bool {
        self.bitmap.is_full()
    }

    /// Whether `value` is allocatable here.
    pub fn contains(&self, value: P::Value) -> bool {
        self.pool.offset_of(value).is_some()
    }

    /// Whether `value` lies in the static band.
    pub fn is_static(&self, value: P::Value) -> bool {
        self.pool.offset_of(value).is_some_and(|offset| offset < self.bitmap.static_band())
    }

    /// Whether `value` is allocated.
    pub fn has(&self, value: P::Value) -> bool {
        self.pool.offset_of(value).is_some_and(|offset| self.bitmap.has(offset))
    }

    /// Allocates the given value (a static request): any free in-range value,
    /// static band or not.
    pub fn allocate(&mut self, value: P::Value) -> Result<(), IpamError> {
        let offset = self.pool.offset_of(value).ok_or_else(|| IpamError::NotInRange {
            value: value.to_string(),
            range: self.pool.to_string(),
        })?;
        if self.bitmap.allocate(offset) {
            Ok(())
        } else {
            Err(IpamError::Allocated { value: value.to_string(), range: self.pool.to_string() })
        }
    }

    /// Allocates a free value with upstream's dynamic strategy (upper band first).
    pub fn allocate_next(&mut self) -> Result<P::Value, IpamError> {
        match self.bitmap.allocate_next(&mut self.rng) {
            Some(offset) => Ok(self.pool.value_at(offset)),
            None => Err(IpamError::Full { range: self.pool.to_string() }),
        }
    }

    /// Allocates a free value from the static band only, which the apiserver's
    /// own dynamic allocation avoids while it can.
    pub fn allocate_next_static(&mut self) -> Result<P::Value, IpamError> {
        match self.bitmap.allocate_next_static(&mut self.rng) {
            Some(offset) => Ok(self.pool.value_at(offset)),
            None => Err(IpamError::Full { range: format!("{} static band", self.pool) }),
        }
    }

    /// Releases `value`. Returns whether it was allocated; out-of-range values
    /// are ignored, as upstream does.
    pub fn release(&mut self, value: P::Value) -> bool {
        self.pool.offset_of(value).is_some_and(|offset| self.bitmap.release(offset))
    }

    /// Allocated values in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = P::Value> + '_ {
        self.bitmap.iter().map(|offset| self.pool.value_at(offset))
    }

    /// The state as compact bytes, in upstream's RangeAllocation encoding.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { range: self.pool.to_string(), data: self.bitmap.to_bytes() }
    }

    /// Replaces the state with `snapshot`, which must name the same pool.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<(), IpamError> {
        if !self.pool.is_named(&snapshot.range) {
            return Err(IpamError::SnapshotMismatch {
                range: self.pool.to_string(),
                snapshot: snapshot.range.clone(),
            });
        }
        self.bitmap
            .restore(&snapshot.data)
            .map_err(|source| IpamError::CorruptSnapshot { range: self.pool.to_string(), source })
    }

    /// Heap bytes held by the allocation state.
    pub fn heap_bytes(&self) -> usize {
        self.bitmap.heap_bytes()
    }
}
