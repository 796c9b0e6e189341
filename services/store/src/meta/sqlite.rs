//! The SQLite metadata store (the embedded default).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::queue::bad_cursor;
use super::sql::{EventRow, event_record};
use super::{EventCursor, EventRecord, RetryPolicy, StoreError};

/// Metadata in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    retry: RetryPolicy,
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates `sqlite://PATH`.
    ///
    /// One connection: SQLite has one writer at a time, and a single connection keeps
    /// every transaction serialised instead of failing with SQLITE_BUSY.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .map(|p| p.split('?').next().unwrap_or(p))
            .filter(|p| !p.is_empty() && *p != ":memory:")
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Database {
                source: sqlx::Error::Io(e),
            })?;
        }
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("../../migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool,
            retry: RetryPolicy::default(),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Retries failed attempts with this policy instead of the default.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// One connection serialises every transaction: nothing to skip.
    const SKIP_LOCKED: &'static str = "";

    /// No LISTEN in SQLite: readers poll.
    async fn notify_events(_conn: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
        Ok(())
    }

    /// `sq:<id>`; `origin` is 0.
    fn parse_cursor(c: &EventCursor) -> Result<i64, StoreError> {
        if c.0 == "origin" {
            return Ok(0);
        }
        c.0.strip_prefix("sq:")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| bad_cursor(c))
    }

    fn cursor(id: i64) -> EventCursor {
        EventCursor(format!("sq:{id}"))
    }

    /// Events by id: one writer at a time, so ids become visible in order.
    async fn read_events_after(
        &self,
        after: Option<&EventCursor>,
        limit: u32,
    ) -> Result<(Vec<EventRecord>, EventCursor), StoreError> {
        let from = match after.filter(|c| !c.0.is_empty()) {
            Some(c) => c.clone(),
            None => self.head_event_cursor().await?,
        };
        let id = Self::parse_cursor(&from)?;
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT id, '' AS xid, kind, subject, job_id, port_id, detail, created_at \
             FROM events WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let next = rows.last().map_or(from, |r| Self::cursor(r.id));
        let out = rows
            .into_iter()
            .map(|r| {
                let c = Self::cursor(r.id);
                event_record(r, c)
            })
            .collect();
        Ok((out, next))
    }

    async fn head_event_cursor(&self) -> Result<EventCursor, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(Self::cursor(last))
    }
}

super::auth::impl_auth_store!(SqliteStore);
super::sql::impl_sql_store!(SqliteStore, sqlx::Sqlite);
