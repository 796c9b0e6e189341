//! The registry foundation, end to end through gRPC: every fixture round-trips byte for
//! byte, uploads resume and dedupe, pushes are immutable and all-or-nothing.

use patchport_client::{NoProgress, PushKind};
use patchport_core::AnyRef;
use patchport_proto::v1;
use patchport_tests::{Backend, TestRegistry, backends, base, fixtures, patch, read_tree};

/// Every model and adapter directory of the fixtures, as (dir, kind, reference).
fn fixture_versions() -> Vec<(std::path::PathBuf, PushKind, String)> {
    let f = fixtures();
    let mut out = Vec::new();
    for (family, bases) in [
        ("gpt2-micro", &["v1", "v2"][..]),
        (
            "llama-micro",
            &["v1", "v2", "v2-bf16", "v2-f16", "v2-sharded", "v3-vocab"][..],
        ),
        ("task-llama", &["v1", "v2", "v2-drift"][..]),
    ] {
        let name = format!("fixtures/{family}");
        for v in bases {
            let parent = (*v != "v1").then_some("v1");
            out.push((
                f.join(family).join(v),
                base(&name, v, parent),
                format!("{name}:{v}"),
            ));
        }
        let expected = f.join(family).join("expected");
        if expected.is_dir() {
            let mut dirs: Vec<_> = std::fs::read_dir(&expected)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            dirs.sort();
            for d in dirs {
                let v = d.file_name().unwrap().to_string_lossy().replace('@', "-");
                let name = format!("fixtures/{family}-expected");
                out.push((d, base(&name, &v, None), format!("{name}:{v}")));
            }
        }
        let mut patches: Vec<_> = std::fs::read_dir(f.join(family).join("patches"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        patches.sort();
        for p in patches {
            let pname = format!(
                "fixtures/{family}-{}",
                p.file_name().unwrap().to_string_lossy()
            );
            out.push((
                p,
                patch(&pname, "1", &format!("{name}:v1")),
                format!("{pname}:1"),
            ));
        }
    }
    out
}

#[tokio::test]
async fn every_fixture_pushes_and_pulls_back_byte_identical() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let versions = fixture_versions();
        for (dir, kind, reference) in &versions {
            let out = client
                .push_dir(dir, kind, &NoProgress)
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: push {}: {e}", dir.display()));
            assert!(out.created, "{reference}");
        }
        for (dir, _, reference) in &versions {
            let out = tempfile::tempdir().unwrap();
            let r: AnyRef = reference.parse().unwrap();
            client
                .pull(&r, out.path(), false, &NoProgress)
                .await
                .unwrap();
            let want = read_tree(dir);
            let got = read_tree(out.path());
            assert_eq!(
                want.keys().collect::<Vec<_>>(),
                got.keys().collect::<Vec<_>>(),
                "{backend:?} {reference}"
            );
            for (path, bytes) in &want {
                assert!(
                    got[path] == *bytes,
                    "{backend:?} {reference}: {path} differs"
                );
            }
        }
        // The tensor index is there for every safetensors file.
        let ix = client
            .registry()
            .get_tensor_index(v1::GetVersionRequest {
                reference: "fixtures/llama-micro:v2-sharded".to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            ix.tensors
                .iter()
                .any(|t| t.name == "model.layers.0.self_attn.q_proj.weight"
                    && t.file.starts_with("model-0000")
                    && t.shape == vec![64, 64]
                    && t.dtype == "F32")
        );
        let files: std::collections::BTreeSet<_> =
            ix.tensors.iter().map(|t| t.file.clone()).collect();
        assert_eq!(files.len(), 6);
    }
}

/// A tensor whose bytes did not change between v1 and v2 has the same tensor digest, so
/// "which tensors changed" needs no bytes.
#[tokio::test]
async fn tensor_index_tells_which_tensors_changed() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v2"), &base("acme/llama", "v2", None), &NoProgress)
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("v2-sharded"),
            &base("acme/llama", "v2s", None),
            &NoProgress,
        )
        .await
        .unwrap();
    let index = |r: &str| {
        let mut c = client.registry();
        let r = r.to_owned();
        async move {
            c.get_tensor_index(v1::GetVersionRequest { reference: r })
                .await
                .unwrap()
                .into_inner()
                .tensors
                .into_iter()
                .map(|t| (t.name, t.digest))
                .collect::<std::collections::BTreeMap<_, _>>()
        }
    };
    // Same weights, different sharding: every tensor digest is equal.
    assert_eq!(index("acme/llama:v2").await, index("acme/llama:v2s").await);
}

