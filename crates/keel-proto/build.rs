//! Generates the Rust code for proto/keel/v1 with the protoc that the protoc-bin-vendored crate
//! ships, so that a fresh clone builds on a machine without protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos =
        ["../../proto/keel/v1/raft.proto", "../../proto/keel/v1/keel.proto", "../../proto/keel/v1/controller.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `bytes` fields become `Bytes`: record batches pass through without a copy.
    config.bytes(["."]);
    // `Name` on every message: the bounded codec looks a request's schema up by its full name.
    config.enable_type_names();
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("keel_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        // Requests are counted before prost allocates them (src/bounded.rs).
        .codec_path("crate::bounded::BoundedCodec")
        .compile_with_config(config, &protos, &["../../proto"])?;
    Ok(())
}
