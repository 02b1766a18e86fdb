//! Table-driven codec tests and property tests for the batch format.

use super::*;
use proptest::prelude::*;

fn sample() -> Bytes {
    let mut b = BatchBuilder::new(BATCH_BYTES_MAX).producer(ProducerStamp {
        producer_id: 7,
        producer_epoch: 2,
        base_sequence: 40,
    });
    b.push(NewRecord { timestamp_ms: 1_000, key: Some(b"k1"), value: Some(b"v1"), headers: &[("h", Some(b"x"))] })
        .unwrap();
    b.push(NewRecord { timestamp_ms: 1_005, key: None, value: None, headers: &[] }).unwrap();
    b.push(NewRecord {
        timestamp_ms: 1_002,
        key: Some(b""),
        value: Some(&[0u8; 300]),
        headers: &[("a", None), ("b", Some(b""))],
    })
    .unwrap();
    b.build()
}

#[test]
fn round_trip_fields() {
    let bytes = sample();
    let batch = Batch::from_bytes(bytes.clone()).unwrap();
    let h = batch.header();
    assert_eq!((h.record_count, h.first_timestamp_ms, h.max_timestamp_ms), (3, 1_000, 1_005));
    assert_eq!((h.producer_id, h.producer_epoch, h.base_sequence), (7, 2, 40));
    assert_eq!(h.total_len(), bytes.len());
    batch.validate_records().unwrap();
    let records: Vec<Record> = batch.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(
        records[0].headers,
        vec![RecordHeader { key: Bytes::from_static(b"h"), value: Some(Bytes::from_static(b"x")) }]
    );
    assert_eq!((records[1].key.clone(), records[1].value.clone(), records[1].timestamp_ms), (None, None, 1_005));
    assert_eq!(records[2].value.as_ref().map(|v| v.len()), Some(300));
    assert_eq!(records[2].headers[0].value, None);
    assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn stamp_rewrites_offsets_and_crc() {
    let mut buf = sample().to_vec();
    let h = stamp(&mut buf, 100, 3, 9).unwrap();
    assert_eq!((h.base_offset, h.raft_term, h.raft_index), (100, 3, 9));
    let batch = Batch::from_bytes(Bytes::from(buf)).unwrap();
    assert_eq!(batch.header(), &h);
    let offsets: Vec<u64> = batch.records().map(|r| r.unwrap().offset).collect();
    assert_eq!(offsets, vec![100, 101, 102]);
}

#[test]
fn raft_entry_has_payload_and_no_records() {
    let bytes = raft_entry(b"membership", 2, 5, 77).unwrap();
    let batch = Batch::from_bytes(bytes).unwrap();
    assert!(batch.header().attributes.is_raft_entry());
    assert_eq!(batch.header().next_offset(), 77);
    assert_eq!(batch.header().last_offset(), None);
    assert_eq!(&batch.raft_payload()[..], b"membership");
    assert_eq!(batch.records().count(), 0);
    batch.validate_records().unwrap();
}

/// Each row: a mutation of a valid batch and the error class it must produce.
#[test]
fn rejects_table() {
    let good = sample().to_vec();
    type Mutate = fn(&mut Vec<u8>);
    type Expect = fn(&DecodeError) -> bool;
    let cases: &[(&str, Mutate, Expect)] = &[
        ("empty", |b| b.clear(), |e| matches!(e, DecodeError::Incomplete { .. })),
        ("short", |b| b.truncate(30), |e| matches!(e, DecodeError::Incomplete { .. })),
        (
            "4 GiB length",
            |b| b[..4].copy_from_slice(&u32::MAX.to_be_bytes()),
            |e| matches!(e, DecodeError::BadLength(_)),
        ),
        ("zero length", |b| b[..4].copy_from_slice(&0u32.to_be_bytes()), |e| matches!(e, DecodeError::BadLength(_))),
        ("flipped value bit", |b| *b.last_mut().unwrap() ^= 1, |e| matches!(e, DecodeError::Crc { .. })),
        ("flipped offset bit", |b| b[20] ^= 0x10, |e| matches!(e, DecodeError::Crc { .. })),
        ("flipped crc bit", |b| b[5] ^= 1, |e| matches!(e, DecodeError::Crc { .. })),
        ("all zero", |b| b.iter_mut().for_each(|x| *x = 0), |e| matches!(e, DecodeError::BadLength(0))),
    ];
    for (name, mutate, expect) in cases {
        let mut buf = good.clone();
        mutate(&mut buf);
        let err = Batch::from_bytes(Bytes::from(buf)).expect_err(name);
        assert!(expect(&err), "{name}: unexpected {err:?}");
    }
}

#[test]
fn bad_records_under_a_valid_crc_are_caught() {
    // Corrupt the records, then re-seal the CRC: the header passes, record validation must not.
    let mut buf = sample().to_vec();
    buf[HEADER_LEN + 3] ^= 0x7f; // inside the first record's offset delta / key
    let crc = crc32fast::hash(&buf[CRC_START..]);
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    let batch = Batch::from_bytes(Bytes::from(buf)).unwrap();
    assert!(batch.validate_records().is_err());
}

#[test]
fn builder_respects_its_limit() {
    let mut b = BatchBuilder::new(200);
    b.push(NewRecord { timestamp_ms: 1, value: Some(&[1; 100]), ..Default::default() }).unwrap();
    let before = b.size();
    let err = b.push(NewRecord { timestamp_ms: 1, value: Some(&[1; 100]), ..Default::default() }).unwrap_err();
    assert!(matches!(err, EncodeError::TooLarge { .. }));
    assert_eq!(b.size(), before, "a rejected record leaves the builder unchanged");
    assert_eq!(Batch::from_bytes(b.build()).unwrap().header().record_count, 1);
}

#[test]
fn builder_refuses_more_headers_than_a_record_may_carry() {
    let headers: Vec<(&str, Option<&[u8]>)> = vec![("h", None); RECORD_HEADERS_MAX + 1];
    let mut b = BatchBuilder::new(BATCH_BYTES_MAX);
    let err = b.push(NewRecord { timestamp_ms: 1, headers: &headers, ..Default::default() }).unwrap_err();
    assert!(matches!(err, EncodeError::Invalid(_)), "{err:?}");
    assert!(b.is_empty(), "a refused record leaves the builder unchanged");
    b.push(NewRecord { timestamp_ms: 1, headers: &headers[..RECORD_HEADERS_MAX], ..Default::default() }).unwrap();
    let batch = Batch::from_bytes(b.build()).unwrap();
    batch.validate_records().unwrap();
}

#[test]
fn batches_iterates_back_to_back() {
    let mut all = sample().to_vec();
    all.extend_from_slice(&raft_entry(b"", 1, 1, 3).unwrap());
    all.extend_from_slice(&sample());
    let got: Vec<_> = batches(Bytes::from(all.clone())).collect();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|b| b.is_ok()));
    all.truncate(all.len() - 1);
    let got: Vec<_> = batches(Bytes::from(all)).collect();
    assert!(got[2].is_err());
}

