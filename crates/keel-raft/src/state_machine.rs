//! The partition state machine: pure code, no I/O. It applies committed entries in order and
//! keeps only small state — the high watermark, the log start, idempotent-producer state — so a
//! snapshot is a few bytes, never the data (the data is the log itself).

use std::collections::VecDeque;

use keel_proto::bounded;
use keel_proto::v1 as pb;
use keel_record::BatchHeader;
use prost::Message;

use crate::convert::{self, ConvertError};
use crate::producers::{ProducerEntry, ProducerLimits, ProducerTable, SequencedBatch, Stamped};
use crate::types::{Appended, LogId, SnapshotMeta, StoredMembership};

/// The applied state of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionState {
    /// The last applied raft log id.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership,
    /// The offset the next record gets: every offset below it is committed (the high watermark).
    pub next_offset: u64,
    /// The first offset the log still holds.
    pub log_start_offset: u64,
    /// Idempotent producers: what a retried batch is recognised by.
    pub producers: ProducerTable,
}

impl PartitionState {
    /// Applies a committed data batch: it takes the next offsets. Returns where it landed.
    /// `limits` bound the producer table; every replica must apply with the same ones.
    pub fn apply_batch(&mut self, log_id: LogId, header: &BatchHeader, limits: &ProducerLimits) -> Appended {
        self.check_order(log_id);
        let base_offset = self.next_offset;
        self.next_offset += u64::from(header.record_count);
        if header.producer_id >= 0 && header.record_count > 0 {
            let stamped = Stamped {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                base_sequence: header.base_sequence,
                record_count: header.record_count,
                timestamp_ms: header.max_timestamp_ms,
            };
            self.producers.record(&stamped, base_offset, self.next_offset, limits);
        }
        self.last_applied = Some(log_id);
        Appended { base_offset, next_offset: self.next_offset }
    }

    /// Applies a blank entry (a new leader's first entry): it takes no offsets.
    pub fn apply_blank(&mut self, log_id: LogId) {
        self.check_order(log_id);
        self.last_applied = Some(log_id);
    }

    /// Applies a membership change.
    pub fn apply_membership(&mut self, log_id: LogId, membership: StoredMembership) {
        self.check_order(log_id);
        self.membership = membership;
        self.last_applied = Some(log_id);
    }

    fn check_order(&self, log_id: LogId) {
        // Entries are applied once each, in log order; anything else is a bug that would corrupt
        // offsets, so stop here rather than serve wrong data.
        if let Some(last) = self.last_applied {
            assert!(log_id.index == last.index + 1, "applied {log_id} after {last}: out of order");
        }
    }

    /// Encodes the state as a snapshot, with `meta` describing what it covers.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        pb::PartitionSnapshot {
            meta: Some(convert::snapshot_meta_to_pb(&self.snapshot_meta())),
            next_offset: self.next_offset,
            log_start_offset: self.log_start_offset,
            producers: self
                .producers
                .iter()
                .map(|(id, p)| {
                    let last = p.batches.back();
                    pb::ProducerState {
                        producer_id: *id,
                        producer_epoch: i32::from(p.epoch),
                        last_sequence: last.map_or(-1, |b| b.last_sequence),
                        last_offset: last.map_or(0, |b| b.next_offset.saturating_sub(1)),
                        batches: p
                            .batches
                            .iter()
                            .map(|b| pb::ProducerBatch {
                                first_sequence: b.first_sequence,
                                last_sequence: b.last_sequence,
                                base_offset: b.base_offset,
                                next_offset: b.next_offset,
                            })
                            .collect(),
                        last_timestamp_ms: p.last_timestamp_ms,
                    }
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes a snapshot. prost would first decode every producer into a vector, a 24-byte
    /// struct per element of as few as 2 wire bytes in a vector that doubles, so a snapshot at
    /// the raft message limit could take gigabytes. The producers are decoded one at a time into
    /// the map instead (the state the snapshot stands for), and the rest of the message, no
    /// larger than the snapshot, is decoded by prost once it is counted like a request.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<PartitionState, ConvertError> {
        let mut head = Vec::new();
        let mut producers = ProducerTable::default();
        for_each_field(bytes, |number, wire_type, field, value| {
            if number == PRODUCERS_FIELD && wire_type == WIRE_TYPE_LEN {
                // Bounded too: a producer's batches are a list the snapshot's sender chose.
                let p =
                    bounded::decode::<pb::ProducerState>(value).map_err(|e| ConvertError(format!("snapshot: {e}")))?;
                // As prost's vector would have been read: a later entry for the same id wins.
                let (id, entry) = producer_from_pb(&p)?;
                producers.restore(id, entry);
            } else {
                head.extend_from_slice(field);
            }
            Ok(())
        })?;
        let s = bounded::decode::<pb::PartitionSnapshot>(&head).map_err(|e| ConvertError(format!("snapshot: {e}")))?;
        debug_assert!(s.producers.is_empty(), "every producer was split off before prost decoded the rest");
        let meta = convert::snapshot_meta_from_pb(s.meta)?;
        if s.log_start_offset > s.next_offset {
            return Err(ConvertError("snapshot log start is after its end".into()));
        }
        Ok(PartitionState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership,
            next_offset: s.next_offset,
            log_start_offset: s.log_start_offset,
            producers,
        })
    }

