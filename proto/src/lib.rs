//! The gRPC contract of xpyd (`xpyd.v1`), generated once here with tonic-prost-build;
//! no other crate compiles `.proto` files.

/// Everything in package `xpyd.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("xpyd.v1");
}

/// Encoded `FileDescriptorSet` of `xpyd.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xpyd_descriptor");

pub use v1::*;
