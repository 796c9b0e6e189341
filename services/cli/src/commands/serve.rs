//! `patchport serve`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use clap::Args;
use patchport_registry::{Application, Config};

/// Where the registry listens and stores.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PATCHPORT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Metadata database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "PATCHPORT_DATABASE",
        default_value = "sqlite://./patchport-data/registry.db"
    )]
    database: String,
    /// Blob store: file://PATH, memory:// or s3://BUCKET[/PREFIX] (AWS_* variables for S3).
    #[arg(
        long,
        env = "PATCHPORT_BLOBS",
        default_value = "file://./patchport-data/blobs"
    )]
    blobs: String,
    /// Port workers run in this process (the same loop as `patchport worker`); 0 when
    /// separate worker processes do the ports.
    #[arg(long, env = "PATCHPORT_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Seconds a port job's lease lasts without a heartbeat (a dead worker costs this).
    #[arg(long, env = "PATCHPORT_LEASE_SECONDS", default_value_t = 30)]
    lease_seconds: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "PATCHPORT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// On SIGTERM: seconds in-process workers and in-flight requests get to finish before
    /// the remaining connections are dropped.
    #[arg(long, env = "PATCHPORT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
}

/// Makes `file://relative/path` absolute (object_store needs absolute paths).
fn absolute_file_url(url: &str) -> anyhow::Result<String> {
    match url.strip_prefix("file://") {
        Some(path) if !path.starts_with('/') => {
            let abs = std::env::current_dir()
                .context("reading the current directory")?
                .join(Path::new(path));
            std::fs::create_dir_all(&abs).with_context(|| format!("creating {}", abs.display()))?;
            let abs = abs
                .canonicalize()
                .with_context(|| format!("resolving {}", abs.display()))?;
            Ok(format!("file://{}", abs.display()))
        }
        _ => Ok(url.to_owned()),
    }
}

/// Registers SIGTERM and SIGINT handlers now (before the server announces itself, so a
/// signal sent right after start is never lost) and resolves on the first of them.
#[cfg(unix)]
pub(crate) fn shutdown_signal()
-> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

#[cfg(not(unix))]
pub(crate) fn shutdown_signal()
-> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config {
        listen: args.listen,
        database: args.database,
        blobs: absolute_file_url(&args.blobs)?,
        lease: std::time::Duration::from_secs(args.lease_seconds.max(1)),
        metrics_listen: args.metrics_listen,
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_seconds),
    };
    let signal = shutdown_signal()?;
    let mut app = Application::build(config).await?;
    let addr = app.local_addr();
    // Test harnesses read this line to learn the port when listening on :0 (and the
    // next one for the metrics port).
    println!("patchport registry listening on {addr}");
    if let Some(metrics) = app.metrics_addr() {
        patchport_worker::describe_metrics();
        println!("patchport metrics listening on {metrics}");
    }
    // In-process workers stop when draining begins (health already NOT_SERVING) and
    // release their leases while the server still answers.
    for i in 0..args.workers {
        let stop = app.draining();
        let id = format!("{}-inproc-{i}", super::worker::default_worker_id());
        app.finish_before_stop(tokio::spawn(async move {
            let url = format!("http://{addr}");
            // The in-process worker speaks gRPC to this very server: one code path.
            let client = loop {
                match patchport_client::Client::connect(&url).await {
                    Ok(c) => break c,
                    Err(_) if !stop.is_cancelled() => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await
                    }
                    Err(_) => return,
                }
            };
            let config = patchport_worker::WorkerConfig::new(id, patchport_engine::Device::Cpu);
            if let Err(e) = patchport_worker::run(client, config, stop).await {
                tracing::error!(error = %e, "in-process worker stopped");
            }
        }));
    }
    app.run_until(signal).await?;
    Ok(())
}
