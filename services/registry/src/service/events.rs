//! `patchport.v1.EventService`: the transactional outbox, streamed at least once from a
//! cursor. The store's cursor never skips a transaction that commits late (on Postgres
//! it follows `(xid, id)` below the snapshot's xmin). Streams are pushed, not polled: a
//! stream reads the outbox by its own cursor until it is caught up, then takes the pages
//! the process's one reader ([`super::hub`]) broadcasts when the store wakes it. A page
//! that does not continue the stream's cursor, a lagging stream, or a silent hub send
//! the stream back to reading by its cursor: the outbox stays the only truth.
//!
//! Each caller has at most `--max-subscriptions` streams open, and a stream whose client
//! reads nothing for `--stream-idle-seconds` (its buffer stays full) is ended.

use std::pin::Pin;
use std::sync::Arc;
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

use super::hub::{BATCH, EventHub, Page};

/// A caught-up stream that hears nothing from the hub reads the outbox itself at least
/// this often (a safety net for a stalled hub; never the way events normally arrive).
const FALLBACK: Duration = Duration::from_secs(10);

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
    /// The process's one outbox reader.
    pub(crate) hub: EventHub,
    /// Cancelled at shutdown: every stream ends cleanly (the client resumes elsewhere
    /// from its cursor).
    pub(crate) draining: CancellationToken,
}

/// Sends one event if the subscriber wants it and may read it; false when the stream
/// is over (the client left, stopped reading for `idle`, or authorisation failed).
async fn send(
    tx: &tokio::sync::mpsc::Sender<Result<v1::Event, Status>>,
    filter: &Filter,
    auth: &crate::auth::Auth,
    who: &crate::auth::Principal,
    e: EventRecord,
    lag: &metrics::Histogram,
    idle: Duration,
) -> bool {
    if !filter.wants(&e) {
        return true;
    }
    // Events about namespaces the subscriber may not read are skipped.
    match auth.allows(who, Need::Read, namespace_of(&e.subject)).await {
        Ok(true) => {}
        Ok(false) => return true,
        Err(err) => {
            let _ = tx.send(Err(err.into())).await;
            return false;
        }
    }
    let created_at = e.created_at;
    match tx.send_timeout(Ok(event_to_proto(e)), idle).await {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
            // The client has read nothing for `idle`: its buffer is full, so the stream
            // ends (it resumes from its cursor).
            metrics::counter!(patchport_telemetry::STREAMS_IDLE_CLOSED, "stream" => "subscribe")
                .increment(1);
            tracing::info!(
                idle_seconds = idle.as_secs(),
                "event stream ended: the client read nothing (--stream-idle-seconds)"
            );
            return false;
        }
        Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return false,
    }
    let now = patchport_store::meta::now_millis();
    lag.record((now - created_at).max(0) as f64 / 1000.0);
    true
}

#[tonic::async_trait]
impl EventService for Events {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(cursor = %req.get_ref().cursor))]
    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let auth = self.registry.auth.clone();
        let who = auth.principal(req.metadata()).await?;
        let limits = self.registry.limits.clone();
        let permit = auth.open_stream(
            &who,
            req.remote_addr(),
            crate::limits::StreamKind::Subscribe,
            limits.max_subscriptions,
        )?;
        let idle = limits.stream_idle;
        let Subscription { cursor, filter } =
            Subscription::try_from(req.into_inner()).map_err(ApiError::from)?;
        if !filter.subject.is_empty() {
            auth.require(&who, Need::Read, namespace_of(&filter.subject))
                .await?;
        }
        let meta = self.registry.meta.clone();
        // Pages broadcast from here on reach this stream: nothing read after the first
        // read below is missed.
        let mut pages = self.hub.subscribe();
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
            // The stream's place under the per-caller cap, freed when it ends.
            let _permit = permit;
            let mut batch = Some(first);
            loop {
                // Read by our own cursor until caught up.
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
                    if !send(&tx, &filter, &auth, &who, e, &lag, idle).await {
                        return;
                    }
                }
                cursor = next;
                if full {
                    continue;
                }
                // Caught up: follow the hub's pages while they continue our cursor.
                loop {
                    let page = tokio::select! {
                        () = tx.closed() => return,
                        () = draining.cancelled() => return,
                        r = pages.recv() => r,
                        () = tokio::time::sleep(FALLBACK) => break,
                    };
                    let page: Arc<Page> = match page {
                        Ok(p) => p,
                        // Fell behind the broadcast, or the hub is gone: read ourselves.
                        Err(_) => break,
                    };
                    let (Some(at), Some(from), Some(to)) =
                        (cursor.position(), page.from.position(), page.to.position())
                    else {
                        break;
                    };
                    if from > at {
                        // A gap between our cursor and the page: read it ourselves.
                        break;
                    }
                    // The page holds every event after `from` up to `to`; ours start
                    // after `at`.
                    for e in page
                        .events
                        .iter()
                        .filter(|e| e.cursor.position() > Some(at))
                    {
                        if !send(&tx, &filter, &auth, &who, e.clone(), &lag, idle).await {
                            return;
                        }
                    }
                    if to > at {
                        cursor = page.to.clone();
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
