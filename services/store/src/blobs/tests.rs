//! Unit tests that look inside the store: the key layout, what a commit leaves behind,
//! two sessions for one blob, the read re-chunking. The behaviour every backend must show
//! is in `tests/blobs.rs`.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use patchport_core::Digest;

use super::*;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A `memory://` store with 1,000-byte parts; `restart` makes another instance over the
/// same storage.
struct Memory {
    raw: Arc<dyn ObjectStore>,
    parts: Arc<MemoryParts>,
}

impl Memory {
    /// The id of a session's multipart upload, from its `session.json`.
    async fn multipart_id(&self, upload_id: &str) -> String {
        let key = Path::from(format!("pfx/uploads/{upload_id}/session.json"));
        let json = self.raw.get(&key).await.unwrap().bytes().await.unwrap();
        let session: serde_json::Value = serde_json::from_slice(&json).unwrap();
        session["multipart"].as_str().unwrap().to_owned()
    }

    fn restart(&self) -> BlobStore {
        BlobStore::new_multipart(self.raw.clone(), self.parts.clone(), Path::from("pfx"))
            .with_segment_size(1_000)
            .with_min_part_size(1_000)
    }
}

fn memory() -> (Memory, BlobStore) {
    let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let parts = Arc::new(MemoryParts::new(raw.clone()));
    let mem = Memory { raw, parts };
    let store = mem.restart();
    (mem, store)
}

