//! `patchport.v1.EventService`: the transactional outbox, streamed at least once from a
//! cursor. The store's cursor never skips a transaction that commits late (on Postgres
//! it follows `(xid, id)` below the snapshot's xmin); this service polls it.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use patchport_proto::v1::{self, event_service_server::EventService};
use patchport_store::meta::EventCursor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{Need, namespace_of};
use crate::convert::timestamp;
use crate::error::ApiError;
use crate::state::Registry;

const POLL: Duration = Duration::from_millis(250);
const BATCH: u32 = 256;

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
        let req = req.into_inner();
        if !req.subject.is_empty() {
            auth.require(&who, Need::Read, namespace_of(&req.subject))
                .await?;
        }
        let meta = self.registry.meta.clone();
        let mut cursor: EventCursor = if req.cursor.is_empty() {
            meta.head_cursor().await.map_err(ApiError::from)?
        } else {
            req.cursor.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "invalid cursor {:?}: use one the server returned",
                    req.cursor
                ))
            })?
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::Event, Status>>(64);
        let draining = self.draining.clone();
        let lag = metrics::histogram!(crate::metrics::EVENT_LAG);
        tokio::spawn(async move {
            while !draining.is_cancelled() {
                let (events, next) = match meta.read_events(Some(&cursor), BATCH).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                let got = events.len();
                for e in events {
                    let wanted = (req.types.is_empty() || req.types.contains(&e.kind))
                        && (req.subject.is_empty()
                            || e.subject == req.subject
                            || e.subject.starts_with(&format!("{}:", req.subject))
                            || e.subject.contains(&format!("@{}:", req.subject)));
                    if !wanted {
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
                    let payload = serde_json::json!({
                        "job_id": e.job_id,
                        "port_id": e.port_id,
                        "detail": e.detail,
                    });
                    let event = v1::Event {
                        id: e.id.to_string(),
                        cursor: e.cursor.to_string(),
                        r#type: e.kind,
                        time: Some(timestamp(created_at)),
                        subject: e.subject,
                        payload_json: payload.to_string(),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    let now = patchport_store::meta::now_millis();
                    lag.record((now - created_at).max(0) as f64 / 1000.0);
                }
                cursor = next;
                if got == 0 {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = draining.cancelled() => return,
                        () = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
