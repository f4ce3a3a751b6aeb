//! Compiles `proto/` with a vendored protoc, so a fresh machine needs only cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/dispatch/v1/cluster.proto",
        "proto/dispatch/v1/dispatcher.proto",
        "proto/dispatch/v1/sim.proto",
        "proto/dispatch/v1/admin.proto",
        "proto/dispatch/v1/jobs.proto",
    ];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Payloads and outputs are passed through untouched; `Bytes` avoids copying them.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("dispatch_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
