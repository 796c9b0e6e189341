//! Multipart uploads for `memory://`, with S3's checks: `object_store`'s `InMemory` gives
//! every part the same empty id and completes whatever parts it holds, so an upload
//! there would not show what S3 refuses. [`MemoryParts`] keeps the parts itself, gives
//! each the sha256 of its bytes as its id (as S3 gives a part's checksum), and completes
//! an upload only when the ids it is given are exactly those of the parts it holds at
//! those indexes; then it puts the concatenated parts into the object store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload, PutResult};
use patchport_core::Digest;

const STORE: &str = "MemoryParts";

/// Multipart uploads kept in memory and completed into an object store (see the module
/// doc). Share one instance between every `BlobStore` over the same object store, as S3
/// shares its uploads between registry replicas.
#[derive(Debug)]
pub struct MemoryParts {
    objects: Arc<dyn ObjectStore>,
    uploads: Mutex<Uploads>,
}

#[derive(Debug, Default)]
struct Uploads {
    next_id: u64,
    /// Per upload: its key and its parts by index.
    open: HashMap<String, (Path, Vec<Option<Part>>)>,
}

/// A part's bytes and content id.
type Part = (Bytes, String);

impl MemoryParts {
    /// Multipart uploads that complete into `objects`.
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self {
            objects,
            uploads: Mutex::default(),
        }
    }

    /// How many uploads are open (neither completed nor aborted).
    pub fn open_uploads(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> MutexGuard<'_, Uploads> {
        self.uploads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn not_found(id: &str) -> object_store::Error {
    object_store::Error::NotFound {
        path: id.to_owned(),
        source: format!("no multipart upload {id}").into(),
    }
}

fn invalid_part(detail: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: format!("InvalidPart: {detail}").into(),
    }
}

#[async_trait]
impl MultipartStore for MemoryParts {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let mut uploads = self.lock();
        uploads.next_id += 1;
        let id = format!("memory-{}", uploads.next_id);
        uploads.open.insert(id.clone(), (path.clone(), Vec::new()));
        Ok(id)
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let bytes: Bytes = data.into();
        let content_id = Digest::of(&bytes).hex();
        let mut uploads = self.lock();
        let (key, parts) = uploads.open.get_mut(id).ok_or_else(|| not_found(id))?;
        if key != path {
            return Err(not_found(id));
        }
        if part_idx >= parts.len() {
            parts.resize(part_idx + 1, None);
        }
        if let Some(slot) = parts.get_mut(part_idx) {
            *slot = Some((bytes, content_id.clone()));
        }
        Ok(PartId { content_id })
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let body = {
            let uploads = self.lock();
            let (key, stored) = uploads.open.get(id).ok_or_else(|| not_found(id))?;
            if key != path {
                return Err(not_found(id));
            }
            let mut body = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match stored.get(i) {
                    Some(Some((bytes, content_id))) if *content_id == part.content_id => {
                        body.push(bytes.clone());
                    }
                    _ => return Err(invalid_part(format!("part {i} is not the one named"))),
                }
            }
            body
        };
        let result = self
            .objects
            .put(path, body.into_iter().collect::<PutPayload>())
            .await?;
        self.lock().open.remove(id);
        Ok(result)
    }

    async fn abort_multipart(&self, _path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.lock()
            .open
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| not_found(id))
    }
}
