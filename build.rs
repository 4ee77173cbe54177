//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`)
//! and generates the prost messages and tonic stubs into `OUT_DIR`, with the
//! encoded descriptor set that server reflection serves.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["taskq/v1/taskq.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("taskq_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // `bytes` fields decode into `bytes::Bytes`, so payloads and outputs move
    // from the request to the engine and back without a copy; messages
    // decode with `src/codec.rs`.
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::WireCodec")
        .compile_fds(descriptors)?;
    // The bench-only echo service of examples/echo_ceiling.rs; the library
    // does not include it. It uses taskq's codec too, so that the ceiling
    // and taskq are measured with the same one.
    let echo = protox::compile(["echo.proto"], ["proto/bench"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("taskq::codec::WireCodec")
        .compile_fds(echo)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
