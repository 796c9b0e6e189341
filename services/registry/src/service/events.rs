//! `patchport.v1.EventService`: the transactional outbox, streamed at least once from a
//! cursor. The store's cursor never skips a transaction that commits late (on Postgres
//! it follows `(xid, id)` below the snapshot's xmin). Streams are pushed, not polled: a
//! caught-up stream sleeps until the store's wake-up counter moves (Postgres
//! `LISTEN/NOTIFY` from any replica; SQLite, a commit in this process), then reads the
//! outbox by cursor, which stays the only truth.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use patchport_core::event::EventKind;
use patchport_proto::convert::{WireError, parse_list, parse_optional};
use patchport_proto::v1::{self, event_service_server::EventService};
use patchport_store::meta::{EventCursor, EventRecord};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{Need, namespace_of};
use crate::convert::event_to_proto;
use crate::error::ApiError;
use crate::state::Registry;

/// A caught-up stream reads the outbox at least this often even without a wake-up (a
/// safety net for a lost listener connection; never the way events normally arrive).
const FALLBACK: Duration = Duration::from_secs(2);
/// On Postgres a woken reader may find the new events still held back behind an older
/// transaction that is open (the xmin rule): it looks again after these pauses.
const HELD_BACK_RETRIES: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
];
const BATCH: u32 = 256;

/// A `Subscribe` request, parsed.
#[derive(Debug)]
struct Subscription {
    /// Where to start; `None` for the head.
    cursor: Option<EventCursor>,
    filter: Filter,
}

impl TryFrom<v1::SubscribeRequest> for Subscription {
    type Error = WireError;

    fn try_from(req: v1::SubscribeRequest) -> Result<Self, WireError> {
        Ok(Subscription {
            cursor: parse_optional("cursor", &req.cursor)?,
            filter: Filter {
                kinds: parse_list("types", &req.types)?,
                subject: req.subject,
            },
        })
    }
}

/// What a subscriber asked for.
#[derive(Debug, Clone)]
struct Filter {
    kinds: Vec<EventKind>,
    /// A base or patch name (or a whole subject); empty for all.
    subject: String,
}

impl Filter {
    fn wants(&self, e: &EventRecord) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && (self.subject.is_empty()
                || e.subject == self.subject
                || e.subject.starts_with(&format!("{}:", self.subject))
                || e.subject.contains(&format!("@{}:", self.subject)))
    }
}

/// The event service.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    pub(crate) registry: Registry,
    /// Cancelled at shutdown: every stream ends cleanly (the client resumes elsewhere
    /// from its cursor).
    pub(crate) draining: CancellationToken,
}

#[tonic::async_trait]
impl EventService for Events {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(cursor = %req.get_ref().cursor), err)]
    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let auth = self.registry.auth.clone();
        let who = auth.principal(req.metadata()).await?;
        let Subscription { cursor, filter } =
            Subscription::try_from(req.into_inner()).map_err(ApiError::from)?;
        if !filter.subject.is_empty() {
            auth.require(&who, Need::Read, namespace_of(&filter.subject))
                .await?;
        }
        let meta = self.registry.meta.clone();
        // Wake-ups from here on count: nothing committed after the first read is missed.
        let mut wake = meta.event_wakeups();
        wake.borrow_and_update();
        let mut cursor: EventCursor = match cursor {
            Some(c) => c,
            None => meta.head_cursor().await.map_err(ApiError::from)?,
        };
        // The first read answers a bad or foreign cursor as the call's status.
        let first = meta
            .read_events(Some(&cursor), BATCH)
            .await
            .map_err(ApiError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::Event, Status>>(64);
        let draining = self.draining.clone();
        let lag = metrics::histogram!(crate::metrics::EVENT_LAG);
        tokio::spawn(async move {
            let mut batch = Some(first);
            let mut wake_alive = true;
            loop {
                let (events, next) = match batch.take() {
                    Some(b) => b,
                    None => match meta.read_events(Some(&cursor), BATCH).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    },
                };
                let full = events.len() == BATCH as usize;
                for e in events {
                    if !filter.wants(&e) {
                        continue;
                    }
                    // Events about namespaces the subscriber may not read are skipped.
                    match auth
                        .allows(&who, Need::Read, namespace_of(&e.subject))
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                    let created_at = e.created_at;
                    if tx.send(Ok(event_to_proto(e))).await.is_err() {
                        return;
                    }
                    let now = patchport_store::meta::now_millis();
                    lag.record((now - created_at).max(0) as f64 / 1000.0);
                }
                cursor = next;
                if full {
                    continue;
                }
                // Caught up: sleep until something may have been appended.
                let woken = tokio::select! {
                    () = tx.closed() => return,
                    () = draining.cancelled() => return,
                    r = wake.changed(), if wake_alive => {
                        wake_alive = r.is_ok();
                        wake_alive
                    }
                    () = tokio::time::sleep(FALLBACK) => false,
                };
                if !woken {
                    continue;
                }
                // Woken: the events may still be held back behind an older open
                // transaction (Postgres); look again shortly until they show.
                for pause in HELD_BACK_RETRIES {
                    match meta.read_events(Some(&cursor), BATCH).await {
                        Ok(r) if r.0.is_empty() => tokio::time::sleep(pause).await,
                        Ok(r) => {
                            batch = Some(r);
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    }
                }
                if draining.is_cancelled() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
