//! Blob store conformance suite: every case runs against `memory://` and `file://` always,
//! and against S3 when `PATCHPORT_TEST_S3_ENDPOINT` is set (see scripts/s3-server.sh).

use std::io::Write as _;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use patchport_core::Digest;
use patchport_store::blobs::{
    BlobError, BlobErrorKind, BlobStore, CommitOutcome, MemoryParts, READ_CHUNK_SIZE,
    UploadSession, UploadStart,
};

/// Small segments, so that a few hundred KiB make a multi-segment upload.
const SEGMENT: usize = 64 << 10;

/// A backend under test; `open` makes a new `BlobStore` over the same storage, as a
/// restarted registry or another replica would.
struct Backend {
    kind: Kind,
    _dir: Option<tempfile::TempDir>,
}

enum Kind {
    /// The objects and the multipart uploads, shared by every instance (as S3 shares them
    /// between replicas).
    Memory(Arc<dyn ObjectStore>, Arc<MemoryParts>),
    Url(String),
}

impl Backend {
    fn memory() -> Self {
        let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let parts = Arc::new(MemoryParts::new(objects.clone()));
        Self {
            kind: Kind::Memory(objects, parts),
            _dir: None,
        }
    }

    fn file() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("blobs").display());
        Self {
            kind: Kind::Url(url),
            _dir: Some(dir),
        }
    }

    /// An S3 backend with a prefix of its own, or `None` (said once) when not configured.
    fn s3() -> Option<Self> {
        static SKIPPED: Once = Once::new();
        let Some(endpoint) = env("PATCHPORT_TEST_S3_ENDPOINT") else {
            SKIPPED.call_once(|| {
                // Written to the process's stderr directly, so it shows without --nocapture.
                let _ = writeln!(
                    std::io::stderr(),
                    "S3 blob tests skipped: PATCHPORT_TEST_S3_ENDPOINT not set"
                );
            });
            return None;
        };
        // The store reads its endpoint from AWS_ENDPOINT_URL; never let a test that was
        // meant for a local server talk to real AWS.
        let store_endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
        assert_eq!(
            store_endpoint.as_deref(),
            Some(endpoint.as_str()),
            "set AWS_ENDPOINT_URL to PATCHPORT_TEST_S3_ENDPOINT (scripts/s3-server.sh prints both)"
        );
        let bucket = env("PATCHPORT_TEST_S3_BUCKET").unwrap_or_else(|| "patchport-test".into());
        let url = format!("s3://{bucket}/test-{}", uuid::Uuid::new_v4().simple());
        Some(Self {
            kind: Kind::Url(url),
            _dir: None,
        })
    }

    fn open(&self) -> BlobStore {
        static LOG: Once = Once::new();
        // RUST_LOG=patchport_store=debug shows what a backend's uploads did.
        LOG.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        });
        let store = match &self.kind {
            // Real 5 MiB parts, as on S3 (the default smallest part).
            Kind::Memory(store, parts) => {
                BlobStore::new_multipart(store.clone(), parts.clone(), Path::default())
            }
            Kind::Url(url) => BlobStore::from_url(url).expect("open blob store"),
        };
        store.with_segment_size(SEGMENT)
    }
}

/// A backend's object store, its multipart uploads, and the key prefix of its blob stores.
type Raw = (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>, Path);

impl Backend {
    /// What a `BlobStore` of the backend writes to, to reach under it; none for `file://`.
    fn raw(&self) -> Option<Raw> {
        match &self.kind {
            Kind::Memory(objects, parts) => Some((objects.clone(), parts.clone(), Path::default())),
            Kind::Url(url) => {
                let rest = url.strip_prefix("s3://")?;
                let (bucket, prefix) = rest.split_once('/')?;
                let s3 = Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_bucket_name(bucket)
                        .build()
                        .expect("s3 client"),
                );
                Some((s3.clone(), s3, Path::from(prefix)))
            }
        }
    }
}

