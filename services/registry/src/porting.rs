//! Running a port against stored versions: the engine reads the bases and the patch
//! through ranged blob reads, merged tensors become blobs, and the artifacts are recorded
//! as files of blobs — the ported adapter reuses the patch's tensor blob (zero new tensor
//! bytes) and the merged model is composed of the new base's bytes plus the merged
//! tensors (DESIGN.md §4).

use std::collections::{BTreeMap, HashMap};
use std::io;

use bytes::Bytes;
use futures::StreamExt;
use patchport_core::layout::{self, ADAPTER_CONFIG, ArtifactFile, BlobRange, FileRef};
use patchport_core::port::METHOD_VERSION;
use patchport_core::{Digest, Hasher, VersionRef};
use patchport_engine::artifact::compose_ranges;
use patchport_engine::{ComposedFile, MergedSink, ModelSource, PortOptions};
use patchport_store::blobs::BlobStore;
use patchport_store::meta::{
    BaseVersionRecord, PatchVersionRecord, PortRecord, PortState, PortUpdate,
};
use tokio::runtime::Handle;

use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// A stored version read through the blob store, from a blocking thread.
#[derive(Debug)]
struct BlobSource {
    name: String,
    handle: Handle,
    blobs: BlobStore,
    files: BTreeMap<String, FileRef>,
    tensor_digests: HashMap<(String, String), Digest>,
}

impl BlobSource {
    async fn new(registry: &Registry, name: String, files: &[FileRef]) -> ApiResult<Self> {
        let mut tensor_digests = HashMap::new();
        for f in files.iter().filter(|f| layout::is_safetensors(&f.path)) {
            let ix = registry.blob_index(f).await?;
            for t in ix.tensors {
                tensor_digests.insert((f.path.clone(), t.name), t.digest);
            }
        }
        Ok(Self {
            name,
            handle: Handle::current(),
            blobs: registry.blobs.clone(),
            files: files.iter().map(|f| (f.path.clone(), f.clone())).collect(),
            tensor_digests,
        })
    }

    fn file(&self, path: &str) -> io::Result<&FileRef> {
        self.files.get(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no file {path}", self.name),
            )
        })
    }
}

impl ModelSource for BlobSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn files(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    fn file_size(&self, path: &str) -> io::Result<u64> {
        Ok(self.file(path)?.size)
    }

    fn read_range(&self, path: &str, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let digest = self.file(path)?.digest;
        buf.clear();
        if end <= begin {
            return Ok(());
        }
        buf.reserve((end - begin) as usize);
        self.handle.block_on(async {
            let mut stream = self
                .blobs
                .read(&digest, begin, Some(end - begin))
                .await
                .map_err(io::Error::other)?;
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk.map_err(io::Error::other)?);
            }
            Ok::<(), io::Error>(())
        })?;
        if buf.len() as u64 != end - begin {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: short read of {path}", self.name),
            ));
        }
        Ok(())
    }

    fn tensor_digest(&self, path: &str, tensor: &str) -> Option<Digest> {
        self.tensor_digests
            .get(&(path.to_owned(), tensor.to_owned()))
            .copied()
    }
}

/// Stores each merged tensor as a blob as the engine produces it.
#[derive(Debug)]
struct BlobSink {
    handle: Handle,
    blobs: BlobStore,
    stored: HashMap<String, (Digest, u64)>,
}

impl MergedSink for BlobSink {
    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let digest = self
            .handle
            .block_on(self.blobs.put_bytes(Bytes::copy_from_slice(bytes)))
            .map_err(io::Error::other)?;
        self.stored
            .insert(name.to_owned(), (digest, bytes.len() as u64));
        Ok(())
    }
}

impl Registry {
    /// Hashes the bytes a composed file's segments produce.
    pub(crate) async fn compose_digest(&self, segments: &[BlobRange]) -> ApiResult<(Digest, u64)> {
        let mut hasher = Hasher::new();
        for s in segments {
            let mut stream = self.blobs.read(&s.digest, s.offset, Some(s.length)).await?;
            while let Some(chunk) = stream.next().await {
                hasher.update(&chunk?);
            }
        }
        let size = hasher.len();
        Ok((hasher.finish(), size))
    }

