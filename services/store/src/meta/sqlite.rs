//! The SQLite metadata store (the embedded default).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::outbox::bad_cursor;
use super::sql::{EventRow, event_record};
use super::{EventCursor, EventRecord, RetryPolicy, StoreError};

/// Metadata in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    retry: RetryPolicy,
    wakeups: tokio::sync::watch::Sender<u64>,
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
        let (wakeups, _) = tokio::sync::watch::channel(0u64);
        let hooks = wakeups.clone();
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(move |conn, _| {
                let wakeups = hooks.clone();
                Box::pin(async move {
                    Self::wake_on_commit(conn, wakeups).await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        sqlx::migrate!("../../migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool,
            retry: RetryPolicy::default(),
            wakeups,
        })
    }

    /// Subscribers in this process wake when a transaction that appended events commits:
    /// an update hook notes the append, the commit hook bumps the counter, a rollback
    /// forgets it. The commit hook runs just before the commit completes, but the pool
    /// has one connection, so a woken reader's query waits for this transaction to end.
    async fn wake_on_commit(
        conn: &mut sqlx::SqliteConnection,
        wakeups: tokio::sync::watch::Sender<u64>,
    ) -> Result<(), sqlx::Error> {
        let appended = Arc::new(AtomicBool::new(false));
        let mut handle = conn.lock_handle().await?;
        let on_update = appended.clone();
        handle.set_update_hook(move |change| {
            if change.table == "events" {
                on_update.store(true, Ordering::Relaxed);
            }
        });
        let on_commit = appended.clone();
        handle.set_commit_hook(move || {
            if on_commit.swap(false, Ordering::Relaxed) {
                wakeups.send_modify(|n| *n = n.wrapping_add(1));
            }
            true
        });
        handle.set_rollback_hook(move || appended.store(false, Ordering::Relaxed));
        Ok(())
    }

    fn wakeup_receiver(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakeups.subscribe()
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

    /// No NOTIFY in SQLite: the connection's commit hook wakes readers (see
    /// `wake_on_commit`).
    async fn notify_events(_conn: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
        Ok(())
    }

    /// `sq:<id>`; the origin is 0.
    fn parse_cursor(c: &EventCursor) -> Result<i64, StoreError> {
        if c.is_origin() {
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
            "SELECT id, '' AS xid, kind, subject, job_id, port_id, detail, payload_json, created_at \
             FROM events WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() && id > 0 {
            // Nothing after it: fine at the head, but a cursor past the head came from
            // another database and would silently skip every event up to its id.
            let head = self.head_event_cursor().await?;
            if Self::parse_cursor(&head)? < id {
                return Err(StoreError::CursorOutOfRange {
                    cursor: from.0,
                    head: head.0,
                });
            }
        }
        let next = rows.last().map_or(from, |r| Self::cursor(r.id));
        let out = rows
            .into_iter()
            .map(|r| {
                let c = Self::cursor(r.id);
                event_record(r, c)
            })
            .collect::<Result<_, _>>()?;
        Ok((out, next))
    }

    async fn head_event_cursor(&self) -> Result<EventCursor, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(Self::cursor(last))
    }
}

super::access::impl_access!(SqliteStore, sqlx::Sqlite);
super::signatures::impl_signatures!(SqliteStore, sqlx::Sqlite);
super::sql::impl_sql_store!(SqliteStore, sqlx::Sqlite);
