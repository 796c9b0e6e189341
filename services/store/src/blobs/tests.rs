//! Unit tests that look inside the store: the key layout, what a commit leaves behind,
//! two sessions for one blob, the read re-chunking. The behaviour every backend must show
//! is in `tests/blobs.rs`.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use patchport_core::Digest;

use super::*;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn memory() -> (Arc<dyn ObjectStore>, BlobStore) {
    let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = BlobStore::new(raw.clone(), Path::from("pfx")).with_segment_size(1_000);
    (raw, store)
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
    let (raw, store) = memory();
    let bytes = data(2_500, 1);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 2_500).await;
    send_all(&store, &s.upload_id, &bytes, 700).await;
    let id = &s.upload_id;
    let hex = digest.hex();
    assert_eq!(
        keys(&raw).await,
        vec![
            format!("pfx/upload-index/{hex}.2500"),
            format!("pfx/uploads/{id}/00000000000000000000"),
            format!("pfx/uploads/{id}/00000000000000001000"),
            format!("pfx/uploads/{id}/00000000000000002000"),
            format!("pfx/uploads/{id}/session.json"),
        ]
    );
    // The uninterrupted upload's running hash covers every byte.
    assert_eq!(
        store.hashers().get(id.as_str()).map(|h| h.len()),
        Some(2_500)
    );

    store.commit_upload(id).await.unwrap();
    // The blob, and the committed session's record (so a retried commit answers the same).
    assert_eq!(
        keys(&raw).await,
        vec![
            format!("pfx/blobs/sha256/{}/{hex}", &hex[..2]),
            format!("pfx/uploads/{id}/session.json"),
        ]
    );
    assert!(store.hashers().is_empty());
    assert_eq!(
        store
            .expire_uploads(std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        keys(&raw).await,
        vec![format!("pfx/blobs/sha256/{}/{hex}", &hex[..2])]
    );
}

#[tokio::test]
async fn digest_mismatch_leaves_nothing() {
    let (raw, store) = memory();
    let bytes = data(2_500, 2);
    let s = open_session(&store, Digest::of(b"other"), 2_500).await;
    send_all(&store, &s.upload_id, &bytes, 999).await;
    // A fresh instance has no running hash: it streams, hashes and aborts.
    let restarted = BlobStore::new(raw.clone(), Path::from("pfx")).with_segment_size(1_000);
    let e = restarted.commit_upload(&s.upload_id).await.unwrap_err();
    assert_eq!(e.kind(), BlobErrorKind::InvalidArgument);
    assert_eq!(keys(&raw).await, Vec::<String>::new());
}

#[tokio::test]
async fn two_sessions_for_one_blob_both_commit() {
    let (raw, store) = memory();
    let bytes = data(5_000, 3);
    let digest = Digest::of(&bytes);
    let first = open_session(&store, digest, 5_000).await;
    // Without the index entry (another replica raced us), the next start makes a new session.
    raw.delete(&store.index_key(&digest, 5_000, None))
        .await
        .unwrap();
    let second = open_session(&store, digest, 5_000).await;
    assert_ne!(first.upload_id, second.upload_id);

    let other = BlobStore::new(raw.clone(), Path::from("pfx")).with_segment_size(1_000);
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
    assert_eq!(u8::from(c1.deduplicated) + u8::from(c2.deduplicated), 1);
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    assert!(
        !keys(&raw)
            .await
            .iter()
            .any(|k| k.contains("staging") || k.contains("index"))
    );
}

#[tokio::test]
async fn a_changed_segment_is_never_promoted_unverified() {
    // Another writer on the same session replaced a segment with other bytes after this
    // instance hashed the original: the commit hashes what it moves, so it refuses.
    let (raw, store) = memory();
    let bytes = data(3_000, 4);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 3_000).await;
    send_all(&store, &s.upload_id, &bytes, 1_000).await;
    let key = store.segment_key(&s.upload_id, 1_000);
    raw.put(&key, Bytes::from(vec![0u8; 1_000]).into())
        .await
        .unwrap();
    let e = store.commit_upload(&s.upload_id).await.unwrap_err();
    assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
    assert!(!store.contains(&digest).await.unwrap());
}

#[tokio::test]
async fn resume_after_partial_flush_keeps_unaligned_segments() {
    let (_raw, store) = memory();
    let bytes = data(4_321, 5);
    let digest = Digest::of(&bytes);
    let s = open_session(&store, digest, 4_321).await;
    let mut writer = store.upload_writer(&s.upload_id).await.unwrap();
    writer
        .write(0, Bytes::copy_from_slice(&bytes[..1_234]))
        .await
        .unwrap();
    assert_eq!(writer.committed(), 1_000);
    assert_eq!(writer.flush().await.unwrap(), 1_234);
    send_all(&store, &s.upload_id, &bytes, 777).await;
    assert_eq!(
        store.upload_status(&s.upload_id).await.unwrap().committed,
        4_321
    );
    store.commit_upload(&s.upload_id).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

#[test]
fn s3_url_sets_bucket_and_prefix() {
    let store = BlobStore::from_url("s3://some-bucket/team/blobs/").unwrap();
    assert_eq!(store.prefix.as_ref(), "team/blobs");
    assert_eq!(store.max_copy_size, S3_MAX_COPY_SIZE);
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
