//! The Postgres metadata store (production).

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::outbox::bad_cursor;
use super::sql::{EventRow, event_record};
use super::{EventCursor, EventRecord, RetryPolicy, StoreError};

/// Metadata in Postgres.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    retry: RetryPolicy,
    wakeups: Arc<Wakeups>,
}

/// The `LISTEN patchport_events` side: one listening connection per store (started by the
/// first subscriber), bumping a counter on every notification from any replica.
#[derive(Debug)]
struct Wakeups {
    tx: tokio::sync::watch::Sender<u64>,
    started: OnceLock<()>,
}

/// The channel every event-appending transaction notifies at commit.
const CHANNEL: &str = "patchport_events";

/// How long a request waits for a pooled connection. While Postgres is down or
/// restarting the pool keeps trying to connect for this long, then the request fails with
/// `PoolTimedOut` (Unavailable to clients) instead of hanging for sqlx's default 30 s.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

impl PgStore {
    /// Connects and runs the embedded migrations (under Postgres' migration lock, so
    /// several registry replicas can start together).
    ///
    /// The pool survives a Postgres restart: every idle connection is pinged before it is
    /// handed out (`test_before_acquire`), so connections the old server dropped are
    /// replaced by new ones instead of failing the next request.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(true)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        sqlx::migrate!("../../migrations/postgres")
            .run(&pool)
            .await?;
        Ok(Self {
            pool,
            retry: RetryPolicy::default(),
            wakeups: Arc::new(Wakeups {
                tx: tokio::sync::watch::channel(0).0,
                started: OnceLock::new(),
            }),
        })
    }

    /// The wake-up counter; the first call starts the listener task (it ends when the
    /// last clone of this store is dropped).
    fn wakeup_receiver(&self) -> tokio::sync::watch::Receiver<u64> {
        let rx = self.wakeups.tx.subscribe();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.wakeups.started.get_or_init(|| {
                rt.spawn(Self::listen(
                    self.pool.clone(),
                    Arc::downgrade(&self.wakeups),
                ));
            });
        }
        rx
    }

    /// Holds a `LISTEN` connection and bumps the counter per notification. A lost
    /// connection may have dropped notifications, so reconnecting bumps it too (readers
    /// then look at the outbox, which is the truth either way).
    async fn listen(pool: PgPool, wakeups: Weak<Wakeups>) {
        let bump = |w: &Weak<Wakeups>| match w.upgrade() {
            Some(w) => {
                w.tx.send_modify(|n| *n = n.wrapping_add(1));
                true
            }
            None => false,
        };
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "event listener: connecting failed, retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if !bump(&wakeups) {
                        return;
                    }
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "event listener: LISTEN failed, retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Anything committed while no one listened.
            if !bump(&wakeups) {
                return;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await {
                    // Nothing for a while: stop once the store is gone.
                    Err(_) if wakeups.strong_count() == 0 => return,
                    Err(_) => {}
                    Ok(Ok(Some(_))) => {
                        if !bump(&wakeups) {
                            return;
                        }
                    }
                    // The connection was lost; the next try_recv reconnects.
                    Ok(Ok(None)) => {
                        tracing::warn!("event listener: connection lost, reconnecting");
                        if !bump(&wakeups) {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "event listener failed, reconnecting in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
        }
    }

    /// The pool (for tests and future stores sharing the connection).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Retries failed attempts with this policy instead of the default.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Lease queries skip rows another transaction holds.
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";

    /// Wakes `LISTEN patchport_events` readers when the transaction commits (one
    /// notification per transaction: Postgres folds identical ones).
    async fn notify_events(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// `pg:<xid>:<id>`; `origin` is `(0, 0)`.
    fn parse_cursor(c: &EventCursor) -> Result<(u64, i64), StoreError> {
        if c.is_origin() {
            return Ok((0, 0));
        }
        let mut parts =
            c.0.strip_prefix("pg:")
                .ok_or_else(|| bad_cursor(c))?
                .split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(x), Some(i), None) => Ok((
                x.parse().map_err(|_| bad_cursor(c))?,
                i.parse().map_err(|_| bad_cursor(c))?,
            )),
            _ => Err(bad_cursor(c)),
        }
    }

    fn cursor(xid: &str, id: i64) -> EventCursor {
        EventCursor(format!("pg:{xid}:{id}"))
    }

    /// Events are read by `(xid, id)` and only below the oldest transaction still
    /// running: a transaction that took its xid early and commits late has not been
    /// passed by any cursor handed out, so it is never skipped.
    async fn read_events_after(
        &self,
        after: Option<&EventCursor>,
        limit: u32,
    ) -> Result<(Vec<EventRecord>, EventCursor), StoreError> {
        let from = match after.filter(|c| !c.0.is_empty()) {
            Some(c) => c.clone(),
            None => self.head_event_cursor().await?,
        };
        let (xid, id) = Self::parse_cursor(&from)?;
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT id, xid::text AS xid, kind, subject, job_id, port_id, detail, payload_json, created_at \
             FROM events WHERE (xid, id) > ($1::text::xid8, $2) \
             AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid, id LIMIT $3",
        )
        .bind(xid.to_string())
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() && id > 0 {
            // Nothing readable after it: fine at (or just behind) the head, but a cursor
            // past every event or transaction of this database came from another one and
            // would silently skip everything up to it.
            let (max_id, next_xid): (Option<i64>, String) = sqlx::query_as(
                "SELECT (SELECT MAX(id) FROM events), pg_snapshot_xmax(pg_current_snapshot())::text",
            )
            .fetch_one(&self.pool)
            .await?;
            let next_xid: u64 = next_xid.parse().unwrap_or(u64::MAX);
            if max_id.unwrap_or(0) < id || xid >= next_xid {
                return Err(StoreError::CursorOutOfRange {
                    cursor: from.0,
                    head: self.head_event_cursor().await?.0,
                });
            }
        }
        let next = rows.last().map_or(from, |r| Self::cursor(&r.xid, r.id));
        let out = rows
            .into_iter()
            .map(|r| {
                let c = Self::cursor(&r.xid, r.id);
                event_record(r, c)
            })
            .collect::<Result<_, _>>()?;
        Ok((out, next))
    }

    async fn head_event_cursor(&self) -> Result<EventCursor, StoreError> {
        let last: Option<(String, i64)> = sqlx::query_as(
            "SELECT xid::text, id FROM events \
             WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY xid DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(last.map_or_else(|| Self::cursor("0", 0), |(x, i)| Self::cursor(&x, i)))
    }
}

super::access::impl_access!(PgStore, sqlx::Postgres);
super::signatures::impl_signatures!(PgStore, sqlx::Postgres);
super::sql::impl_sql_store!(PgStore, sqlx::Postgres);
