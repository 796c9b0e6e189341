//! Access control, the audit log and limits, through gRPC: who may do what, what a
//! refusal says, and that a refused request changes nothing.

use std::time::Duration;

use patchport_client::{Client, ClientError, ClientOptions, NoProgress};
use patchport_proto::v1;
use patchport_registry::{Application, Config, StartError};
use patchport_tests::{Backend, TestRegistry, base, fixtures, patch};
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

async fn token(admin: &Client, namespace: &str, scope: &str, expires: u64) -> (String, String) {
    let out = admin
        .admin()
        .create_token(v1::CreateTokenRequest {
            namespace: namespace.to_owned(),
            scope: scope.to_owned(),
            expires_in_seconds: expires,
            description: format!("{scope} on {namespace}"),
        })
        .await
        .unwrap()
        .into_inner();
    (out.token.unwrap().id, out.secret)
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.code().unwrap_or(Code::Unknown),
    }
}

fn status_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn push_llama(c: &Client, name: &str) -> Result<(), ClientError> {
    c.push_dir(
        &fixtures().join("llama-micro/v1"),
        &base(name, "v1", None),
        &NoProgress,
    )
    .await
    .map(|_| ())
}

async fn get_base(c: &Client, reference: &str) -> Result<v1::BaseVersion, tonic::Status> {
    c.registry()
        .get_base_version(v1::GetVersionRequest {
            reference: reference.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn tokens_scope_each_namespace() {
    let reg = secured(|_| {}).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    let (_, acme_push) = token(&admin, "acme", "push", 0).await;
    let (_, acme_read) = token(&admin, "acme", "read", 0).await;
    let (_, other_push) = token(&admin, "other", "push", 0).await;

    // No token: Unauthenticated, for reads and writes alike.
    let anon = reg.client_as(None).await.unwrap();
    assert_eq!(
        code(push_llama(&anon, "acme/llama").await),
        Code::Unauthenticated
    );
    let (c, msg) = status_code(get_base(&anon, "acme/llama:v1").await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(msg.contains("PATCHPORT_TOKEN"), "{msg}");

    // A push token pushes in its namespace only.
    let pusher = reg.client_as(Some(&acme_push)).await.unwrap();
    push_llama(&pusher, "acme/llama").await.unwrap();
    let (c, msg) = status_code(
        pusher
            .registry()
            .push_base_version(v1::PushBaseVersionRequest {
                name: "other/llama".into(),
                version: "v1".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    assert!(msg.contains("may not push to namespace \"other\""), "{msg}");

    // A read token reads but does not push.
    let reader = reg.client_as(Some(&acme_read)).await.unwrap();
    get_base(&reader, "acme/llama:v1").await.unwrap();
    assert_eq!(
        code(push_llama(&reader, "acme/llama2").await),
        Code::PermissionDenied
    );

    // Another namespace's token learns nothing: an existing and a missing name are
    // refused alike.
    let stranger = reg.client_as(Some(&other_push)).await.unwrap();
    let (c1, m1) = status_code(get_base(&stranger, "acme/llama:v1").await);
    let (c2, m2) = status_code(get_base(&stranger, "acme/nothing:v1").await);
    assert_eq!((c1, c2), (Code::PermissionDenied, Code::PermissionDenied));
    assert_eq!(m1, m2);
    // Listing everything shows only what the caller may read.
    let listed = stranger
        .registry()
        .list_base_versions(v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert!(listed.is_empty(), "{listed:?}");
    // Blobs of acme's versions are not readable by digest either.
    let digest = get_base(&reader, "acme/llama:v1").await.unwrap().files[0]
        .digest
        .clone();
    // A pusher may stat any digest, and a blob it may not see is not there for it.
    let (c, _) = status_code(
        stranger
            .blobs()
            .stat_blob(v1::StatBlobRequest {
                digest: digest.clone(),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);
    let read = stranger
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest: digest.clone(),
            offset: 0,
            length: 0,
        })
        .await;
    assert_eq!(read.map(|_| ()).unwrap_err().code(), Code::PermissionDenied);
    reader
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest,
            offset: 0,
            length: 0,
        })
        .await
        .unwrap();

    // Garbage and unknown tokens: Unauthenticated, saying nothing more.
    for bad in [
        "nonsense",
        "pp_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let c = reg.client_as(Some(bad)).await.unwrap();
        let (code, msg) = status_code(get_base(&c, "acme/llama:v1").await);
        assert_eq!(code, Code::Unauthenticated);
        assert_eq!(msg, "invalid, expired or revoked token");
    }
}

#[tokio::test]
async fn tokens_are_hashed_expire_and_revoke() {
    let reg = secured(|_| {}).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    let (id, secret) = token(&admin, "acme", "read", 0).await;
    assert!(secret.starts_with(&format!("pp_{id}_")));
    let listed = admin
        .admin()
        .list_tokens(v1::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    // The store holds the hash only.
    let db = std::fs::read(reg.config.database.trim_start_matches("sqlite://")).unwrap();
    let secret_part = secret.rsplit('_').next().unwrap();
    assert!(
        !db.windows(secret_part.len())
            .any(|w| w == secret_part.as_bytes()),
        "the secret is stored in the database"
    );

    let reader = reg.client_as(Some(&secret)).await.unwrap();
    reader
        .registry()
        .list_base_versions(v1::ListRequest {
            filter: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .admin()
        .revoke_token(v1::RevokeTokenRequest { id: id.clone() })
        .await
        .unwrap();
    let (c, _) = status_code(
        reader
            .registry()
            .list_base_versions(v1::ListRequest {
                filter: "acme".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);

    let (_, short) = token(&admin, "acme", "read", 1).await;
    let short = reg.client_as(Some(&short)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (c, _) = status_code(
        short
            .registry()
            .list_base_versions(v1::ListRequest {
                filter: "acme".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);

    // Only admins manage tokens; a namespace admin only its own namespace.
    let (_, acme_admin) = token(&admin, "acme", "admin", 0).await;
    let acme_admin = reg.client_as(Some(&acme_admin)).await.unwrap();
    token(&acme_admin, "acme", "push", 0).await;
    for (ns, scope) in [("other", "push"), ("*", "read"), ("acme", "worker")] {
        let (c, _) = status_code(
            acme_admin
                .admin()
                .create_token(v1::CreateTokenRequest {
                    namespace: ns.into(),
                    scope: scope.into(),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(c, Code::PermissionDenied, "{ns} {scope}");
    }
    let (c, msg) = status_code(
        admin
            .admin()
            .create_token(v1::CreateTokenRequest {
                namespace: "acme".into(),
                scope: "owner".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(msg.contains("unknown scope"), "{msg}");
}

#[tokio::test]
async fn anonymous_read_is_per_namespace() {
    let reg = secured(|_| {}).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    push_llama(&admin, "public/llama").await.unwrap();
    push_llama(&admin, "private/llama").await.unwrap();
    admin
        .admin()
        .set_namespace_policy(v1::NamespacePolicy {
            namespace: "public".into(),
            anonymous_read: true,
            require_pass: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let anon = reg.client_as(None).await.unwrap();
    get_base(&anon, "public/llama:v1").await.unwrap();
    let out = tempfile::tempdir().unwrap();
    anon.pull(
        &"public/llama:v1".parse().unwrap(),
        out.path(),
        false,
        &NoProgress,
    )
    .await
    .unwrap();
    let listed = anon
        .registry()
        .list_base_versions(v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "public/llama");
    assert_eq!(
        status_code(get_base(&anon, "private/llama:v1").await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code(push_llama(&anon, "public/other").await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn worker_scope_works_the_queue_and_nothing_else() {
    let reg = secured(|_| {}).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    let (_, worker) = token(&admin, "*", "worker", 0).await;
    let (_, pusher) = token(&admin, "acme", "push", 0).await;
    let worker = reg.client_as(Some(&worker)).await.unwrap();
    let pusher = reg.client_as(Some(&pusher)).await.unwrap();
    let lease = v1::LeaseJobRequest {
        worker_id: "w1".into(),
        ..Default::default()
    };
    worker.workers().lease_job(lease.clone()).await.unwrap();
    assert_eq!(
        status_code(pusher.workers().lease_job(lease).await).0,
        Code::PermissionDenied
    );
    assert_eq!(
        code(push_llama(&worker, "acme/llama").await),
        Code::PermissionDenied
    );
    assert_eq!(
        status_code(
            worker
                .admin()
                .list_tokens(v1::ListTokensRequest::default())
                .await
        )
        .0,
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn audit_log_records_state_changes() {
    let reg = secured(|_| {}).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    let (push_id, pusher) = token(&admin, "acme", "push", 0).await;
    let (_, reader) = token(&admin, "acme", "read", 0).await;
    let pusher = reg.client_as(Some(&pusher)).await.unwrap();
    let reader = reg.client_as(Some(&reader)).await.unwrap();
    push_llama(&pusher, "acme/llama").await.unwrap();
    pusher
        .push_dir(
            &fixtures().join("llama-micro/patches/lora-qv"),
            &patch("acme/qv", "1", "acme/llama:v1"),
            &NoProgress,
        )
        .await
        .unwrap();
    pusher
        .registry()
        .yank_patch_version(v1::YankRequest {
            reference: "acme/qv:1".into(),
            reason: "bad data".into(),
        })
        .await
        .unwrap();
    let denied = reader
        .registry()
        .yank_base_version(v1::YankRequest {
            reference: "acme/llama:v1".into(),
            reason: "x".into(),
        })
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);

    let entries = admin
        .admin()
        .list_audit(v1::ListAuditRequest {
            namespace: "acme".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let seen: Vec<(String, String, String, String)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e.actor.clone(),
                e.action.clone(),
                e.target.clone(),
                e.outcome.clone(),
            )
        })
        .collect();
    let expect = |actor: &str, action: &str, target: &str, outcome: &str| {
        assert!(
            seen.contains(&(actor.into(), action.into(), target.into(), outcome.into())),
            "no audit entry {actor} {action} {target} {outcome} in {seen:#?}"
        );
    };
    expect("bootstrap", "CreateToken", &push_id, "ok");
    expect(&push_id, "PushBaseVersion", "acme/llama:v1", "ok");
    expect(&push_id, "PushPatchVersion", "acme/qv:1", "ok");
    expect(&push_id, "YankPatchVersion", "acme/qv:1", "ok");
    assert!(
        seen.iter().any(|(_, a, t, o)| a == "YankBaseVersion"
            && t == "acme/llama:v1"
            && o == "PermissionDenied"),
        "{seen:#?}"
    );
    assert!(entries.iter().all(|e| e.time.is_some()));
    // Only admins read it.
    assert_eq!(
        status_code(
            reader
                .admin()
                .list_audit(v1::ListAuditRequest {
                    namespace: "acme".into(),
                    limit: 10,
                })
                .await
        )
        .0,
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn non_loopback_without_auth_refuses_to_start() {
    let config = |insecure| Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        database: "sqlite::memory:".into(),
        blobs: "memory://".into(),
        insecure_no_auth: insecure,
        ..Config::default()
    };
    match Application::build(config(false)).await {
        Err(e @ StartError::Insecure { .. }) => {
            assert!(e.to_string().contains("--insecure-no-auth"), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Application::build(config(true)).await.unwrap();
}

#[tokio::test]
async fn push_rate_is_limited_per_token() {
    let reg = secured(|c| c.auth.push_rate_per_minute = 2).await;
    let admin = reg.client_as(Some(ADMIN)).await.unwrap();
    let (_, a) = token(&admin, "acme", "push", 0).await;
    let (_, b) = token(&admin, "acme", "push", 0).await;
    let a = reg.client_as(Some(&a)).await.unwrap();
    let b = reg.client_as(Some(&b)).await.unwrap();
    push_llama(&a, "acme/l1").await.unwrap();
    push_llama(&a, "acme/l2").await.unwrap();
    let err = push_llama(&a, "acme/l3").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("push rate limit"), "{err}");
    // Another token has its own budget; the refused version was not stored.
    push_llama(&b, "acme/l3").await.unwrap();
}

#[tokio::test]
async fn limits_refuse_oversized_input() {
    let reg = TestRegistry::start_configured(Backend::Embedded, |c| {
        c.limits.max_header_bytes = 64;
        c.limits.max_name_len = 20;
        c.limits.max_chunk_bytes = 1024;
    })
    .await
    .unwrap();
    let client = reg.client().await.unwrap();
    let err = push_llama(&client, "acme/llama").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("--max-header-bytes"), "{err}");

    let (c, msg) = status_code(
        client
            .registry()
            .push_base_version(v1::PushBaseVersionRequest {
                name: "acme/a-very-long-model-name".into(),
                version: "v1".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(msg.contains("--max-name-length"), "{msg}");

    // A chunk over the limit is refused; the session keeps nothing of it.
    let data = vec![7u8; 4096];
    let digest = patchport_core::Digest::of(&data).to_string();
    let start = client
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: digest.clone(),
            size: data.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(start.max_chunk_size, 1024);
    let chunk = v1::UploadChunk {
        upload_id: start.upload_id.clone(),
        offset: 0,
        data: data.into(),
    };
    let err = client
        .blobs()
        .upload_chunks(futures::stream::iter([chunk]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-chunk-bytes"),
        "{}",
        err.message()
    );
    let status = client
        .blobs()
        .get_upload(v1::GetUploadRequest {
            upload_id: start.upload_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_offset, 0);
}

#[tokio::test]
async fn unfinished_upload_sessions_expire() {
    let reg = TestRegistry::start_configured(Backend::Embedded, |c| {
        c.limits.upload_session_ttl = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let client = reg.client().await.unwrap();
    let data = vec![1u8; 100];
    let start = client
        .blobs()
        .start_upload(v1::StartUploadRequest {
            digest: patchport_core::Digest::of(&data).to_string(),
            size: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let mut gone = None;
    for _ in 0..100 {
        match client
            .blobs()
            .get_upload(v1::GetUploadRequest {
                upload_id: start.upload_id.clone(),
            })
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => {
                gone = Some(s);
                break;
            }
        }
    }
    let status = gone.expect("the session never expired");
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = cert.cert.pem().into_bytes();
    let key_pem = cert.signing_key.serialize_pem().into_bytes();
    let reg = secured(|c| {
        c.tls = Some(patchport_registry::TlsConfig {
            cert_pem: cert_pem.clone(),
            key_pem,
        })
    })
    .await;
    let port = reg.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://localhost:{port}");
    let client = Client::connect_with(
        &url,
        ClientOptions {
            token: Some(ADMIN.to_owned()),
            ca_cert_pem: Some(cert_pem),
            allow_plaintext_token: false,
        },
    )
    .await
    .unwrap();
    push_llama(&client, "acme/llama").await.unwrap();
    // Without trusting the CA the handshake fails.
    let untrusted = match Client::connect_with(&url, ClientOptions::default()).await {
        Err(e) => e.to_string(),
        Ok(c) => get_base(&c, "acme/llama:v1").await.unwrap_err().to_string(),
    };
    assert!(!untrusted.is_empty());
}

#[tokio::test]
async fn a_token_is_not_sent_in_plain_text_to_another_host() {
    let options = |force| ClientOptions {
        token: Some("pp_x_y".into()),
        ca_cert_pem: None,
        allow_plaintext_token: force,
    };
    let err = Client::connect_with("http://192.0.2.1:50051", options(false))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("plain text"), "{err}");
    // Loopback is fine: it never leaves the machine.
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    Client::connect_with(&reg.url, options(false))
        .await
        .unwrap();
}
