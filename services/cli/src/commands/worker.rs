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
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "PATCHPORT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The worker's cache: base tensors under DIR/tensors (read from the registry once,
    /// verified by digest), and the quality gate's downloaded versions and reference arms
    /// (default: <tmp>/patchport-worker-cache).
    #[arg(long, env = "PATCHPORT_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// The most bytes of base tensors the cache keeps (least recently used go first);
    /// 0 turns the tensor cache off.
    #[arg(long, env = "PATCHPORT_CACHE_BYTES", default_value_t = patchport_worker::DEFAULT_CACHE_BYTES)]
    cache_bytes: u64,
    /// Jobs ported at once (they share the cache; one fills a tensor, others wait).
    #[arg(long, env = "PATCHPORT_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// The most jobs one lease takes. A worker leases ahead only as many as it expects
    /// to port within a second at its recent pace (slow ports go one at a time, so other
    /// workers get them); 1 leases one job at a time.
    #[arg(long, env = "PATCHPORT_LEASE_BATCH", default_value_t = patchport_worker::DEFAULT_LEASE_BATCH as u16, value_parser = clap::value_parser!(u16).range(1..=patchport_core::port::MAX_LEASE_JOBS as i64))]
    lease_batch: u16,
    /// Port only: skip the quality gate even for patches with an eval set.
    #[arg(long, env = "PATCHPORT_NO_EVAL")]
    no_eval: bool,
}

/// Event stream arguments.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Resume after this cursor (printed with every event); 0 replays every event from
    /// the first; default: new events only.
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
    let shutdown = CancellationToken::new();
    let signal = super::serve::shutdown_signal()?;
    let metrics = match a.metrics_listen {
        Some(addr) => {
            let endpoint = patchport_telemetry::MetricsEndpoint::bind(addr).await?;
            tracing::info!(addr = %endpoint.local_addr(), "metrics at /metrics");
            Some(tokio::spawn(endpoint.serve(shutdown.clone())))
        }
        None => None,
    };
    let client = super::connect(registry).await?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        trigger.cancel();
    });
    tracing::info!(worker = %id, %device, registry, "worker started");
    let mut config = patchport_worker::WorkerConfig::new(id, device);
    config.cache_bytes = a.cache_bytes;
    config.concurrency = usize::from(a.concurrency);
    config.lease_batch = usize::from(a.lease_batch);
    if let Some(dir) = a.cache_dir {
        config.cache_dir = dir.join("tensors");
        if let Some(gate) = config.gate.as_mut() {
            gate.cache_dir = dir;
        }
    }
    if a.no_eval {
        config.gate = None;
    }
    patchport_worker::run(client, config, shutdown.clone())
        .await
        .context("worker failed")?;
    shutdown.cancel();
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
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

