//! Push validation and indexing: what turns a list of uploaded blobs into a base or patch
//! version. Everything is checked before the one metadata transaction that makes the
//! version visible, so a failed push leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures::StreamExt;
use patchport_core::adapter::AdapterConfig;
use patchport_core::layout::{
    self, ADAPTER_CONFIG, ADAPTER_WEIGHTS, FileRef, MODEL_CONFIG, SHARD_INDEX, ShardIndex,
    TensorIndexer, TensorRecord,
};
use patchport_core::model_config::ModelConfig;
use patchport_core::safetensors::{Header, SafetensorsError};
use patchport_core::{Digest, Name, Reference, Version, VersionRef};
use patchport_store::meta::{BlobIndex, NewBaseVersion, NewPatchVersion};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::limits::Limits;
use crate::service::blobs::BlockingSink;
use crate::state::Registry;

/// Largest JSON file (config, adapter config, shard index) read into memory.
pub(crate) const MAX_JSON_FILE: u64 = 16 << 20;
/// Largest eval set (JSONL) stored with a patch version.
pub(crate) const MAX_EVAL_SET: u64 = 64 << 20;
/// Most files in one version.
pub(crate) const MAX_FILES: usize = 10_000;

/// The tensor index of a safetensors file of `size` bytes, given in order: the one
/// indexing path of a read-back ([`Registry::blob_index`]) and of an upload stream
/// ([`StreamIndexer`]).
fn index_bytes(
    size: u64,
    chunks: &mut dyn Iterator<Item = Bytes>,
) -> Result<(Header, Vec<TensorRecord>), SafetensorsError> {
    let mut ix = TensorIndexer::new(size);
    for chunk in chunks {
        ix.feed(&chunk)?;
    }
    ix.finish()
}

/// Indexes an upload stream's bytes while they arrive, so that the push that names the
/// blob finds its tensor index stored and reads nothing back. Only a stream that starts
/// the upload (offset 0) and carries it to its end yields an index, and only one within
/// the limits; anything else (a resumed upload, a file that is not safetensors, a
/// header over `--max-header-bytes`) yields none, and the push indexes the blob itself,
/// with its errors.
pub(crate) struct StreamIndexer {
    sink: BlockingSink<Result<(Header, Vec<TensorRecord>), SafetensorsError>>,
    size: u64,
    fed: u64,
}

impl StreamIndexer {
    /// An indexer for an upload of `size` bytes whose stream starts with `first` at
    /// `offset` while `committed` bytes are already stored; `None` when it cannot
    /// index the whole file from here.
    pub(crate) fn start(
        first: &[u8],
        offset: u64,
        committed: u64,
        size: u64,
        limits: &Limits,
    ) -> Option<Self> {
        if offset != 0 || committed != 0 {
            return None;
        }
        let declared = patchport_core::safetensors::json_len(first, size).ok()?;
        if declared > limits.max_header_bytes {
            return None;
        }
        let sink = BlockingSink::spawn(move |chunks| index_bytes(size, chunks));
        Some(Self { sink, size, fed: 0 })
    }

    /// Feeds the chunk the upload stored at `offset`; false when this stream can no
    /// longer be indexed (not contiguous, or not a safetensors file).
    pub(crate) async fn feed(&mut self, offset: u64, chunk: Bytes) -> bool {
        if offset != self.fed {
            return false;
        }
        self.fed += chunk.len() as u64;
        self.sink.send(chunk).await
    }

    /// The index, when the stream carried every byte and they are a safetensors file
    /// within the limits.
    pub(crate) async fn finish(self, limits: &Limits) -> Option<BlobIndex> {
        if self.fed != self.size {
            return None;
        }
        let (header, tensors) = self.sink.finish().await.ok()?.ok()?;
        (tensors.len() <= limits.max_tensors).then_some(BlobIndex {
            json_len: header.json_len,
            tensors,
        })
    }
}

