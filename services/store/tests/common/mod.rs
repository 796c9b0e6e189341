//! Helpers shared by the metadata store suites (each test file uses a subset).
#![allow(dead_code, unreachable_pub)]

use patchport_core::layout::FileRef;
use patchport_core::{Digest, Name, Version, VersionRef};
use std::sync::Arc;
use std::time::Duration;

use patchport_core::port::PortDiagnostics;
use patchport_store::meta::{
    AuditRecord, EventCursor, EventRecord, JobOutcome, LeasedJob, MetadataStore, NewBaseVersion,
    NewPatchVersion, PgStore, RetryPolicy, SqliteStore,
};

pub fn name(s: &str) -> Name {
    s.parse().unwrap()
}

pub fn ver(s: &str) -> Version {
    s.parse().unwrap()
}

pub fn vref(s: &str) -> VersionRef {
    s.parse().unwrap()
}

pub fn file(path: &str, content: &str) -> FileRef {
    FileRef {
        path: path.to_owned(),
        digest: Digest::of(content.as_bytes()),
        size: content.len() as u64,
    }
}

pub fn new_base(n: &str, v: &str, parent: Option<&str>, content: &str) -> NewBaseVersion {
    let files = vec![
        file("config.json", "{}"),
        file("model.safetensors", content),
    ];
    NewBaseVersion {
        name: name(n),
        version: ver(v),
        digest: patchport_core::layout::manifest_digest("base", &files),
        parent: parent.map(vref),
        files,
        config_json: r#"{"model_type":"llama"}"#.to_owned(),
        model_type: "llama".to_owned(),
        tensor_count: 3,
    }
}

pub fn new_patch(
    n: &str,
    v: &str,
    base: &str,
    base_version: &str,
    content: &str,
) -> NewPatchVersion {
    let files = vec![
        file("adapter_config.json", "{}"),
        file("adapter_model.safetensors", content),
    ];
    NewPatchVersion {
        name: name(n),
        version: ver(v),
        digest: patchport_core::layout::manifest_digest("patch", &files),
        base_name: name(base),
        base: vref(base_version),
        files,
        adapter_json: r#"{"peft_type":"LORA"}"#.to_owned(),
        peft_type: "LORA".to_owned(),
        tensor_count: 4,
        eval_digest: None,
    }
}

/// A fresh database on the Postgres server of `url`; returns its URL.
pub async fn fresh_pg_url(url: &str) -> String {
    use sqlx::Connection;
    let db = format!("pp_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
    format!("{base}/{db}")
}

/// The audit row a caller hands to a change (the store writes it in the change's
/// transaction).
pub fn audit() -> AuditRecord {
    AuditRecord {
        id: 0,
        at: 1,
        actor: "test".to_owned(),
        action: "Test".to_owned(),
        target: "t".to_owned(),
        namespace: "acme".to_owned(),
        outcome: "ok".to_owned(),
        detail: String::new(),
    }
}

pub const MAX_ATTEMPTS: u32 = 3;
pub const LEASE: Duration = Duration::from_secs(30);

pub struct Backend {
    pub label: &'static str,
    pub store: Arc<dyn MetadataStore>,
    pub pg: Option<sqlx::PgPool>,
    pub _dir: Option<tempfile::TempDir>,
}

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: MAX_ATTEMPTS,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(4),
    }
}

pub async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::connect(&format!("sqlite://{}/meta.db", dir.path().display()))
        .await
        .unwrap()
        .with_retry_policy(policy());
    let mut out = vec![Backend {
        label: "sqlite",
        store: Arc::new(sqlite),
        pg: None,
        _dir: Some(dir),
    }];
    match std::env::var("PATCHPORT_TEST_DATABASE_URL") {
        Ok(url) => {
            let fresh = fresh_pg_url(&url).await;
            let store = PgStore::connect(&fresh)
                .await
                .unwrap()
                .with_retry_policy(policy());
            out.push(Backend {
                label: "postgres",
                pg: Some(store.pool().clone()),
                store: Arc::new(store),
                _dir: None,
            });
        }
        Err(_) => {
            eprintln!("SKIPPED postgres metadata store tests: PATCHPORT_TEST_DATABASE_URL not set")
        }
    }
    out
}

/// Waits until every committed event is readable. On Postgres a reader holds back rows
/// at or above the oldest running transaction of the whole cluster (other tests' databases
/// included): a delay, never a loss.
pub async fn settle(b: &Backend) {
    let Some(pool) = &b.pg else { return };
    loop {
        let settled: bool = sqlx::query_scalar(
            "SELECT COALESCE(MAX(xid) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if settled {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every event from the origin.
pub async fn all_events(b: &Backend) -> Vec<EventRecord> {
    settle(b).await;
    let s = b.store.as_ref();
    let mut out = Vec::new();
    let mut cursor = EventCursor::origin();
    loop {
        let (page, next) = s.read_events(Some(&cursor), 7).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
        cursor = next;
    }
}

pub async fn base(s: &dyn MetadataStore, n: &str, v: &str, parent: Option<&str>) -> Digest {
    s.insert_base_version(new_base(n, v, parent, &format!("{n}{v}")), &audit())
        .await
        .unwrap()
        .0
        .digest
}

pub async fn patch(s: &dyn MetadataStore, n: &str, v: &str, b: &str, bv: &str, content: &str) {
    s.insert_patch_version(new_patch(n, v, b, bv, content), &audit())
        .await
        .unwrap();
}

pub fn succeeded() -> JobOutcome {
    JobOutcome::Succeeded {
        adapter_files: vec![],
        merged_files: vec![],
        diagnostics: PortDiagnostics::default(),
        evaluation: None,
    }
}

/// Leases, waiting out a backoff (the test policy's backoffs are a few milliseconds).
pub async fn lease_soon(s: &dyn MetadataStore, worker: &str) -> LeasedJob {
    for _ in 0..1_000 {
        if let Some(j) = s.lease_job(worker, &[], LEASE).await.unwrap() {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("no job became ready");
}
