//! Pulling a version: every file downloaded to a temporary name, its sha256 checked
//! while it is written, then renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use patchport_core::layout::validate_path;
use patchport_core::{AnyRef, Hasher, Reference};
use patchport_proto::v1;

use crate::{Client, ClientError, Progress};

/// Where [`Client::download_file`] reads a file from.
#[derive(Debug, Clone, Copy)]
pub enum FileSource<'a> {
    /// A file of a base or patch version, or of a port (`merged`: its merged model), by
    /// reference and path.
    Version {
        /// The version or port reference.
        reference: &'a str,
        /// For a port: the merged model's file.
        merged: bool,
    },
    /// The blob with the file's digest (a file stored whole).
    Blob,
}

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
        let reference_str = reference.to_string();
        let source = FileSource::Version {
            reference: &reference_str,
            merged,
        };
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
            self.download_file(f, source, out, progress).await?;
            bytes += f.size;
        }
        Ok(PullOutcome {
            kind,
            digest,
            files,
            bytes,
        })
    }

    /// Downloads one file into `out/<path>` through one `ReadFile` stream (a port's
    /// composed file arrives whole), verified against `f`'s digest and size, which the
    /// stream's first message must repeat.
    pub async fn download_file(
        &self,
        f: &v1::FileEntry,
        from: FileSource<'_>,
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
        let req = match from {
            FileSource::Version { reference, merged } => v1::ReadFileRequest {
                reference: reference.to_owned(),
                path: f.path.clone(),
                merged,
                digest: String::new(),
            },
            FileSource::Blob => v1::ReadFileRequest {
                digest: f.digest.clone(),
                ..Default::default()
            },
        };
        let mut stream = self.blobs().read_file(req).await?.into_inner();
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(|e| ClientError::io(tmp.display(), e))?,
        );
        let mut hasher = Hasher::new();
        progress.start(&f.path, f.size);
        let mut announced = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if let Some(head) = chunk.file {
                announced = Some(head);
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data)
                .map_err(|e| ClientError::io(tmp.display(), e))?;
            progress.advance(chunk.data.len() as u64);
        }
        progress.finish();
        file.flush()
            .map_err(|e| ClientError::io(tmp.display(), e))?;
        drop(file);
        let size = hasher.len();
        let actual = hasher.finish().to_string();
        let expected_ok = announced
            .as_ref()
            .is_some_and(|h| h.digest == f.digest && h.size == f.size);
        if !expected_ok || actual != f.digest || size != f.size {
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
