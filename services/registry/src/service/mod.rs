//! The gRPC services.

pub(crate) mod admin;
pub(crate) mod blobs;
pub(crate) mod composed;
pub(crate) mod events;
pub(crate) mod hub;
pub(crate) mod paging;
pub(crate) mod ports;
pub(crate) mod registry;
pub(crate) mod signing;
pub(crate) mod workers;
