//! One outbox reader per registry process, shared by every event stream. Woken by the
//! store (Postgres `LISTEN/NOTIFY` from any replica; SQLite, a commit in this process),
//! it reads what was appended once and broadcasts it as pages that chain by cursor
//! (`from` → `to`), so a commit costs one read however many subscribers there are. The
//! hub only speeds delivery up: a subscriber that finds a gap, lags behind the broadcast
//! or hears nothing for a while reads the outbox itself from its own cursor, which stays
//! the only truth.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use patchport_store::meta::{EventCursor, EventRecord, MetadataStore};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The hub reads the outbox at least this often without a wake-up (a lost listener
/// connection costs latency, never events).
const FALLBACK: Duration = Duration::from_secs(2);
/// On Postgres a woken reader may find new events still held back behind an older open
/// transaction (the xmin rule): it looks again after these pauses.
const HELD_BACK_RETRIES: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
];
/// Events per read.
pub(crate) const BATCH: u32 = 256;
/// Pages a slow subscriber may fall behind before it reads the outbox itself.
const CAPACITY: usize = 1024;

/// Every event after `from`, up to and including `to`, as the store returned them.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) from: EventCursor,
    pub(crate) to: EventCursor,
    pub(crate) events: Vec<EventRecord>,
}

/// The shared reader.
#[derive(Debug, Clone)]
pub(crate) struct EventHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    meta: Arc<dyn MetadataStore>,
    pages: broadcast::Sender<Arc<Page>>,
    started: OnceLock<()>,
    draining: CancellationToken,
}

impl EventHub {
    pub(crate) fn new(meta: Arc<dyn MetadataStore>, draining: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                meta,
                pages: broadcast::channel(CAPACITY).0,
                started: OnceLock::new(),
                draining,
            }),
        }
    }

    /// Pages read from now on; the first call starts the reader.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Page>> {
        let rx = self.inner.pages.subscribe();
        self.inner.started.get_or_init(|| {
            tokio::spawn(read(self.inner.clone()));
        });
        rx
    }
}

/// Reads everything readable after `cursor`, broadcasting each page; returns the new
/// cursor and whether anything was read.
async fn drain(inner: &Inner, cursor: &mut EventCursor) -> bool {
    let mut any = false;
    loop {
        match inner.meta.read_events(Some(cursor), BATCH).await {
            Ok((events, next)) if !events.is_empty() => {
                let full = events.len() == BATCH as usize;
                let page = Page {
                    from: cursor.clone(),
                    to: next.clone(),
                    events,
                };
                // No receiver is fine: nobody is caught up right now.
                let _ = inner.pages.send(Arc::new(page));
                *cursor = next;
                any = true;
                if !full {
                    return true;
                }
            }
            Ok(_) => return any,
            Err(e) => {
                tracing::warn!(error = %e, "event hub: reading the outbox failed");
                return any;
            }
        }
    }
}

async fn read(inner: Arc<Inner>) {
    let mut wake = inner.meta.event_wakeups();
    wake.borrow_and_update();
    let mut cursor = loop {
        match inner.meta.head_cursor().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "event hub: reading the head failed, retrying in 1 s");
                tokio::select! {
                    () = inner.draining.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut wake_alive = true;
    loop {
        drain(&inner, &mut cursor).await;
        let woken = tokio::select! {
            () = inner.draining.cancelled() => return,
            r = wake.changed(), if wake_alive => {
                wake_alive = r.is_ok();
                wake_alive
            }
            () = tokio::time::sleep(FALLBACK) => false,
        };
        if woken {
            for pause in HELD_BACK_RETRIES {
                if drain(&inner, &mut cursor).await {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}
