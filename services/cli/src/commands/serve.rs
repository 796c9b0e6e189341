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
    /// Ranged GETs one blob read keeps in flight (8 MiB ranges; 1: one stream). For S3,
    /// where one connection streams some 50-100 MB/s; a server that reads the whole
    /// object for every ranged GET (moto) gets much slower with more than 1.
    #[arg(long, env = "PATCHPORT_BLOB_READ_CONCURRENCY", default_value_t = 1)]
    blob_read_concurrency: usize,
    /// Port workers run in this process (the same loop as `patchport worker`); 0 when
    /// separate worker processes do the ports.
    #[arg(long, env = "PATCHPORT_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Seconds a port job's lease lasts without a heartbeat (a dead worker costs this).
    #[arg(long, env = "PATCHPORT_LEASE_SECONDS", default_value_t = 30)]
    lease_seconds: u64,
    /// Require tokens (also on whenever PATCHPORT_ADMIN_TOKEN is set).
    #[arg(long, env = "PATCHPORT_AUTH")]
    auth: bool,
    /// Serve without auth on a non-loopback address (refused otherwise).
    #[arg(long)]
    insecure_no_auth: bool,
    /// PEM certificate chain for TLS on the gRPC endpoint.
    #[arg(long, env = "PATCHPORT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "PATCHPORT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Version pushes per minute per token.
    #[arg(long, env = "PATCHPORT_PUSH_RATE_PER_MINUTE", default_value_t = 600)]
    push_rate_per_minute: u32,
    /// Largest upload chunk in bytes.
    #[arg(long, env = "PATCHPORT_MAX_CHUNK_BYTES", default_value_t = 4 << 20)]
    max_chunk_bytes: u64,
    /// Largest gRPC message of the metadata services in bytes.
    #[arg(long, env = "PATCHPORT_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Largest safetensors JSON header in bytes.
    #[arg(long, env = "PATCHPORT_MAX_HEADER_BYTES", default_value_t = 16 << 20)]
    max_header_bytes: u64,
    /// Most tensors in one safetensors file.
    #[arg(long, env = "PATCHPORT_MAX_TENSORS", default_value_t = 100_000)]
    max_tensors: usize,
    /// Longest namespace/name in bytes.
    #[arg(long, env = "PATCHPORT_MAX_NAME_LENGTH", default_value_t = 200)]
    max_name_length: usize,
    /// Seconds an unfinished upload session is kept before it is deleted.
    #[arg(long, env = "PATCHPORT_UPLOAD_SESSION_SECONDS", default_value_t = 24 * 3600)]
    upload_session_seconds: u64,
    /// Most upload streams (UploadChunks) one caller has open at once.
    #[arg(long, env = "PATCHPORT_MAX_UPLOAD_STREAMS", default_value_t = 16)]
    max_upload_streams: usize,
    /// Most event subscriptions (watch) one caller has open at once.
    #[arg(long, env = "PATCHPORT_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    max_subscriptions: usize,
    /// Seconds an upload stream may send nothing, or an event stream's client read
    /// nothing, before the stream is ended.
    #[arg(long, env = "PATCHPORT_STREAM_IDLE_SECONDS", default_value_t = 60)]
    stream_idle_seconds: u64,
    /// Seconds a new connection has to finish its TLS and HTTP/2 handshakes.
    #[arg(
        long,
        env = "PATCHPORT_HANDSHAKE_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    handshake_timeout_seconds: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "PATCHPORT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// On SIGTERM: seconds in-process workers and in-flight requests get to finish before
    /// the remaining connections are dropped.
    #[arg(long, env = "PATCHPORT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// ECDSA P-256 private key PEM that signs every version and port (OpenSSF Model
    /// Signing). The PEM itself may come in PATCHPORT_SIGNING_KEY instead. Without
    /// either, an embedded (sqlite://) registry generates `signing-key.pem` beside its
    /// database on first start; a Postgres registry signs nothing.
    #[arg(long, env = "PATCHPORT_SIGNING_KEY_FILE")]
    signing_key: Option<std::path::PathBuf>,
    /// Public key PEM file(s) of earlier signing keys, still trusted after a rotation
    /// (served with the active key by `patchport signing-key --all`).
    #[arg(long, env = "PATCHPORT_TRUSTED_PUBLIC_KEYS", value_delimiter = ',')]
    trusted_public_keys: Vec<std::path::PathBuf>,
}

