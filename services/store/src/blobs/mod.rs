//! The content-addressed blob store: sha256-keyed blobs in an `object_store` (`file://`,
//! `memory://`, `s3://`), resumable chunked uploads, ranged streaming reads.
//!
//! A read streams one ranged GET, except on a store with read concurrency above 1 (the
//! registry's `--blob-read-concurrency`, for S3 where one connection streams only some
//! 50-100 MB/s; off by default: on the local S3 servers we measure against it gained
//! nothing, and moto reads the whole object for every ranged GET, see
//! `bench/transfer/README.md`): a read longer than two ranges is fetched in ranges of
//! [`READ_RANGE_SIZE`], that many GETs in flight, and yielded in order. Ranges are
//! buffered whole, at most concurrency of them beyond what the stream has yielded, so such
//! a read holds at most concurrency + 1 ranges in memory however slowly it is consumed:
//! 40 MiB with 4 in flight.
//!
//! Layout under the store's prefix:
//!
//! ```text
//! blobs/sha256/<ab>/<64 hex>              a verified blob; its existence is what counts
//! uploads/<id>/session.json               an upload session: digest, size, created,
//!                                         complete; on memory:// and s3:// the id and part
//!                                         size of its multipart upload
//! uploads/<id>/<offset, 20 digits>.<len>.part
//!                                         memory://, s3://: a part of the multipart upload
//!                                         was put; its content id, the previous part's,
//!                                         the sha256 state after it (see `parts.rs`)
//! uploads/<id>/<offset, 20 digits>.tail   memory://, s3://: bytes received after the last
//!                                         part, too few for a part (a paused stream)
//! uploads/<id>/data                       file:// only: the bytes received, at their offsets
//! uploads/<id>/<offset, 20 digits>.<len>.state
//!                                         file:// only: bytes offset..offset+len of `data`
//!                                         are durable; the sha256 state after them
//! upload-index/<64 hex>.<size>            the id of the open session for a digest and size
//! ```
//!
//! Every piece of upload state lives in the object store, so an upload survives a
//! registry restart and can continue on another replica. A blob key only ever appears
//! after the bytes were hashed and matched the declared digest and size.
//!
//! On `file://` every byte is written once: the session's data file takes the bytes, each
//! durable stretch is recorded with the hash state after it (the bytes fsynced first), and
//! commit checks the last recorded state against the digest, then hard-links the data file
//! to its blob key (create-only: an existing blob is dedup). No byte is read back. The
//! rules that keep the recorded state true to the file's bytes are in `local.rs`.
//!
//! On `file://` only what a blob is made of is fsynced: a session's data before each hash
//! record that covers it, and the blob's directory entry at commit. The bookkeeping
//! (`session.json`, index entries, hash records) is written atomically (a temporary file
//! renamed) but not fsynced: it describes progress, and the data it describes is durable
//! before it is written, so a machine crash can lose some of it (an upload then resumes
//! from an earlier record, or starts again; an empty record a crash leaves is ignored) but
//! never make it claim bytes the disk does not hold. A blob is durable when its commit
//! answers. (Fsyncing the bookkeeping as well cost about a dozen more fsyncs per blob:
//! `bench/README.md` has the counts before and after.)
//!
//! On `memory://` and `s3://` every byte is written once too, into one multipart upload
//! to the blob's final key that the session starts. Each part is hashed as it fills,
//! continuing the hash state of the part before it, put while the next ones arrive (up
//! to [`PARTS_IN_FLIGHT`] at once), and recorded once it and the part before it are; a
//! stretch too short for a part (S3 refuses non-last parts under 5 MiB) waits in a tail
//! object, which a later writer loads and sends as the start of the next part. Commit
//! checks that the records chain from 0 to the size and that the last state is the
//! declared digest, then completes the upload with exactly the recorded parts' ids: the
//! backend checks each against the part it stores (S3: the ETag, and the SHA-256
//! checksum, which `from_url` enables), so the object is exactly the bytes that were
//! hashed, and the key appears only at completion. A blob already stored at commit is
//! dedup (the upload is aborted); the completion itself is not create-only: a racing
//! completion of the same digest writes identical verified bytes. No byte is read back,
//! except a paused stream's tail (less than one part) when the upload continues or commits.
//!
//! Failures of the backend, and what is retried where:
//!
//! - Idempotent reads (head, get, ranged get, list, and the rest of a read stream that
//!   broke off) are retried here, [`READ_ATTEMPTS`] attempts in all with a doubling
//!   backoff from [`READ_BACKOFF`], when the error is transient (`object_store`'s
//!   `Generic`: network, HTTP server and IO failures; its S3 client has already retried
//!   those requests itself). A read stream resumes from the byte it had reached; a read
//!   fetched in ranges retries and resumes each range on its own.
//! - Writes (parts, records, tails, session puts) are not retried here: the request fails
//!   with [`BlobErrorKind::Unavailable`] and nothing is completed, and the client's
//!   resumable upload asks for the committed offset and resends from there (a commit is
//!   idempotent and can simply be sent again). A completion of a multipart upload that
//!   fails (after the S3 client's own retries) with no blob stored is Unavailable the
//!   first time, the session kept so that the commit sent again completes it; a second
//!   failure, or an upload the backend lost, deletes the session
//!   ([`BlobErrorKind::FailedPrecondition`]): the backend refused the parts, so the client
//!   starts the upload again.
//! - Anything else (NotFound, PermissionDenied, a precondition) is never retried.
//!
//! Must never know: gRPC, the metadata database, tensor formats.