/// Indexes made by [`StreamIndexer`] for uploads not yet committed, by upload id; the
/// commit that verifies the digest stores its index. Bounded in entries and in tensors
/// (uncommitted uploads must not pin memory): the oldest is dropped, and its push
/// indexes the blob by reading it back.
#[derive(Debug, Default)]
pub(crate) struct UploadIndexes {
    pending: std::sync::Mutex<std::collections::VecDeque<(String, Digest, BlobIndex)>>,
}

/// Most indexes held for uncommitted uploads.
const MAX_PENDING_INDEXES: usize = 64;
/// Most tensor records in all of them together.
const MAX_PENDING_TENSORS: usize = 200_000;

impl UploadIndexes {
    /// Keeps the index of upload `upload_id` (of declared `digest`) until its commit.
    pub(crate) fn insert(&self, upload_id: String, digest: Digest, index: BlobIndex) {
        if index.tensors.len() > MAX_PENDING_TENSORS {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|(id, _, _)| *id != upload_id);
        let mut tensors: usize = pending.iter().map(|(_, _, ix)| ix.tensors.len()).sum();
        while pending.len() >= MAX_PENDING_INDEXES
            || tensors + index.tensors.len() > MAX_PENDING_TENSORS
        {
            let Some((_, _, dropped)) = pending.pop_front() else {
                break;
            };
            tensors -= dropped.tensors.len();
        }
        pending.push_back((upload_id, digest, index));
    }

    /// Takes the index of upload `upload_id`, with the digest it was declared for.
    pub(crate) fn take(&self, upload_id: &str) -> Option<(Digest, BlobIndex)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let at = pending.iter().position(|(id, _, _)| id == upload_id)?;
        pending.remove(at).map(|(_, digest, index)| (digest, index))
    }
}

/// The refusal of a file whose blob is not there (for the caller).
fn not_uploaded(f: &FileRef) -> ApiError {
    ApiError::precondition(format!(
        "file {:?}: blob {} has not been uploaded; upload it before pushing the version",
        f.path, f.digest
    ))
}

