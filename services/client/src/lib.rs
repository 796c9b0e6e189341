//! The patchport client library: scan and hash a directory, upload only what the
//! registry lacks (resuming cut uploads from the committed offset), record the version,
//! and pull any version back with every byte verified against its digest.
//!
//! Architecture invariant: this crate only speaks the gRPC API (`patchport-proto`); it
//! never touches a database or object store, so it is what remote workers and every CLI
//! command use.

mod pull;
mod push;
mod signing;

use std::time::Duration;

use patchport_proto::v1::{
    self, admin_service_client::AdminServiceClient, blob_service_client::BlobServiceClient,
    event_service_client::EventServiceClient, port_service_client::PortServiceClient,
    registry_service_client::RegistryServiceClient, signing_service_client::SigningServiceClient,
    worker_service_client::WorkerServiceClient,
};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use pull::{FileSource, PullOutcome};
pub use push::{FileToPush, PushKind, PushOutcome, list_dir, scan_dir};
pub use signing::{DirVerification, SignatureFiles, verify_dir};

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

/// Adds `authorization: Bearer <token>` to every request when a token is set. Its Debug
/// output never shows the token.
#[derive(Clone, Default)]
pub struct Credentials {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The transport every service client uses: a channel plus credentials.
pub type Transport = InterceptedService<Channel, Credentials>;

/// How to reach a registry: token, TLS trust, and whether a token may cross plain text.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Bearer token (`PATCHPORT_TOKEN`).
    pub token: Option<String>,
    /// PEM CA certificate to trust for `https://` registries (`PATCHPORT_CA_CERT`), in
    /// addition to the webpki roots.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Send the token over plain `http://` to a non-loopback host
    /// (`PATCHPORT_ALLOW_PLAINTEXT_TOKEN=1`); refused otherwise.
    pub allow_plaintext_token: bool,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert_pem", &self.ca_cert_pem.is_some())
            .field("allow_plaintext_token", &self.allow_plaintext_token)
            .finish()
    }
}

impl ClientOptions {
    /// From `PATCHPORT_TOKEN`, `PATCHPORT_CA_CERT` (a file) and
    /// `PATCHPORT_ALLOW_PLAINTEXT_TOKEN`.
    pub fn from_env() -> Result<Self, ClientError> {
        let token = std::env::var("PATCHPORT_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let ca_cert_pem = match std::env::var_os("PATCHPORT_CA_CERT").filter(|v| !v.is_empty()) {
            Some(path) => Some(
                std::fs::read(&path)
                    .map_err(|e| ClientError::io(std::path::Path::new(&path).display(), e))?,
            ),
            None => None,
        };
        let allow_plaintext_token = std::env::var("PATCHPORT_ALLOW_PLAINTEXT_TOKEN")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        Ok(Self {
            token,
            ca_cert_pem,
            allow_plaintext_token,
        })
    }
}

/// Selects rustls' ring provider for this process (other dependencies enable a second
/// provider, and rustls then refuses to guess). Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether `host` (from a URL) is a loopback address or `localhost`.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A connection to a registry.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    blobs: BlobServiceClient<Transport>,
    registry: RegistryServiceClient<Transport>,
    ports: PortServiceClient<Transport>,
    events: EventServiceClient<Transport>,
    workers: WorkerServiceClient<Transport>,
    admin: AdminServiceClient<Transport>,
    signing: SigningServiceClient<Transport>,
}

