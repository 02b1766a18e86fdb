//! Test support for Keel's decoder fuzz targets (each crate's `tests/fuzz_decoders.rs`).
//!
//! A decoder of untrusted bytes must not panic, must fail with its typed error, and must not
//! allocate more than its input justifies: a 2-byte element that becomes a 100-byte struct turns
//! a 16 MiB request into 800 MiB of heap. This crate gives the targets two tools:
//! - [`CountingAlloc`], a global allocator that counts the bytes each thread holds, and
//!   [`measure`], the peak a closure reached above what the thread held before it; a target
//!   checks that peak against an [`AllocBound`] of `bytes_per_input_byte * len + bytes_fixed`;
//! - [`mutations`] and [`mutate`], which damage valid encodings the way an attacker or a bad disk
//!   would (bit flips, truncations, inflated length prefixes and counts, repeated elements),
//!   because random bytes rarely get past a CRC or a header.
//!
//! Counting is per thread, so the test harness may run targets in parallel: each measures only
//! what its own thread allocates, and a decoder does not hand work to other threads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};

thread_local! {
    // Bytes this thread allocated and did not free yet. Signed: a thread may free what another
    // allocated. `const` and free of destructors, so touching them never allocates, which an
    // allocator must not do.
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with` because a thread that is being torn down may still free memory.
    let _ = CURRENT.try_with(|current| {
        let now = current.get().wrapping_add(delta);
        current.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

/// The system allocator, counting live bytes per thread. Install it in a fuzz target with
/// `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the counting
// around it touches only thread-local integers and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is the one `System.alloc` needs.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller guarantees `new_size`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // The new block is counted before the old one is released: a growing Vec that moves
            // holds both for a moment, and the bound is about the worst moment.
            count(new_size as isize);
            count(-(layout.size() as isize));
        }
        new
    }
}

/// Runs `f` and returns its result and the peak number of bytes this thread held during it,
/// above what it held before (the result, if it owns heap memory, is part of the peak).
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, usize::try_from(peak.saturating_sub(start)).unwrap_or(0))
}

/// Panics unless [`CountingAlloc`] is the global allocator: without it every peak reads 0 and
/// every bound holds, so a target that forgot it would pass without checking anything.
pub fn assert_counting() {
    let (v, peak) = measure(|| std::hint::black_box(vec![1u8; 4096]));
    drop(v);
    assert!(peak >= 4096, "install keel_fuzzkit::CountingAlloc as the #[global_allocator] of this test binary");
}

/// The most a decode may allocate: `bytes_per_input_byte` per input byte plus `bytes_fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocBound {
    /// Heap bytes allowed per byte of input (what one wire byte may legitimately become).
    pub bytes_per_input_byte: usize,
    /// Heap bytes allowed whatever the input (error messages, fixed tables, first allocations).
    pub bytes_fixed: usize,
}

impl AllocBound {
    /// The limit for an input of `input_len` bytes.
    pub fn limit(&self, input_len: usize) -> usize {
        self.bytes_per_input_byte.saturating_mul(input_len).saturating_add(self.bytes_fixed)
    }

    /// Runs `decode` on an input of `input_len` bytes and fails the case if it allocated more
    /// than the limit at any moment. Returns what `decode` returned.
    pub fn check<T>(&self, what: &str, input_len: usize, decode: impl FnOnce() -> T) -> Result<T, TestCaseError> {
        let (out, peak) = measure(decode);
        let limit = self.limit(input_len);
        if peak > limit {
            return Err(TestCaseError::fail(format!(
                "{what}: decoding {input_len} bytes allocated {peak} bytes at its peak, over the bound of {limit} \
                 ({} per input byte + {})",
                self.bytes_per_input_byte, self.bytes_fixed
            )));
        }
        Ok(out)
    }
}

/// The cases one target runs: `PROPTEST_CASES` when it is set (a longer campaign, e.g.
/// `PROPTEST_CASES=100000 cargo test -p keel-record fuzz_decoders`), else `ci_cases`, the
/// share of CI's time budget the target was given.
pub fn config(ci_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(ci_cases);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// Arbitrary bytes, up to `len_max` of them.
pub fn arbitrary_bytes(len_max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=len_max)
}

/// One damage done to an encoding. Positions are taken modulo the input's length when applied, so
/// one mutation fits inputs of any size (and shrinks towards the start).
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flips one bit.
    FlipBit(usize, u8),
    /// Overwrites one byte.
    SetByte(usize, u8),
    /// Cuts the input at a position.
    Truncate(usize),
    /// Removes up to this many bytes at a position.
    Remove(usize, usize),
    /// Inserts bytes at a position.
    Insert(usize, Vec<u8>),
    /// Overwrites four bytes with a big-endian value: an inflated length prefix or count.
    Inflate32(usize, u32),
    /// Replaces the varint that starts at a position with the LEB128 encoding of a value: an
    /// inflated protobuf length or count, or a record-format length.
    InflateVarint(usize, u64),
    /// Repeats the bytes in `[position, position + len)` this many more times: repeated fields
    /// and records, many of them.
    Repeat(usize, usize, usize),
}

