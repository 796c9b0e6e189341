//! The patchport registry: gRPC services over the metadata and blob stores, the push
//! validation that turns uploaded blobs into versions, and the server's lifecycle.
//!
//! Architecture invariant: handlers parse every request field into domain types first
//! (failures are InvalidArgument), and every error reaches the client through the one
//! `From<ApiError> for Status` in `error.rs`. This crate never does tensor math and never
//! talks SQL or object storage directly: it goes through `patchport-store`.

mod app;
pub mod auth;
mod convert;
mod error;
mod ingest;
mod limits;
mod metrics;
mod service;
pub mod signing;
mod state;

pub use app::{Application, Config, StartError, TlsConfig};
pub use error::{ApiError, ErrorKind};
pub use limits::Limits;
pub use signing::SigningKeys;
pub use state::Registry;
