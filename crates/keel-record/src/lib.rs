//! The Keel record-batch format: the unit of append, replication and fetch.
//!
//! A batch is stored on disk, replicated by raft and sent to consumers as the same bytes. Its
//! layout (all integers big-endian):
//!
//! ```text
//! offset size field
//!      0    4 length           bytes that follow this field
//!      4    4 crc              CRC-32 (crc32fast) of every byte after this field
//!      8    1 magic            format version, 1
//!      9    2 attributes       compression, transactional, control, raft-entry bits
//!     11    4 record_count     records in the batch (0 for raft-only entries)
//!     15    8 base_offset      offset of the first record
//!     23    8 raft_term        term of the raft entry that carries the batch
//!     31    8 raft_index       index of that raft entry
//!     39    8 first_timestamp  ms since the epoch of the first record
//!     47    8 max_timestamp    largest record timestamp
//!     55    8 producer_id      -1 when the producer is not idempotent
//!     63    2 producer_epoch
//!     65    4 base_sequence    sequence of the first record, -1 when not idempotent
//!     69    . records
//! ```
//!
//! The CRC sits right after the length, so it covers the fields the leader stamps (base offset,
//! raft term and index): a flipped bit anywhere in a batch is caught, not only in its records.
//! Each record is `length, attributes, timestamp delta, offset delta, key, value, headers` with
//! zigzag varints, as in Kafka's v2 format. Offset deltas are dense: record i has delta i. A
//! record carries at most [`RECORD_HEADERS_MAX`] headers.
//!
//! Decoding never panics on any input and never allocates more than the input justifies: reads
//! are slices of the input `Bytes` (zero-copy), and every length is checked against the bytes
//! that are actually there before it is used.

// The simulation is deterministic only with `--cfg tokio_unstable` (see .cargo/config.toml). A
// RUSTFLAGS variable silently replaces the configured flags, so a build that lost the flag must
// fail here, in the crate every other crate depends on, instead of running a flaky simulation.
#[cfg(not(tokio_unstable))]
compile_error!(
    "keel must be built with --cfg tokio_unstable: keep .cargo/config.toml, or add `--cfg tokio_unstable` to RUSTFLAGS"
);

pub mod audit;
mod varint;

/// The FNV-1a 64-bit hash of `bytes` (offset basis 0xcbf29ce484222325, prime 0x100000001b3):
/// how every client maps a key to a partition and a group to its coordinator partition.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

use bytes::{BufMut, Bytes, BytesMut};
pub use varint::{get_varint, get_varlong, put_varlong, varlong_len};

/// Bytes of the fixed batch header, up to the first record.
pub const HEADER_LEN: usize = 69;
/// Largest encoded batch this format accepts, in bytes (a hard limit above any configured one).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most headers one record may carry. A decoded header takes 64 bytes and as few as 2 on the
/// wire, so without a cap one batch at [`BATCH_BYTES_MAX`] would decode into 512 MiB of headers;
/// with it, decoding a record allocates at most 64 KiB whatever its size.
pub const RECORD_HEADERS_MAX: usize = 1024;
/// Current format version.
pub const MAGIC: u8 = 1;
/// Bytes of the `length` field that precedes everything else.
pub const LENGTH_FIELD_LEN: usize = 4;

const CRC_START: usize = 8;
const NO_PRODUCER: i64 = -1;
const NO_SEQUENCE: i32 = -1;

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the length field promise.
    #[error("incomplete batch: need {needed} bytes, have {available}")]
    Incomplete {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The length field is outside what any batch may have.
    #[error("batch length {0} is outside 65..=16 MiB")]
    BadLength(u64),
    /// The CRC does not match the bytes.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// CRC stored in the batch.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// An unknown format version.
    #[error("unsupported batch magic {0}")]
    Magic(u8),
    /// The CRC matched but a field is impossible.
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
    /// A feature this build does not implement (e.g. a compression codec).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
}

/// Batch attribute bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Attributes(pub u16);