    /// The metadata of a snapshot taken now.
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone() }
    }
}

/// A snapshot's producer entry.
fn producer_from_pb(p: &pb::ProducerState) -> Result<(i64, ProducerEntry), ConvertError> {
    let epoch = i16::try_from(p.producer_epoch).map_err(|_| ConvertError("producer epoch out of range".into()))?;
    let mut batches: VecDeque<SequencedBatch> = p
        .batches
        .iter()
        .map(|b| SequencedBatch {
            first_sequence: b.first_sequence,
            last_sequence: b.last_sequence,
            base_offset: b.base_offset,
            next_offset: b.next_offset,
        })
        .collect();
    if batches.is_empty() && p.last_sequence >= 0 {
        // Written before batches were kept: the last record alone is known, so a retry of its
        // batch is refused as a stale duplicate rather than written again.
        batches.push_back(SequencedBatch {
            first_sequence: p.last_sequence,
            last_sequence: p.last_sequence,
            base_offset: p.last_offset,
            next_offset: p.last_offset.saturating_add(1),
        });
    }
    if batches.iter().any(|b| b.first_sequence < 0 || b.last_sequence < 0 || b.next_offset <= b.base_offset) {
        return Err(ConvertError("snapshot holds a malformed producer batch".into()));
    }
    Ok((p.producer_id, ProducerEntry { epoch, batches, last_timestamp_ms: p.last_timestamp_ms }))
}

/// Field number of `PartitionSnapshot.producers`.
const PRODUCERS_FIELD: u32 = 4;
/// The protobuf wire type of length-delimited fields (messages, strings, bytes).
const WIRE_TYPE_LEN: u8 = 2;

/// Calls `f` with each top-level field of the encoded message `buf`, in order: its number, its
/// wire type, the bytes of the whole field (key included) and those of its value. Groups (wire
/// types 3 and 4, deprecated and never written by Keel) are refused.
fn for_each_field(
    buf: &[u8],
    mut f: impl FnMut(u32, u8, &[u8], &[u8]) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let malformed = |what: &str| ConvertError(format!("snapshot: {what}"));
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos).ok_or_else(|| malformed("truncated field key"))?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed("field number overflows"))?;
        let wire_type = (key & 7) as u8;
        let span = |from: usize, len: usize| from.checked_add(len).filter(|&end| end <= buf.len()).map(|end| from..end);
        let value = match wire_type {
            0 => {
                let from = pos;
                read_varint(buf, &mut pos).ok_or_else(|| malformed("truncated varint"))?;
                from..pos
            }
            1 => span(pos, 8).ok_or_else(|| malformed("truncated fixed64"))?,
            5 => span(pos, 4).ok_or_else(|| malformed("truncated fixed32"))?,
            WIRE_TYPE_LEN => {
                let len = read_varint(buf, &mut pos).ok_or_else(|| malformed("truncated length"))?;
                let len = usize::try_from(len).map_err(|_| malformed("length overflows"))?;
                span(pos, len).ok_or_else(|| malformed("field runs past the end"))?
            }
            _ => return Err(malformed("a wire type snapshots do not use")),
        };
        pos = value.end;
        f(number, wire_type, &buf[start..pos], &buf[value])?;
    }
    Ok(())
}

