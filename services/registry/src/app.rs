//! `Application::build(config)` binds first and exposes its address; `run_until` serves
//! until a shutdown signal, then drains: health NOT_SERVING, in-process workers release
//! their leases while the server still answers, the listener closes, in-flight requests
//! finish within the grace, and long polls and event streams end cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use patchport_proto::v1::{
    admin_service_server::AdminServiceServer, blob_service_server::BlobServiceServer,
    event_service_server::EventServiceServer, port_service_server::PortServiceServer,
    registry_service_server::RegistryServiceServer, signing_service_server::SigningServiceServer,
    worker_service_server::WorkerServiceServer,
};
use patchport_store::blobs::BlobStore;
use patchport_store::meta;
use patchport_telemetry::{MetricsEndpoint, MetricsError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::auth::{Auth, AuthConfig};
use crate::limits::Limits;
use crate::metrics::GrpcMetricsLayer;
use crate::service::admin::Admin;
use crate::service::blobs::Blobs;
use crate::service::events::Events;
use crate::service::ports::Ports;
use crate::service::registry::Versions;
use crate::service::signing::Signing;
use crate::service::workers::Workers;
use crate::state::Registry;

/// How often the `patchport_jobs` gauge is refreshed from the store.
const JOBS_GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Every service with a health status ("" is the whole server).
const HEALTH_SERVICES: [&str; 8] = [
    "",
    "patchport.v1.BlobService",
    "patchport.v1.RegistryService",
    "patchport.v1.PortService",
    "patchport.v1.EventService",
    "patchport.v1.WorkerService",
    "patchport.v1.AdminService",
    "patchport.v1.SigningService",
];

/// What the registry serves and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// `postgres://...` or `sqlite://PATH`.
    pub database: String,
    /// `file:///abs/path`, `memory://` or `s3://bucket/prefix`.
    pub blobs: String,
    /// Ranged GETs one blob read keeps in flight (1: one stream; see
    /// `BlobStore::with_read_concurrency`).
    pub blob_read_concurrency: usize,
    /// How long a port job's lease lasts without a heartbeat.
    pub lease: std::time::Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None` records nothing.
    pub metrics_listen: Option<SocketAddr>,
    /// After a shutdown signal, how long in-process workers and in-flight requests get
    /// to finish before the remaining connections are dropped.
    pub shutdown_grace: Duration,
    /// Tokens and rate limits.
    pub auth: AuthConfig,
    /// Serve without auth on a non-loopback address (refused otherwise).
    pub insecure_no_auth: bool,
    /// TLS for the gRPC endpoint.
    pub tls: Option<TlsConfig>,
    /// Request limits.
    pub limits: Limits,
    /// The key that signs versions and ports, and older public keys still trusted;
    /// `None` signs nothing.
    pub signing: Option<std::sync::Arc<crate::signing::SigningKeys>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database: String::new(),
            blobs: String::new(),
            blob_read_concurrency: 1,
            lease: std::time::Duration::from_secs(30),
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(30),
            auth: AuthConfig::default(),
            insecure_no_auth: false,
            tls: None,
            limits: Limits::default(),
            signing: None,
        }
    }
}

/// The server's certificate chain and key, PEM.
#[derive(Clone)]
pub struct TlsConfig {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metadata store did not open.
    #[error("cannot open the metadata store {url}")]
    Meta {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: patchport_store::meta::StoreError,
    },
    /// The blob store did not open.
    #[error("cannot open the blob store {url}")]
    Blobs {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: patchport_store::blobs::BlobError,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("grpc server failed")]
    Serve {
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// Auth off on an address others can reach.
    #[error(
        "refusing to serve without auth on non-loopback address {addr}: set PATCHPORT_ADMIN_TOKEN (or --auth), or pass --insecure-no-auth"
    )]
    Insecure {
        /// The address.
        addr: SocketAddr,
    },
    /// The TLS certificate or key is unusable.
    #[error("invalid TLS configuration")]
    Tls {
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The metrics endpoint did not start.
    #[error("cannot start the metrics endpoint")]
    Metrics {
        /// The cause.
        #[source]
        source: MetricsError,
    },
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection {
        /// The cause.
        #[source]
        source: tonic_reflection::server::Error,
    },
}

/// A bound, ready-to-run registry.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    registry: Registry,
    lease: std::time::Duration,
    tls: Option<TlsConfig>,
    metrics: Option<MetricsEndpoint>,
    shutdown_grace: Duration,
    draining: CancellationToken,
    before_stop: Vec<JoinHandle<()>>,
}

impl Application {
    /// Opens the stores (running migrations) and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let blobs = BlobStore::from_url(&config.blobs)
            .map_err(|source| StartError::Blobs {
                url: config.blobs.clone(),
                source,
            })?
            .with_read_concurrency(config.blob_read_concurrency);
        Self::build_with_blobs(config, blobs).await
    }

    /// Like [`build`](Self::build), over a blob store the caller made (`config.blobs` is
    /// ignored): tests use it to put a fault-injecting `ObjectStore` under the registry.
    pub async fn build_with_blobs(config: Config, blobs: BlobStore) -> Result<Self, StartError> {
        let auth_on = config.auth.enabled || config.auth.admin_token.is_some();
        if !auth_on && !config.listen.ip().is_loopback() && !config.insecure_no_auth {
            return Err(StartError::Insecure {
                addr: config.listen,
            });
        }
        let meta = meta::connect(&config.database)
            .await
            .map_err(|source| StartError::Meta {
                url: meta::redact(&config.database),
                source,
            })?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                MetricsEndpoint::bind(addr)
                    .await
                    .map_err(|source| StartError::Metrics { source })?,
            ),
            None => None,
        };
        Ok(Self {
            listener,
            addr,
            registry: Registry {
                auth: Auth::new(&config.auth, meta.clone()),
                meta,
                blobs,
                limits: std::sync::Arc::new(config.limits),
                signing: config.signing,
                upload_indexes: Default::default(),
            },
            lease: config.lease,
            tls: config.tls,
            metrics,
            shutdown_grace: config.shutdown_grace,
            draining: CancellationToken::new(),
            before_stop: Vec::new(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address, when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsEndpoint::local_addr)
    }

    /// The stores (for in-process workers and tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Cancelled when shutdown begins: after health turns NOT_SERVING, while the server
    /// still answers. In-process workers stop on it and release their leases.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// The server keeps taking requests after a shutdown signal until `task` ends (within
    /// the grace): an in-process worker releasing its lease over gRPC.
    pub fn finish_before_stop(&mut self, task: JoinHandle<()>) {
        self.before_stop.push(task);
    }

    /// Serves until `shutdown` completes, then drains: every health status turns
    /// NOT_SERVING, [`Self::draining`] is cancelled and the tasks given to
    /// [`Self::finish_before_stop`] finish while the server still answers; then the
    /// listener closes, long polls and event streams end, and in-flight requests finish.
    /// Whatever is still running when the grace is up is dropped.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(patchport_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|source| StartError::Reflection { source })?;
        let limits = self.registry.limits.clone();
        // A chunk plus framing, and never below the metadata services' limit: an
        // oversize chunk must reach UploadChunks, whose own check answers
        // RESOURCE_EXHAUSTED naming --max-chunk-bytes (the transport would answer
        // OUT_OF_RANGE).
        let chunk_message =
            (limits.max_chunk_bytes as usize + (1 << 20)).max(limits.max_message_bytes);
        let blobs = BlobServiceServer::new(Blobs {
            registry: self.registry.clone(),
        })
        .max_decoding_message_size(chunk_message)
        .max_encoding_message_size(chunk_message);
        let versions = RegistryServiceServer::new(Versions {
            registry: self.registry.clone(),
        })
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        if self.registry.auth.enabled() {
            tracing::info!(
                "auth on: every request needs a token, except reads of anonymous-read namespaces"
            );
        } else {
            tracing::warn!(addr = %self.addr, "auth off: anyone who reaches this address may read and write; set PATCHPORT_ADMIN_TOKEN to require tokens");
        }
        for name in HEALTH_SERVICES {
            health_reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let background = CancellationToken::new();
        let mut tasks = Vec::new();
        // The reaper: leases that expired (a worker died) go back to the queue.
        tasks.push({
            let meta = self.registry.meta.clone();
            let blobs = self.registry.blobs.clone();
            let limits = limits.clone();
            let period = (self.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                let ttl = limits.upload_session_ttl;
                let sweep_every = (ttl / 4).clamp(
                    std::time::Duration::from_millis(500),
                    std::time::Duration::from_secs(60),
                );
                let mut last_sweep = std::time::Instant::now();
                // What a registry killed mid-commit or mid-put left behind goes first.
                match blobs.sweep_at_start(ttl).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(sessions = n, "expired upload sessions removed"),
                    Err(e) => tracing::error!(error = %e, "sweeping upload leftovers failed"),
                }
                loop {
                    tick.tick().await;
                    if last_sweep.elapsed() >= sweep_every {
                        last_sweep = std::time::Instant::now();
                        match blobs.expire_uploads(ttl).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(sessions = n, "expired upload sessions removed")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "expiring upload sessions failed")
                            }
                        }
                    }
                    match meta.reap_expired(patchport_store::meta::now_millis()).await {
                        Ok(0) => {}
                        Ok(n) => {
                            metrics::counter!(crate::metrics::LEASE_EXPIRIES).increment(n as u64);
                            tracing::warn!(jobs = n, "expired leases requeued");
                        }
                        Err(e) => tracing::error!(error = %e, "reaping expired leases failed"),
                    }
                }
            })
        });
        if let Some(endpoint) = self.metrics {
            tracing::info!(addr = %endpoint.local_addr(), "metrics at /metrics");
            tasks.push(tokio::spawn(endpoint.serve(background.clone())));
            // Queue depth by state, from the store.
            let meta = self.registry.meta.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(JOBS_GAUGE_EVERY);
                loop {
                    tick.tick().await;
                    match meta.count_jobs_by_state().await {
                        Ok(counts) => {
                            for (state, n) in counts {
                                metrics::gauge!(crate::metrics::JOBS, "state" => state.as_str())
                                    .set(n as f64);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "counting jobs failed"),
                    }
                }
            }));
        }
        tracing::info!(addr = %self.addr, "registry listening");
        let (deadline_tx, deadline_rx) = tokio::sync::oneshot::channel();
        let draining = self.draining.clone();
        let before_stop = self.before_stop;
        let grace = self.shutdown_grace;
        let reporter = health_reporter.clone();
        let stopping = async move {
            shutdown.await;
            let deadline = tokio::time::Instant::now() + grace;
            let _ = deadline_tx.send(deadline);
            // Load balancers and probes see NOT_SERVING while the server still answers.
            for name in HEALTH_SERVICES {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(grace_seconds = grace.as_secs(), "shutting down: draining");
            draining.cancel();
            if tokio::time::timeout_at(deadline, futures::future::join_all(before_stop))
                .await
                .is_err()
            {
                tracing::warn!("in-process workers did not stop within the grace");
            }
            tracing::info!("no longer accepting requests; finishing those in flight");
        };
        // Uploads are long streams of 4 MiB chunks: let HTTP/2 flow control grow each
        // stream's receive window with the measured bandwidth-delay product instead of
        // pausing the sender at a fixed window.
        let mut server = tonic::transport::Server::builder().http2_adaptive_window(Some(true));
        if let Some(tls) = &self.tls {
            // Other dependencies enable a second rustls provider; pick ring explicitly.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
            server = server
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(identity)
                        .timeout(limits.handshake_timeout),
                )
                .map_err(|source| StartError::Tls { source })?;
        }
        let served = server
            .layer(GrpcMetricsLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(blobs)
            .add_service(versions)
            .add_service(PortServiceServer::new(Ports {
                registry: self.registry.clone(),
            }))
            .add_service(EventServiceServer::new(Events {
                registry: self.registry.clone(),
                hub: crate::service::hub::EventHub::new(
                    self.registry.meta.clone(),
                    self.draining.clone(),
                ),
                draining: self.draining.clone(),
            }))
            .add_service(
                WorkerServiceServer::new(Workers {
                    registry: self.registry.clone(),
                    lease: self.lease,
                    draining: self.draining.clone(),
                    composed: Default::default(),
                })
                .max_decoding_message_size(limits.max_message_bytes)
                .max_encoding_message_size(limits.max_message_bytes),
            )
            .add_service(AdminServiceServer::new(Admin {
                registry: self.registry.clone(),
            }))
            .add_service(SigningServiceServer::new(Signing {
                registry: self.registry.clone(),
            }))
            .serve_with_incoming_shutdown(
                // No Nagle: small request/response pairs (leases, chunk acks) must not
                // wait for delayed ACKs. A connection that does not start HTTP/2 within
                // the handshake timeout is dropped.
                {
                    let timeout = limits.handshake_timeout;
                    futures::StreamExt::map(
                        tonic::transport::server::TcpIncoming::from(self.listener)
                            .with_nodelay(Some(true)),
                        move |conn| conn.map(|io| HandshakeDeadline::new(io, timeout)),
                    )
                },
                stopping,
            );
        let grace_over = async move {
            match deadline_rx.await {
                Ok(deadline) => tokio::time::sleep_until(deadline).await,
                // The server ended without a shutdown signal.
                Err(_) => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            served = served => served.map_err(|source| StartError::Serve { source }),
            () = grace_over => {
                tracing::warn!("shutdown grace over: dropping the requests still in flight");
                Ok(())
            }
        };
        background.cancel();
        for task in tasks {
            task.abort();
        }
        tracing::info!("registry stopped");
        result
    }
}

/// The bytes a client sends first on a new connection before the server has anything to
/// do for it: the HTTP/2 connection preface (or, with TLS, at least as many bytes of its
/// handshake, which the TLS acceptor's own timeout then bounds).
const PREFACE_LEN: usize = 24;

pin_project_lite::pin_project! {
    /// An accepted connection that must deliver its first [`PREFACE_LEN`] bytes within a
    /// deadline: until they arrived, reads fail with `TimedOut` once the deadline passed,
    /// so hyper drops a connection that never starts its handshake instead of holding it.
    struct HandshakeDeadline {
        #[pin]
        io: tokio::net::TcpStream,
        deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        awaiting: usize,
    }
}

impl HandshakeDeadline {
    fn new(io: tokio::net::TcpStream, timeout: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            awaiting: PREFACE_LEN,
        }
    }
}

impl tonic::transport::server::Connected for HandshakeDeadline {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for HandshakeDeadline {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let std::task::Poll::Ready(Ok(())) = &polled {
                let got = buf.filled().len() - before;
                *this.awaiting = this.awaiting.saturating_sub(got);
                if *this.awaiting == 0 || got == 0 {
                    // Started (or closed by the peer): no deadline from here on.
                    *this.deadline = None;
                }
            } else if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!("dropping a connection that did not start its handshake in time");
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "handshake timeout (--handshake-timeout-seconds)",
                )));
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for HandshakeDeadline {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
