//! Keel's protobuf messages and gRPC services, generated from `proto/keel/v1`. Nothing here but
//! [`bounded`] is written by hand; conversions to domain types live beside those types (one file per crate).

pub mod bounded;

/// Package `keel.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)] // Generated code.
pub mod v1 {
    tonic::include_proto!("keel.v1");
}

/// The encoded file descriptor set of every Keel proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keel_descriptor");

#[cfg(test)]
mod fuzz_decoders;
