//! Dense allocation bitmap with upstream's two-band random-scan strategy.
//!
//! Input: a size and the size of the static (lower) band. Output: offsets in
//! `0..len`. No I/O and no Kubernetes types; `range.rs` and `ports.rs` map
//! offsets to IPs and ports.
//!
//! Semantics follow kube-apiserver's `allocator.AllocationBitmap` with
//! `randomScanStrategyWithOffset`: a dynamic allocation picks a random start in
//! the upper band `[static_band, len)` and scans forward with wrap-around,
//! and only when that band is full does it do the same in `[0, static_band)`.
//! Unlike upstream, the scan works on 64-bit words (mask plus `trailing_zeros`)
//! and skips completely used words through a one-bit-per-word summary, so a
//! nearly full /12 costs a few hundred word reads at worst instead of up to
//! a million single-bit probes.

use bitvec::prelude::{BitVec, Lsb0};
use rand::Rng;
use thiserror::Error;

/// Bits per storage word.
const WORD_BITS: usize = u64::BITS as usize;

/// A snapshot of an allocator: the range it covers and its bitmap.
///
/// Mirrors upstream's `RangeAllocation{Range, Data}`: `data` is the bitmap as a
/// big-endian unsigned integer with leading zero bytes trimmed (Go's
/// `big.Int.Bytes()`), where bit *k* counted from the least-significant bit of
/// the last byte is offset *k*. An empty allocator snapshots to no bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// The range in upstream's spelling: `10.96.0.0/12` or `30000-32767`.
    pub range: String,
    /// The bitmap, big-endian and minimal as `big.Int.Bytes()`.
    pub data: Vec<u8>,
}

/// Snapshot bytes that mark an offset the bitmap cannot hold.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("snapshot marks offset {offset} but the bitmap holds only {len} values")]
pub struct InvalidSnapshot {
    /// The lowest offset set in the data that lies at or beyond `len`.
    pub offset: usize,
    /// How many values the bitmap holds.
    pub len: usize,
}

/// A fixed-size set of allocated offsets `0..len` with a static lower band.
///
/// Invariants (checked by the proptests): `used` equals the number of set
/// bits; a summary bit is set exactly when every in-range bit of its word is
/// set; bits at or beyond `len` are never set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Bit *k* set means offset *k* is allocated.
    bits: BitVec<u64, Lsb0>,
    /// Bit *w* set means word *w* of `bits` has no free in-range bit; lets the
    /// scan skip 4096 used offsets per summary word.
    full_words: BitVec<u64, Lsb0>,
    /// Number of set bits, kept so "full" and the free count are O(1).
    used: usize,
    /// Size of the static band `[0, static_band)`, preferred last by dynamic
    /// allocation.
    static_band: usize,
}

impl Bitmap {
    /// Creates an empty bitmap of `len` offsets whose first `static_band`
    /// offsets form the static band. A band larger than `len` is clamped.
    pub fn new(len: usize, static_band: usize) -> Self {
        Self {
            bits: BitVec::repeat(false, len),
            full_words: BitVec::repeat(false, len.div_ceil(WORD_BITS)),
            used: 0,
            static_band: static_band.min(len),
        }
    }

    /// Number of offsets the bitmap holds.
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    /// Whether the bitmap holds no offsets at all (a /32 or /31, say).
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Size of the static (lower) band.
    pub fn static_band(&self) -> usize {
        self.static_band
    }

    /// Number of allocated offsets.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Number of free offsets; `used() + free() == len()` always.
    pub fn free(&self) -> usize {
        self.len() - self.used
    }

    /// Whether no offset is free. O(1), like upstream's `count >= max` check.
    pub fn is_full(&self) -> bool {
        self.used >= self.len()
    }

    /// Whether `offset` is allocated; `false` for offsets beyond `len`.
    pub fn has(&self, offset: usize) -> bool {
        self.bits.get(offset).is_some_and(|bit| *bit)
    }

    /// Marks `offset` allocated. Returns `false`, changing nothing, if it was
    /// already allocated or lies beyond `len`.
    pub fn allocate(&mut self, offset: usize) -> bool {
        if offset >= self.len() || self.bits[offset] {
            return false;
        }
        self.bits.set(offset, true);
        self.used += 1;
        self.refresh_summary(offset / WORD_BITS);
        true
    }

    /// Marks `offset` free. Returns whether it was allocated; out-of-range
    /// offsets are ignored like upstream's `Release`.
    pub fn release(&mut self, offset: usize) -> bool {
        if !self.has(offset) {
            return false;
        }
        self.bits.set(offset, false);
        self.used -= 1;
        self.full_words.set(offset / WORD_BITS, false);
        true
    }