async fn keys(raw: &Arc<dyn ObjectStore>) -> Vec<String> {
    let mut keys: Vec<String> = raw
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn open_session(store: &BlobStore, digest: Digest, size: u64) -> UploadSession {
    match store.start_upload(digest, size).await.unwrap() {
        UploadStart::Session(s) => s,
        other => panic!("expected a session, got {other:?}"),
    }
}

async fn send_all(store: &BlobStore, upload_id: &str, bytes: &[u8], chunk: usize) {
    let mut writer = store.upload_writer(upload_id).await.unwrap();
    let mut offset = writer.committed();
    for piece in bytes[offset as usize..].chunks(chunk) {
        writer
            .write(offset, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
        offset += piece.len() as u64;
    }
    writer.flush().await.unwrap();
}

#[tokio::test]
async fn layout_while_uploading_and_after_commit() {
    let (mem, store) = memory();
    let raw = &mem.raw;
    let bytes = data(2_500, 1);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 2_500).await;
    send_all(&store, &s.upload_id, &bytes, 700).await;
    let id = &s.upload_id;
    let hex = digest.hex();
    // One record per part put; no byte is stored anywhere but in the multipart upload.
    assert_eq!(
        keys(raw).await,
        vec![
            format!("pfx/upload-index/{hex}.2500"),
            format!("pfx/uploads/{id}/00000000000000000000.1000.part"),
            format!("pfx/uploads/{id}/00000000000000001000.1000.part"),
            format!("pfx/uploads/{id}/00000000000000002000.500.part"),
            format!("pfx/uploads/{id}/session.json"),
        ]
    );
    assert_eq!(mem.parts.open_uploads(), 1);

    store.commit_upload(id).await.unwrap();
    // The blob, and the committed session's record (so a retried commit answers the same).
    assert_eq!(
        keys(raw).await,
        vec![
            format!("pfx/blobs/sha256/{}/{hex}", &hex[..2]),
            format!("pfx/uploads/{id}/session.json"),
        ]
    );
    assert_eq!(mem.parts.open_uploads(), 0);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    assert_eq!(
        store
            .expire_uploads(std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        keys(raw).await,
        vec![format!("pfx/blobs/sha256/{}/{hex}", &hex[..2])]
    );
}

#[tokio::test]
async fn digest_mismatch_leaves_nothing() {
    let (mem, store) = memory();
    let bytes = data(2_500, 2);
    let s = open_session(&store, Digest::of(b"other"), 2_500).await;
    send_all(&store, &s.upload_id, &bytes, 999).await;
    let e = mem.restart().commit_upload(&s.upload_id).await.unwrap_err();
    assert!(
        matches!(e, BlobError::DigestMismatch { actual, .. } if actual == Digest::of(&bytes)),
        "{e}"
    );
    assert_eq!(keys(&mem.raw).await, Vec::<String>::new());
    assert_eq!(mem.parts.open_uploads(), 0);
}

#[tokio::test]
async fn two_sessions_for_one_blob_both_commit() {
    let (mem, store) = memory();
    let raw = &mem.raw;
    let bytes = data(5_000, 3);
    let digest = Digest::of(&bytes);
    let first = open_session(&store, digest, 5_000).await;
    // Without the index entry (another replica raced us), the next start makes a new session.
    raw.delete(&store.index_key(&digest, 5_000, None))
        .await
        .unwrap();
    let second = open_session(&store, digest, 5_000).await;
    assert_ne!(first.upload_id, second.upload_id);

    let other = mem.restart();
    let (a, b) = tokio::join!(
        send_all(&store, &first.upload_id, &bytes, 400),
        send_all(&other, &second.upload_id, &bytes, 1_300),
    );
    let ((), ()) = (a, b);
    let (c1, c2) = tokio::join!(
        store.commit_upload(&first.upload_id),
        other.commit_upload(&second.upload_id)
    );
    let (c1, c2) = (c1.unwrap(), c2.unwrap());
    assert_eq!((c1.digest, c2.digest), (digest, digest));
    // Both may complete (the completion is not create-only; the bytes are identical).
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    // Either completed, or aborted as dedup: no upload is left open.
    assert_eq!(mem.parts.open_uploads(), 0);
    assert!(
        !keys(raw)
            .await
            .iter()
            .any(|k| k.contains(".part") || k.contains("index"))
    );
}

#[tokio::test]
async fn a_record_chain_broken_by_another_writer_is_never_completed() {
    // Two writers of one session, both at offset 0, with different bytes: the second
    // replaces part 0 and its record; the first's later records name its own part 0.
    let (mem, store) = memory();
    let bytes = data(3_000, 4);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 3_000).await;
    let mut first = store.upload_writer(&s.upload_id).await.unwrap();
    let mut second = mem.restart().upload_writer(&s.upload_id).await.unwrap();
    first
        .write(0, Bytes::copy_from_slice(&bytes[..1_000]))
        .await
        .unwrap();
    let mut other = bytes[..2_000].to_vec();
    other[10] ^= 1;
    second.write(0, Bytes::from(other)).await.unwrap();
    first
        .write(1_000, Bytes::copy_from_slice(&bytes[1_000..]))
        .await
        .unwrap();
    assert_eq!(first.flush().await.unwrap(), 3_000);
    // The chain stops where it breaks: part 0 is the second writer's.
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        1_000
    );
    let e = store.commit_upload(&s.upload_id).await.unwrap_err();
    assert!(matches!(e, BlobError::UploadChanged { .. }), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    // The client resumes from the chain's end; the wrong part 0 makes a wrong digest,
    // which is refused and leaves nothing.
    send_all(&store, &s.upload_id, &bytes, 500).await;
    let e = store.commit_upload(&s.upload_id).await.unwrap_err();
    assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    assert_eq!(mem.parts.open_uploads(), 0);
}

#[tokio::test]
async fn a_part_replaced_after_its_record_is_never_completed() {
    // A part put again with other bytes after it was recorded (a writer that died before
    // its record): the records chain and hash to the digest, but the completion names
    // content ids the backend no longer holds, so it is refused.
    let (mem, store) = memory();
    let bytes = data(3_000, 5);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 3_000).await;
    send_all(&store, &s.upload_id, &bytes, 1_000).await;
    let id = mem.multipart_id(&s.upload_id).await;
    let key = store.blob_key(&digest);
    mem.parts
        .put_part(&key, &id, 1, Bytes::from(vec![0u8; 1_000]).into())
        .await
        .unwrap();
    // A first refusal cannot be told from an outage: the session stays, for a commit
    // sent again.
    let e = store.commit_upload(&s.upload_id).await.unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::Unavailable, "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        3_000
    );
    // Refused again: the session is gone, the client starts again.
    let e = store.commit_upload(&s.upload_id).await.unwrap_err();
    assert!(matches!(e, BlobError::UploadChanged { .. }), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap_err().kind(),
        BlobErrorKind::NotFound
    );
    assert_eq!(mem.parts.open_uploads(), 0);
}

