//! The digests of composed files: a merged model's weight files (a header, ranges of the
//! new base's blobs, then the merged tensors' blobs), which CompleteJob hashes itself, a
//! worker's word about composed bytes never counting.
//!
//! Every port of a base that targets the same tensors composes the same beginning (the
//! engine puts the merged tensors last), so the SHA-256 state after that beginning is kept
//! and the next such file hashes only its own tail: for 8 q/k/v/o patches of a 1.4 GB
//! Llama base, 1.2 GB of the 1.4 GB per port after the first. The state is keyed by the
//! digest of the ranges it covers (blob digest, offset, length): stored blobs never change
//! under their digest, so equal ranges are equal bytes, and a state is only ever taken
//! from bytes this process read and hashed.
//!
//! A worker says how a job's composed files will begin as soon as the job is planned
//! (`PrepareComposed`), so the first port of a base need not wait for that beginning to
//! be hashed either: [`ComposedDigests::prepare`] hashes it in the background, and a
//! CompleteJob that needs a state being computed waits for it rather than hashing the
//! same bytes a second time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hashlink::LruCache;
use patchport_core::layout::BlobRange;
use patchport_core::{Digest, Hasher};

use crate::error::ApiResult;
use crate::state::Registry;

/// How many states are kept (about a hundred bytes each): enough for the bases and
/// target sets that workers are porting onto at once.
const STATES: usize = 64;

/// How many beginnings are hashed in the background at once; a hint past that is
/// dropped (CompleteJob then hashes them itself).
const PREPARING: usize = 2;

/// Hashes composed files, keeping the state after their shared beginnings.
#[derive(Debug, Clone)]
pub(crate) struct ComposedDigests {
    /// The hasher after a run of leading segments, by [`BlobRange::run_key`] of the run.
    states: Arc<Mutex<LruCache<Digest, Hasher>>>,
    /// Beginnings being hashed in the background, by key: the receiver turns `true` (or
    /// its sender is dropped) when the hash is done or failed.
    preparing: Arc<Mutex<HashMap<Digest, tokio::sync::watch::Receiver<bool>>>>,
}

impl Default for ComposedDigests {
    fn default() -> Self {
        Self {
            states: Arc::new(Mutex::new(LruCache::new(STATES))),
            preparing: Arc::default(),
        }
    }
}