/// Reads a protobuf varint at `*pos`, advancing it; `None` if it is truncated or too long.
fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::log_id;

    fn header(count: u32, producer_id: i64, base_sequence: i32) -> BatchHeader {
        let mut b = keel_record::BatchBuilder::new(1 << 20).producer(keel_record::ProducerStamp {
            producer_id,
            producer_epoch: 1,
            base_sequence,
        });
        for _ in 0..count {
            b.push(keel_record::NewRecord { timestamp_ms: 1, value: Some(b"x"), ..Default::default() }).unwrap();
        }
        keel_record::check(&b.build()).unwrap()
    }

    #[test]
    fn offsets_are_a_function_of_the_applied_prefix() {
        let mut s = PartitionState::default();
        assert_eq!(
            s.apply_batch(log_id(1, 1), &header(3, -1, -1), &ProducerLimits::default()),
            Appended { base_offset: 0, next_offset: 3 }
        );
        s.apply_blank(log_id(2, 2));
        assert_eq!(
            s.apply_batch(log_id(2, 3), &header(2, 9, 10), &ProducerLimits::default()),
            Appended { base_offset: 3, next_offset: 5 }
        );
        let producer = s.producers.get(9).unwrap();
        assert_eq!((producer.epoch, producer.next_sequence(), producer.batches[0].base_offset), (1, 12, 3));
        let back = PartitionState::decode_snapshot(&s.encode_snapshot()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn applying_out_of_order_stops_the_node() {
        let mut s = PartitionState::default();
        s.apply_blank(log_id(1, 1));
        s.apply_blank(log_id(1, 3));
    }

    #[test]
    fn producers_decoded_one_by_one_read_as_prost_would() {
        let mut s = PartitionState { next_offset: 50, ..Default::default() };
        let entry = |epoch, first_sequence, last_sequence, base_offset| ProducerEntry {
            epoch,
            batches: [SequencedBatch { first_sequence, last_sequence, base_offset, next_offset: base_offset + 1 }]
                .into(),
            last_timestamp_ms: 0,
        };
        s.producers.restore(3, entry(1, 4, 4, 20));
        let mut bytes = s.encode_snapshot();
        // A later entry for the same producer, then one for another: the later entry wins.
        let state = |producer_id, producer_epoch, last_sequence, last_offset| pb::ProducerState {
            producer_id,
            producer_epoch,
            last_sequence,
            last_offset,
            ..Default::default()
        };
        for p in [state(3, 2, 9, 40), state(8, 0, 0, 41)] {
            bytes.push((PRODUCERS_FIELD << 3) as u8 | WIRE_TYPE_LEN);
            p.encode_length_delimited(&mut bytes).unwrap();
        }
        let back = PartitionState::decode_snapshot(&bytes).unwrap();
        assert_eq!(back.producers.get(3), Some(&entry(2, 9, 9, 40)));
        assert_eq!(back.producers.len(), 2);
        assert_eq!(back.next_offset, 50);
        for cut in 0..bytes.len() {
            // Every strict prefix either decodes to fewer producers or is refused; none panics.
            let _ = PartitionState::decode_snapshot(&bytes[..cut]);
        }
    }

    #[test]
    fn bad_snapshots_are_errors() {
        assert!(PartitionState::decode_snapshot(b"\xff\xff").is_err());
        let mut s = PartitionState { next_offset: 1, log_start_offset: 5, ..Default::default() };
        s.membership = StoredMembership::default();
        assert!(PartitionState::decode_snapshot(&s.encode_snapshot()).is_err());
    }
}
