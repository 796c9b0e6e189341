//! Pulling a version: every file downloaded to a temporary name, its sha256 checked
//! while it is written, then renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use patchport_core::layout::validate_path;
use patchport_core::{AnyRef, Hasher, Reference};
use patchport_proto::v1;

use crate::{Client, ClientError, Progress};

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// What was pulled (`base`, `patch` or `port`).
    pub kind: &'static str,
    /// The version's digest.
    pub digest: String,
    /// Files written, relative to the output directory.
    pub files: Vec<v1::FileEntry>,
    /// Bytes written.
    pub bytes: u64,
}

impl Client {
    /// Looks up a base or patch version by reference (bases first).
    pub async fn lookup(
        &self,
        r: &Reference,
    ) -> Result<(&'static str, String, Vec<v1::FileEntry>), ClientError> {
        let req = v1::GetVersionRequest {
            reference: r.to_string(),
        };
        match self.registry().get_base_version(req.clone()).await {
            Ok(b) => {
                let b = b.into_inner();
                return Ok(("base", b.digest, b.files));
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
        match self.registry().get_patch_version(req).await {
            Ok(p) => {
                let p = p.into_inner();
                Ok(("patch", p.digest, p.files))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Err(ClientError::Status {
                status: tonic::Status::not_found(format!("no base or patch version {r}")),
            }),
            Err(s) => Err(s.into()),
        }
    }

    /// Pulls a base, patch or port into `out` (`merged` picks a port's merged model).
    pub async fn pull(
        &self,
        reference: &AnyRef,
        out: &Path,
        merged: bool,
        progress: &dyn Progress,
    ) -> Result<PullOutcome, ClientError> {
        let (kind, digest, files) = match reference {
            AnyRef::Version(r) => {
                if merged {
                    return Err(ClientError::Invalid {
                        message: "--merged applies to port references (patch@base)".to_owned(),
                    });
                }
                self.lookup(r).await?
            }
            AnyRef::Port(p) => {
                let port = self
                    .ports()
                    .get_port(v1::GetPortRequest {
                        reference: p.to_string(),
                    })
                    .await?
                    .into_inner();
                let files = if merged {
                    port.merged_files
                } else {
                    port.adapter_files
                };
                if files.is_empty() {
                    return Err(ClientError::Invalid {
                        message: format!(
                            "port {p} has no {} artifact (state {})",
                            if merged { "merged" } else { "adapter" },
                            port.state
                        ),
                    });
                }
                ("port", port.patch_digest, files)
            }
        };
        std::fs::create_dir_all(out).map_err(|e| ClientError::io(out.display(), e))?;
        let mut bytes = 0;
        for f in &files {
            self.download_file(f, out, progress).await?;
            bytes += f.size;
        }
        Ok(PullOutcome {
            kind,
            digest,
            files,
            bytes,
        })
    }

    /// Downloads one file (a blob, or a composed file) into `out/<path>`, verified.
    pub async fn download_file(
        &self,
        f: &v1::FileEntry,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<PathBuf, ClientError> {
        validate_path(&f.path).map_err(|e| ClientError::Invalid {
            message: format!("the registry sent a bad path: {e}"),
        })?;
        let dest = out.join(&f.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ClientError::io(parent.display(), e))?;
        }
        let tmp = dest.with_file_name(format!(
            ".{}.partial",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(|e| ClientError::io(tmp.display(), e))?,
        );
        let mut hasher = Hasher::new();
        progress.start(&f.path, f.size);
        let ranges: Vec<(String, u64, u64, Option<bytes::Bytes>)> = if f.segments.is_empty() {
            vec![(f.digest.clone(), 0, 0, None)]
        } else {
            f.segments
                .iter()
                .map(|s| match &s.source {
                    Some(v1::segment::Source::Inline(b)) => (String::new(), 0, 0, Some(b.clone())),
                    Some(v1::segment::Source::Blob(r)) => {
                        (r.digest.clone(), r.offset, r.length, None)
                    }
                    None => (String::new(), 0, 0, Some(bytes::Bytes::new())),
                })
                .collect()
        };
        for (digest, offset, length, inline) in ranges {
            if let Some(b) = inline {
                hasher.update(&b);
                file.write_all(&b)
                    .map_err(|e| ClientError::io(tmp.display(), e))?;
                progress.advance(b.len() as u64);
                continue;
            }
            let mut stream = self
                .blobs()
                .read_blob(v1::ReadBlobRequest {
                    digest,
                    offset,
                    length,
                })
                .await?
                .into_inner();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk.data);
                file.write_all(&chunk.data)
                    .map_err(|e| ClientError::io(tmp.display(), e))?;
                progress.advance(chunk.data.len() as u64);
            }
        }
        progress.finish();
        file.flush()
            .map_err(|e| ClientError::io(tmp.display(), e))?;
        drop(file);
        let size = hasher.len();
        let actual = hasher.finish().to_string();
        if actual != f.digest || size != f.size {
            let _ = std::fs::remove_file(&tmp);
            return Err(ClientError::DigestMismatch {
                path: f.path.clone(),
                expected: format!("{} ({} bytes)", f.digest, f.size),
                actual: format!("{actual} ({size} bytes)"),
            });
        }
        std::fs::rename(&tmp, &dest).map_err(|e| ClientError::io(dest.display(), e))?;
        Ok(dest)
    }
}
