//! The patchport client library: scan and hash a directory, upload only what the
//! registry lacks (resuming cut uploads from the committed offset), record the version,
//! and pull any version back with every byte verified against its digest.
//!
//! Architecture invariant: this crate only speaks the gRPC API (`patchport-proto`); it
//! never touches a database or object store, so it is what remote workers and every CLI
//! command use.

mod pull;
mod push;

use std::time::Duration;

use patchport_proto::v1::{
    blob_service_client::BlobServiceClient, event_service_client::EventServiceClient,
    port_service_client::PortServiceClient, registry_service_client::RegistryServiceClient,
    worker_service_client::WorkerServiceClient,
};
use tonic::transport::{Channel, Endpoint};

pub use pull::PullOutcome;
pub use push::{FileToPush, PushKind, PushOutcome, scan_dir};

/// The default registry address.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:50051";
/// Largest gRPC message the client sends or accepts.
const MAX_MESSAGE: usize = 16 << 20;
/// Largest upload chunk the client sends.
const CHUNK: usize = 4 << 20;

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry URL is not valid.
    #[error("invalid registry URL {url:?}")]
    BadUrl {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The registry could not be reached.
    #[error("cannot connect to the registry at {url}: is `patchport serve` running there?")]
    Connect {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The registry answered with an error.
    #[error("{}", .status.message())]
    Status {
        /// The gRPC status.
        #[from]
        status: tonic::Status,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Downloaded bytes do not match their digest.
    #[error("{path}: downloaded bytes hash to {actual}, expected {expected}")]
    DigestMismatch {
        /// The file.
        path: String,
        /// Expected digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Anything else that makes the request impossible.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
}

impl ClientError {
    /// The gRPC code, when the registry answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status { status } => Some(status.code()),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// Progress of one transfer (the CLI draws bars; tests pass [`NoProgress`]).
pub trait Progress: Send + Sync {
    /// A transfer of `total` bytes starts.
    fn start(&self, label: &str, total: u64);
    /// `n` more bytes moved.
    fn advance(&self, n: u64);
    /// The transfer ended.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A connection to a registry.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    blobs: BlobServiceClient<Channel>,
    registry: RegistryServiceClient<Channel>,
    ports: PortServiceClient<Channel>,
    events: EventServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
}

impl Client {
    /// Connects to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| ClientError::BadUrl {
                url: url.to_owned(),
                source,
            })?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self::from_channel(url, channel))
    }

    /// A client over an existing channel.
    pub fn from_channel(url: &str, channel: Channel) -> Self {
        Self {
            url: url.to_owned(),
            blobs: BlobServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            registry: RegistryServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            ports: PortServiceClient::new(channel.clone()),
            events: EventServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        }
    }

    /// The registry URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The raw blob service client.
    pub fn blobs(&self) -> BlobServiceClient<Channel> {
        self.blobs.clone()
    }

    /// The raw registry service client.
    pub fn registry(&self) -> RegistryServiceClient<Channel> {
        self.registry.clone()
    }

    /// The raw port service client.
    pub fn ports(&self) -> PortServiceClient<Channel> {
        self.ports.clone()
    }

    /// The raw event service client.
    pub fn events(&self) -> EventServiceClient<Channel> {
        self.events.clone()
    }

    /// The raw worker service client.
    pub fn workers(&self) -> WorkerServiceClient<Channel> {
        self.workers.clone()
    }
}