/// The multipart upload id of a session and the blob key it completes to.
async fn multipart_of(raw: &Raw, upload_id: &str, digest: &Digest) -> (String, Path) {
    let (objects, _, prefix) = raw;
    let record = prefix
        .clone()
        .join("uploads")
        .join(upload_id)
        .join("session.json");
    let record: serde_json::Value =
        serde_json::from_slice(&objects.get(&record).await.unwrap().bytes().await.unwrap())
            .unwrap();
    let id = record["multipart"]
        .as_str()
        .expect("multipart id")
        .to_owned();
    let hex = digest.hex();
    let key = prefix
        .clone()
        .join("blobs")
        .join("sha256")
        .join(&hex[..2])
        .join(hex.as_str());
    (id, key)
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Deterministic bytes that differ per seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn session(start: UploadStart) -> UploadSession {
    match start {
        UploadStart::Session(s) => s,
        UploadStart::Exists { .. } => panic!("expected a new upload session, got {start:?}"),
    }
}

/// Sends `bytes[from..]` to a session in chunks of `chunk`, then flushes.
async fn send(store: &BlobStore, upload_id: &str, bytes: &[u8], from: usize, chunk: usize) -> u64 {
    let mut writer = store.upload_writer(upload_id).await.expect("writer");
    assert_eq!(writer.committed(), from as u64);
    for (i, piece) in bytes[from..].chunks(chunk).enumerate() {
        let offset = (from + i * chunk) as u64;
        writer
            .write(offset, Bytes::copy_from_slice(piece))
            .await
            .expect("write chunk");
    }
    writer.flush().await.expect("flush")
}

/// The whole push of a client: start, send everything, commit.
async fn push(store: &BlobStore, bytes: &[u8]) -> Result<CommitOutcome, BlobError> {
    let digest = Digest::of(bytes);
    match store.start_upload(digest, bytes.len() as u64).await? {
        UploadStart::Exists { digest, size } => Ok(CommitOutcome {
            digest,
            size,
            deduplicated: true,
        }),
        UploadStart::Session(s) => {
            let mut writer = store.upload_writer(&s.upload_id).await?;
            let mut offset = writer.committed();
            for piece in bytes[offset as usize..].chunks(10_000) {
                writer.write(offset, Bytes::copy_from_slice(piece)).await?;
                offset += piece.len() as u64;
            }
            writer.flush().await?;
            store.commit_upload(&s.upload_id).await
        }
    }
}

async fn read_range(store: &BlobStore, d: &Digest, offset: u64, len: Option<u64>) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .read(d, offset, len)
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("read stream");
    chunks.concat()
}

fn assert_kind<T: std::fmt::Debug>(result: Result<T, BlobError>, kind: BlobErrorKind) -> BlobError {
    match result {
        Ok(v) => panic!("expected {kind:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            e
        }
    }
}

// ---------------------------------------------------------------------------------------
// The cases.

async fn roundtrip_multi_segment(b: &Backend) {
    let store = b.open();
    let bytes = data(300 << 10, 1);
    let digest = Digest::of(&bytes);
    assert_eq!(store.find_missing(&[digest]).await.unwrap(), vec![digest]);

    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    assert_eq!(
        (s.digest, s.size, s.committed),
        (digest, bytes.len() as u64, 0)
    );
    // Uneven chunks that straddle segment boundaries.
    let committed = send(&store, &s.upload_id, &bytes, 0, 7_001).await;
    assert_eq!(committed, bytes.len() as u64);
    assert!(
        !store.contains(&digest).await.unwrap(),
        "visible before commit"
    );

    let outcome = store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(
        outcome,
        CommitOutcome {
            digest,
            size: bytes.len() as u64,
            deduplicated: false
        }
    );
    assert!(store.contains(&digest).await.unwrap());
    assert_eq!(store.size(&digest).await.unwrap(), Some(bytes.len() as u64));
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    assert_eq!(read_range(&store, &digest, 0, None).await, bytes);
    // A re-push sends nothing.
    assert!(store.find_missing(&[digest]).await.unwrap().is_empty());
    // Another instance sees it too.
    assert_eq!(b.open().read_all(&digest).await.unwrap(), bytes);
}

async fn ranged_reads(b: &Backend) {
    let store = b.open();
    let bytes = data(200_000, 2);
    let digest = store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(digest, Digest::of(&bytes));
    let n = bytes.len() as u64;
    for (offset, len) in [
        (0, Some(10)),
        (0, Some(n)),
        (12_345, Some(100_000)),
        (n - 1, Some(1)),
        (150_000, None),
        (0, None),
    ] {
        let want = &bytes[offset as usize..len.map_or(n, |l| offset + l) as usize];
        assert_eq!(
            read_range(&store, &digest, offset, len).await,
            want,
            "{offset} {len:?}"
        );
    }
    // A length past the end is clamped; zero bytes and the end offset read nothing.
    assert_eq!(
        read_range(&store, &digest, n - 5, Some(100)).await,
        &bytes[bytes.len() - 5..]
    );
    assert!(read_range(&store, &digest, 10, Some(0)).await.is_empty());
    assert!(read_range(&store, &digest, n, None).await.is_empty());
    let e = assert_kind(
        store.read(&digest, n + 1, None).await.map(|_| ()),
        BlobErrorKind::InvalidArgument,
    );
    assert!(e.to_string().contains("past the end"), "{e}");
    let missing = Digest::of(b"not stored");
    assert_kind(
        store.read(&missing, 0, None).await.map(|_| ()),
        BlobErrorKind::NotFound,
    );
    assert_kind(store.read_all(&missing).await, BlobErrorKind::NotFound);
}

/// Reads `len` bytes put into `store` from offset 7: every chunk is non-empty and at most
/// READ_CHUNK_SIZE, and together they are the bytes.
async fn assert_bounded_chunks(store: &BlobStore, len: usize, seed: u64) {
    let bytes = data(len, seed);
    let digest = store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    let chunks: Vec<Bytes> = store
        .read(&digest, 7, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() <= READ_CHUNK_SIZE)
    );
    assert_eq!(chunks.concat(), &bytes[7..]);
}

