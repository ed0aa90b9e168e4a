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

#[cfg(test)]
mod tests {
    use super::valid_sku;

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
