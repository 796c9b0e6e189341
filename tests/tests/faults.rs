//! Fault tests in one process: blob storage that fails under the registry and under the
//! blob store's reads in ranges (through a fault-injecting `ObjectStore`), and a Postgres
//! server stopped and started again under load (a private cluster, so the test may
//! restart it).
//!
//! What must hold: a request that meets a broken store fails with Unavailable and a
//! message without internals, changes nothing visible, and works once the store is back;
//! reads that meet one transient failure are retried and succeed; writes are retried by
//! the client's resumable upload.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use patchport_client::{Client, ClientError, NoProgress};
use patchport_core::Digest;
use patchport_proto::v1;
use patchport_registry::Config;
use patchport_store::blobs::{BlobError, BlobErrorKind, BlobStore, READ_ATTEMPTS, READ_CHUNK_SIZE};
use patchport_tests::faults::{Faults, FaultyStore, Op, faulty_registry, faulty_registry_with};
use patchport_tests::postgres::PrivatePostgres;
use patchport_tests::{TestRegistry, base, fixtures, patch, query_i64s, read_tree};
use tonic::Code;

fn v1_dir() -> std::path::PathBuf {
    fixtures().join("llama-micro/v1")
}

fn digest_of(path: &Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

/// The status a failed request must carry: Unavailable, and a message that names
/// neither keys nor the backend's own words.
fn assert_clean_unavailable(e: &ClientError, what: &str) {
    assert_eq!(e.code(), Some(Code::Unavailable), "{what}: {e}");
    let msg = e.to_string();
    assert!(msg.contains("temporarily unavailable"), "{what}: {msg}");
    for internal in [
        "injected", "faulty", "blobs/", "uploads/", "staging/", "sha256/",
    ] {
        assert!(
            !msg.contains(internal),
            "{what}: message leaks {internal:?}: {msg}"
        );
    }
}

/// Every object under `blobs/sha256/` holds bytes that hash to its name: nothing
/// unverified was ever promoted.
fn assert_every_blob_verified(files: &Path) {
    let root = files.join("blobs/sha256");
    let Ok(fanouts) = std::fs::read_dir(&root) else {
        return;
    };
    for fanout in fanouts {
        for blob in std::fs::read_dir(fanout.unwrap().path()).unwrap() {
            let blob = blob.unwrap();
            let name = blob.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.contains('#') {
                continue; // the local store's in-flight temporary files
            }
            assert_eq!(
                digest_of(&blob.path()).hex(),
                name,
                "blob {name} does not hold its bytes"
            );
        }
    }
}

async fn base_exists(client: &Client, reference: &str) -> bool {
    match client
        .registry()
        .get_base_version(v1::GetVersionRequest {
            reference: reference.to_owned(),
        })
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => panic!("get {reference}: {s}"),
    }
}

