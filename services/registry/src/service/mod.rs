//! The gRPC services.

pub(crate) mod blobs;
pub(crate) mod pending;
pub(crate) mod ports;
pub(crate) mod registry;