impl Client {
    /// Connects to `url` (`http://host:port` or `https://host:port`) with
    /// [`ClientOptions::from_env`].
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, ClientOptions::from_env()?).await
    }

    /// Connects to `url` with explicit options.
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let bad_url = |source| ClientError::BadUrl {
            url: url.to_owned(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(bad_url)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        let uri = endpoint.uri().clone();
        let https = uri.scheme_str() == Some("https");
        if https {
            install_tls_provider();
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(pem) = &options.ca_cert_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(host) = uri.host() {
                tls = tls.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
            }
            endpoint = endpoint.tls_config(tls).map_err(bad_url)?;
        } else if options.token.is_some()
            && !options.allow_plaintext_token
            && !uri.host().is_some_and(is_loopback_host)
        {
            return Err(ClientError::Invalid {
                message: format!(
                    "refusing to send a token over plain text to {url}: use https:// (with PATCHPORT_CA_CERT for a private CA), or set PATCHPORT_ALLOW_PLAINTEXT_TOKEN=1 to force it"
                ),
            });
        }
        let header = match &options.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| ClientError::Invalid {
                        message: "the token contains characters that cannot be sent in a header"
                            .to_owned(),
                    })?,
            ),
            None => None,
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self::from_channel(url, channel, Credentials { header }))
    }

    /// A client over an existing channel.
    pub fn from_channel(url: &str, channel: Channel, credentials: Credentials) -> Self {
        let t = |c: &Channel| InterceptedService::new(c.clone(), credentials.clone());
        Self {
            url: url.to_owned(),
            blobs: BlobServiceClient::new(t(&channel))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            registry: RegistryServiceClient::new(t(&channel))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            ports: PortServiceClient::new(t(&channel)),
            events: EventServiceClient::new(t(&channel)),
            admin: AdminServiceClient::new(t(&channel)),
            // Signatures list every file of a model: as large as a registry message.
            signing: SigningServiceClient::new(t(&channel)).max_decoding_message_size(64 << 20),
            workers: WorkerServiceClient::new(t(&channel))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        }
    }

    /// The registry URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The raw blob service client.
    pub fn blobs(&self) -> BlobServiceClient<Transport> {
        self.blobs.clone()
    }

    /// The raw registry service client.
    pub fn registry(&self) -> RegistryServiceClient<Transport> {
        self.registry.clone()
    }

    /// The raw port service client.
    pub fn ports(&self) -> PortServiceClient<Transport> {
        self.ports.clone()
    }

    /// The raw event service client.
    pub fn events(&self) -> EventServiceClient<Transport> {
        self.events.clone()
    }

    /// The raw admin service client.
    pub fn admin(&self) -> AdminServiceClient<Transport> {
        self.admin.clone()
    }

    /// The raw worker service client.
    pub fn workers(&self) -> WorkerServiceClient<Transport> {
        self.workers.clone()
    }

    /// Every base version of a listing (`ListBaseVersions`, page after page).
    pub async fn list_base_versions_all(
        &self,
        mut req: v1::ListRequest,
    ) -> Result<Vec<v1::BaseVersion>, tonic::Status> {
        let mut all = Vec::new();
        loop {
            let page = self
                .registry()
                .list_base_versions(req.clone())
                .await?
                .into_inner();
            all.extend(page.versions);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Every patch version of a listing (`ListPatchVersions`, page after page).
    pub async fn list_patch_versions_all(
        &self,
        mut req: v1::ListRequest,
    ) -> Result<Vec<v1::PatchVersion>, tonic::Status> {
        let mut all = Vec::new();
        loop {
            let page = self
                .registry()
                .list_patch_versions(req.clone())
                .await?
                .into_inner();
            all.extend(page.versions);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Every entry of a compat query (`QueryCompat`, page after page).
    pub async fn query_compat_all(
        &self,
        subject: v1::query_compat_request::Subject,
    ) -> Result<Vec<v1::CompatEntry>, tonic::Status> {
        let mut req = v1::QueryCompatRequest {
            subject: Some(subject),
            page_size: 1000,
            page_token: String::new(),
        };
        let mut all = Vec::new();
        loop {
            let page = self.ports().query_compat(req.clone()).await?.into_inner();
            all.extend(page.entries);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// The raw signing service client.
    pub fn signing(&self) -> SigningServiceClient<Transport> {
        self.signing.clone()
    }
}
