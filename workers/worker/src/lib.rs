//! The port worker: runs the engine on versions stored in a registry, reading bytes with
//! ranged `ReadBlob` calls and storing merged tensors with blob uploads, and describes
//! the artifacts as files of blob ranges for the registry to verify and record.
//!
//! Architecture invariant: a worker speaks only the gRPC API (`patchport-client`); it
//! holds no database or object-store credentials, so it can run on any GPU host. The
//! lease loop (LeaseJob, Heartbeat, CompleteJob) drives [`port_job`]; this crate never
//! decides what to port, only how.

pub mod gate;
mod run;

use std::collections::{BTreeMap, HashMap};
use std::io;

use bytes::Bytes;
use futures::StreamExt;
use patchport_client::{Client, ClientError};
use patchport_core::Digest;
use patchport_core::layout::{ADAPTER_CONFIG, DeclaredFile, FileRef};
use patchport_core::port::{PortDiagnostics, Refusal};
use patchport_engine::artifact::compose_ranges;
use patchport_engine::{Device, MergedSink, ModelSource, PortOptions};
use patchport_proto::convert::{WireError, parse_field, try_list};
use patchport_proto::v1;
use tokio::runtime::Handle;

pub use run::{WorkerConfig, run};

/// A port attempt in this worker from its lease to its outcome; the name and its
/// description are `patchport-telemetry`'s, so a registry with in-process workers reports
/// it apart from the registry's own port duration.
pub use patchport_telemetry::WORKER_PORT_DURATION as PORT_DURATION;

/// A worker failure (the job is failed and retried; refusals are not failures).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The registry refused or failed a call.
    #[error("registry call failed: {source}")]
    Registry {
        /// The cause.
        #[from]
        source: ClientError,
    },
    /// The job message is not usable.
    #[error("bad job: {message}")]
    BadJob {
        /// What is wrong.
        message: String,
    },
    /// The engine failed (bad bytes, IO).
    #[error("port failed: {source}")]
    Engine {
        /// The cause.
        #[from]
        source: patchport_engine::EngineError,
    },
    /// The blocking task died.
    #[error("port task failed: {message}")]
    Task {
        /// What happened.
        message: String,
    },
}

impl From<WireError> for WorkerError {
    /// A job message whose fields do not parse is a bad job (not retried).
    fn from(e: WireError) -> Self {
        WorkerError::BadJob {
            message: e.to_string(),
        }
    }
}

/// What a port produced, ready for `CompleteJob`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortResult {
    /// Why the patch cannot be ported (empty when it was).
    pub refusals: Vec<Refusal>,
    /// Diagnostics (when ported).
    pub diagnostics: Option<PortDiagnostics>,
    /// The ported adapter's files: the patch's own blobs and the re-pointed config.
    pub adapter_files: Vec<FileRef>,
    /// The merged model's files: whole base blobs, or composed from blob ranges with no
    /// digest (the registry hashes the composed bytes itself).
    pub merged_files: Vec<DeclaredFile>,
    /// Engine wall time.
    pub engine_seconds: f64,
    /// The quality gate's result (set by the lease loop after a successful port).
    pub evaluation: Option<v1::Evaluation>,
}

impl PortResult {
    /// The `CompleteJob` request that reports this result for the attempt holding
    /// `fencing_token`: the one place a port's outcome meets the wire.
    pub fn into_request(self, job_id: String, fencing_token: i64) -> v1::CompleteJobRequest {
        v1::CompleteJobRequest {
            job_id,
            fencing_token,
            refusals: self.refusals.iter().map(Into::into).collect(),
            diagnostics: self.diagnostics.as_ref().map(Into::into),
            adapter_files: self.adapter_files.iter().map(Into::into).collect(),
            merged_files: self.merged_files.iter().map(Into::into).collect(),
            engine_seconds: self.engine_seconds,
            evaluation: self.evaluation,
            ..Default::default()
        }
    }
}

/// A version in the registry, read with ranged `ReadBlob` calls from a blocking thread.
#[derive(Debug)]
struct RemoteSource {
    name: String,
    handle: Handle,
    client: Client,
    files: BTreeMap<String, (Digest, u64)>,
    tensor_digests: HashMap<(String, String), Digest>,
}

/// The manifest digest and the files of one of a job's versions (`field`: `patch`,
/// `source_base`, `target_base`).
fn version_files(
    field: &str,
    digest: &str,
    files: &[v1::FileEntry],
) -> Result<(Digest, Vec<FileRef>), WireError> {
    let digest = parse_field("digest", digest).map_err(|e| e.within(field))?;
    let files = try_list("files", files).map_err(|e| e.within(field))?;
    Ok((digest, files))
}

impl RemoteSource {
    async fn new(
        client: &Client,
        name: &str,
        version: &str,
        digest: Digest,
        files: &[FileRef],
    ) -> Result<Self, WorkerError> {
        let index = client
            .registry()
            .get_tensor_index(v1::GetVersionRequest {
                reference: format!("{name}@{digest}"),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        let mut tensor_digests = HashMap::new();
        for (i, t) in index.tensors.into_iter().enumerate() {
            let digest = parse_field(&format!("tensors[{i}].digest"), &t.digest)?;
            tensor_digests.insert((t.file, t.name), digest);
        }
        let map = files
            .iter()
            .map(|f| (f.path.clone(), (f.digest, f.size)))
            .collect();
        Ok(Self {
            name: format!("{name}:{version}"),
            handle: Handle::current(),
            client: client.clone(),
            files: map,
            tensor_digests,
        })
    }

    fn file(&self, path: &str) -> io::Result<(Digest, u64)> {
        self.files.get(path).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no file {path}", self.name),
            )
        })
    }
}