/// Compatibility query arguments.
#[derive(Debug, Args)]
pub(crate) struct CompatArgs {
    /// Every base this patch works on (native or ported).
    #[arg(long, conflicts_with = "base", required_unless_present = "base")]
    patch: Option<String>,
    /// Every patch that works on this base.
    #[arg(long)]
    base: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Resolve arguments.
#[derive(Debug, Args)]
pub(crate) struct ResolveArgs {
    /// The patch reference (namespace/name:version).
    patch: String,
    /// The digest of the base the serving engine has loaded.
    #[arg(long)]
    base_digest: String,
    /// Only a port whose evaluation passed.
    #[arg(long)]
    require_pass: bool,
    /// Only an artifact the registry signed (refuses an unsigned port or patch).
    #[arg(long)]
    require_signed: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn kind_name(kind: i32) -> &'static str {
    match v1::CompatKind::try_from(kind) {
        Ok(v1::CompatKind::Native) => "native",
        Ok(v1::CompatKind::Ported) => "ported",
        Ok(v1::CompatKind::Queued) => "queued",
        Ok(v1::CompatKind::Running) => "running",
        Ok(v1::CompatKind::Incompatible) => "incompatible",
        Ok(v1::CompatKind::Failed) => "failed",
        Ok(v1::CompatKind::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn diag_json(d: &v1::ModuleDiagnostics) -> serde_json::Value {
    serde_json::json!({
        "module": d.module, "base_drift": d.base_drift, "patch_size": d.patch_size,
        "drift_to_patch": d.drift_to_patch, "cosine": d.cosine, "unchanged": d.unchanged,
    })
}

pub(crate) async fn compat(registry: &str, a: CompatArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let subject = match (a.patch, a.base) {
        (Some(p), _) => v1::query_compat_request::Subject::Patch(p),
        (None, Some(b)) => v1::query_compat_request::Subject::Base(b),
        (None, None) => anyhow::bail!("give --patch or --base"),
    };
    let entries = client.query_compat_all(subject).await?;
    if a.json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let port = e.port.as_ref();
                serde_json::json!({
                    "patch": e.patch,
                    "patch_digest": e.patch_digest,
                    "base": e.base,
                    "base_digest": e.base_digest,
                    "kind": kind_name(e.kind),
                    "queue_position": port.map(|p| p.queue_position).filter(|n| *n > 0),
                    "reasons": port.map(|p| p.refusals.iter().map(|r| serde_json::json!({"kind": r.kind, "subject": r.subject, "message": r.message})).collect::<Vec<_>>()),
                    "diagnostics": port.and_then(|p| p.diagnostics.as_ref()).map(|d| serde_json::json!({
                        "total": d.total.as_ref().map(diag_json),
                        "modules": d.modules.iter().map(diag_json).collect::<Vec<_>>(),
                    })),
                    "error": port.map(|p| p.error.clone()).filter(|e| !e.is_empty()),
                    "attempts": port.map(|p| p.attempts),
                    "risk": port.and_then(|p| p.diagnostics.as_ref()).map(|d| d.risk),
                    "high_risk": port.and_then(|p| p.diagnostics.as_ref()).map(|d| d.high_risk),
                    "evaluation": crate::output::evaluation_json(port.and_then(|p| p.evaluation.as_ref())),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<32} {:<32} {:<13} DETAIL", "PATCH", "BASE", "KIND");
        for e in &entries {
            let detail = e
                .port
                .as_ref()
                .map(|p| {
                    if p.queue_position > 0 {
                        format!("place {} in the queue", p.queue_position)
                    } else if let Some(t) = p.diagnostics.as_ref().and_then(|d| d.total.as_ref()) {
                        format!(
                            "drift {:.3} patch {:.3} cosine {:+.3} {}",
                            t.base_drift,
                            t.patch_size,
                            t.cosine,
                            crate::output::gate_line(p)
                        )
                    } else {
                        p.refusals
                            .iter()
                            .map(|r| r.kind.clone())
                            .collect::<Vec<_>>()
                            .join(",")
                    }
                })
                .unwrap_or_default();
            println!(
                "{:<32} {:<32} {:<13} {detail}",
                e.patch,
                e.base,
                kind_name(e.kind)
            );
        }
    }
    Ok(())
}

pub(crate) async fn resolve(registry: &str, a: ResolveArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let r = client
        .ports()
        .resolve(v1::ResolveRequest {
            patch: a.patch,
            base_digest: a.base_digest,
            require_pass: a.require_pass,
            require_signed: a.require_signed,
        })
        .await?
        .into_inner();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "kind": kind_name(r.kind),
                "patch": r.patch,
                "base": r.base,
                "files": r.adapter_files.iter().map(crate::output::file_json).collect::<Vec<_>>(),
            }))?
        );
    } else {
        println!(
            "{} adapter of {} for {}",
            kind_name(r.kind),
            r.patch,
            r.base
        );
        for f in &r.adapter_files {
            println!("  {:<32} {}", f.path, f.digest);
        }
    }
    Ok(())
}
