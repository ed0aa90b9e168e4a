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

/// Whether `sku` is a well-formed SKU: 1 to 64 ASCII letters, digits, `.`, `_` or `-`. Part of
/// the contract: the API refuses other SKUs, and Inventory's catalog may hold no other.
pub fn valid_sku(sku: &str) -> bool {
    (1..=64).contains(&sku.len())
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The canonical name of a gRPC status code (`NOT_FOUND`), as the gRPC specification spells it
/// and as metrics, logs and other gRPC tools show it; tonic's `Display` gives a prose
/// description instead.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::{grpc_code_name, valid_sku};

    #[test]
    fn grpc_code_names_follow_the_spec() {
        assert_eq!(grpc_code_name(tonic::Code::Ok), "OK");
        assert_eq!(grpc_code_name(tonic::Code::from(8)), "RESOURCE_EXHAUSTED");
        assert_eq!(grpc_code_name(tonic::Code::from(16)), "UNAUTHENTICATED");
    }

    #[test]
    fn sku_rule() {
        assert!(valid_sku("sku-1"));
        assert!(valid_sku("A.b_C-9"));
        assert!(valid_sku(&"x".repeat(64)));
        assert!(!valid_sku(""));
        assert!(!valid_sku(&"x".repeat(65)));
        assert!(!valid_sku("sku 1"));
        assert!(!valid_sku("skü"));
    }
}
