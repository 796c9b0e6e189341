//! Resumable uploads: sessions kept in the object store, the chunk writer (a `file://`
//! data file, or the parts of one multipart upload to the blob's key), verified commit,
//! and expiry of abandoned sessions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectMeta, ObjectStoreExt, PutPayload};
use patchport_core::{Digest, Hasher};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::parts::{self, Chain, PartRecord};
use super::{BlobError, BlobStore, MAX_PARTS, hash_parts, local};

/// Part records read at once while a session's chain is followed.
const RECORD_READS: usize = 32;

/// Why a session written as segment objects is not continued.
const OLDER_REGISTRY: &str = "started by an older registry; start the upload again";

/// A staging object or half-written temporary file untouched this long belongs to no
/// live commit or put (those write continuously and last seconds to minutes), so the
/// expiry sweep removes it even when the session TTL is longer: what a registry killed
/// mid-commit leaves behind (staging objects only from older registries).
pub const ORPHAN_AGE: Duration = Duration::from_secs(3_600);

/// The top-level directories whose half-written temporary files the periodic sweep
/// removes; `blobs` too, at start only (see [`BlobStore::sweep_at_start`]).
const TEMP_DIRS: [&str; 2] = ["staging", "uploads"];

/// An upload session: what was declared and how many bytes are durably received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSession {
    /// The session's id (32 lowercase hex digits).
    pub upload_id: String,
    /// The declared digest.
    pub digest: Digest,
    /// The declared size in bytes.
    pub size: u64,
    /// Bytes durably received from offset 0: the next chunk must start here. Equals
    /// `size` once the upload was committed.
    pub committed: u64,
}

/// The answer to [`BlobStore::start_upload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadStart {
    /// The blob is already stored: nothing to send.
    Exists {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// Send the bytes from `committed` on into this session (a new one, or the unfinished
    /// session of an earlier attempt for the same digest and size).
    Session(UploadSession),
}

/// The result of a successful commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The stored blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// True when the blob was already stored (another upload stored it first).
    pub deduplicated: bool,
}

/// The stored record of a session, `uploads/<id>/session.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    digest: Digest,
    size: u64,
    /// Seconds since the Unix epoch.
    created: u64,
    /// Set when the blob was stored; the record then stays until expiry, so a retried
    /// commit answers the same instead of NotFound.
    #[serde(default)]
    complete: bool,
    /// Whose session it is (see [`BlobStore::start_upload_as`]); none for callers that
    /// see every blob. A session is only ever resumed, written or committed by its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    /// On `memory://` and `s3://`: the id of the session's multipart upload to the blob's
    /// key. A session without one there was started by an older registry (segment
    /// objects) and is not continued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multipart: Option<String>,
    /// The size of every part but the last (with `multipart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part_size: Option<u64>,
    /// Set when completing the multipart upload failed once: the next failure deletes
    /// the session (see `commit_parts`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    completion_failed: bool,
}

/// How a session's bytes are kept.
enum Layout {
    /// `file://`: the session directory with its data file.
    Local(std::path::PathBuf),
    /// A multipart upload to the blob's key.
    Parts(Upload),
}

/// A session's multipart upload.
#[derive(Clone)]
struct Upload {
    store: Arc<dyn MultipartStore>,
    id: MultipartId,
    /// The blob's key, which the upload completes to.
    key: Path,
    part_size: u64,
}

/// What a session's part records and tail hold.
struct PartsScan {
    chain: Chain,
    /// The length of the tail at the chain's end, if there is one.
    tail: Option<u64>,
}

impl PartsScan {
    /// The tail's length when it ends within the declared `size` (one that would end past
    /// it is not counted).
    fn tail_within(&self, size: u64) -> Option<u64> {
        self.tail
            .filter(|len| self.chain.end.saturating_add(*len) <= size)
    }
}

/// A stretch of received bytes: on `file://`, a record of `len` durable bytes of the
/// data file at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// Parts of one multipart upload put at once: the writer receives the next part while
/// these are sent. With the part being filled, an upload holds up to this many parts
/// plus one in memory.
pub const PARTS_IN_FLIGHT: usize = 4;

/// Receives the chunks of one upload session, in order, and persists them.
///
/// On `memory://` and `s3://` every full part is hashed (continuing the state of the part
/// before it) and put in the background as it fills, up to [`PARTS_IN_FLIGHT`] at once;
/// a part is recorded once it was put and the part before it was recorded, so the
/// recorded chain never runs past a part that was not put. A part in flight belongs to
/// its background task, not to the writer: a writer dropped with parts in flight (a
/// handler dropped with its cut stream) leaves them to finish and record themselves, so
/// the client's resume finds them. A shorter stretch that is not the end of the blob is
/// persisted as the session's tail by [`persist_buffered`](Self::persist_buffered),
/// which leaves nothing in memory: the tail is read back (at most one part) when the
/// next part or tail needs it, by this writer or one opened later. On `file://` bytes
/// are persisted in segments, at most two in memory (one is written and hashed in the
/// background while the next arrives; an error of that write shows at the next write or
/// flush, with its bytes buffered again). Chunks that were written but not yet persisted
/// are lost if the writer is dropped without [`UploadWriter::flush`]; the client then
/// resumes from the session's committed offset.
pub struct UploadWriter {
    store: BlobStore,
    upload_id: String,
    digest: Digest,
    size: u64,
    committed: u64,
    buffered: u64,
    /// The bytes not yet in a part or the data file: on `file://` the `buffered` ones; with
    /// a multipart upload those after the last part sent and the unloaded tail (the
    /// tail's, if loaded, then the rest).
    buffer: VecDeque<Bytes>,
    /// On `file://`: the session directory (its data file takes the bytes) and the hash
    /// state at `committed`.
    local: Option<(std::path::PathBuf, Hasher)>,
    /// On `file://`: the segment being written in the background (its `in_flight` bytes
    /// are the first of `buffered`), giving back its parts and the hash state after them.
    pending: Option<PendingWrite>,
    in_flight: u64,
    /// With a multipart upload: where its recorded parts stand.
    parts: Option<PartsWriter>,
    /// Set when another writer of the session stored the blob while this one wrote (its
    /// multipart upload was completed under it): the rest of the stream is accepted and
    /// dropped, and the commit answers dedup.
    stored: bool,
}

/// A writer's position in a session's multipart upload.
struct PartsWriter {
    upload: Upload,
    /// Where the recorded parts end; the parts in flight, then `buffer`, hold the bytes
    /// from here on.
    end: u64,
    /// The hash state at `end`.
    hasher: Hasher,
    /// The content id of the last recorded part (none before the first).
    prev: Option<String>,
    /// The index of the next part to be recorded.
    next: usize,
    /// Whether a tail object at `end` may exist (written or seen by this writer) that no
    /// part in flight covers.
    tail: bool,
    /// Bytes of the tail at `end` that are not in the buffer (persisted, and dropped from
    /// memory); the buffer holds the bytes after them. Only with no part in flight.
    unloaded: u64,
    /// The parts being put, in order, the first starting at `end`.
    in_flight: VecDeque<InFlight>,
}

impl PartsWriter {
    /// Where the parts sent so far end (recorded or in flight).
    fn sent_end(&self) -> u64 {
        self.in_flight.back().map_or(self.end, |p| p.end)
    }

    /// The hash state at [`sent_end`](Self::sent_end).
    fn sent_hasher(&self) -> Hasher {
        self.in_flight
            .back()
            .map_or_else(|| self.hasher.clone(), |p| p.hasher.clone())
    }
}

