//! Resumable uploads: sessions and segments kept in the object store, the chunk writer,
//! verified commit and promotion, and expiry of abandoned sessions.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload, WriteMultipart};
use patchport_core::{Digest, Hasher};
use serde::{Deserialize, Serialize};

use super::local;
use super::{BlobError, BlobStore, hash_parts};

/// Segments fetched ahead while a commit streams them.
const COMMIT_PREFETCH: usize = 2;

/// Multipart parts in flight at once while a commit writes.
const COMMIT_PARTS_IN_FLIGHT: usize = 2;

/// Smallest multipart part (S3 refuses parts under 5 MiB except the last).
const MIN_PART_SIZE: usize = 16 << 20;

/// S3 allows 10,000 parts; stay well below.
const MAX_PARTS: u64 = 9_000;

/// Running hashes kept in memory at most (about 200 bytes each).
const MAX_RUNNING_HASHES: usize = 10_000;

/// A staging object or half-written temporary file untouched this long belongs to no
/// live commit or put (those write continuously and last seconds to minutes), so the
/// expiry sweep removes it even when the session TTL is longer: what a registry killed
/// mid-commit leaves behind.
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
    /// True when the blob was already stored (another upload promoted it first).
    pub deduplicated: bool,
}

/// The stored record of a session, `uploads/<id>/session.json`.
#[derive(Debug, Serialize, Deserialize)]
struct SessionRecord {
    digest: Digest,
    size: u64,
    /// Seconds since the Unix epoch.
    created: u64,
    /// Set when the blob was promoted; the record then stays until expiry, so a retried
    /// commit answers the same instead of NotFound.
    #[serde(default)]
    complete: bool,
    /// Whose session it is (see [`BlobStore::start_upload_as`]); none for callers that
    /// see every blob. A session is only ever resumed, written or committed by its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

/// A segment of received bytes: `uploads/<id>/<offset>` holding `len` bytes (or, on
/// `file://`, a record of `len` durable bytes of the data file at `offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// Receives the chunks of one upload session, in order, and persists them in segments.
///
/// Holds at most one segment of data in memory (two on `file://`, where one segment is
/// written and hashed in the background while the next arrives; an error of that write
/// shows at the next write or flush, with its bytes buffered again). Chunks that were
/// written but not yet persisted are lost if the writer is dropped without
/// [`UploadWriter::flush`]; the client then resumes from the session's committed offset.
pub struct UploadWriter {
    store: BlobStore,
    upload_id: String,
    digest: Digest,
    size: u64,
    committed: u64,
    buffered: u64,
    buffer: VecDeque<Bytes>,
    /// On `file://`: the session directory (its data file takes the bytes) and the hash
    /// state at `committed`.
    local: Option<(std::path::PathBuf, Hasher)>,
    /// On `file://`: the segment being written in the background (its `in_flight` bytes
    /// are the first of `buffered`), giving back its parts and the hash state after them.
    pending: Option<PendingWrite>,
    in_flight: u64,
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

    /// Bytes durably persisted from offset 0 (buffered bytes not included).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Appends a chunk at `offset`, which must equal the committed plus the buffered
    /// bytes; a chunk that would end past the declared size is refused. Full segments
    /// are persisted as they fill. On a storage error the chunk stays buffered, so a
    /// later [`flush`](Self::flush) may still persist it.
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), BlobError> {
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
        let segment = self.store.segment_size as u64;
        while self.buffered - self.in_flight >= segment {
            self.persist(segment).await?;
        }
        Ok(())
    }

    /// Bytes received but not yet persisted (held in memory).
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Persists what is buffered as a segment now (a short one) and returns the durable
    /// committed offset: call it when the client pauses, so a stalled stream holds no
    /// data in memory.
    pub async fn persist_buffered(&mut self) -> Result<u64, BlobError> {
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
        self.persist_buffered().await
    }