impl Attributes {
    /// Low three bits: compression codec; only 0 (none) is implemented.
    pub const COMPRESSION_MASK: u16 = 0b111;
    /// The batch belongs to a transaction.
    pub const TRANSACTIONAL: u16 = 1 << 4;
    /// The batch is a control batch (transaction markers), not user data.
    pub const CONTROL: u16 = 1 << 5;
    /// The batch is a raft-only entry (blank or membership): no records, an opaque payload.
    pub const RAFT_ENTRY: u16 = 1 << 6;
    const KNOWN: u16 = Self::COMPRESSION_MASK | Self::TRANSACTIONAL | Self::CONTROL | Self::RAFT_ENTRY;

    /// True when the raft-entry bit is set.
    pub fn is_raft_entry(self) -> bool {
        self.0 & Self::RAFT_ENTRY != 0
    }
    /// True when the control bit is set.
    pub fn is_control(self) -> bool {
        self.0 & Self::CONTROL != 0
    }
    /// True when the transactional bit is set.
    pub fn is_transactional(self) -> bool {
        self.0 & Self::TRANSACTIONAL != 0
    }
}

/// The fixed fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Bytes after the length field (the whole batch is `length + 4` bytes).
    pub length: u32,
    /// Stored CRC.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: Attributes,
    /// Number of records; 0 for raft-only entries.
    pub record_count: u32,
    /// Offset of the first record (for an empty batch: the offset the next record will get).
    pub base_offset: u64,
    /// Raft term of the entry carrying this batch.
    pub raft_term: u64,
    /// Raft log index of the entry carrying this batch.
    pub raft_index: u64,
    /// Timestamp of the first record, ms since the Unix epoch.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp, ms since the Unix epoch.
    pub max_timestamp_ms: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Producer epoch (fences zombie producers).
    pub producer_epoch: i16,
    /// Sequence number of the first record, or -1.
    pub base_sequence: i32,
}

impl BatchHeader {
    /// Total encoded size of the batch in bytes.
    pub fn total_len(&self) -> usize {
        self.length as usize + LENGTH_FIELD_LEN
    }
    /// The offset after the last record: where the next batch starts.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
    /// Offset of the last record, or `None` for an empty (raft-only) batch.
    pub fn last_offset(&self) -> Option<u64> {
        (self.record_count > 0).then(|| self.next_offset() - 1)
    }
    /// The producer stamp (id, epoch, sequence) of the record at `offset` of this batch, or `None`
    /// for a batch written without a producer id (records are dense, so the header is enough).
    pub fn producer_stamp(&self, offset: u64) -> Option<(i64, i16, i32)> {
        (self.producer_id >= 0 && self.base_sequence >= 0).then(|| {
            let n = offset.saturating_sub(self.base_offset);
            (self.producer_id, self.producer_epoch, sequence_after(self.base_sequence, n))
        })
    }
}

/// Producer sequences count records modulo 2^31 (as in Kafka): after `i32::MAX` comes 0.
pub const SEQUENCE_MODULUS: i64 = 1 << 31;

/// The producer sequence `n` records after `sequence`, modulo 2^31.
pub fn sequence_after(sequence: i32, n: u64) -> i32 {
    let n = (n % SEQUENCE_MODULUS as u64) as i64;
    // rem_euclid of a modulus of 2^31 is always in 0..2^31, which fits an i32.
    i32::try_from((i64::from(sequence) + n).rem_euclid(SEQUENCE_MODULUS)).unwrap_or(0)
}

