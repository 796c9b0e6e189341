//! The registry's configurable limits; each refusal names the limit and its flag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::lock;
use crate::error::ApiError;

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
    /// Most UploadChunks streams one caller has open at once (`--max-upload-streams`).
    pub max_upload_streams: usize,
    /// Most Subscribe streams one caller has open at once (`--max-subscriptions`).
    pub max_subscriptions: usize,
    /// An upload stream that sends nothing, or an event stream whose client reads
    /// nothing, for this long is ended (`--stream-idle-seconds`).
    pub stream_idle: Duration,
    /// Time a new connection has to finish its TLS and HTTP/2 handshakes
    /// (`--handshake-timeout-seconds`).
    pub handshake_timeout: Duration,
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
            max_upload_streams: 16,
            max_subscriptions: 64,
            stream_idle: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The kinds of long-lived streams capped per caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    /// UploadChunks.
    Upload,
    /// Subscribe.
    Subscribe,
}

impl StreamKind {
    fn label(self) -> &'static str {
        match self {
            StreamKind::Upload => "uploads",
            StreamKind::Subscribe => "subscriptions",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            StreamKind::Upload => {
                "concurrent upload streams (--max-upload-streams, PATCHPORT_MAX_UPLOAD_STREAMS)"
            }
            StreamKind::Subscribe => {
                "concurrent event subscriptions (--max-subscriptions, PATCHPORT_MAX_SUBSCRIPTIONS)"
            }
        }
    }
}

/// Open streams per caller and kind (cheap to clone).
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamCaps {
    open: Arc<Mutex<HashMap<(StreamKind, String), usize>>>,
}

/// One open stream; dropping it (the stream ended, however) frees its place.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    caps: StreamCaps,
    key: (StreamKind, String),
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.caps.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl StreamCaps {
    /// Takes a place for one more `kind` stream of `caller`, or refuses with
    /// RESOURCE_EXHAUSTED naming the limit and its flag when it has `max` open already.
    pub(crate) fn open(
        &self,
        kind: StreamKind,
        caller: &str,
        max: usize,
    ) -> Result<StreamPermit, ApiError> {
        let key = (kind, caller.to_owned());
        let mut open = lock(&self.open);
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            metrics::counter!(patchport_telemetry::STREAMS_REFUSED, "limit" => kind.label())
                .increment(1);
            return Err(ApiError::exhausted(format!(
                "{caller} has {n} {} open; the limit is {max} per caller: close one or wait",
                kind.describe()
            )));
        }
        *n += 1;
        Ok(StreamPermit {
            caps: self.clone(),
            key,
        })
    }

    /// Streams open now, all callers and kinds together.
    #[cfg(test)]
    fn total(&self) -> usize {
        lock(&self.open).values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_caller_and_free_on_drop() {
        let caps = StreamCaps::default();
        let a1 = caps.open(StreamKind::Upload, "a", 2).unwrap();
        let _a2 = caps.open(StreamKind::Upload, "a", 2).unwrap();
        let refused = caps.open(StreamKind::Upload, "a", 2).unwrap_err();
        assert_eq!(refused.kind(), crate::ErrorKind::ResourceExhausted);
        assert!(
            refused.to_string().contains("--max-upload-streams"),
            "{refused}"
        );
        // Other callers and kinds are counted apart.
        let _b = caps.open(StreamKind::Upload, "b", 2).unwrap();
        let _s = caps.open(StreamKind::Subscribe, "a", 2).unwrap();
        drop(a1);
        let _a3 = caps.open(StreamKind::Upload, "a", 2).unwrap();
        assert_eq!(caps.total(), 4);
    }
}
