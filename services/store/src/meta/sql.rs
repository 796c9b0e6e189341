//! The SQL shared by the Postgres and SQLite stores.
//!
//! Both dialects accept `$n` placeholders (numbered in order of first use), `RETURNING`,
//! `BIGINT` and `TEXT`, so one body serves both; `impl_sql_store!` stamps it onto each
//! backend's pool type. Dialect differences live in the backend modules.

use patchport_core::layout::{FileRef, TensorRecord};
use patchport_core::{Digest, Name, Version};

use super::{StoreError, VersionState};

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct BaseRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) digest: String,
    pub(crate) parent_version: Option<String>,
    pub(crate) parent_digest: Option<String>,
    pub(crate) state: String,
    pub(crate) yank_reason: Option<String>,
    pub(crate) config_json: String,
    pub(crate) model_type: String,
    pub(crate) tensor_count: i64,
    pub(crate) total_size: i64,
    pub(crate) created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PatchRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) digest: String,
    pub(crate) base_name: String,
    pub(crate) base_version: String,
    pub(crate) base_digest: String,
    pub(crate) state: String,
    pub(crate) yank_reason: Option<String>,
    pub(crate) adapter_json: String,
    pub(crate) peft_type: String,
    pub(crate) tensor_count: i64,
    pub(crate) total_size: i64,
    pub(crate) eval_digest: Option<String>,
    pub(crate) created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FileRow {
    pub(crate) path: String,
    pub(crate) digest: String,
    pub(crate) size: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TensorRow {
    pub(crate) name: String,
    pub(crate) dtype: String,
    pub(crate) shape: String,
    pub(crate) begin_offset: i64,
    pub(crate) end_offset: i64,
    pub(crate) digest: String,
    pub(crate) non_finite: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PortRow {
    pub(crate) id: i64,
    pub(crate) patch_name: String,
    pub(crate) patch_version: String,
    pub(crate) patch_digest: String,
    pub(crate) base_name: String,
    pub(crate) base_version: String,
    pub(crate) base_digest: String,
    pub(crate) source_base_digest: String,
    pub(crate) method_version: String,
    pub(crate) state: String,
    pub(crate) refusals_json: String,
    pub(crate) diagnostics_json: Option<String>,
    pub(crate) adapter_files_json: String,
    pub(crate) merged_files_json: String,
    pub(crate) attempts: i64,
    pub(crate) error: Option<String>,
    pub(crate) queued_at: i64,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: Option<i64>,
    pub(crate) job_id: Option<i64>,
    pub(crate) evaluation_json: Option<String>,
    pub(crate) queue_position: Option<i64>,
}

/// Every port column, and a queued port's place in the queue: 1 + the queued jobs leased
/// before its job (higher priority first, then first in first out, as `lease_job` takes
/// them).
pub(crate) const PORT_SELECT: &str = "SELECT t.id, p.name AS patch_name, p.version AS patch_version, \
    p.digest AS patch_digest, b.name AS base_name, b.version AS base_version, \
    b.digest AS base_digest, s.digest AS source_base_digest, t.method_version, t.state, \
    t.refusals_json, t.diagnostics_json, t.adapter_files_json, t.merged_files_json, \
    t.attempts, t.error, t.queued_at, t.started_at, t.finished_at, t.job_id, t.evaluation_json, \
    CASE WHEN t.state = 'queued' THEN q.position END AS queue_position \
    FROM ports t JOIN patch_versions p ON p.id = t.patch_id \
    JOIN base_versions b ON b.id = t.base_id JOIN base_versions s ON s.id = t.source_base_id \
    LEFT JOIN (SELECT id AS job, ROW_NUMBER() OVER (ORDER BY priority DESC, id) AS position \
    FROM jobs WHERE state = 'queued') q ON q.job = t.job_id";

pub(crate) fn port_record(row: PortRow) -> Result<super::PortRecord, StoreError> {
    const T: &str = "ports";
    fn json<V: serde::de::DeserializeOwned>(s: &str) -> Result<V, StoreError> {
        serde_json::from_str(s).map_err(|e| corrupt(T, e))
    }
    Ok(super::PortRecord {
        id: row.id,
        patch_name: name(T, &row.patch_name)?,
        patch_version: version(T, &row.patch_version)?,
        patch_digest: digest(T, &row.patch_digest)?,
        base_name: name(T, &row.base_name)?,
        base_version: version(T, &row.base_version)?,
        base_digest: digest(T, &row.base_digest)?,
        source_base_digest: digest(T, &row.source_base_digest)?,
        method_version: row.method_version,
        state: super::PortState::parse(&row.state)?,
        refusals: json(&row.refusals_json)?,
        diagnostics: row.diagnostics_json.as_deref().map(json).transpose()?,
        adapter_files: json(&row.adapter_files_json)?,
        merged_files: json(&row.merged_files_json)?,
        attempts: row.attempts as u32,
        error: row.error,
        queued_at: row.queued_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        job_id: row.job_id,
        evaluation_json: row.evaluation_json,
        queue_position: row.queue_position.and_then(|n| u64::try_from(n).ok()),
    })
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct JobRow {
    pub(crate) id: i64,
    pub(crate) job_key: String,
    pub(crate) patch_digest: String,
    pub(crate) source_base_digest: String,
    pub(crate) target_base_digest: String,
    pub(crate) method_version: String,
    pub(crate) state: String,
    pub(crate) priority: i64,
    pub(crate) attempts: i64,
    pub(crate) max_attempts: i64,
    pub(crate) run_after: i64,
    pub(crate) lease_owner: Option<String>,
    pub(crate) lease_expires_at: Option<i64>,
    pub(crate) fencing_token: i64,
    pub(crate) cancel_requested: i64,
    pub(crate) last_error: Option<String>,
}

pub(crate) const JOB_SELECT: &str = "SELECT id, job_key, patch_digest, source_base_digest, \
    target_base_digest, method_version, state, priority, attempts, max_attempts, run_after, \
    lease_owner, lease_expires_at, fencing_token, cancel_requested, last_error FROM jobs";

pub(crate) fn job_record(row: JobRow) -> Result<super::JobRecord, StoreError> {
    const T: &str = "jobs";
    Ok(super::JobRecord {
        id: row.id,
        job_key: row.job_key,
        patch_digest: digest(T, &row.patch_digest)?,
        source_base_digest: digest(T, &row.source_base_digest)?,
        target_base_digest: digest(T, &row.target_base_digest)?,
        method_version: row.method_version,
        state: super::PortState::parse(&row.state)?,
        priority: row.priority,
        attempts: row.attempts as u32,
        max_attempts: row.max_attempts as u32,
        run_after: row.run_after,
        lease_owner: row.lease_owner,
        lease_expires_at: row.lease_expires_at,
        fencing_token: row.fencing_token,
        cancel_requested: row.cancel_requested != 0,
        last_error: row.last_error,
    })
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub(crate) id: i64,
    /// The writing transaction (Postgres) or empty (SQLite).
    pub(crate) xid: String,
    pub(crate) kind: String,
    pub(crate) subject: String,
    pub(crate) job_id: Option<i64>,
    pub(crate) port_id: Option<i64>,
    pub(crate) detail: Option<String>,
    pub(crate) payload_json: Option<String>,
    pub(crate) created_at: i64,
}

pub(crate) fn event_record(
    row: EventRow,
    cursor: super::EventCursor,
) -> Result<super::EventRecord, StoreError> {
    Ok(super::EventRecord {
        cursor,
        id: row.id,
        kind: row.kind.parse().map_err(|e| corrupt("events", e))?,
        subject: row.subject,
        job_id: row.job_id,
        port_id: row.port_id,
        detail: row.detail,
        payload_json: row.payload_json,
        created_at: row.created_at,
    })
}

/// What a port event tells a subscriber without a follow-up call: the pair by name and
/// digest, the state, refusal kinds, attempts and error, the drift risk and a summary of
/// the diagnostics (the per-module numbers stay with the port).
pub(crate) fn port_event_payload(
    kind: patchport_core::event::EventKind,
    port: &super::PortRecord,
    detail: Option<&str>,
) -> String {
    let diagnostics = port.diagnostics.as_ref().map(|d| {
        serde_json::json!({
            "modules": d.modules.len(),
            "unchanged_modules": d.modules.iter().filter(|m| m.unchanged).count(),
            "base_drift": d.total.base_drift,
            "patch_size": d.total.patch_size,
            "drift_to_patch": d.total.drift_to_patch,
            "cosine": d.total.cosine,
        })
    });
    let verdict = port
        .evaluation_json
        .as_deref()
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| {
            v.get("verdict")
                .or_else(|| v.get("status"))
                .and_then(|x| x.as_str().map(str::to_owned))
        });
    serde_json::json!({
        "kind": kind.as_str(),
        "port_id": port.id,
        "job_id": port.job_id,
        "patch": format!("{}:{}", port.patch_name, port.patch_version),
        "patch_digest": port.patch_digest.to_string(),
        "base": format!("{}:{}", port.base_name, port.base_version),
        "base_digest": port.base_digest.to_string(),
        "source_base_digest": port.source_base_digest.to_string(),
        "method_version": port.method_version,
        "state": port.state.as_str(),
        "attempts": port.attempts,
        "error": port.error,
        "detail": detail,
        "refusal_kinds": port.refusals.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
        "risk": port.diagnostics.as_ref().map(|d| d.risk()),
        "high_risk": port.diagnostics.as_ref().map(|d| d.risk() >= patchport_core::port::HIGH_RISK),
        "diagnostics": diagnostics,
        "verdict": verdict,
        "adapter_files": port.adapter_files.len(),
        "merged_files": port.merged_files.len(),
    })
    .to_string()
}


pub(crate) fn to_json<V: serde::Serialize>(v: &V) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

pub(crate) const BASE_SELECT: &str = "SELECT b.id, b.name, b.version, b.digest, \
    p.version AS parent_version, p.digest AS parent_digest, b.state, b.yank_reason, \
    b.config_json, b.model_type, b.tensor_count, b.total_size, b.created_at \
    FROM base_versions b LEFT JOIN base_versions p ON p.id = b.parent_id";

pub(crate) const PATCH_SELECT: &str = "SELECT v.id, v.name, v.version, v.digest, \
    b.name AS base_name, b.version AS base_version, b.digest AS base_digest, v.state, \
    v.yank_reason, v.adapter_json, v.peft_type, v.tensor_count, v.total_size, \
    v.eval_digest, v.created_at \
    FROM patch_versions v JOIN base_versions b ON b.id = v.base_id";

/// Test-only failpoint, never set in production: `PATCHPORT_TEST_FANOUT_PAUSE_MS=N`
/// makes every base publish sleep N ms inside its transaction once half of its fan-out
/// is queued, logging `test failpoint: publish paused mid fan-out` first, so fault tests
/// can kill the registry with the transaction open. Read once per process.
pub(crate) fn fanout_pause() -> Option<std::time::Duration> {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("PATCHPORT_TEST_FANOUT_PAUSE_MS")
            .ok()
            .and_then(|ms| ms.trim().parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

fn corrupt(table: &'static str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        message: message.to_string(),
    }
}

pub(crate) fn digest(table: &'static str, s: &str) -> Result<Digest, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn name(table: &'static str, s: &str) -> Result<Name, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn version(table: &'static str, s: &str) -> Result<Version, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn files(table: &'static str, rows: Vec<FileRow>) -> Result<Vec<FileRef>, StoreError> {
    rows.into_iter()
        .map(|r| {
            Ok(FileRef {
                path: r.path,
                digest: digest(table, &r.digest)?,
                size: r.size as u64,
            })
        })
        .collect()
}

pub(crate) fn base_record(
    row: BaseRow,
    files: Vec<FileRef>,
) -> Result<super::BaseVersionRecord, StoreError> {
    const T: &str = "base_versions";
    let parent = match (row.parent_version, row.parent_digest) {
        (Some(v), Some(d)) => Some((version(T, &v)?, digest(T, &d)?)),
        _ => None,
    };
    Ok(super::BaseVersionRecord {
        name: name(T, &row.name)?,
        version: version(T, &row.version)?,
        digest: digest(T, &row.digest)?,
        parent,
        state: VersionState::parse(&row.state)?,
        yank_reason: row.yank_reason,
        files,
        config_json: row.config_json,
        model_type: row.model_type,
        tensor_count: row.tensor_count as u64,
        total_size: row.total_size as u64,
        created_at: row.created_at,
    })
}

pub(crate) fn patch_record(
    row: PatchRow,
    files: Vec<FileRef>,
) -> Result<super::PatchVersionRecord, StoreError> {
    const T: &str = "patch_versions";
    Ok(super::PatchVersionRecord {
        name: name(T, &row.name)?,
        version: version(T, &row.version)?,
        digest: digest(T, &row.digest)?,
        base_name: name(T, &row.base_name)?,
        base_version: version(T, &row.base_version)?,
        base_digest: digest(T, &row.base_digest)?,
        state: VersionState::parse(&row.state)?,
        yank_reason: row.yank_reason,
        files,
        adapter_json: row.adapter_json,
        peft_type: row.peft_type,
        tensor_count: row.tensor_count as u64,
        total_size: row.total_size as u64,
        eval_digest: row.eval_digest.map(|d| digest(T, &d)).transpose()?,
        created_at: row.created_at,
    })
}

pub(crate) fn tensor_record(row: TensorRow) -> Result<TensorRecord, StoreError> {
    const T: &str = "blob_tensors";
    Ok(TensorRecord {
        name: row.name,
        dtype: row.dtype,
        shape: serde_json::from_str(&row.shape).map_err(|e| corrupt(T, e))?,
        begin: row.begin_offset as u64,
        end: row.end_offset as u64,
        digest: digest(T, &row.digest)?,
        non_finite: row.non_finite as u64,
    })
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// Implements `MetadataStore` for a struct with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_sql_store {
    ($store:ty, $db:ty) => {
        impl $store {
            async fn base_by_ref(
                conn: &mut <$db as sqlx::Database>::Connection,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::sql::BaseRow>, $crate::meta::StoreError> {
                use $crate::meta::sql::{BaseRow, BASE_SELECT};
                let row = match version {
                    patchport_core::VersionRef::Version(v) => {
                        sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                            "{BASE_SELECT} WHERE b.name = $1 AND b.version = $2"
                        )))
                        .bind(name.as_str())
                        .bind(v.as_str())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                    patchport_core::VersionRef::Digest(d) => {
                        sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                            "{BASE_SELECT} WHERE b.name = $1 AND b.digest = $2 ORDER BY b.id LIMIT 1"
                        )))
                        .bind(name.as_str())
                        .bind(d.to_string())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                };
                Ok(row)
            }

            async fn patch_by_ref(
                conn: &mut <$db as sqlx::Database>::Connection,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::sql::PatchRow>, $crate::meta::StoreError> {
                use $crate::meta::sql::{PatchRow, PATCH_SELECT};
                let row = match version {
                    patchport_core::VersionRef::Version(v) => {
                        sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                            "{PATCH_SELECT} WHERE v.name = $1 AND v.version = $2"
                        )))
                        .bind(name.as_str())
                        .bind(v.as_str())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                    patchport_core::VersionRef::Digest(d) => {
                        sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                            "{PATCH_SELECT} WHERE v.name = $1 AND v.digest = $2 ORDER BY v.id LIMIT 1"
                        )))
                        .bind(name.as_str())
                        .bind(d.to_string())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                };
                Ok(row)
            }

            async fn load_base(
                conn: &mut <$db as sqlx::Database>::Connection,
                row: $crate::meta::sql::BaseRow,
            ) -> Result<$crate::meta::BaseVersionRecord, $crate::meta::StoreError> {
                let files = sqlx::query_as::<_, $crate::meta::sql::FileRow>(
                    "SELECT path, digest, size FROM base_files WHERE version_id = $1 ORDER BY path",
                )
                .bind(row.id)
                .fetch_all(&mut *conn)
                .await?;
                let files = $crate::meta::sql::files("base_files", files)?;
                $crate::meta::sql::base_record(row, files)
            }

            async fn load_patch(
                conn: &mut <$db as sqlx::Database>::Connection,
                row: $crate::meta::sql::PatchRow,
            ) -> Result<$crate::meta::PatchVersionRecord, $crate::meta::StoreError> {
                let files = sqlx::query_as::<_, $crate::meta::sql::FileRow>(
                    "SELECT path, digest, size FROM patch_files WHERE version_id = $1 ORDER BY path",
                )
                .bind(row.id)
                .fetch_all(&mut *conn)
                .await?;
                let files = $crate::meta::sql::files("patch_files", files)?;
                $crate::meta::sql::patch_record(row, files)
            }

            /// Ports matching `filter` (a fixed `t.<column> = $1` clause) for `id`, oldest first.
            async fn ports_where(
                conn: &mut <$db as sqlx::Database>::Connection,
                filter: &'static str,
                id: i64,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let rows = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE {filter} ORDER BY t.id",
                    $crate::meta::sql::PORT_SELECT
                )))
                .bind(id)
                .fetch_all(&mut *conn)
                .await?;
                rows.into_iter().map($crate::meta::sql::port_record).collect()
            }

            async fn try_insert_base(
                &self,
                new: &$crate::meta::NewBaseVersion,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::base_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_base(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        Ok((rec, false))
                    } else {
                        Err(StoreError::AlreadyExists {
                            what: format!("base version {}:{}", new.name, new.version),
                            existing: rec.digest,
                        })
                    };
                }
                let parent = match &new.parent {
                    None => None,
                    Some(p) => match Self::base_by_ref(&mut tx, &new.name, p).await? {
                        Some(row) => Some(row),
                        None => {
                            return Err(StoreError::NotFound {
                                what: format!("parent version {}:{}", new.name, p),
                            });
                        }
                    },
                };
                let parent_id = parent.as_ref().map(|r| r.id);
                let parent_ref = parent.map(|r| (r.version, r.digest));
                let total: u64 = new.files.iter().map(|f| f.size).sum();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO base_versions (name, version, digest, parent_id, config_json, \
                     model_type, tensor_count, total_size, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                )
                .bind(new.name.as_str())
                .bind(new.version.as_str())
                .bind(new.digest.to_string())
                .bind(parent_id)
                .bind(&new.config_json)
                .bind(&new.model_type)
                .bind(new.tensor_count as i64)
                .bind(total as i64)
                .bind($crate::meta::now_millis())
                .fetch_one(&mut *tx)
                .await?;
                for f in &new.files {
                    sqlx::query(
                        "INSERT INTO base_files (version_id, path, digest, size) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(&f.path)
                    .bind(f.digest.to_string())
                    .bind(f.size as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                // Fan-out, in this transaction: every published patch version pinned to
                // an ancestor of the new version gets a port onto it.
                Self::emit(
                    &mut tx,
                    patchport_core::event::EventKind::BasePublished,
                    &format!("{}:{}", new.name, new.version),
                    &serde_json::json!({
                        "digest": new.digest.to_string(),
                        "parent": parent_ref.as_ref().map(|(v, d)| serde_json::json!({"version": v, "digest": d})),
                    }),
                )
                .await?;
                let patches: Vec<i64> = sqlx::query_scalar(
                    "WITH RECURSIVE anc (id) AS ( \
                     SELECT parent_id FROM base_versions WHERE id = $1 AND parent_id IS NOT NULL \
                     UNION ALL SELECT b.parent_id FROM base_versions b JOIN anc ON b.id = anc.id \
                     WHERE b.parent_id IS NOT NULL) \
                     SELECT p.id FROM patch_versions p JOIN anc ON p.base_id = anc.id \
                     WHERE p.state = 'published' ORDER BY p.id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                let half = patches.len() / 2;
                for (i, patch_id) in patches.into_iter().enumerate() {
                    if i == half && let Some(pause) = $crate::meta::sql::fanout_pause() {
                        tracing::warn!(queued = i, pause_ms = pause.as_millis() as u64, "test failpoint: publish paused mid fan-out");
                        tokio::time::sleep(pause).await;
                    }
                    Self::queue_port(
                        &mut tx,
                        patch_id,
                        id,
                        self.retry.max_attempts,
                        patchport_core::port::PortOrigin::Fanout,
                        false,
                    )
                    .await?;
                }
                let row = Self::base_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("base version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_base(&mut tx, row).await?;
                tx.commit().await?;
                Ok((rec, true))
            }

            async fn try_insert_patch(
                &self,
                new: &$crate::meta::NewPatchVersion,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::patch_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_patch(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        Ok((rec, false))
                    } else {
                        Err(StoreError::AlreadyExists {
                            what: format!("patch version {}:{}", new.name, new.version),
                            existing: rec.digest,
                        })
                    };
                }
                let Some(base) = Self::base_by_ref(&mut tx, &new.base_name, &new.base).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("base version {}:{}", new.base_name, new.base),
                    });
                };
                let total: u64 = new.files.iter().map(|f| f.size).sum();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO patch_versions (name, version, digest, base_id, adapter_json, \
                     peft_type, tensor_count, total_size, eval_digest, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                )
                .bind(new.name.as_str())
                .bind(new.version.as_str())
                .bind(new.digest.to_string())
                .bind(base.id)
                .bind(&new.adapter_json)
                .bind(&new.peft_type)
                .bind(new.tensor_count as i64)
                .bind(total as i64)
                .bind(new.eval_digest.map(|d| d.to_string()))
                .bind($crate::meta::now_millis())
                .fetch_one(&mut *tx)
                .await?;
                for f in &new.files {
                    sqlx::query(
                        "INSERT INTO patch_files (version_id, path, digest, size) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(&f.path)
                    .bind(f.digest.to_string())
                    .bind(f.size as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                // Catch-up, in this transaction: a port onto every published descendant
                // of the pinned base.
                Self::emit(
                    &mut tx,
                    patchport_core::event::EventKind::PatchPushed,
                    &format!("{}:{}", new.name, new.version),
                    &serde_json::json!({
                        "digest": new.digest.to_string(),
                        "base": format!("{}:{}", base.name, base.version),
                        "base_digest": base.digest,
                    }),
                )
                .await?;
                let targets: Vec<i64> = sqlx::query_scalar(
                    "WITH RECURSIVE des (id) AS ( \
                     SELECT id FROM base_versions WHERE parent_id = $1 \
                     UNION ALL SELECT b.id FROM base_versions b JOIN des ON b.parent_id = des.id) \
                     SELECT b.id FROM base_versions b JOIN des ON b.id = des.id \
                     WHERE b.state = 'published' ORDER BY b.id",
                )
                .bind(base.id)
                .fetch_all(&mut *tx)
                .await?;
                for target_id in targets {
                    Self::queue_port(
                        &mut tx,
                        id,
                        target_id,
                        self.retry.max_attempts,
                        patchport_core::port::PortOrigin::CatchUp,
                        false,
                    )
                    .await?;
                }
                let row = Self::patch_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("patch version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_patch(&mut tx, row).await?;
                tx.commit().await?;
                Ok((rec, true))
            }

            /// Appends one event about a version (and wakes subscribers at commit).
            async fn emit(
                conn: &mut <$db as sqlx::Database>::Connection,
                kind: patchport_core::event::EventKind,
                subject: &str,
                payload: &serde_json::Value,
            ) -> Result<(), $crate::meta::StoreError> {
                sqlx::query(
                    "INSERT INTO events (kind, subject, job_id, port_id, detail, payload_json, created_at) \
                     VALUES ($1, $2, NULL, NULL, NULL, $3, $4)",
                )
                .bind(kind.as_str())
                .bind(subject)
                .bind(payload.to_string())
                .bind($crate::meta::now_millis())
                .execute(&mut *conn)
                .await?;
                Self::notify_events(conn).await
            }

            /// The ids of a job's ports in a state, oldest first.
            async fn job_port_ids(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
                state: $crate::meta::PortState,
            ) -> Result<Vec<i64>, $crate::meta::StoreError> {
                Ok(sqlx::query_scalar("SELECT id FROM ports WHERE job_id = $1 AND state = $2 ORDER BY id")
                    .bind(job_id)
                    .bind(state.as_str())
                    .fetch_all(&mut *conn)
                    .await?)
            }

            /// Ports by id, oldest first.
            async fn ports_by_id(
                conn: &mut <$db as sqlx::Database>::Connection,
                ids: &[i64],
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let mut q = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                        "{} WHERE t.id IN ({}) ORDER BY t.id",
                        $crate::meta::sql::PORT_SELECT,
                        marks.join(", ")
                    )));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    for row in q.fetch_all(&mut *conn).await? {
                        out.push($crate::meta::sql::port_record(row)?);
                    }
                }
                Ok(out)
            }

            /// Appends one event per port, in port order, each carrying the port as it
            /// stands now (call it after the change it announces).
            async fn emit_ports(
                conn: &mut <$db as sqlx::Database>::Connection,
                kind: patchport_core::event::EventKind,
                detail: Option<&str>,
                ports: &[i64],
            ) -> Result<(), $crate::meta::StoreError> {
                if ports.is_empty() {
                    return Ok(());
                }
                let now = $crate::meta::now_millis();
                for port in Self::ports_by_id(conn, ports).await? {
                    let subject = format!(
                        "{}:{}@{}:{}",
                        port.patch_name, port.patch_version, port.base_name, port.base_version
                    );
                    let payload = $crate::meta::sql::port_event_payload(kind, &port, detail);
                    sqlx::query(
                        "INSERT INTO events (kind, subject, job_id, port_id, detail, payload_json, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(kind.as_str())
                    .bind(subject)
                    .bind(port.job_id)
                    .bind(port.id)
                    .bind(detail)
                    .bind(payload)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                }
                Self::notify_events(conn).await
            }

            /// Creates (or finds, by key) the job porting a patch version onto a base
            /// version and the patch version's port row linked to it, with its events;
            /// returns the port's id. Idempotent: an existing port row is left alone,
            /// unless `retry` is set and it ended failed or cancelled, when it is queued
            /// again. A queued job is raised to `origin`'s priority when that is higher.
            async fn queue_port(
                conn: &mut <$db as sqlx::Database>::Connection,
                patch_id: i64,
                target_id: i64,
                max_attempts: u32,
                origin: patchport_core::port::PortOrigin,
                retry: bool,
            ) -> Result<i64, $crate::meta::StoreError> {
                use patchport_core::event::EventKind;
                use patchport_core::port::METHOD_VERSION;
                let now = $crate::meta::now_millis();
                let priority = origin.job_priority();
                let (patch_digest, source_id, source_digest): (String, i64, String) = sqlx::query_as(
                    "SELECT p.digest, p.base_id, s.digest FROM patch_versions p \
                     JOIN base_versions s ON s.id = p.base_id WHERE p.id = $1",
                )
                .bind(patch_id)
                .fetch_one(&mut *conn)
                .await?;
                let target_digest: String =
                    sqlx::query_scalar("SELECT digest FROM base_versions WHERE id = $1")
                        .bind(target_id)
                        .fetch_one(&mut *conn)
                        .await?;
                let key = format!("port:{patch_digest}:{source_digest}:{target_digest}:{METHOD_VERSION}");
                sqlx::query(
                    "INSERT INTO jobs (job_key, patch_digest, source_base_digest, target_base_digest, \
                     method_version, state, priority, max_attempts, run_after, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, 'queued', $8, $6, $7, $7, $7) \
                     ON CONFLICT (job_key) DO NOTHING",
                )
                .bind(&key)
                .bind(&patch_digest)
                .bind(&source_digest)
                .bind(&target_digest)
                .bind(METHOD_VERSION)
                .bind(i64::from(max_attempts))
                .bind(now)
                .bind(priority)
                .execute(&mut *conn)
                .await?;
                let (job_id, job_state): (i64, String) =
                    sqlx::query_as("SELECT id, state FROM jobs WHERE job_key = $1")
                        .bind(&key)
                        .fetch_one(&mut *conn)
                        .await?;
                sqlx::query(
                    "UPDATE jobs SET priority = $1, updated_at = $2 \
                     WHERE id = $3 AND state = 'queued' AND priority < $1",
                )
                .bind(priority)
                .bind(now)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
                let existing: Option<(i64, String)> = sqlx::query_as(
                    "SELECT id, state FROM ports WHERE patch_id = $1 AND base_id = $2 AND method_version = $3",
                )
                .bind(patch_id)
                .bind(target_id)
                .bind(METHOD_VERSION)
                .fetch_optional(&mut *conn)
                .await?;
                let port_id = match existing {
                    Some((id, state)) if !(retry && (state == "failed" || state == "cancelled")) => {
                        return Ok(id);
                    }
                    Some((id, _)) => {
                        sqlx::query(
                            "UPDATE ports SET state = 'queued', refusals_json = '[]', diagnostics_json = NULL, \
                             adapter_files_json = '[]', merged_files_json = '[]', attempts = 0, error = NULL, \
                             queued_at = $1, started_at = NULL, finished_at = NULL, evaluation_json = NULL, \
                             job_id = $2 WHERE id = $3",
                        )
                        .bind(now)
                        .bind(job_id)
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                        id
                    }
                    None => {
                        sqlx::query_scalar(
                            "INSERT INTO ports (patch_id, base_id, source_base_id, method_version, state, \
                             refusals_json, diagnostics_json, adapter_files_json, merged_files_json, attempts, \
                             error, queued_at, started_at, finished_at, job_id) \
                             VALUES ($1, $2, $3, $4, 'queued', '[]', NULL, '[]', '[]', 0, NULL, $5, NULL, NULL, $6) \
                             RETURNING id",
                        )
                        .bind(patch_id)
                        .bind(target_id)
                        .bind(source_id)
                        .bind(METHOD_VERSION)
                        .bind(now)
                        .bind(job_id)
                        .fetch_one(&mut *conn)
                        .await?
                    }
                };
                let one = [port_id];
                match job_state.as_str() {
                    "queued" => Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?,
                    "running" => {
                        // Another patch version with the same content is being ported
                        // right now: this one rides along.
                        sqlx::query(
                            "UPDATE ports SET state = 'running', \
                             attempts = (SELECT attempts FROM jobs WHERE id = $1), started_at = $2 \
                             WHERE id = $3",
                        )
                        .bind(job_id)
                        .bind(now)
                        .bind(port_id)
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query("UPDATE jobs SET cancel_requested = 0 WHERE id = $1")
                            .bind(job_id)
                            .execute(&mut *conn)
                            .await?;
                        Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?;
                        Self::emit_ports(conn, EventKind::PortStarted, None, &one).await?;
                    }
                    done => {
                        // The work is done: share a sibling's result when one holds it
                        // (unless a failure is being retried), otherwise queue the job
                        // again.
                        let share = done == "succeeded" || done == "incompatible" || (done == "failed" && !retry);
                        let copied = if share {
                            sqlx::query(
                                "UPDATE ports SET (state, refusals_json, diagnostics_json, \
                                 adapter_files_json, merged_files_json, attempts, error, started_at, \
                                 finished_at, evaluation_json) = (SELECT s.state, s.refusals_json, \
                                 s.diagnostics_json, s.adapter_files_json, s.merged_files_json, s.attempts, \
                                 s.error, s.started_at, s.finished_at, s.evaluation_json FROM ports s \
                                 WHERE s.job_id = $1 AND s.id <> $2 AND s.state = $3 ORDER BY s.id LIMIT 1) \
                                 WHERE id = $2 AND EXISTS (SELECT 1 FROM ports s WHERE s.job_id = $1 \
                                 AND s.id <> $2 AND s.state = $3)",
                            )
                            .bind(job_id)
                            .bind(port_id)
                            .bind(done)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected()
                        } else {
                            0
                        };
                        if copied == 1 {
                            let kind = if done == "failed" { EventKind::PortFailed } else { EventKind::PortCompleted };
                            Self::emit_ports(conn, kind, Some(done), &one).await?;
                        } else {
                            sqlx::query(
                                "UPDATE jobs SET state = 'queued', attempts = 0, run_after = $1, priority = $3, \
                                 cancel_requested = 0, last_error = NULL, lease_owner = NULL, \
                                 lease_expires_at = NULL, updated_at = $1 WHERE id = $2",
                            )
                            .bind(now)
                            .bind(job_id)
                            .bind(priority)
                            .execute(&mut *conn)
                            .await?;
                            Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?;
                        }
                    }
                }
                Ok(port_id)
            }

            /// Ends a running attempt (token checked) in `next` (`queued`, `failed` or
            /// `cancelled`), moving its running ports along with their events.
            #[allow(clippy::too_many_arguments)]
            async fn end_attempt(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
                fencing_token: i64,
                next: &str,
                run_after: i64,
                error: Option<&str>,
                attempts_delta: i64,
                detail: &str,
            ) -> Result<(), $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let n = sqlx::query(
                    "UPDATE jobs SET state = $1, run_after = $2, lease_owner = NULL, \
                     lease_expires_at = NULL, last_error = COALESCE($3, last_error), \
                     attempts = attempts + $4, updated_at = $5 \
                     WHERE id = $6 AND fencing_token = $7 AND state = 'running'",
                )
                .bind(next)
                .bind(run_after)
                .bind(error)
                .bind(attempts_delta)
                .bind(now)
                .bind(job_id)
                .bind(fencing_token)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err($crate::meta::queue::lease_lost(job_id));
                }
                use patchport_core::event::EventKind;
                let (kind, finished) = match next {
                    "queued" => (EventKind::PortQueued, None),
                    "failed" => (EventKind::PortFailed, Some(now)),
                    _ => (EventKind::PortCancelled, Some(now)),
                };
                let running =
                    Self::job_port_ids(conn, job_id, $crate::meta::PortState::Running).await?;
                sqlx::query(
                    "UPDATE ports SET state = $1, error = COALESCE($2, error), finished_at = $3, \
                     attempts = (SELECT attempts FROM jobs WHERE id = $4) \
                     WHERE job_id = $4 AND state = 'running'",
                )
                .bind(next)
                .bind(error)
                .bind(finished)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
                Self::emit_ports(conn, kind, Some(detail), &running).await
            }

            async fn load_job(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<Option<$crate::meta::JobRecord>, $crate::meta::StoreError> {
                let row = sqlx::query_as::<_, $crate::meta::sql::JobRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE id = $1",
                    $crate::meta::sql::JOB_SELECT
                )))
                .bind(job_id)
                .fetch_optional(&mut *conn)
                .await?;
                row.map($crate::meta::sql::job_record).transpose()
            }

            async fn must_load_job(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                Self::load_job(conn, job_id)
                    .await?
                    .ok_or_else(|| $crate::meta::StoreError::NotFound {
                        what: format!("job {job_id}"),
                    })
            }

            async fn load_job_ports(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                Self::ports_where(conn, "t.job_id = $1", job_id).await
            }

            /// Where a running job goes when its attempt ends without an outcome.
            fn next_state(
                cancel_requested: i64,
                attempts: i64,
                max_attempts: i64,
                retryable: bool,
            ) -> &'static str {
                if cancel_requested != 0 {
                    "cancelled"
                } else if retryable && attempts < max_attempts {
                    "queued"
                } else {
                    "failed"
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::MetadataStore for $store {
            async fn insert_base_version(
                &self,
                new: $crate::meta::NewBaseVersion,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_base(&new).await {
                    // A concurrent push of the same name and version won the race:
                    // answer as if it had come first.
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_base(&new).await
                    }
                    other => other,
                }
            }

            async fn get_base_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::BaseVersionRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                match Self::base_by_ref(&mut conn, name, version).await? {
                    Some(row) => Ok(Some(Self::load_base(&mut conn, row).await?)),
                    None => Ok(None),
                }
            }

            async fn list_base_versions(
                &self,
                filter: &$crate::meta::ListFilter,
            ) -> Result<Vec<$crate::meta::BaseVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{BaseRow, BASE_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows = sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                    "{BASE_SELECT} WHERE ($1 = '' OR b.name = $1 OR substr(b.name, 1, length($1) + 1) = $1 || '/') \
                     AND ($2 OR b.state = 'published') ORDER BY b.name, b.id"
                )))
                .bind(filter.prefix.as_str())
                .bind(filter.include_yanked)
                .fetch_all(&mut *conn)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push(Self::load_base(&mut conn, row).await?);
                }
                Ok(out)
            }

            async fn yank_base_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
            ) -> Result<$crate::meta::BaseVersionRecord, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let Some(row) = Self::base_by_ref(&mut tx, name, version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("base version {name}:{version}"),
                    });
                };
                sqlx::query("UPDATE base_versions SET state = 'yanked', yank_reason = $1 WHERE id = $2")
                    .bind(reason)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await?;
                let row = Self::base_by_ref(&mut tx, name, version).await?.ok_or_else(|| {
                    $crate::meta::StoreError::NotFound {
                        what: format!("base version {name}:{version}"),
                    }
                })?;
                let rec = Self::load_base(&mut tx, row).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn insert_patch_version(
                &self,
                new: $crate::meta::NewPatchVersion,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_patch(&new).await {
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_patch(&new).await
                    }
                    other => other,
                }
            }

            async fn get_patch_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::PatchVersionRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                match Self::patch_by_ref(&mut conn, name, version).await? {
                    Some(row) => Ok(Some(Self::load_patch(&mut conn, row).await?)),
                    None => Ok(None),
                }
            }

            async fn list_patch_versions(
                &self,
                filter: &$crate::meta::ListFilter,
            ) -> Result<Vec<$crate::meta::PatchVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{PatchRow, PATCH_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows = sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                    "{PATCH_SELECT} WHERE ($1 = '' OR v.name = $1 OR substr(v.name, 1, length($1) + 1) = $1 || '/') \
                     AND ($2 OR v.state = 'published') AND ($3 = '' OR b.digest = $3) ORDER BY v.name, v.id"
                )))
                .bind(filter.prefix.as_str())
                .bind(filter.include_yanked)
                .bind(filter.on_base.map(|d| d.to_string()).unwrap_or_default())
                .fetch_all(&mut *conn)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push(Self::load_patch(&mut conn, row).await?);
                }
                Ok(out)
            }

            async fn yank_patch_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
            ) -> Result<$crate::meta::PatchVersionRecord, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let Some(row) = Self::patch_by_ref(&mut tx, name, version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("patch version {name}:{version}"),
                    });
                };
                sqlx::query("UPDATE patch_versions SET state = 'yanked', yank_reason = $1 WHERE id = $2")
                    .bind(reason)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await?;
                let row = Self::patch_by_ref(&mut tx, name, version).await?.ok_or_else(|| {
                    $crate::meta::StoreError::NotFound {
                        what: format!("patch version {name}:{version}"),
                    }
                })?;
                let rec = Self::load_patch(&mut tx, row).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn get_blob_index(
                &self,
                blob: &patchport_core::Digest,
            ) -> Result<Option<$crate::meta::BlobIndex>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let head: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT json_len, tensor_count FROM blob_indexes WHERE blob_digest = $1",
                )
                .bind(blob.to_string())
                .fetch_optional(&mut *conn)
                .await?;
                let Some((json_len, _)) = head else {
                    return Ok(None);
                };
                let rows = sqlx::query_as::<_, $crate::meta::sql::TensorRow>(
                    "SELECT name, dtype, shape, begin_offset, end_offset, digest, non_finite \
                     FROM blob_tensors WHERE blob_digest = $1 ORDER BY ordinal",
                )
                .bind(blob.to_string())
                .fetch_all(&mut *conn)
                .await?;
                let tensors = rows
                    .into_iter()
                    .map($crate::meta::sql::tensor_record)
                    .collect::<Result<_, _>>()?;
                Ok(Some($crate::meta::BlobIndex {
                    json_len: json_len as u64,
                    tensors,
                }))
            }

            async fn put_blob_index(
                &self,
                blob: &patchport_core::Digest,
                index: &$crate::meta::BlobIndex,
            ) -> Result<(), $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let inserted = sqlx::query(
                    "INSERT INTO blob_indexes (blob_digest, json_len, tensor_count) VALUES ($1, $2, $3) \
                     ON CONFLICT (blob_digest) DO NOTHING",
                )
                .bind(blob.to_string())
                .bind(index.json_len as i64)
                .bind(index.tensors.len() as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    // Indexed before (the same bytes give the same index).
                    return Ok(());
                }
                for (i, t) in index.tensors.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO blob_tensors (blob_digest, ordinal, name, dtype, shape, \
                         begin_offset, end_offset, digest, non_finite) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(blob.to_string())
                    .bind(i as i64)
                    .bind(&t.name)
                    .bind(&t.dtype)
                    .bind(serde_json::to_string(&t.shape).unwrap_or_default())
                    .bind(t.begin as i64)
                    .bind(t.end as i64)
                    .bind(t.digest.to_string())
                    .bind(t.non_finite as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn get_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                method_version: &str,
            ) -> Result<Option<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(patch) = Self::patch_by_ref(&mut conn, patch_name, patch_version).await? else {
                    return Ok(None);
                };
                let Some(base) = Self::base_by_ref(&mut conn, base_name, base_version).await? else {
                    return Ok(None);
                };
                let row = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE t.patch_id = $1 AND t.base_id = $2 AND t.method_version = $3",
                    $crate::meta::sql::PORT_SELECT
                )))
                .bind(patch.id)
                .bind(base.id)
                .bind(method_version)
                .fetch_optional(&mut *conn)
                .await?;
                row.map($crate::meta::sql::port_record).transpose()
            }

            async fn request_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                origin: patchport_core::port::PortOrigin,
            ) -> Result<$crate::meta::PortRecord, $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let Some(patch) = Self::patch_by_ref(&mut tx, patch_name, patch_version).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("patch version {patch_name}:{patch_version}"),
                    });
                };
                let Some(base) = Self::base_by_ref(&mut tx, base_name, base_version).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("base version {base_name}:{base_version}"),
                    });
                };
                if base.name != patch.base_name {
                    return Err(StoreError::FailedPrecondition {
                        message: format!(
                            "{}:{} was trained on {}, not {}: a port carries a patch onto another version of its own base",
                            patch.name, patch.version, patch.base_name, base.name
                        ),
                    });
                }
                if base.digest == patch.base_digest {
                    return Err(StoreError::FailedPrecondition {
                        message: format!(
                            "{}:{} was trained on {}:{} itself: it needs no port there (compat lists it as native)",
                            patch.name, patch.version, base.name, base.version
                        ),
                    });
                }
                let port_id =
                    Self::queue_port(&mut tx, patch.id, base.id, self.retry.max_attempts, origin, true).await?;
                let port = Self::ports_by_id(&mut tx, &[port_id])
                    .await?
                    .pop()
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("port {port_id}"),
                    })?;
                tx.commit().await?;
                Ok(port)
            }

            async fn get_job(
                &self,
                job_id: i64,
            ) -> Result<Option<$crate::meta::JobRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::load_job(&mut conn, job_id).await
            }

            async fn job_ports(
                &self,
                job_id: i64,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::load_job_ports(&mut conn, job_id).await
            }

            async fn list_ports_onto(
                &self,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(base) = Self::base_by_ref(&mut conn, base_name, base_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("base version {base_name}:{base_version}"),
                    });
                };
                Self::ports_where(&mut conn, "t.base_id = $1", base.id).await
            }

            async fn list_ports_of(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(patch) = Self::patch_by_ref(&mut conn, patch_name, patch_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("patch version {patch_name}:{patch_version}"),
                    });
                };
                Self::ports_where(&mut conn, "t.patch_id = $1", patch.id).await
            }

            async fn set_job_priority(
                &self,
                job_id: i64,
                priority: i64,
            ) -> Result<(), $crate::meta::StoreError> {
                let n = sqlx::query("UPDATE jobs SET priority = $1, updated_at = $2 WHERE id = $3")
                    .bind(priority)
                    .bind($crate::meta::now_millis())
                    .bind(job_id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if n == 0 {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("job {job_id}"),
                    });
                }
                Ok(())
            }

            async fn lease_job(
                &self,
                worker_id: &str,
                loaded_base_digests: &[patchport_core::Digest],
                lease_duration: std::time::Duration,
            ) -> Result<Option<$crate::meta::LeasedJob>, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let affinity = if loaded_base_digests.is_empty() {
                    String::new()
                } else {
                    let marks: Vec<String> =
                        (0..loaded_base_digests.len()).map(|i| format!("${}", i + 2)).collect();
                    format!(
                        "CASE WHEN target_base_digest IN ({}) THEN 0 ELSE 1 END, ",
                        marks.join(", ")
                    )
                };
                // Priority first (requests, then catch-up, then fan-out), then the bases
                // this worker holds, then first in first out.
                let sql = format!(
                    "SELECT id FROM jobs WHERE state = 'queued' AND run_after <= $1 \
                     ORDER BY priority DESC, {affinity}id LIMIT 1{}",
                    Self::SKIP_LOCKED
                );
                let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(now);
                for d in loaded_base_digests {
                    q = q.bind(d.to_string());
                }
                let Some(job_id) = q.fetch_optional(&mut *tx).await? else {
                    return Ok(None);
                };
                let expires = now.saturating_add(lease_duration.as_millis() as i64);
                sqlx::query(
                    "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
                     attempts = attempts + 1, fencing_token = fencing_token + 1, \
                     cancel_requested = 0, updated_at = $3 WHERE id = $4",
                )
                .bind(worker_id)
                .bind(expires)
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                let starting =
                    Self::job_port_ids(&mut tx, job_id, $crate::meta::PortState::Queued).await?;
                sqlx::query(
                    "UPDATE ports SET state = 'running', started_at = $1, error = NULL, \
                     attempts = (SELECT attempts FROM jobs WHERE id = $2) \
                     WHERE job_id = $2 AND state = 'queued'",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                Self::emit_ports(&mut tx, patchport_core::event::EventKind::PortStarted, Some(worker_id), &starting).await?;
                let job = Self::must_load_job(&mut tx, job_id).await?;
                let ports = Self::load_job_ports(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(Some($crate::meta::LeasedJob { job, ports }))
            }

            async fn heartbeat(
                &self,
                job_id: i64,
                fencing_token: i64,
                lease_duration: std::time::Duration,
            ) -> Result<bool, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let cancel: Option<i64> = sqlx::query_scalar(
                    "UPDATE jobs SET lease_expires_at = $1, updated_at = $2 \
                     WHERE id = $3 AND fencing_token = $4 AND state = 'running' \
                     RETURNING cancel_requested",
                )
                .bind(now.saturating_add(lease_duration.as_millis() as i64))
                .bind(now)
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(c) = cancel {
                    return Ok(c != 0);
                }
                // A job cancelled under this very lease: the worker is told to stop.
                let cancelled: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE id = $1 AND fencing_token = $2 AND state = 'cancelled'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&self.pool)
                .await?;
                match cancelled {
                    Some(_) => Ok(true),
                    None => Err($crate::meta::queue::lease_lost(job_id)),
                }
            }

            async fn complete_job(
                &self,
                job_id: i64,
                fencing_token: i64,
                outcome: $crate::meta::JobOutcome,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                use $crate::meta::sql::to_json;
                use $crate::meta::JobOutcome;
                let now = $crate::meta::now_millis();
                let evaluation = match &outcome {
                    JobOutcome::Succeeded { evaluation, .. } => evaluation.clone(),
                    JobOutcome::Incompatible { .. } => None,
                };
                let (state, refusals, diagnostics, adapter, merged) = match &outcome {
                    JobOutcome::Succeeded { adapter_files, merged_files, diagnostics, .. } => (
                        "succeeded",
                        "[]".to_owned(),
                        Some(to_json(diagnostics)),
                        to_json(adapter_files),
                        to_json(merged_files),
                    ),
                    JobOutcome::Incompatible { refusals } => (
                        "incompatible",
                        to_json(refusals),
                        None,
                        "[]".to_owned(),
                        "[]".to_owned(),
                    ),
                };
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query(
                    "UPDATE jobs SET state = $1, lease_owner = NULL, lease_expires_at = NULL, \
                     last_error = NULL, updated_at = $2 \
                     WHERE id = $3 AND fencing_token = $4 AND state = 'running'",
                )
                .bind(state)
                .bind(now)
                .bind(job_id)
                .bind(fencing_token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err($crate::meta::queue::lease_lost(job_id));
                }
                let running =
                    Self::job_port_ids(&mut tx, job_id, $crate::meta::PortState::Running).await?;
                let summary = evaluation.as_ref().map(|e| e.summary.clone());
                sqlx::query(
                    "UPDATE ports SET state = $1, refusals_json = $2, diagnostics_json = $3, \
                     adapter_files_json = $4, merged_files_json = $5, error = NULL, finished_at = $6, \
                     evaluation_json = $8 \
                     WHERE job_id = $7 AND state = 'running'",
                )
                .bind(state)
                .bind(refusals)
                .bind(diagnostics)
                .bind(adapter)
                .bind(merged)
                .bind(now)
                .bind(job_id)
                .bind(evaluation.map(|e| e.json))
                .execute(&mut *tx)
                .await?;
                use patchport_core::event::EventKind;
                Self::emit_ports(&mut tx, EventKind::PortCompleted, Some(state), &running).await?;
                if let Some(summary) = &summary {
                    Self::emit_ports(&mut tx, EventKind::PortEvaluated, Some(summary), &running).await?;
                }
                let job = Self::must_load_job(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn fail_job(
                &self,
                job_id: i64,
                fencing_token: i64,
                error: &str,
                retryable: bool,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let row: Option<(i64, i64, i64)> = sqlx::query_as(
                    "SELECT attempts, max_attempts, cancel_requested FROM jobs \
                     WHERE id = $1 AND fencing_token = $2 AND state = 'running'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((attempts, max, cancel)) = row else {
                    return Err($crate::meta::queue::lease_lost(job_id));
                };
                let next = Self::next_state(cancel, attempts, max, retryable);
                let run_after = now + self.retry.backoff_millis(attempts as u32);
                let detail = if next == "queued" { "retry" } else { error };
                Self::end_attempt(&mut tx, job_id, fencing_token, next, run_after, Some(error), 0, detail).await?;
                let job = Self::must_load_job(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn release_job(
                &self,
                job_id: i64,
                fencing_token: i64,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let cancel: Option<i64> = sqlx::query_scalar(
                    "SELECT cancel_requested FROM jobs \
                     WHERE id = $1 AND fencing_token = $2 AND state = 'running'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(cancel) = cancel else {
                    return Err($crate::meta::queue::lease_lost(job_id));
                };
                let next = if cancel != 0 { "cancelled" } else { "queued" };
                Self::end_attempt(&mut tx, job_id, fencing_token, next, now, None, -1, "released").await?;
                let job = Self::must_load_job(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn reap_expired(&self, now: i64) -> Result<usize, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let expired: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, fencing_token, attempts, max_attempts, cancel_requested FROM jobs \
                     WHERE state = 'running' AND lease_expires_at < $1 ORDER BY id{}",
                    Self::SKIP_LOCKED
                )))
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                for &(id, token, attempts, max, cancel) in &expired {
                    let next = Self::next_state(cancel, attempts, max, true);
                    let run_after = now + self.retry.backoff_millis(attempts as u32);
                    tracing::warn!(job_id = id, attempts, next, "lease expired");
                    Self::end_attempt(&mut tx, id, token, next, run_after, Some("lease expired"), 0, "lease expired").await?;
                }
                tx.commit().await?;
                Ok(expired.len())
            }

            async fn cancel_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                method_version: &str,
            ) -> Result<$crate::meta::PortRecord, $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let what = format!("port of {patch_name}:{patch_version} onto {base_name}:{base_version}");
                let (Some(patch), Some(base)) = (
                    Self::patch_by_ref(&mut tx, patch_name, patch_version).await?,
                    Self::base_by_ref(&mut tx, base_name, base_version).await?,
                ) else {
                    return Err(StoreError::NotFound { what });
                };
                let port: Option<(i64, String, Option<i64>)> = sqlx::query_as(
                    "SELECT id, state, job_id FROM ports \
                     WHERE patch_id = $1 AND base_id = $2 AND method_version = $3",
                )
                .bind(patch.id)
                .bind(base.id)
                .bind(method_version)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((port_id, state, job_id)) = port else {
                    return Err(StoreError::NotFound { what });
                };
                if state != "queued" && state != "running" {
                    return Err(StoreError::FailedPrecondition {
                        message: format!("{what} is {state}, only queued or running ports can be cancelled"),
                    });
                }
                sqlx::query("UPDATE ports SET state = 'cancelled', finished_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(port_id)
                    .execute(&mut *tx)
                    .await?;
                if let Some(job_id) = job_id {
                    // Once no port wants the work, the job is cancelled through its fence:
                    // a queued one is never leased, and a running one loses its lease at
                    // once (the worker hears it on its next heartbeat, and a late
                    // CompleteJob, FailJob or ReleaseJob is refused).
                    sqlx::query(
                        "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, \
                         lease_expires_at = NULL, cancel_requested = 0, updated_at = $1 \
                         WHERE id = $2 AND state IN ('queued', 'running') AND NOT EXISTS \
                         (SELECT 1 FROM ports WHERE job_id = $2 AND state IN ('queued', 'running'))",
                    )
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                }
                Self::emit_ports(&mut tx, patchport_core::event::EventKind::PortCancelled, None, &[port_id]).await?;
                let row = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE t.id = $1",
                    $crate::meta::sql::PORT_SELECT
                )))
                .bind(port_id)
                .fetch_one(&mut *tx)
                .await?;
                let rec = $crate::meta::sql::port_record(row)?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn read_events(
                &self,
                after: Option<&$crate::meta::EventCursor>,
                limit: u32,
            ) -> Result<(Vec<$crate::meta::EventRecord>, $crate::meta::EventCursor), $crate::meta::StoreError> {
                self.read_events_after(after, limit).await
            }

            async fn head_cursor(&self) -> Result<$crate::meta::EventCursor, $crate::meta::StoreError> {
                self.head_event_cursor().await
            }

            fn event_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
                self.wakeup_receiver()
            }

            async fn count_jobs_by_state(
                &self,
            ) -> Result<Vec<($crate::meta::PortState, u64)>, $crate::meta::StoreError> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                        .fetch_all(&self.pool)
                        .await?;
                let mut out: Vec<($crate::meta::PortState, u64)> =
                    $crate::meta::PortState::ALL.iter().map(|s| (*s, 0)).collect();
                for (state, n) in rows {
                    let state = $crate::meta::PortState::parse(&state)?;
                    if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
                        slot.1 = u64::try_from(n).unwrap_or(0);
                    }
                }
                Ok(out)
            }
        }
    };
}

pub(crate) use impl_sql_store;