#[tokio::test]
async fn resume_after_partial_flush_reloads_the_tail() {
    let (mem, store) = memory();
    let bytes = data(4_321, 6);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 4_321).await;
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..1_234]))
        .await
        .unwrap();
    // Part 0 may still be in flight; every byte is either committed or buffered.
    assert_eq!(writer.committed() + writer.buffered(), 1_234);
    assert_eq!(writer.flush().await.unwrap(), 1_234);
    let id = &s.upload_id;
    let tail = format!("pfx/uploads/{id}/00000000000000001000.tail");
    assert!(keys(&mem.raw).await.contains(&tail));
    // A restarted registry's writer loads the tail and sends it as the start of part 1.
    let restarted = mem.restart();
    assert_eq!(restarted.upload_status(id).await.unwrap().committed, 1_234);
    send_all(&restarted, id, &bytes, 777).await;
    let keys_now = keys(&mem.raw).await;
    assert!(!keys_now.contains(&tail), "{keys_now:?}");
    assert!(keys_now.contains(&format!("pfx/uploads/{id}/00000000000000001000.1000.part")));
    assert_eq!(restarted.upload_status(id).await.unwrap().committed, 4_321);
    store.commit_upload(id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn a_tail_that_ends_the_blob_becomes_the_last_part_at_commit() {
    // A writer leaves the end of the blob as a tail (as a registry before the last part
    // was put would): commit puts it as the last part.
    let (mem, store) = memory();
    let bytes = data(1_500, 7);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 1_500).await;
    send_all(&store, &s.upload_id, &bytes[..1_200], 1_200).await;
    let tail = Path::from(format!(
        "pfx/uploads/{}/00000000000000001000.tail",
        s.upload_id
    ));
    mem.raw
        .put(&tail, Bytes::copy_from_slice(&bytes[1_000..]).into())
        .await
        .unwrap();
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        1_500
    );
    assert!(
        !store
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn expiry_aborts_the_multipart_upload() {
    let (mem, store) = memory();
    let bytes = data(2_500, 8);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 2_500).await;
    send_all(&store, &s.upload_id, &bytes[..1_500], 500).await;
    let id = mem.multipart_id(&s.upload_id).await;
    assert_eq!(mem.parts.open_uploads(), 1);
    assert_eq!(
        store
            .expire_uploads(std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(mem.parts.open_uploads(), 0);
    let e = mem
        .parts
        .complete_multipart(&store.blob_key(&digest), &id, vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, object_store::Error::NotFound { .. }), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
    assert!(keys(&mem.raw).await.is_empty());
}

#[tokio::test]
async fn sessions_of_an_older_registry_are_not_continued() {
    // An older registry kept segment objects and no multipart upload.
    let (mem, store) = memory();
    let bytes = data(2_000, 9);
    let digest = Digest::of(&bytes);
    let old_session = |id: &str| {
        let raw = mem.raw.clone();
        let id = id.to_owned();
        let created = serde_json::json!({ "digest": digest, "size": 2_000, "created": 1 });
        async move {
            raw.put(
                &Path::from(format!("pfx/uploads/{id}/session.json")),
                Bytes::from(created.to_string()).into(),
            )
            .await
            .unwrap();
            raw.put(
                &Path::from(format!("pfx/uploads/{id}/00000000000000000000")),
                Bytes::from(vec![1u8; 700]).into(),
            )
            .await
            .unwrap();
        }
    };
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    old_session(&a).await;
    old_session(&b).await;
    mem.raw
        .put(
            &store.index_key(&digest, 2_000, None),
            Bytes::from(a.clone()).into(),
        )
        .await
        .unwrap();
    // start_upload does not resume it: a new session, the old one deleted.
    let s = open_session(&store, digest, 2_000).await;
    assert_ne!(s.upload_id, a);
    assert_eq!(s.committed, 0);
    assert_eq!(
        store.upload_status(&a).await.unwrap_err().kind(),
        BlobErrorKind::NotFound
    );
    // Writing or committing one answers why, and deletes it.
    let e = store.upload_writer(&b).await.unwrap_err();
    assert!(e.to_string().contains("older registry"), "{e}");
    assert_eq!(e.kind(), BlobErrorKind::FailedPrecondition);
    assert!(
        !keys(&mem.raw)
            .await
            .iter()
            .any(|k| k.contains(&a) || k.contains(&b))
    );
    send_all(&store, &s.upload_id, &bytes, 600).await;
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn a_store_without_multipart_uploads_refuses_uploads() {
    let store = BlobStore::new(Arc::new(InMemory::new()), Path::default());
    let e = store.start_upload(Digest::of(b"x"), 1).await.unwrap_err();
    assert!(matches!(e, BlobError::UploadsUnsupported { .. }), "{e}");
}

#[test]
fn s3_url_sets_bucket_and_prefix() {
    let store = BlobStore::from_url("s3://some-bucket/team/blobs/").unwrap();
    assert_eq!(store.prefix.as_ref(), "team/blobs");
    assert!(store.parts.is_some());
    assert_eq!(store.min_part_size, S3_MIN_PART_SIZE);
    assert_eq!(store.part_size(10 << 30), DEFAULT_SEGMENT_SIZE as u64);
    assert_eq!(store.part_size(1 << 40), (1u64 << 40).div_ceil(MAX_PARTS));
    let digest = Digest::of(b"x");
    let hex = digest.hex();
    assert_eq!(
        store.blob_key(&digest).as_ref(),
        format!("team/blobs/blobs/sha256/{}/{hex}", &hex[..2])
    );
    assert!(format!("{store:?}").contains("some-bucket"));
}

fn rechunked(pieces: Vec<Vec<u8>>, expected: u64) -> Vec<Result<Bytes, BlobError>> {
    let inner = stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p)))).boxed();
    futures::executor::block_on(rechunk(inner, Path::from("k"), expected).collect())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    #[test]
    fn rechunk_keeps_bytes_and_bounds_chunks(
        sizes in proptest::collection::vec(0usize..(READ_CHUNK_SIZE * 5 / 2), 0..6)
    ) {
        let pieces: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, n)| data(*n, i as u8)).collect();
        let total: usize = sizes.iter().sum();
        let out = rechunked(pieces.clone(), total as u64);
        let chunks: Vec<Bytes> = out.into_iter().collect::<Result<_, _>>().unwrap();
        proptest::prop_assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= READ_CHUNK_SIZE));
        proptest::prop_assert_eq!(chunks.concat(), pieces.concat());
    }
}