/// Values that make length prefixes and counts lie: the extremes, powers of two just past the
/// limits decoders check, and anything at all.
fn big_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(i32::MAX as u64),
        Just(1 << 31),
        Just(1 << 24),
        Just(16 << 20),
        (1u64..1 << 16),
        any::<u64>(),
    ]
}

/// One mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Mutation::FlipBit(i, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), big_u64()).prop_map(|(i, v)| Mutation::Inflate32(i, v as u32)),
        (any::<usize>(), big_u64()).prop_map(|(i, v)| Mutation::InflateVarint(i, v)),
        (any::<usize>(), 1usize..24, 1usize..200).prop_map(|(i, len, times)| Mutation::Repeat(i, len, times)),
    ]
}

/// One to four mutations, applied in order.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..=4)
}

/// Most bytes one `Repeat` may add, so that a case stays cheap however the dice fall.
const REPEAT_BYTES_MAX: usize = 8 * 1024;

/// Applies `mutations` to a copy of `seed`.
pub fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        // Positions are taken in 0..=len so that the end of the input can be hit too.
        let at = |i: &usize, len: usize| i % (len + 1);
        match m {
            Mutation::FlipBit(i, bit) if !b.is_empty() => {
                let p = i % b.len();
                b[p] ^= 1 << bit;
            }
            Mutation::SetByte(i, v) if !b.is_empty() => {
                let p = i % b.len();
                b[p] = *v;
            }
            Mutation::FlipBit(..) | Mutation::SetByte(..) => {}
            Mutation::Truncate(i) => b.truncate(at(i, b.len())),
            Mutation::Remove(i, n) => {
                let p = at(i, b.len());
                let end = (p + n).min(b.len());
                b.drain(p..end);
            }
            Mutation::Insert(i, bytes) => {
                let p = at(i, b.len());
                b.splice(p..p, bytes.iter().copied());
            }
            Mutation::Inflate32(i, v) => {
                let p = at(i, b.len().saturating_sub(4)).min(b.len());
                let end = (p + 4).min(b.len());
                b.splice(p..end, v.to_be_bytes());
            }
            Mutation::InflateVarint(i, v) => {
                let p = at(i, b.len());
                // The varint that starts here ends at the first byte without its top bit.
                let mut end = p;
                while end < b.len() && b[end] & 0x80 != 0 && end - p < 10 {
                    end += 1;
                }
                let end = (end + 1).min(b.len());
                b.splice(p..end, leb128(*v));
            }
            Mutation::Repeat(i, len, times) => {
                let p = at(i, b.len());
                let end = (p + len).min(b.len());
                let chunk = b[p..end].to_vec();
                if !chunk.is_empty() {
                    let times = (*times).min(REPEAT_BYTES_MAX / chunk.len());
                    let copies: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
                    b.splice(end..end, copies);
                }
            }
        }
    }
    b
}

/// The LEB128 (protobuf varint) encoding of `v`.
pub fn leb128(mut v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// A valid encoding from `seeds`, damaged by [`mutations`].
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (proptest::sample::select(seeds), mutations()).prop_map(|(seed, m)| mutate(&seed, &m))
}

/// Fails the case with `what` unless `ok`; for checks outside `proptest!`'s own macros.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> TestCaseResult {
    if ok { Ok(()) } else { Err(TestCaseError::fail(what())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_table() {
        let seed = [1u8, 2, 3, 4, 5, 6];
        let first = 0;
        let cases: &[(Mutation, &[u8])] = &[
            (Mutation::FlipBit(first, 1), &[3, 2, 3, 4, 5, 6]),
            (Mutation::Truncate(3), &[1, 2, 3]),
            (Mutation::Remove(first, 2), &[3, 4, 5, 6]),
            (Mutation::Insert(first, vec![9]), &[9, 1, 2, 3, 4, 5, 6]),
            (Mutation::Inflate32(first, u32::MAX), &[0xff, 0xff, 0xff, 0xff, 5, 6]),
            (Mutation::InflateVarint(first, 300), &[0xac, 0x02, 2, 3, 4, 5, 6]),
            (Mutation::Repeat(first, 2, 2), &[1, 2, 1, 2, 1, 2, 3, 4, 5, 6]),
        ];
        for (m, want) in cases {
            assert_eq!(mutate(&seed, std::slice::from_ref(m)), *want, "{m:?}");
        }
    }

    #[test]
    fn bound_limit_saturates() {
        let b = AllocBound { bytes_per_input_byte: 4, bytes_fixed: 10 };
        assert_eq!(b.limit(3), 22);
        assert_eq!(b.limit(usize::MAX), usize::MAX);
    }
}
