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

/// A file row with its version's id (files of many versions read at once).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct VersionFileRow {
    pub(crate) version_id: i64,
    pub(crate) path: String,
    pub(crate) digest: String,
    pub(crate) size: i64,
}

/// A value bound to a numbered placeholder of a query built at run time.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// The `WHERE`, `ORDER BY` and `LIMIT` of a version listing (`alias` `b` or `v`), with
/// its arguments in placeholder order. `base_ids`: the ids of the base versions whose
/// digest is the filter's `on_base`, resolved by the caller (`None` without `on_base`);
/// the listing is then those bases' versions by id.
pub(crate) fn listing(
    alias: &str,
    filter: &super::ListFilter,
    base_ids: Option<&[i64]>,
) -> (String, Vec<Arg>) {
    let mut conds = Vec::new();
    let mut args = Vec::new();
    let mut arg = |a: Arg| {
        args.push(a);
        format!("${}", args.len())
    };
    let prefix = filter.prefix.as_str();
    if prefix.contains('/') {
        conds.push(format!(
            "{alias}.name = {}",
            arg(Arg::Text(prefix.to_owned()))
        ));
    } else if !prefix.is_empty() {
        conds.push(format!(
            "{alias}.namespace = {}",
            arg(Arg::Text(prefix.to_owned()))
        ));
    }
    if !filter.include_yanked {
        conds.push(format!("{alias}.state = 'published'"));
    }
    let page = &filter.page;
    let order = if let Some(base_ids) = base_ids {
        // By known ids, so the planner reads the (base_id, id) index for a base that
        // holds few versions instead of walking every version in id order.
        let ids: Vec<String> = base_ids.iter().map(|id| arg(Arg::Int(*id))).collect();
        conds.push(if ids.is_empty() {
            "1 = 0".to_owned()
        } else {
            format!("{alias}.base_id IN ({})", ids.join(", "))
        });
        if page.after_id > 0 {
            conds.push(format!("{alias}.id > {}", arg(Arg::Int(page.after_id))));
        }
        format!("{alias}.id")
    } else {
        if page.after_id > 0 {
            let name = arg(Arg::Text(page.after_name.clone()));
            let id = arg(Arg::Int(page.after_id));
            conds.push(format!("({alias}.name, {alias}.id) > ({name}, {id})"));
        }
        format!("{alias}.name, {alias}.id")
    };
    let mut sql = String::new();
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(&format!(" ORDER BY {order}"));
    if let Some(limit) = page.limit {
        // One more than asked: its presence says there is a next page.
        sql.push_str(&format!(" LIMIT {}", arg(Arg::Int(i64::from(limit) + 1))));
    }
    (sql, args)
}

/// `SELECT` the files of the versions `ids` from `table` (`base_files` or `patch_files`),
/// ordered by version then path: one statement per 500 versions.
pub(crate) fn files_of_sql(table: &str, count: usize) -> String {
    let list: Vec<String> = (1..=count).map(|i| format!("${i}")).collect();
    format!(
        "SELECT version_id, path, digest, size FROM {table} WHERE version_id IN ({}) \
         ORDER BY version_id, path",
        list.join(", ")
    )
}

/// How many versions' files one statement reads.
pub(crate) const FILES_CHUNK: usize = 500;

