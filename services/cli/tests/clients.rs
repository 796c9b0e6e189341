//! What a client written from `proto/` alone trips over (issue #12): the real
//! `patchport serve` in its own process, the CLI as separate processes, and raw tonic
//! calls where a non-Rust client would make them.

use std::path::{Path, PathBuf};

use patchport_core::Hasher;
use patchport_proto::v1;
use patchport_proto::v1::blob_service_client::BlobServiceClient;
use patchport_proto::v1::registry_service_client::RegistryServiceClient;
use patchport_tests::process::{Serve, Server, cli, file_url};
use patchport_tests::{copy_dir, fixtures};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn ok(server: &Server, args: &[&str]) -> String {
    cli(BIN, server.url()).args(args).ok()
}

fn fails(server: &Server, args: &[&str]) -> String {
    cli(BIN, server.url()).args(args).fails()
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn sha256_file(p: &Path) -> String {
    let mut h = Hasher::new();
    h.update(&std::fs::read(p).expect("read"));
    h.finish().to_string()
}

/// The manifest digest exactly as proto/patchport/v1/common.proto documents it (what the
/// Python SDK computes), from a directory on disk.
fn documented_manifest_digest(kind: &str, dir: &Path) -> String {
    let mut files: Vec<(String, String, u64)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("entry");
            let path = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).expect("read");
            (path, sha256_file(&e.path()), bytes.len() as u64)
        })
        .collect();
    files.sort();
    let mut text = Vec::new();
    text.extend_from_slice(b"patchport-manifest-v1\0");
    text.extend_from_slice(kind.as_bytes());
    text.push(b'\n');
    for (path, digest, size) in files {
        text.extend_from_slice(format!("{path}\0{digest}\0{size}\n").as_bytes());
    }
    let mut h = Hasher::new();
    h.update(&text);
    h.finish().to_string()
}

/// One runtime for the raw gRPC calls of every test here: a tonic channel lives on the
/// runtime that connected it.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().expect("a tokio runtime"))
        .block_on(f)
}

fn registry(server: &Server) -> RegistryServiceClient<tonic::transport::Channel> {
    block_on(RegistryServiceClient::connect(server.url())).expect("connect")
}

fn blobs(server: &Server) -> BlobServiceClient<tonic::transport::Channel> {
    block_on(BlobServiceClient::connect(server.url()))
        .expect("connect")
        .max_decoding_message_size(64 << 20)
}