async fn missing(client: &Client, digests: &[Digest]) -> Vec<String> {
    client
        .blobs()
        .find_missing_blobs(v1::FindMissingBlobsRequest {
            digests: digests.iter().map(Digest::to_string).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .missing
}

async fn pull_matches(client: &Client, reference: &str, dir: &Path) -> Result<(), ClientError> {
    let out = tempfile::tempdir().unwrap();
    client
        .pull(&reference.parse().unwrap(), out.path(), false, &NoProgress)
        .await?;
    assert_eq!(read_tree(out.path()), read_tree(dir), "{reference} differs");
    Ok(())
}

#[tokio::test]
async fn a_broken_blob_store_fails_pushes_cleanly_and_leaves_nothing_half_stored() {
    let model = digest_of(&v1_dir().join("model.safetensors"));
    // Each write path of a push, broken until further notice.
    for op in [
        Op::Put,
        Op::PutMultipart,
        Op::PutPart,
        Op::CompleteMultipart,
        Op::List,
        Op::Head,
    ] {
        let (reg, faults, files) = faulty_registry().await;
        let client = reg.client().await.unwrap();
        faults.fail_always(op);
        let err = client
            .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
            .await
            .expect_err("a push over a broken store fails");
        assert_clean_unavailable(&err, &format!("{op:?}"));
        assert!(faults.injected() > 0, "{op:?}: the fault was never hit");
        faults.clear();

        // Nothing visible: no version, no blob for the file whose upload broke, and
        // every blob that is stored was verified.
        assert!(!base_exists(&client, "acme/llama:v1").await, "{op:?}");
        assert_eq!(
            missing(&client, &[model]).await,
            vec![model.to_string()],
            "{op:?}"
        );
        assert_every_blob_verified(files.path());

        // The store is back: the same push works, and pulls back byte for byte.
        client
            .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
            .await
            .unwrap_or_else(|e| panic!("{op:?}: push after the store came back: {e}"));
        pull_matches(&client, "acme/llama:v1", &v1_dir())
            .await
            .unwrap();
        assert_every_blob_verified(files.path());
    }
}

#[tokio::test]
async fn a_part_write_that_fails_once_is_resent_by_the_resumable_upload() {
    let (reg, faults, files) = faulty_registry().await;
    let client = reg.client().await.unwrap();
    // One part of an upload fails.
    faults.fail(Op::PutPart, 1);
    let out = client
        .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .expect("the client resumes from the committed offset");
    assert!(out.created);
    assert_eq!(faults.injected(), 1);
    pull_matches(&client, "acme/llama:v1", &v1_dir())
        .await
        .unwrap();
    assert_every_blob_verified(files.path());
}

/// A safetensors blob uploaded whole in one stream is indexed as its bytes arrive: the
/// push that names it reads none of them back (every blob read, a ranged get, of that
/// blob fails here), and its tensor index is the one its bytes give.
#[tokio::test]
async fn a_push_reads_back_no_safetensors_blob_that_arrived_in_one_stream() {
    let (reg, faults, files) = faulty_registry().await;
    let client = reg.client().await.unwrap();
    let bytes = std::fs::read(v1_dir().join("model.safetensors")).unwrap();
    let hex = Digest::of(&bytes).hex();
    faults.fail_matching(Op::GetRange, &hex, None);
    let out = client
        .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .expect("the push needs no read of the uploaded model file");
    assert!(out.created);
    assert_eq!(faults.injected(), 0, "the model file was read back");
    faults.clear();

    let mut indexer = patchport_core::layout::TensorIndexer::new(bytes.len() as u64);
    indexer.feed(&bytes).unwrap();
    let (_, expected) = indexer.finish().unwrap();
    let stored = client
        .registry()
        .get_tensor_index(v1::GetVersionRequest {
            reference: "acme/llama:v1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tensors;
    let stored: BTreeMap<_, _> = stored.into_iter().map(|t| (t.name, t.digest)).collect();
    let expected: BTreeMap<_, _> = expected
        .into_iter()
        .map(|t| (t.name, t.digest.to_string()))
        .collect();
    assert_eq!(stored, expected);
    pull_matches(&client, "acme/llama:v1", &v1_dir())
        .await
        .unwrap();
    assert_every_blob_verified(files.path());
}

#[tokio::test]
async fn reads_that_fail_once_are_retried_and_reads_that_keep_failing_fail_cleanly() {
    let (reg, faults, _files) = faulty_registry().await;
    reads_fail_once_then_always(&reg, &faults, "").await;
}

/// The same over a store that reads in ranges, as on S3 (the model file is nine ranges,
/// four GETs in flight), the single failures on the model file's reads: a failed GET or
/// a broken body is retried within its range.
#[tokio::test]
async fn reads_in_ranges_that_fail_once_are_retried_and_reads_that_keep_failing_fail_cleanly() {
    let (reg, faults, _files) = faulty_registry_with(|blobs| {
        blobs
            .with_read_concurrency(4)
            .with_read_range_size(64 << 10)
    })
    .await;
    let model = digest_of(&v1_dir().join("model.safetensors"));
    reads_fail_once_then_always(&reg, &faults, &model.hex()).await;
}

/// Pulls over reads that fail once (those of keys containing `key`), then over reads
/// that keep failing.
async fn reads_fail_once_then_always(reg: &TestRegistry, faults: &Faults, key: &str) {
    let client = reg.client().await.unwrap();
    client
        .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    // One failure of each kind of read, one at a time: the pull does not notice.
    for (n, op) in [Op::Head, Op::GetRange, Op::ReadBody]
        .into_iter()
        .enumerate()
    {
        faults.fail_matching(op, key, Some(1));
        pull_matches(&client, "acme/llama:v1", &v1_dir())
            .await
            .unwrap_or_else(|e| panic!("{op:?} failing once: {e}"));
        assert_eq!(faults.injected(), n + 1, "{op:?} was not hit");
        faults.clear();
    }
    // A read that keeps failing gives up with Unavailable, and changes nothing.
    for op in [Op::GetRange, Op::ReadBody] {
        faults.fail_always(op);
        let err = pull_matches(&client, "acme/llama:v1", &v1_dir())
            .await
            .expect_err("a pull over a broken store fails");
        assert_clean_unavailable(&err, &format!("{op:?}"));
        faults.clear();
        pull_matches(&client, "acme/llama:v1", &v1_dir())
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The blob store's reads in ranges, over a store that fails chosen GETs (no registry).

/// Range size of [`ranged_reader`]: odd, so ranges and chunks never line up.
const RANGE: u64 = 9_973;

/// Deterministic bytes that differ per seed.
fn bytes_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 2_654_435_761) >> 7) as u8 ^ seed)
        .collect()
}

/// A blob store over a fault-injecting in-memory store, reading with 4 GETs in flight
/// in ranges of `range` bytes; holds `bytes`.
async fn ranged_reader(bytes: &[u8], range: u64) -> (Arc<Faults>, BlobStore, Digest) {
    let (faulty, faults) = FaultyStore::new(Arc::new(InMemory::new()));
    let store = BlobStore::new(Arc::new(faulty), ObjectPath::default())
        .with_read_concurrency(4)
        .with_read_range_size(range as usize);
    let digest = store
        .put_bytes(Bytes::copy_from_slice(bytes))
        .await
        .unwrap();
    (faults, store, digest)
}

/// The bytes of a read, or its error with what arrived before it.
async fn read_all(
    store: &BlobStore,
    digest: &Digest,
    offset: u64,
    len: Option<u64>,
) -> (Vec<u8>, Option<BlobError>) {
    let mut stream = match store.read(digest, offset, len).await {
        Ok(s) => s,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => read.extend_from_slice(&c),
            Err(e) => {
                assert!(
                    stream.next().await.is_none(),
                    "nothing comes after an error"
                );
                return (read, Some(e));
            }
        }
    }
    (read, None)
}

#[tokio::test]
async fn a_range_whose_get_fails_once_is_retried() {
    let bytes = bytes_of(200_000, 7);
    let (faults, store, digest) = ranged_reader(&bytes, RANGE).await;
    // Ranges start at the read's offset: 5, 5 + RANGE, 5 + 2 RANGE, ...
    faults.fail_range(Op::GetRange, 5 + 3 * RANGE, 1);
    faults.fail_range(Op::ReadBody, 5 + 7 * RANGE, 1);
    let (read, err) = read_all(&store, &digest, 5, None).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(read, &bytes[5..]);
    assert_eq!(faults.pending(), 0, "a fault was not met");
    // One GET per range, the failed one retried, the broken body resumed.
    let ranges = (bytes.len() as u64 - 5).div_ceil(RANGE) as usize;
    assert_eq!(faults.ranged_gets(), ranges + 2);
}

#[tokio::test]
async fn a_range_that_keeps_failing_fails_the_read() {
    let bytes = bytes_of(200_000, 8);
    let (faults, store, digest) = ranged_reader(&bytes, RANGE).await;
    faults.fail_range(Op::GetRange, 4 * RANGE, READ_ATTEMPTS as usize);
    let (read, err) = read_all(&store, &digest, 0, None).await;
    let err = err.expect("the read ends with an error");
    assert_eq!(err.kind(), BlobErrorKind::Unavailable, "{err}");
    // What came before the failure is the blob's start.
    assert_eq!(read, &bytes[..read.len()]);
    assert!(read.len() as u64 <= 4 * RANGE);
    assert_eq!(faults.pending(), 0);
}

#[tokio::test]
async fn a_blob_gone_when_its_read_opens_is_not_found() {
    let bytes = bytes_of(200_000, 9);
    let (faults, store, digest) = ranged_reader(&bytes, RANGE).await;
    for (offset, len) in [(0, None), (10, Some(100))] {
        faults.vanish_range(offset, 1);
        let err = match store.read(&digest, offset, len).await {
            Ok(_) => panic!("a read of a vanished blob opened"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), BlobErrorKind::NotFound, "{err}");
        assert!(matches!(err, BlobError::BlobNotFound { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn a_read_in_ranges_holds_at_most_its_concurrency_ahead() {
    let chunk = READ_CHUNK_SIZE as u64;
    let bytes = bytes_of(READ_CHUNK_SIZE * 10, 10);
    let (faults, store, digest) = ranged_reader(&bytes, chunk).await;
    let mut stream = store.read(&digest, 0, None).await.unwrap();
    let first = stream.next().await.expect("a chunk").expect("read");
    assert_eq!(first, &bytes[..READ_CHUNK_SIZE]);
    // The consumer took one chunk: no more than 4 ranges were asked for.
    let gets = faults.ranged_gets();
    assert!(gets <= 4, "{gets} GETs for one chunk");
    drop(stream);
    assert_eq!(faults.ranged_gets(), gets);
    assert_eq!(read_all(&store, &digest, 0, None).await.0, bytes);
}

/// What one request of the load saw.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    /// Failed requests by gRPC code, with one message of each.
    failed: BTreeMap<String, (usize, String)>,
    /// Patch pushes that returned success.
    pushed: Vec<String>,
}

impl Tally {
    fn record(&mut self, r: Result<(), ClientError>) {
        match r {
            Ok(()) => self.ok += 1,
            Err(e) => {
                let code = e
                    .code()
                    .map_or_else(|| "transport".to_owned(), |c| format!("{c:?}"));
                let entry = self.failed.entry(code).or_insert((0, e.to_string()));
                entry.0 += 1;
            }
        }
    }
}

/// Pushes patch versions and asks compat queries until `stop`.
async fn load(url: String, worker: usize, stop: Arc<AtomicBool>) -> Tally {
    let client = Client::connect(&url).await.unwrap();
    let qv = fixtures().join("llama-micro/patches/lora-qv");
    let mut tally = Tally::default();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("acme/l{worker}-{i}");
        let pushed = client
            .push_dir(&qv, &patch(&name, "1", "acme/llama:v1"), &NoProgress)
            .await
            .map(|_| ());
        if pushed.is_ok() {
            tally.pushed.push(format!("{name}:1"));
        }
        tally.record(pushed);
        let compat = client
            .ports()
            .query_compat(v1::QueryCompatRequest {
                subject: Some(v1::query_compat_request::Subject::Base(
                    "acme/llama:v1".to_owned(),
                )),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(ClientError::from);
        tally.record(compat);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tally
}

async fn blocking(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) {
    tokio::task::spawn_blocking(f).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a local PostgreSQL installation (initdb, pg_ctl); scripts/test.sh runs it where there is one"]
async fn the_registry_rides_out_a_postgres_restart_under_load() {
    let pg = match PrivatePostgres::start().unwrap() {
        Ok(pg) => Arc::new(pg),
        Err(why) => panic!("this test runs its own Postgres server and cannot here: {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: pg.url(),
        blobs: format!("file://{}/blobs", dir.path().display()),
        lease: Duration::from_secs(30),
        ..Config::default()
    };
    let reg = TestRegistry::start_config(config, dir).await.unwrap();
    let client = reg.client().await.unwrap();
    client
        .push_dir(&v1_dir(), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(load(reg.url.clone(), w, stop.clone())))
        .collect();
    let list = || async {
        client
            .registry()
            .list_patch_versions(v1::ListRequest::default())
            .await
            .map(|r| r.into_inner().versions.len())
    };
    // Load runs against a healthy database first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while list().await.unwrap() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress under load"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Postgres goes down (fast shutdown: sessions cut, open transactions rolled back).
    let p = pg.clone();
    blocking(move || p.stop()).await;
    // Requests fail with Unavailable; they neither hang nor panic.
    let during = tokio::time::timeout(Duration::from_secs(60), list())
        .await
        .expect("a request during the outage answers instead of hanging");
    let status = during.expect_err("no database, no answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("temporarily unavailable")
            && !status.message().contains("postgres")
            && !status.message().contains("sqlx"),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Postgres comes back; the same registry process serves again.
    let p = pg.clone();
    blocking(move || p.start_server()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        match list().await {
            Ok(n) => break n,
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the registry did not reconnect: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // And keeps doing so under load.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while list().await.unwrap() < before + 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut pushed = Vec::new();
    let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut ok = 0;
    for w in workers {
        let t = w.await.unwrap();
        ok += t.ok;
        pushed.extend(t.pushed);
        for (code, (n, msg)) in t.failed {
            failures.entry(code).or_insert((0, msg)).0 += n;
        }
    }
    eprintln!("load: {ok} requests succeeded, failures by code: {failures:?}");
    for (code, (_, msg)) in &failures {
        assert_eq!(code, "Unavailable", "a request failed otherwise: {msg}");
    }

    // Every version is whole or absent: every push that succeeded is there, and every
    // version there pulls back byte for byte.
    let versions = client
        .registry()
        .list_patch_versions(v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions;
    let listed: std::collections::BTreeSet<String> = versions
        .iter()
        .map(|v| format!("{}:{}", v.name, v.version))
        .collect();
    for p in &pushed {
        assert!(listed.contains(p), "{p} was pushed but is gone");
    }
    let qv = fixtures().join("llama-micro/patches/lora-qv");
    for r in &listed {
        pull_matches(&client, r, &qv).await.unwrap();
    }
    // And in the database: no version without its files, one event per version.
    let db = pg.url();
    let partial = query_i64s(
        &db,
        "SELECT COUNT(*) FROM patch_versions p WHERE \
         (SELECT COUNT(*) FROM patch_files f WHERE f.version_id = p.id) <> 3",
    )
    .await
    .unwrap();
    assert_eq!(partial, vec![0], "versions with missing file rows");
    let rows = query_i64s(&db, "SELECT COUNT(*) FROM patch_versions")
        .await
        .unwrap();
    let events = query_i64s(
        &db,
        "SELECT COUNT(*) FROM events WHERE kind = 'patch.pushed'",
    )
    .await
    .unwrap();
    assert_eq!(rows, events, "one patch.pushed event per version");
    assert_eq!(rows[0] as usize, listed.len());
}
