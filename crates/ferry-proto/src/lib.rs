//! Ferry's gRPC API, generated from `proto/ferry/v1/*.proto` at build time.
//!
//! This crate holds the generated messages, clients and server traits and nothing else: the
//! server crate maps them onto the broker core, and the `ferry` binary's client commands use the
//! clients. The encoded descriptor set is exported for gRPC server reflection.

/// Generated types of the `ferry.v1` package.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("ferry.v1");
}

/// The encoded `FileDescriptorSet` of every `ferry.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