/// (timestamp delta, key, value, headers)
type ArbRecord = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>);

fn arb_record() -> impl Strategy<Value = ArbRecord> {
    (
        0i64..1_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        proptest::collection::vec(
            ("[a-z]{0,8}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10))),
            0..3,
        ),
    )
}

proptest! {
    #[test]
    fn prop_encode_decode_round_trip(
        base in 0u64..u64::MAX / 2,
        term in any::<u64>(),
        index in any::<u64>(),
        start in 0i64..1i64 << 42,
        records in proptest::collection::vec(arb_record(), 1..20),
    ) {
        let mut b = BatchBuilder::new(BATCH_BYTES_MAX);
        for (dt, k, v, h) in &records {
            let headers: Vec<(&str, Option<&[u8]>)> = h.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            b.push(NewRecord { timestamp_ms: start + dt, key: k.as_deref(), value: v.as_deref(), headers: &headers }).unwrap();
        }
        let mut buf = b.build().to_vec();
        stamp(&mut buf, base, term, index).unwrap();
        let batch = Batch::from_bytes(Bytes::from(buf)).unwrap();
        batch.validate_records().unwrap();
        prop_assert_eq!(batch.header().record_count as usize, records.len());
        prop_assert_eq!(batch.header().raft_index, index);
        for (i, (got, (dt, k, v, h))) in batch.records().map(|r| r.unwrap()).zip(&records).enumerate() {
            prop_assert_eq!(got.offset, base + i as u64);
            prop_assert_eq!(got.timestamp_ms, start + dt);
            prop_assert_eq!(got.key.as_deref(), k.as_deref());
            prop_assert_eq!(got.value.as_deref(), v.as_deref());
            prop_assert_eq!(got.headers.len(), h.len());
            for (gh, (hk, hv)) in got.headers.iter().zip(h) {
                prop_assert_eq!(&gh.key[..], hk.as_bytes());
                prop_assert_eq!(gh.value.as_deref(), hv.as_deref());
            }
        }
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = Bytes::from(bytes);
        if let Ok(batch) = Batch::from_bytes(bytes.clone()) {
            let _ = batch.validate_records();
        }
        for b in batches(bytes).flatten() {
            let _ = b.records().count();
        }
    }

    #[test]
    fn prop_resealed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512), count in 0u32..64, attrs in 0u16..128) {
        // Garbage with a valid CRC reaches the record decoder; it must fail cleanly.
        let mut buf = vec![0u8; HEADER_LEN];
        buf.extend_from_slice(&body);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf[8] = MAGIC;
        buf[9..11].copy_from_slice(&attrs.to_be_bytes());
        buf[11..15].copy_from_slice(&count.to_be_bytes());
        let crc = crc32fast::hash(&buf[CRC_START..]);
        buf[4..8].copy_from_slice(&crc.to_be_bytes());
        if let Ok(batch) = Batch::from_bytes(Bytes::from(buf)) {
            let _ = batch.validate_records();
        }
    }

    #[test]
    fn prop_single_bit_flip_is_detected(byte in 0usize..4096, bit in 0u8..8) {
        let mut buf = sample().to_vec();
        let at = byte % buf.len();
        buf[at] ^= 1 << bit;
        prop_assert!(Batch::from_bytes(Bytes::from(buf)).is_err());
    }
}