#[test]
fn rechunk_reports_a_short_read() {
    let out = rechunked(vec![vec![1; 10]], 11);
    assert!(matches!(out.last(), Some(Err(BlobError::Storage { .. }))));
}

// ---- file:// uploads: one data file, recorded hash states, commit by hard link ----

/// A `file://` store with 1,000-byte segments in a temporary directory.
fn file_store(dir: &tempfile::TempDir) -> BlobStore {
    BlobStore::from_url(&format!("file://{}", dir.path().display()))
        .unwrap()
        .with_segment_size(1_000)
}

/// The names in a directory, sorted (none if it is missing).
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().ino()
}

#[tokio::test]
async fn file_upload_is_written_once_and_linked() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir);
    let bytes = data(2_500, 11);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 2_500).await;
    send_all(&store, &s.upload_id, &bytes, 700).await;
    let session_dir = dir.path().join("uploads").join(&s.upload_id);
    assert_eq!(
        names(&session_dir),
        vec![
            "00000000000000000000.1000.state",
            "00000000000000001000.1000.state",
            "00000000000000002000.500.state",
            "data",
            "session.json",
        ]
    );
    let data_inode = inode(&session_dir.join("data"));

    let out = store.commit_upload(&s.upload_id).await.unwrap();
    assert!(!out.deduplicated);
    let hex = digest.hex();
    let blob = dir.path().join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    // The blob is the session's data file itself: no staging object, no second copy.
    assert_eq!(inode(&blob), data_inode);
    assert_eq!(names(&dir.path().join("staging")), Vec::<String>::new());
    assert_eq!(names(&session_dir), vec!["session.json"]);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    // A retried commit answers the same.
    assert!(
        store
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
}

