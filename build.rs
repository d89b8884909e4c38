//! Generates Rust code for the Workload API, node API and admin API from `proto/`.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate so a fresh machine needs no manual install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let includes = protoc_bin_vendored::include_path()?.display().to_string();
    let workload = ["proto/spiffe/workload.proto"];
    let protos = [
        "proto/sigil/node/v1/node.proto",
        "proto/sigil/admin/v1/admin.proto",
        "proto/sigil/agent/v1/agent_admin.proto",
    ];
    for p in workload.iter().chain(&protos) {
        println!("cargo:rerun-if-changed={p}");
    }
    let includes = ["proto", includes.as_str()];
    // The Workload API holds thousands of long-lived streams: its codec keeps small buffers
    // (see `proto::CompactCodec`).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Deterministic encoding: a Workload API stream compares messages to send only changes.
        .btree_map(".")
        .codec_path("crate::proto::CompactCodec")
        .compile_protos(&workload, &includes)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".")
        .compile_protos(&protos, &includes)?;
    Ok(())
}
