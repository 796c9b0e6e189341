//! The access conformance suite: tokens, namespace policies, the audit log, and the
//! rule that every change writes its audit row in its own transaction (a refused change
//! writes none). SQLite always, Postgres when `PATCHPORT_TEST_DATABASE_URL` is set.

mod common;

use common::{audit, backends, base, name, new_base, patch, vref};
use patchport_core::port::{METHOD_VERSION, PortOrigin};
use patchport_store::meta::{AuditRecord, NamespacePolicyRecord, StoreErrorKind, TokenRecord};

fn token(id: &str, namespace: &str) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        secret_hash: "ab".repeat(32),
        namespace: namespace.to_owned(),
        scope: "push".to_owned(),
        description: "ci".to_owned(),
        created_by: "bootstrap".to_owned(),
        created_at: 10,
        expires_at: None,
        revoked_at: None,
    }
}

fn action(a: &str, target: &str) -> AuditRecord {
    AuditRecord {
        action: a.to_owned(),
        target: target.to_owned(),
        ..audit()
    }
}

#[tokio::test]
async fn tokens_are_stored_listed_and_revoked_once() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        s.insert_token(&token("t1", "acme"), &action("CreateToken", "t1"))
            .await
            .unwrap();
        s.insert_token(&token("t2", "*"), &action("CreateToken", "t2"))
            .await
            .unwrap();
        assert!(
            s.insert_token(&token("t1", "acme"), &action("CreateToken", "t1"))
                .await
                .is_err(),
            "{l}: ids are unique"
        );
        assert_eq!(s.get_token("t1").await.unwrap(), Some(token("t1", "acme")));
        assert_eq!(s.list_tokens(Some("acme"), false).await.unwrap().len(), 1);
        assert_eq!(s.list_tokens(None, false).await.unwrap().len(), 2);
        let revoked = s
            .revoke_token("t1", 20, &action("RevokeToken", "t1"))
            .await
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(20), "{l}");
        let again = s
            .revoke_token("t1", 30, &action("RevokeToken", "t1"))
            .await
            .unwrap();
        assert_eq!(
            again.revoked_at,
            Some(20),
            "{l}: the first revocation stays"
        );
        assert!(s.list_tokens(Some("acme"), false).await.unwrap().is_empty());
        assert_eq!(s.list_tokens(Some("acme"), true).await.unwrap().len(), 1);
        assert_eq!(
            s.revoke_token("nope", 1, &action("RevokeToken", "nope"))
                .await
                .unwrap_err()
                .kind(),
            StoreErrorKind::NotFound
        );
        let log = s.list_audit(None, 100).await.unwrap();
        let targets: Vec<(&str, &str)> = log
            .iter()
            .rev()
            .map(|e| (e.action.as_str(), e.target.as_str()))
            .collect();
        assert_eq!(
            targets,
            [
                ("CreateToken", "t1"),
                ("CreateToken", "t2"),
                ("RevokeToken", "t1"),
                ("RevokeToken", "t1"),
            ],
            "{l}: one row per change, none for the refused ones"
        );
    }
}

#[tokio::test]
async fn namespace_policies_default_then_replace() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        let p = s.namespace_policy("acme").await.unwrap();
        assert!(!p.anonymous_read && !p.require_pass, "{l}");
        let set = NamespacePolicyRecord {
            namespace: "acme".into(),
            anonymous_read: true,
            require_pass: true,
            require_signed: true,
        };
        s.set_namespace_policy(&set, 5, &action("SetNamespacePolicy", "acme"))
            .await
            .unwrap();
        assert_eq!(s.namespace_policy("acme").await.unwrap(), set, "{l}");
        assert_eq!(s.anonymous_namespaces().await.unwrap(), ["acme"], "{l}");
        let log = s.list_audit(Some("acme"), 10).await.unwrap();
        assert_eq!(log.len(), 1, "{l}");
        assert_eq!(log[0].action, "SetNamespacePolicy");
    }
}

