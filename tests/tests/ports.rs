//! Ports of stored patches onto stored bases (bases pushed without `--parent`, so only
//! `RequestPort` queues them, and the worker loop ports them): the ported adapter reuses the patch's
//! tensor blob, the merged model stores only the merged tensors and pulls back byte for
//! byte equal to what the offline `patchport port --merged` writes.

use std::path::Path;

use patchport_client::NoProgress;
use patchport_core::AnyRef;
use patchport_proto::v1;
use patchport_tests::LocalWorker;
use patchport_tests::ports::wait_port;
use patchport_tests::{
    Backend, TestRegistry, backends, base, fixtures, patch, push_fixture, read_tree,
};

fn blob_count(dir: &Path) -> usize {
    fn walk(d: &Path) -> usize {
        std::fs::read_dir(d)
            .map(|it| {
                it.map(|e| {
                    let p = e.unwrap().path();
                    if p.is_dir() { walk(&p) } else { 1 }
                })
                .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("blobs").join("blobs"))
}

/// Requests a port, which answers at once (queued, or the port as it stands), then runs
/// the worker loop until the port is done.
async fn request(reg: &TestRegistry, patch: &str, base: &str) -> v1::Port {
    let client = reg.client().await.unwrap();
    let asked = client
        .ports()
        .request_port(v1::RequestPortRequest {
            patch: patch.into(),
            base: base.into(),
            priority: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("request {patch}@{base}: {e}"))
        .into_inner();
    if asked.state != v1::PortState::Queued as i32 {
        return asked;
    }
    assert!(
        asked.queue_position >= 1,
        "a queued port has a place: {asked:?}"
    );
    let worker = LocalWorker::cpu(client.clone());
    let done = wait_port(&client, &format!("{patch}@{base}")).await;
    worker.stop().await;
    done
}

#[tokio::test]
async fn a_stored_port_pulls_back_equal_to_the_offline_port() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let f = fixtures().join("llama-micro");
        for (v, parent) in [
            ("v1", None),
            ("v2", None),
            ("v2-sharded", None),
            ("v2-bf16", None),
        ] {
            client
                .push_dir(&f.join(v), &base("acme/llama", v, parent), &NoProgress)
                .await
                .unwrap();
        }
        push_fixture(
            &client,
            "llama-micro/patches/lora-qv",
            &patch("acme/qv", "1", "acme/llama:v1"),
        )
        .await;
        for target in ["v2", "v2-sharded", "v2-bf16"] {
            let before = blob_count(reg.dir.path());
            let port = request(&reg, "acme/qv:1", &format!("acme/llama:{target}")).await;
            assert_eq!(
                port.state,
                v1::PortState::Succeeded as i32,
                "{backend:?} {target}: {port:?}"
            );
            let diag = port.diagnostics.clone().unwrap();
            assert_eq!(diag.modules.len(), 4);
            assert!(diag.total.unwrap().base_drift > 0.0);

            // Offline reference.
            let offline = tempfile::tempdir().unwrap();
            let opts = patchport_engine::PortOptions {
                merged: true,
                ..Default::default()
            };
            patchport_engine::port_dirs(
                &f.join("v1"),
                &f.join(target),
                &f.join("patches/lora-qv"),
                offline.path(),
                &opts,
            )
            .unwrap();

            // The ported adapter: the patch's own tensor bytes, config re-pointed.
            let out = tempfile::tempdir().unwrap();
            let r: AnyRef = format!("acme/qv:1@acme/llama:{target}").parse().unwrap();
            client
                .pull(&r, out.path(), false, &NoProgress)
                .await
                .unwrap();
            let got = read_tree(out.path());
            let orig = read_tree(&f.join("patches/lora-qv"));
            assert!(got["adapter_model.safetensors"] == orig["adapter_model.safetensors"]);
            let cfg: serde_json::Value =
                serde_json::from_slice(&got["adapter_config.json"]).unwrap();
            assert_eq!(
                cfg["base_model_name_or_path"],
                format!("acme/llama:{target}")
            );
            assert_eq!(cfg["revision"], port.base_digest);

            // The merged model: composed on download, byte-identical to the offline one.
            let merged = tempfile::tempdir().unwrap();
            client
                .pull(&r, merged.path(), true, &NoProgress)
                .await
                .unwrap();
            assert_eq!(
                read_tree(merged.path()),
                read_tree(&offline.path().join("merged")),
                "{backend:?} {target}"
            );

            if backend == Backend::Embedded {
                // Stored: 4 merged tensors, one header per weight file, one adapter config.
                let weight_files = port
                    .merged_files
                    .iter()
                    .filter(|f| f.path.ends_with(".safetensors"))
                    .count();
                let touched = port
                    .merged_files
                    .iter()
                    .filter(|f| !f.segments.is_empty())
                    .count();
                let added = blob_count(reg.dir.path()) - before;
                assert!(touched >= 1 && touched <= weight_files);
                // At most that: a merged tensor equal to one stored earlier (v2-sharded
                // holds v2's weights) is deduplicated.
                assert!(
                    added <= 4 + touched + 1,
                    "{target}: only merged tensors, headers and the config are new"
                );
                if target == "v2" {
                    assert_eq!(added, 4 + touched + 1);
                }
            }
        }
        // Asking again returns the stored port.
        let again = request(&reg, "acme/qv:1", "acme/llama:v2").await;
        assert_eq!(again.state, v1::PortState::Succeeded as i32);
    }
}

/// A new base version whose target tensors did not change makes an "unchanged" port: the
/// tensor digests of the registry's index say so without reading the weights.
#[tokio::test]
async fn a_port_onto_unchanged_weights_says_so() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    // The same weights again, under a new version with a different generation config.
    let copy = tempfile::tempdir().unwrap();
    for (path, bytes) in read_tree(&f.join("v1")) {
        std::fs::write(copy.path().join(&path), bytes).unwrap();
    }
    std::fs::write(
        copy.path().join("generation_config.json"),
        b"{\"max_new_tokens\": 8}",
    )
    .unwrap();
    client
        .push_dir(copy.path(), &base("acme/llama", "v1.1", None), &NoProgress)
        .await
        .unwrap();
    push_fixture(
        &client,
        "llama-micro/patches/lora-qv",
        &patch("acme/qv", "1", "acme/llama:v1"),
    )
    .await;
    let port = request(&reg, "acme/qv:1", "acme/llama:v1.1").await;
    assert_eq!(port.state, v1::PortState::Succeeded as i32);
    let diag = port.diagnostics.unwrap();
    assert!(
        diag.modules
            .iter()
            .all(|m| m.unchanged && m.base_drift == 0.0),
        "{diag:?}"
    );
    assert!(diag.total.unwrap().unchanged);
}

