//! What a hostile client on loopback could do to a registry before issue #14, each
//! answered through gRPC: blob digests as read keys across namespaces, adapter patterns
//! that make every read slow, upload and event streams that pin memory without end, and
//! connections that never finish their handshake.

use std::time::Duration;

use bytes::Bytes;
use patchport_client::NoProgress;
use patchport_core::Digest;
use patchport_proto::v1;
use patchport_registry::Config;
use patchport_tests::{Backend, TestRegistry, base, fixtures, patch};
use tokio::io::AsyncReadExt;
use tonic::Code;

const ADMIN: &str = "admin-secret-for-tests-0123456789";

async fn secured(configure: impl FnOnce(&mut Config)) -> TestRegistry {
    TestRegistry::start_configured(Backend::Embedded, |c| {
        c.auth.admin_token = Some(ADMIN.to_owned());
        configure(c);
    })
    .await
    .unwrap()
}

async fn token(reg: &TestRegistry, namespace: &str, scope: &str) -> String {
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    admin
        .admin()
        .create_token(v1::CreateTokenRequest {
            namespace: namespace.to_owned(),
            scope: scope.to_owned(),
            expires_in_seconds: 0,
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

/// Files stored under the registry's `blobs/` (one per stored blob).
fn stored_blobs(reg: &TestRegistry) -> usize {
    fn count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    count(&reg.dir.path().join("blobs/blobs"))
}

async fn read_all(
    client: &patchport_client::Client,
    digest: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest: digest.to_owned(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

#[tokio::test]
async fn a_blob_digest_is_not_a_read_key_across_namespaces() {
    let reg = secured(|_| {}).await;
    let a = reg
        .client_as(Some(&token(&reg, "a", "push").await))
        .await
        .unwrap();
    let b = reg
        .client_as(Some(&token(&reg, "b", "push").await))
        .await
        .unwrap();
    let fixture = fixtures().join("llama-micro/v1");
    b.push_dir(&fixture, &base("b/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    let files = b
        .registry()
        .get_base_version(v1::GetVersionRequest {
            reference: "b/llama:v1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .files;
    let secret = files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();

    // `a` learns nothing about b's blob: not its existence, size or bytes.
    let (c, _) = refused(
        a.blobs()
            .stat_blob(v1::StatBlobRequest {
                digest: secret.digest.clone(),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);
    let missing = a
        .blobs()
        .find_missing_blobs(v1::FindMissingBlobsRequest {
            digests: vec![secret.digest.clone(), secret.digest.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![secret.digest.clone()]);
    let (c, msg) = refused(read_all(&a, &secret.digest).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");

    // A version of its own listing b's blobs does not make them readable: refused as
    // not uploaded.
    let (c, msg) = refused(
        a.registry()
            .push_base_version(v1::PushBaseVersionRequest {
                name: "a/stolen".into(),
                version: "v1".into(),
                files: files.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("has not been uploaded"), "{msg}");
    let (c, _) = refused(read_all(&a, &secret.digest).await);
    assert_eq!(c, Code::PermissionDenied);

    // Starting an upload of it gets a session to fill, not "already exists"; committing
    // it without the bytes proves nothing.
    let start = a
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: secret.digest.clone(),
            size: secret.size,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!start.already_exists);
    assert_eq!(start.committed_offset, 0);
    let (c, _) = refused(
        a.blobs()
            .commit_upload(v1::CommitUploadRequest {
                upload_id: start.upload_id.clone(),
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition);

    // Upload sessions are per namespace: a's start of the blob b is uploading is a
    // session of its own, and b's session is not found by a.
    let fresh = Bytes::from(vec![42u8; 10_000]);
    let fresh_digest = Digest::of(&fresh).to_string();
    let start = |who: &patchport_client::Client| {
        let mut blobs = who.blobs();
        let digest = fresh_digest.clone();
        async move {
            blobs
                .start_upload(v1::StartUploadRequest {
                    digest,
                    size: 10_000,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let by_b = start(&b).await;
    let by_a = start(&a).await;
    assert_ne!(by_a.upload_id, by_b.upload_id);
    let (c, _) = refused(
        a.blobs()
            .get_upload(v1::GetUploadRequest {
                upload_id: by_b.upload_id.clone(),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);

    // With the bytes, `a` proves possession by uploading them: its push succeeds, the
    // bytes stay stored once, and it may read them.
    let before = stored_blobs(&reg);
    let out = a
        .push_dir(&fixture, &base("a/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        out.skipped_blobs, 0,
        "every blob was invisible to a: sent again"
    );
    assert_eq!(stored_blobs(&reg), before, "content-addressed: stored once");
    let bytes = read_all(&a, &secret.digest).await.unwrap();
    assert_eq!(
        bytes,
        std::fs::read(fixture.join("model.safetensors")).unwrap()
    );
    // And b still reads its own.
    read_all(&b, &secret.digest).await.unwrap();
}

/// `rank_pattern` with `n` keys made by `key(i)`.
fn adapter_with_patterns(n: usize, key: impl Fn(usize) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama-micro/patches/lora-qv");
    patchport_tests::copy_dir(&src, dir.path()).unwrap();
    let path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let patterns: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (key(i), serde_json::json!(4))).collect();
    config["rank_pattern"] = serde_json::Value::Object(patterns);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    dir
}

#[tokio::test]
async fn hostile_adapter_patterns_are_refused_and_listing_stays_prompt() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    client
        .push_dir(
            &fixtures().join("llama-micro/v1"),
            &base("acme/llama", "v1", None),
            &NoProgress,
        )
        .await
        .unwrap();
    let push = |dir: tempfile::TempDir, version: &'static str| {
        let client = client.clone();
        async move {
            let out = client
                .push_dir(
                    dir.path(),
                    &patch("acme/qv", version, "acme/llama:v1"),
                    &NoProgress,
                )
                .await;
            drop(dir);
            out
        }
    };

    // The probe's patch: 400 keys of a large counted class.
    let hostile = adapter_with_patterns(400, |i| format!(r"k{i}x\w{{60}}"));
    let e = push(hostile, "1").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string().contains("rank_pattern") && e.to_string().contains("256"),
        "names the field and the limit: {e}"
    );
    // Few keys, each too large to compile within the bound.
    let huge = adapter_with_patterns(2, |i| format!(r"k{i}x\w{{60}}"));
    let e = push(huge, "2").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string().contains("rank_pattern") && e.to_string().contains("65536"),
        "{e}"
    );

    // At the limit: 256 keys of a realistic shape are accepted, and listing patches
    // (which reads every stored config) answers well within a client deadline.
    // (Layers past the fixture's: the patch ports as before.)
    let at_limit = adapter_with_patterns(256, |i| {
        format!(r"model\.layers\.{}\.self_attn\.(q|k|v|o)_proj", i + 1000)
    });
    push(at_limit, "3").await.unwrap();
    let listed = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .registry()
            .list_patch_versions(v1::ListRequest::default()),
    )
    .await
    .expect("list patches answers within the deadline")
    .unwrap()
    .into_inner();
    assert_eq!(listed.versions.len(), 1);
    let adapter = listed.versions[0].adapter.as_ref().unwrap();
    assert_eq!(adapter.rank_pattern.len(), 256);
}

/// An UploadChunks stream that sends `first` and then stalls (the sender is returned).
async fn stalled_upload(
    client: &patchport_client::Client,
    upload_id: &str,
    first: Bytes,
) -> (
    tokio::sync::mpsc::Sender<v1::UploadChunk>,
    tokio::task::JoinHandle<Result<v1::UploadChunksResponse, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::UploadChunk {
        upload_id: upload_id.to_owned(),
        offset: 0,
        data: first,
    })
    .await
    .unwrap();
    let mut blobs = client.blobs();
    let call = tokio::spawn(async move {
        blobs
            .upload_chunks(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    (tx, call)
}

#[tokio::test]
async fn streams_are_capped_per_caller_and_idle_ones_end() {
    let reg = secured(|c| {
        c.limits.max_upload_streams = 2;
        c.limits.max_subscriptions = 2;
        c.limits.stream_idle = Duration::from_secs(3);
    })
    .await;
    let pusher = token(&reg, "acme", "push").await;
    let client = reg.client_as(Some(&pusher)).await.unwrap();
    let other = reg
        .client_as(Some(&token(&reg, "other", "push").await))
        .await
        .unwrap();

    let blob = Bytes::from(vec![7u8; 300_000]);
    let digest = Digest::of(&blob).to_string();
    let session = client
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: digest.clone(),
            size: blob.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    // Two stalled streams take the caller's two places; the third is refused, naming
    // the limit and its flag. Another caller is not affected.
    let (_s1, first) = stalled_upload(&client, &session.upload_id, blob.slice(..100_000)).await;
    let (_s2, second) = stalled_upload(&client, &session.upload_id, blob.slice(..100_000)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_s3, third) = stalled_upload(&client, &session.upload_id, blob.slice(..100_000)).await;
    let e = third.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-upload-streams"),
        "{}",
        e.message()
    );
    let other_session = other
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: digest.clone(),
            size: blob.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    let (_o, other_call) =
        stalled_upload(&other, &other_session.upload_id, blob.slice(..1000)).await;

    // A stalled stream ends after the idle limit, and what it sent before stalling was
    // persisted: the upload resumes from there.
    let results = [first.await.unwrap(), second.await.unwrap()];
    let mut ok = 0;
    for r in results {
        match r {
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains("--stream-idle-seconds"),
                    "{}",
                    e.message()
                );
            }
            // The second stream's first chunk was refused (wrong offset) once the first
            // persisted: it ended at once.
            Ok(_) => ok += 1,
        }
    }
    assert!(ok <= 1);
    let status = client
        .blobs()
        .get_upload(v1::GetUploadRequest {
            upload_id: session.upload_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_offset, 100_000);
    let e = other_call.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // Subscriptions: two per caller, the third refused while they are open.
    let subscribe = |c: &patchport_client::Client| {
        let mut events = c.events();
        async move {
            events
                .subscribe(v1::SubscribeRequest {
                    cursor: "0".into(),
                    ..Default::default()
                })
                .await
        }
    };
    let sub1 = subscribe(&client).await.unwrap();
    let sub2 = subscribe(&client).await.unwrap();
    let (c, msg) = refused(subscribe(&client).await);
    assert_eq!(c, Code::ResourceExhausted);
    assert!(msg.contains("--max-subscriptions"), "{msg}");
    subscribe(&other).await.unwrap();
    // Closing one frees its place.
    drop(sub1);
    let mut again = None;
    for _ in 0..50 {
        match subscribe(&client).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(again.is_some(), "a closed subscription frees its place");
    drop(sub2);
}

#[tokio::test]
async fn a_connection_that_never_starts_its_handshake_is_dropped() {
    let reg = TestRegistry::start_configured(Backend::Embedded, |c| {
        c.limits.handshake_timeout = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let addr = reg.url.trim_start_matches("http://").to_owned();
    // Connects and sends nothing: the server closes the connection after the timeout.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The server's own preface (SETTINGS) may arrive first.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent connection is closed by the server"
    );
    // A real client is served as before.
    let client = reg.client().await.unwrap();
    client
        .registry()
        .list_base_versions(v1::ListRequest::default())
        .await
        .unwrap();
}