mod error;
mod local;
mod memory;
mod parts;
mod upload;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutPayload,
};
use patchport_core::{Digest, Hasher};

pub use error::{BlobError, BlobErrorKind};
pub use memory::MemoryParts;
pub use upload::{
    CommitOutcome, ORPHAN_AGE, PARTS_IN_FLIGHT, UploadSession, UploadStart, UploadWriter,
};

/// Default size of the stretches an upload is persisted in: a part of its multipart
/// upload (at least [`S3_MIN_PART_SIZE`]), or a hash record of a `file://` data file.
pub const DEFAULT_SEGMENT_SIZE: usize = 16 << 20;

/// S3 refuses parts under 5 MiB, except the last; the default smallest part everywhere.
pub const S3_MIN_PART_SIZE: usize = 5 << 20;

/// S3 allows 10,000 parts; parts are made large enough to stay below this many.
pub const MAX_PARTS: u64 = 9_000;

/// The largest chunk a [`BlobStore::read`] stream yields.
pub const READ_CHUNK_SIZE: usize = 1 << 20;

/// The size of the ranges a read is fetched in when the store reads with concurrency
/// (see [`BlobStore::with_read_concurrency`]).
pub const READ_RANGE_SIZE: usize = 8 << 20;

/// Attempts of an idempotent backend read before a transient error is returned.
pub const READ_ATTEMPTS: u32 = 3;

/// Backoff before the second attempt of a read; doubled before each further one.
pub const READ_BACKOFF: Duration = Duration::from_millis(50);

/// Heads in flight at once in [`BlobStore::find_missing`].
const FIND_MISSING_CONCURRENCY: usize = 32;

/// Buffers up to this size are hashed on the async thread; larger ones on the blocking pool.
const INLINE_HASH_MAX: usize = 256 << 10;

const SUPPORTED_URLS: &str =
    "supported: file:///absolute/path, file://relative/path, memory://, s3://bucket[/prefix]";

