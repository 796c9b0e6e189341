//! The patchport gRPC API, version 1, generated from `proto/patchport/v1/*.proto`.
//!
//! This crate is only the wire contract: generated messages, clients and servers, the
//! encoded descriptor set that the reflection service serves, and [`convert`]: the
//! conversions between messages and the domain types of `patchport-core`, so the registry
//! and the worker meet the wire the same way. It must never know about storage, the port
//! engine or any behaviour behind the API.

pub mod convert;

/// `patchport.v1`
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("patchport.v1");
}

/// The encoded `FileDescriptorSet` of every patchport proto file (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchport_descriptor.bin"));
