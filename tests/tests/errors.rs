//! Bad input gets the right gRPC status and a message a user can act on, and nothing
//! already stored changes.

use std::path::Path;

use patchport_client::{ClientError, NoProgress, PushKind};
use patchport_proto::v1;
use patchport_tests::{Backend, TestRegistry, base, fixtures, patch, read_tree};
use tonic::Code;

const CONFIG: &str = r#"{"model_type":"llama","hidden_size":4,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}"#;

fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

fn model_dir(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    d
}

async fn expect_err(reg: &TestRegistry, dir: &Path, kind: &PushKind, code: Code, words: &[&str]) {
    let client = reg.client().await.unwrap();
    match client.push_dir(dir, kind, &NoProgress).await {
        Ok(_) => panic!("push of {kind:?} succeeded; expected {code:?}"),
        Err(e) => {
            assert_eq!(e.code(), Some(code), "{e}");
            let msg = e.to_string();
            for w in words {
                assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
            }
        }
    }
}

/// A registry with one base and one patch already stored, to check that nothing changes.
async fn seeded() -> (TestRegistry, Vec<v1::BaseVersion>, Vec<v1::PatchVersion>) {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("patches/lora-qv"),
            &patch("acme/qv", "1", "acme/llama:v1"),
            &NoProgress,
        )
        .await
        .unwrap();
    let (b, p) = listing(&reg).await;
    (reg, b, p)
}

async fn listing(reg: &TestRegistry) -> (Vec<v1::BaseVersion>, Vec<v1::PatchVersion>) {
    let client = reg.client().await.unwrap();
    let req = v1::ListRequest {
        include_yanked: true,
        ..Default::default()
    };
    let b = client.list_base_versions_all(req.clone()).await.unwrap();
    let p = client.list_patch_versions_all(req).await.unwrap();
    (b, p)
}

