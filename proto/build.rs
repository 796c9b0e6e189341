//! Compiles `patchport/v1/*.proto` with protox (pure Rust, no system protoc) and writes
//! the descriptor set for the reflection service.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "patchport/v1/common.proto",
        "patchport/v1/blobs.proto",
        "patchport/v1/registry.proto",
        "patchport/v1/ports.proto",
        "patchport/v1/events.proto",
        "patchport/v1/worker.proto",
        "patchport/v1/admin.proto",
        "patchport/v1/signing.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("patchport_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Chunk payloads as `bytes::Bytes`: no copy between the wire and storage.
        .bytes(".patchport.v1")
        .compile_fds(fds)?;
    Ok(())
}