impl Registry {
    /// Checks that every file's blob is stored with the declared size and that `who` may
    /// reference it (uploaded it, or may read a version that holds it); a blob it may not
    /// see is answered as not uploaded, stored or not.
    async fn check_blobs(&self, who: &Principal, files: &[FileRef]) -> ApiResult<()> {
        if files.len() > MAX_FILES {
            return Err(ApiError::invalid(format!(
                "{} files in one version; the limit is {MAX_FILES}",
                files.len()
            )));
        }
        let digests: Vec<Digest> = files.iter().map(|f| f.digest).collect();
        let visible = self.auth.visible_blobs(who, &digests).await?;
        if let Some(f) = files.iter().find(|f| !visible.contains(&f.digest)) {
            return Err(not_uploaded(f));
        }
        let blobs = self.blobs.clone();
        let lookups = digests.into_iter().map(move |digest| {
            let blobs = blobs.clone();
            async move { blobs.size(&digest).await }
        });
        let sizes: Vec<_> = futures::stream::iter(lookups).buffered(16).collect().await;
        for (f, size) in files.iter().zip(sizes) {
            match size? {
                None => return Err(not_uploaded(f)),
                Some(s) if s != f.size => {
                    return Err(ApiError::invalid(format!(
                        "file {:?}: declared size {} but blob {} has {} bytes",
                        f.path, f.size, f.digest, s
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Reads a small JSON file of a push.
    async fn read_json(&self, f: &FileRef) -> ApiResult<Bytes> {
        if f.size > MAX_JSON_FILE {
            return Err(ApiError::invalid(format!(
                "{}: {} bytes; JSON files are limited to {MAX_JSON_FILE} bytes",
                f.path, f.size
            )));
        }
        Ok(self.blobs.read_all(&f.digest).await?)
    }

    /// The tensor index of a safetensors blob, computed once per blob (streamed through
    /// a blocking thread) and cached in the metadata store.
    pub(crate) async fn blob_index(&self, f: &FileRef) -> ApiResult<BlobIndex> {
        if let Some(ix) = self.meta.get_blob_index(&f.digest).await? {
            return Ok(ix);
        }
        let limits = self.limits.clone();
        if f.size >= 8 {
            let prefix = self.blobs.read_bytes(&f.digest, 0, 8).await?;
            let declared = prefix
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes);
            // A length past the end of the file is malformed (the indexer says so); one
            // that fits but exceeds the limit is refused as too large.
            if declared > limits.max_header_bytes && declared <= f.size - 8 {
                return Err(ApiError::exhausted(format!(
                    "{}: safetensors header of {declared} bytes; the limit is {} (--max-header-bytes)",
                    f.path, limits.max_header_bytes
                )));
            }
        }
        let size = f.size;
        let stream = self.blobs.read(&f.digest, 0, None).await?;
        let indexed = crate::service::blobs::consume_blocking(stream, move |chunks| {
            index_bytes(size, chunks)
        })
        .await?;
        let (header, tensors) =
            indexed.map_err(|e| ApiError::invalid(format!("{}: {e}", f.path)))?;
        if tensors.len() > limits.max_tensors {
            return Err(ApiError::exhausted(format!(
                "{}: {} tensors; the limit is {} (--max-tensors)",
                f.path,
                tensors.len(),
                limits.max_tensors
            )));
        }
        let ix = BlobIndex {
            json_len: header.json_len,
            tensors,
        };
        self.meta.put_blob_index(&f.digest, &ix).await?;
        Ok(ix)
    }

    /// Indexes every safetensors file; returns tensor names per file and the total count.
    async fn index_files(
        &self,
        files: &[FileRef],
    ) -> ApiResult<(BTreeMap<String, BlobIndex>, u64)> {
        let mut out = BTreeMap::new();
        let mut count = 0;
        for f in files.iter().filter(|f| layout::is_safetensors(&f.path)) {
            let ix = self.blob_index(f).await?;
            count += ix.tensors.len() as u64;
            out.insert(f.path.clone(), ix);
        }
        Ok((out, count))
    }

    /// What a base push is checked for before any blob is read (all of a
    /// `validate_only` push): paths, the required files, the parent. Returns the files
    /// sorted.
    pub(crate) async fn check_base_manifest(
        &self,
        name: &Name,
        parent: Option<&VersionRef>,
        files: Vec<FileRef>,
    ) -> ApiResult<Vec<FileRef>> {
        let files = layout::normalize_files(files)?;
        layout::check_base_files(&files)?;
        if let Some(p) = parent
            && self.meta.get_base_version(name, p).await?.is_none()
        {
            return Err(ApiError::not_found(format!(
                "parent version {name}:{p} not found (request field parent): push the parent version first"
            )));
        }
        Ok(files)
    }

    /// What a patch push is checked for before any blob is read (all of a
    /// `validate_only` push): paths, the required files, the base. Returns the files
    /// sorted and the base.
    pub(crate) async fn check_patch_manifest(
        &self,
        base: &Reference,
        files: Vec<FileRef>,
    ) -> ApiResult<(Vec<FileRef>, patchport_store::meta::BaseVersionRecord)> {
        let files = layout::normalize_files(files)?;
        layout::check_patch_files(&files)?;
        let Some(base_rec) = self
            .meta
            .get_base_version(&base.name, &base.version)
            .await?
        else {
            return Err(ApiError::not_found(format!(
                "base version {base} not found (request field base): push the base version first"
            )));
        };
        Ok((files, base_rec))
    }

    /// A patch made for another model class than the base's is refused (kind
    /// `architecture`) unless the caller allows it and its LoRA modules line up with the
    /// base's tensors by name and shape.
    async fn check_architecture(
        &self,
        adapter: &AdapterConfig,
        adapter_index: Option<&BlobIndex>,
        base: &patchport_store::meta::BaseVersionRecord,
        allow_mismatch: bool,
    ) -> ApiResult<()> {
        let base_config = ModelConfig::parse(base.config_json.as_bytes())
            .map_err(|e| ApiError::internal("reading a stored base config", e))?;
        let Some(mut refusal) =
            patchport_core::adapter::architecture_refusal(adapter, &base_config)
        else {
            return Ok(());
        };
        if !allow_mismatch {
            refusal.message.push_str(
                "; set allow_architecture_mismatch to push it anyway when its modules and shapes line up with the base",
            );
            return Err(ApiError::refused(vec![refusal]));
        }
        let shapes = |ix: &BlobIndex| {
            ix.tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let adapter_shapes = adapter_index.map(shapes).unwrap_or_default();
        let mut base_shapes = BTreeMap::new();
        for f in base
            .files
            .iter()
            .filter(|f| layout::is_safetensors(&f.path))
        {
            base_shapes.extend(shapes(&self.blob_index(f).await?));
        }
        let refusals =
            patchport_core::adapter::lineup_refusals(adapter, &adapter_shapes, &base_shapes);
        if refusals.is_empty() {
            tracing::info!(
                base = %format!("{}:{}", base.name, base.version),
                "architecture mismatch allowed: every LoRA module lines up with the base"
            );
            return Ok(());
        }
        let mut all = vec![refusal];
        all.extend(refusals);
        Err(ApiError::refused(all))
    }

    /// Validates, indexes and records a base version.
    pub(crate) async fn push_base(
        &self,
        who: &Principal,
        name: Name,
        version: Version,
        parent: Option<VersionRef>,
        files: Vec<FileRef>,
        audit: &patchport_store::meta::AuditRecord,
    ) -> ApiResult<(patchport_store::meta::BaseVersionRecord, bool)> {
        let files = self
            .check_base_manifest(&name, parent.as_ref(), files)
            .await?;
        self.check_blobs(who, &files).await?;
        let config_file = files
            .iter()
            .find(|f| f.path == MODEL_CONFIG)
            .ok_or_else(|| ApiError::invalid("missing config.json"))?;
        let config_bytes = self.read_json(config_file).await?;
        let config =
            ModelConfig::parse(&config_bytes).map_err(|e| ApiError::invalid(e.to_string()))?;
        let config_json = String::from_utf8(config_bytes.to_vec())
            .map_err(|_| ApiError::invalid("config.json is not UTF-8"))?;
        let (indexes, tensor_count) = self.index_files(&files).await?;
        if let Some(ix_file) = files.iter().find(|f| f.path == SHARD_INDEX) {
            let shard_index = ShardIndex::parse(&self.read_json(ix_file).await?)?;
            let shards: BTreeMap<String, BTreeSet<String>> = indexes
                .iter()
                .map(|(path, ix)| {
                    (
                        path.clone(),
                        ix.tensors.iter().map(|t| t.name.clone()).collect(),
                    )
                })
                .collect();
            shard_index.check(&shards)?;
        }
        let digest = layout::manifest_digest("base", &files);
        let new = NewBaseVersion {
            name,
            version,
            digest,
            parent,
            files,
            config_json,
            model_type: config.model_type,
            tensor_count,
        };
        Ok(self.meta.insert_base_version(new, audit).await?)
    }

    /// Validates, indexes and records a patch version pinned to a stored base version.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn push_patch(
        &self,
        who: &Principal,
        push: crate::service::registry::PushPatch,
        audit: &patchport_store::meta::AuditRecord,
    ) -> ApiResult<(patchport_store::meta::PatchVersionRecord, bool)> {
        let crate::service::registry::PushPatch {
            name,
            version,
            base,
            files,
            eval_digest,
            allow_architecture_mismatch,
        } = push;
        let (files, base_rec) = self.check_patch_manifest(&base, files).await?;
        self.check_blobs(who, &files).await?;
        if let Some(d) = &eval_digest
            && (!self.auth.may_read_blob(who, d).await? || !self.blobs.contains(d).await?)
        {
            return Err(ApiError::precondition(format!(
                "eval set blob {d} has not been uploaded"
            )));
        }
        if let Some(d) = &eval_digest {
            let size = self.blobs.size(d).await?.unwrap_or(0);
            if size > MAX_EVAL_SET {
                return Err(ApiError::invalid(format!(
                    "eval set of {size} bytes; the limit is {MAX_EVAL_SET}"
                )));
            }
            let bytes = self.blobs.read_all(d).await?;
            patchport_core::evalset::EvalSet::parse(&bytes)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        let config_file = files
            .iter()
            .find(|f| f.path == ADAPTER_CONFIG)
            .ok_or_else(|| ApiError::invalid("missing adapter_config.json"))?;
        let config_bytes = self.read_json(config_file).await?;
        // Compiling the rank and alpha patterns is bounded but CPU work: off the runtime.
        let parsing = config_bytes.clone();
        let adapter = tokio::task::spawn_blocking(move || AdapterConfig::parse(&parsing))
            .await
            .map_err(|e| ApiError::internal("parsing adapter_config.json", e))?
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let adapter_json = String::from_utf8(config_bytes.to_vec())
            .map_err(|_| ApiError::invalid("adapter_config.json is not UTF-8"))?;
        let (indexes, tensor_count) = self.index_files(&files).await?;
        if let Some(ix) = indexes.get(ADAPTER_WEIGHTS)
            && let Some(t) = ix.tensors.iter().find(|t| t.non_finite > 0)
        {
            return Err(ApiError::invalid(format!(
                "{ADAPTER_WEIGHTS}: tensor {:?} has {} NaN or infinite values; a patch must be finite",
                t.name, t.non_finite
            )));
        }
        self.check_architecture(
            &adapter,
            indexes.get(ADAPTER_WEIGHTS),
            &base_rec,
            allow_architecture_mismatch,
        )
        .await?;
        let digest = layout::manifest_digest("patch", &files);
        let new = NewPatchVersion {
            name,
            version,
            digest,
            base_name: base.name,
            base: base.version,
            files,
            adapter_json,
            peft_type: adapter.peft_type,
            tensor_count,
            eval_digest,
        };
        Ok(self.meta.insert_patch_version(new, audit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(tensors: usize) -> BlobIndex {
        let record = TensorRecord {
            name: "w".into(),
            dtype: "F32".into(),
            shape: vec![1],
            begin: 0,
            end: 4,
            digest: Digest::of(b"w"),
            non_finite: 0,
        };
        BlobIndex {
            json_len: 8,
            tensors: vec![record; tensors],
        }
    }

    #[test]
    fn pending_upload_indexes_are_bounded_and_taken_once() {
        let pending = UploadIndexes::default();
        let digest = Digest::of(b"blob");
        for i in 0..MAX_PENDING_INDEXES + 6 {
            pending.insert(format!("u{i}"), digest, index(1));
        }
        assert!(pending.take("u0").is_none(), "the oldest was dropped");
        let (d, ix) = pending.take("u6").expect("kept");
        assert_eq!((d, ix.tensors.len()), (digest, 1));
        assert!(pending.take("u6").is_none(), "taken once");

        // Tensors are bounded too: a big index pushes the older ones out.
        pending.insert("big".into(), digest, index(MAX_PENDING_TENSORS - 1));
        assert!(pending.take("u7").is_none());
        assert!(pending.take("big").is_some());
        pending.insert("huge".into(), digest, index(MAX_PENDING_TENSORS + 1));
        assert!(
            pending.take("huge").is_none(),
            "over the bound alone: not kept"
        );
    }
}
