//! The blob store's error type and its small closed set of kinds.

use std::path::PathBuf;

use patchport_core::Digest;

/// What went wrong, coarsely: the gRPC layer maps each kind to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobErrorKind {
    /// No such blob or upload session.
    NotFound,
    /// The request itself is wrong: digest or size mismatch, bad offset, bad url, bad id,
    /// a chunk past the declared size.
    InvalidArgument,
    /// The request is valid but the upload is not in a state that allows it (a commit of
    /// an incomplete upload, an upload that changed while it was committed).
    FailedPrecondition,
    /// The storage backend failed in a way that may pass (a network or server error, an
    /// IO error); no blob was stored, and the request may be retried. The details are
    /// for the log, not for the client.
    Unavailable,
    /// The storage backend failed; the details are for the log, not for the client.
    Internal,
}

/// An error of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob store url could not be understood.
    #[error("invalid blob store url {url:?}: {reason}")]
    InvalidUrl {
        /// The rejected url.
        url: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The backend named by a valid url could not be configured.
    #[error("cannot open blob store {url:?}")]
    Configure {
        /// The url.
        url: String,
        /// The backend's error.
        #[source]
        source: object_store::Error,
    },

    /// The directory of a `file://` blob store could not be created.
    #[error("cannot create blob directory {path:?}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },

    /// No blob with this digest is stored.
    #[error("blob {digest} not found")]
    BlobNotFound {
        /// The digest asked for.
        digest: Digest,
    },

    /// No upload session with this id exists (never started, committed long ago and
    /// expired, or deleted after a digest mismatch).
    #[error("upload {upload_id} not found")]
    UploadNotFound {
        /// The id asked for.
        upload_id: String,
    },

    /// A string that is not an upload id.
    #[error("invalid upload id {upload_id:?}: expected 32 lowercase hex digits")]
    InvalidUploadId {
        /// The rejected id (truncated to 100 characters).
        upload_id: String,
    },

    /// A chunk did not start where the upload stands.
    #[error("upload {upload_id}: chunk at offset {offset}, expected offset {expected}")]
    WrongOffset {
        /// The upload.
        upload_id: String,
        /// The offset the chunk named.
        offset: u64,
        /// The offset the next chunk must name.
        expected: u64,
    },

    /// A chunk would end past the size declared when the upload started.
    #[error("upload {upload_id}: chunk ends at byte {end}, past the declared size {size}")]
    PastDeclaredSize {
        /// The upload.
        upload_id: String,
        /// Where the chunk would end.
        end: u64,
        /// The declared size.
        size: u64,
    },

    /// A commit of an upload that has not received all its bytes.
    #[error("upload {upload_id} is incomplete: {committed} of {size} declared bytes received")]
    Incomplete {
        /// The upload.
        upload_id: String,
        /// Bytes durably received.
        committed: u64,
        /// The declared size.
        size: u64,
    },

    /// The uploaded bytes do not hash to the declared digest.
    #[error("digest mismatch: declared {declared}, received bytes hash to {actual}")]
    DigestMismatch {
        /// The digest declared when the upload started.
        declared: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },

    /// A size does not match the one declared (or the one stored for an existing blob).
    #[error("size mismatch for {digest}: declared {declared} bytes, found {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The declared size.
        declared: u64,
        /// The actual size.
        actual: u64,
    },

    /// A read starting past the end of a blob.
    #[error("offset {offset} is past the end of blob {digest} ({size} bytes)")]
    OffsetPastEnd {
        /// The blob.
        digest: Digest,
        /// The requested offset.
        offset: u64,
        /// The blob's size.
        size: u64,
    },

    /// The upload's stored bytes changed while it was being committed (another writer on
    /// the same session); the client should ask for the upload's status and resume.
    #[error("upload {upload_id} changed while it was committed: {detail}")]
    UploadChanged {
        /// The upload.
        upload_id: String,
        /// What was seen.
        detail: String,
    },

    /// A session record that cannot be parsed.
    #[error("upload {upload_id}: corrupt session record")]
    CorruptSession {
        /// The upload.
        upload_id: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// The storage backend failed.
    #[error("blob storage failed to {op} {key}")]
    Storage {
        /// What was being done (`get`, `put`, `copy`, ...).
        op: &'static str,
        /// The object key.
        key: String,
        /// The backend's error.
        #[source]
        source: object_store::Error,
    },

    /// The store was opened without multipart uploads (and is not `file://`), so it
    /// cannot take uploads.
    #[error("this blob store takes no uploads: {store} has no multipart uploads")]
    UploadsUnsupported {
        /// The backend.
        store: String,
    },

    /// A blocking hashing task did not finish.
    #[error("hashing task failed")]
    Task {
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl BlobError {
    /// The kind of this error, for the one mapping to a gRPC status.
    pub fn kind(&self) -> BlobErrorKind {
        match self {
            Self::BlobNotFound { .. } | Self::UploadNotFound { .. } => BlobErrorKind::NotFound,
            Self::InvalidUrl { .. }
            | Self::Configure { .. }
            | Self::InvalidUploadId { .. }
            | Self::WrongOffset { .. }
            | Self::PastDeclaredSize { .. }
            | Self::DigestMismatch { .. }
            | Self::SizeMismatch { .. }
            | Self::OffsetPastEnd { .. } => BlobErrorKind::InvalidArgument,
            Self::Incomplete { .. } | Self::UploadChanged { .. } => {
                BlobErrorKind::FailedPrecondition
            }
            Self::Storage { source, .. } if is_transient(source) => BlobErrorKind::Unavailable,
            Self::CreateDir { .. }
            | Self::CorruptSession { .. }
            | Self::Storage { .. }
            | Self::UploadsUnsupported { .. }
            | Self::Task { .. } => BlobErrorKind::Internal,
        }
    }

    pub(crate) fn storage(
        op: &'static str,
        key: &object_store::path::Path,
        source: object_store::Error,
    ) -> Self {
        Self::Storage {
            op,
            key: key.to_string(),
            source,
        }
    }
}

/// Backend errors that may pass: `Generic` is what `object_store` returns for network,
/// HTTP server and IO failures (its HTTP stores have retried already). Everything else
/// (NotFound, AlreadyExists, Precondition, PermissionDenied, Unauthenticated, invalid
/// paths, unsupported operations) answers the same every time.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}
