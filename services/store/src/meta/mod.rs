//! The metadata store, split by concern: the catalogue (versions, lineage, tensor
//! indexes), the queue (ports, jobs, leases, fences), the outbox (events) and access
//! (tokens, policies, audit). One trait per concern, two backends (Postgres for
//! production, SQLite embedded), one SQL body shared by both (`sql/`), one conformance
//! suite per trait run against both.

pub mod access;
mod catalogue;
mod outbox;
mod postgres;
mod queue;
pub mod signatures;
mod sql;
mod sqlite;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use patchport_core::layout::{ArtifactFile, FileRef, TensorRecord};
use patchport_core::port::{PortDiagnostics, Refusal};
use patchport_core::{Digest, Name, Version, VersionRef};

pub use access::{Access, AuditRecord, BlobHolder, NamespacePolicyRecord, TokenRecord};
pub use catalogue::Catalogue;
pub use outbox::{EventCursor, EventRecord, Outbox};
pub use postgres::PgStore;
pub use queue::{
    CompletedJob, EvaluationRecord, JobOutcome, JobRecord, LeasedJob, Queue, RetryPolicy,
};
pub use signatures::{SignatureRecord, Signatures};
pub use sqlite::SqliteStore;

/// What kind of failure a store error is (maps to one gRPC code in the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// A version exists with other content.
    AlreadyExists,
    /// A referenced version does not exist.
    NotFound,
    /// The request is valid but the state forbids it.
    FailedPrecondition,
    /// The request is malformed (an event cursor that no store hands out).
    InvalidArgument,
    /// The request names a position past the end (an event cursor ahead of the log).
    OutOfRange,
    /// The database cannot be reached right now (connection refused or lost, server
    /// shutting down or starting up, no pooled connection in time). Safe to retry: every
    /// change is one transaction, and pushes of the same content are idempotent.
    Unavailable,
    /// The database failed.
    Internal,
}

/// A metadata store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `name:version` already holds other content.
    #[error(
        "{what} already exists with different content (digest {existing}); versions are immutable, push under a new version"
    )]
    AlreadyExists {
        /// `acme/qv:1`.
        what: String,
        /// The digest it holds.
        existing: Digest,
    },
    /// A referenced version does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The state forbids the change.
    #[error("{message}")]
    FailedPrecondition {
        /// Why.
        message: String,
    },
    /// An event cursor this store never hands out.
    #[error(
        "invalid event cursor {cursor:?}: use \"0\" to replay from the first event, an empty cursor for new events only, or a cursor the server returned"
    )]
    InvalidCursor {
        /// The cursor as given.
        cursor: String,
    },
    /// An event cursor beyond the end of this store's log: it came from another (or a
    /// restored) database, and reading on would silently skip events.
    #[error(
        "event cursor {cursor:?} is past the end of the event log (last {head:?}): it belongs to another or a restored database; resubscribe from \"0\" or from the head"
    )]
    CursorOutOfRange {
        /// The cursor as given.
        cursor: String,
        /// The last cursor of the log.
        head: String,
    },
    /// A stored value that does not parse (a bug or a damaged database).
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What did not parse.
        message: String,
    },
    /// The database failed.
    #[error("database error")]
    Database {
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("database migration failed")]
    Migrate {
        /// The cause.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A database URL this build does not support.
    #[error("unsupported database URL {url:?}: use postgres://... or sqlite://PATH")]
    BadUrl {
        /// The URL (credentials removed).
        url: String,
    },
}

impl StoreError {
    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::AlreadyExists { .. } => StoreErrorKind::AlreadyExists,
            StoreError::NotFound { .. } => StoreErrorKind::NotFound,
            StoreError::FailedPrecondition { .. } => StoreErrorKind::FailedPrecondition,
            StoreError::InvalidCursor { .. } => StoreErrorKind::InvalidArgument,
            StoreError::CursorOutOfRange { .. } => StoreErrorKind::OutOfRange,
            StoreError::Database { source } if is_unavailable(source) => {
                StoreErrorKind::Unavailable
            }
            StoreError::Corrupt { .. }
            | StoreError::Database { .. }
            | StoreError::Migrate { .. }
            | StoreError::BadUrl { .. } => StoreErrorKind::Internal,
        }
    }
}

/// Whether a database error means the server could not be reached or dropped the
/// connection (rather than refusing the statement): IO errors, pool timeouts, and the
/// SQLSTATEs of class 08 (connection exception), 57P01-57P03 (shutdown, crash, starting
/// up) and 53300 (too many connections). A transaction cut by one of these is rolled
/// back by the server, so the request changed nothing.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(source: sqlx::Error) -> Self {
        StoreError::Database { source }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(source: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate { source }
    }
}

