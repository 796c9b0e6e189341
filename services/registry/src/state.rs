//! The registry's shared state: the two stores every handler needs.

use std::sync::Arc;

use patchport_store::blobs::BlobStore;
use patchport_store::meta::MetadataStore;

/// Stores shared by every service (cheap to clone).
#[derive(Debug, Clone)]
pub struct Registry {
    /// Versions, files, indexes.
    pub meta: Arc<dyn MetadataStore>,
    /// Bytes.
    pub blobs: BlobStore,
}
