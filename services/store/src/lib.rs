//! patchport storage adapters: the metadata store (Postgres, SQLite) and the
//! content-addressed blob store (object_store: file, memory, s3).
//!
//! Architecture invariant: this crate knows nothing of gRPC, of the CLI or of tensor math.
//! It never lets a metadata row point at a blob that is missing or unverified: blobs are
//! verified and promoted before any version row can name them.

pub mod blobs;
pub mod meta;
