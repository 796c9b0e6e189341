//! Signatures through gRPC: a registry with a signing key signs every version when it is
//! committed and every port artifact when it completes (model signature over the
//! manifest's digests, provenance naming the inputs, method, worker and device), serves
//! them unchanged on every read, and answers bad requests with the field named. A
//! registry without a key signs nothing: `GetSignature` and `resolve` with
//! `require_signed` (asked, or demanded by the namespace policy) refuse with
//! FAILED_PRECONDITION. Every backend configured.

use std::sync::Arc;

use patchport_client::Client;
use patchport_proto::v1;
use patchport_registry::SigningKeys;
use patchport_signing::{FileDigest, PROVENANCE_FILE, SigningKey, verify_model, verify_provenance};
use patchport_tests::{
    LocalWorker, TestRegistry, backends, base, patch, ports::wait_port, push_fixture,
};
use tonic::Code;

const PORT: &str = "acme/qv:1@acme/llama:v2";

/// v1, lora-qv on v1, v2 published after v1 (the port fans out), and the port done.
async fn setup(client: &Client) -> v1::Port {
    push_fixture(client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    push_fixture(
        client,
        "llama-micro/patches/lora-qv",
        &patch("acme/qv", "1", "acme/llama:v1"),
    )
    .await;
    push_fixture(
        client,
        "llama-micro/v2",
        &base("acme/llama", "v2", Some("v1")),
    )
    .await;
    let worker = LocalWorker::cpu(client.clone());
    let port = wait_port(client, PORT).await;
    worker.stop().await;
    assert_eq!(port.state, v1::PortState::Succeeded as i32, "{port:?}");
    port
}

async fn signature(
    client: &Client,
    reference: &str,
    merged: bool,
) -> Result<v1::Signature, tonic::Status> {
    client
        .signing()
        .get_signature(v1::GetSignatureRequest {
            reference: reference.to_owned(),
            merged,
        })
        .await
        .map(|r| r.into_inner())
}

fn digests(files: &[v1::FileEntry]) -> Vec<FileDigest> {
    let mut out: Vec<_> = files
        .iter()
        .map(|f| FileDigest::new(f.path.clone(), &f.digest).unwrap())
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<FileDigest>) -> Vec<FileDigest> {
    v.sort();
    v
}

#[tokio::test]
async fn versions_and_ports_are_signed_from_their_manifests() {
    for backend in backends() {
        let key = SigningKey::generate();
        let trusted = [key.public_key().clone()];
        let reg = TestRegistry::start_configured(backend, |c| {
            c.signing = Some(Arc::new(SigningKeys::new(key, Vec::new())));
        })
        .await
        .unwrap();
        let client = reg.client().await.unwrap();
        let port = setup(&client).await;

        // The keys the registry serves are the ones that verify.
        let keys = client
            .signing()
            .get_signing_keys(v1::GetSigningKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(keys.public_keys_pem, [trusted[0].pem().to_owned()]);

        // A base and a patch: the model signature covers exactly the version's files.
        for reference in ["acme/llama:v1", "acme/llama:v2", "acme/qv:1"] {
            let sig = signature(&client, reference, false).await.unwrap();
            assert!(sig.provenance.is_empty(), "{backend:?} {reference}");
            assert_eq!(sig.key_hint, trusted[0].hint());
            let signed = verify_model(&sig.model_signature, &trusted).unwrap();
            let files = match client
                .registry()
                .get_base_version(v1::GetVersionRequest {
                    reference: reference.to_owned(),
                })
                .await
            {
                Ok(b) => b.into_inner().files,
                Err(_) => {
                    client
                        .registry()
                        .get_patch_version(v1::GetVersionRequest {
                            reference: reference.to_owned(),
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .files
                }
            };
            assert_eq!(
                sorted(signed.files),
                digests(&files),
                "{backend:?} {reference}"
            );
            // Stored once: every read serves the same bytes.
            let again = signature(&client, reference, false).await.unwrap();
            assert_eq!(again.model_signature, sig.model_signature);
        }

        // The port's two artifacts: files + provenance.json signed; the provenance names
        // the inputs, the method, the worker and its device.
        for (merged, files) in [(false, &port.adapter_files), (true, &port.merged_files)] {
            let sig = signature(&client, PORT, merged).await.unwrap();
            let signed = verify_model(&sig.model_signature, &trusted).unwrap();
            let p = verify_provenance(&sig.provenance, &trusted).unwrap();
            assert_eq!(
                sorted(p.files.clone()),
                digests(files),
                "{backend:?} merged={merged}"
            );
            let mut expected = digests(files);
            expected.push(FileDigest::of(PROVENANCE_FILE, sig.provenance.as_bytes()));
            assert_eq!(sorted(signed.files), sorted(expected));
            let prov = &p.provenance;
            assert_eq!(prov.artifact, if merged { "merged" } else { "adapter" });
            assert_eq!(prov.port, PORT);
            assert_eq!(prov.method.version, port.method_version);
            assert_eq!(prov.worker.id, "test-worker");
            assert_eq!(prov.worker.device, "cpu");
            let digest_of = |role: &str| {
                prov.inputs
                    .iter()
                    .find(|i| i.name == role)
                    .map(|i| format!("sha256:{}", i.digest["sha256"]))
                    .unwrap()
            };
            assert_eq!(digest_of("patch"), port.patch_digest);
            assert_eq!(digest_of("old_base"), port.source_base_digest);
            assert_eq!(digest_of("new_base"), port.base_digest);
            assert!(prov.diagnostics["risk"].is_number());
        }

        // Resolve with require_signed returns the signed port.
        let resolved = client
            .ports()
            .resolve(v1::ResolveRequest {
                patch: "acme/qv:1".into(),
                base_digest: port.base_digest.clone(),
                require_signed: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resolved.kind, v1::CompatKind::Ported as i32);

        // Bad requests name their field; unknown references are NOT_FOUND.
        let e = signature(&client, "acme/llama:v1", true).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("merged"), "{}", e.message());
        let e = signature(&client, "not a reference", false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("reference"), "{}", e.message());
        let e = signature(&client, "acme/llama:v9", false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    }
}

#[tokio::test]
async fn a_registry_without_a_key_signs_nothing_and_require_signed_refuses() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let port = setup(&client).await;
        let keys = client
            .signing()
            .get_signing_keys(v1::GetSigningKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(keys.public_keys_pem.is_empty());
        let e = signature(&client, PORT, false).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("not signed"), "{}", e.message());

        let resolve = |require_signed: bool, base_digest: String| {
            let client = client.clone();
            async move {
                client
                    .ports()
                    .resolve(v1::ResolveRequest {
                        patch: "acme/qv:1".into(),
                        base_digest,
                        require_signed,
                        ..Default::default()
                    })
                    .await
            }
        };
        resolve(false, port.base_digest.clone()).await.unwrap();
        let e = resolve(true, port.base_digest.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("is not signed"), "{}", e.message());
        // The patch on its own base too.
        let e = resolve(true, port.source_base_digest.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);

        // The namespace policy demands it whatever the caller asks.
        client
            .admin()
            .set_namespace_policy(v1::NamespacePolicy {
                namespace: "acme".into(),
                require_signed: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let e = resolve(false, port.base_digest.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    }
}