/// Versions, yanks, requests and cancellations each leave exactly one audit row, written
/// with the change; a refused change (unknown parent, unknown version) leaves none.
#[tokio::test]
async fn every_change_writes_its_audit_row_with_it_and_a_refusal_none() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        assert_eq!(
            s.insert_base_version(
                new_base("acme/llama", "v3", Some("v404"), "x"),
                &action("PushBaseVersion", "acme/llama:v3"),
            )
            .await
            .unwrap_err()
            .kind(),
            StoreErrorKind::NotFound
        );
        patch(s, "acme/q", "1", "acme/llama", "v1", "q").await;
        base(s, "acme/llama", "v9", None).await;
        s.request_port(
            &name("acme/q"),
            &vref("1"),
            &name("acme/llama"),
            &vref("v9"),
            PortOrigin::Requested(0),
            &action("RequestPort", "acme/q:1@acme/llama:v9"),
        )
        .await
        .unwrap();
        s.cancel_port(
            &name("acme/q"),
            &vref("1"),
            &name("acme/llama"),
            &vref("v9"),
            METHOD_VERSION,
            &action("CancelPort", "acme/q:1@acme/llama:v9"),
        )
        .await
        .unwrap();
        assert_eq!(
            s.yank_patch_version(
                &name("acme/q"),
                &vref("404"),
                "gone",
                &action("YankPatchVersion", "acme/q:404")
            )
            .await
            .unwrap_err()
            .kind(),
            StoreErrorKind::NotFound
        );
        s.yank_patch_version(
            &name("acme/q"),
            &vref("1"),
            "superseded",
            &action("YankPatchVersion", "acme/q:1"),
        )
        .await
        .unwrap();
        // The same content again is a no-op, still audited.
        base(s, "acme/llama", "v1", None).await;
        let log = s.list_audit(None, 100).await.unwrap();
        let rows: Vec<(String, String)> = log
            .iter()
            .rev()
            .map(|e| (e.action.clone(), e.detail.clone()))
            .collect();
        let actions: Vec<&str> = rows.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            actions,
            [
                "Test",
                "Test",
                "Test",
                "RequestPort",
                "CancelPort",
                "YankPatchVersion",
                "Test"
            ],
            "{l}"
        );
        assert!(rows[0].1.ends_with("created true"), "{l}: {:?}", rows[0]);
        assert_eq!(rows[3].1, "state queued", "{l}");
        assert!(rows[6].1.ends_with("created false"), "{l}: {:?}", rows[6]);
    }
}

/// Who holds a blob, by digest, through indexed lookups: the versions holding it as a
/// file or an eval set, the patch versions whose ports hold it as an artifact (indexed
/// when the port completes, dropped when a failed port is retried), and the namespaces
/// that uploaded it.
#[tokio::test]
async fn blob_holders_come_from_files_port_artifacts_and_uploads() {
    use common::{lease_soon, patch as push_patch};
    use patchport_core::Digest;
    use patchport_core::layout::{ArtifactFile, BlobRange, FileRef};
    use patchport_core::port::PortDiagnostics;
    use patchport_store::meta::{BlobHolder, JobOutcome};

    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        push_patch(s, "team/qv", "1", "acme/llama", "v1", "qv").await;
        // Publishing v2 fans out a port of team/qv:1.
        base(s, "acme/llama", "v2", Some("v1")).await;
        let leased = lease_soon(s, "w").await;
        let piece = Digest::of(b"a merged tensor");
        let adapter = Digest::of(b"a re-pointed config");
        let outcome = JobOutcome::Succeeded {
            adapter_files: vec![ArtifactFile {
                file: FileRef {
                    path: "adapter_config.json".into(),
                    digest: adapter,
                    size: 19,
                },
                segments: vec![],
            }],
            merged_files: vec![ArtifactFile {
                file: FileRef {
                    path: "model.safetensors".into(),
                    digest: Digest::of(b"composed"),
                    size: 15,
                },
                segments: vec![BlobRange {
                    digest: piece,
                    offset: 0,
                    length: 15,
                }],
            }],
            diagnostics: PortDiagnostics::default(),
            evaluation: None,
        };
        s.complete_job(leased.job.id, leased.job.fencing_token, outcome)
            .await
            .unwrap();
        let base_file = Digest::of("acme/llamav1".as_bytes()).to_string();
        let unknown = Digest::of(b"nobody has this").to_string();
        s.record_blob_owner(&unknown, "uploader", 5).await.unwrap();
        s.record_blob_owner(&unknown, "uploader", 6).await.unwrap();
        let mut holders = s
            .blob_holders(&[
                piece.to_string(),
                adapter.to_string(),
                base_file.clone(),
                unknown.clone(),
                Digest::of(b"held by none").to_string(),
            ])
            .await
            .unwrap();
        holders.sort_by(|a, b| (&a.digest, &a.holder).cmp(&(&b.digest, &b.holder)));
        let held = |d: &str, h: &str, uploaded: bool| BlobHolder {
            digest: d.to_owned(),
            holder: h.to_owned(),
            uploaded,
        };
        let mut want = vec![
            held(&piece.to_string(), "team/qv", false),
            held(&adapter.to_string(), "team/qv", false),
            held(&base_file, "acme/llama", false),
            held(&unknown, "uploader", true),
        ];
        want.sort_by(|a, b| (&a.digest, &a.holder).cmp(&(&b.digest, &b.holder)));
        assert_eq!(holders, want, "{l}");
    }
}