/// A part put in the background.
struct InFlight {
    start: u64,
    end: u64,
    /// The hash state after it.
    hasher: Hasher,
    /// Whether it starts at a tail object, deleted once the part is recorded.
    covers_tail: bool,
    /// Gives the part's content id once it is recorded; the next part's task takes it.
    recorded: Option<oneshot::Receiver<Option<String>>>,
    task: tokio::task::JoinHandle<PartOutcome>,
}

/// What became of a part put in the background.
enum PartOutcome {
    /// Put and recorded, with this content id.
    Recorded(String),
    /// The multipart upload is gone because the blob is stored: another writer of the
    /// session completed it.
    Stored,
    /// Not recorded: the error (none when the part before it was not recorded), and the
    /// part's bytes.
    Failed(Option<BlobError>, Vec<Bytes>),
}

/// One part for [`BlobStore::put_part`] and [`BlobStore::record_part`].
struct PartPut {
    upload_id: String,
    upload: Upload,
    index: usize,
    start: u64,
    bytes: Vec<Bytes>,
    /// The hash state after the part.
    hasher: Hasher,
}

type PendingWrite = tokio::task::JoinHandle<(Vec<Bytes>, Result<Hasher, local::Fail>)>;

impl std::fmt::Debug for UploadWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadWriter")
            .field("upload_id", &self.upload_id)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("committed", &self.committed)
            .field("buffered", &self.buffered)
            .finish()
    }
}

impl UploadWriter {
    /// The declared digest of the upload.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The declared size of the upload.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes durably persisted from offset 0 (buffered bytes, and parts still in flight,
    /// not included).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Appends a chunk at `offset`, which must equal the committed plus the buffered
    /// bytes; a chunk that would end past the declared size is refused. Full parts (or
    /// segments) are persisted as they fill. On a storage error the chunk stays buffered,
    /// so a later [`flush`](Self::flush) may still persist it.
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), BlobError> {
        if self.stored {
            return Ok(());
        }
        let expected = self.committed + self.buffered;
        if offset != expected {
            return Err(BlobError::WrongOffset {
                upload_id: self.upload_id.clone(),
                offset,
                expected,
            });
        }
        let end = expected.saturating_add(data.len() as u64);
        if end > self.size {
            return Err(BlobError::PastDeclaredSize {
                upload_id: self.upload_id.clone(),
                end,
                size: self.size,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        self.buffered = end - self.committed;
        self.buffer.push_back(data);
        if self.parts.is_some() {
            return self.put_ready_parts().await;
        }
        let segment = self.store.segment_size as u64;
        while self.buffered - self.in_flight >= segment {
            self.persist(segment).await?;
        }
        Ok(())
    }

    /// Bytes received but not yet persisted (held in memory, or in parts in flight).
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Persists what is buffered now (a short segment, or the tail of a multipart upload)
    /// and returns the durable committed offset: call it when the client pauses, so a
    /// stalled stream holds no data in memory.
    pub async fn persist_buffered(&mut self) -> Result<u64, BlobError> {
        if self.parts.is_some() {
            self.put_ready_parts().await?;
            self.settle_parts(true).await?;
            if self.buffered > 0 && !self.stored {
                self.put_tail().await?;
            }
            return Ok(self.committed);
        }
        let rest = self.buffered - self.in_flight;
        if rest > 0 {
            self.persist(rest).await?;
        }
        self.settle().await?;
        Ok(self.committed)
    }

    /// Waits for the segment being written in the background: its bytes become
    /// committed, or, on an error, buffered again in front.
    async fn settle(&mut self) -> Result<(), BlobError> {
        let Some(task) = self.pending.take() else {
            return Ok(());
        };
        let n = std::mem::take(&mut self.in_flight);
        let (parts, result) = match task.await {
            Ok(done) => done,
            Err(source) => {
                // The bytes are gone with the task: the client resends from `committed`
                // (what is buffered after them cannot follow them).
                self.buffer.clear();
                self.buffered = 0;
                return Err(BlobError::Task { source });
            }
        };
        match result {
            Ok(hasher) => {
                self.committed += n;
                self.buffered -= n;
                if let Some(local) = self.local.as_mut() {
                    local.1 = hasher;
                }
                Ok(())
            }
            Err(e) => {
                for part in parts.into_iter().rev() {
                    self.buffer.push_front(part);
                }
                Err(e.into_blob(&self.upload_id, self.digest, self.size))
            }
        }
    }

    /// Persists what is buffered and returns the durable committed offset. Call it at the
    /// end of a chunk stream and when the stream breaks, so a cut upload keeps what
    /// arrived.
    pub async fn flush(mut self) -> Result<u64, BlobError> {
        let committed = self.persist_buffered().await?;
        tracing::debug!(upload_id = %self.upload_id, size = self.size, committed, "upload stream persisted");
        Ok(committed)
    }

    /// On `file://`: writes the first `n` buffered bytes into the data file at the
    /// committed offset in the background, continuing the recorded hash state.
    async fn persist(&mut self, n: u64) -> Result<(), BlobError> {
        // One segment at a time: the next continues the hash state this one ends with.
        self.settle().await?;
        let Some((dir, hasher)) = self.local.clone() else {
            return Ok(());
        };
        let parts = take_front(&mut self.buffer, n);
        let start = self.committed;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let result = local::append(&dir, start, &parts, hasher);
            (parts, result)
        }));
        self.in_flight = n;
        Ok(())
    }

    /// Sends every part the buffer fills: full parts, and the last part once the bytes
    /// reach the declared size.
    async fn put_ready_parts(&mut self) -> Result<(), BlobError> {
        loop {
            let total = self.committed + self.buffered;
            let Some(p) = &self.parts else {
                return Ok(());
            };
            let start = p.sent_end();
            let need = p.upload.part_size.min(self.size.saturating_sub(start));
            if self.stored || need == 0 || total.saturating_sub(start) < need {
                return Ok(());
            }
            self.settle_parts(false).await?;
            if self.stored {
                return Ok(());
            }
            self.load_tail().await?;
            self.send_part(need).await?;
        }
    }

    /// Hashes the first `n` bytes of the buffer, continuing the state of the part sent
    /// before them, and puts them as the next part in the background. On an error the
    /// bytes stay buffered.
    async fn send_part(&mut self, n: u64) -> Result<(), BlobError> {
        let Some(p) = self.parts.as_mut() else {
            return Ok(());
        };
        let bytes = take_front(&mut self.buffer, n);
        let hasher = match hash_parts(bytes.clone(), p.sent_hasher()).await {
            Ok(hasher) => hasher,
            Err(e) => {
                for b in bytes.into_iter().rev() {
                    self.buffer.push_front(b);
                }
                return Err(e);
            }
        };
        let start = p.sent_end();
        // The content id of the part before: recorded already, or once its task records it
        // (a closed channel, which cannot happen, would fail this part, not misrecord it).
        let prev = match p.in_flight.back_mut() {
            Some(last) => last.recorded.take().unwrap_or_else(|| oneshot::channel().1),
            None => {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(p.prev.clone());
                rx
            }
        };
        let (tx, recorded) = oneshot::channel();
        let put = PartPut {
            upload_id: self.upload_id.clone(),
            upload: p.upload.clone(),
            index: p.next + p.in_flight.len(),
            start,
            bytes,
            hasher: hasher.clone(),
        };
        let task = tokio::spawn(
            self.store
                .clone()
                .put_part_in_background(put, self.size, prev, tx),
        );
        p.in_flight.push_back(InFlight {
            start,
            end: start + n,
            hasher,
            covers_tail: std::mem::take(&mut p.tail),
            recorded: Some(recorded),
            task,
        });
        Ok(())
    }

    /// Takes the outcomes of the parts in flight, oldest first: those that finished, the
    /// oldest when [`PARTS_IN_FLIGHT`] are in flight, and with `all` every one. A recorded
    /// part becomes committed; a failed one gives its bytes, and those of every part after
    /// it, back to the front of the buffer, and its error is returned.
    async fn settle_parts(&mut self, all: bool) -> Result<(), BlobError> {
        loop {
            let Some(p) = self.parts.as_mut() else {
                return Ok(());
            };
            let Some(oldest) = p.in_flight.front() else {
                return Ok(());
            };
            if !all && p.in_flight.len() < PARTS_IN_FLIGHT && !oldest.task.is_finished() {
                return Ok(());
            }
            let Some(part) = p.in_flight.pop_front() else {
                return Ok(());
            };
            let outcome = match part.task.await {
                Ok(outcome) => outcome,
                Err(source) => PartOutcome::Failed(Some(BlobError::Task { source }), Vec::new()),
            };
            let (error, bytes) = match outcome {
                PartOutcome::Recorded(content_id) => {
                    p.end = part.end;
                    p.hasher = part.hasher;
                    p.prev = Some(content_id);
                    p.next += 1;
                    let total = self.committed + self.buffered;
                    self.committed = self.committed.max(part.end);
                    self.buffered = total - self.committed;
                    if part.covers_tail {
                        self.delete_tail(part.start).await;
                    }
                    continue;
                }
                PartOutcome::Stored => {
                    self.blob_stored();
                    return Ok(());
                }
                PartOutcome::Failed(error, bytes) => (error, bytes),
            };
            // This part and every one after it go back in front of the buffer, in order.
            let mut back = vec![bytes];
            let mut tail = part.covers_tail;
            let mut lost = error.is_none();
            for later in std::mem::take(&mut p.in_flight) {
                tail |= later.covers_tail;
                match later.task.await {
                    Ok(PartOutcome::Failed(_, bytes)) if !bytes.is_empty() => back.push(bytes),
                    Ok(PartOutcome::Stored) => {
                        self.blob_stored();
                        return Ok(());
                    }
                    // Recorded after a part that was not is impossible; a task that
                    // panicked took its bytes with it.
                    _ => lost = true,
                }
            }
            p.tail |= tail;
            if lost {
                // Bytes are gone: the client resends from `committed` (what is buffered
                // after them cannot follow them).
                self.buffer.clear();
                self.buffered = 0;
            } else {
                for b in back.into_iter().flatten().rev() {
                    self.buffer.push_front(b);
                }
            }
            return Err(error.unwrap_or_else(|| BlobError::UploadChanged {
                upload_id: self.upload_id.clone(),
                detail: "a part was lost while it was put; resume from the committed offset"
                    .to_owned(),
            }));
        }
    }

    /// Another writer of the session stored the blob: nothing more is written.
    fn blob_stored(&mut self) {
        tracing::debug!(upload_id = %self.upload_id, "the blob was stored by another writer of the session");
        self.stored = true;
        if let Some(p) = self.parts.as_mut() {
            // Their tasks finish on their own; what they record no longer matters.
            p.in_flight.clear();
        }
        self.buffer.clear();
        self.committed = self.size;
        self.buffered = 0;
    }

    /// Deletes a tail object that a recorded part now covers.
    async fn delete_tail(&self, at: u64) {
        let key = self
            .store
            .session_dir(&self.upload_id)
            .join(parts::tail_name(at));
        if let Err(e) = self.store.delete_quiet(&key).await {
            tracing::warn!(upload_id = %self.upload_id, error = %e, "cannot delete a covered upload tail");
        }
    }

    /// Puts every byte after the last part as the session's tail (shorter than a part and
    /// not the end of the blob), then drops them from memory. Only with no part in flight.
    async fn put_tail(&mut self) -> Result<(), BlobError> {
        self.load_tail().await?;
        let Some(p) = self.parts.as_mut() else {
            return Ok(());
        };
        let key = self
            .store
            .session_dir(&self.upload_id)
            .join(parts::tail_name(p.end));
        let payload: PutPayload = self.buffer.iter().cloned().collect();
        self.store
            .store
            .put(&key, payload)
            .await
            .map_err(|e| BlobError::storage("put", &key, e))?;
        p.tail = true;
        self.committed += self.buffered;
        self.buffered = 0;
        p.unloaded = self.committed - p.end;
        self.buffer.clear();
        Ok(())
    }

    /// Reads the unloaded tail back into the front of the buffer. A tail that changed
    /// meanwhile (another writer of the session) is UploadChanged: the client resumes
    /// from the session's committed offset.
    async fn load_tail(&mut self) -> Result<(), BlobError> {
        let Some(p) = self.parts.as_mut() else {
            return Ok(());
        };
        if p.unloaded == 0 {
            return Ok(());
        }
        let bytes = self
            .store
            .read_tail(&self.upload_id, p.end)
            .await?
            .unwrap_or_default();
        if bytes.len() as u64 != p.unloaded {
            return Err(BlobError::UploadChanged {
                upload_id: self.upload_id.clone(),
                detail: format!(
                    "its tail at offset {} holds {} bytes, not the {} persisted; resume from the committed offset",
                    p.end,
                    bytes.len(),
                    p.unloaded
                ),
            });
        }
        self.buffer.push_front(bytes);
        p.unloaded = 0;
        Ok(())
    }
}