impl ComposedDigests {
    /// The digest and size of the bytes `segments` compose. The first `shared` segments
    /// are a beginning that other files are likely to share: the state after them is
    /// taken from the cache when there, and kept when not.
    pub(crate) async fn digest(
        &self,
        registry: &Registry,
        segments: &[BlobRange],
        shared: usize,
    ) -> ApiResult<(Digest, u64)> {
        let shared = shared.min(segments.len());
        let prefix_len = segments[..shared]
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.length));
        let key = (prefix_len > 0).then(|| BlobRange::run_key(&segments[..shared]));
        if let Some(k) = &key {
            self.wait_prepared(k).await;
        }
        let cached = key.and_then(|k| self.lock().get(&k).cloned());
        let (start, hasher, keep_at) = match cached {
            Some(h) => (shared, h, None),
            None => (0, Hasher::new(), key.map(|_| prefix_len)),
        };
        let stream = Box::pin(registry.compose(segments[start..].to_vec()));
        let (digest, size, state) = super::blobs::consume_blocking(stream, move |chunks| {
            let mut hasher = hasher;
            let mut state = None;
            for chunk in chunks {
                match keep_at {
                    Some(at) if state.is_none() && hasher.len() + chunk.len() as u64 >= at => {
                        let (head, tail) = chunk.split_at((at - hasher.len()) as usize);
                        hasher.update(head);
                        state = Some(hasher.clone());
                        hasher.update(tail);
                    }
                    _ => hasher.update(&chunk),
                }
            }
            let size = hasher.len();
            (hasher.finish(), size, state)
        })
        .await?;
        if let (Some(k), Some(state)) = (key, state) {
            self.lock().insert(k, state);
        }
        let kept = if start > 0 { prefix_len } else { 0 };
        metrics::counter!(patchport_telemetry::COMPOSED_BYTES_HASHED).increment(size - kept);
        metrics::counter!(patchport_telemetry::COMPOSED_BYTES_KEPT).increment(kept);
        tracing::debug!(bytes = size, kept, "composed file hashed");
        Ok((digest, size))
    }

    /// Starts hashing a composed file's beginning in the background: `header` (the
    /// file's first bytes, not necessarily stored), then `ranges` of stored blobs. The
    /// state after them is kept under the key CompleteJob computes for the same leading
    /// segments. Returns the bytes it set out to hash: 0 when the state is kept or being
    /// computed already, or [`PREPARING`] others are.
    pub(crate) fn prepare(
        &self,
        registry: &Registry,
        header: bytes::Bytes,
        ranges: Vec<BlobRange>,
    ) -> u64 {
        let mut segments = Vec::with_capacity(ranges.len() + 1);
        if !header.is_empty() {
            segments.push(BlobRange::of_bytes(&header));
        }
        segments.extend(ranges.iter().cloned());
        let total = segments
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.length));
        if total == 0 {
            return 0;
        }
        let k = BlobRange::run_key(&segments);
        if self.lock().contains_key(&k) {
            return 0;
        }
        let done = {
            let mut preparing = self.preparing();
            if preparing.contains_key(&k) || preparing.len() >= PREPARING {
                return 0;
            }
            let (done, rx) = tokio::sync::watch::channel(false);
            preparing.insert(k, rx);
            done
        };
        let (this, stream) = (self.clone(), Box::pin(registry.compose(ranges)));
        tokio::spawn(async move {
            // Gives the slot back however the task ends (a panic included).
            let slot = Slot(this.clone(), k);
            let hashed = super::blobs::consume_blocking(stream, move |chunks| {
                let mut hasher = Hasher::new();
                hasher.update(&header);
                for chunk in chunks {
                    hasher.update(&chunk);
                }
                hasher
            })
            .await;
            match hashed {
                Ok(state) if state.len() == total => {
                    this.lock().insert(k, state);
                    tracing::debug!(bytes = total, "composed beginning hashed ahead");
                }
                Ok(state) => {
                    tracing::warn!(
                        bytes = state.len(),
                        expected = total,
                        "a composed beginning read short; not kept"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "hashing a composed beginning ahead failed"),
            }
            drop(slot);
            let _ = done.send(true);
        });
        total
    }

    /// Waits while the state under `k` is being hashed in the background.
    async fn wait_prepared(&self, k: &Digest) {
        let rx = self.preparing().get(k).cloned();
        if let Some(mut rx) = rx {
            // An error means the task is gone: nothing more to wait for.
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    fn preparing(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Digest, tokio::sync::watch::Receiver<bool>>> {
        self.preparing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Digest, Hasher>> {
        // The cache holds no invariant a panicking holder could break.
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A beginning being hashed in the background: dropped, it leaves the set (after its
/// state is kept, when it was).
struct Slot(ComposedDigests, Digest);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.preparing().remove(&self.1);
    }
}

/// How many leading segments of a composed file are likely shared with others: all but
/// the trailing run of whole blobs (the merged tensors; the base's bytes are ranges of
/// its files). `whole[i]`: segment `i` is a whole blob.
pub(crate) fn shared_prefix(whole: &[bool]) -> usize {
    whole.iter().rposition(|w| !w).map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_prefix_ends_before_the_trailing_whole_blobs() {
        assert_eq!(shared_prefix(&[]), 0);
        assert_eq!(shared_prefix(&[true, true]), 0);
        // header, base ranges, merged tensors
        assert_eq!(shared_prefix(&[true, false, false, true, true]), 3);
        // the base's own layout: a merged tensor last but not only there
        assert_eq!(shared_prefix(&[false, true, false, true]), 3);
    }
}