/// A content-addressed blob store over an `object_store` backend. Cheap to clone; clones
/// share the backend.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The multipart uploads of `store` (the same backend): uploads on every store but
    /// `file://` are written through them (see the module doc). None: no uploads
    /// (except on `file://`).
    parts: Option<Arc<dyn MultipartStore>>,
    prefix: Path,
    segment_size: usize,
    min_part_size: usize,
    /// The directory of a `file://` store: uploads write their session's data file there
    /// directly (see the module doc), and its half-written temporary files (a process
    /// killed mid-put or mid-commit leaves `<key>#<n>`) are invisible to listing, so the
    /// expiry sweep finds them on disk.
    local_root: Option<PathBuf>,
    /// Where upload bookkeeping is written (session records, index entries): `store`,
    /// except on `file://`, where it is the same directory without fsync (see the module
    /// doc: what it holds describes progress, never the bytes of a blob).
    bookkeeping: Arc<dyn ObjectStore>,
    /// Ranged GETs one read keeps in flight; 1: one stream.
    read_concurrency: usize,
    /// The ranges a read with concurrency is fetched in.
    read_range_size: usize,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix.as_ref())
            .field("segment_size", &self.segment_size)
            .field("min_part_size", &self.min_part_size)
            .field("multipart", &self.parts.is_some())
            .field("read_concurrency", &self.read_concurrency)
            .field("read_range_size", &self.read_range_size)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// A blob store over `store`, keeping every key under `prefix` (may be empty). It
    /// takes no uploads (they need [`new_multipart`](Self::new_multipart), or a
    /// `file://` store from [`from_url`](Self::from_url)).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        Self {
            bookkeeping: store.clone(),
            store,
            parts: None,
            prefix,
            segment_size: DEFAULT_SEGMENT_SIZE,
            min_part_size: S3_MIN_PART_SIZE,
            local_root: None,
            read_concurrency: 1,
            read_range_size: READ_RANGE_SIZE,
        }
    }

    /// A blob store over `store` whose uploads are written as multipart uploads through
    /// `parts`, which must be the same backend (S3: the same `AmazonS3`; in memory: a
    /// [`MemoryParts`] over `store`).
    pub fn new_multipart(
        store: Arc<dyn ObjectStore>,
        parts: Arc<dyn MultipartStore>,
        prefix: Path,
    ) -> Self {
        Self {
            parts: Some(parts),
            ..Self::new(store, prefix)
        }
    }

    /// Opens a blob store from a url:
    ///
    /// - `file:///absolute/path` (or `file://relative/path`): a directory, created if missing;
    /// - `memory://`: a fresh in-process store (tests);
    /// - `s3://bucket[/prefix]`: credentials and settings from the `AWS_*` environment
    ///   (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT` for S3-compatible servers, which then get
    ///   path-style requests, and plain http when the endpoint is `http://`; `AWS_REGION`
    ///   defaults to us-east-1; `AWS_COPY_IF_NOT_EXISTS` and `AWS_CONDITIONAL_PUT` as in
    ///   `object_store`).
    pub fn from_url(url: &str) -> Result<Self, BlobError> {
        let invalid = |reason: String| BlobError::InvalidUrl {
            url: url.chars().take(200).collect(),
            reason,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(format!("missing scheme; {SUPPORTED_URLS}")));
        };
        match scheme {
            "file" => {
                let dir = if rest.starts_with('/') || rest.starts_with("localhost/") {
                    url::Url::parse(url)
                        .ok()
                        .and_then(|u| u.to_file_path().ok())
                        .ok_or_else(|| invalid("not a valid file path".to_owned()))?
                } else if rest.is_empty() {
                    return Err(invalid("missing directory".to_owned()));
                } else {
                    PathBuf::from(rest)
                };
                std::fs::create_dir_all(&dir).map_err(|source| BlobError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
                let local = |fsync: bool| {
                    LocalFileSystem::new_with_prefix(&dir)
                        .map(|fs| fs.with_automatic_cleanup(true).with_fsync(fsync))
                        .map_err(|source| BlobError::Configure {
                            url: url.to_owned(),
                            source,
                        })
                };
                let mut store = Self::new(Arc::new(local(true)?), Path::default());
                store.bookkeeping = Arc::new(local(false)?);
                store.local_root = Some(dir);
                Ok(store)
            }
            "memory" => {
                if !rest.trim_matches('/').is_empty() {
                    return Err(invalid("memory:// takes no host or path".to_owned()));
                }
                let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
                let parts = Arc::new(MemoryParts::new(objects.clone()));
                Ok(Self::new_multipart(objects, parts, Path::default()))
            }
            "s3" => {
                let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
                let bucket = parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
                    invalid("missing bucket: expected s3://bucket[/prefix]".to_owned())
                })?;
                let prefix = Path::parse(parsed.path().trim_matches('/'))
                    .map_err(|e| invalid(format!("invalid key prefix: {e}")))?;
                let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
                    builder = builder.with_region("us-east-1");
                }
                // Parts carry their SHA-256, which S3 checks again at completion: the
                // completed object is bound to the hashed parts by SHA-256, not only by
                // their (MD5) ETags. Free while payloads are signed (the same digest).
                if env("AWS_CHECKSUM_ALGORITHM").is_none() {
                    builder = builder.with_checksum_algorithm(Checksum::SHA256);
                }
                let endpoint = env("AWS_ENDPOINT_URL_S3")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .or_else(|| env("AWS_ENDPOINT"));
                if let Some(endpoint) = endpoint {
                    if env("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() {
                        builder = builder.with_virtual_hosted_style_request(false);
                    }
                    if endpoint.starts_with("http://") && env("AWS_ALLOW_HTTP").is_none() {
                        builder = builder.with_allow_http(true);
                    }
                }
                let s3 = Arc::new(builder.build().map_err(|source| BlobError::Configure {
                    url: url.to_owned(),
                    source,
                })?);
                Ok(Self::new_multipart(s3.clone(), s3, prefix))
            }
            other => Err(invalid(format!(
                "unsupported scheme {:?}; {SUPPORTED_URLS}",
                other.chars().take(20).collect::<String>()
            ))),
        }
    }

    /// Sets the size of upload segments (default 16 MiB; at least 1 byte): the stretch a
    /// `file://` upload records at once, and the smallest part of a multipart upload. A
    /// writer holds at most one segment (or part) in memory.
    pub fn with_segment_size(mut self, bytes: usize) -> Self {
        self.segment_size = bytes.max(1);
        self
    }

    /// Sets the smallest part of a multipart upload (default and on S3: 5 MiB, which S3
    /// requires of every part but the last; at least 1 byte). Tests lower it on
    /// `memory://`. A session keeps the part size it started with.
    pub fn with_min_part_size(mut self, bytes: usize) -> Self {
        self.min_part_size = bytes.max(1);
        self
    }

    /// Sets how many ranged GETs one [`read`](Self::read) keeps in flight (at least 1).
    /// Default 1, one stream per read. Above 1, a read longer than two ranges is fetched
    /// in ranges (see [`with_read_range_size`](Self::with_read_range_size)): for S3,
    /// where one connection's throughput is the limit.
    pub fn with_read_concurrency(mut self, n: usize) -> Self {
        self.read_concurrency = n.max(1);
        self
    }

    /// Sets the size of the ranges a read with concurrency is fetched in (default
    /// [`READ_RANGE_SIZE`]; at least 1 byte). Tests lower it.
    pub fn with_read_range_size(mut self, bytes: usize) -> Self {
        self.read_range_size = bytes.max(1);
        self
    }

    /// Whether the blob is stored.
    pub async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(self.size(digest).await?.is_some())
    }

    /// The size of a stored blob, `None` if it is not stored.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        Ok(self.head(&self.blob_key(digest)).await?.map(|m| m.size))
    }

    /// The digests of `digests` that are not stored, each once, in input order.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, BlobError> {
        let mut seen = HashSet::with_capacity(digests.len());
        let unique: Vec<Digest> = digests
            .iter()
            .copied()
            .filter(|d| seen.insert(*d))
            .collect();
        stream::iter(unique)
            .map(|d| async move { Ok::<_, BlobError>((d, self.contains(&d).await?)) })
            .buffered(FIND_MISSING_CONCURRENCY)
            .try_filter_map(|(d, present)| async move { Ok((!present).then_some(d)) })
            .try_collect()
            .await
    }

    /// Stores small bytes the server produced itself (manifests, composed headers): hashes
    /// them and puts them create-only; an existing blob is dedup. Returns the digest.
    pub async fn put_bytes(&self, bytes: Bytes) -> Result<Digest, BlobError> {
        let digest = hash_parts(vec![bytes.clone()], Hasher::new())
            .await?
            .finish();
        let key = self.blob_key(&digest);
        // A stored blob of this digest and size holds these bytes: no write (nor its
        // fsync) for the configs and headers that many ports share.
        let stored = self
            .head(&key)
            .await?
            .is_some_and(|m| m.size == bytes.len() as u64);
        let deduplicated = stored || self.put_create(&key, bytes).await?;
        tracing::debug!(%digest, deduplicated, "put blob");
        Ok(digest)
    }

    /// Streams `len` bytes of a blob from `offset` (`None`: to the end; a length past the
    /// end is clamped), in chunks of at most [`READ_CHUNK_SIZE`]. An offset past the end
    /// is InvalidArgument; an offset equal to the size yields nothing.
    ///
    /// With read concurrency n above 1 (see
    /// [`with_read_concurrency`](Self::with_read_concurrency)), a read longer than two
    /// ranges is fetched range by range, up to n GETs in flight, and yielded in order.
    /// Ranges are buffered whole, at most n beyond what the stream has yielded: the read
    /// holds at most n + 1 ranges in memory however slowly it is consumed. Otherwise one
    /// GET streams.
    pub async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
        let key = self.blob_key(digest);
        let size = self
            .head(&key)
            .await?
            .ok_or(BlobError::BlobNotFound { digest: *digest })?
            .size;
        if offset > size {
            return Err(BlobError::OffsetPastEnd {
                digest: *digest,
                offset,
                size,
            });
        }
        let end = len.map_or(size, |l| offset.saturating_add(l).min(size));
        if end == offset {
            return Ok(stream::empty().boxed());
        }
        let range = self.read_range_size as u64;
        let in_ranges = self.read_concurrency > 1 && end - offset > range.saturating_mul(2);
        let first_end = if in_ranges { offset + range } else { end };
        let first = open_range(&self.store, &key, offset, first_end)
            .await
            .map_err(|e| {
                not_found_or(
                    e,
                    || BlobError::BlobNotFound { digest: *digest },
                    "get",
                    &key,
                )
            })?;
        let inner = if in_ranges {
            let store = self.store.clone();
            let key = key.clone();
            let mut first = Some(first);
            stream::iter((offset..end).step_by(self.read_range_size))
                .map(move |start| {
                    let range_end = start.saturating_add(range).min(end);
                    fetch_range(store.clone(), key.clone(), start, range_end, first.take())
                })
                .buffered(self.read_concurrency)
                .map_ok(|chunks| stream::iter(chunks.into_iter().map(Ok)))
                .try_flatten()
                .boxed()
        } else {
            resume_on_failure(self.store.clone(), key.clone(), offset, end, first)
        };
        Ok(rechunk(inner, key, end - offset))
    }

    /// `len` bytes of a blob from `offset` in memory (a header, say): a [`read`](Self::read)
    /// collected, with its clamping and errors.
    pub async fn read_bytes(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BlobError> {
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(READ_CHUNK_SIZE));
        let mut stream = self.read(digest, offset, Some(len)).await?;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// The whole blob in memory; for small files (configs, manifests).
    pub async fn read_all(&self, digest: &Digest) -> Result<Bytes, BlobError> {
        let key = self.blob_key(digest);
        let not_found = || BlobError::BlobNotFound { digest: *digest };
        retry_read("get", &key, || async {
            self.store.get(&key).await?.bytes().await
        })
        .await
        .map_err(|e| not_found_or(e, not_found, "get", &key))
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        let hex = digest.hex();
        let fanout = hex.get(..2).unwrap_or_default().to_owned();
        self.prefix
            .clone()
            .join("blobs")
            .join("sha256")
            .join(fanout.as_str())
            .join(hex.as_str())
    }

    async fn head(&self, key: &Path) -> Result<Option<ObjectMeta>, BlobError> {
        match retry_read("head", key, || self.store.head(key)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BlobError::storage("head", key, e)),
        }
    }

    /// Deletes an object; a missing one is fine.
    async fn delete_quiet(&self, key: &Path) -> Result<(), BlobError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BlobError::storage("delete", key, e)),
        }
    }

    /// Puts verified bytes at a blob key create-only. Returns whether the blob was
    /// already there (dedup).
    async fn put_create(&self, key: &Path, bytes: Bytes) -> Result<bool, BlobError> {
        let payload = PutPayload::from_bytes(bytes.clone());
        match self
            .store
            .put_opts(key, payload, PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(false),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(true),
            Err(
                e @ (object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. }),
            ) => {
                // Safe without the precondition: the bytes are verified and the key is
                // their digest, so a racing writer writes identical bytes.
                tracing::debug!(key = %key, error = %e, "create-only put unsupported, head then put");
                if self.head(key).await?.is_some() {
                    return Ok(true);
                }
                self.store
                    .put(key, PutPayload::from_bytes(bytes))
                    .await
                    .map_err(|e| BlobError::storage("put", key, e))?;
                Ok(false)
            }
            Err(e) => Err(BlobError::storage("put", key, e)),
        }
    }
}

