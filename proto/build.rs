//! Generates the gRPC code into OUT_DIR (never into the source tree, so a
//! stale copy cannot be committed). Needs `protoc` (Debian `protobuf-compiler`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=orchestrator/v1/coordinator.proto");
    tonic_prost_build::configure()
        .compile_protos(&["orchestrator/v1/coordinator.proto"], &["."])?;
    Ok(())
}