#[tokio::test]
async fn file_upload_resumes_after_restart_and_commits_from_the_recorded_hash() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(3_700, 12);
    let digest = Digest::of(&bytes);
    let upload_id = {
        let store = file_store(&dir);
        let s = open_session(&store, digest, 3_700).await;
        let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
        writer
            .write(0, Bytes::copy_from_slice(&bytes[..1_234]))
            .await
            .unwrap();
        assert_eq!(writer.flush().await.unwrap(), 1_234);
        s.upload_id
    };
    // A restarted registry continues from the recorded offset and hash state.
    let store = file_store(&dir);
    assert_eq!(
        store.upload_status(&upload_id).await.unwrap().committed,
        1_234
    );
    send_all(&store, &upload_id, &bytes, 999).await;
    let data_file = dir.path().join("uploads").join(&upload_id).join("data");
    let data_inode = inode(&data_file);
    // And another instance commits without reading the bytes back: the blob is the data
    // file, linked.
    let out = file_store(&dir).commit_upload(&upload_id).await.unwrap();
    assert!(!out.deduplicated);
    let hex = digest.hex();
    let blob = dir.path().join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    assert_eq!(inode(&blob), data_inode);
    assert_eq!(names(&dir.path().join("staging")), Vec::<String>::new());
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn file_upload_with_a_wrong_digest_is_refused_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(2_345, 13);
    let declared = Digest::of(b"something else");
    let upload_id = {
        let store = file_store(&dir);
        let s = open_session(&store, declared, 2_345).await;
        send_all(&store, &s.upload_id, &bytes, 1_000).await;
        s.upload_id
    };
    let store = file_store(&dir);
    let e = store.commit_upload(&upload_id).await.unwrap_err();
    assert!(
        matches!(e, BlobError::DigestMismatch { actual, .. } if actual == Digest::of(&bytes)),
        "{e}"
    );
    assert!(!store.contains(&declared).await.unwrap());
    assert_eq!(names(&dir.path().join("uploads")), Vec::<String>::new());
    assert_eq!(names(&dir.path().join("blobs")), Vec::<String>::new());
}