#[tokio::test]
async fn a_re_push_sends_only_changed_blobs_and_the_same_version_twice_sends_nothing() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let f = fixtures().join("llama-micro");
        let v1 = client
            .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
            .await
            .unwrap();
        assert_eq!(v1.uploaded_blobs, 3);
        let v1_digests: std::collections::BTreeSet<String> = v1
            .base
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.digest)
            .collect();
        let v2_files = patchport_client::scan_dir(&f.join("v2")).unwrap();
        let changed = v2_files
            .iter()
            .filter(|f| !v1_digests.contains(&f.digest.to_string()))
            .count();
        assert!(
            changed >= 1 && changed < v2_files.len(),
            "fixture v2 shares config files with v1"
        );
        let v2 = client
            .push_dir(
                &f.join("v2"),
                &base("acme/llama", "v2", Some("v1")),
                &NoProgress,
            )
            .await
            .unwrap();
        assert_eq!(v2.uploaded_blobs, changed, "{backend:?}");
        assert_eq!(v2.skipped_blobs, v2_files.len() - changed);
        let again = client
            .push_dir(
                &f.join("v2"),
                &base("acme/llama", "v2", Some("v1")),
                &NoProgress,
            )
            .await
            .unwrap();
        assert!(!again.created);
        assert_eq!(again.uploaded_blobs, 0);
        assert_eq!(again.uploaded_bytes, 0);
        let b = again.base.unwrap();
        assert_eq!(b.parent, "v1");
    }
}

