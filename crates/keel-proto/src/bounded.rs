//! Decoding of requests that cannot amplify. prost allocates a struct for every element of a
//! repeated field before anything can look at the count: a 16 MiB `ProduceRequest` of empty
//! `Record`s (2 bytes each on the wire, ~100 bytes each in memory) would take ~800 MiB. A request
//! is therefore walked first, against the schema in [`crate::FILE_DESCRIPTOR_SET`], counting the
//! elements prost would allocate, and refused above [`REQUEST_ELEMENTS_MAX`] before any
//! allocation. So are the answers of the `Raft` service, which nodes decode from each other (a
//! batch answer repeats an item per group). Other responses are not bounded: a client decodes
//! what the node it chose sends, and a fetch may rightly hold more records than a request may.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::OnceLock;

use bytes::Buf;
use prost::{Message, Name};
use prost_types::field_descriptor_proto::{Label, Type};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

/// Most elements one request may hold: nested messages plus entries of repeated fields. A
/// decoded element costs at most ~100 bytes beyond its wire bytes, so one request holds at most
/// ~10 MiB more than its size. Larger batches of records travel pre-encoded (`batch`), which
/// decodes without a struct per record.
pub const REQUEST_ELEMENTS_MAX: usize = 100_000;

/// The service nodes speak to each other: its answers are bounded like requests.
const PEER_SERVICE: &str = "Raft";

/// How deep messages may nest (prost's own recursion limit).
const DEPTH_MAX: u32 = 100;

/// Why a request was refused before decoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoundsError {
    /// More elements than [`REQUEST_ELEMENTS_MAX`] allows.
    #[error("the request holds more than {max} elements (records, headers, list entries)")]
    TooManyElements {
        /// The limit.
        max: usize,
    },
    /// Not valid protobuf wire format.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// prost refused the message after the walk.
    #[error("malformed request: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl From<BoundsError> for Status {
    fn from(e: BoundsError) -> Status {
        match e {
            BoundsError::TooManyElements { .. } => Status::resource_exhausted(e.to_string()),
            // A request that does not decode is the client's error, not the server's INTERNAL.
            BoundsError::Malformed(_) | BoundsError::Decode(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// What the walk needs to know of one field.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A nested message: index into [`Schema::messages`].
    Message(usize),
    /// `string` or `bytes`.
    Blob,
    /// A varint scalar (ints, bools, enums).
    Varint,
    /// A 4-byte scalar.
    Fixed32,
    /// An 8-byte scalar.
    Fixed64,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    kind: Kind,
    repeated: bool,
}

#[derive(Debug, Default)]
struct Schema {
    by_name: HashMap<String, usize>,
    /// Names of the messages decoded bounded: the input types of every service method, and the
    /// output types of the peer-to-peer `Raft` service.
    bounded: HashSet<String>,
    messages: Vec<HashMap<u32, Field>>,
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The descriptor set is generated at build time from our own protos: if it did not
        // decode, no message would be bounded, so an empty schema would hide it. A unit test
        // checks that every request type is known.
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap_or_default();
        let mut schema = Schema::default();
        let mut pending = Vec::new();
        for file in &set.file {
            let package = file.package.clone().unwrap_or_default();
            let mut stack: Vec<(String, &prost_types::DescriptorProto)> =
                file.message_type.iter().map(|m| (package.clone(), m)).collect();
            while let Some((scope, message)) = stack.pop() {
                let name = format!("{scope}.{}", message.name());
                stack.extend(message.nested_type.iter().map(|m| (name.clone(), m)));
                schema.by_name.insert(name, schema.messages.len());
                schema.messages.push(HashMap::new());
                pending.push(message);
            }
        }
        for service in set.file.iter().flat_map(|f| &f.service) {
            for method in &service.method {
                schema.bounded.insert(method.input_type().trim_start_matches('.').to_owned());
                if service.name() == PEER_SERVICE {
                    schema.bounded.insert(method.output_type().trim_start_matches('.').to_owned());
                }
            }
        }
        for (index, message) in pending.iter().enumerate() {
            for descriptor in &message.field {
                let kind = match descriptor.r#type() {
                    Type::Message => match schema.by_name.get(descriptor.type_name().trim_start_matches('.')) {
                        Some(&i) => Kind::Message(i),
                        // A message from another file set (e.g. a well-known type): walked as a
                        // blob, counted once per occurrence below.
                        None => Kind::Blob,
                    },
                    Type::String | Type::Bytes | Type::Group => Kind::Blob,
                    Type::Double | Type::Fixed64 | Type::Sfixed64 => Kind::Fixed64,
                    Type::Float | Type::Fixed32 | Type::Sfixed32 => Kind::Fixed32,
                    _ => Kind::Varint,
                };
                let field = Field { kind, repeated: descriptor.label() == Label::Repeated };
                // Field numbers are 1..2^29 by the protobuf spec; protoc has checked ours.
                schema.messages[index].insert(u32::try_from(descriptor.number()).unwrap_or(0), field);
            }
        }
        schema
    })
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, BoundsError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(BoundsError::Malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(BoundsError::Malformed("varint longer than 10 bytes"))
}