#[tokio::test]
async fn file_upload_overwrites_a_torn_tail() {
    use std::os::unix::fs::FileExt as _;
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir);
    let bytes = data(3_000, 14);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 3_000).await;
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..1_500]))
        .await
        .unwrap();
    assert_eq!(writer.flush().await.unwrap(), 1_500);
    // A registry killed mid-write: bytes past the durable offset, no record for them.
    let data_file = dir.path().join("uploads").join(&s.upload_id).join("data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data_file)
        .unwrap()
        .write_all_at(&[0xee; 1_200], 1_500)
        .unwrap();

    let store = file_store(&dir);
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        1_500
    );
    // The resumed upload writes less than the torn tail before it pauses, then the rest.
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(1_500, Bytes::copy_from_slice(&bytes[1_500..1_700]))
        .await
        .unwrap();
    assert_eq!(writer.persist_buffered().await.unwrap(), 1_700);
    writer
        .write(1_700, Bytes::copy_from_slice(&bytes[1_700..]))
        .await
        .unwrap();
    assert_eq!(writer.flush().await.unwrap(), 3_000);
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn file_upload_refuses_other_bytes_where_bytes_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir);
    let bytes = data(2_000, 15);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 2_000).await;
    // Two writers of one session, both at offset 0.
    let mut first = store.upload_writer(&s.upload_id).await.unwrap();
    let mut second = store.upload_writer(&s.upload_id).await.unwrap();
    let mut same = store.upload_writer(&s.upload_id).await.unwrap();
    first
        .write(0, Bytes::copy_from_slice(&bytes[..1_000]))
        .await
        .unwrap();
    assert_eq!(first.persist_buffered().await.unwrap(), 1_000);
    let mut other = bytes[..1_000].to_vec();
    other[500] ^= 1;
    second.write(0, Bytes::from(other)).await.unwrap();
    let e = second.persist_buffered().await.unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::FailedPrecondition, "{e}");
    // The same bytes again are fine, and the rest continues from there.
    same.write(0, Bytes::copy_from_slice(&bytes)).await.unwrap();
    assert_eq!(same.flush().await.unwrap(), 2_000);
    let out = store.commit_upload(&s.upload_id).await.unwrap();
    assert!(!out.deduplicated);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    // A writer left over from before the commit can never write into the blob.
    first
        .write(1_000, Bytes::copy_from_slice(&bytes[1_000..]))
        .await
        .unwrap();
    let e = first.flush().await.unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::FailedPrecondition, "{e}");
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn file_upload_of_a_stored_blob_is_dedup_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir);
    let bytes = data(2_500, 16);
    let digest = Digest::of(&bytes);
    let first = open_session(&store, digest, 2_500).await;
    // Another replica raced us to a second session.
    std::fs::remove_file(
        dir.path()
            .join(store.index_key(&digest, 2_500, None).as_ref()),
    )
    .unwrap();
    let second = open_session(&store, digest, 2_500).await;
    assert_ne!(first.upload_id, second.upload_id);
    send_all(&store, &first.upload_id, &bytes, 600).await;
    send_all(&store, &second.upload_id, &bytes, 900).await;
    let replica = file_store(&dir);
    let (c1, c2) = tokio::join!(
        store.commit_upload(&first.upload_id),
        replica.commit_upload(&second.upload_id)
    );
    let (c1, c2) = (c1.unwrap(), c2.unwrap());
    // Create-only: exactly one links its data file, the other is dedup.
    assert_eq!(u8::from(c1.deduplicated) + u8::from(c2.deduplicated), 1);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    for s in [&first, &second] {
        assert_eq!(
            names(&dir.path().join("uploads").join(&s.upload_id)),
            vec!["session.json"]
        );
    }

    // An uploader that may not see the blob proves its bytes by its recorded hash.
    let third = match store
        .start_upload_as(digest, 2_500, Some("t"), false)
        .await
        .unwrap()
    {
        UploadStart::Session(s) => s,
        other => panic!("expected a session, got {other:?}"),
    };
    let mut w = store
        .upload_writer_as(&third.upload_id, Some("t"))
        .await
        .unwrap();
    w.write(0, Bytes::from(data(2_500, 17))).await.unwrap();
    w.flush().await.unwrap();
    let e = store
        .commit_upload_as(&third.upload_id, Some("t"), true)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::InvalidArgument, "{e}");
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

/// Multipart uploads in memory whose part puts wait for permits (`gate`) and whose put of
/// part `fail` fails once: to hold parts in flight, and to fail one of several.
#[derive(Debug)]
struct Gated {
    inner: Arc<MemoryParts>,
    gate: tokio::sync::Semaphore,
    fail: std::sync::Mutex<Option<usize>>,
}