/// The signing key: `--signing-key`, PATCHPORT_SIGNING_KEY (the PEM), or for an embedded
/// database `signing-key.pem` beside it (generated on first start, mode 0600).
fn signing_keys(args: &ServeArgs) -> anyhow::Result<Option<patchport_registry::SigningKeys>> {
    use patchport_signing::{PublicKey, SigningKey};
    let from_env = std::env::var("PATCHPORT_SIGNING_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty());
    let embedded = args
        .database
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
        .filter(|p| !p.is_empty() && !p.contains(":memory:"))
        .map(|p| {
            Path::new(p)
                .parent()
                .unwrap_or(Path::new("."))
                .join("signing-key.pem")
        });
    let active = match (&args.signing_key, from_env, embedded) {
        (Some(path), _, _) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the signing key {}", path.display()))?;
            SigningKey::from_pem(&pem).with_context(|| format!("{}", path.display()))?
        }
        (None, Some(pem), _) => SigningKey::from_pem(&pem).context("PATCHPORT_SIGNING_KEY")?,
        (None, None, Some(path)) if path.exists() => {
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the signing key {}", path.display()))?;
            SigningKey::from_pem(&pem).with_context(|| format!("{}", path.display()))?
        }
        (None, None, Some(path)) => {
            let key = SigningKey::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_secret(&path, &key.to_pem())
                .with_context(|| format!("writing the signing key {}", path.display()))?;
            tracing::info!(path = %path.display(), key = %key.public_key().hint(), "generated a signing key");
            key
        }
        (None, None, None) => {
            tracing::warn!(
                "signing off: no --signing-key or PATCHPORT_SIGNING_KEY; versions and ports are not signed"
            );
            return Ok(None);
        }
    };
    let mut older = Vec::new();
    for path in &args.trusted_public_keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the trusted public keys {}", path.display()))?;
        older.extend(PublicKey::parse_all(&text).with_context(|| format!("{}", path.display()))?);
    }
    tracing::info!(key = %active.public_key().hint(), trusted = older.len() + 1, "signing on");
    Ok(Some(patchport_registry::SigningKeys::new(active, older)))
}

/// Creates a file only its owner can read, failing if it exists.
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
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
    let admin_token = std::env::var("PATCHPORT_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
        anyhow::bail!(
            "PATCHPORT_ADMIN_TOKEN is shorter than 16 characters: use a long random value"
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(patchport_registry::TlsConfig {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading the TLS certificate {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading the TLS key {}", key.display()))?,
        }),
        _ => None,
    };
    let tls_cert_pem = tls.as_ref().map(|t| t.cert_pem.clone());
    let signing = signing_keys(&args)?.map(std::sync::Arc::new);
    let config = Config {
        listen: args.listen,
        database: args.database,
        blobs: absolute_file_url(&args.blobs)?,
        blob_read_concurrency: args.blob_read_concurrency.max(1),
        lease: std::time::Duration::from_secs(args.lease_seconds.max(1)),
        auth: patchport_registry::auth::AuthConfig {
            enabled: args.auth,
            admin_token,
            push_rate_per_minute: args.push_rate_per_minute,
        },
        insecure_no_auth: args.insecure_no_auth,
        tls,
        limits: patchport_registry::Limits {
            max_chunk_bytes: args.max_chunk_bytes.clamp(1 << 10, 64 << 20),
            max_message_bytes: args.max_message_bytes.max(1 << 20),
            max_header_bytes: args.max_header_bytes,
            max_tensors: args.max_tensors,
            max_name_len: args.max_name_length,
            upload_session_ttl: std::time::Duration::from_secs(args.upload_session_seconds.max(1)),
            max_upload_streams: args.max_upload_streams.max(1),
            max_subscriptions: args.max_subscriptions.max(1),
            stream_idle: std::time::Duration::from_secs(args.stream_idle_seconds.max(2)),
            handshake_timeout: std::time::Duration::from_secs(
                args.handshake_timeout_seconds.max(1),
            ),
        },
        metrics_listen: args.metrics_listen,
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_seconds),
        signing,
    };
    let signal = shutdown_signal()?;
    let mut app = Application::build(config).await?;
    let addr = app.local_addr();
    let internal_token = app.registry().auth.internal_worker_token().to_owned();
    // In-process workers reach this server on loopback.
    let local = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    // Test harnesses read this line to learn the port when listening on :0 (and the
    // next one for the metrics port).
    println!("patchport registry listening on {addr}");
    if let Some(metrics) = app.metrics_addr() {
        println!("patchport metrics listening on {metrics}");
    }
    // In-process workers stop when draining begins (health already NOT_SERVING) and
    // release their leases while the server still answers.
    for i in 0..args.workers {
        let stop = app.draining();
        let options = patchport_client::ClientOptions {
            token: Some(internal_token.clone()),
            ca_cert_pem: tls_cert_pem.clone(),
            allow_plaintext_token: false,
        };
        let id = format!("{}-inproc-{i}", super::worker::default_worker_id());
        app.finish_before_stop(tokio::spawn(async move {
            let url = if options.ca_cert_pem.is_some() {
                format!("https://localhost:{}", local.port())
            } else {
                format!("http://{local}")
            };
            // The in-process worker speaks gRPC to this very server: one code path.
            let client = loop {
                match patchport_client::Client::connect_with(&url, options.clone()).await {
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