impl BlobStore {
    /// The background task of a part: puts it, then records it once the part before it
    /// gives its content id through `prev` (once that part is recorded), then gives its
    /// own content id to the part after it through `recorded`. `size` is the blob's
    /// declared size.
    async fn put_part_in_background(
        self,
        put: PartPut,
        size: u64,
        prev: oneshot::Receiver<Option<String>>,
        recorded: oneshot::Sender<Option<String>>,
    ) -> PartOutcome {
        let content_id = match self.put_part(&put).await {
            Ok(content_id) => content_id,
            // The upload is gone: completed by another writer of the session if the blob
            // is stored.
            Err(e @ BlobError::UploadChanged { .. }) => {
                return match self.head(&put.upload.key).await {
                    Ok(Some(meta)) if meta.size == size => PartOutcome::Stored,
                    _ => PartOutcome::Failed(Some(e), put.bytes),
                };
            }
            Err(e) => return PartOutcome::Failed(Some(e), put.bytes),
        };
        // The part before it was not recorded: neither is this one.
        let Ok(prev) = prev.await else {
            return PartOutcome::Failed(None, put.bytes);
        };
        if let Err(e) = self.record_part(&put, content_id.clone(), prev).await {
            return PartOutcome::Failed(Some(e), put.bytes);
        }
        let _ = recorded.send(Some(content_id.clone()));
        PartOutcome::Recorded(content_id)
    }

    /// Puts a part of a session's multipart upload and returns its content id. An upload
    /// that is gone is UploadChanged.
    async fn put_part(&self, put: &PartPut) -> Result<String, BlobError> {
        let upload = &put.upload;
        let payload: PutPayload = put.bytes.iter().cloned().collect();
        match upload
            .store
            .put_part(&upload.key, &upload.id, put.index, payload)
            .await
        {
            Ok(part) => Ok(part.content_id),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::UploadChanged {
                upload_id: put.upload_id.clone(),
                detail:
                    "its multipart upload is gone (expired or committed); start the upload again"
                        .to_owned(),
            }),
            Err(e) => Err(BlobError::storage("put part", &upload.key, e)),
        }
    }

    /// Records a part that was put: its content id, `prev` (the content id of the part
    /// before it, which must be recorded already) and the hash state after it.
    async fn record_part(
        &self,
        put: &PartPut,
        content_id: String,
        prev: Option<String>,
    ) -> Result<(), BlobError> {
        let len = put.hasher.len() - put.start;
        let record = PartRecord {
            part: put.index,
            content_id,
            prev,
            state: parts::to_hex(&put.hasher.to_state()),
        };
        let key = self
            .session_dir(&put.upload_id)
            .join(parts::record_name(put.start, len));
        self.put_json(&put.upload_id, &key, &record).await
    }
}

