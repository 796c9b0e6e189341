//! `patchport worker` and `patchport watch`.

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt;
use patchport_engine::Device;
use patchport_proto::v1;
use tokio_util::sync::CancellationToken;

/// Port worker arguments.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// cpu or cuda:N.
    #[arg(long, env = "PATCHPORT_DEVICE", default_value = "cpu")]
    device: String,
    /// Identity of this worker in leases and logs (default: host name and process id).
    #[arg(long, env = "PATCHPORT_WORKER_ID")]
    id: Option<String>,
}

/// Event stream arguments.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Resume after this cursor (printed with every event); default: new events only.
    #[arg(long, default_value = "")]
    from: String,
    /// Only these event types (repeatable): base.published, port.completed, ...
    #[arg(long = "type")]
    types: Vec<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

pub(crate) async fn run(registry: &str, a: WorkerArgs) -> anyhow::Result<()> {
    let device: Device = a.device.parse()?;
    let id = a.id.unwrap_or_else(default_worker_id);
    let client = super::connect(registry).await?;
    let shutdown = CancellationToken::new();
    let signal = super::serve::shutdown_signal()?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        trigger.cancel();
    });
    tracing::info!(worker = %id, %device, registry, "worker started");
    patchport_worker::run(
        client,
        patchport_worker::WorkerConfig::new(id, device),
        shutdown,
    )
    .await
    .context("worker failed")?;
    Ok(())
}

pub(crate) async fn watch(registry: &str, a: WatchArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let mut stream = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: a.from,
            types: a.types,
            subject: String::new(),
        })
        .await?
        .into_inner();
    while let Some(event) = stream.next().await {
        let e = event?;
        if a.json {
            let payload: serde_json::Value =
                serde_json::from_str(&e.payload_json).unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({
                    "id": e.id,
                    "cursor": e.cursor,
                    "type": e.r#type,
                    "subject": e.subject,
                    "time_ms": e.time.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
                    "payload": payload,
                })
            );
        } else {
            println!("{:<16} {:<60} cursor {}", e.r#type, e.subject, e.cursor);
        }
    }
    Ok(())
}
