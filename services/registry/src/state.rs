//! The registry's shared state: the two stores every handler needs, access control and
//! limits.

use std::sync::Arc;

use patchport_store::blobs::BlobStore;
use patchport_store::meta::MetadataStore;

use crate::auth::Auth;
use crate::limits::Limits;

/// Stores shared by every service (cheap to clone).
#[derive(Debug, Clone)]
pub struct Registry {
    /// Versions, files, indexes.
    pub meta: Arc<dyn MetadataStore>,
    /// Bytes.
    pub blobs: BlobStore,
    /// Who may do what.
    pub auth: Auth,
    /// Request limits.
    pub limits: Arc<Limits>,
    /// The key that signs versions and ports (`None`: nothing is signed).
    pub signing: crate::signing::Keys,
    /// Tensor indexes of uploads indexed as they arrived, until their commit.
    pub(crate) upload_indexes: Arc<crate::ingest::UploadIndexes>,
}