/// Maps a backend NotFound to `not_found`, anything else to a storage error.
fn not_found_or(
    e: object_store::Error,
    not_found: impl FnOnce() -> BlobError,
    op: &'static str,
    key: &Path,
) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => not_found(),
        e => BlobError::storage(op, key, e),
    }
}

/// Runs an idempotent backend read, retrying transient failures (see the module doc).
async fn retry_read<T, F, Fut>(op: &'static str, key: &Path, mut f: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < READ_ATTEMPTS && error::is_transient(&e) => {
                tracing::warn!(op, key = %key, attempt, error = %e, "blob storage read failed, retrying");
                tokio::time::sleep(READ_BACKOFF * 2u32.pow(attempt - 1)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Opens `[start, end)` of an object as a byte stream, retrying transient failures.
async fn open_range(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    start: u64,
    end: u64,
) -> object_store::Result<BoxStream<'static, object_store::Result<Bytes>>> {
    retry_read("get", key, || async {
        let options = GetOptions::new().with_range(Some(start..end));
        let result = store.get_opts(key, options).await?;
        let range = result.range.clone();
        Ok(match result.payload {
            // object_store streams a local file in 8 KiB reads; read it in whole chunks.
            GetResultPayload::File(file, _) => file_chunks(file, range),
            GetResultPayload::Stream(stream) => stream,
        })
    })
    .await
}

/// `range` of an open local file as a stream of [`READ_CHUNK_SIZE`] reads on the blocking
/// pool. A failed read is a transient error (the caller may reopen and resume).
fn file_chunks(
    file: std::fs::File,
    range: std::ops::Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    use std::os::unix::fs::FileExt as _;
    let file = Arc::new(file);
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: e,
    };
    stream::try_unfold(range.start, move |pos| {
        let file = file.clone();
        let end = range.end;
        async move {
            if pos >= end {
                return Ok(None);
            }
            let len = usize::try_from((end - pos).min(READ_CHUNK_SIZE as u64)).unwrap_or(0);
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(|e| fail(e.into()))?
            .map_err(|e| fail(e.into()))?;
            Ok(Some((chunk, pos + len as u64)))
        }
    })
    .boxed()
}

