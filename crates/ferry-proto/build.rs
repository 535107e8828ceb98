//! Compiles `proto/ferry/v1/*.proto` in pure Rust (protox), so building Ferry needs no system
//! `protoc`, and keeps the encoded descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["message", "publisher", "subscriber", "admin"]
        .map(|name| root.join(format!("ferry/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ferry_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        // Payloads stay reference-counted `Bytes` from the wire to the store and back out.
        .bytes(".ferry.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