#[test]
fn append_time_replaces_zero_timestamps_only() {
    let mut zero = BatchBuilder::new(1 << 16);
    for v in [&b"a"[..], b"b"] {
        zero.push(NewRecord { timestamp_ms: 0, key: None, value: Some(v), headers: &[] }).unwrap();
    }
    let mut buf = zero.build().to_vec();
    assert!(stamp_append_time(&mut buf, 1_700_000_000_123).unwrap());
    let batch = Batch::from_bytes(Bytes::from(buf)).unwrap();
    let times: Vec<i64> = batch.records().map(|r| r.unwrap().timestamp_ms).collect();
    assert_eq!(times, [1_700_000_000_123; 2]);
    assert_eq!(batch.header().max_timestamp_ms, 1_700_000_000_123);

    let mut own = BatchBuilder::new(1 << 16);
    own.push(NewRecord { timestamp_ms: 5, key: None, value: Some(b"x"), headers: &[] }).unwrap();
    let original = own.build().to_vec();
    let mut buf = original.clone();
    assert!(!stamp_append_time(&mut buf, 99).unwrap(), "a producer's own timestamps stay");
    assert_eq!(buf, original);
}

#[test]
fn sequences_wrap_at_2_pow_31() {
    assert_eq!(sequence_after(5, 3), 8);
    assert_eq!(sequence_after(i32::MAX, 1), 0, "after i32::MAX comes 0");
    assert_eq!(sequence_after(i32::MAX - 1, 3), 1);
    assert_eq!(sequence_after(7, 1 << 31), 7, "a whole turn");
    assert_eq!(sequence_after(7, u64::MAX), sequence_after(7, u64::MAX % (1 << 31)));
    let header = BatchHeader {
        base_offset: 100,
        record_count: 4,
        producer_id: 9,
        producer_epoch: 2,
        base_sequence: i32::MAX - 1,
        ..check(&sample()).unwrap()
    };
    assert_eq!(header.producer_stamp(100), Some((9, 2, i32::MAX - 1)));
    assert_eq!(header.producer_stamp(103), Some((9, 2, 1)));
    let unstamped = BatchHeader { producer_id: -1, ..header };
    assert_eq!(unstamped.producer_stamp(101), None);
}