    /// Allocates a free offset with upstream's strategy: a random start and a
    /// wrapping scan in the upper band, then the same in the static band only
    /// if the upper band is full. Returns `None` when the bitmap is full.
    pub fn allocate_next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<usize> {
        if self.is_full() {
            return None;
        }
        let offset = self
            .scan_band(rng, self.static_band, self.len())
            .or_else(|| self.scan_band(rng, 0, self.static_band))?;
        self.allocate(offset);
        Some(offset)
    }

    /// Allocates a free offset from the static band only, with the same
    /// random-start wrapping scan. A webhook picks from here because the
    /// apiserver's own dynamic allocation avoids this band while it can.
    pub fn allocate_next_static<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<usize> {
        let offset = self.scan_band(rng, 0, self.static_band)?;
        self.allocate(offset);
        Some(offset)
    }

    /// Iterates over allocated offsets in ascending order, a word at a time.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits
            .as_raw_slice()
            .iter()
            .enumerate()
            .flat_map(|(index, &word)| SetBits { word, base: index * WORD_BITS })
    }

    /// Serialises the bitmap like Go's `big.Int.Bytes()`: big-endian, leading
    /// zero bytes trimmed, so upstream RangeAllocation data round-trips.
    pub fn to_bytes(&self) -> Vec<u8> {
        let words = self.bits.as_raw_slice();
        let Some(top) = words.iter().rposition(|&word| word != 0) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity((top + 1) * 8);
        out.extend(words[top].to_be_bytes().into_iter().skip_while(|&byte| byte == 0));
        for word in words[..top].iter().rev() {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Replaces the contents with `data` in the `to_bytes` format and
    /// recomputes the count and summary. Leading zero bytes are accepted.
    /// On error the bitmap is left unchanged.
    pub fn restore(&mut self, data: &[u8]) -> Result<(), InvalidSnapshot> {
        let len = self.len();
        let significant = data.iter().position(|&byte| byte != 0).map_or(&[][..], |first| &data[first..]);
        if let Some(&top) = significant.first() {
            // Highest set bit: the first significant byte's top bit.
            let highest = (significant.len() - 1) * 8 + (7 - top.leading_zeros() as usize);
            if highest >= len {
                return Err(InvalidSnapshot { offset: highest, len });
            }
        }
        let words = self.bits.as_raw_mut_slice();
        words.fill(0);
        for (index, chunk) in significant.rchunks(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes[8 - chunk.len()..].copy_from_slice(chunk);
            words[index] = u64::from_be_bytes(bytes);
        }
        self.used = words.iter().map(|word| word.count_ones() as usize).sum();
        for index in 0..self.full_words.len() {
            self.refresh_summary(index);
        }
        Ok(())
    }

    /// Heap bytes held by the bitmap and its summary (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        (self.bits.capacity() + self.full_words.capacity()).div_ceil(WORD_BITS) * 8
    }

    /// One random-start wrapping scan over `[lo, hi)`.
    fn scan_band<R: Rng + ?Sized>(&self, rng: &mut R, lo: usize, hi: usize) -> Option<usize> {
        if lo >= hi {
            return None;
        }
        let start = lo + rng.random_range(0..hi - lo);
        self.first_free(start, hi).or_else(|| self.first_free(lo, start))
    }

    /// First free offset in `[lo, hi)`, scanning words and skipping full ones.
    fn first_free(&self, lo: usize, hi: usize) -> Option<usize> {
        if lo >= hi {
            return None;
        }
        let words = self.bits.as_raw_slice();
        let last = (hi - 1) / WORD_BITS;
        let mut index = lo / WORD_BITS;
        let mut mask = u64::MAX << (lo % WORD_BITS);
        loop {
            if index == last {
                mask &= word_mask_below(hi - last * WORD_BITS);
            }
            let free = !words[index] & mask;
            if free != 0 {
                return Some(index * WORD_BITS + free.trailing_zeros() as usize);
            }
            if index == last {
                return None;
            }
            index = first_clear(self.full_words.as_raw_slice(), index + 1, last + 1)?;
            mask = u64::MAX;
        }
    }

    /// Recomputes summary bit `index` from its word.
    fn refresh_summary(&mut self, index: usize) {
        let valid = word_mask_below(self.len() - index * WORD_BITS);
        let full = self.bits.as_raw_slice()[index] & valid == valid;
        self.full_words.set(index, full);
    }
}

/// Mask of the lowest `n` bits of a word (all bits when `n >= 64`).
fn word_mask_below(n: usize) -> u64 {
    if n >= WORD_BITS { u64::MAX } else { (1u64 << n) - 1 }
}

/// First clear bit in `[lo, hi)` of a raw word slice, a word at a time.
fn first_clear(words: &[u64], lo: usize, hi: usize) -> Option<usize> {
    if lo >= hi {
        return None;
    }
    let last = (hi - 1) / WORD_BITS;
    let mut mask = u64::MAX << (lo % WORD_BITS);
    for (index, &word) in words.iter().enumerate().take(last + 1).skip(lo / WORD_BITS) {
        if index == last {
            mask &= word_mask_below(hi - last * WORD_BITS);
        }
        let free = !word & mask;
        if free != 0 {
            return Some(index * WORD_BITS + free.trailing_zeros() as usize);
        }
        mask = u64::MAX;
    }
    None
}

