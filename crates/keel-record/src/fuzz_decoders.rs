//! Fuzz targets for the record-batch decoders: `check`, `Batch::from_bytes`, `batches`,
//! `validate_records`, the `records` iterator, `stamp`, `stamp_append_time` and the varint
//! readers, over arbitrary bytes and over damaged valid batches (with and without a resealed
//! length and CRC, so that damage reaches the record decoder). Each must not panic, must fail with
//! a `DecodeError`, and must not allocate beyond what its input justifies.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-record --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::{
    BATCH_BYTES_MAX, Batch, BatchBuilder, DecodeError, HEADER_LEN, NewRecord, ProducerStamp, RECORD_HEADERS_MAX,
    RecordHeader, get_varlong, put_varlong, raft_entry, stamp,
};
use bytes::Bytes;
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, ensure, measure, mutated};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The decoders borrow: records are zero-copy slices of the input, so nothing grows with the
/// input but the headers of the one record being decoded, which `RECORD_HEADERS_MAX` caps. The
/// fixed part is that cap in decoded headers plus 4 KiB for `Bytes`' shared control block and
/// small vectors; one byte per input byte is slack for an implementation that copies a field.
fn bound() -> AllocBound {
    AllocBound { bytes_per_input_byte: 1, bytes_fixed: RECORD_HEADERS_MAX * std::mem::size_of::<RecordHeader>() + 4096 }
}

/// Runs every decoder over `input`, checks what each promises of a successful decode, and
/// returns how many records decoded (so that the work cannot be optimised away).
fn decode_everything(input: &Bytes) -> Result<usize, String> {
    let mut records = 0;
    if let Ok(h) = crate::check(input)
        && h.total_len() > input.len()
    {
        return Err(format!("check accepted a batch of {} bytes from {} bytes", h.total_len(), input.len()));
    }
    if let Ok(batch) = Batch::from_bytes(input.clone()) {
        let h = *batch.header();
        let valid = batch.validate_records().is_ok();
        let _ = batch.raft_payload();
        let mut offsets = Vec::new();
        for r in batch.records() {
            match r {
                Ok(r) => offsets.push(r.offset),
                Err(_) if valid => return Err("validate_records passed but a record failed".into()),
                Err(_) => break,
            }
        }
        if valid {
            let dense: Vec<u64> = (0..u64::from(h.record_count)).map(|i| h.base_offset + i).collect();
            if offsets != dense {
                return Err(format!("valid batch with offsets {offsets:?}, header says {h:?}"));
            }
        }
        records += offsets.len();
    }
    let mut at = 0;
    for batch in crate::batches(input.clone()) {
        let Ok(batch) = batch else { break };
        at += batch.header().total_len();
        let _ = batch.validate_records();
        records += batch.records().filter(Result::is_ok).count();
    }
    if at > input.len() {
        return Err(format!("batches walked {at} bytes of {}", input.len()));
    }
    Ok(records)
}

fn check_decoders(input: Vec<u8>) -> TestCaseResult {
    let input = Bytes::from(input);
    let len = input.len();
    let result = bound().check("batch decoders", len, || decode_everything(&input))?;
    ensure(result.is_ok(), || format!("{result:?}"))?;
    // The stamping functions rewrite in place: given a copy, they must not allocate at all
    // beyond the fixed part.
    let mut copy = input.to_vec();
    let stamped = bound().check("stamp", 0, || stamp(&mut copy, 5, 6, 7))?;
    if stamped.is_ok() {
        ensure(Batch::from_bytes(Bytes::from(copy.clone())).is_ok(), || "a stamped batch does not verify".into())?;
    }
    let mut copy = input.to_vec();
    let _ = bound().check("stamp_append_time", 0, || crate::stamp_append_time(&mut copy, 1_700_000_000_000))?;
    Ok(())
}