/// Passes `first` (the stream of `[start, end)` of `key`) through; when it breaks off
/// with a transient error, reopens the object from the byte reached, up to
/// [`READ_ATTEMPTS`] - 1 times over the whole read, so a read survives a dropped
/// connection without the caller seeing it. Safe because a blob key's bytes never
/// change: the reopened range continues the same bytes.
fn resume_on_failure(
    store: Arc<dyn ObjectStore>,
    key: Path,
    start: u64,
    end: u64,
    first: BoxStream<'static, object_store::Result<Bytes>>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    struct State {
        store: Arc<dyn ObjectStore>,
        key: Path,
        pos: u64,
        end: u64,
        inner: Option<BoxStream<'static, object_store::Result<Bytes>>>,
        resumes_left: u32,
        done: bool,
    }
    let state = State {
        store,
        key,
        pos: start,
        end,
        inner: Some(first),
        resumes_left: READ_ATTEMPTS - 1,
        done: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if st.inner.is_none() {
                if st.pos >= st.end {
                    return None;
                }
                match open_range(&st.store, &st.key, st.pos, st.end).await {
                    Ok(s) => st.inner = Some(s),
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
            let next = match st.inner.as_mut() {
                Some(inner) => inner.next().await,
                None => None,
            };
            match next {
                Some(Ok(bytes)) => {
                    st.pos = st.pos.saturating_add(bytes.len() as u64);
                    return Some((Ok(bytes), st));
                }
                Some(Err(e)) if st.resumes_left > 0 && error::is_transient(&e) => {
                    st.resumes_left -= 1;
                    tracing::warn!(key = %st.key, offset = st.pos, error = %e, "blob read broke off, resuming");
                    st.inner = None;
                    tokio::time::sleep(READ_BACKOFF).await;
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => return None,
            }
        }
    })
    .boxed()
}