async fn read_chunks_are_bounded(b: &Backend) {
    assert_bounded_chunks(&b.open(), READ_CHUNK_SIZE * 2 + 12_345, 3).await;
}

/// An odd range size, so that ranges straddle everything else.
const RANGE: usize = 9_973;

/// A store of the backend whose reads keep 4 GETs in flight, in ranges of `range` bytes.
fn ranged_store(b: &Backend, range: usize) -> BlobStore {
    b.open()
        .with_read_concurrency(4)
        .with_read_range_size(range)
}

async fn reads_in_ranges_are_exact(b: &Backend) {
    let store = ranged_store(b, RANGE);
    let bytes = data(200_000, 4);
    let digest = store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    let (n, r) = (bytes.len() as u64, RANGE as u64);
    for (offset, len) in [
        (0, None),
        // Two ranges are read in one stream; one byte more in three ranges.
        (0, Some(2 * r)),
        (0, Some(2 * r + 1)),
        (1, Some(3 * r - 2)),
        (r - 1, Some(5 * r + 2)),
        (12_345, Some(100_001)),
        (n - 3 * r - 7, None),
        // A length past the end is clamped.
        (n - 4 * r + 3, Some(u64::MAX)),
    ] {
        let end = len.map_or(n, |l| offset.saturating_add(l).min(n));
        assert_eq!(
            read_range(&store, &digest, offset, len).await,
            &bytes[offset as usize..end as usize],
            "{offset} {len:?}"
        );
    }
    let missing = Digest::of(b"not stored");
    assert_kind(
        store.read(&missing, 0, None).await.map(|_| ()),
        BlobErrorKind::NotFound,
    );
}

async fn reads_in_ranges_have_bounded_chunks(b: &Backend) {
    // Ranges larger than a chunk and not a multiple of it.
    let store = ranged_store(b, READ_CHUNK_SIZE + 12_345);
    assert_bounded_chunks(&store, READ_CHUNK_SIZE * 4 + 777, 5).await;
}

async fn a_read_in_ranges_dropped_early_is_fine(b: &Backend) {
    // A chunk (1 MiB) takes about four ranges; the blob is a dozen of them.
    let store = ranged_store(b, (256 << 10) + 1);
    let bytes = data((3 << 20) + 5, 6);
    let digest = store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    let mut stream = store.read(&digest, 3, None).await.unwrap();
    let first = stream.next().await.expect("a chunk").expect("read");
    assert_eq!(first, &bytes[3..3 + READ_CHUNK_SIZE]);
    drop(stream);
    // Dropped before its first chunk.
    drop(store.read(&digest, 0, None).await.unwrap());
    assert_eq!(read_range(&store, &digest, 0, None).await, bytes);
}