/// Valid batches of every kind the decoders accept.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut b = BatchBuilder::new(BATCH_BYTES_MAX).producer(ProducerStamp {
        producer_id: 7,
        producer_epoch: 2,
        base_sequence: 40,
    });
    b.push(NewRecord { timestamp_ms: 1_000, key: Some(b"k1"), value: Some(b"v1"), headers: &[("h", Some(b"x"))] })
        .unwrap();
    b.push(NewRecord { timestamp_ms: 1_005, key: None, value: None, headers: &[] }).unwrap();
    b.push(NewRecord { timestamp_ms: 1_002, key: Some(b""), value: Some(&[0u8; 40]), headers: &[("a", None)] })
        .unwrap();
    let mut first = b.build().to_vec();
    stamp(&mut first, 100, 3, 9).unwrap();
    seeds.push(first.clone());

    let mut many = BatchBuilder::new(BATCH_BYTES_MAX);
    for i in 0..40 {
        many.push(NewRecord { timestamp_ms: i, key: None, value: Some(b""), headers: &[] }).unwrap();
    }
    seeds.push(many.build().to_vec());

    let headers: Vec<(&str, Option<&[u8]>)> = (0..30).map(|_| ("", None)).collect();
    let mut wide = BatchBuilder::new(BATCH_BYTES_MAX);
    wide.push(NewRecord { timestamp_ms: 0, key: None, value: None, headers: &headers }).unwrap();
    seeds.push(wide.build().to_vec());

    seeds.push(raft_entry(&[1, 10, 4, 8, 1, 8, 2], 2, 5, 77).unwrap().to_vec());
    seeds.push(raft_entry(&[], 1, 1, 0).unwrap().to_vec());

    let mut two = first;
    two.extend_from_slice(&raft_entry(&[0], 3, 10, 103).unwrap());
    seeds.push(two);
    seeds
}

/// Makes damaged bytes a batch again as far as the length field and the CRC go, so that the
/// damage is judged by the header checks and the record decoder, not only by the CRC.
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 8 {
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(16000))]

    #[test]
    fn fuzz_arbitrary_bytes(input in arbitrary_bytes(512)) {
        check_decoders(input)?;
    }

    #[test]
    fn fuzz_damaged_batches(input in mutated(seeds())) {
        check_decoders(input)?;
    }

    #[test]
    fn fuzz_damaged_resealed_batches(input in mutated(seeds())) {
        check_decoders(reseal(input))?;
    }

    #[test]
    fn fuzz_resealed_garbage_after_a_valid_header(body in arbitrary_bytes(256), count in 0u32..64, attrs in 0u16..128) {
        let mut buf = vec![0u8; HEADER_LEN];
        buf[8] = crate::MAGIC;
        buf[9..11].copy_from_slice(&attrs.to_be_bytes());
        buf[11..15].copy_from_slice(&count.to_be_bytes());
        buf.extend_from_slice(&body);
        check_decoders(reseal(buf))?;
    }

    #[test]
    fn fuzz_varints(input in arbitrary_bytes(12)) {
        let mut pos = 0;
        let got = bound().check("get_varlong", input.len(), || get_varlong(&input, &mut pos))?;
        if let Ok(v) = got {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            prop_assert!(pos <= 10 && out.len() <= pos, "{v} read from {pos} bytes re-encodes to {}", out.len());
        }
        let mut pos = 0;
        let _ = crate::get_varint(&input, &mut pos);
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

/// One record carrying `count` headers with an empty key and a null value: 2 bytes each on the
/// wire, 64 bytes each decoded.
fn record_with_empty_headers(count: usize) -> Vec<u8> {
    let mut body = vec![0u8]; // attributes
    put_varlong(&mut body, 0); // timestamp delta
    put_varlong(&mut body, 0); // offset delta
    put_varlong(&mut body, -1); // null key
    put_varlong(&mut body, -1); // null value
    put_varlong(&mut body, count as i64);
    for _ in 0..count {
        put_varlong(&mut body, 0); // empty header key
        put_varlong(&mut body, -1); // null header value
    }
    let mut buf = vec![0u8; HEADER_LEN];
    buf[8] = crate::MAGIC;
    buf[11..15].copy_from_slice(&1u32.to_be_bytes());
    put_varlong(&mut buf, body.len() as i64);
    buf.extend_from_slice(&body);
    reseal(buf)
}

/// Regression (fuzz finding): a record's header count was bounded only by the bytes present, two
/// per header, and each decoded header takes 64 bytes: one 16 MiB batch that a client produces
/// made `validate_records` allocate 512 MiB. Records now carry at most `RECORD_HEADERS_MAX`.
#[test]
fn many_empty_headers_stay_within_the_bound() {
    let input = Bytes::from(record_with_empty_headers(64 * 1024));
    let batch = Batch::from_bytes(input.clone()).unwrap();
    let (result, peak) = measure(|| batch.validate_records());
    assert!(peak <= bound().limit(input.len()), "validate_records allocated {peak} bytes for {} bytes", input.len());
    assert!(
        matches!(result, Err(DecodeError::Malformed(_))),
        "a record with 65536 headers must be refused, got {result:?}"
    );

    let at_limit = Bytes::from(record_with_empty_headers(RECORD_HEADERS_MAX));
    let batch = Batch::from_bytes(at_limit).unwrap();
    batch.validate_records().unwrap();
    assert_eq!(batch.records().next().unwrap().unwrap().headers.len(), RECORD_HEADERS_MAX);
}