    /// Turns the engine's composed layout into artifact files of blob ranges.
    async fn store_composed(
        &self,
        new_base: &BaseVersionRecord,
        composed: &[ComposedFile],
        merged: &HashMap<String, (Digest, u64)>,
    ) -> ApiResult<Vec<ArtifactFile>> {
        let base_files: HashMap<&str, &FileRef> = new_base
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        let mut out = Vec::with_capacity(composed.len());
        for c in composed {
            let header = if c.header.is_empty() {
                None
            } else {
                Some(self.blobs.put_bytes(Bytes::from(c.header.clone())).await?)
            };
            let segments =
                compose_ranges(c, header, |p| base_files.get(p).map(|f| f.digest), merged)
                    .map_err(|e| ApiError::internal("composing a merged model", e))?;
            // A file that is one whole blob is stored as that blob.
            let whole = match segments.as_slice() {
                [s] if s.offset == 0 => base_files
                    .values()
                    .find(|f| f.digest == s.digest && f.size == s.length)
                    .map(|f| (f.digest, f.size)),
                _ => None,
            };
            let (file, segments) = match whole {
                Some((digest, size)) => (
                    FileRef {
                        path: c.path.clone(),
                        digest,
                        size,
                    },
                    Vec::new(),
                ),
                None => {
                    let (digest, size) = self.compose_digest(&segments).await?;
                    (
                        FileRef {
                            path: c.path.clone(),
                            digest,
                            size,
                        },
                        segments,
                    )
                }
            };
            out.push(ArtifactFile { file, segments });
        }
        Ok(out)
    }

    /// Ports a stored patch version onto a stored base version now, in this process, and
    /// records the outcome (succeeded with artifacts, or incompatible with reasons).
    pub(crate) async fn run_port(
        &self,
        patch: &PatchVersionRecord,
        base: &BaseVersionRecord,
        merged: bool,
    ) -> ApiResult<PortRecord> {
        let source = self
            .meta
            .get_base_version(&patch.base_name, &VersionRef::Digest(patch.base_digest))
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "base version {}:{} not found",
                    patch.base_name, patch.base_version
                ))
            })?;
        let started_at = patchport_store::meta::now_millis();
        let update = |state: PortState| PortUpdate {
            patch_name: patch.name.clone(),
            patch_version: VersionRef::Digest(patch.digest),
            base_name: base.name.clone(),
            base_version: VersionRef::Version(base.version.clone()),
            method_version: METHOD_VERSION.to_owned(),
            state,
            refusals: Vec::new(),
            diagnostics: None,
            adapter_files: Vec::new(),
            merged_files: Vec::new(),
            attempts: 1,
            error: None,
            started_at: Some(started_at),
            finished_at: None,
        };
        self.meta.save_port(update(PortState::Running)).await?;
        let old = BlobSource::new(
            self,
            format!("{}:{}", source.name, source.version),
            &source.files,
        )
        .await?;
        let new =
            BlobSource::new(self, format!("{}:{}", base.name, base.version), &base.files).await?;
        let adapter = BlobSource::new(
            self,
            format!("{}:{}", patch.name, patch.version),
            &patch.files,
        )
        .await?;
        let opts = PortOptions {
            merged,
            device: patchport_engine::Device::Cpu,
            new_base_name: Some(format!("{}:{}", base.name, base.version)),
            new_base_revision: Some(base.digest.to_string()),
        };
        let mut sink = BlobSink {
            handle: Handle::current(),
            blobs: self.blobs.clone(),
            stored: HashMap::new(),
        };
        let result = tokio::task::spawn_blocking(move || {
            let outcome = patchport_engine::port(
                &old,
                &new,
                &adapter,
                &opts,
                if opts.merged {
                    Some(&mut sink as &mut dyn MergedSink)
                } else {
                    None
                },
            );
            (outcome, sink)
        })
        .await
        .map_err(|e| ApiError::internal("running a port", e))?;
        let (outcome, sink) = result;
        let finished_at = Some(patchport_store::meta::now_millis());
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let mut u = update(PortState::Failed);
                u.error = Some(e.to_string());
                u.finished_at = finished_at;
                return Ok(self.meta.save_port(u).await?);
            }
        };
        let mut u = update(if outcome.is_ported() {
            PortState::Succeeded
        } else {
            PortState::Incompatible
        });
        u.finished_at = finished_at;
        u.refusals = outcome.refusals.clone();
        if let Some(ported) = &outcome.adapter {
            u.diagnostics = Some(outcome.diagnostics.clone());
            let config_digest = self
                .blobs
                .put_bytes(Bytes::from(ported.config_json.clone()))
                .await?;
            for f in &patch.files {
                let file = if f.path == ADAPTER_CONFIG {
                    FileRef {
                        path: f.path.clone(),
                        digest: config_digest,
                        size: ported.config_json.len() as u64,
                    }
                } else {
                    f.clone()
                };
                u.adapter_files.push(ArtifactFile {
                    file,
                    segments: Vec::new(),
                });
            }
            if let Some(composed) = &outcome.merged {
                u.merged_files = self.store_composed(base, composed, &sink.stored).await?;
            }
        }
        Ok(self.meta.save_port(u).await?)
    }
}