/// Iterator over the set bits of one word, lowest first.
struct SetBits {
    word: u64,
    base: usize,
}

impl Iterator for SetBits {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros() as usize;
        self.word &= self.word - 1;
        Some(self.base + bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn empty_bitmap_is_full_and_allocates_nothing() {
        let mut bitmap = Bitmap::new(0, 0);
        assert!(bitmap.is_full());
        assert!(bitmap.is_empty());
        assert_eq!(bitmap.allocate_next(&mut rng()), None);
        assert!(!bitmap.allocate(0));
        assert!(bitmap.to_bytes().is_empty());
    }

    #[test]
    fn dynamic_allocation_fills_upper_band_before_static_band() {
        let mut bitmap = Bitmap::new(200, 16);
        let mut rng = rng();
        for _ in 0..184 {
            let offset = bitmap.allocate_next(&mut rng).unwrap();
            assert!(offset >= 16, "took static offset {offset} while upper band had room");
        }
        for _ in 0..16 {
            let offset = bitmap.allocate_next(&mut rng).unwrap();
            assert!(offset < 16);
        }
        assert!(bitmap.is_full());
        assert_eq!(bitmap.allocate_next(&mut rng), None);
    }

    #[test]
    fn scan_wraps_around_the_end_of_the_band() {
        let mut bitmap = Bitmap::new(130, 0);
        for offset in 1..130 {
            assert!(bitmap.allocate(offset));
        }
        // Only offset 0 is free: every start must wrap to find it.
        for seed in 0..50 {
            let mut copy = bitmap.clone();
            assert_eq!(copy.allocate_next(&mut SmallRng::seed_from_u64(seed)), Some(0));
        }
    }

    #[test]
    fn scan_skips_full_words_through_the_summary() {
        let mut bitmap = Bitmap::new(64 * 200 + 3, 0);
        for offset in 0..bitmap.len() - 1 {
            assert!(bitmap.allocate(offset));
        }
        let last = bitmap.len() - 1;
        assert_eq!(bitmap.allocate_next(&mut rng()), Some(last));
        assert!(bitmap.is_full());
        assert!(bitmap.release(70));
        assert_eq!(bitmap.allocate_next(&mut rng()), Some(70));
    }

    #[test]
    fn static_allocation_only_uses_the_static_band() {
        let mut bitmap = Bitmap::new(100, 10);
        let mut rng = rng();
        for _ in 0..10 {
            assert!(bitmap.allocate_next_static(&mut rng).unwrap() < 10);
        }
        assert_eq!(bitmap.allocate_next_static(&mut rng), None);
        assert_eq!(bitmap.used(), 10);
    }

    #[test]
    fn allocate_and_release_report_changes() {
        let mut bitmap = Bitmap::new(10, 0);
        assert!(bitmap.allocate(3));
        assert!(!bitmap.allocate(3));
        assert!(!bitmap.allocate(10));
        assert!(bitmap.release(3));
        assert!(!bitmap.release(3));
        assert!(!bitmap.release(99));
        assert_eq!(bitmap.used(), 0);
    }

    #[test]
    fn bytes_match_go_big_int_layout() {
        let mut bitmap = Bitmap::new(300, 0);
        bitmap.allocate(0);
        bitmap.allocate(9);
        // big.Int with bits 0 and 9 set is 0x0201.
        assert_eq!(bitmap.to_bytes(), vec![0x02, 0x01]);
        bitmap.allocate(299);
        let bytes = bitmap.to_bytes();
        assert_eq!(bytes.len(), 38);
        assert_eq!(bytes[0], 0x08);
        let mut restored = Bitmap::new(300, 0);
        restored.restore(&bytes).unwrap();
        assert_eq!(restored, bitmap);
        assert_eq!(restored.iter().collect::<Vec<_>>(), vec![0, 9, 299]);
    }

    #[test]
    fn restore_rejects_bits_beyond_len_and_keeps_state() {
        let mut bitmap = Bitmap::new(9, 0);
        bitmap.allocate(1);
        assert_eq!(bitmap.restore(&[0x02, 0x00]), Err(InvalidSnapshot { offset: 9, len: 9 }));
        assert!(bitmap.has(1));
        bitmap.restore(&[0x00, 0x01, 0x00]).unwrap();
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn summary_marks_a_full_partial_last_word() {
        let mut bitmap = Bitmap::new(66, 0);
        for offset in 0..66 {
            bitmap.allocate(offset);
        }
        assert!(bitmap.full_words[1]);
        bitmap.release(65);
        assert!(!bitmap.full_words[1]);
    }
}
