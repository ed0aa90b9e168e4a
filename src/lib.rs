//! orderflow's contracts: the gRPC API and the bus events, generated from `proto/` by `build.rs`.
//!
//! Server and client both compile against these types, so a contract change is one edit.

/// Generated code for the proto package `orderflow.v1`.
pub mod orderflow {
    /// Version 1 of the API and of the events.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("orderflow.v1");
    }
}

/// Encoded `FileDescriptorSet` of every file in `proto/`, for gRPC server reflection and for
/// decoding events dynamically (e.g. to show dead letters as JSON).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orderflow_descriptor");