/// Published, or yanked (kept and pullable, no longer a default or a port target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Visible and current.
    Published,
    /// Withdrawn by its owner.
    Yanked,
}

impl VersionState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Published => "published",
            VersionState::Yanked => "yanked",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "published" => Ok(Self::Published),
            "yanked" => Ok(Self::Yanked),
            other => Err(StoreError::Corrupt {
                table: "versions",
                message: format!("unknown state {other:?}"),
            }),
        }
    }
}

/// A stored base version.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseVersionRecord {
    /// `namespace/name`.
    pub name: Name,
    /// The version.
    pub version: Version,
    /// Manifest digest.
    pub digest: Digest,
    /// The version it evolved from.
    pub parent: Option<(Version, Digest)>,
    /// Published or yanked.
    pub state: VersionState,
    /// Why it was yanked.
    pub yank_reason: Option<String>,
    /// Files sorted by path.
    pub files: Vec<FileRef>,
    /// `config.json` verbatim.
    pub config_json: String,
    /// `model_type`.
    pub model_type: String,
    /// Tensors over all safetensors files.
    pub tensor_count: u64,
    /// Bytes over all files.
    pub total_size: u64,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A stored patch version.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchVersionRecord {
    /// `namespace/name`.
    pub name: Name,
    /// The version.
    pub version: Version,
    /// Manifest digest.
    pub digest: Digest,
    /// The base version it was trained on.
    pub base_name: Name,
    /// Its version.
    pub base_version: Version,
    /// Its digest (the pin).
    pub base_digest: Digest,
    /// Published or yanked.
    pub state: VersionState,
    /// Why it was yanked.
    pub yank_reason: Option<String>,
    /// Files sorted by path.
    pub files: Vec<FileRef>,
    /// `adapter_config.json` verbatim.
    pub adapter_json: String,
    /// `peft_type`.
    pub peft_type: String,
    /// Tensors in the adapter.
    pub tensor_count: u64,
    /// Bytes over all files.
    pub total_size: u64,
    /// The eval set's blob, if any.
    pub eval_digest: Option<Digest>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A base version to insert.
#[derive(Debug, Clone)]
pub struct NewBaseVersion {
    /// `namespace/name`.
    pub name: Name,
    /// The version.
    pub version: Version,
    /// Manifest digest.
    pub digest: Digest,
    /// Parent version of the same name.
    pub parent: Option<VersionRef>,
    /// Files sorted by path.
    pub files: Vec<FileRef>,
    /// `config.json` verbatim.
    pub config_json: String,
    /// `model_type`.
    pub model_type: String,
    /// Tensor count.
    pub tensor_count: u64,
}

/// A patch version to insert.
#[derive(Debug, Clone)]
pub struct NewPatchVersion {
    /// `namespace/name`.
    pub name: Name,
    /// The version.
    pub version: Version,
    /// Manifest digest.
    pub digest: Digest,
    /// The base name.
    pub base_name: Name,
    /// The base version, by version or digest.
    pub base: VersionRef,
    /// Files sorted by path.
    pub files: Vec<FileRef>,
    /// `adapter_config.json` verbatim.
    pub adapter_json: String,
    /// `peft_type`.
    pub peft_type: String,
    /// Tensor count.
    pub tensor_count: u64,
    /// Eval set blob.
    pub eval_digest: Option<Digest>,
}

/// The tensor index of one safetensors blob.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobIndex {
    /// Header JSON length.
    pub json_len: u64,
    /// Tensors in offset order.
    pub tensors: Vec<TensorRecord>,
}

/// Where a port stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Waiting for a worker.
    Queued,
    /// A worker is on it.
    Running,
    /// Ported: artifacts and diagnostics are stored.
    Succeeded,
    /// Refused by pre-flight (final, with reasons).
    Incompatible,
    /// Failed after its attempts.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl PortState {
    /// Every state, in lifecycle order.
    pub const ALL: [PortState; 6] = [
        PortState::Queued,
        PortState::Running,
        PortState::Succeeded,
        PortState::Incompatible,
        PortState::Failed,
        PortState::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            PortState::Queued => "queued",
            PortState::Running => "running",
            PortState::Succeeded => "succeeded",
            PortState::Incompatible => "incompatible",
            PortState::Failed => "failed",
            PortState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "incompatible" => Self::Incompatible,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            other => {
                return Err(StoreError::Corrupt {
                    table: "ports",
                    message: format!("unknown state {other:?}"),
                });
            }
        })
    }
}

