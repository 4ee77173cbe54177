//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`)
//! and generates the prost messages and tonic stubs into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["taskq/v1/taskq.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    // `bytes` fields decode into `bytes::Bytes`, so payloads and outputs move
    // from the request to the engine and back without a copy.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
