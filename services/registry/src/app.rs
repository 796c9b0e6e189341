//! `Application::build(config)` binds first and exposes its address; `run_until` serves
//! until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;

use patchport_proto::v1::{
    admin_service_server::AdminServiceServer, blob_service_server::BlobServiceServer,
    event_service_server::EventServiceServer, port_service_server::PortServiceServer,
    registry_service_server::RegistryServiceServer, worker_service_server::WorkerServiceServer,
};
use patchport_store::blobs::BlobStore;
use patchport_store::meta;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::auth::{Auth, AuthConfig};
use crate::limits::Limits;
use crate::service::admin::Admin;
use crate::service::blobs::Blobs;
use crate::service::events::Events;
use crate::service::ports::Ports;
use crate::service::registry::Versions;
use crate::service::workers::Workers;
use crate::state::Registry;

/// What the registry serves and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// `postgres://...` or `sqlite://PATH`.
    pub database: String,
    /// `file:///abs/path`, `memory://` or `s3://bucket/prefix`.
    pub blobs: String,
    /// How long a port job's lease lasts without a heartbeat.
    pub lease: std::time::Duration,
    /// Tokens and rate limits.
    pub auth: AuthConfig,
    /// Serve without auth on a non-loopback address (refused otherwise).
    pub insecure_no_auth: bool,
    /// TLS for the gRPC endpoint.
    pub tls: Option<TlsConfig>,
    /// Request limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database: String::new(),
            blobs: String::new(),
            lease: std::time::Duration::from_secs(30),
            auth: AuthConfig::default(),
            insecure_no_auth: false,
            tls: None,
            limits: Limits::default(),
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
}

impl Application {
    /// Opens the stores (running migrations) and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let blobs = BlobStore::from_url(&config.blobs).map_err(|source| StartError::Blobs {
            url: config.blobs.clone(),
            source,
        })?;
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
        Ok(Self {
            listener,
            addr,
            registry: Registry {
                auth: Auth::new(&config.auth, meta.clone()),
                meta,
                blobs,
                limits: std::sync::Arc::new(config.limits),
            },
            lease: config.lease,
            tls: config.tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The stores (for in-process workers and tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves until `shutdown` completes; health turns NOT_SERVING first.
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
        // A chunk plus framing.
        let chunk_message = limits.max_chunk_bytes as usize + (1 << 20);
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
        health_reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        for name in ["patchport.v1.BlobService", "patchport.v1.RegistryService"] {
            health_reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        // The reaper: leases that expired (a worker died) go back to the queue.
        let reaper = {
            let meta = self.registry.meta.clone();
            let blobs = self.registry.blobs.clone();
            let limits = limits.clone();
            tokio::spawn(async move {
                let period = (self.lease / 4).clamp(
                    std::time::Duration::from_millis(250),
                    std::time::Duration::from_secs(2),
                );
                let mut tick = tokio::time::interval(period);
                let ttl = limits.upload_session_ttl;
                let sweep_every = (ttl / 4).clamp(
                    std::time::Duration::from_millis(500),
                    std::time::Duration::from_secs(60),
                );
                let mut last_sweep = std::time::Instant::now();
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
                        Ok(n) => tracing::warn!(jobs = n, "expired leases requeued"),
                        Err(e) => tracing::error!(error = %e, "reaping expired leases failed"),
                    }
                }
            })
        };
        tracing::info!(addr = %self.addr, "registry listening");
        let reporter = health_reporter.clone();
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down");
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
        };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            // Other dependencies enable a second rustls provider; pick ring explicitly.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|source| StartError::Tls { source })?;
        }
        let served = server
            .add_service(health_service)
            .add_service(reflection)
            .add_service(blobs)
            .add_service(versions)
            .add_service(PortServiceServer::new(Ports {
                registry: self.registry.clone(),
            }))
            .add_service(EventServiceServer::new(Events {
                registry: self.registry.clone(),
            }))
            .add_service(
                WorkerServiceServer::new(Workers {
                    registry: self.registry.clone(),
                    lease: self.lease,
                })
                .max_decoding_message_size(limits.max_message_bytes)
                .max_encoding_message_size(limits.max_message_bytes),
            )
            .add_service(AdminServiceServer::new(Admin {
                registry: self.registry.clone(),
            }))
            .serve_with_incoming_shutdown(
                // No Nagle: small request/response pairs (leases, chunk acks) must not
                // wait for delayed ACKs.
                tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .map_err(|source| StartError::Serve { source });
        reaper.abort();
        served
    }
}
