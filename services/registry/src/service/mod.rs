//! The gRPC services.

pub(crate) mod blobs;
pub(crate) mod pending;
pub(crate) mod registry;