/// Sends the first `half` bytes of `data` as an upload and then drops the stream
/// mid-call (the connection is cut, not closed cleanly).
async fn cut_upload(
    reg: &TestRegistry,
    data: &[u8],
    cut_at: usize,
) -> (String, patchport_core::Digest) {
    let client = reg.client().await.unwrap();
    let digest = patchport_core::Digest::of(data);
    let start = client
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: digest.to_string(),
            size: data.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut blobs = client.blobs();
    let call = tokio::spawn(async move {
        blobs
            .upload_chunks(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let chunk = 256 << 10;
    let mut offset = 0;
    while offset < cut_at {
        let end = (offset + chunk).min(cut_at);
        tx.send(v1::UploadChunk {
            upload_id: start.upload_id.clone(),
            offset: offset as u64,
            data: bytes::Bytes::copy_from_slice(&data[offset..end]),
        })
        .await
        .unwrap();
        offset = end;
    }
    // Give the server time to receive, then cut the connection without ending the stream.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    call.abort();
    let _ = call.await;
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    (start.upload_id, digest)
}

#[tokio::test]
async fn an_upload_cut_halfway_resumes_from_the_committed_offset_after_a_restart() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        // A blob larger than one storage segment so a cut leaves whole segments behind.
        let data: Vec<u8> = (0..40u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let half = data.len() / 2;
        let (upload_id, digest) = cut_upload(&reg, &data, half).await;
        let persistent = !reg.config.blobs.starts_with("memory://");
        let reg = if persistent {
            reg.restart().await.unwrap()
        } else {
            reg
        };
        let client = reg.client().await.unwrap();
        let status = client
            .blobs()
            .get_upload(v1::GetUploadRequest {
                upload_id: upload_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            status.committed_offset > 0,
            "{backend:?}: nothing was kept of the first half"
        );
        assert!(status.committed_offset <= half as u64);
        // The blob is not visible before it is complete and verified.
        let missing = client
            .blobs()
            .find_missing_blobs(v1::FindMissingBlobsRequest {
                digests: vec![digest.to_string()],
            })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert_eq!(missing, vec![digest.to_string()]);
        // The client resumes: it sends only what the registry lacks.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &data).unwrap();
        let sent = client
            .upload_file(tmp.path(), digest, data.len() as u64, "blob", &NoProgress)
            .await
            .unwrap();
        assert_eq!(
            sent,
            data.len() as u64 - status.committed_offset,
            "{backend:?}"
        );
        let stat = client
            .blobs()
            .stat_blob(v1::StatBlobRequest {
                digest: digest.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stat.size, data.len() as u64);
        // And it reads back byte for byte, also by range.
        let mut got = Vec::new();
        let mut stream = client
            .blobs()
            .read_blob(v1::ReadBlobRequest {
                digest: digest.to_string(),
                offset: 0,
                length: 0,
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(c) = futures::StreamExt::next(&mut stream).await {
            got.extend_from_slice(&c.unwrap().data);
        }
        assert!(got == data);
        let mut ranged = Vec::new();
        let mut stream = client
            .blobs()
            .read_blob(v1::ReadBlobRequest {
                digest: digest.to_string(),
                offset: 12345,
                length: 3_000_000,
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(c) = futures::StreamExt::next(&mut stream).await {
            ranged.extend_from_slice(&c.unwrap().data);
        }
        assert!(ranged == data[12345..12345 + 3_000_000]);
    }
}

#[tokio::test]
async fn concurrent_pushes_of_the_same_blobs_are_safe() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let dir = fixtures().join("llama-micro").join("v1");
    let mut tasks = Vec::new();
    for i in 0..4 {
        let url = reg.url.clone();
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            let client = patchport_client::Client::connect(&url).await.unwrap();
            client
                .push_dir(
                    &dir,
                    &base("acme/llama", &format!("v1-{}", i % 2), None),
                    &NoProgress,
                )
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let client = reg.client().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    client
        .pull(
            &"acme/llama:v1-0".parse().unwrap(),
            out.path(),
            false,
            &NoProgress,
        )
        .await
        .unwrap();
    assert_eq!(read_tree(out.path()), read_tree(&dir));
}

/// grpcurl works: reflection lists every service, and health says SERVING.
#[tokio::test]
async fn reflection_and_health_are_served() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(reg.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "patchport.v1.BlobService",
        "patchport.v1.RegistryService",
        "patchport.v1.PortService",
        "patchport.v1.EventService",
        "patchport.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Every page of a compat query by base, `page_size` at a time, in order.
async fn compat_pages(
    client: &patchport_client::Client,
    base: &str,
    page_size: u32,
) -> Vec<Vec<(String, i32)>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .ports()
            .query_compat(v1::QueryCompatRequest {
                subject: Some(v1::query_compat_request::Subject::Base(base.into())),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(
            page.entries
                .into_iter()
                .map(|e| (e.patch, e.kind))
                .collect(),
        );
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn listings_and_compat_come_in_pages_that_add_up_to_the_whole_answer() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let f = fixtures().join("llama-micro");
        let lora = f.join("patches/lora-qv");
        client
            .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
            .await
            .unwrap();
        for i in 1..=3 {
            client
                .push_dir(
                    &lora,
                    &patch(&format!("acme/old{i}"), "1", "acme/llama:v1"),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
        // Publishing v2 queues a port of each of the three onto it.
        client
            .push_dir(
                &f.join("v2"),
                &base("acme/llama", "v2", Some("v1")),
                &NoProgress,
            )
            .await
            .unwrap();
        for i in 1..=2 {
            client
                .push_dir(
                    &lora,
                    &patch(&format!("acme/new{i}"), "1", "acme/llama:v2"),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
        let native = v1::CompatKind::Native as i32;
        let queued = v1::CompatKind::Queued as i32;
        let whole = vec![
            ("acme/new1:1".to_owned(), native),
            ("acme/new2:1".to_owned(), native),
            ("acme/old1:1".to_owned(), queued),
            ("acme/old2:1".to_owned(), queued),
            ("acme/old3:1".to_owned(), queued),
        ];
        for size in [1, 2, 3, 5, 0] {
            let pages = compat_pages(&client, "acme/llama:v2", size).await;
            assert!(
                pages
                    .iter()
                    .all(|p| p.len() <= size.max(1) as usize || size == 0),
                "{backend:?} size {size}: {pages:?}"
            );
            assert_eq!(pages.concat(), whole, "{backend:?} size {size}: {pages:?}");
        }
        assert_eq!(
            client
                .query_compat_all(v1::query_compat_request::Subject::Base(
                    "acme/llama:v2".into()
                ))
                .await
                .unwrap()
                .len(),
            5
        );

        // Listings: by name then age, two at a time, nothing twice, nothing left out.
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .registry()
                .list_patch_versions(v1::ListRequest {
                    filter: "acme".into(),
                    page_size: 2,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.versions.len() <= 2);
            names.extend(page.versions.into_iter().map(|v| v.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            names,
            [
                "acme/new1",
                "acme/new2",
                "acme/old1",
                "acme/old2",
                "acme/old3"
            ],
            "{backend:?}"
        );

        // A token from elsewhere is refused, naming the field.
        for token in ["nonsense", "7a"] {
            let err = client
                .registry()
                .list_patch_versions(v1::ListRequest {
                    page_token: token.into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("page_token"), "{}", err.message());
        }
    }
}