/// Parses and verifies the batch at the start of `buf` (length, magic, CRC, header fields),
/// without looking at individual records. Returns the header; the batch spans
/// `header.total_len()` bytes. Bytes after the batch are ignored.
pub fn check(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    let Some(len_bytes) = buf.get(..LENGTH_FIELD_LEN) else {
        return Err(DecodeError::Incomplete { needed: LENGTH_FIELD_LEN, available: buf.len() });
    };
    let length = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let total = length as u64 + LENGTH_FIELD_LEN as u64;
    if total < HEADER_LEN as u64 || total > BATCH_BYTES_MAX as u64 {
        return Err(DecodeError::BadLength(u64::from(length)));
    }
    let total = total as usize;
    let Some(batch) = buf.get(..total) else {
        return Err(DecodeError::Incomplete { needed: total, available: buf.len() });
    };
    let stored = be_u32(batch, 4);
    let computed = crc32fast::hash(&batch[CRC_START..]);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    let magic = batch[8];
    if magic != MAGIC {
        return Err(DecodeError::Magic(magic));
    }
    let header = BatchHeader {
        length,
        crc: stored,
        attributes: Attributes(be_u16(batch, 9)),
        record_count: be_u32(batch, 11),
        base_offset: be_u64(batch, 15),
        raft_term: be_u64(batch, 23),
        raft_index: be_u64(batch, 31),
        first_timestamp_ms: be_u64(batch, 39) as i64,
        max_timestamp_ms: be_u64(batch, 47) as i64,
        producer_id: be_u64(batch, 55) as i64,
        producer_epoch: be_u16(batch, 63) as i16,
        base_sequence: be_u32(batch, 65) as i32,
    };
    validate_header(&header, total - HEADER_LEN)?;
    Ok(header)
}

fn validate_header(h: &BatchHeader, body_len: usize) -> Result<(), DecodeError> {
    if h.attributes.0 & !Attributes::KNOWN != 0 {
        return Err(DecodeError::Malformed("unknown attribute bits"));
    }
    if h.attributes.0 & Attributes::COMPRESSION_MASK != 0 {
        return Err(DecodeError::Unsupported("compressed batches"));
    }
    if h.attributes.is_raft_entry() && h.record_count != 0 {
        return Err(DecodeError::Malformed("a raft entry batch holds no records"));
    }
    if !h.attributes.is_raft_entry() && h.record_count == 0 && body_len != 0 {
        return Err(DecodeError::Malformed("an empty batch has a body"));
    }
    // Every record takes at least 7 bytes; a count the body cannot hold is a lie.
    if h.record_count as usize > body_len / RECORD_BYTES_MIN {
        return Err(DecodeError::Malformed("record count larger than the body can hold"));
    }
    if h.base_offset.checked_add(u64::from(h.record_count)).is_none() {
        return Err(DecodeError::Malformed("offsets overflow"));
    }
    if h.record_count > 0 && h.max_timestamp_ms < h.first_timestamp_ms {
        return Err(DecodeError::Malformed("max timestamp before first timestamp"));
    }
    Ok(())
}

/// Rewrites the fields the leader assigns (base offset, raft term and index) in an encoded,
/// already checked batch and recomputes its CRC. `buf` must hold exactly one batch.
pub fn stamp(buf: &mut [u8], base_offset: u64, raft_term: u64, raft_index: u64) -> Result<BatchHeader, DecodeError> {
    let header = check(buf)?;
    if header.total_len() != buf.len() {
        return Err(DecodeError::Malformed("stamp expects exactly one batch"));
    }
    if base_offset.checked_add(u64::from(header.record_count)).is_none() {
        return Err(DecodeError::Malformed("offsets overflow"));
    }
    buf[15..23].copy_from_slice(&base_offset.to_be_bytes());
    buf[23..31].copy_from_slice(&raft_term.to_be_bytes());
    buf[31..39].copy_from_slice(&raft_index.to_be_bytes());
    let crc = crc32fast::hash(&buf[CRC_START..]);
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(BatchHeader { crc, base_offset, raft_term, raft_index, ..header })
}