/// A stored port of a patch version onto a base version.
#[derive(Debug, Clone, PartialEq)]
pub struct PortRecord {
    /// The row id (events name it).
    pub id: i64,
    /// The patch.
    pub patch_name: Name,
    /// Its version.
    pub patch_version: Version,
    /// Its digest.
    pub patch_digest: Digest,
    /// The target base.
    pub base_name: Name,
    /// Its version.
    pub base_version: Version,
    /// Its digest.
    pub base_digest: Digest,
    /// The base the patch was trained on.
    pub source_base_digest: Digest,
    /// The port method.
    pub method_version: String,
    /// Where it stands.
    pub state: PortState,
    /// Why it is incompatible.
    pub refusals: Vec<Refusal>,
    /// Portability diagnostics.
    pub diagnostics: Option<PortDiagnostics>,
    /// The ported adapter.
    pub adapter_files: Vec<ArtifactFile>,
    /// The merged model.
    pub merged_files: Vec<ArtifactFile>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub queued_at: i64,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
    /// The job doing the work (every port has one; `None` only on rows written before
    /// every port was a job).
    pub job_id: Option<i64>,
    /// The quality gate's result (JSON), when the port was evaluated.
    pub evaluation_json: Option<String>,
    /// A queued port's place in the queue (1 is leased next), by priority then age.
    pub queue_position: Option<u64>,
}

/// Which versions to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `namespace` or `namespace/name`; empty for all.
    pub prefix: String,
    /// Include yanked versions.
    pub include_yanked: bool,
    /// Patch listings only: just the versions trained on this base digest (oldest first,
    /// paged by id alone).
    pub on_base: Option<Digest>,
    /// Which page.
    pub page: Page,
}

/// A keyset page: the rows after a key, at most `limit` of them (all with `None`).
/// Listings by name are keyed by (name, id), the others by id alone (`after_name` empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The name of the last row of the previous page (listings by name).
    pub after_name: String,
    /// The id of the last row of the previous page; 0 for the first page.
    pub after_id: i64,
    /// At most this many rows; `None` for every row.
    pub limit: Option<u32>,
}

impl Page {
    /// Every row.
    pub const ALL: Page = Page {
        after_name: String::new(),
        after_id: 0,
        limit: None,
    };

    /// The first `limit` rows.
    pub fn first(limit: u32) -> Self {
        Self {
            limit: Some(limit),
            ..Self::ALL
        }
    }
}

/// One page of rows and the key of the next, if there are more.
#[derive(Debug, Clone)]
pub struct Paged<T> {
    /// The rows of this page.
    pub items: Vec<T>,
    /// Where the next page starts (its `limit` is this page's); `None` on the last page.
    pub next: Option<Page>,
}

impl<T> Paged<T> {
    /// Keeps at most `page.limit` of `rows` (fetched with one more than the limit, so an
    /// extra row means there is a next page, keyed by the last kept row).
    pub(crate) fn cut<R>(
        mut rows: Vec<R>,
        page: &Page,
        key: impl Fn(&R) -> (String, i64),
        record: impl FnMut(R) -> Result<T, StoreError>,
    ) -> Result<Self, StoreError> {
        let next = match page.limit {
            Some(limit) if rows.len() > limit as usize => {
                rows.truncate(limit as usize);
                rows.last().map(|r| {
                    let (after_name, after_id) = key(r);
                    Page {
                        after_name,
                        after_id,
                        limit: page.limit,
                    }
                })
            }
            _ => None,
        };
        Ok(Self {
            items: rows.into_iter().map(record).collect::<Result<_, _>>()?,
            next,
        })
    }
}

/// The metadata store: every concern, as one object (each has its own conformance
/// suite: `tests/catalogue.rs`, `tests/queue.rs`, `tests/outbox.rs`, `tests/access.rs`).
pub trait MetadataStore:
    Catalogue + Queue + Outbox + Access + Signatures + Send + Sync + fmt::Debug
{
}

impl<T: Catalogue + Queue + Outbox + Access + Signatures + Send + Sync + fmt::Debug> MetadataStore
    for T
{
}

/// Opens the store named by a URL (`postgres://...` or `sqlite://PATH`) and migrates it.
pub async fn connect(url: &str) -> Result<std::sync::Arc<dyn MetadataStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::BadUrl { url: redact(url) })
    }
}

/// A URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Unix milliseconds now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