/// The chunks of `[start, end)` of `key`, all in memory, read from `opened` (the range's
/// GET, already answered) or from a new GET, resuming as [`resume_on_failure`] does.
async fn fetch_range(
    store: Arc<dyn ObjectStore>,
    key: Path,
    start: u64,
    end: u64,
    opened: Option<BoxStream<'static, object_store::Result<Bytes>>>,
) -> object_store::Result<Vec<Bytes>> {
    let first = match opened {
        Some(first) => first,
        None => open_range(&store, &key, start, end).await?,
    };
    resume_on_failure(store, key, start, end, first)
        .try_collect()
        .await
}

/// Feeds `parts` to `hasher`, on the blocking pool when they are large.
async fn hash_parts(parts: Vec<Bytes>, mut hasher: Hasher) -> Result<Hasher, BlobError> {
    let total: usize = parts.iter().map(Bytes::len).sum();
    if total <= INLINE_HASH_MAX {
        for part in &parts {
            hasher.update(part);
        }
        return Ok(hasher);
    }
    tokio::task::spawn_blocking(move || {
        for part in &parts {
            hasher.update(part);
        }
        hasher
    })
    .await
    .map_err(|source| BlobError::Task { source })
}

/// Re-chunks a backend byte stream into chunks of at most [`READ_CHUNK_SIZE`] (coalescing
/// small ones), and fails if it does not deliver exactly `expected` bytes.
fn rechunk(
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    key: Path,
    expected: u64,
) -> BoxStream<'static, Result<Bytes, BlobError>> {
    struct State {
        inner: BoxStream<'static, object_store::Result<Bytes>>,
        key: Path,
        expected: u64,
        received: u64,
        pending: Bytes,
        buf: BytesMut,
        finished: bool,
    }
    let state = State {
        inner,
        key,
        expected,
        received: 0,
        pending: Bytes::new(),
        buf: BytesMut::new(),
        finished: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if !st.pending.is_empty() {
                if st.buf.is_empty() && st.pending.len() >= READ_CHUNK_SIZE {
                    let out = st.pending.split_to(READ_CHUNK_SIZE);
                    return Some((Ok(out), st));
                }
                let take = (READ_CHUNK_SIZE - st.buf.len()).min(st.pending.len());
                st.buf.extend_from_slice(&st.pending.split_to(take));
                if st.buf.len() >= READ_CHUNK_SIZE {
                    let out = st.buf.split().freeze();
                    return Some((Ok(out), st));
                }
                continue;
            }
            if st.finished {
                if st.buf.is_empty() {
                    return None;
                }
                let out = st.buf.split().freeze();
                return Some((Ok(out), st));
            }
            match st.inner.next().await {
                Some(Ok(bytes)) => {
                    st.received = st.received.saturating_add(bytes.len() as u64);
                    st.pending = bytes;
                }
                Some(Err(e)) => {
                    st.finished = true;
                    st.buf.clear();
                    let err = BlobError::storage("read", &st.key, e);
                    return Some((Err(err), st));
                }
                None => {
                    st.finished = true;
                    if st.received != st.expected {
                        st.buf.clear();
                        let err = BlobError::storage(
                            "read",
                            &st.key,
                            object_store::Error::Generic {
                                store: "patchport",
                                source: format!(
                                    "short read: expected {} bytes, got {}",
                                    st.expected, st.received
                                )
                                .into(),
                            },
                        );
                        return Some((Err(err), st));
                    }
                }
            }
        }
    })
    .boxed()
}
