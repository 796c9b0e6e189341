//! `Application::build(config)` binds first and exposes its address; `run_until` serves
//! until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;

use patchport_proto::v1::{
    blob_service_server::BlobServiceServer, event_service_server::EventServiceServer,
    port_service_server::PortServiceServer, registry_service_server::RegistryServiceServer,
    worker_service_server::WorkerServiceServer,
};
use patchport_store::blobs::BlobStore;
use patchport_store::meta;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::service::blobs::{Blobs, MAX_CHUNK};
use crate::service::events::Events;
use crate::service::ports::Ports;
use crate::service::registry::Versions;
use crate::service::workers::Workers;
use crate::state::Registry;

/// Largest gRPC message accepted or sent (a chunk plus framing).
const MAX_MESSAGE: usize = (MAX_CHUNK as usize) + (1 << 20);

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
            registry: Registry { meta, blobs },
            lease: config.lease,
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
        let blobs = BlobServiceServer::new(Blobs {
            registry: self.registry.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
        let versions = RegistryServiceServer::new(Versions {
            registry: self.registry.clone(),
        })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
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
            tokio::spawn(async move {
                let period = (self.lease / 4).clamp(
                    std::time::Duration::from_millis(250),
                    std::time::Duration::from_secs(2),
                );
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
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
        let served = tonic::transport::Server::builder()
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
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            )
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