/// Sets the idempotent producer stamp of an encoded batch and recomputes its CRC: a producer
/// assigns sequences when it first sends a batch, not when it encodes it. `buf` must hold
/// exactly one checked batch.
pub fn stamp_producer(buf: &mut [u8], producer: ProducerStamp) -> Result<BatchHeader, DecodeError> {
    let header = check(buf)?;
    if header.total_len() != buf.len() {
        return Err(DecodeError::Malformed("stamp expects exactly one batch"));
    }
    buf[55..63].copy_from_slice(&producer.producer_id.to_be_bytes());
    buf[63..65].copy_from_slice(&producer.producer_epoch.to_be_bytes());
    buf[65..69].copy_from_slice(&producer.base_sequence.to_be_bytes());
    let crc = crc32fast::hash(&buf[CRC_START..]);
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(BatchHeader {
        crc,
        producer_id: producer.producer_id,
        producer_epoch: producer.producer_epoch,
        base_sequence: producer.base_sequence,
        ..header
    })
}

/// Gives a batch whose records all carry timestamp 0 ("the broker's clock") the append time
/// `now_ms`, and recomputes its CRC; any other batch is left as it is. Returns whether it changed.
/// `buf` must hold exactly one checked batch.
pub fn stamp_append_time(buf: &mut [u8], now_ms: i64) -> Result<bool, DecodeError> {
    let header = check(buf)?;
    if header.total_len() != buf.len() {
        return Err(DecodeError::Malformed("stamp expects exactly one batch"));
    }
    if header.first_timestamp_ms != 0 || header.max_timestamp_ms != 0 || header.record_count == 0 {
        return Ok(false);
    }
    // Every record's timestamp is the first timestamp plus a delta of 0: moving the first and
    // the max moves them all.
    buf[39..47].copy_from_slice(&now_ms.to_be_bytes());
    buf[47..55].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc32fast::hash(&buf[CRC_START..]);
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(true)
}

/// A checked batch: its length, CRC and header are valid. A zero-copy view of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl Batch {
    /// Checks that `bytes` is exactly one valid batch.
    pub fn from_bytes(bytes: Bytes) -> Result<Batch, DecodeError> {
        let header = check(&bytes)?;
        if header.total_len() != bytes.len() {
            return Err(DecodeError::Malformed("trailing bytes after the batch"));
        }
        Ok(Batch { header, bytes })
    }

    /// Checks the batch at the start of `buf` and returns it (a slice of `buf`) and its length.
    pub fn split_first(buf: &Bytes) -> Result<(Batch, usize), DecodeError> {
        let header = check(buf)?;
        let len = header.total_len();
        Ok((Batch { header, bytes: buf.slice(..len) }, len))
    }

    /// The fixed fields.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The encoded batch.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Consumes the batch, returning its encoded bytes.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The opaque payload of a raft-only entry (empty for other batches).
    pub fn raft_payload(&self) -> Bytes {
        if self.header.attributes.is_raft_entry() { self.bytes.slice(HEADER_LEN..) } else { Bytes::new() }
    }

    /// Iterates the records; each is a zero-copy view into the batch.
    pub fn records(&self) -> Records<'_> {
        let body_end = if self.header.attributes.is_raft_entry() { HEADER_LEN } else { self.bytes.len() };
        Records { batch: self, pos: HEADER_LEN, end: body_end, next_index: 0 }
    }

    /// Decodes every record, so that a batch accepted from a client is known to be well formed
    /// before it is stored: the right number of records, dense offset deltas, no trailing bytes.
    pub fn validate_records(&self) -> Result<(), DecodeError> {
        let mut seen = 0u32;
        for record in self.records() {
            let record = record?;
            // As in Kafka, a record may be earlier than the first (user-supplied timestamps
            // need not be ordered), but never later than the batch's maximum, which retention
            // and time lookups rely on.
            if record.timestamp_ms > self.header.max_timestamp_ms {
                return Err(DecodeError::Malformed("record timestamp after the batch's max timestamp"));
            }
            seen += 1;
        }
        if seen != self.header.record_count {
            return Err(DecodeError::Malformed("fewer records than the header counts"));
        }
        Ok(())
    }
}