fn take(buf: &[u8], pos: &mut usize, len: u64) -> Result<std::ops::Range<usize>, BoundsError> {
    let len = usize::try_from(len).map_err(|_| BoundsError::Malformed("length overflows"))?;
    let end =
        pos.checked_add(len).filter(|&e| e <= buf.len()).ok_or(BoundsError::Malformed("field runs past the end"))?;
    let range = *pos..end;
    *pos = end;
    Ok(range)
}

struct Walk<'s> {
    schema: &'s Schema,
    elements: usize,
    max: usize,
}

impl Walk<'_> {
    fn add(&mut self, n: usize) -> Result<(), BoundsError> {
        self.elements = self.elements.saturating_add(n);
        if self.elements > self.max { Err(BoundsError::TooManyElements { max: self.max }) } else { Ok(()) }
    }

    /// Walks one message's fields; `group` is the field number of the group it is the body of.
    fn message(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        shape: Option<usize>,
        depth: u32,
        group: Option<u32>,
    ) -> Result<(), BoundsError> {
        if depth > DEPTH_MAX {
            return Err(BoundsError::Malformed("messages nested too deeply"));
        }
        while *pos < buf.len() {
            let key = varint(buf, pos)?;
            let number = u32::try_from(key >> 3).map_err(|_| BoundsError::Malformed("field number overflows"))?;
            if number == 0 {
                return Err(BoundsError::Malformed("field number 0"));
            }
            let field = shape.and_then(|s| self.schema.messages[s].get(&number).copied());
            match key & 7 {
                0 => {
                    varint(buf, pos)?;
                    self.scalar(field)?;
                }
                1 => {
                    take(buf, pos, 8)?;
                    self.scalar(field)?;
                }
                5 => {
                    take(buf, pos, 4)?;
                    self.scalar(field)?;
                }
                2 => {
                    let len = varint(buf, pos)?;
                    let range = take(buf, pos, len)?;
                    match field {
                        Some(Field { kind: Kind::Message(inner), .. }) => {
                            self.add(1)?;
                            let body = &buf[range];
                            self.message(body, &mut 0, Some(inner), depth + 1, None)?;
                        }
                        Some(Field { kind, repeated: true }) => {
                            let body = &buf[range];
                            // A packed run of scalars: one element per value.
                            let n = match kind {
                                Kind::Varint => body.iter().filter(|&&b| b < 0x80).count(),
                                Kind::Fixed32 => body.len() / 4,
                                Kind::Fixed64 => body.len() / 8,
                                Kind::Blob | Kind::Message(_) => 1,
                            };
                            self.add(n)?;
                        }
                        // A single string/bytes field costs its wire bytes; an unknown field is
                        // skipped without allocating.
                        _ => {}
                    }
                }
                3 => self.message(buf, pos, None, depth + 1, Some(number))?,
                4 => {
                    return if group == Some(number) {
                        Ok(())
                    } else {
                        Err(BoundsError::Malformed("unexpected end group"))
                    };
                }
                _ => return Err(BoundsError::Malformed("invalid wire type")),
            }
        }
        if group.is_some() { Err(BoundsError::Malformed("unterminated group")) } else { Ok(()) }
    }

    fn scalar(&mut self, field: Option<Field>) -> Result<(), BoundsError> {
        match field {
            Some(Field { repeated: true, .. }) => self.add(1),
            _ => Ok(()),
        }
    }
}

/// Counts the elements decoding `buf` as the message `full_name` would allocate, refusing more
/// than `max` (and malformed wire format) without allocating. Unknown message names are walked
/// without a schema: every field is then skipped, as prost skips unknown fields.
pub fn check(full_name: &str, buf: &[u8], max: usize) -> Result<usize, BoundsError> {
    let schema = schema();
    let mut walk = Walk { schema, elements: 0, max };
    walk.message(buf, &mut 0, schema.by_name.get(full_name).copied(), 0, None)?;
    Ok(walk.elements)
}

/// Whether `full_name` is decoded bounded: a request of any service, or an answer one node sends
/// another.
pub fn is_bounded(full_name: &str) -> bool {
    schema().bounded.contains(full_name)
}

/// Decodes a request after [`check`] with [`REQUEST_ELEMENTS_MAX`].
pub fn decode<M: Message + Default + Name>(buf: &[u8]) -> Result<M, BoundsError> {
    check(&M::full_name(), buf, REQUEST_ELEMENTS_MAX)?;
    Ok(M::decode(buf)?)
}

