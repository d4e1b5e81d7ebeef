//! Compiles the OpAMP schema and Fleetplane's internal records with protox, a
//! pure-Rust protobuf compiler, so that no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files = [
        root.join("opamp/v1/anyvalue.proto"),
        root.join("opamp/v1/opamp.proto"),
        root.join("fleetplane/v1/internal.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        // Maps in reports are small; BTreeMap gives deterministic encoding, which
        // golden tests and content hashes rely on.
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
