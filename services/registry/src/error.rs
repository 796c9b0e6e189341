//! The registry's error type and its one mapping to gRPC status codes.

use patchport_core::layout::LayoutError;
use patchport_core::{DigestError, NameError};
use patchport_proto::convert::WireError;
use patchport_store::blobs::{BlobError, BlobErrorKind};
use patchport_store::meta::{StoreError, StoreErrorKind};
use tonic::{Code, Status};

/// A closed set of failure kinds, each with exactly one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong.
    InvalidArgument,
    /// Something the request names does not exist.
    NotFound,
    /// The name and version exist with other content.
    AlreadyExists,
    /// The request is valid but the registry's state forbids it now.
    FailedPrecondition,
    /// Not offered by this registry.
    Unimplemented,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials without the right scope or namespace.
    PermissionDenied,
    /// A limit or rate was exceeded.
    ResourceExhausted,
    /// A position past the end (an event cursor ahead of the log).
    OutOfRange,
    /// A store the registry needs cannot be reached right now; retrying later may work.
    Unavailable,
    /// A failure of the registry, not of the request.
    Internal,
}

impl ErrorKind {
    /// The gRPC code.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        }
    }
}

/// A registry request failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A user error with a message the user can act on.
    #[error("{message}")]
    User {
        /// Which kind.
        kind: ErrorKind,
        /// What to tell the user.
        message: String,
    },
    /// A request refused for what it carries (a patch made for another architecture):
    /// FAILED_PRECONDITION with the typed reasons in the trailing metadata
    /// (`patchport-refusal-kind`, `patchport-refusals-bin`).
    #[error("{message}")]
    Refused {
        /// The reasons, each with its stable kind.
        refusals: Vec<patchport_core::port::Refusal>,
        /// What to tell the user.
        message: String,
    },
    /// A store that cannot be reached right now (a dropped database connection, an object
    /// store error that may pass): the user gets a generic message and a code that says
    /// retrying may work, the log gets the chain.
    #[error("{store} unavailable")]
    Unavailable {
        /// Which store: `blob storage` or `the metadata database`.
        store: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A storage failure: the user gets a generic message, the log gets the chain.
    #[error("{context}")]
    Internal {
        /// What the registry was doing.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ApiError {
    /// InvalidArgument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::InvalidArgument,
            message: message.into(),
        }
    }

    /// NotFound.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::NotFound,
            message: message.into(),
        }
    }

    /// FailedPrecondition.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::FailedPrecondition,
            message: message.into(),
        }
    }

    /// Unimplemented.
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::Unimplemented,
            message: message.into(),
        }
    }

    /// Unauthenticated.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::Unauthenticated,
            message: message.into(),
        }
    }

    /// PermissionDenied.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::PermissionDenied,
            message: message.into(),
        }
    }

    /// ResourceExhausted.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::User {
            kind: ErrorKind::ResourceExhausted,
            message: message.into(),
        }
    }

    /// Internal, with the cause kept for the log.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Prefixes a user message with context (`model.safetensors: ...`).
    pub fn context(self, prefix: &str) -> Self {
        match self {
            ApiError::User { kind, message } => ApiError::User {
                kind,
                message: format!("{prefix}: {message}"),
            },
            other => other,
        }
    }

    /// A refusal with typed reasons (FAILED_PRECONDITION).
    pub fn refused(refusals: Vec<patchport_core::port::Refusal>) -> Self {
        let message = refusals
            .iter()
            .map(|r| format!("refused ({}): {}", r.kind, r.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self::Refused { refusals, message }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::User { kind, .. } => *kind,
            ApiError::Refused { .. } => ErrorKind::FailedPrecondition,
            ApiError::Unavailable { .. } => ErrorKind::Unavailable,
            ApiError::Internal { .. } => ErrorKind::Internal,
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Trailing metadata key of a refusal's kinds (comma-separated).
pub(crate) const REFUSAL_KIND_KEY: &str = "patchport-refusal-kind";
/// Trailing metadata key of a refusal's reasons (a serialized `patchport.v1.Refusals`).
pub(crate) const REFUSALS_BIN_KEY: &str = "patchport-refusals-bin";

/// The one mapping to gRPC, and the one place request failures are logged: what the
/// caller got wrong (any user kind) at INFO, so it never pages anyone; a store that is
/// unavailable or a failure of the registry at ERROR, with the cause chain.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::User { kind, message } => {
                tracing::info!(code = ?kind.code(), error = %message, "request refused");
                Status::new(kind.code(), message)
            }
            ApiError::Refused { refusals, message } => {
                use prost::Message as _;
                let kinds: Vec<&str> = refusals.iter().map(|r| r.kind.as_str()).collect();
                tracing::info!(code = ?Code::FailedPrecondition, kinds = %kinds.join(","), error = %message, "request refused");
                let mut status = Status::failed_precondition(message);
                let md = status.metadata_mut();
                if let Ok(v) = kinds.join(",").parse() {
                    md.insert(REFUSAL_KIND_KEY, v);
                }
                let wire = patchport_proto::v1::Refusals {
                    refusals: refusals.iter().map(Into::into).collect(),
                };
                md.insert_bin(
                    REFUSALS_BIN_KEY,
                    tonic::metadata::MetadataValue::from_bytes(&wire.encode_to_vec()),
                );
                status
            }
            ApiError::Unavailable { store, .. } => {
                tracing::error!(error = %chain(&e), "store unavailable");
                Status::unavailable(format!("{store} is temporarily unavailable; retry later"))
            }
            ApiError::Internal { ref context, .. } => {
                tracing::error!(error = %chain(&e), "internal error");
                Status::internal(format!(
                    "internal error while {context}; see the registry log"
                ))
            }
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<DigestError> for ApiError {
    fn from(e: DigestError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// A request field that does not parse: InvalidArgument, naming the field.
impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<LayoutError> for ApiError {
    fn from(e: LayoutError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        let kind = match e.kind() {
            BlobErrorKind::NotFound => ErrorKind::NotFound,
            BlobErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
            BlobErrorKind::FailedPrecondition => ErrorKind::FailedPrecondition,
            BlobErrorKind::Unavailable => {
                return ApiError::Unavailable {
                    store: "blob storage",
                    source: e.into(),
                };
            }
            BlobErrorKind::Internal => return ApiError::internal("accessing blob storage", e),
        };
        ApiError::User {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let kind = match e.kind() {
            StoreErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            StoreErrorKind::NotFound => ErrorKind::NotFound,
            StoreErrorKind::FailedPrecondition => ErrorKind::FailedPrecondition,
            StoreErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
            StoreErrorKind::OutOfRange => ErrorKind::OutOfRange,
            StoreErrorKind::Unavailable => {
                return ApiError::Unavailable {
                    store: "the metadata database",
                    source: e.into(),
                };
            }
            StoreErrorKind::Internal => {
                return ApiError::internal("accessing the metadata store", e);
            }
        };
        ApiError::User {
            kind,
            message: e.to_string(),
        }
    }
}

/// Result of a handler.
pub(crate) type ApiResult<T> = Result<T, ApiError>;
