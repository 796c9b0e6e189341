//! The events outbox: the `Outbox` trait, cursors and event records. Appending is in
//! `sql/outbox.rs` (inside each writer's transaction); reading by cursor and the
//! wake-ups are backend code: `postgres.rs` (`(xid, id)` below xmin, `LISTEN`) and
//! `sqlite.rs` (ids, a commit hook).

use std::fmt;

use super::StoreError;

/// A position in the event log, opaque to clients (`pg:<xid>:<id>` or `sq:<id>`), except
/// for the documented origin `0`, before the first event of any store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventCursor(pub(crate) String);

impl EventCursor {
    /// The documented cursor that replays the whole log.
    pub const ORIGIN: &'static str = "0";

    /// Before the first event of any store (reads everything).
    pub fn origin() -> Self {
        Self(Self::ORIGIN.to_owned())
    }

    /// Whether this is the origin (`0`; `origin` is accepted too, as older servers
    /// documented nothing).
    pub(crate) fn is_origin(&self) -> bool {
        self.0 == Self::ORIGIN || self.0 == "origin"
    }

    /// The cursor as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where in the log order this cursor stands, for cursors of one store: `(xid, id)`
    /// on Postgres, `(0, id)` on SQLite, `(0, 0)` at the origin; `None` for a cursor no
    /// store hands out. Every event after a cursor has a greater position.
    pub fn position(&self) -> Option<(u64, i64)> {
        if self.is_origin() {
            return Some((0, 0));
        }
        if let Some(id) = self.0.strip_prefix("sq:") {
            return id.parse().ok().map(|id| (0, id));
        }
        let (xid, id) = self.0.strip_prefix("pg:")?.split_once(':')?;
        Some((xid.parse().ok()?, id.parse().ok()?))
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for EventCursor {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

pub(crate) fn bad_cursor(c: &EventCursor) -> StoreError {
    StoreError::InvalidCursor {
        cursor: c.0.clone(),
    }
}

/// One event of the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Where a reader resumes after this event.
    pub cursor: EventCursor,
    /// Unique id (for dedupe).
    pub id: i64,
    /// What happened.
    pub kind: patchport_core::event::EventKind,
    /// `acme/llama:v2` or `acme/qv:1@acme/llama:v2`.
    pub subject: String,
    /// The job, for port events.
    pub job_id: Option<i64>,
    /// The port row, for port events.
    pub port_id: Option<i64>,
    /// The new state or why (`retry`, `released`, `lease expired`...).
    pub detail: Option<String>,
    /// What a subscriber needs without a follow-up call (JSON object): digests, state,
    /// refusal kinds, risk and a diagnostics summary for ports; the digest (and parent or
    /// base) for versions. `None` on events written before payloads were stored.
    pub payload_json: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

/// The events outbox: read by cursor (the only truth), with wake-ups for readers.
#[async_trait::async_trait]
pub trait Outbox: Send + Sync {
    /// Events after a cursor (`None`: from the head, i.e. only what commits from now;
    /// [`EventCursor::origin`], `"0"`: from the first event), oldest first, and the
    /// cursor to resume from. InvalidCursor for a cursor this store never hands out;
    /// CursorOutOfRange for one past the end of the log.
    async fn read_events(
        &self,
        after: Option<&EventCursor>,
        limit: u32,
    ) -> Result<(Vec<EventRecord>, EventCursor), StoreError>;
    /// The current head of the event log.
    async fn head_cursor(&self) -> Result<EventCursor, StoreError>;
    /// A counter bumped whenever events may have been appended (Postgres: a
    /// `LISTEN patchport_events` notification from any replica; SQLite: an append in
    /// this process). It only wakes readers: the outbox stays the only truth, read by
    /// cursor. Missed or spurious wake-ups cost latency, never events.
    fn event_wakeups(&self) -> tokio::sync::watch::Receiver<u64>;
}