    /// Puts the first `n` buffered bytes as the segment at the committed offset, feeding
    /// them to the session's running hash at the same time.
    async fn persist(&mut self, n: u64) -> Result<(), BlobError> {
        if self.local.is_some() {
            // One segment at a time: the next continues the hash state this one ends with.
            self.settle().await?;
            let parts = take_front(&mut self.buffer, n);
            let start = self.committed;
            let Some((dir, hasher)) = self.local.clone() else {
                return Ok(());
            };
            self.pending = Some(tokio::task::spawn_blocking(move || {
                let result = local::append(&dir, start, &parts, hasher);
                (parts, result)
            }));
            self.in_flight = n;
            return Ok(());
        }
        let parts = take_front(&mut self.buffer, n);
        let start = self.committed;
        let key = self.store.segment_key(&self.upload_id, start);
        let prior = if start == 0 {
            Some(Hasher::new())
        } else {
            self.store
                .hashers()
                .get(&self.upload_id)
                .filter(|h| h.len() == start)
                .cloned()
        };
        let payload: PutPayload = parts.iter().cloned().collect();
        let put = self.store.store.put(&key, payload);
        let hash = async {
            match prior {
                Some(h) => hash_parts(parts.clone(), h).await.ok(),
                None => None,
            }
        };
        let (put, hashed) = tokio::join!(put, hash);
        if let Err(e) = put {
            for part in parts.into_iter().rev() {
                self.buffer.push_front(part);
            }
            return Err(BlobError::storage("put", &key, e));
        }
        self.committed += n;
        self.buffered -= n;
        if let Some(h) = hashed {
            let mut hashers = self.store.hashers();
            // Abandoned sessions would otherwise accumulate; the map is only a shortcut.
            if hashers.len() >= MAX_RUNNING_HASHES && !hashers.contains_key(&self.upload_id) {
                hashers.clear();
            }
            hashers.insert(self.upload_id.clone(), h);
        }
        Ok(())
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
                    let committed = self.committed_offset(&upload_id, rec.size).await?;
                    tracing::debug!(%upload_id, %digest, committed, "resuming upload session");
                    return Ok(UploadStart::Session(UploadSession {
                        upload_id,
                        digest,
                        size,
                        committed,
                    }));
                }
                Ok(_)
                | Err(BlobError::UploadNotFound { .. } | BlobError::CorruptSession { .. }) => {}
                Err(e) => return Err(e),
            }
        }

        let upload_id = uuid::Uuid::new_v4().simple().to_string();
        let record = SessionRecord {
            digest,
            size,
            created: unix_now(),
            complete: false,
            owner: owner.map(str::to_owned),
        };
        self.write_session(&upload_id, &record).await?;
        self.store
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
            self.committed_offset(upload_id, rec.size).await?
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
        let dir = match rec.complete {
            false => self.data_file_session(upload_id).await?,
            true => None,
        };
        let (committed, local) = match dir {
            Some(dir) => {
                let (size, digest) = (rec.size, rec.digest);
                let (committed, hasher) = blocking({
                    let dir = dir.clone();
                    move || local::resume_point(&dir, size)
                })
                .await?
                .map_err(|e| e.into_blob(upload_id, digest, size))?;
                (committed, Some((dir, hasher)))
            }
            None => (
                self.upload_status_as(upload_id, owner).await?.committed,
                None,
            ),
        };
        Ok(UploadWriter {
            store: self.clone(),
            upload_id: upload_id.to_owned(),
            digest: rec.digest,
            size: rec.size,
            committed,
            buffered: 0,
            buffer: VecDeque::new(),
            local,
            pending: None,
            in_flight: 0,
        })
    }

    /// Verifies the session's bytes against the declared digest and size and promotes
    /// them to a blob. An incomplete upload is FailedPrecondition; a digest mismatch is
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
    /// only after this session's own bytes were read back and hashed to its digest: the
    /// upload is the caller's proof that it holds the bytes.
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

        if let Some(existing) = self.head(&final_key).await? {
            if must_prove {
                self.prove_session(upload_id, &rec).await?;
            }
            if existing.size != size {
                self.delete_session(upload_id, &rec).await;
                return Err(BlobError::SizeMismatch {
                    digest,
                    declared: size,
                    actual: existing.size,
                });
            }
            self.finish_session(upload_id, &rec).await;
            return Ok(outcome(true));
        }

        if let Some(dir) = self.data_file_session(upload_id).await? {
            let blob = self.local_path(&final_key);
            let result = blocking(move || local::commit(&dir, size, digest, &blob))
                .await?
                .map_err(|e| e.into_blob(upload_id, digest, size));
            return self
                .committed(upload_id, &rec, &final_key, result)
                .await
                .map(outcome);
        }

        let segments = self.list_segments(upload_id).await?;
        let committed = contiguous_end(&segments, size);
        if committed < size {
            return Err(BlobError::Incomplete {
                upload_id: upload_id.to_owned(),
                committed,
                size,
            });
        }

        // The uninterrupted case knows the digest already: refuse a mismatch before
        // moving any bytes. A match is not trusted; the bytes are hashed as they move.
        let running = self
            .hashers()
            .get(upload_id)
            .filter(|h| h.len() == size)
            .cloned();
        if let Some(running) = running {
            let actual = running.finish();
            if actual != digest {
                self.delete_session(upload_id, &rec).await;
                return Err(BlobError::DigestMismatch {
                    declared: digest,
                    actual,
                });
            }
        }

        let plan: Vec<(Path, Range<u64>)> = read_plan(upload_id, &segments, size)?
            .into_iter()
            .map(|(offset, range)| (self.segment_key(upload_id, offset), range))
            .collect();
        let result = if size <= self.segment_size as u64 {
            self.commit_small(upload_id, &rec, &plan, &final_key).await
        } else {
            self.commit_large(upload_id, &rec, &plan, &final_key).await
        };
        self.committed(upload_id, &rec, &final_key, result)
            .await
            .map(outcome)
    }

    /// Settles a promotion attempt: a digest mismatch deletes the session; another
    /// failure is dedup if a concurrent commit promoted the blob meanwhile; success
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
                // A concurrent commit of the same session may have promoted the blob
                // and removed the segments under us.
                if self.head(final_key).await?.is_some() {
                    tracing::debug!(%upload_id, error = %e, "upload promoted concurrently");
                    true
                } else {
                    return Err(e);
                }
            }
        };
        self.finish_session(upload_id, rec).await;
        tracing::info!(%upload_id, digest = %rec.digest, size = rec.size, deduplicated, "upload committed");
        Ok(deduplicated)
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

    /// Reads a complete session's bytes back and checks they hash to its digest (a
    /// mismatch deletes the session, as a commit would). Incomplete is FailedPrecondition.
    async fn prove_session(&self, upload_id: &str, rec: &SessionRecord) -> Result<(), BlobError> {
        if let Some(dir) = self.data_file_session(upload_id).await? {
            // The recorded hash state covers exactly the bytes this session received.
            let (size, digest) = (rec.size, rec.digest);
            let proved = blocking(move || local::verified(&dir, size, digest))
                .await?
                .map_err(|e| e.into_blob(upload_id, digest, size));
            if let Err(BlobError::DigestMismatch { .. }) = &proved {
                self.delete_session(upload_id, rec).await;
            }
            return proved;
        }
        let segments = self.list_segments(upload_id).await?;
        let committed = contiguous_end(&segments, rec.size);
        if committed < rec.size {
            return Err(BlobError::Incomplete {
                upload_id: upload_id.to_owned(),
                committed,
                size: rec.size,
            });
        }
        let plan: Vec<(Path, Range<u64>)> = read_plan(upload_id, &segments, rec.size)?
            .into_iter()
            .map(|(offset, range)| (self.segment_key(upload_id, offset), range))
            .collect();
        let mut pieces = stream::iter(plan)
            .map(|(key, range)| async move { self.fetch(upload_id, &key, range).await })
            .buffered(COMMIT_PREFETCH);
        let mut hasher = Hasher::new();
        while let Some(piece) = pieces.next().await {
            hasher = hash_parts(vec![piece?], hasher).await?;
        }
        check_received(upload_id, hasher.len(), rec.size)?;
        let actual = hasher.finish();
        if actual != rec.digest {
            self.delete_session(upload_id, rec).await;
            return Err(BlobError::DigestMismatch {
                declared: rec.digest,
                actual,
            });
        }
        Ok(())
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

    /// Deletes upload sessions with no activity for `older_than` (and leftover staging
    /// objects and index entries as old). Returns how many sessions were deleted.
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
            self.delete_many(objects.into_iter().map(|m| m.location).collect())
                .await?;
            if let Some(upload_id) = dir.filename() {
                self.hashers().remove(upload_id);
                tracing::info!(%upload_id, "expired upload session");
            }
            expired += 1;
        }

        // Staging objects live only during a commit: any as old as ORPHAN_AGE (or the
        // session TTL, if shorter) was left by a commit that died.
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

    /// A blob of at most one segment: read it into memory, verify, put create-only.
    async fn commit_small(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        plan: &[(Path, Range<u64>)],
        final_key: &Path,
    ) -> Result<bool, BlobError> {
        let mut bytes = BytesMut::with_capacity(usize::try_from(rec.size).unwrap_or(0));
        for (key, range) in plan {
            bytes.extend_from_slice(&self.fetch(upload_id, key, range.clone()).await?);
        }
        let bytes = bytes.freeze();
        check_received(upload_id, bytes.len() as u64, rec.size)?;
        let actual = hash_parts(vec![bytes.clone()], Hasher::new())
            .await?
            .finish();
        if actual != rec.digest {
            return Err(BlobError::DigestMismatch {
                declared: rec.digest,
                actual,
            });
        }
        self.put_create(final_key, bytes).await
    }

    /// A larger blob: stream the segments into a multipart upload while hashing them,
    /// complete it only if the hash matches, then promote it.
    async fn commit_large(
        &self,
        upload_id: &str,
        rec: &SessionRecord,
        plan: &[(Path, Range<u64>)],
        final_key: &Path,
    ) -> Result<bool, BlobError> {
        let direct = rec.size > self.max_copy_size;
        let target = if direct {
            final_key.clone()
        } else {
            let attempt = uuid::Uuid::new_v4().simple().to_string();
            self.prefix
                .clone()
                .join("staging")
                .join(format!("{upload_id}.{attempt}"))
        };
        let upload = self
            .store
            .put_multipart(&target)
            .await
            .map_err(|e| BlobError::storage("start multipart upload", &target, e))?;
        let part_size = self
            .segment_size
            .max(MIN_PART_SIZE)
            .max(usize::try_from(rec.size.div_ceil(MAX_PARTS)).unwrap_or(usize::MAX));
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);

        let streamed: Result<Digest, BlobError> = async {
            let mut pieces = stream::iter(plan.iter().cloned())
                .map(|(key, range)| async move { self.fetch(upload_id, &key, range).await })
                .buffered(COMMIT_PREFETCH);
            let mut hasher = Hasher::new();
            while let Some(piece) = pieces.next().await {
                let piece = piece?;
                hasher = hash_parts(vec![piece.clone()], hasher).await?;
                writer
                    .wait_for_capacity(COMMIT_PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| BlobError::storage("write part", &target, e))?;
                writer.put(piece);
            }
            check_received(upload_id, hasher.len(), rec.size)?;
            Ok(hasher.finish())
        }
        .await;

        let actual = match streamed {
            Ok(actual) => actual,
            Err(e) => {
                abort_quietly(writer, &target).await;
                return Err(e);
            }
        };
        if actual != rec.digest {
            abort_quietly(writer, &target).await;
            return Err(BlobError::DigestMismatch {
                declared: rec.digest,
                actual,
            });
        }
        writer
            .finish()
            .await
            .map_err(|e| BlobError::storage("complete multipart upload", &target, e))?;
        if direct {
            return Ok(false);
        }
        let promoted = self.promote(&target, final_key).await;
        if let Err(e) = self.delete_quiet(&target).await {
            tracing::warn!(error = %e, key = %target, "cannot delete staging object");
        }
        promoted
    }

    /// Promotes a verified staging object create-only. Returns whether the blob existed.
    async fn promote(&self, staging: &Path, final_key: &Path) -> Result<bool, BlobError> {
        match self.store.copy_if_not_exists(staging, final_key).await {
            Ok(()) => Ok(false),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(true),
            Err(
                e @ (object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }),
            ) => {
                // Safe without the precondition: the staged bytes are verified and the
                // key is their digest, so a racing writer copies identical bytes.
                tracing::debug!(key = %final_key, error = %e, "copy-if-not-exists unsupported, head then copy");
                if self.head(final_key).await?.is_some() {
                    return Ok(true);
                }
                self.store
                    .copy(staging, final_key)
                    .await
                    .map_err(|e| BlobError::storage("copy", final_key, e))?;
                Ok(false)
            }
            Err(e) => Err(BlobError::storage("copy", final_key, e)),
        }
    }

    /// Reads `range` of a segment, checking that it is all there.
    async fn fetch(
        &self,
        upload_id: &str,
        key: &Path,
        range: Range<u64>,
    ) -> Result<Bytes, BlobError> {
        let want = range.end - range.start;
        let changed = |detail: String| BlobError::UploadChanged {
            upload_id: upload_id.to_owned(),
            detail,
        };
        let bytes = match super::retry_read("get", key, || self.store.get_range(key, range.clone()))
            .await
        {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(changed(format!("segment {key} disappeared")));
            }
            Err(e) => return Err(BlobError::storage("get", key, e)),
        };
        if bytes.len() as u64 != want {
            return Err(changed(format!(
                "segment {key} returned {} bytes, expected {want}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Marks the session committed and removes its segments and index entry. Failures
    /// are logged, not returned: the blob is promoted, and expiry removes leftovers.
    async fn finish_session(&self, upload_id: &str, rec: &SessionRecord) {
        self.hashers().remove(upload_id);
        let done = SessionRecord {
            digest: rec.digest,
            size: rec.size,
            created: rec.created,
            complete: true,
            owner: rec.owner.clone(),
        };
        if let Err(e) = self.write_session(upload_id, &done).await {
            tracing::warn!(%upload_id, error = %e, "cannot mark upload session committed");
        }
        if let Err(e) = self.delete_segments(upload_id).await {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload segments");
        }
        self.delete_index_entry(upload_id, rec).await;
    }

    /// Deletes every object of a session (after a digest or size mismatch). Best effort.
    async fn delete_session(&self, upload_id: &str, rec: &SessionRecord) {
        self.hashers().remove(upload_id);
        if let Err(e) = self.delete_segments(upload_id).await {
            tracing::warn!(%upload_id, error = %e, "cannot delete upload segments");
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

    /// Deletes a session's bytes: every object of it but its record (segments; on
    /// `file://` the data file and its hash records).
    async fn delete_segments(&self, upload_id: &str) -> Result<(), BlobError> {
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

    async fn committed_offset(&self, upload_id: &str, size: u64) -> Result<u64, BlobError> {
        if let Some(dir) = self.data_file_session(upload_id).await? {
            let scan = blocking(move || local::scan(&dir))
                .await?
                .map_err(|e| e.into_blob(upload_id, Digest::of(b""), size))?;
            return Ok(contiguous_end(&scan.records, size));
        }
        Ok(contiguous_end(&self.list_segments(upload_id).await?, size))
    }

    /// The session's segments, by offset.
    async fn list_segments(&self, upload_id: &str) -> Result<Vec<Segment>, BlobError> {
        let dir = self.session_dir(upload_id);
        let objects: Vec<ObjectMeta> = super::retry_read("list", &dir, || {
            self.store.list(Some(&dir)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| BlobError::storage("list", &dir, e))?;
        let mut segments: Vec<Segment> = objects
            .iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Some(Segment {
                    offset: name.parse().ok()?,
                    len: meta.size,
                })
            })
            .collect();
        segments.sort_by_key(|s| s.offset);
        Ok(segments)
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
        self.store
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

    pub(super) fn segment_key(&self, upload_id: &str, offset: u64) -> Path {
        self.session_dir(upload_id).join(format!("{offset:020}"))
    }

    pub(super) fn index_key(&self, digest: &Digest, size: u64, owner: Option<&str>) -> Path {
        let name = match owner {
            None => format!("{}.{size}", digest.hex()),
            Some(owner) => format!("{}.{size}.{owner}", digest.hex()),
        };
        self.prefix.clone().join("upload-index").join(name.as_str())
    }
}

async fn abort_quietly(writer: WriteMultipart, target: &Path) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(error = %e, key = %target, "cannot abort multipart upload");
    }
}

fn check_received(upload_id: &str, received: u64, size: u64) -> Result<(), BlobError> {
    if received == size {
        Ok(())
    } else {
        Err(BlobError::UploadChanged {
            upload_id: upload_id.to_owned(),
            detail: format!("read {received} bytes, expected {size}"),
        })
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

/// Which byte range of which segment (by offset) to read, in order, to get bytes `0..size`.
fn read_plan(
    upload_id: &str,
    segments: &[Segment],
    size: u64,
) -> Result<Vec<(u64, Range<u64>)>, BlobError> {
    let mut plan = Vec::new();
    let mut pos = 0u64;
    for s in segments {
        if pos >= size {
            break;
        }
        let seg_end = s.offset.saturating_add(s.len).min(size);
        if seg_end <= pos {
            continue;
        }
        if s.offset > pos {
            break;
        }
        plan.push((s.offset, (pos - s.offset)..(seg_end - s.offset)));
        pos = seg_end;
    }
    if pos < size {
        return Err(BlobError::UploadChanged {
            upload_id: upload_id.to_owned(),
            detail: format!("segments cover {pos} of {size} bytes"),
        });
    }
    Ok(plan)
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
