//! The catalogue: the `Catalogue` trait over base and patch versions, lineage, files and
//! tensor indexes. The SQL is in `sql/catalogue.rs`. Every change writes its audit row
//! (`audit`, outcome `ok`; for a push the store fills in the digest and whether it was
//! created) in its own transaction.

use patchport_core::{Digest, Name, VersionRef};

use super::{
    AuditRecord, BaseVersionRecord, BlobIndex, ListFilter, NewBaseVersion, NewPatchVersion, Paged,
    PatchVersionRecord, StoreError,
};

/// The catalogue: base and patch versions, their lineage, files and tensor indexes.
/// Publishing a base fans out and pushing a patch catches up, in the same transaction
/// (through the queue's tables), with their events.
#[async_trait::async_trait]
pub trait Catalogue: Send + Sync {
    /// Inserts a base version; `Ok((record, false))` when the same content already
    /// exists under that name and version. Fails with AlreadyExists on other content
    /// and NotFound on an unknown parent.
    async fn insert_base_version(
        &self,
        new: NewBaseVersion,
        audit: &AuditRecord,
    ) -> Result<(BaseVersionRecord, bool), StoreError>;
    /// A base version by version or digest.
    async fn get_base_version(
        &self,
        name: &Name,
        version: &VersionRef,
    ) -> Result<Option<BaseVersionRecord>, StoreError>;
    /// Base versions, by name then creation, one page of them (`filter.page`).
    async fn list_base_versions(
        &self,
        filter: &ListFilter,
    ) -> Result<Paged<BaseVersionRecord>, StoreError>;
    /// Marks a base version yanked.
    async fn yank_base_version(
        &self,
        name: &Name,
        version: &VersionRef,
        reason: &str,
        audit: &AuditRecord,
    ) -> Result<BaseVersionRecord, StoreError>;
    /// Inserts a patch version (see `insert_base_version`); NotFound on an unknown base.
    async fn insert_patch_version(
        &self,
        new: NewPatchVersion,
        audit: &AuditRecord,
    ) -> Result<(PatchVersionRecord, bool), StoreError>;
    /// A patch version by version or digest.
    async fn get_patch_version(
        &self,
        name: &Name,
        version: &VersionRef,
    ) -> Result<Option<PatchVersionRecord>, StoreError>;
    /// Patch versions, by name then creation (by creation alone with `on_base`), one page
    /// of them (`filter.page`).
    async fn list_patch_versions(
        &self,
        filter: &ListFilter,
    ) -> Result<Paged<PatchVersionRecord>, StoreError>;
    /// Marks a patch version yanked.
    async fn yank_patch_version(
        &self,
        name: &Name,
        version: &VersionRef,
        reason: &str,
        audit: &AuditRecord,
    ) -> Result<PatchVersionRecord, StoreError>;
    /// The stored tensor index of a blob.
    async fn get_blob_index(&self, blob: &Digest) -> Result<Option<BlobIndex>, StoreError>;
    /// Stores the tensor index of a blob (idempotent).
    async fn put_blob_index(&self, blob: &Digest, index: &BlobIndex) -> Result<(), StoreError>;
}