async fn digest_mismatch_is_refused(b: &Backend) {
    let bytes = data(300 << 10, 4);
    let declared = Digest::of(b"something else entirely");
    let sent = Digest::of(&bytes);

    // Same instance (the running hash knows) and a restarted one (it must re-hash).
    for restart in [false, true] {
        let store = b.open();
        let s = session(
            store
                .start_upload(declared, bytes.len() as u64)
                .await
                .unwrap(),
        );
        send(&store, &s.upload_id, &bytes, 0, 50_000).await;
        let committer = if restart { b.open() } else { store.clone() };
        let e = assert_kind(
            committer.commit_upload(&s.upload_id).await,
            BlobErrorKind::InvalidArgument,
        );
        assert_eq!(
            e.to_string(),
            format!("digest mismatch: declared {declared}, received bytes hash to {sent}")
        );
        assert!(!store.contains(&declared).await.unwrap());
        assert!(!store.contains(&sent).await.unwrap());
        // The session is gone, so its garbage does not stay.
        assert_kind(
            store.upload_status(&s.upload_id).await,
            BlobErrorKind::NotFound,
        );
    }

    // The same for a blob that fits one segment.
    let store = b.open();
    let small = data(1_000, 5);
    let s = session(
        store
            .start_upload(declared, small.len() as u64)
            .await
            .unwrap(),
    );
    send(&store, &s.upload_id, &small, 0, 300).await;
    assert_kind(
        b.open().commit_upload(&s.upload_id).await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(!store.contains(&declared).await.unwrap());
}

async fn size_mismatch_is_refused(b: &Backend) {
    let store = b.open();
    let bytes = data(100_000, 6);
    let digest = Digest::of(&bytes);

    // Declared too small: the chunk that goes past it is refused.
    let s = session(store.start_upload(digest, 50_000).await.unwrap());
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..40_000]))
        .await
        .unwrap();
    let e = assert_kind(
        writer
            .write(40_000, Bytes::copy_from_slice(&bytes[40_000..]))
            .await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(
        e.to_string().contains("past the declared size 50000"),
        "{e}"
    );
    assert_eq!(writer.flush().await.unwrap(), 40_000);

    // Declared too large: all bytes sent, the commit is refused as incomplete.
    let s = session(store.start_upload(digest, 150_000).await.unwrap());
    send(&store, &s.upload_id, &bytes, 0, 30_000).await;
    assert_kind(
        store.commit_upload(&s.upload_id).await,
        BlobErrorKind::FailedPrecondition,
    );
    assert!(!store.contains(&digest).await.unwrap());

    // A stored blob declared with another size.
    store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    let e = assert_kind(
        store.start_upload(digest, 99_999).await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(e.to_string().contains("size mismatch"), "{e}");
}

async fn commit_before_complete_fails(b: &Backend) {
    let store = b.open();
    let bytes = data(200_000, 7);
    let digest = Digest::of(&bytes);
    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    send(&store, &s.upload_id, &bytes[..150_000], 0, 25_000).await;
    let e = assert_kind(
        store.commit_upload(&s.upload_id).await,
        BlobErrorKind::FailedPrecondition,
    );
    assert!(e.to_string().contains("150000 of 200000"), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    // The session is intact: finish and commit.
    send(&store, &s.upload_id, &bytes, 150_000, 25_000).await;
    assert!(
        !store
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

async fn upload_resumes_after_restart(b: &Backend) {
    let bytes = data(300 << 10, 8);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;

    let upload_id = {
        let store = b.open();
        let s = session(store.start_upload(digest, size).await.unwrap());
        let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
        // Half the bytes, not on a segment boundary; the stream breaks and the handler
        // flushes what arrived.
        let half = 150_001;
        writer
            .write(0, Bytes::copy_from_slice(&bytes[..100_000]))
            .await
            .unwrap();
        writer
            .write(100_000, Bytes::copy_from_slice(&bytes[100_000..half]))
            .await
            .unwrap();
        assert_eq!(writer.flush().await.unwrap(), half as u64);
        // A writer dropped without flush loses only its unpersisted buffer.
        let mut cut = store.upload_writer(&s.upload_id).await.unwrap();
        cut.write(half as u64, Bytes::copy_from_slice(&bytes[half..half + 10]))
            .await
            .unwrap();
        drop(cut);
        s.upload_id
    };

    // The registry restarted: a new instance over the same storage.
    let store = b.open();
    let status = store.upload_status(&upload_id).await.unwrap();
    assert_eq!(
        (status.digest, status.size, status.committed),
        (digest, size, 150_001)
    );
    // A client that lost its upload id gets the same session back.
    let again = session(store.start_upload(digest, size).await.unwrap());
    assert_eq!(again, status);

    send(
        &store,
        &upload_id,
        &bytes,
        status.committed as usize,
        33_333,
    )
    .await;
    let outcome = store.commit_upload(&upload_id).await.unwrap();
    assert!(!outcome.deduplicated);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

async fn wrong_offset_is_refused(b: &Backend) {
    let store = b.open();
    let bytes = data(1_000, 9);
    let s = session(store.start_upload(Digest::of(&bytes), 1_000).await.unwrap());
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    let e = assert_kind(
        writer.write(5, Bytes::copy_from_slice(&bytes[5..10])).await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(e.to_string().contains("expected offset 0"), "{e}");
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..100]))
        .await
        .unwrap();
    let e = assert_kind(
        writer
            .write(50, Bytes::copy_from_slice(&bytes[50..60]))
            .await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(e.to_string().contains("expected offset 100"), "{e}");
    writer
        .write(100, Bytes::copy_from_slice(&bytes[100..]))
        .await
        .unwrap();
    assert_eq!(writer.flush().await.unwrap(), 1_000);
    // A writer opened later starts at the committed offset.
    let mut late = store.upload_writer(&s.upload_id).await.unwrap();
    assert_eq!(late.committed(), 1_000);
    assert_kind(
        late.write(0, Bytes::from_static(b"x")).await,
        BlobErrorKind::InvalidArgument,
    );
    store.commit_upload(&s.upload_id).await.unwrap();
}

async fn concurrent_uploads_of_one_blob(b: &Backend) {
    // Two registry replicas, two clients, racing from start to commit.
    let bytes = Arc::new(data(300 << 10, 10));
    let digest = Digest::of(&bytes);
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let store = b.open();
            let bytes = bytes.clone();
            tokio::spawn(async move { push(&store, &bytes).await })
        })
        .collect();
    for task in tasks {
        let outcome = task.await.expect("join").expect("push");
        assert_eq!((outcome.digest, outcome.size), (digest, bytes.len() as u64));
    }
    assert_eq!(b.open().read_all(&digest).await.unwrap(), bytes.as_slice());
}

async fn shared_session_both_commit(b: &Backend) {
    // Two clients that got the same session (start_upload reuses it) both send and commit.
    let first = b.open();
    let second = b.open();
    let bytes = data(300 << 10, 11);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let s1 = session(first.start_upload(digest, size).await.unwrap());
    let s2 = session(second.start_upload(digest, size).await.unwrap());
    assert_eq!(s1.upload_id, s2.upload_id);
    // Both start at offset 0 and overwrite each other's parts with the same bytes.
    let mut w1 = first.upload_writer(&s1.upload_id).await.unwrap();
    let mut w2 = second.upload_writer(&s2.upload_id).await.unwrap();
    for (i, piece) in bytes.chunks(20_000).enumerate() {
        let offset = (i * 20_000) as u64;
        w1.write(offset, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
        w2.write(offset, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
    }
    assert_eq!(w1.flush().await.unwrap(), size);
    assert_eq!(w2.flush().await.unwrap(), size);
    let (c1, c2) = tokio::join!(
        first.commit_upload(&s1.upload_id),
        second.commit_upload(&s2.upload_id)
    );
    let (c1, c2) = (c1.expect("first commit"), c2.expect("second commit"));
    assert_eq!((c1.digest, c2.digest), (digest, digest));
    // Which one reports `deduplicated` is not asserted: a completion is not create-only,
    // so two racing commits may both write the identical verified bytes.
    assert_eq!(first.read_all(&digest).await.unwrap(), bytes);
}

async fn commit_is_idempotent(b: &Backend) {
    let store = b.open();
    let bytes = data(100_000, 12);
    let digest = Digest::of(&bytes);
    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    send(&store, &s.upload_id, &bytes, 0, 40_000).await;
    assert!(
        !store
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
    // A client that lost the answer retries, on another replica.
    let again = b.open().commit_upload(&s.upload_id).await.unwrap();
    assert_eq!((again.digest, again.deduplicated), (digest, true));
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        bytes.len() as u64
    );
    // And a later push of the same blob sends nothing.
    assert_eq!(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
        UploadStart::Exists {
            digest,
            size: bytes.len() as u64
        }
    );
}

async fn find_missing_dedups_in_order(b: &Backend) {
    let store = b.open();
    let a = store.put_bytes(Bytes::from_static(b"a")).await.unwrap();
    let bb = store.put_bytes(Bytes::from_static(b"b")).await.unwrap();
    let c = Digest::of(b"c");
    let d = Digest::of(b"d");
    assert_eq!(
        store.find_missing(&[d, a, c, d, bb, c]).await.unwrap(),
        vec![d, c]
    );
    assert_eq!(
        store.find_missing(&[a, bb]).await.unwrap(),
        Vec::<Digest>::new()
    );
    assert!(store.find_missing(&[]).await.unwrap().is_empty());
    let many: Vec<Digest> = (0..100u32).map(|i| Digest::of(&i.to_le_bytes())).collect();
    assert_eq!(store.find_missing(&many).await.unwrap(), many);
}

async fn put_bytes_dedups(b: &Backend) {
    let store = b.open();
    let bytes = Bytes::from_static(b"{\"hidden_size\": 64}");
    let d1 = store.put_bytes(bytes.clone()).await.unwrap();
    let d2 = b.open().put_bytes(bytes.clone()).await.unwrap();
    assert_eq!(d1, d2);
    assert_eq!(d1, Digest::of(&bytes));
    assert_eq!(store.read_all(&d1).await.unwrap(), bytes);
    let empty = store.put_bytes(Bytes::new()).await.unwrap();
    assert_eq!(empty, Digest::of(b""));
    assert_eq!(store.size(&empty).await.unwrap(), Some(0));
    assert!(read_range(&store, &empty, 0, None).await.is_empty());
}

async fn start_upload_of_stored_blob_says_exists(b: &Backend) {
    let store = b.open();
    let bytes = data(5_000, 13);
    let digest = store.put_bytes(Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(
        store.start_upload(digest, 5_000).await.unwrap(),
        UploadStart::Exists {
            digest,
            size: 5_000
        }
    );
    // An upload that was already running when the blob appeared dedups at commit.
    let other = b.open();
    let late = data(7_000, 14);
    let late_digest = Digest::of(&late);
    let s = session(other.start_upload(late_digest, 7_000).await.unwrap());
    send(&other, &s.upload_id, &late, 0, 1_000).await;
    store.put_bytes(Bytes::from(late.clone())).await.unwrap();
    assert!(
        other
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
}

async fn empty_blob_uploads(b: &Backend) {
    let store = b.open();
    let digest = Digest::of(b"");
    let s = session(store.start_upload(digest, 0).await.unwrap());
    assert_eq!(send(&store, &s.upload_id, b"", 0, 10).await, 0);
    let outcome = store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!((outcome.digest, outcome.size), (digest, 0));
    assert_eq!(store.read_all(&digest).await.unwrap(), Bytes::new());
}

async fn expire_removes_abandoned_uploads(b: &Backend) {
    let store = b.open();
    let bytes = data(100_000, 15);
    let digest = Digest::of(&bytes);
    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    send(&store, &s.upload_id, &bytes[..70_000], 0, 10_000).await;
    assert_eq!(
        store
            .expire_uploads(Duration::from_secs(3_600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        70_000
    );

    let upload = match b.raw() {
        Some(raw) => Some((multipart_of(&raw, &s.upload_id, &digest).await, raw.1)),
        None => None,
    };
    assert!(store.expire_uploads(Duration::ZERO).await.unwrap() >= 1);
    assert_kind(
        store.upload_status(&s.upload_id).await,
        BlobErrorKind::NotFound,
    );
    // Its multipart upload was aborted: it can no longer complete (S3 answers
    // NoSuchUpload; moto an internal error).
    if let Some(((id, key), parts)) = upload {
        parts
            .complete_multipart(&key, &id, vec![])
            .await
            .expect_err("an expired session's upload is aborted");
        assert!(!store.contains(&digest).await.unwrap());
    }
    // The next attempt gets a fresh session and succeeds.
    let fresh = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    assert_ne!(fresh.upload_id, s.upload_id);
    assert_eq!(fresh.committed, 0);
    send(&store, &fresh.upload_id, &bytes, 0, 10_000).await;
    store.commit_upload(&fresh.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

async fn bad_upload_ids_are_refused(b: &Backend) {
    let store = b.open();
    for bad in [
        "",
        "nope",
        "../../blobs",
        "0123456789ABCDEF0123456789abcdef",
    ] {
        assert_kind(
            store.upload_status(bad).await,
            BlobErrorKind::InvalidArgument,
        );
        assert_kind(
            store.upload_writer(bad).await,
            BlobErrorKind::InvalidArgument,
        );
        assert_kind(
            store.commit_upload(bad).await,
            BlobErrorKind::InvalidArgument,
        );
    }
    let unknown = uuid::Uuid::new_v4().simple().to_string();
    assert_kind(store.upload_status(&unknown).await, BlobErrorKind::NotFound);
    assert_kind(store.upload_writer(&unknown).await, BlobErrorKind::NotFound);
    assert_kind(store.commit_upload(&unknown).await, BlobErrorKind::NotFound);
}

async fn multipart_upload_resumes_after_restart(b: &Backend) {
    // Real 5 MiB parts (S3's smallest): a stream cut past the first part leaves one part
    // and a tail; a restarted registry continues from both, another commits.
    let bytes = data((12 << 20) + 3, 16);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let cut = (7 << 20) + 5;
    let upload_id = {
        let store = b.open();
        let s = session(store.start_upload(digest, size).await.unwrap());
        let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
        for (i, piece) in bytes[..cut].chunks(1 << 20).enumerate() {
            writer
                .write((i << 20) as u64, Bytes::copy_from_slice(piece))
                .await
                .unwrap();
        }
        assert_eq!(writer.flush().await.unwrap(), cut as u64);
        s.upload_id
    };
    let store = b.open();
    assert_eq!(
        store.upload_status(&upload_id).await.unwrap().committed,
        cut as u64
    );
    assert!(!store.contains(&digest).await.unwrap());
    assert_eq!(send(&store, &upload_id, &bytes, cut, 3 << 20).await, size);
    let outcome = b.open().commit_upload(&upload_id).await.unwrap();
    assert_eq!((outcome.digest, outcome.deduplicated), (digest, false));
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    let mid = (5 << 20) - 7;
    assert_eq!(
        read_range(&store, &digest, mid, Some(100)).await,
        &bytes[mid as usize..mid as usize + 100]
    );

    // A wrong digest over several parts leaves nothing either.
    let declared = Digest::of(b"declared");
    let s = session(store.start_upload(declared, size).await.unwrap());
    send(&store, &s.upload_id, &bytes, 0, 2 << 20).await;
    assert_kind(
        b.open().commit_upload(&s.upload_id).await,
        BlobErrorKind::InvalidArgument,
    );
    assert!(!store.contains(&declared).await.unwrap());
}

/// A paused stream's bytes are persisted (a tail, on multipart stores) and a writer opened
/// later, on another instance, continues after them.
async fn a_paused_stream_is_continued_by_a_later_writer(b: &Backend) {
    let store = b.open();
    let bytes = data(300_000, 34);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let s = session(store.start_upload(digest, size).await.unwrap());
    let mut w = store.upload_writer(&s.upload_id).await.unwrap();
    w.write(0, Bytes::copy_from_slice(&bytes[..70_001]))
        .await
        .unwrap();
    assert_eq!(w.persist_buffered().await.unwrap(), 70_001);
    w.write(70_001, Bytes::copy_from_slice(&bytes[70_001..100_000]))
        .await
        .unwrap();
    assert_eq!(w.persist_buffered().await.unwrap(), 100_000);
    // The connection drops with a few bytes unpersisted.
    w.write(100_000, Bytes::copy_from_slice(&bytes[100_000..100_010]))
        .await
        .unwrap();
    drop(w);
    let other = b.open();
    assert_eq!(
        other.upload_status(&s.upload_id).await.unwrap().committed,
        100_000
    );
    assert_eq!(
        send(&other, &s.upload_id, &bytes, 100_000, 45_000).await,
        size
    );
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

/// A part put again with other bytes after it was recorded (a second writer of the session
/// that died before its record): the records chain and hash to the digest, but the
/// completion names parts the backend no longer holds, so it is refused (S3 checks each
/// part's ETag and checksum): Unavailable the first time (a refusal and an outage look
/// the same), and the session is deleted when it is refused again.
async fn a_part_replaced_after_its_record_is_refused(b: &Backend) {
    let Some(raw) = b.raw() else {
        return;
    };
    let store = b.open();
    let bytes = data((10 << 20) + 100, 41);
    let digest = Digest::of(&bytes);
    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    send(&store, &s.upload_id, &bytes, 0, 1 << 20).await;
    let (id, key) = multipart_of(&raw, &s.upload_id, &digest).await;
    raw.1
        .put_part(&key, &id, 1, Bytes::from(vec![7u8; 5 << 20]).into())
        .await
        .unwrap();
    assert_kind(
        store.commit_upload(&s.upload_id).await,
        BlobErrorKind::Unavailable,
    );
    assert!(!store.contains(&digest).await.unwrap());
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        bytes.len() as u64
    );
    let e = assert_kind(
        store.commit_upload(&s.upload_id).await,
        BlobErrorKind::FailedPrecondition,
    );
    assert!(e.to_string().contains("start the upload again"), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    assert_kind(
        store.upload_status(&s.upload_id).await,
        BlobErrorKind::NotFound,
    );
}

async fn multipart_with_several_parts(b: &Backend) {
    // 36 MiB in 4 MiB segments: several 5 MiB parts (the smallest part wins).
    let store = b.open().with_segment_size(4 << 20);
    let bytes = data(36 << 20, 17);
    let outcome = push(&store, &bytes).await.unwrap();
    assert_eq!(outcome.size, bytes.len() as u64);
    assert_eq!(read_range(&store, &outcome.digest, 0, None).await, bytes);
    let mid = 20 << 20;
    assert_eq!(
        read_range(&store, &outcome.digest, mid, Some(3 << 20)).await,
        &bytes[mid as usize..(mid + (3 << 20)) as usize]
    );
}

/// Sessions are per owner: another owner neither resumes, reads, writes nor commits one,
/// and a caller that may not see a stored blob gets a session (not `Exists`) and must
/// send the bytes, which commit verifies before answering dedup.
async fn uploads_of_a_stored_blob_need_the_bytes(b: &Backend) {
    let store = b.open();
    let bytes = data(200_000, 31);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    push(&store, &bytes).await.unwrap();

    // One that may not see the blob gets a session of its own, however stored it is.
    let a = session(
        store
            .start_upload_as(digest, size, Some("a"), false)
            .await
            .unwrap(),
    );
    assert_eq!(a.committed, 0);
    // Committing without the bytes proves nothing.
    assert_kind(
        store.commit_upload_as(&a.upload_id, Some("a"), true).await,
        BlobErrorKind::FailedPrecondition,
    );
    // Another owner does not find the session at all.
    for other in [None, Some("b")] {
        assert_kind(
            store.upload_status_as(&a.upload_id, other).await,
            BlobErrorKind::NotFound,
        );
        assert_kind(
            store.upload_writer_as(&a.upload_id, other).await,
            BlobErrorKind::NotFound,
        );
        assert_kind(
            store.commit_upload_as(&a.upload_id, other, false).await,
            BlobErrorKind::NotFound,
        );
    }
    // Nor resumes it: its own start gets another session.
    let b_session = session(
        store
            .start_upload_as(digest, size, Some("b"), false)
            .await
            .unwrap(),
    );
    assert_ne!(b_session.upload_id, a.upload_id);

    // Wrong bytes of the right length are refused at commit, the blob untouched.
    let wrong = data(200_000, 32);
    let mut w = store
        .upload_writer_as(&b_session.upload_id, Some("b"))
        .await
        .unwrap();
    w.write(0, Bytes::from(wrong)).await.unwrap();
    w.flush().await.unwrap();
    assert_kind(
        store
            .commit_upload_as(&b_session.upload_id, Some("b"), true)
            .await,
        BlobErrorKind::InvalidArgument,
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);

    // The right bytes prove possession: dedup, the blob stored once.
    let mut w = store
        .upload_writer_as(&a.upload_id, Some("a"))
        .await
        .unwrap();
    w.write(0, Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(w.flush().await.unwrap(), size);
    let out = store
        .commit_upload_as(&a.upload_id, Some("a"), true)
        .await
        .unwrap();
    assert_eq!(
        (out.digest, out.size, out.deduplicated),
        (digest, size, true)
    );
    // A caller that sees the blob still gets the shortcut.
    assert!(matches!(
        store
            .start_upload_as(digest, size, Some("a"), true)
            .await
            .unwrap(),
        UploadStart::Exists { .. }
    ));
}

/// A stalled writer's buffered bytes are persisted on request, so nothing waits in memory.
async fn persist_buffered_makes_a_short_segment(b: &Backend) {
    let store = b.open();
    let bytes = data(SEGMENT * 2, 33);
    let digest = Digest::of(&bytes);
    let s = session(
        store
            .start_upload(digest, bytes.len() as u64)
            .await
            .unwrap(),
    );
    let mut w = store.upload_writer(&s.upload_id).await.unwrap();
    w.write(0, Bytes::copy_from_slice(&bytes[..1000]))
        .await
        .unwrap();
    assert_eq!(w.buffered(), 1000);
    assert_eq!(w.persist_buffered().await.unwrap(), 1000);
    assert_eq!(w.buffered(), 0);
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        1000
    );
    w.write(1000, Bytes::copy_from_slice(&bytes[1000..]))
        .await
        .unwrap();
    w.flush().await.unwrap();
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::memory()).await;
                }
            )*
        }
        mod file {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::file()).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(backend) = super::Backend::s3() {
                        super::$case(&backend).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    roundtrip_multi_segment,
    ranged_reads,
    read_chunks_are_bounded,
    reads_in_ranges_are_exact,
    reads_in_ranges_have_bounded_chunks,
    a_read_in_ranges_dropped_early_is_fine,
    digest_mismatch_is_refused,
    size_mismatch_is_refused,
    commit_before_complete_fails,
    upload_resumes_after_restart,
    wrong_offset_is_refused,
    concurrent_uploads_of_one_blob,
    shared_session_both_commit,
    commit_is_idempotent,
    find_missing_dedups_in_order,
    put_bytes_dedups,
    start_upload_of_stored_blob_says_exists,
    empty_blob_uploads,
    expire_removes_abandoned_uploads,
    bad_upload_ids_are_refused,
    multipart_upload_resumes_after_restart,
    a_paused_stream_is_continued_by_a_later_writer,
    a_part_replaced_after_its_record_is_refused,
    multipart_with_several_parts,
    uploads_of_a_stored_blob_need_the_bytes,
    persist_buffered_makes_a_short_segment,
);

/// Sets a file's modification time `age` into the past.
fn age_file(path: &std::path::Path, age: Duration) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

/// What a registry SIGKILLed during CommitUpload (or during a segment or blob put)
/// leaves on a `file://` store: object_store's half-written `<key>#<n>` files, which no
/// listing shows. The sweep removes those older than the orphan bound and keeps fresh
/// ones (a commit in flight); the start-up sweep also walks `blobs/`.
#[tokio::test]
async fn sweep_removes_staging_files_of_a_killed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("blobs");
    let store = BlobStore::from_url(&format!("file://{}", root.display())).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let attempt = uuid::Uuid::new_v4().simple().to_string();
    let write = |rel: &str, len: usize| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![7u8; len]).unwrap();
        path
    };
    let old = patchport_store::blobs::ORPHAN_AGE + Duration::from_secs(60);
    let killed_commit = write(&format!("staging/{id}.{attempt}#1"), 1 << 20);
    age_file(&killed_commit, old);
    let killed_segment = write(&format!("uploads/{id}/{:020}#1", 0), 4096);
    age_file(&killed_segment, old);
    let killed_blob_put = write("blobs/sha256/ab/abcdef#1", 4096);
    age_file(&killed_blob_put, old);
    let in_flight = write(&format!("staging/{id}.other#1"), 4096);

    // The session TTL is a day; staging leftovers go after the orphan bound anyway.
    store
        .expire_uploads(Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert!(
        !killed_commit.exists(),
        "the killed commit's staging file is removed"
    );
    assert!(!killed_segment.exists(), "a killed segment put is removed");
    assert!(in_flight.exists(), "a commit in flight keeps its file");
    assert!(
        killed_blob_put.exists(),
        "the periodic sweep does not walk blobs/"
    );
    store
        .sweep_at_start(Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert!(!killed_blob_put.exists(), "the start-up sweep removes it");
    assert!(in_flight.exists());
}

#[test]
fn from_url_rejects_bad_urls() {
    for bad in [
        "",
        "blobs",
        "ftp://host/x",
        "gs://bucket",
        "s3://",
        "memory://x",
        "file://",
    ] {
        let e = BlobStore::from_url(bad).expect_err(bad);
        assert_eq!(e.kind(), BlobErrorKind::InvalidArgument, "{bad}: {e}");
    }
    let e = BlobStore::from_url("ftp://host/x").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("file://") && msg.contains("memory://") && msg.contains("s3://"),
        "{msg}"
    );
}

#[test]
fn from_url_creates_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/blobs");
    BlobStore::from_url(&format!("file://{}", path.display())).unwrap();
    assert!(path.is_dir());
}