/// Iterates the batches in a buffer of back-to-back batches, stopping at the first error.
pub fn batches(buf: Bytes) -> impl Iterator<Item = Result<Batch, DecodeError>> {
    let mut rest = buf;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        match Batch::split_first(&rest) {
            Ok((batch, len)) => {
                rest = rest.slice(len..);
                Some(Ok(batch))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

/// One record header: a UTF-8 key and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Header key (checked UTF-8 on decode).
    pub key: Bytes,
    /// Header value; `None` is a null value.
    pub value: Option<Bytes>,
}

/// One record, with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset: base offset + delta.
    pub offset: u64,
    /// Absolute timestamp, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key; `None` is a null key.
    pub key: Option<Bytes>,
    /// Value; `None` is a null value (a tombstone).
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<RecordHeader>,
}

/// Smallest encoding of a record: length, attributes, timestamp delta, offset delta, key length,
/// value length, header count — one byte each.
const RECORD_BYTES_MIN: usize = 7;

/// Iterator over the records of a [`Batch`].
pub struct Records<'a> {
    batch: &'a Batch,
    pos: usize,
    end: usize,
    next_index: u32,
}

impl Iterator for Records<'_> {
    type Item = Result<Record, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            if self.next_index < self.batch.header.record_count {
                self.next_index = self.batch.header.record_count;
                return Some(Err(DecodeError::Malformed("fewer records than the header counts")));
            }
            return None;
        }
        if self.next_index >= self.batch.header.record_count {
            self.pos = self.end;
            return Some(Err(DecodeError::Malformed("bytes after the last record")));
        }
        let result = self.decode_one();
        match &result {
            Ok(_) => self.next_index += 1,
            // Stop after the first error: what follows cannot be trusted.
            Err(_) => {
                self.pos = self.end;
                self.next_index = self.batch.header.record_count;
            }
        }
        Some(result)
    }
}

impl Records<'_> {
    fn decode_one(&mut self) -> Result<Record, DecodeError> {
        let bytes = &self.batch.bytes;
        let buf = &bytes[..self.end];
        let len = get_varint(buf, &mut self.pos)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Malformed("negative record length"))?;
        let record_end = self.pos.checked_add(len).filter(|&e| e <= self.end);
        let Some(record_end) = record_end else {
            return Err(DecodeError::Malformed("record runs past the end of the batch"));
        };
        let buf = &bytes[..record_end];
        let attributes = *buf.get(self.pos).ok_or(DecodeError::Malformed("record has no attributes"))?;
        self.pos += 1;
        if attributes != 0 {
            return Err(DecodeError::Malformed("record attributes must be 0"));
        }
        let timestamp_delta = get_varlong(buf, &mut self.pos)?;
        let offset_delta = get_varint(buf, &mut self.pos)?;
        if i64::from(offset_delta) != i64::from(self.next_index) {
            return Err(DecodeError::Malformed("offset deltas are not dense"));
        }
        let key = self.nullable_bytes(record_end)?;
        let value = self.nullable_bytes(record_end)?;
        let header_count = get_varint(&bytes[..record_end], &mut self.pos)?;
        let header_count =
            usize::try_from(header_count).map_err(|_| DecodeError::Malformed("negative header count"))?;
        // Each header takes at least 2 bytes, and a record at most RECORD_HEADERS_MAX of them:
        // both are checked before the headers are allocated.
        if header_count > RECORD_HEADERS_MAX {
            return Err(DecodeError::Malformed("more headers than a record may carry (RECORD_HEADERS_MAX)"));
        }
        if header_count > (record_end - self.pos) / 2 {
            return Err(DecodeError::Malformed("header count larger than the record can hold"));
        }
        let mut headers = Vec::with_capacity(header_count);
        for _ in 0..header_count {
            let Some(key) = self.nullable_bytes(record_end)? else {
                return Err(DecodeError::Malformed("null header key"));
            };
            if std::str::from_utf8(&key).is_err() {
                return Err(DecodeError::Malformed("header key is not UTF-8"));
            }
            let value = self.nullable_bytes(record_end)?;
            headers.push(RecordHeader { key, value });
        }
        if self.pos != record_end {
            return Err(DecodeError::Malformed("record length does not match its fields"));
        }
        let timestamp_ms = self
            .batch
            .header
            .first_timestamp_ms
            .checked_add(timestamp_delta)
            .ok_or(DecodeError::Malformed("timestamp overflows"))?;
        Ok(Record {
            offset: self.batch.header.base_offset + u64::from(self.next_index),
            timestamp_ms,
            key,
            value,
            headers,
        })
    }

    fn nullable_bytes(&mut self, end: usize) -> Result<Option<Bytes>, DecodeError> {
        let bytes = &self.batch.bytes;
        let len = get_varint(&bytes[..end], &mut self.pos)?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| DecodeError::Malformed("negative length"))?;
        let stop = self.pos.checked_add(len).filter(|&s| s <= end);
        let Some(stop) = stop else {
            return Err(DecodeError::Malformed("field runs past the end of the record"));
        };
        let out = bytes.slice(self.pos..stop);
        self.pos = stop;
        Ok(Some(out))
    }
}

