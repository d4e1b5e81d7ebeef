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
        // Every agent's record is kept in memory (the embedded store's copy,
        // caches): a rollout's pinned settings or packages, rarely present,
        // would otherwise take their whole size inline in each of them.
        .boxed(".fleetplane.v1.AgentRecord.pinned_connection")
        .boxed(".fleetplane.v1.AgentRecord.pinned_packages")
        .compile_fds(descriptors)?;
    Ok(())
}
