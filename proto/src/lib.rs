//! The patchport gRPC API, version 1, generated from `proto/patchport/v1/*.proto`.
//!
//! This crate is only the wire contract: generated messages, clients and servers, and the
//! encoded descriptor set that the reflection service serves. It must never know about
//! storage, the port engine or any behaviour behind the API.

#![allow(missing_docs, unreachable_pub, missing_debug_implementations)]

/// `patchport.v1`
pub mod v1 {
    tonic::include_proto!("patchport.v1");
}

/// The encoded `FileDescriptorSet` of every patchport proto file (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchport_descriptor.bin"));