impl ModelSource for RemoteSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn files(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    fn file_size(&self, path: &str) -> io::Result<u64> {
        Ok(self.file(path)?.1)
    }

    fn read_range(&self, path: &str, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let (digest, _) = self.file(path)?;
        buf.clear();
        if end <= begin {
            return Ok(());
        }
        buf.reserve((end - begin) as usize);
        self.handle.block_on(async {
            let mut stream = self
                .client
                .blobs()
                .read_blob(v1::ReadBlobRequest {
                    digest: digest.to_string(),
                    offset: begin,
                    length: end - begin,
                })
                .await
                .map_err(io::Error::other)?
                .into_inner();
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk.map_err(io::Error::other)?.data);
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

/// Uploads each merged tensor as a blob as the engine produces it.
#[derive(Debug)]
struct UploadSink {
    handle: Handle,
    client: Client,
    stored: HashMap<String, (Digest, u64)>,
}

impl MergedSink for UploadSink {
    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let digest = self
            .handle
            .block_on(self.client.upload_bytes(Bytes::copy_from_slice(bytes)))
            .map_err(io::Error::other)?;
        self.stored
            .insert(name.to_owned(), (digest, bytes.len() as u64));
        Ok(())
    }
}

/// Ports the job's patch onto its target base: reads through the registry, uploads the
/// merged tensors, the re-pointed adapter config and the merged files' headers, and
/// returns what `CompleteJob` needs.
pub async fn port_job(
    client: &Client,
    job: &v1::Job,
    device: Device,
) -> Result<PortResult, WorkerError> {
    let missing = |what: &str| WorkerError::BadJob {
        message: format!("job {} has no {what}", job.job_id),
    };
    let patch = job.patch.as_ref().ok_or_else(|| missing("patch"))?;
    let source = job
        .source_base
        .as_ref()
        .ok_or_else(|| missing("source base"))?;
    let target = job
        .target_base
        .as_ref()
        .ok_or_else(|| missing("target base"))?;
    let (source_digest, source_files) =
        version_files("source_base", &source.digest, &source.files)?;
    let (target_digest, target_files) =
        version_files("target_base", &target.digest, &target.files)?;
    let (patch_digest, patch_files) = version_files("patch", &patch.digest, &patch.files)?;
    let old = RemoteSource::new(
        client,
        &source.name,
        &source.version,
        source_digest,
        &source_files,
    )
    .await?;
    let new = RemoteSource::new(
        client,
        &target.name,
        &target.version,
        target_digest,
        &target_files,
    )
    .await?;
    let adapter = RemoteSource::new(
        client,
        &patch.name,
        &patch.version,
        patch_digest,
        &patch_files,
    )
    .await?;
    let opts = PortOptions {
        merged: job.merged,
        device,
        new_base_name: Some(format!("{}:{}", target.name, target.version)),
        new_base_revision: Some(target_digest.to_string()),
    };
    let mut sink = UploadSink {
        handle: Handle::current(),
        client: client.clone(),
        stored: HashMap::new(),
    };
    let (outcome, sink) = tokio::task::spawn_blocking(move || {
        let sink_ref = if opts.merged {
            Some(&mut sink as &mut dyn MergedSink)
        } else {
            None
        };
        let outcome = patchport_engine::port(&old, &new, &adapter, &opts, sink_ref);
        (outcome, sink)
    })
    .await
    .map_err(|e| WorkerError::Task {
        message: e.to_string(),
    })?;
    let outcome = outcome?;
    let mut result = PortResult {
        refusals: outcome.refusals,
        engine_seconds: outcome.timings.total_s,
        ..PortResult::default()
    };
    let Some(ported) = &outcome.adapter else {
        return Ok(result);
    };
    result.diagnostics = Some(outcome.diagnostics);
    let config = Bytes::from(ported.config_json.clone());
    let config_digest = client.upload_bytes(config.clone()).await?;
    for mut f in patch_files {
        if f.path == ADAPTER_CONFIG {
            f.digest = config_digest;
            f.size = config.len() as u64;
        }
        result.adapter_files.push(f);
    }
    let base_files: HashMap<&str, Digest> = target_files
        .iter()
        .map(|f| (f.path.as_str(), f.digest))
        .collect();
    for c in outcome.merged.iter().flatten() {
        let header = if c.header.is_empty() {
            None
        } else {
            Some(client.upload_bytes(Bytes::from(c.header.clone())).await?)
        };
        let segments = compose_ranges(c, header, |p| base_files.get(p).copied(), &sink.stored)
            .map_err(|message| WorkerError::BadJob { message })?;
        // A file that is one whole base blob is that blob; anything else is composed.
        let whole = match segments.as_slice() {
            [s] if s.offset == 0 => target_files
                .iter()
                .find(|f| f.digest == s.digest && f.size == s.length),
            _ => None,
        };
        result.merged_files.push(match whole {
            Some(f) => DeclaredFile::Blob(FileRef {
                path: c.path.clone(),
                digest: f.digest,
                size: f.size,
            }),
            None => DeclaredFile::Composed {
                path: c.path.clone(),
                size: c.len(),
                segments,
            },
        });
    }
    Ok(result)
}
