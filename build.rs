//! Generates the contracts crate from `proto/` with protox (pure Rust), so no system `protoc`
//! is needed, and writes the encoded descriptor set that gRPC reflection serves.

use std::{env, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/orderflow/v1/orders.proto",
    "proto/orderflow/v1/events.proto",
    "proto/orderflow/v1/dead_letters.proto",
];
const INCLUDES: &[&str] = &["proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Source info is kept so `grpcurl describe` shows the proto comments.
    let fds = protox::compile(PROTOS, INCLUDES)?;

    // compile_fds does not write the descriptor set itself; reflection needs it.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("orderflow_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    // `prost::Name` impls give each event its fully qualified name for the AMQP `type` property.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds_with_config(fds, config)?;

    // compile_fds emits no rerun-if-changed lines; a directory is watched recursively.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