/// Whether a chain of parts hashes to `declared` (DigestMismatch if not).
fn chain_matches(chain: &Chain, declared: Digest) -> Result<(), BlobError> {
    let actual = chain.hasher.clone().finish();
    if actual == declared {
        Ok(())
    } else {
        Err(BlobError::DigestMismatch { declared, actual })
    }
}

/// Removes exactly `n` bytes (or all there are) from the front of `buffer`, without copying.
fn take_front(buffer: &mut VecDeque<Bytes>, n: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut need = n;
    while need > 0 {
        let Some(mut chunk) = buffer.pop_front() else {
            break;
        };
        let len = chunk.len() as u64;
        if len <= need {
            need -= len;
            out.push(chunk);
        } else {
            // need < len <= usize::MAX, so the cast is exact.
            out.push(chunk.split_to(need as usize));
            buffer.push_front(chunk);
            need = 0;
        }
    }
    out
}

impl BlobStore {
    /// Starts an upload of `size` bytes hashing to `digest`. When the blob is stored
    /// already, answers [`UploadStart::Exists`] (a declared size that differs from the
    /// stored one is InvalidArgument). Otherwise returns the unfinished session of an
    /// earlier attempt for the same digest and size, with its committed offset, so a
    /// client that lost its upload id resumes; or a new session.
    pub async fn start_upload(&self, digest: Digest, size: u64) -> Result<UploadStart, BlobError> {
        self.start_upload_as(digest, size, None, true).await
    }

    /// [`start_upload`](Self::start_upload) for an uploader: `owner` names whose session
    /// it is (a namespace; none for a caller that sees every blob), so sessions are never
    /// shared, resumed or committed across owners; `sees_blob` says whether the caller may
    /// learn that the blob is stored. When it may not, a stored blob is not answered as
    /// [`UploadStart::Exists`] (nor its size compared): the caller gets a session and
    /// must send the bytes, and [`commit_upload_as`](Self::commit_upload_as) with
    /// `must_prove` verifies them before answering dedup.
    pub async fn start_upload_as(
        &self,
        digest: Digest,
        size: u64,
        owner: Option<&str>,
        sees_blob: bool,
    ) -> Result<UploadStart, BlobError> {
        if !sees_blob {
            // Nothing below may depend on whether the blob is stored.
        } else if let Some(actual) = self.size(&digest).await? {
            if actual != size {
                return Err(BlobError::SizeMismatch {
                    digest,
                    declared: size,
                    actual,
                });
            }
            return Ok(UploadStart::Exists { digest, size });
        }
        let index = self.index_key(&digest, size, owner);
        if let Some(upload_id) = self.read_index(&index).await? {
            match self.load_session(&upload_id).await {
                Ok(rec)
                    if !rec.complete
                        && rec.digest == digest
                        && rec.size == size
                        && rec.owner.as_deref() == owner =>
                {
                    if let Some(layout) = self.layout(&upload_id, &rec).await? {
                        let committed = self.committed_offset(&upload_id, &rec, &layout).await?;
                        tracing::debug!(%upload_id, %digest, committed, "resuming upload session");
                        return Ok(UploadStart::Session(UploadSession {
                            upload_id,
                            digest,
                            size,
                            committed,
                        }));
                    }
                    tracing::info!(%upload_id, %digest, "not resuming a session of an older registry");
                    self.delete_session(&upload_id, &rec).await;
                }
                Ok(_)
                | Err(BlobError::UploadNotFound { .. } | BlobError::CorruptSession { .. }) => {}
                Err(e) => return Err(e),
            }
        }

        let upload_id = uuid::Uuid::new_v4().simple().to_string();
        let mut record = SessionRecord {
            digest,
            size,
            created: unix_now(),
            complete: false,
            owner: owner.map(str::to_owned),
            multipart: None,
            part_size: None,
            completion_failed: false,
        };
        if self.local_root.is_none() {
            let store = self.multipart_store()?;
            let key = self.blob_key(&digest);
            let id = store
                .create_multipart(&key)
                .await
                .map_err(|e| BlobError::storage("start multipart upload", &key, e))?;
            record.multipart = Some(id);
            record.part_size = Some(self.part_size(size));
        }
        if let Err(e) = self.write_session(&upload_id, &record).await {
            self.abort_upload(&record).await;
            return Err(e);
        }
        self.bookkeeping
            .put(&index, PutPayload::from(upload_id.clone()))
            .await
            .map_err(|e| BlobError::storage("put", &index, e))?;
        tracing::debug!(%upload_id, %digest, size, "upload session started");
        Ok(UploadStart::Session(UploadSession {
            upload_id,
            digest,
            size,
            committed: 0,
        }))
    }

    /// The size of every part but the last of a new session's multipart upload: a
    /// segment, at least the smallest part, and large enough for at most [`MAX_PARTS`].
    pub(super) fn part_size(&self, size: u64) -> u64 {
        (self.segment_size as u64)
            .max(self.min_part_size as u64)
            .max(size.div_ceil(MAX_PARTS))
    }

    fn multipart_store(&self) -> Result<Arc<dyn MultipartStore>, BlobError> {
        self.parts
            .clone()
            .ok_or_else(|| BlobError::UploadsUnsupported {
                store: self.store.to_string(),
            })
    }

    /// The declared digest and size of a session and its committed offset.
    pub async fn upload_status(&self, upload_id: &str) -> Result<UploadSession, BlobError> {
        self.upload_status_as(upload_id, None).await
    }

