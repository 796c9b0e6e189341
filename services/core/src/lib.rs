//! patchport's domain: names, versions, references, digests, and the parsing and
//! validation of what users push (safetensors headers, adapter configs, model configs,
//! directory layouts, JSONL eval sets).
//!
//! Architecture invariant: this crate does no IO (no filesystem, network, database or
//! async runtime) and knows nothing of gRPC, storage backends or tensor math. Everything
//! here is pure, so it is tested with plain unit tests and proptest.

pub mod adapter;
pub mod digest;
pub mod evalset;
pub mod event;
pub mod layout;
pub mod model_config;
pub mod name;
pub mod port;
pub mod safetensors;

pub use digest::{Digest, DigestError, Hasher};
pub use name::{AnyRef, Name, NameError, PortRef, Reference, Version, VersionRef};
