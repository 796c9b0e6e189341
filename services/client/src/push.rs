//! Pushing a directory: check its layout from the file names, hash every file, have the
//! registry check the manifest (`validate_only`), upload the blobs it lacks (resuming
//! from the committed offset after a cut), then record the version in one call.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use patchport_core::{Digest, Hasher};
use patchport_proto::v1;
use tokio_stream::wrappers::ReceiverStream;

use crate::{CHUNK, Client, ClientError, Progress};

/// Attempts per blob before an upload gives up.
const UPLOAD_ATTEMPTS: usize = 5;

/// A local file of a version, hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileToPush {
    /// Path relative to the directory, `/`-separated.
    pub path: String,
    /// Where it is on disk.
    pub local: PathBuf,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// What is pushed.
#[derive(Debug, Clone)]
pub enum PushKind {
    /// A base model version.
    Base {
        /// `namespace/name`.
        name: String,
        /// The version.
        version: String,
        /// The parent version, if any.
        parent: Option<String>,
    },
    /// A patch version.
    Patch {
        /// `namespace/name`.
        name: String,
        /// The version.
        version: String,
        /// The base reference it was trained on.
        base: String,
        /// An eval set file to store with it.
        eval: Option<PathBuf>,
        /// Push onto a base of another architecture when the modules and shapes line up
        /// (`allow_architecture_mismatch`).
        allow_architecture_mismatch: bool,
    },
}

/// The result of a push.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    /// The base version, for a base push.
    pub base: Option<v1::BaseVersion>,
    /// The patch version, for a patch push.
    pub patch: Option<v1::PatchVersion>,
    /// False when an identical version already existed.
    pub created: bool,
    /// Blobs sent.
    pub uploaded_blobs: usize,
    /// Bytes sent.
    pub uploaded_bytes: u64,
    /// Blobs the registry already had.
    pub skipped_blobs: usize,
}