#[tokio::test]
async fn refused_ports_are_recorded_with_their_reasons() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    push_fixture(&client, "llama-micro/v2", &base("acme/llama", "v2", None)).await;
    for (p, reason) in [
        ("dora", "dora"),
        ("modules-to-save", "modules_to_save"),
        ("ia3", "ia3"),
    ] {
        client
            .push_dir(
                &f.join("patches").join(p),
                &patch(&format!("acme/{p}"), "1", "acme/llama:v1"),
                &NoProgress,
            )
            .await
            .unwrap();
        let port = request(&reg, &format!("acme/{p}:1"), "acme/llama:v2").await;
        assert_eq!(port.state, v1::PortState::Incompatible as i32, "{p}");
        assert!(
            port.refusals
                .iter()
                .any(|r| r.kind == reason || r.subject.contains(reason)),
            "{p}: {:?}",
            port.refusals
        );
        assert!(port.adapter_files.is_empty() && port.merged_files.is_empty());
        let got = client
            .ports()
            .get_port(v1::GetPortRequest {
                reference: format!("acme/{p}:1@acme/llama:v2"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got, port);
        let err = client
            .pull(
                &format!("acme/{p}:1@acme/llama:v2").parse().unwrap(),
                tempfile::tempdir().unwrap().path(),
                false,
                &NoProgress,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no adapter artifact"), "{err}");
    }
    // A port onto another base family is refused before any work.
    client
        .push_dir(
            &fixtures().join("gpt2-micro/v2"),
            &base("acme/gpt2", "v2", None),
            &NoProgress,
        )
        .await
        .unwrap();
    let err = client
        .ports()
        .request_port(v1::RequestPortRequest {
            patch: "acme/dora:1".into(),
            base: "acme/gpt2:v2".into(),
            priority: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = client
        .ports()
        .get_port(v1::GetPortRequest {
            reference: "acme/dora:1@acme/llama:v1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// Publishing queues a port (no worker here); cancelling it is final for that port.
#[tokio::test]
async fn a_queued_port_can_be_cancelled() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    push_fixture(
        &client,
        "llama-micro/patches/lora-qv",
        &patch("acme/qv", "1", "acme/llama:v1"),
    )
    .await;
    push_fixture(
        &client,
        "llama-micro/v2",
        &base("acme/llama", "v2", Some("v1")),
    )
    .await;
    let reference = "acme/qv:1@acme/llama:v2".to_owned();
    let queued = client
        .ports()
        .get_port(v1::GetPortRequest {
            reference: reference.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.state, v1::PortState::Queued as i32);
    assert!(!queued.job_id.is_empty());
    let cancelled = client
        .ports()
        .cancel_port(v1::GetPortRequest { reference })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::PortState::Cancelled as i32);
    let err = client
        .ports()
        .resolve(v1::ResolveRequest {
            patch: "acme/qv:1".into(),
            base_digest: cancelled.base_digest,
            require_pass: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("cancelled"), "{}", err.message());
}