    /// [`upload_status`](Self::upload_status) of `owner`'s session (another owner's is
    /// NotFound).
    pub async fn upload_status_as(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<UploadSession, BlobError> {
        check_upload_id(upload_id)?;
        let rec = self.load_owned_session(upload_id, owner).await?;
        let committed = if rec.complete {
            rec.size
        } else {
            let layout = self.live_layout(upload_id, &rec).await?;
            self.committed_offset(upload_id, &rec, &layout).await?
        };
        Ok(UploadSession {
            upload_id: upload_id.to_owned(),
            digest: rec.digest,
            size: rec.size,
            committed,
        })
    }

    /// A writer that appends to the session from its committed offset.
    pub async fn upload_writer(&self, upload_id: &str) -> Result<UploadWriter, BlobError> {
        self.upload_writer_as(upload_id, None).await
    }

    /// [`upload_writer`](Self::upload_writer) of `owner`'s session.
    pub async fn upload_writer_as(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<UploadWriter, BlobError> {
        check_upload_id(upload_id)?;
        let rec = self.load_owned_session(upload_id, owner).await?;
        let mut writer = UploadWriter {
            store: self.clone(),
            upload_id: upload_id.to_owned(),
            digest: rec.digest,
            size: rec.size,
            committed: rec.size,
            buffered: 0,
            buffer: VecDeque::new(),
            local: None,
            pending: None,
            in_flight: 0,
            parts: None,
            stored: false,
        };
        if rec.complete {
            // Nothing more to write: every chunk is refused as past the size.
            return Ok(writer);
        }
        match self.live_layout(upload_id, &rec).await? {
            Layout::Local(dir) => {
                let (size, digest) = (rec.size, rec.digest);
                let (committed, hasher) = blocking({
                    let dir = dir.clone();
                    move || local::resume_point(&dir, size)
                })
                .await?
                .map_err(|e| e.into_blob(upload_id, digest, size))?;
                writer.committed = committed;
                writer.local = Some((dir, hasher));
            }
            Layout::Parts(upload) => {
                let scan = self.scan_parts(upload_id, rec.size).await?;
                let end = scan.chain.end;
                // The tail is read when the next part or tail needs it.
                let tail = scan.tail_within(rec.size);
                writer.committed = end + tail.unwrap_or(0);
                writer.parts = Some(PartsWriter {
                    upload,
                    end,
                    prev: scan.chain.last_id().map(str::to_owned),
                    next: scan.chain.ids.len(),
                    hasher: scan.chain.hasher,
                    tail: tail.is_some(),
                    unloaded: tail.unwrap_or(0),
                    in_flight: VecDeque::new(),
                });
            }
        }
        Ok(writer)
    }

    /// How a session's bytes are kept; `None` for a session an older registry started
    /// (segment objects), which is not continued.
    async fn layout(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
    ) -> Result<Option<Layout>, BlobError> {
        if self.local_root.is_some() {
            return Ok(self.data_file_session(upload_id).await?.map(Layout::Local));
        }
        let Some(id) = rec.multipart.clone() else {
            return Ok(None);
        };
        Ok(Some(Layout::Parts(Upload {
            store: self.multipart_store()?,
            id,
            key: self.blob_key(&rec.digest),
            part_size: rec
                .part_size
                .filter(|n| *n > 0)
                .unwrap_or_else(|| self.part_size(rec.size)),
        })))
    }

    /// The layout of a session that is continued: one an older registry started is
    /// deleted and answered UploadChanged.
    async fn live_layout(&self, upload_id: &str, rec: &SessionRecord) -> Result<Layout, BlobError> {
        match self.layout(upload_id, rec).await? {
            Some(layout) => Ok(layout),
            None => {
                self.delete_session(upload_id, rec).await;
                Err(BlobError::UploadChanged {
                    upload_id: upload_id.to_owned(),
                    detail: OLDER_REGISTRY.to_owned(),
                })
            }
        }
    }

    /// Verifies the session's bytes against the declared digest and size and stores them
    /// as a blob. An incomplete upload is FailedPrecondition; a digest mismatch is
    /// InvalidArgument and deletes the session. A blob that is already stored is dedup
    /// (even if this session did not receive every byte), and committing a committed
    /// session again answers the same.
    pub async fn commit_upload(&self, upload_id: &str) -> Result<CommitOutcome, BlobError> {
        self.commit_upload_as(upload_id, None, false).await
    }

    /// The declared digest and size of `owner`'s session (one small read).
    pub async fn upload_declared(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<(Digest, u64), BlobError> {
        check_upload_id(upload_id)?;
        let rec = self.load_owned_session(upload_id, owner).await?;
        Ok((rec.digest, rec.size))
    }

    /// [`commit_upload`](Self::commit_upload) of `owner`'s session. With `must_prove`
    /// (the caller may not see the blob yet), a blob that is already stored answers dedup
    /// only after this session's own bytes were proved to hash to its digest, by the hash
    /// state recorded as they were received: the upload is the caller's proof that it
    /// holds the bytes.
    pub async fn commit_upload_as(
        &self,
        upload_id: &str,
        owner: Option<&str>,
        must_prove: bool,
    ) -> Result<CommitOutcome, BlobError> {
        check_upload_id(upload_id)?;
        let rec = self.load_owned_session(upload_id, owner).await?;
        let digest = rec.digest;
        let size = rec.size;
        let final_key = self.blob_key(&digest);
        let outcome = |deduplicated| CommitOutcome {
            digest,
            size,
            deduplicated,
        };

        if rec.complete {
            return match self.head(&final_key).await? {
                Some(_) => Ok(outcome(true)),
                // Committed once, then the blob was removed: the session is spent.
                None => Err(BlobError::UploadNotFound {
                    upload_id: upload_id.to_owned(),
                }),
            };
        }

        let layout = self.live_layout(upload_id, &rec).await?;

        if let Some(existing) = self.head(&final_key).await? {
            if must_prove {
                self.prove_session(upload_id, &rec, &layout).await?;
            }
            if existing.size != size {
                self.delete_session(upload_id, &rec).await;
                return Err(BlobError::SizeMismatch {
                    digest,
                    declared: size,
                    actual: existing.size,
                });
            }
            self.finish_session(upload_id, &rec, true).await;
            return Ok(outcome(true));
        }

        match layout {
            Layout::Local(dir) => {
                let blob = self.local_path(&final_key);
                let result = blocking(move || local::commit(&dir, size, digest, &blob))
                    .await?
                    .map_err(|e| e.into_blob(upload_id, digest, size));
                self.committed(upload_id, &rec, &final_key, result)
                    .await
                    .map(outcome)
            }
            Layout::Parts(upload) => self
                .commit_parts(upload_id, &rec, &upload)
                .await
                .map(outcome),
        }
    }

    /// Settles a `file://` commit: a digest mismatch deletes the session; another
    /// failure is dedup if a concurrent commit stored the blob meanwhile; success
    /// finishes the session. Returns whether the blob was deduplicated.
    async fn committed(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        final_key: &Path,
        result: Result<bool, BlobError>,
    ) -> Result<bool, BlobError> {
        let deduplicated = match result {
            Ok(deduplicated) => deduplicated,
            Err(e @ BlobError::DigestMismatch { .. }) => {
                self.delete_session(upload_id, rec).await;
                return Err(e);
            }
            Err(e @ BlobError::Incomplete { .. }) => return Err(e),
            Err(e) => {
                // A concurrent commit of the same session may have stored the blob
                // and removed the session's files under us.
                if self.head(final_key).await?.is_some() {
                    tracing::debug!(%upload_id, error = %e, "upload committed concurrently");
                    true
                } else {
                    return Err(e);
                }
            }
        };
        self.finish_session(upload_id, rec, false).await;
        tracing::info!(%upload_id, digest = %rec.digest, size = rec.size, deduplicated, "upload committed");
        Ok(deduplicated)
    }

    /// Commits a session's multipart upload: the recorded parts must chain from 0 to the
    /// size (a tail left at the end is put as the last part) and their last hash state
    /// must be the declared digest; then the upload is completed with exactly those
    /// parts. Returns whether the blob was deduplicated (a concurrent completion).
    async fn commit_parts(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        upload: &Upload,
    ) -> Result<bool, BlobError> {
        let mut chain = self.full_chain(upload_id, rec, Some(upload)).await?;
        if let Err(e) = chain_matches(&chain, rec.digest) {
            self.delete_session(upload_id, rec).await;
            return Err(e);
        }
        let ids = std::mem::take(&mut chain.ids);
        let parts = ids.len();
        tracing::debug!(%upload_id, size = rec.size, parts, "completing the multipart upload");
        match upload
            .store
            .complete_multipart(&upload.key, &upload.id, ids)
            .await
        {
            Ok(_) => {
                self.finish_session(upload_id, rec, false).await;
                tracing::info!(%upload_id, digest = %rec.digest, size = rec.size, parts, "upload committed");
                Ok(false)
            }
            Err(e) => {
                // A concurrent commit of this session completed it first (or a retried
                // completion succeeded before): the blob is there, verified.
                if self.head(&upload.key).await?.is_some() {
                    tracing::debug!(%upload_id, error = %e, "upload completed concurrently");
                    self.finish_session(upload_id, rec, false).await;
                    return Ok(true);
                }
                // The backend refused the recorded parts (another writer replaced one
                // after it was recorded), lost the upload, or was briefly unavailable: the
                // two cannot be told apart (both are `Generic`). A first failure keeps
                // the session, so a commit sent again after an outage completes it; a
                // second one means the parts will not complete: start again.
                let lost = matches!(e, object_store::Error::NotFound { .. });
                if !rec.completion_failed && !lost {
                    tracing::warn!(%upload_id, error = %e, "cannot complete the multipart upload; the next failure deletes the session");
                    let again = SessionRecord {
                        completion_failed: true,
                        ..rec.clone()
                    };
                    if let Err(w) = self.write_session(upload_id, &again).await {
                        tracing::warn!(%upload_id, error = %w, "cannot record the failed completion");
                    }
                    return Err(BlobError::storage(
                        "complete multipart upload",
                        &upload.key,
                        e,
                    ));
                }
                tracing::warn!(%upload_id, error = %e, "cannot complete the multipart upload again; deleting the session");
                self.delete_session(upload_id, rec).await;
                Err(BlobError::UploadChanged {
                    upload_id: upload_id.to_owned(),
                    detail: format!(
                        "its parts could not be completed ({e}); start the upload again"
                    ),
                })
            }
        }
    }

    /// The chain of a session's parts covering exactly its size. A tail at the end is
    /// hashed too and, with `put_tail` and when the bytes hash to the declared digest, put
    /// and recorded as the last part (otherwise its bytes are hashed only, and the chain's
    /// ids lack it). Short of the size: Incomplete,
    /// or UploadChanged when records past the chain show that another writer broke it.
    async fn full_chain(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        put_tail: Option<&Upload>,
    ) -> Result<Chain, BlobError> {
        let scan = self.scan_parts(upload_id, rec.size).await?;
        let tail = scan.tail_within(rec.size).filter(|len| *len > 0);
        let mut chain = scan.chain;
        let changed = |detail: String| BlobError::UploadChanged {
            upload_id: upload_id.to_owned(),
            detail,
        };
        let held = chain.end.saturating_add(tail.unwrap_or(0));
        if held < rec.size || chain.end > rec.size {
            if chain.broken {
                return Err(changed(format!(
                    "the recorded parts do not chain past offset {}: another writer of the session sent other bytes; resume from there",
                    chain.end
                )));
            }
            return Err(BlobError::Incomplete {
                upload_id: upload_id.to_owned(),
                committed: held.min(rec.size),
                size: rec.size,
            });
        }
        if chain.end == rec.size {
            return Ok(chain);
        }
        // A tail ends the blob: at most one part, read back once.
        let Some(bytes) = self.read_tail(upload_id, chain.end).await? else {
            return Err(changed(format!(
                "the tail at offset {} disappeared",
                chain.end
            )));
        };
        let len = bytes.len() as u64;
        if chain.end + len != rec.size {
            return Err(changed(format!(
                "the tail at offset {} holds {len} bytes, expected {}",
                chain.end,
                rec.size - chain.end
            )));
        }
        let hasher = hash_parts(vec![bytes.clone()], chain.hasher.clone()).await?;
        // A wrong digest is refused by the caller: no part for it.
        let matches = hasher.clone().finish() == rec.digest;
        if let Some(upload) = put_tail.filter(|_| matches) {
            let put = PartPut {
                upload_id: upload_id.to_owned(),
                upload: upload.clone(),
                index: chain.ids.len(),
                start: chain.end,
                bytes: vec![bytes],
                hasher: hasher.clone(),
            };
            let content_id = self.put_part(&put).await?;
            let prev = chain.last_id().map(str::to_owned);
            self.record_part(&put, content_id.clone(), prev).await?;
            chain.ids.push(PartId { content_id });
        }
        chain.end = rec.size;
        chain.hasher = hasher;
        Ok(chain)
    }

    /// The bytes of a session's tail at `offset`; `None` when there is none.
    async fn read_tail(&self, upload_id: &str, offset: u64) -> Result<Option<Bytes>, BlobError> {
        let key = self.session_dir(upload_id).join(parts::tail_name(offset));
        match super::retry_read("get", &key, || async {
            self.store.get(&key).await?.bytes().await
        })
        .await
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BlobError::storage("get", &key, e)),
        }
    }

    /// Lists a session's part records and tail, reads the records and follows their chain
    /// (records that would end past `size` are not the session's).
    async fn scan_parts(&self, upload_id: &str, size: u64) -> Result<PartsScan, BlobError> {
        let dir = self.session_dir(upload_id);
        let objects: Vec<ObjectMeta> = super::retry_read("list", &dir, || {
            self.store.list(Some(&dir)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| BlobError::storage("list", &dir, e))?;
        let mut names: Vec<(u64, u64, Path)> = Vec::new();
        let mut tails: Vec<(u64, u64)> = Vec::new();
        for meta in &objects {
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if let Some((offset, len)) = parts::parse_record_name(name) {
                if offset.saturating_add(len) <= size {
                    names.push((offset, len, meta.location.clone()));
                }
            } else if let Some(offset) = parts::parse_tail_name(name) {
                tails.push((offset, meta.size));
            }
        }
        names.sort_by_key(|(offset, len, _)| (*offset, *len));
        let records: Vec<(u64, u64, Option<PartRecord>)> = stream::iter(names)
            .map(|(offset, len, key)| async move {
                let bytes = super::retry_read("get", &key, || async {
                    self.store.get(&key).await?.bytes().await
                })
                .await;
                match bytes {
                    Ok(bytes) => Ok((offset, len, serde_json::from_slice(&bytes).ok())),
                    // Deleted by a concurrent commit: the chain stops there.
                    Err(object_store::Error::NotFound { .. }) => Ok((offset, len, None)),
                    Err(e) => Err(BlobError::storage("get", &key, e)),
                }
            })
            .buffered(RECORD_READS)
            .try_collect()
            .await?;
        let chain = parts::follow(&records);
        let tail = tails
            .iter()
            .find(|(offset, _)| *offset == chain.end)
            .map(|(_, len)| *len);
        Ok(PartsScan { chain, tail })
    }

    /// Puts a small JSON object of a session.
    async fn put_json<T: Serialize>(
        &self,
        upload_id: &str,
        key: &Path,
        value: &T,
    ) -> Result<(), BlobError> {
        let json = serde_json::to_vec(value).map_err(|source| BlobError::CorruptSession {
            upload_id: upload_id.to_owned(),
            source,
        })?;
        self.store
            .put(key, PutPayload::from(json))
            .await
            .map_err(|e| BlobError::storage("put", key, e))?;
        Ok(())
    }

    /// Aborts a session's multipart upload, if it has one (a missing one is fine).
    async fn abort_upload(&self, rec: &SessionRecord) {
        let (Some(store), Some(id)) = (&self.parts, &rec.multipart) else {
            return;
        };
        let key = self.blob_key(&rec.digest);
        match store.abort_multipart(&key, id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(multipart = %id, key = %key, error = %e, "cannot abort multipart upload")
            }
        }
    }

    /// On `file://`, the directory of a session written to one data file (every session
    /// there, except one holding segment objects from an older registry); `None` elsewhere.
    async fn data_file_session(
        &self,
        upload_id: &str,
    ) -> Result<Option<std::path::PathBuf>, BlobError> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        let dir = root.join(self.session_dir(upload_id).as_ref());
        let scan = blocking({
            let dir = dir.clone();
            move || local::scan(&dir)
        })
        .await?
        .map_err(|e| e.into_blob(upload_id, Digest::of(b""), 0))?;
        Ok((!scan.segments).then_some(dir))
    }

    /// The file of a key on a `file://` store.
    fn local_path(&self, key: &Path) -> std::path::PathBuf {
        self.local_root
            .clone()
            .unwrap_or_default()
            .join(key.as_ref())
    }

    /// Proves a complete session's bytes hash to its digest, from the hash state recorded
    /// as they were received (a mismatch deletes the session, as a commit would).
    /// Incomplete is FailedPrecondition.
    async fn prove_session(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        layout: &Layout,
    ) -> Result<(), BlobError> {
        let (size, digest) = (rec.size, rec.digest);
        let proved = match layout {
            Layout::Local(dir) => {
                // The recorded hash state covers exactly the bytes this session received.
                let dir = dir.clone();
                blocking(move || local::verified(&dir, size, digest))
                    .await?
                    .map_err(|e| e.into_blob(upload_id, digest, size))
            }
            Layout::Parts(_) => {
                chain_matches(&self.full_chain(upload_id, rec, None).await?, digest)
            }
        };
        if let Err(BlobError::DigestMismatch { .. }) = &proved {
            self.delete_session(upload_id, rec).await;
        }
        proved
    }

    /// A session of `owner` (another owner's is NotFound, as if it did not exist).
    async fn load_owned_session(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<SessionRecord, BlobError> {
        let rec = self.load_session(upload_id).await?;
        if rec.owner.as_deref() != owner {
            return Err(BlobError::UploadNotFound {
                upload_id: upload_id.to_owned(),
            });
        }
        Ok(rec)
    }

    /// Deletes upload sessions with no activity for `older_than` (aborting their multipart
    /// uploads), and leftover staging objects of older registries and index entries as
    /// old. Returns how many sessions were deleted.
    pub async fn expire_uploads(&self, older_than: Duration) -> Result<usize, BlobError> {
        let now = SystemTime::now();
        let is_old = |meta: &ObjectMeta| {
            now.duration_since(SystemTime::from(meta.last_modified))
                .unwrap_or_default()
                >= older_than
        };

        let uploads = self.prefix.clone().join("uploads");
        let listing = self
            .store
            .list_with_delimiter(Some(&uploads))
            .await
            .map_err(|e| BlobError::storage("list", &uploads, e))?;
        let mut expired = 0;
        for dir in listing.common_prefixes {
            let objects: Vec<ObjectMeta> = self
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| BlobError::storage("list", &dir, e))?;
            if !objects.iter().all(is_old) {
                continue;
            }
            let upload_id = dir.filename().unwrap_or_default().to_owned();
            if check_upload_id(&upload_id).is_ok() {
                match self.load_session(&upload_id).await {
                    Ok(rec) if !rec.complete => self.abort_upload(&rec).await,
                    Ok(_)
                    | Err(BlobError::UploadNotFound { .. } | BlobError::CorruptSession { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            self.delete_many(objects.into_iter().map(|m| m.location).collect())
                .await?;
            tracing::info!(%upload_id, "expired upload session");
            expired += 1;
        }

        // Staging objects lived only during a commit of an older registry: any as old as
        // ORPHAN_AGE (or the session TTL, if shorter) was left by a commit that died.
        let orphan_age = older_than.min(ORPHAN_AGE);
        let staging = self.prefix.clone().join("staging");
        let leftovers: Vec<ObjectMeta> = self
            .store
            .list(Some(&staging))
            .try_collect()
            .await
            .map_err(|e| BlobError::storage("list", &staging, e))?;
        let leftovers = leftovers.into_iter().filter(|m| {
            now.duration_since(SystemTime::from(m.last_modified))
                .unwrap_or_default()
                >= orphan_age
        });
        self.delete_many(leftovers.map(|m| m.location).collect())
            .await?;
        let removed = self.remove_temp_files(&TEMP_DIRS, orphan_age).await?;
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed half-written files of a killed commit or put"
            );
        }

        let index = self.prefix.clone().join("upload-index");
        let entries: Vec<ObjectMeta> = self
            .store
            .list(Some(&index))
            .try_collect()
            .await
            .map_err(|e| BlobError::storage("list", &index, e))?;
        for meta in entries.iter().filter(|m| is_old(m)) {
            let live = match self.read_index(&meta.location).await? {
                Some(upload_id) => self.head(&self.session_key(&upload_id)).await?.is_some(),
                None => false,
            };
            if !live {
                self.delete_quiet(&meta.location).await?;
            }
        }
        Ok(expired)
    }

    /// The sweep to run once when a registry starts: [`expire_uploads`](Self::expire_uploads)
    /// and, on a `file://` store, the half-written temporary files of blob puts that a
    /// killed process left (the periodic sweep does not walk `blobs/`, which holds every
    /// blob). Returns how many sessions were deleted.
    pub async fn sweep_at_start(&self, older_than: Duration) -> Result<usize, BlobError> {
        let expired = self.expire_uploads(older_than).await?;
        let removed = self
            .remove_temp_files(&["blobs"], older_than.min(ORPHAN_AGE))
            .await?;
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed half-written blob files of a killed put"
            );
        }
        Ok(expired)
    }

    /// On a `file://` store, deletes the temporary files object_store writes before a
    /// rename (`<key>#<n>`, never listed) under `dirs` that were last modified at least
    /// `older_than` ago. Returns how many were deleted.
    async fn remove_temp_files(
        &self,
        dirs: &[&str],
        older_than: Duration,
    ) -> Result<usize, BlobError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        let dirs: Vec<std::path::PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
        tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let mut removed = 0;
            let mut stack = dirs;
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(kind) = entry.file_type() else {
                        continue;
                    };
                    if kind.is_dir() {
                        stack.push(entry.path());
                        continue;
                    }
                    let name = entry.file_name();
                    if !is_temp_file(&name.to_string_lossy()) {
                        continue;
                    }
                    let old = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .map(|t| now.duration_since(t).unwrap_or_default() >= older_than)
                        .unwrap_or(false);
                    if old && std::fs::remove_file(entry.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
            removed
        })
        .await
        .map_err(|source| BlobError::Task { source })
    }

    /// Marks the session committed and removes its other objects and index entry (and,
    /// with `abort`, its multipart upload: the blob was stored by another). Failures are
    /// logged, not returned: the blob is stored, and expiry removes leftovers.
    async fn finish_session(&self, upload_id: &str, rec: &SessionRecord, abort: bool) {
        if abort {
            self.abort_upload(rec).await;
        }
        let done = SessionRecord {
            complete: true,
            ..rec.clone()
        };
        if let Err(e) = self.write_session(upload_id, &done).await {
            tracing::warn!(%upload_id, error = %e, "cannot mark upload session committed");
        }
        if let Err(e) = self.delete_session_objects(upload_id).await {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload parts");
        }
        self.delete_index_entry(upload_id, rec).await;
    }

    /// Deletes every object of a session and aborts its multipart upload (after a digest
    /// or size mismatch, or for a session that cannot continue). Best effort.
    async fn delete_session(&self, upload_id: &str, rec: &SessionRecord) {
        self.abort_upload(rec).await;
        if let Err(e) = self.delete_session_objects(upload_id).await {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload parts");
        }
        self.delete_index_entry(upload_id, rec).await;
        if let Err(e) = self.delete_quiet(&self.session_key(upload_id)).await {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload session");
        }
    }

    /// Removes the index entry for the session's digest and size if it names this session.
    async fn delete_index_entry(&self, upload_id: &str, rec: &SessionRecord) {
        let index = self.index_key(&rec.digest, rec.size, rec.owner.as_deref());
        let result = async {
            if self.read_index(&index).await?.as_deref() == Some(upload_id) {
                self.delete_quiet(&index).await?;
            }
            Ok::<_, BlobError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload index entry");
        }
    }

    /// Deletes every object of a session but its record (part records and tail; on
    /// `file://` the data file and its hash records; segments of an older registry).
    async fn delete_session_objects(&self, upload_id: &str) -> Result<(), BlobError> {
        let dir = self.session_dir(upload_id);
        let objects: Vec<ObjectMeta> = super::retry_read("list", &dir, || {
            self.store.list(Some(&dir)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| BlobError::storage("list", &dir, e))?;
        let keys = objects
            .into_iter()
            .map(|meta| meta.location)
            .filter(|key| key.filename() != Some("session.json"))
            .collect();
        self.delete_many(keys).await
    }

    /// Deletes objects in batches where the backend has them (S3 DeleteObjects); missing
    /// ones are fine.
    async fn delete_many(&self, keys: Vec<Path>) -> Result<(), BlobError> {
        let Some(first) = keys.first().cloned() else {
            return Ok(());
        };
        let mut results = self
            .store
            .delete_stream(stream::iter(keys.into_iter().map(Ok)).boxed());
        let mut failure = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(e) => Err(BlobError::storage("delete", &first, e)),
        }
    }

    /// Bytes durably received from offset 0: on `file://` the recorded stretches of the
    /// data file; otherwise the chained parts and the tail after them.
    async fn committed_offset(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        layout: &Layout,
    ) -> Result<u64, BlobError> {
        match layout {
            Layout::Local(dir) => {
                let dir = dir.clone();
                let scan = blocking(move || local::scan(&dir))
                    .await?
                    .map_err(|e| e.into_blob(upload_id, rec.digest, rec.size))?;
                Ok(contiguous_end(&scan.records, rec.size))
            }
            Layout::Parts(_) => {
                let scan = self.scan_parts(upload_id, rec.size).await?;
                Ok(scan.chain.end + scan.tail_within(rec.size).unwrap_or(0))
            }
        }
    }

    async fn load_session(&self, upload_id: &str) -> Result<SessionRecord, BlobError> {
        let key = self.session_key(upload_id);
        let not_found = || BlobError::UploadNotFound {
            upload_id: upload_id.to_owned(),
        };
        let bytes = super::retry_read("get", &key, || async {
            self.store.get(&key).await?.bytes().await
        })
        .await
        .map_err(|e| super::not_found_or(e, not_found, "get", &key))?;
        serde_json::from_slice(&bytes).map_err(|source| BlobError::CorruptSession {
            upload_id: upload_id.to_owned(),
            source,
        })
    }

    async fn write_session(&self, upload_id: &str, rec: &SessionRecord) -> Result<(), BlobError> {
        let key = self.session_key(upload_id);
        let json = serde_json::to_vec(rec).map_err(|source| BlobError::CorruptSession {
            upload_id: upload_id.to_owned(),
            source,
        })?;
        self.bookkeeping
            .put(&key, PutPayload::from(json))
            .await
            .map_err(|e| BlobError::storage("put", &key, e))?;
        Ok(())
    }

    /// The upload id an index entry names, if the entry exists and is well formed.
    async fn read_index(&self, key: &Path) -> Result<Option<String>, BlobError> {
        let bytes = super::retry_read("get", key, || async {
            self.store.get(key).await?.bytes().await
        })
        .await;
        match bytes {
            Ok(bytes) => {
                let id = String::from_utf8_lossy(&bytes).trim().to_owned();
                Ok(check_upload_id(&id).is_ok().then_some(id))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BlobError::storage("get", key, e)),
        }
    }

    fn session_dir(&self, upload_id: &str) -> Path {
        self.prefix.clone().join("uploads").join(upload_id)
    }

    fn session_key(&self, upload_id: &str) -> Path {
        self.session_dir(upload_id).join("session.json")
    }

    pub(super) fn index_key(&self, digest: &Digest, size: u64, owner: Option<&str>) -> Path {
        let name = match owner {
            None => format!("{}.{size}", digest.hex()),
            Some(owner) => format!("{}.{size}.{owner}", digest.hex()),
        };
        self.prefix.clone().join("upload-index").join(name.as_str())
    }
}