#[tokio::test]
async fn malformed_safetensors_are_refused_with_the_file_and_the_problem() {
    let (reg, bases, patches) = seeded().await;
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "bad header length",
            {
                let mut v = safetensors("{}", 0);
                v[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                v
            },
            &["model.safetensors", "bad header length"],
        ),
        (
            "too short",
            vec![1, 2, 3],
            &["model.safetensors", "too short"],
        ),
        (
            "bad json",
            safetensors("{\"a\": nope}", 0),
            &["model.safetensors", "bad header JSON"],
        ),
        (
            "overlapping offsets",
            safetensors(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            &["model.safetensors", "bad tensor offsets"],
        ),
        (
            "offsets past the end of the file",
            safetensors(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
            &["model.safetensors", "bad tensor offsets"],
        ),
        (
            "unknown dtype",
            safetensors(
                r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
            &["model.safetensors", "Q7"],
        ),
    ];
    for (what, bytes, words) in cases {
        let dir = model_dir(&[("config.json", CONFIG.into()), ("model.safetensors", bytes)]);
        eprintln!("case: {what}");
        expect_err(
            &reg,
            dir.path(),
            &base("acme/llama", "bad", Some("v1")),
            Code::InvalidArgument,
            words,
        )
        .await;
    }
    assert_eq!(
        listing(&reg).await,
        (bases, patches),
        "a failed push changed what was stored"
    );
}

#[tokio::test]
async fn a_blob_whose_bytes_do_not_match_its_digest_is_refused_and_never_stored() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let claimed = patchport_core::Digest::of(b"the bytes I claim");
    let mut blobs = client.blobs();
    let start = blobs
        .start_upload(v1::StartUploadRequest {
            digest: claimed.to_string(),
            size: 17,
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = v1::UploadChunk {
        upload_id: start.upload_id.clone(),
        offset: 0,
        data: bytes::Bytes::from_static(b"other bytes here!"),
    };
    blobs
        .upload_chunks(futures::stream::iter(vec![chunk]))
        .await
        .unwrap();
    let err = blobs
        .commit_upload(v1::CommitUploadRequest {
            upload_id: start.upload_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("digest mismatch"),
        "{}",
        err.message()
    );
    let missing = blobs
        .find_missing_blobs(v1::FindMissingBlobsRequest {
            digests: vec![claimed.to_string()],
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![claimed.to_string()]);
    // A malformed digest is InvalidArgument too.
    let err = blobs
        .start_upload(v1::StartUploadRequest {
            digest: "sha256:xyz".into(),
            size: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("invalid digest"));
}

#[tokio::test]
async fn a_push_naming_a_blob_that_was_never_uploaded_is_a_failed_precondition() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let err = client
        .registry()
        .push_base_version(v1::PushBaseVersionRequest {
            name: "acme/llama".into(),
            version: "v1".into(),
            parent: String::new(),
            validate_only: false,
            files: vec![
                v1::FileEntry {
                    path: "config.json".into(),
                    digest: patchport_core::Digest::of(b"nope").to_string(),
                    size: 4,
                    segments: vec![],
                },
                v1::FileEntry {
                    path: "model.safetensors".into(),
                    digest: patchport_core::Digest::of(b"nope2").to_string(),
                    size: 5,
                    segments: vec![],
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("has not been uploaded"),
        "{}",
        err.message()
    );
    // Paths that escape the version are refused before anything is looked at.
    let err = client
        .registry()
        .push_base_version(v1::PushBaseVersionRequest {
            name: "acme/llama".into(),
            version: "v1".into(),
            parent: String::new(),
            validate_only: false,
            files: vec![v1::FileEntry {
                path: "../etc/passwd".into(),
                digest: patchport_core::Digest::of(b"x").to_string(),
                size: 1,
                segments: vec![],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("invalid file path"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_sharded_index_naming_missing_files_is_refused() {
    let (reg, bases, patches) = seeded().await;
    let src = fixtures().join("llama-micro").join("v2-sharded");
    let mut files: Vec<(String, Vec<u8>)> = read_tree(&src).into_iter().collect();
    files.retain(|(p, _)| p != "model-00006-of-00006.safetensors");
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let dir = model_dir(&files);
    expect_err(
        &reg,
        dir.path(),
        &base("acme/llama", "v2", Some("v1")),
        Code::InvalidArgument,
        &[
            "model.safetensors.index.json",
            "model-00006-of-00006.safetensors",
        ],
    )
    .await;
    assert_eq!(listing(&reg).await, (bases, patches));
}

#[tokio::test]
async fn bad_names_versions_parents_and_bases_are_refused() {
    let (reg, bases, patches) = seeded().await;
    let v2 = fixtures().join("llama-micro").join("v2");
    let qv = fixtures().join("llama-micro").join("patches/lora-qv");
    expect_err(
        &reg,
        &v2,
        &base("Acme/Llama", "v2", None),
        Code::InvalidArgument,
        &["invalid namespace", "Acme"],
    )
    .await;
    expect_err(
        &reg,
        &v2,
        &base("acme", "v2", None),
        Code::InvalidArgument,
        &["expected namespace/name"],
    )
    .await;
    expect_err(
        &reg,
        &v2,
        &base("acme/llama", "v 2", None),
        Code::InvalidArgument,
        &["invalid version"],
    )
    .await;
    expect_err(
        &reg,
        &v2,
        &base("acme/llama", "v2", Some("v0")),
        Code::NotFound,
        &["parent", "acme/llama:v0"],
    )
    .await;
    expect_err(
        &reg,
        &qv,
        &patch("acme/qv", "2", "acme/llama:v9"),
        Code::NotFound,
        &["base version acme/llama:v9 not found"],
    )
    .await;
    expect_err(
        &reg,
        &qv,
        &patch("acme/qv", "2", "acme/llama"),
        Code::InvalidArgument,
        &["invalid reference"],
    )
    .await;
    // A model directory is not an adapter: adapter_config.json is missing. The client
    // refuses it from the file names, before it sends anything (the registry's own
    // check of a manifest is in services/cli/tests/clients.rs).
    let client = reg.client().await.unwrap();
    for (dir, kind, words) in [
        (
            &v2,
            patch("acme/qv", "2", "acme/llama:v1"),
            "missing adapter_config.json",
        ),
        // An adapter directory is not a model.
        (&qv, base("acme/llama", "v2", None), "missing config.json"),
    ] {
        let e = client.push_dir(dir, &kind, &NoProgress).await.unwrap_err();
        assert_eq!(e.code(), None, "{e}");
        assert!(e.to_string().contains(words), "{e}");
        assert!(e.to_string().contains("nothing was uploaded"), "{e}");
    }
    assert_eq!(listing(&reg).await, (bases, patches));
}

#[tokio::test]
async fn versions_are_immutable() {
    let (reg, bases, patches) = seeded().await;
    let f = fixtures().join("llama-micro");
    // Other content under an existing version: AlreadyExists, nothing changes.
    expect_err(
        &reg,
        &f.join("v2"),
        &base("acme/llama", "v1", None),
        Code::AlreadyExists,
        &["acme/llama:v1", "already exists"],
    )
    .await;
    expect_err(
        &reg,
        &f.join("patches/lora-all-rslora"),
        &patch("acme/qv", "1", "acme/llama:v1"),
        Code::AlreadyExists,
        &["acme/qv:1"],
    )
    .await;
    // The same content again: a no-op.
    let client = reg.client().await.unwrap();
    let again = client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(listing(&reg).await, (bases, patches));
    // The stored bytes are still the original ones.
    let out = tempfile::tempdir().unwrap();
    client
        .pull(
            &"acme/llama:v1".parse().unwrap(),
            out.path(),
            false,
            &NoProgress,
        )
        .await
        .unwrap();
    assert_eq!(read_tree(out.path()), read_tree(&f.join("v1")));
}

#[tokio::test]
async fn a_patch_with_nan_or_a_bad_adapter_config_is_refused() {
    let (reg, bases, patches) = seeded().await;
    let src = fixtures().join("llama-micro").join("patches/lora-qv");
    let mut tree = read_tree(&src);
    // Poison the first element of the first tensor with NaN.
    let st = tree.get_mut("adapter_model.safetensors").unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    st[8 + n..8 + n + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let files: Vec<(&str, Vec<u8>)> = tree.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let dir = model_dir(&files);
    expect_err(
        &reg,
        dir.path(),
        &patch("acme/nan", "1", "acme/llama:v1"),
        Code::InvalidArgument,
        &["NaN or infinite"],
    )
    .await;

    let mut tree = read_tree(&src);
    tree.insert(
        "adapter_config.json".into(),
        br#"{"peft_type":"LORA","r":"four","lora_alpha":8}"#.to_vec(),
    );
    let files: Vec<(&str, Vec<u8>)> = tree.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let dir = model_dir(&files);
    expect_err(
        &reg,
        dir.path(),
        &patch("acme/bad", "1", "acme/llama:v1"),
        Code::InvalidArgument,
        &["adapter_config.json", "\"r\""],
    )
    .await;
    assert_eq!(listing(&reg).await, (bases, patches));
}

#[tokio::test]
async fn unknown_references_are_not_found() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let err = client
        .pull(
            &"acme/none:1".parse().unwrap(),
            tempfile::tempdir().unwrap().path(),
            false,
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(matches!(err, ClientError::Status { .. }));
    let err = client
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest: patchport_core::Digest::of(b"none").to_string(),
            offset: 0,
            length: 0,
        })
        .await;
    let code = match err {
        Err(s) => s.code(),
        Ok(mut s) => s.get_mut().message().await.unwrap_err().code(),
    };
    assert_eq!(code, Code::NotFound);
}