fn hash_file(path: &Path) -> Result<(Digest, u64), ClientError> {
    let mut f = std::fs::File::open(path).map_err(|e| ClientError::io(path.display(), e))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ClientError::io(path.display(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let len = h.len();
    Ok((h.finish(), len))
}

/// Lists every regular file under `dir` as (relative path, local path), sorted by path
/// (following symlinks; entries whose name starts with `.` are skipped, so `.git` and
/// `.cache` never travel). Nothing is read.
pub fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, ClientError> {
    let meta = std::fs::metadata(dir).map_err(|e| ClientError::io(dir.display(), e))?;
    if !meta.is_dir() {
        return Err(ClientError::Invalid {
            message: format!("{} is not a directory", dir.display()),
        });
    }
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&abs).map_err(|e| ClientError::io(abs.display(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ClientError::io(abs.display(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let rel_path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::metadata(&path).map_err(|e| ClientError::io(path.display(), e))?;
            if meta.is_dir() {
                stack.push((path, rel_path));
            } else if meta.is_file() {
                out.push((rel_path, path));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Hashes listed files.
fn hash_files(listed: Vec<(String, PathBuf)>) -> Result<Vec<FileToPush>, ClientError> {
    listed
        .into_iter()
        .map(|(path, local)| {
            let (digest, size) = hash_file(&local)?;
            Ok(FileToPush {
                path,
                local,
                digest,
                size,
            })
        })
        .collect()
}

/// Lists and hashes every regular file under `dir` (as [`list_dir`]).
pub fn scan_dir(dir: &Path) -> Result<Vec<FileToPush>, ClientError> {
    hash_files(list_dir(dir)?)
}

/// Checks a directory's layout from its file names alone, as the registry will: a base
/// needs config.json and *.safetensors, a patch adapter_config.json and
/// adapter_model.safetensors.
fn check_layout(
    dir: &Path,
    kind: &PushKind,
    listed: &[(String, PathBuf)],
) -> Result<(), ClientError> {
    let paths: Vec<&str> = listed.iter().map(|(p, _)| p.as_str()).collect();
    let checked = match kind {
        PushKind::Base { .. } => patchport_core::layout::check_base_paths(&paths),
        PushKind::Patch { .. } => patchport_core::layout::check_patch_paths(&paths),
    };
    checked.map_err(|e| ClientError::Invalid {
        message: format!("{}: {e}; nothing was uploaded", dir.display()),
    })
}

impl Client {
    /// Pushes a directory as a base or patch version.
    pub async fn push_dir(
        &self,
        dir: &Path,
        kind: &PushKind,
        progress: &dyn Progress,
    ) -> Result<PushOutcome, ClientError> {
        // The layout first, from names alone: before hashing or sending a byte.
        let listed = list_dir(dir)?;
        check_layout(dir, kind, &listed)?;
        let files = tokio::task::spawn_blocking(move || hash_files(listed))
            .await
            .map_err(|e| ClientError::Invalid {
                message: format!("hashing task failed: {e}"),
            })??;
        let eval = match kind {
            PushKind::Patch { eval: Some(p), .. } => {
                let p2 = p.clone();
                let (digest, size) = tokio::task::spawn_blocking(move || hash_file(&p2))
                    .await
                    .map_err(|e| ClientError::Invalid {
                    message: format!("hashing task failed: {e}"),
                })??;
                Some(FileToPush {
                    path: "eval.jsonl".to_owned(),
                    local: p.clone(),
                    digest,
                    size,
                })
            }
            _ => None,
        };
        let entries: Vec<v1::FileEntry> = files
            .iter()
            .map(|f| v1::FileEntry {
                path: f.path.clone(),
                digest: f.digest.to_string(),
                size: f.size,
                segments: Vec::new(),
            })
            .collect();
        let eval_digest = eval
            .as_ref()
            .map(|e| e.digest.to_string())
            .unwrap_or_default();
        // The registry checks the manifest (names, layout, parent or base, permission)
        // before any blob is sent.
        self.push_manifest(kind, entries.clone(), eval_digest.clone(), true)
            .await?;
        let mut all: Vec<&FileToPush> = files.iter().collect();
        all.extend(eval.iter());
        let (uploaded_blobs, uploaded_bytes, skipped_blobs) =
            self.upload_missing(&all, progress).await?;
        let (base, patch, created) = self
            .push_manifest(kind, entries, eval_digest, false)
            .await?;
        Ok(PushOutcome {
            base,
            patch,
            created,
            uploaded_blobs,
            uploaded_bytes,
            skipped_blobs,
        })
    }

    /// PushBaseVersion or PushPatchVersion of a manifest (`validate_only`: only checked).
    async fn push_manifest(
        &self,
        kind: &PushKind,
        entries: Vec<v1::FileEntry>,
        eval_digest: String,
        validate_only: bool,
    ) -> Result<(Option<v1::BaseVersion>, Option<v1::PatchVersion>, bool), ClientError> {
        let mut registry = self.registry();
        Ok(match kind {
            PushKind::Base {
                name,
                version,
                parent,
            } => {
                let resp = registry
                    .push_base_version(v1::PushBaseVersionRequest {
                        name: name.clone(),
                        version: version.clone(),
                        parent: parent.clone().unwrap_or_default(),
                        files: entries,
                        validate_only,
                    })
                    .await?
                    .into_inner();
                (resp.version, None, resp.created)
            }
            PushKind::Patch {
                name,
                version,
                base,
                allow_architecture_mismatch,
                ..
            } => {
                let resp = registry
                    .push_patch_version(v1::PushPatchVersionRequest {
                        name: name.clone(),
                        version: version.clone(),
                        base: base.clone(),
                        files: entries,
                        eval_digest,
                        validate_only,
                        allow_architecture_mismatch: *allow_architecture_mismatch,
                    })
                    .await?
                    .into_inner();
                (None, resp.version, resp.created)
            }
        })
    }

    /// Uploads the files whose blobs the registry lacks; returns (blobs sent, bytes
    /// sent, blobs skipped).
    pub async fn upload_missing(
        &self,
        files: &[&FileToPush],
        progress: &dyn Progress,
    ) -> Result<(usize, u64, usize), ClientError> {
        let mut digests: Vec<String> = files.iter().map(|f| f.digest.to_string()).collect();
        digests.sort();
        digests.dedup();
        let missing = self
            .blobs()
            .find_missing_blobs(v1::FindMissingBlobsRequest {
                digests: digests.clone(),
            })
            .await?
            .into_inner()
            .missing;
        let mut sent_blobs = 0;
        let mut sent_bytes = 0;
        let mut done = std::collections::HashSet::new();
        for f in files {
            let d = f.digest.to_string();
            if !missing.contains(&d) || !done.insert(d) {
                continue;
            }
            sent_bytes += self
                .upload_file(&f.local, f.digest, f.size, &f.path, progress)
                .await?;
            sent_blobs += 1;
        }
        Ok((sent_blobs, sent_bytes, digests.len() - sent_blobs))
    }

    /// Uploads one file as a blob, resuming from the registry's committed offset after
    /// any cut; returns the bytes sent.
    pub async fn upload_file(
        &self,
        local: &Path,
        digest: Digest,
        size: u64,
        label: &str,
        progress: &dyn Progress,
    ) -> Result<u64, ClientError> {
        let mut blobs = self.blobs();
        let start = blobs
            .start_upload(v1::StartUploadRequest {
                digest: digest.to_string(),
                size,
            })
            .await?
            .into_inner();
        if start.already_exists {
            return Ok(0);
        }
        let chunk = if start.max_chunk_size == 0 {
            CHUNK
        } else {
            (start.max_chunk_size as usize).min(CHUNK)
        };
        progress.start(label, size);
        progress.advance(start.committed_offset);
        let mut committed = start.committed_offset;
        let mut sent = 0;
        let mut last_error = None;
        for attempt in 0..UPLOAD_ATTEMPTS {
            if committed < size {
                let before = committed;
                match self
                    .send_from(&start.upload_id, local, committed, size, chunk, progress)
                    .await
                {
                    Ok(c) => committed = c,
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, "upload interrupted, resuming");
                        last_error = Some(e);
                        // Ask where the registry got to, then go on from there.
                        match blobs
                            .get_upload(v1::GetUploadRequest {
                                upload_id: start.upload_id.clone(),
                            })
                            .await
                        {
                            Ok(s) => committed = s.into_inner().committed_offset,
                            Err(status) => last_error = Some(status.into()),
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                    }
                }
                sent += committed.saturating_sub(before);
            }
            if committed == size {
                progress.finish();
                blobs
                    .commit_upload(v1::CommitUploadRequest {
                        upload_id: start.upload_id.clone(),
                    })
                    .await?;
                return Ok(sent);
            }
        }
        progress.finish();
        Err(last_error.unwrap_or_else(|| ClientError::Invalid {
            message: format!("{label}: upload did not complete"),
        }))
    }

    /// Streams `[from, size)` of a file into an upload session; returns the committed
    /// offset the registry reports.
    async fn send_from(
        &self,
        upload_id: &str,
        local: &Path,
        from: u64,
        size: u64,
        chunk: usize,
        progress: &dyn Progress,
    ) -> Result<u64, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::UploadChunk>(4);
        let path = local.to_path_buf();
        let id = upload_id.to_owned();
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let reader = tokio::task::spawn_blocking(move || -> Result<(), ClientError> {
            let mut f =
                std::fs::File::open(&path).map_err(|e| ClientError::io(path.display(), e))?;
            f.seek(SeekFrom::Start(from))
                .map_err(|e| ClientError::io(path.display(), e))?;
            let mut offset = from;
            while offset < size {
                let n = chunk.min((size - offset) as usize);
                let mut buf = vec![0u8; n];
                f.read_exact(&mut buf)
                    .map_err(|e| ClientError::io(path.display(), e))?;
                let msg = v1::UploadChunk {
                    upload_id: id.clone(),
                    offset,
                    data: Bytes::from(buf),
                };
                if tx.blocking_send(msg).is_err() {
                    break;
                }
                let _ = ptx.send(n as u64);
                offset += n as u64;
            }
            Ok(())
        });
        let mut blobs = self.blobs();
        let call = blobs.upload_chunks(ReceiverStream::new(rx));
        tokio::pin!(call);
        let resp = loop {
            tokio::select! {
                r = &mut call => break r,
                Some(n) = prx.recv() => progress.advance(n),
            }
        };
        reader.await.map_err(|e| ClientError::Invalid {
            message: format!("file reader failed: {e}"),
        })??;
        Ok(resp?.into_inner().committed_offset)
    }
}

impl Client {
    /// Uploads bytes held in memory as a blob (a merged tensor, a config); returns its
    /// digest. Nothing is sent when the registry already holds it.
    pub async fn upload_bytes(&self, data: Bytes) -> Result<Digest, ClientError> {
        let digest = Digest::of(&data);
        let size = data.len() as u64;
        let mut blobs = self.blobs();
        let start = blobs
            .start_upload(v1::StartUploadRequest {
                digest: digest.to_string(),
                size,
            })
            .await?
            .into_inner();
        if start.already_exists {
            return Ok(digest);
        }
        let chunk = if start.max_chunk_size == 0 {
            CHUNK
        } else {
            (start.max_chunk_size as usize).min(CHUNK)
        };
        let from = start.committed_offset as usize;
        let chunks: Vec<v1::UploadChunk> = (from..data.len())
            .step_by(chunk.max(1))
            .map(|offset| v1::UploadChunk {
                upload_id: start.upload_id.clone(),
                offset: offset as u64,
                data: data.slice(offset..(offset + chunk).min(data.len())),
            })
            .collect();
        if !chunks.is_empty() {
            blobs.upload_chunks(futures::stream::iter(chunks)).await?;
        }
        blobs
            .commit_upload(v1::CommitUploadRequest {
                upload_id: start.upload_id,
            })
            .await?;
        Ok(digest)
    }
}