/// Whether a file name is one of object_store's temporary files: `<name>#<digits>`.
fn is_temp_file(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(base, n)| {
        !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Upload ids are `uuid::Uuid::simple` strings; anything else never names a session (and
/// never reaches a key).
fn check_upload_id(upload_id: &str) -> Result<(), BlobError> {
    let valid = upload_id.len() == 32
        && upload_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        Ok(())
    } else {
        Err(BlobError::InvalidUploadId {
            upload_id: upload_id.chars().take(100).collect(),
        })
    }
}

/// The end of the run of bytes covered from offset 0 by `segments` (sorted by offset),
/// capped at `size`. Segments may overlap when two writers shared a session.
pub(super) fn contiguous_end(segments: &[Segment], size: u64) -> u64 {
    let mut end = 0u64;
    for s in segments {
        if s.offset > end {
            break;
        }
        end = end.max(s.offset.saturating_add(s.len));
    }
    end.min(size)
}

/// Runs blocking filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| BlobError::Task { source })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, len: u64) -> Segment {
        Segment { offset, len }
    }

    #[test]
    fn contiguous_end_stops_at_gaps_and_tolerates_overlap() {
        assert_eq!(contiguous_end(&[], 10), 0);
        assert_eq!(contiguous_end(&[seg(0, 4), seg(4, 4)], 10), 8);
        assert_eq!(contiguous_end(&[seg(0, 4), seg(5, 4)], 10), 4);
        assert_eq!(contiguous_end(&[seg(1, 4)], 10), 0);
        assert_eq!(contiguous_end(&[seg(0, 6), seg(2, 6)], 10), 8);
        assert_eq!(contiguous_end(&[seg(0, 6), seg(2, 2), seg(6, 4)], 10), 10);
        assert_eq!(contiguous_end(&[seg(0, 20)], 10), 10);
    }

    #[test]
    fn take_front_splits_without_losing_bytes() {
        let mut buf: VecDeque<Bytes> = [&b"abc"[..], b"defg", b"h"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let front = take_front(&mut buf, 5);
        assert_eq!(front.concat(), b"abcde");
        let rest: Vec<u8> = buf.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(rest, b"fgh");
    }

    #[tokio::test]
    async fn a_paused_writer_holds_no_bytes_and_continues() {
        let store = BlobStore::from_url("memory://")
            .unwrap()
            .with_segment_size(1_000)
            .with_min_part_size(1_000);
        let bytes: Vec<u8> = (0..2_500u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = Digest::of(&bytes);
        let UploadStart::Session(s) = store.start_upload(digest, 2_500).await.unwrap() else {
            panic!("expected a session");
        };
        let mut w = store.upload_writer(&s.upload_id).await.unwrap();
        let mut at = 0;
        for piece in [1_300usize, 200, 600, 399] {
            w.write(at as u64, Bytes::copy_from_slice(&bytes[at..at + piece]))
                .await
                .unwrap();
            at += piece;
            assert_eq!(w.persist_buffered().await.unwrap(), at as u64);
            // Nothing waits in memory; the tail is in the store.
            assert!(w.buffer.is_empty(), "{at}");
            assert_eq!(w.buffered(), 0);
        }
        assert_eq!(
            w.parts.as_ref().map(|p| (p.end, p.unloaded)),
            Some((2_000, 499))
        );
        // The last byte: the tail is read back and put with it as the last part.
        w.write(2_499, Bytes::copy_from_slice(&bytes[2_499..]))
            .await
            .unwrap();
        assert_eq!(w.flush().await.unwrap(), 2_500);
        store.commit_upload(&s.upload_id).await.unwrap();
        assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    }

    #[test]
    fn temp_files_are_recognised() {
        assert!(is_temp_file("0123.4567#1"));
        assert!(is_temp_file("00000000000000000000#12"));
        for not in ["session.json", "abc#", "#1", "abc#x1", "abc"] {
            assert!(!is_temp_file(not), "{not}");
        }
    }

    #[test]
    fn upload_ids_are_checked() {
        assert!(check_upload_id(&uuid::Uuid::new_v4().simple().to_string()).is_ok());
        for bad in [
            "",
            "../x",
            "ABCDEF0123456789abcdef0123456789",
            "0123456789abcdef0123456789abcde/",
        ] {
            assert!(check_upload_id(bad).is_err(), "{bad}");
        }
    }
}
