//! The registry's configurable limits; each refusal names the limit and its flag.

use std::time::Duration;

/// Limits on what one request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest upload chunk (the client learns it from StartUpload).
    pub max_chunk_bytes: u64,
    /// Largest gRPC message of the metadata services (a push's file list, a tensor index).
    pub max_message_bytes: usize,
    /// Largest safetensors JSON header.
    pub max_header_bytes: u64,
    /// Most tensors in one safetensors file.
    pub max_tensors: usize,
    /// Longest `namespace/name`.
    pub max_name_len: usize,
    /// How long an unfinished upload session is kept.
    pub upload_session_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk_bytes: 4 << 20,
            max_message_bytes: 64 << 20,
            max_header_bytes: 16 << 20,
            max_tensors: 100_000,
            max_name_len: 200,
            upload_session_ttl: Duration::from_secs(24 * 3600),
        }
    }
}