/// Every blob file under a `file://` blob directory.
fn blob_count(dir: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

fn push_llama_and_qv(server: &Server) {
    let f = fixtures().join("llama-micro");
    ok(
        server,
        &[
            "base",
            "push",
            arg(&f.join("v1")),
            "--name",
            "acme/llama-micro",
            "--version",
            "v1",
        ],
    );
    ok(
        server,
        &[
            "patch",
            "push",
            arg(&f.join("patches/lora-qv")),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama-micro:v1",
        ],
    );
}

#[test]
fn resolve_answers_a_weights_file_sha256_with_the_manifest_digest_to_use() {
    let server = Serve::builder(BIN).workers(0).start();
    push_llama_and_qv(&server);
    let v1 = fixtures().join("llama-micro/v1");
    let manifest = documented_manifest_digest("base", &v1);
    let stored = cli(BIN, server.url())
        .args(["status", "acme/llama-micro:v1", "--json"])
        .json();
    assert_eq!(
        stored["version"]["digest"]
            .as_str()
            .or(stored["digest"].as_str()),
        Some(manifest.as_str()),
        "the documented algorithm gives the registry's digest: {stored}"
    );
    // A serving engine's natural guess: the weights file's sha256.
    let weights = sha256_file(&v1.join("model.safetensors"));
    let err = fails(
        &server,
        &["resolve", "acme/qv:1", "--base-digest", weights.as_str()],
    );
    assert!(
        err.contains("not a base version's manifest digest")
            && err.contains(&manifest)
            && err.contains("model.safetensors"),
        "{err}"
    );
    let mut ports = block_on(v1::port_service_client::PortServiceClient::connect(
        server.url(),
    ))
    .unwrap();
    let status = block_on(ports.resolve(v1::ResolveRequest {
        patch: "acme/qv:1".into(),
        base_digest: weights,
        ..Default::default()
    }))
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The documented digest resolves.
    let out = ok(
        &server,
        &["resolve", "acme/qv:1", "--base-digest", manifest.as_str()],
    );
    assert!(out.contains("native") || out.contains("acme/qv:1"), "{out}");
}

#[test]
fn a_bad_directory_is_refused_before_any_blob_is_uploaded() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = Serve::builder(BIN)
        .workers(0)
        .blobs(file_url(store.path()))
        .start();
    let f = fixtures().join("llama-micro");
    // A base without config.json, a patch without adapter_config.json.
    let base = tempfile::tempdir().expect("tempdir");
    copy_dir(&f.join("v1"), base.path()).unwrap();
    std::fs::remove_file(base.path().join("config.json")).unwrap();
    let err = fails(
        &server,
        &[
            "base",
            "push",
            arg(base.path()),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
    );
    assert!(
        err.contains("config.json") && err.contains("nothing was uploaded"),
        "{err}"
    );
    assert_eq!(blob_count(store.path()), 0, "a blob was uploaded");
    let patch = tempfile::tempdir().expect("tempdir");
    copy_dir(&f.join("patches/lora-qv"), patch.path()).unwrap();
    std::fs::remove_file(patch.path().join("adapter_config.json")).unwrap();
    let err = fails(
        &server,
        &[
            "patch",
            "push",
            arg(patch.path()),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
    assert!(err.contains("adapter_config.json"), "{err}");
    assert_eq!(blob_count(store.path()), 0, "a blob was uploaded");
    // A good directory onto a base that does not exist: the registry refuses the
    // manifest (validate_only) before any blob is sent.
    let err = fails(
        &server,
        &[
            "patch",
            "push",
            arg(&f.join("patches/lora-qv")),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
    assert!(
        err.contains("not found") && err.contains("request field base"),
        "{err}"
    );
    assert!(
        !err.contains("--base"),
        "a gRPC error names a CLI flag: {err}"
    );
    assert_eq!(blob_count(store.path()), 0, "a blob was uploaded");
    // Another client: the manifest alone, without its blobs, is checked at once.
    let entry = |path: &str| v1::FileEntry {
        path: path.into(),
        digest: patchport_core::Digest::of(path.as_bytes()).to_string(),
        size: 1,
        segments: vec![],
    };
    let status = block_on(
        registry(&server).push_base_version(v1::PushBaseVersionRequest {
            name: "acme/llama".into(),
            version: "v1".into(),
            files: vec![entry("model.safetensors")],
            validate_only: true,
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("config.json"), "{status:?}");
    let ok_manifest = block_on(
        registry(&server).push_base_version(v1::PushBaseVersionRequest {
            name: "acme/llama".into(),
            version: "v1".into(),
            files: vec![entry("config.json"), entry("model.safetensors")],
            validate_only: true,
            ..Default::default()
        }),
    )
    .expect("a valid manifest validates before its blobs exist")
    .into_inner();
    assert!(ok_manifest.version.is_none() && !ok_manifest.created);
    assert_eq!(blob_count(store.path()), 0);
}

/// llama-micro v1 re-labelled as a Qwen2 model: the same tensor names and shapes.
fn qwen2_base(dir: &Path) {
    copy_dir(&fixtures().join("llama-micro/v1"), dir).unwrap();
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["model_type"] = "qwen2".into();
    config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[test]
fn an_adapter_for_llama_is_refused_on_a_qwen2_base_unless_allowed_and_lined_up() {
    let server = Serve::builder(BIN).workers(0).start();
    let qwen = tempfile::tempdir().expect("tempdir");
    qwen2_base(qwen.path());
    ok(
        &server,
        &[
            "base",
            "push",
            arg(qwen.path()),
            "--name",
            "acme/qwen",
            "--version",
            "v1",
        ],
    );
    let qv = fixtures().join("llama-micro/patches/lora-qv");
    let push = |extra: &[&str]| {
        let mut args = vec![
            "patch",
            "push",
            arg(&qv),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/qwen:v1",
        ];
        args.extend_from_slice(extra);
        cli(BIN, server.url()).args(&args).output()
    };
    let out = push(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused (architecture)")
            && err.contains("LlamaForCausalLM")
            && err.contains("Qwen2ForCausalLM")
            && err.contains("allow_architecture_mismatch"),
        "{err}"
    );
    // The refusal is typed for any client: FAILED_PRECONDITION, the kind in the
    // trailing metadata and the reasons as a serialized patchport.v1.Refusals.
    let files: Vec<v1::FileEntry> = patchport_client::scan_dir(&qv)
        .unwrap()
        .iter()
        .map(|f| v1::FileEntry {
            path: f.path.clone(),
            digest: f.digest.to_string(),
            size: f.size,
            segments: vec![],
        })
        .collect();
    let status = block_on(
        registry(&server).push_patch_version(v1::PushPatchVersionRequest {
            name: "acme/qv".into(),
            version: "1".into(),
            base: "acme/qwen:v1".into(),
            files: files.clone(),
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.metadata().get("patchport-refusal-kind").unwrap(),
        "architecture"
    );
    let bin = status
        .metadata()
        .get_bin("patchport-refusals-bin")
        .unwrap()
        .to_bytes()
        .unwrap();
    let refusals = <v1::Refusals as prost::Message>::decode(bin).unwrap();
    assert_eq!(refusals.refusals[0].kind, "architecture");
    // Opted in, and every module lines up: accepted.
    let out = push(&["--allow-architecture-mismatch", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Opted in, but a GPT-2 adapter's modules are not in the base: still refused.
    let c_attn = fixtures().join("gpt2-micro/patches/lora-c-attn");
    let err = fails(
        &server,
        &[
            "patch",
            "push",
            arg(&c_attn),
            "--name",
            "acme/c-attn",
            "--version",
            "1",
            "--base",
            "acme/qwen:v1",
            "--allow-architecture-mismatch",
        ],
    );
    assert!(
        err.contains("refused (architecture)") && err.contains("refused (missing_module)"),
        "{err}"
    );
}

#[test]
fn parent_takes_a_full_reference_and_errors_name_request_fields() {
    let server = Serve::builder(BIN).workers(0).start();
    push_llama_and_qv(&server);
    let v2 = fixtures().join("llama-micro/v2");
    let json = cli(BIN, server.url())
        .args([
            "base",
            "push",
            arg(&v2),
            "--name",
            "acme/llama-micro",
            "--version",
            "v2",
            "--parent",
            "acme/llama-micro:v1",
            "--json",
        ])
        .json();
    assert_eq!(json["version"]["parent"], "v1", "{json}");
    let mut reg = registry(&server);
    let push = |parent: &str| v1::PushBaseVersionRequest {
        name: "acme/llama-micro".into(),
        version: "v3".into(),
        parent: parent.into(),
        files: vec![],
        validate_only: true,
    };
    let status = block_on(reg.push_base_version(push("acme/other:v1"))).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("parent"), "{status:?}");
    let mut missing = push("v9");
    missing.files = vec![
        v1::FileEntry {
            path: "config.json".into(),
            digest: patchport_core::Digest::of(b"c").to_string(),
            size: 1,
            segments: vec![],
        },
        v1::FileEntry {
            path: "model.safetensors".into(),
            digest: patchport_core::Digest::of(b"m").to_string(),
            size: 1,
            segments: vec![],
        },
    ];
    let status = block_on(reg.push_base_version(missing)).unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("request field parent") && !status.message().contains("--"),
        "{status:?}"
    );
}

#[test]
fn an_oversize_chunk_is_resource_exhausted_naming_the_limit() {
    let server = Serve::builder(BIN).workers(0).start();
    let mut blobs = blobs(&server);
    for size in [5usize << 20, 65 << 20] {
        let data = vec![7u8; size];
        let start = block_on(blobs.start_upload(v1::StartUploadRequest {
            digest: patchport_core::Digest::of(&data).to_string(),
            size: size as u64,
        }))
        .unwrap()
        .into_inner();
        let chunk = v1::UploadChunk {
            upload_id: start.upload_id,
            offset: 0,
            data: data.into(),
        };
        let status = block_on(blobs.upload_chunks(futures_iter(vec![chunk]))).expect_err("refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{size}: {status:?}");
        assert!(
            status.message().contains("--max-chunk-bytes")
                && status.message().contains("PATCHPORT_MAX_CHUNK_BYTES")
                && status.message().contains(&(4u64 << 20).to_string()),
            "{status:?}"
        );
    }
}

fn futures_iter(
    items: Vec<v1::UploadChunk>,
) -> impl futures::Stream<Item = v1::UploadChunk> + Send + 'static {
    futures::stream::iter(items)
}

#[test]
fn a_client_error_is_not_logged_as_an_error() {
    let server = Serve::builder(BIN).workers(0).start();
    let err = fails(&server, &["status", "acme/nope:1"]);
    assert!(err.contains("no base or patch version"), "{err}");
    server.wait_for_log("request refused", std::time::Duration::from_secs(10));
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("request refused") && l.contains("NotFound")),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.contains("ERROR")),
        "a client's NOT_FOUND was logged at ERROR:\n{log}"
    );
}

/// One `ReadFile` stream, verified the way a client does: the first message's digest
/// against the bytes.
fn read_file(
    server: &Server,
    req: v1::ReadFileRequest,
) -> Result<(v1::FileEntry, Vec<u8>), tonic::Status> {
    let mut blobs = blobs(server);
    block_on(async move {
        let mut stream = blobs.read_file(req).await?.into_inner();
        let mut head = None;
        let mut bytes = Vec::new();
        let mut messages = 0;
        while let Some(chunk) = stream.message().await? {
            messages += 1;
            if messages == 1 {
                head = chunk.file;
            } else {
                assert!(
                    chunk.file.is_none(),
                    "only the first message names the file"
                );
            }
            assert_eq!(chunk.offset, bytes.len() as u64);
            assert!(chunk.data.len() <= 1 << 20);
            bytes.extend_from_slice(&chunk.data);
        }
        let head = head.expect("the first message names the file");
        let mut h = Hasher::new();
        h.update(&bytes);
        assert_eq!(h.finish().to_string(), head.digest, "{}", head.path);
        assert_eq!(bytes.len() as u64, head.size);
        Ok((head, bytes))
    })
}

#[test]
fn read_file_streams_a_whole_file_of_a_version_or_port_with_its_digest() {
    let server = Serve::builder(BIN).workers(1).start();
    push_llama_and_qv(&server);
    let f = fixtures().join("llama-micro");
    ok(
        &server,
        &[
            "base",
            "push",
            arg(&f.join("v2")),
            "--name",
            "acme/llama-micro",
            "--version",
            "v2",
            "--parent",
            "v1",
        ],
    );
    let (head, bytes) = read_file(
        &server,
        v1::ReadFileRequest {
            reference: "acme/llama-micro:v1".into(),
            path: "model.safetensors".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(head.path, "model.safetensors");
    assert_eq!(
        bytes,
        std::fs::read(f.join("v1/model.safetensors")).unwrap()
    );
    let (_, by_digest) = read_file(
        &server,
        v1::ReadFileRequest {
            digest: head.digest.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(by_digest, bytes);
    let missing = read_file(
        &server,
        v1::ReadFileRequest {
            reference: "acme/llama-micro:v1".into(),
            path: "nope.json".into(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // A port's merged file, composed from pieces on the server, arrives whole.
    ok(
        &server,
        &[
            "request",
            "acme/qv:1",
            "--base",
            "acme/llama-micro:v2",
            "--wait",
        ],
    );
    let port = "acme/qv:1@acme/llama-micro:v2";
    let out = tempfile::tempdir().expect("tempdir");
    ok(
        &server,
        &["pull", port, "--merged", "--out", arg(out.path())],
    );
    let (head, merged) = read_file(
        &server,
        v1::ReadFileRequest {
            reference: port.into(),
            path: "model.safetensors".into(),
            merged: true,
            ..Default::default()
        },
    )
    .unwrap();
    let pulled: PathBuf = out.path().join("model.safetensors");
    assert_eq!(merged, std::fs::read(pulled).unwrap());
    assert_eq!(
        merged.len(),
        std::fs::read(f.join("v2/model.safetensors")).unwrap().len()
    );
    assert!(head.segments.is_empty());
}
