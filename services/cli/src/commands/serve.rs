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
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
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
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config {
        listen: args.listen,
        database: args.database,
        blobs: absolute_file_url(&args.blobs)?,
    };
    let shutdown = shutdown_signal()?;
    let app = Application::build(config).await?;
    // Test harnesses read this line to learn the port when listening on :0.
    println!("patchport registry listening on {}", app.local_addr());
    app.run_until(shutdown).await?;
    Ok(())
}