/// A record to be encoded; borrowed so that callers need not copy payloads twice.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewRecord<'a> {
    /// Timestamp, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key, or `None`.
    pub key: Option<&'a [u8]>,
    /// Value, or `None`.
    pub value: Option<&'a [u8]>,
    /// Headers (key, value).
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

impl NewRecord<'_> {
    /// Encoded size of this record, given the batch's first timestamp and its index.
    fn body_len(&self, first_timestamp_ms: i64, index: u32) -> usize {
        let field = |b: Option<&[u8]>| match b {
            None => varlong_len(-1),
            Some(b) => varlong_len(b.len() as i64) + b.len(),
        };
        let headers: usize = self.headers.iter().map(|(k, v)| field(Some(k.as_bytes())) + field(*v)).sum();
        1 + varlong_len(self.timestamp_ms.wrapping_sub(first_timestamp_ms))
            + varlong_len(i64::from(index))
            + field(self.key)
            + field(self.value)
            + varlong_len(self.headers.len() as i64)
            + headers
    }
}

/// Producer identity stamped on a batch for idempotence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerStamp {
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence of the first record.
    pub base_sequence: i32,
}

impl ProducerStamp {
    /// No idempotent producer.
    pub const NONE: ProducerStamp =
        ProducerStamp { producer_id: NO_PRODUCER, producer_epoch: -1, base_sequence: NO_SEQUENCE };
}

/// Why a batch could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The batch would exceed [`BATCH_BYTES_MAX`] (or the builder's own limit).
    #[error("batch of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size the batch would have.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A header field is invalid for this kind of batch.
    #[error("invalid batch: {0}")]
    Invalid(&'static str),
}

/// Builds one batch. Offsets, raft term and index are left 0 for the leader to [`stamp`].
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    attributes: Attributes,
    producer: ProducerStamp,
    bytes_max: usize,
}