#[async_trait::async_trait]
impl MultipartStore for Gated {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.inner.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<object_store::multipart::PartId> {
        let permit = self.gate.acquire().await;
        drop(permit);
        let fail = {
            let mut fail = self.fail.lock().unwrap();
            (*fail == Some(part_idx)).then(|| fail.take())
        };
        if fail.is_some() {
            return Err(object_store::Error::Generic {
                store: "Gated",
                source: format!("part {part_idx} refused once").into(),
            });
        }
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<object_store::multipart::PartId>,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

/// A store over `mem` whose part puts go through a [`Gated`] with `permits` open.
fn gated(mem: &Memory, permits: usize, fail: Option<usize>) -> (Arc<Gated>, BlobStore) {
    let gated = Arc::new(Gated {
        inner: mem.parts.clone(),
        gate: tokio::sync::Semaphore::new(permits),
        fail: std::sync::Mutex::new(fail),
    });
    let store = BlobStore::new_multipart(mem.raw.clone(), gated.clone(), Path::from("pfx"))
        .with_segment_size(1_000)
        .with_min_part_size(1_000);
    (gated, store)
}

#[tokio::test]
async fn parts_in_flight_of_a_dropped_writer_are_recorded() {
    // A handler dropped with its cut stream drops its writer while parts are still
    // being put: they finish on their own and are recorded, so the resume skips them.
    let (mem, _) = memory();
    let (gate, store) = gated(&mem, 0, None);
    let bytes = data(4_500, 8);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 4_500).await;
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..3_200]))
        .await
        .unwrap();
    // Three parts are in flight, held at the gate; nothing is recorded yet.
    assert_eq!((writer.committed(), writer.buffered()), (0, 3_200));
    drop(writer);
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        0
    );
    gate.gate
        .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    // The tasks record the parts in order, in their own time.
    let mut committed = 0;
    for _ in 0..3_000 {
        committed = store.upload_status(&s.upload_id).await.unwrap().committed;
        if committed == 3_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(committed, 3_000);
    send_all(&store, &s.upload_id, &bytes, 700).await;
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn a_failed_part_in_flight_gives_its_bytes_and_the_later_ones_back() {
    // Part 1 of parts 0-3 fails: part 0 is recorded, parts 1-3 are buffered again in
    // order (part 2 and 3 were put, but never recorded after a part that was not), and
    // the flush that follows persists them.
    let (mem, _) = memory();
    let (_, store) = gated(&mem, tokio::sync::Semaphore::MAX_PERMITS, Some(1));
    let bytes = data(4_000, 9);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 4_000).await;
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..3_999]))
        .await
        .unwrap();
    let e = writer.persist_buffered().await.unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::Unavailable, "{e}");
    assert_eq!((writer.committed(), writer.buffered()), (1_000, 2_999));
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        1_000
    );
    // The stream goes on: the next chunk follows the buffered bytes.
    writer
        .write(3_999, Bytes::copy_from_slice(&bytes[3_999..]))
        .await
        .unwrap();
    assert_eq!(writer.flush().await.unwrap(), 4_000);
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[tokio::test]
async fn a_writer_whose_upload_another_writer_completed_commits_as_dedup() {
    // Two replicas write one session; the first completes it while the second is still
    // sending: the second's parts meet a completed upload, it drops the rest of its
    // stream, and its commit answers dedup.
    let (mem, first) = memory();
    let second = mem.restart();
    let bytes = data(3_500, 10);
    let digest = Digest::of(&bytes);
    let s = open_session(&first, digest, 3_500).await;
    let mut late = second.upload_writer(&s.upload_id).await.unwrap();
    late.write(0, Bytes::copy_from_slice(&bytes[..500]))
        .await
        .unwrap();
    send_all(&first, &s.upload_id, &bytes, 900).await;
    assert!(
        !first
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
    let mut offset = 500;
    for piece in bytes[500..].chunks(700) {
        late.write(offset, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
        offset += piece.len() as u64;
    }
    assert_eq!(late.flush().await.unwrap(), 3_500);
    assert!(
        second
            .commit_upload(&s.upload_id)
            .await
            .unwrap()
            .deduplicated
    );
    assert_eq!(second.read_all(&digest).await.unwrap(), bytes);
}