/// The gRPC codec of Keel's services: prost encoding, bounded decoding (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Name + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// Decodes `U`, bounding requests and peer answers (see [`is_bounded`]) by
/// [`REQUEST_ELEMENTS_MAX`] first.
#[derive(Debug, Clone, Copy)]
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Name> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let name = U::full_name();
        if is_bounded(&name) {
            // tonic hands over one contiguous message; if it ever did not, copy it once.
            if buf.chunk().len() == buf.remaining() {
                check(&name, buf.chunk(), REQUEST_ELEMENTS_MAX)?;
            } else {
                let whole = buf.copy_to_bytes(buf.remaining());
                check(&name, &whole, REQUEST_ELEMENTS_MAX)?;
                return U::decode(whole).map(Some).map_err(|e| BoundsError::from(e).into());
            }
        }
        U::decode(buf).map(Some).map_err(|e| BoundsError::from(e).into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::v1 as pb;
    use proptest::prelude::*;

    fn produce(records: usize, headers: usize) -> pb::ProduceRequest {
        let header = pb::Header { key: "h".into(), value: None };
        pb::ProduceRequest {
            topic: "t".into(),
            records: (0..records)
                .map(|_| pb::Record { headers: vec![header.clone(); headers], ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_request_of_every_service_is_bounded() {
        for name in [
            "keel.v1.ProduceRequest",
            "keel.v1.FetchRequest",
            "keel.v1.SubscribeRequest",
            "keel.v1.CreateTopicRequest",
            "keel.v1.HeartbeatRequest",
            "keel.v1.CommitOffsetsRequest",
            "keel.v1.AppendEntriesRequest",
            "keel.v1.RegisterNodeRequest",
        ] {
            assert!(is_bounded(name), "{name}");
        }
        assert!(!is_bounded("keel.v1.FetchResponse"), "responses come from a node the client chose");
        assert!(is_bounded("keel.v1.AppendEntriesBatchResponse"), "nodes decode each other's raft answers");
        assert!(is_bounded("keel.v1.VoteResponse"));
        assert_eq!(pb::ProduceRequest::full_name(), "keel.v1.ProduceRequest");
    }

    #[test]
    fn records_and_headers_are_counted() {
        let bytes = produce(10, 3).encode_to_vec();
        assert_eq!(check("keel.v1.ProduceRequest", &bytes, usize::MAX), Ok(40));
        let packed = pb::FetchOffsetsRequest {
            group: "g".into(),
            partitions: vec![pb::TopicPartitions { topic: "t".into(), partitions: vec![1, 300, 70_000] }],
        };
        assert_eq!(check("keel.v1.FetchOffsetsRequest", &packed.encode_to_vec(), usize::MAX), Ok(4));
    }

    #[test]
    fn a_list_of_empty_records_is_refused_before_it_is_allocated() {
        // 2 bytes per record on the wire: tag and a zero length.
        let mut bytes = Vec::new();
        for _ in 0..=REQUEST_ELEMENTS_MAX {
            bytes.extend_from_slice(&[0x22, 0x00]);
        }
        assert_eq!(
            decode::<pb::ProduceRequest>(&bytes).unwrap_err(),
            BoundsError::TooManyElements { max: REQUEST_ELEMENTS_MAX }
        );
        assert_eq!(decode::<pb::ProduceRequest>(&bytes[2..]).unwrap().records.len(), REQUEST_ELEMENTS_MAX);
        let status: Status = BoundsError::TooManyElements { max: 1 }.into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn malformed_wire_format_is_invalid_argument() {
        let bytes = produce(2, 1).encode_to_vec();
        let cut = &bytes[..bytes.len() - 1];
        let e = decode::<pb::ProduceRequest>(cut).unwrap_err();
        assert!(matches!(e, BoundsError::Malformed(_)), "{e:?}");
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        // Groups (of an unknown field 15) nested deeper than prost allows are refused, not recursed.
        let deep = [vec![0x7b; 200], vec![0x7c; 200]].concat();
        assert_eq!(
            check("keel.v1.ProduceRequest", &deep, usize::MAX),
            Err(BoundsError::Malformed("messages nested too deeply"))
        );
        let shallow = [vec![0x7b; 5], vec![0x7c; 5]].concat();
        assert_eq!(check("keel.v1.ProduceRequest", &shallow, usize::MAX), Ok(0));
        assert!(pb::ProduceRequest::decode(&shallow[..]).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The walk never refuses what prost accepts (below the limit), so no valid request is
        /// lost to it, and it never panics on garbage.
        #[test]
        fn the_walk_accepts_whatever_prost_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let walked = check("keel.v1.ProduceRequest", &bytes, usize::MAX);
            if pb::ProduceRequest::decode(&bytes[..]).is_ok() {
                prop_assert!(walked.is_ok(), "{walked:?}");
            }
            let walked = check("keel.v1.CommitOffsetsRequest", &bytes, usize::MAX);
            if pb::CommitOffsetsRequest::decode(&bytes[..]).is_ok() {
                prop_assert!(walked.is_ok(), "{walked:?}");
            }
        }

        #[test]
        fn counts_match_what_prost_builds(records in 0usize..20, headers in 0usize..5) {
            let bytes = produce(records, headers).encode_to_vec();
            prop_assert_eq!(check("keel.v1.ProduceRequest", &bytes, usize::MAX), Ok(records * (1 + headers)));
        }
    }
}