impl BatchBuilder {
    /// A builder for a data batch of at most `bytes_max` bytes (capped at [`BATCH_BYTES_MAX`]).
    pub fn new(bytes_max: usize) -> BatchBuilder {
        let mut buf = Vec::with_capacity(HEADER_LEN.max(bytes_max.min(64 * 1024)));
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            attributes: Attributes::default(),
            producer: ProducerStamp::NONE,
            bytes_max: bytes_max.min(BATCH_BYTES_MAX),
        }
    }

    /// Sets the idempotent-producer fields.
    pub fn producer(mut self, producer: ProducerStamp) -> Self {
        self.producer = producer;
        self
    }

    /// Sets the transactional bit.
    pub fn transactional(mut self) -> Self {
        self.attributes.0 |= Attributes::TRANSACTIONAL;
        self
    }

    /// Records added so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch would have if built now.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    /// Appends a record, or returns `TooLarge` (and leaves the builder unchanged) if it does
    /// not fit. The first record's timestamp is the batch's first timestamp.
    pub fn push(&mut self, record: NewRecord<'_>) -> Result<(), EncodeError> {
        if record.headers.len() > RECORD_HEADERS_MAX {
            return Err(EncodeError::Invalid("a record carries more headers than RECORD_HEADERS_MAX (1024)"));
        }
        if self.count == 0 {
            self.first_timestamp_ms = record.timestamp_ms;
            self.max_timestamp_ms = record.timestamp_ms;
        }
        if record.timestamp_ms.checked_sub(self.first_timestamp_ms).is_none() {
            return Err(EncodeError::Invalid("record timestamp too far from the batch's first record"));
        }
        let body = record.body_len(self.first_timestamp_ms, self.count);
        let size = self.buf.len() + varlong_len(body as i64) + body;
        if size > self.bytes_max {
            return Err(EncodeError::TooLarge { size, limit: self.bytes_max });
        }
        let before = self.buf.len();
        let b = &mut self.buf;
        put_varlong(b, body as i64);
        b.push(0);
        put_varlong(b, record.timestamp_ms - self.first_timestamp_ms);
        put_varlong(b, i64::from(self.count));
        put_nullable(b, record.key);
        put_nullable(b, record.value);
        put_varlong(b, record.headers.len() as i64);
        for (k, v) in record.headers {
            put_nullable(b, Some(k.as_bytes()));
            put_nullable(b, *v);
        }
        debug_assert_eq!(self.buf.len(), size, "record size computed before writing must match");
        debug_assert!(self.buf.len() > before);
        self.count += 1;
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        Ok(())
    }

    /// Finishes the batch: fills the header and the CRC.
    pub fn build(self) -> Bytes {
        let header = BatchHeader {
            length: 0,
            crc: 0,
            attributes: self.attributes,
            record_count: self.count,
            base_offset: 0,
            raft_term: 0,
            raft_index: 0,
            first_timestamp_ms: self.first_timestamp_ms,
            max_timestamp_ms: self.max_timestamp_ms,
            producer_id: self.producer.producer_id,
            producer_epoch: self.producer.producer_epoch,
            base_sequence: self.producer.base_sequence,
        };
        finish(self.buf, &header)
    }
}

/// Encodes a raft-only entry (blank or membership): no records, `payload` after the header.
pub fn raft_entry(payload: &[u8], raft_term: u64, raft_index: u64, base_offset: u64) -> Result<Bytes, EncodeError> {
    let size = HEADER_LEN + payload.len();
    if size > BATCH_BYTES_MAX {
        return Err(EncodeError::TooLarge { size, limit: BATCH_BYTES_MAX });
    }
    let mut buf = Vec::with_capacity(size);
    buf.resize(HEADER_LEN, 0);
    buf.extend_from_slice(payload);
    let header = BatchHeader {
        length: 0,
        crc: 0,
        attributes: Attributes(Attributes::RAFT_ENTRY),
        record_count: 0,
        base_offset,
        raft_term,
        raft_index,
        first_timestamp_ms: 0,
        max_timestamp_ms: 0,
        producer_id: NO_PRODUCER,
        producer_epoch: -1,
        base_sequence: NO_SEQUENCE,
    };
    Ok(finish(buf, &header))
}

fn finish(mut buf: Vec<u8>, h: &BatchHeader) -> Bytes {
    let length = (buf.len() - LENGTH_FIELD_LEN) as u32;
    let mut head = BytesMut::with_capacity(HEADER_LEN);
    head.put_u32(length);
    head.put_u32(0);
    head.put_u8(MAGIC);
    head.put_u16(h.attributes.0);
    head.put_u32(h.record_count);
    head.put_u64(h.base_offset);
    head.put_u64(h.raft_term);
    head.put_u64(h.raft_index);
    head.put_i64(h.first_timestamp_ms);
    head.put_i64(h.max_timestamp_ms);
    head.put_i64(h.producer_id);
    head.put_i16(h.producer_epoch);
    head.put_i32(h.base_sequence);
    debug_assert_eq!(head.len(), HEADER_LEN);
    buf[..HEADER_LEN].copy_from_slice(&head);
    let crc = crc32fast::hash(&buf[CRC_START..]);
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(buf)
}

fn put_nullable(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varlong(out, -1),
        Some(b) => {
            put_varlong(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_decoders;