/// Files grouped by version id.
pub(crate) fn group_files(
    rows: Vec<VersionFileRow>,
) -> std::collections::HashMap<i64, Vec<FileRow>> {
    let mut by_version: std::collections::HashMap<i64, Vec<FileRow>> =
        std::collections::HashMap::new();
    for r in rows {
        by_version.entry(r.version_id).or_default().push(FileRow {
            path: r.path,
            digest: r.digest,
            size: r.size,
        });
    }
    by_version
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

const PORT_COLUMNS_HEAD: &str = "t.id, p.name AS patch_name, p.version AS patch_version, \
    p.digest AS patch_digest, b.name AS base_name, b.version AS base_version, \
    b.digest AS base_digest, s.digest AS source_base_digest, t.method_version, t.state, \
    t.refusals_json, t.diagnostics_json";

const PORT_COLUMNS_TAIL: &str =
    "t.attempts, t.error, t.queued_at, t.started_at, t.finished_at, t.job_id, t.evaluation_json";

const PORT_FILES: &str = "t.adapter_files_json, t.merged_files_json";

/// The file lists left out: empty lists in their place.
const PORT_NO_FILES: &str = "'[]' AS adapter_files_json, '[]' AS merged_files_json";

const PORT_JOINS: &str = "ports t JOIN patch_versions p ON p.id = t.patch_id \
    JOIN base_versions b ON b.id = t.base_id JOIN base_versions s ON s.id = t.source_base_id";

/// Which ports' rows a query reads, and whether they come with their place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Places {
    /// A queued port's place: 1 + the queued jobs leased before its job (higher priority
    /// first, then first in first out, as `lease_job` takes them). A window over every
    /// queued job, so only reads a caller sees ask for it.
    With,
    /// `queue_position` NULL: the queue's own writes (event payloads, leases).
    Without,
}

/// `SELECT` every port column `FROM` the ports and their versions (alias `t` for ports).
pub(crate) fn port_select(places: Places) -> String {
    select_ports(places, PORT_FILES)
}

/// [`port_select`] with the file lists left out (empty): a compat answer's ports, a
/// fraction of each row to read and decode (`GetPort` and pulls read the files).
pub(crate) fn port_summary_select(places: Places) -> String {
    select_ports(places, PORT_NO_FILES)
}

fn select_ports(places: Places, files: &str) -> String {
    match places {
        Places::With => format!(
            "SELECT {PORT_COLUMNS_HEAD}, {files}, {PORT_COLUMNS_TAIL}, \
             CASE WHEN t.state = 'queued' THEN q.position END AS queue_position \
             FROM {PORT_JOINS} LEFT JOIN (SELECT id AS job, ROW_NUMBER() OVER (ORDER BY priority DESC, id) \
             AS position FROM jobs WHERE state = 'queued') q ON q.job = t.job_id"
        ),
        Places::Without => format!(
            "SELECT {PORT_COLUMNS_HEAD}, {files}, {PORT_COLUMNS_TAIL}, \
             CAST(NULL AS BIGINT) AS queue_position FROM {PORT_JOINS}"
        ),
    }
}

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
        "high_risk": port.diagnostics.as_ref().map(|d| d.high_risk()),
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

/// Every blob digest a port's artifacts name (whole files and composed files' pieces),
/// each once: what `port_artifact_blobs` indexes.
pub(crate) fn artifact_digests(
    adapter: &[patchport_core::layout::ArtifactFile],
    merged: &[patchport_core::layout::ArtifactFile],
) -> Vec<String> {
    let mut out: Vec<String> = adapter
        .iter()
        .chain(merged)
        .flat_map(|f| {
            std::iter::once(f.file.digest.to_string())
                .chain(f.segments.iter().map(|s| s.digest.to_string()))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
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

mod catalogue;
mod outbox;
mod queue;

pub(crate) use catalogue::impl_catalogue;
pub(crate) use outbox::impl_outbox;
pub(crate) use queue::impl_queue;

/// Implements every concern but access for a struct with a `pool: sqlx::Pool<$db>` field
/// (and `retry`, and the backend's `notify_events`, `SKIP_LOCKED`, cursor and wake-up
/// helpers).
macro_rules! impl_sql_store {
    ($store:ty, $db:ty) => {
        $crate::meta::sql::impl_catalogue!($store, $db);
        $crate::meta::sql::impl_queue!($store, $db);
        $crate::meta::sql::impl_outbox!($store, $db);
    };
}

pub(crate) use impl_sql_store;
