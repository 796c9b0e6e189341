//! `patchport.v1.WorkerService`: the lease protocol of port workers. Every write of an
//! attempt is checked against its fencing token by the store; a stale token changes
//! nothing and answers FailedPrecondition.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use patchport_core::layout::{
    ArtifactFile, BlobRange, DeclaredFile, FileRef, TensorRecord, is_safetensors,
};
use patchport_core::port::{
    MAX_COMPLETIONS, MAX_INLINE_BLOBS, MAX_LEASE_JOBS, PortDiagnostics, Refusal, ReusedTensor,
};
use patchport_core::safetensors::{self, Header, TensorInfo};
use patchport_core::{Digest, VersionRef};
use patchport_proto::convert::{WireError, parse_list, required, try_list};
use patchport_proto::v1::{self, worker_service_server::WorkerService};
use patchport_store::meta::{
    BaseVersionRecord, BlobIndex, EvaluationRecord, JobOutcome, JobRecord, LeasedJob, PortRecord,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::convert::{base_to_proto, patch_to_proto, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// The longest a LeaseJob call waits for work.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// How many earlier ports of a patch (newest first) a lease looks at for merged tensors
/// to reuse.
const REUSE_FROM: u32 = 4;
/// A patch whose files together are at most this many bytes comes whole with its lease.
const INLINE_PATCH_BYTES: u64 = 1 << 20;
/// How many completions of one call are verified at once (composed files hashed on
/// blocking threads).
const VERIFY_AT_ONCE: usize = 8;

/// The worker service.
#[derive(Debug, Clone)]
pub(crate) struct Workers {
    pub(crate) registry: Registry,
    /// How long a lease lasts without a heartbeat.
    pub(crate) lease: Duration,
    /// Cancelled at shutdown: long polls answer "no job" at once.
    pub(crate) draining: CancellationToken,
    /// Hashes the composed files of completions.
    pub(crate) composed: super::composed::ComposedDigests,
}

/// A `LeaseJob` request.
#[derive(Debug)]
struct LeaseQuery {
    worker_id: String,
    /// The bases the worker holds (affinity).
    loaded: Vec<Digest>,
    /// How long to wait for a job, at most [`MAX_WAIT`].
    wait: Duration,
    /// How many jobs to lease at most (1-[`MAX_LEASE_JOBS`]).
    max: usize,
}

impl TryFrom<&v1::LeaseJobRequest> for LeaseQuery {
    type Error = WireError;

    fn try_from(req: &v1::LeaseJobRequest) -> Result<Self, WireError> {
        if req.worker_id.is_empty() || req.worker_id.len() > 200 {
            return Err(WireError::invalid("worker_id", "must be 1-200 bytes"));
        }
        Ok(LeaseQuery {
            worker_id: req.worker_id.clone(),
            loaded: parse_list("loaded_base_digests", &req.loaded_base_digests)?,
            wait: Duration::from_secs(u64::from(req.wait_seconds)).min(MAX_WAIT),
            max: (req.max_jobs as usize).clamp(1, MAX_LEASE_JOBS),
        })
    }
}

/// The attempt a request is about: its job and the fencing token of its lease.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    job_id: i64,
    fencing_token: i64,
}

impl Attempt {
    fn parse(job_id: &str, fencing_token: i64) -> Result<Self, WireError> {
        let job_id = job_id
            .parse()
            .map_err(|_| WireError::invalid("job_id", format!("invalid job id {job_id:?}")))?;
        Ok(Attempt {
            job_id,
            fencing_token,
        })
    }
}

impl TryFrom<&v1::HeartbeatRequest> for Attempt {
    type Error = WireError;

    fn try_from(req: &v1::HeartbeatRequest) -> Result<Self, WireError> {
        Attempt::parse(&req.job_id, req.fencing_token)
    }
}

impl TryFrom<&v1::ReleaseJobRequest> for Attempt {
    type Error = WireError;

    fn try_from(req: &v1::ReleaseJobRequest) -> Result<Self, WireError> {
        Attempt::parse(&req.job_id, req.fencing_token)
    }
}

/// A `FailJob` request.
#[derive(Debug)]
struct Failure {
    attempt: Attempt,
    error: String,
    retryable: bool,
}

impl TryFrom<&v1::FailJobRequest> for Failure {
    type Error = WireError;

    fn try_from(req: &v1::FailJobRequest) -> Result<Self, WireError> {
        Ok(Failure {
            attempt: Attempt::parse(&req.job_id, req.fencing_token)?,
            error: req.error.clone(),
            retryable: req.retryable,
        })
    }
}

/// A `CompleteJob` request: the outcome a worker reports, before its files are verified.
#[derive(Debug)]
struct Completion {
    attempt: Attempt,
    outcome: Reported,
    engine_seconds: f64,
    /// The device the worker ran on (for the signed provenance).
    device: String,
    /// Small blobs the files name, to store before verifying them.
    inline_blobs: Vec<bytes::Bytes>,
}

/// A completion verified and ready to record.
struct Prepared {
    attempt: Attempt,
    outcome: JobOutcome,
    engine_seconds: f64,
    /// The device it ran on (for its signed provenance).
    device: String,
}

/// What a worker reports: refusals make a port incompatible; without them it succeeded.
#[derive(Debug)]
enum Reported {
    Succeeded {
        diagnostics: PortDiagnostics,
        adapter_files: Vec<DeclaredFile>,
        merged_files: Vec<DeclaredFile>,
        evaluation: Option<EvaluationRecord>,
    },
    Incompatible {
        refusals: Vec<Refusal>,
    },
}

impl TryFrom<&v1::CompleteJobRequest> for Completion {
    type Error = WireError;

    fn try_from(req: &v1::CompleteJobRequest) -> Result<Self, WireError> {
        let attempt = Attempt::parse(&req.job_id, req.fencing_token)?;
        let outcome = if req.refusals.is_empty() {
            Reported::Succeeded {
                diagnostics: required("diagnostics", req.diagnostics.as_ref())?.into(),
                adapter_files: try_list("adapter_files", &req.adapter_files)?,
                merged_files: try_list("merged_files", &req.merged_files)?,
                evaluation: req
                    .evaluation
                    .as_ref()
                    .map(crate::convert::evaluation_record)
                    .transpose()
                    .map_err(|e| e.within("evaluation"))?,
            }
        } else {
            Reported::Incompatible {
                refusals: try_list("refusals", &req.refusals)?,
            }
        };
        let inline: usize = req.inline_blobs.iter().map(|b| b.len()).sum();
        if inline > MAX_INLINE_BLOBS {
            return Err(WireError::invalid(
                "inline_blobs",
                format!(
                    "{inline} bytes; at most {MAX_INLINE_BLOBS} may come inline, upload the rest"
                ),
            ));
        }
        Ok(Completion {
            attempt,
            outcome,
            engine_seconds: req.engine_seconds,
            device: req.device.chars().take(200).collect(),
            inline_blobs: req.inline_blobs.clone(),
        })
    }
}

/// The merged tensors of an earlier port's composed file, each with the base's record of
/// the tensor it replaced: a segment that is a whole blob other than the base file,
/// standing where the composed file's own `header` puts a tensor of that size (merged
/// tensors sit last in files composed since they moved there, in place before).
fn merged_tensor_blobs<'a>(
    merged: &'a ArtifactFile,
    header: &Header,
    base_blob: Digest,
    index: &'a BlobIndex,
) -> Vec<(&'a TensorRecord, &'a BlobRange)> {
    let by_begin: HashMap<u64, &TensorInfo> = header.tensors.iter().map(|t| (t.begin, t)).collect();
    let by_name: HashMap<&str, &TensorRecord> =
        index.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    let mut at = 0;
    for s in &merged.segments {
        if s.digest != base_blob
            && s.offset == 0
            && let Some(t) = by_begin.get(&at).filter(|t| t.end - t.begin == s.length)
            && let Some(record) = by_name.get(t.name.as_str())
        {
            out.push((*record, s));
        }
        at += s.length;
    }
    out
}

/// Base versions by name and digest, read once per LeaseJob call.
type Bases = HashMap<(String, Digest), std::sync::Arc<BaseVersionRecord>>;

/// Records a port attempt's time from its lease to its outcome.
fn record_port_duration(ports: &[patchport_store::meta::PortRecord], outcome: &'static str) {
    if let Some(at) = ports.iter().find_map(|p| p.started_at) {
        let seconds = (patchport_store::meta::now_millis() - at).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::metrics::PORT_DURATION, "outcome" => outcome).record(seconds);
    }
}

impl Workers {
    /// A job's running ports, for the port duration metric of a failed attempt (none when
    /// metrics are off or the read failed).
    async fn running_ports(&self, id: i64) -> Vec<patchport_store::meta::PortRecord> {
        if !crate::metrics::enabled() {
            return Vec::new();
        }
        match self.registry.meta.job_ports(id).await {
            Ok(mut ports) => {
                ports.retain(|p| p.state == patchport_store::meta::PortState::Running);
                ports
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading a job's ports for its duration failed");
                Vec::new()
            }
        }
    }

    /// A base version by name and digest, read once per LeaseJob call (the jobs of one
    /// fan-out share their bases).
    async fn base_once(
        &self,
        bases: &mut Bases,
        name: &patchport_core::Name,
        digest: Digest,
        what: &str,
    ) -> ApiResult<std::sync::Arc<BaseVersionRecord>> {
        let key = (name.to_string(), digest);
        if let Some(b) = bases.get(&key) {
            return Ok(b.clone());
        }
        let base = self
            .registry
            .meta
            .get_base_version(name, &VersionRef::Digest(digest))
            .await?
            .ok_or_else(|| ApiError::internal("leasing a job", format!("{what} vanished")))?;
        let base = std::sync::Arc::new(base);
        bases.insert(key, base.clone());
        Ok(base)
    }

    async fn job_to_proto(&self, leased: &LeasedJob, bases: &mut Bases) -> ApiResult<v1::Job> {
        let port = leased
            .ports
            .first()
            .ok_or_else(|| ApiError::internal("leasing a job", "a job without ports"))?;
        let meta = &self.registry.meta;
        let patch = meta
            .get_patch_version(&port.patch_name, &VersionRef::Digest(port.patch_digest))
            .await?
            .ok_or_else(|| ApiError::internal("leasing a job", "patch version vanished"))?;
        let source = self
            .base_once(
                bases,
                &patch.base_name,
                leased.job.source_base_digest,
                "source base",
            )
            .await?;
        let target = self
            .base_once(
                bases,
                &port.base_name,
                leased.job.target_base_digest,
                "target base",
            )
            .await?;
        // Reuse only saves work: a failure to find what is reusable ports everything.
        let reused = match self.reused_tensors(&leased.job, port, &target).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, job_id = leased.job.id, "finding merged tensors to reuse failed");
                Vec::new()
            }
        };
        if !reused.is_empty() {
            tracing::info!(
                job_id = leased.job.id,
                reused = reused.len(),
                "merged tensors reused from earlier ports"
            );
        }
        let patch_file_bytes = self.small_patch_bytes(&patch.files).await;
        Ok(v1::Job {
            job_id: leased.job.id.to_string(),
            fencing_token: leased.job.fencing_token,
            lease_expires_at: leased.job.lease_expires_at.map(timestamp),
            attempt: leased.job.attempts,
            method_version: leased.job.method_version.clone(),
            patch: Some(patch_to_proto(&patch)),
            source_base: Some(base_to_proto(&source)),
            target_base: Some(base_to_proto(&target)),
            merged: true,
            reused_tensors: reused.iter().map(Into::into).collect(),
            patch_file_bytes,
        })
    }

    /// The bytes of a small patch's files (all of them together at most
    /// [`INLINE_PATCH_BYTES`]), in order, to ride with its lease; empty for a larger
    /// patch, or when a read fails (the worker then reads them itself).
    async fn small_patch_bytes(&self, files: &[FileRef]) -> Vec<bytes::Bytes> {
        if files.iter().map(|f| f.size).sum::<u64>() > INLINE_PATCH_BYTES {
            return Vec::new();
        }
        let reads = files
            .iter()
            .map(|f| async move { self.registry.blobs.read_all(&f.digest).await });
        match futures::future::try_join_all(reads).await {
            Ok(bytes) => {
                // Served blob bytes, as a ReadBlob of them would count.
                let sent: usize = bytes.iter().map(bytes::Bytes::len).sum();
                metrics::counter!(patchport_telemetry::PULL_BYTES).increment(sent as u64);
                bytes
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading a small patch's files for its lease (the worker will read them)");
                Vec::new()
            }
        }
    }

    /// The merged tensors a job can take from earlier merged ports of its patch version
    /// (the same old base and method; newest first, at most [`REUSE_FROM`] of them): a
    /// target tensor with the same digest, dtype and shape in that port's new base and in
    /// the job's has the same merged bytes `W_new + s·B·A` and the same diagnostics. A
    /// module whose stored diagnostics have no sums (a port stored before they were kept)
    /// is not offered, so the new port's total is always the sum a full port computes.
    async fn reused_tensors(
        &self,
        job: &JobRecord,
        port: &PortRecord,
        target: &BaseVersionRecord,
    ) -> ApiResult<Vec<ReusedTensor>> {
        let meta = &self.registry.meta;
        let earlier: Vec<PortRecord> = meta
            .merged_ports_of(
                &port.patch_name,
                &port.patch_digest,
                &job.source_base_digest,
                &job.method_version,
                REUSE_FROM,
            )
            .await?
            .into_iter()
            .filter(|p| p.base_digest != job.target_base_digest && p.diagnostics.is_some())
            .collect();
        if earlier.is_empty() {
            return Ok(Vec::new());
        }
        let mut wanted: HashMap<String, TensorRecord> = HashMap::new();
        for f in target.files.iter().filter(|f| is_safetensors(&f.path)) {
            for t in self.registry.blob_index(f).await?.tensors {
                wanted.insert(t.name.clone(), t);
            }
        }
        let mut out: BTreeMap<String, ReusedTensor> = BTreeMap::new();
        for p in &earlier {
            let Some(base) = meta
                .get_base_version(&p.base_name, &VersionRef::Digest(p.base_digest))
                .await?
            else {
                continue;
            };
            let modules: HashMap<&str, _> = p
                .diagnostics
                .iter()
                .flat_map(|d| &d.modules)
                .filter(|m| m.sums.is_some())
                .map(|m| (m.module.as_str(), m))
                .collect();
            for merged in &p.merged_files {
                let Some(file) = base.files.iter().find(|f| {
                    f.path == merged.file.path
                        && f.size == merged.file.size
                        && is_safetensors(&f.path)
                }) else {
                    continue;
                };
                let Some(header) = self.composed_header(merged).await? else {
                    continue;
                };
                let index = self.registry.blob_index(file).await?;
                for (t, blob) in merged_tensor_blobs(merged, &header, file.digest, &index) {
                    let same = wanted.get(&t.name).is_some_and(|w| {
                        w.digest == t.digest && w.dtype == t.dtype && w.shape == t.shape
                    });
                    let module = t.name.strip_suffix(".weight").and_then(|m| modules.get(m));
                    if let (true, Some(module), false) = (same, module, out.contains_key(&t.name)) {
                        out.insert(
                            t.name.clone(),
                            ReusedTensor {
                                tensor: t.name.clone(),
                                digest: blob.digest,
                                size: blob.length,
                                diagnostics: (*module).clone(),
                            },
                        );
                    }
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// The safetensors header of a stored composed file (its first segment, a blob of its
    /// own), or None when that segment is not a whole valid header of the file.
    async fn composed_header(&self, file: &ArtifactFile) -> ApiResult<Option<Header>> {
        let Some(first) = file.segments.first() else {
            return Ok(None);
        };
        if first.length > self.registry.limits.max_header_bytes + 8 {
            return Ok(None);
        }
        let bytes = self
            .registry
            .blobs
            .read_bytes(&first.digest, first.offset, first.length)
            .await?;
        let size = file.file.size;
        let Ok(n) = safetensors::json_len(&bytes, size) else {
            return Ok(None);
        };
        if bytes.len() as u64 != 8 + n {
            return Ok(None);
        }
        Ok(safetensors::parse_header(&bytes[8..], size).ok())
    }

    /// Stores the blobs a completion carries inline (content-addressed, create-only: a
    /// completion refused by its fence leaves only unreferenced blobs, as its uploads
    /// would).
    async fn store_inline(&self, blobs: Vec<bytes::Bytes>) -> ApiResult<()> {
        futures::future::try_join_all(
            blobs
                .into_iter()
                .map(|b| async move { self.registry.blobs.put_bytes(b).await }),
        )
        .await?;
        Ok(())
    }

    /// Parses a completion and verifies what it names: its inline blobs stored, its
    /// files checked and composed files hashed. What the store records, or why not.
    async fn prepare(&self, req: &v1::CompleteJobRequest) -> ApiResult<Prepared> {
        let Completion {
            attempt,
            outcome,
            engine_seconds,
            device,
            inline_blobs,
        } = Completion::try_from(req)?;
        if matches!(outcome, Reported::Succeeded { .. }) {
            self.store_inline(inline_blobs).await?;
        }
        let outcome = match outcome {
            Reported::Succeeded {
                diagnostics,
                adapter_files,
                merged_files,
                evaluation,
            } => JobOutcome::Succeeded {
                adapter_files: self.verify_files(&adapter_files).await?,
                merged_files: self.verify_files(&merged_files).await?,
                diagnostics,
                evaluation,
            },
            Reported::Incompatible { refusals } => JobOutcome::Incompatible { refusals },
        };
        Ok(Prepared {
            attempt,
            outcome,
            engine_seconds,
            device,
        })
    }

    /// Records completions: each is verified on its own ([`VERIFY_AT_ONCE`] at a time), then all that
    /// verified are recorded in one store transaction, then their ports are signed. One
    /// result per completion, in order; `Err` only when the store itself failed.
    async fn complete(
        &self,
        completions: Vec<v1::CompleteJobRequest>,
    ) -> Result<Vec<ApiResult<()>>, Status> {
        use futures::StreamExt as _;
        let prepared: Vec<ApiResult<Prepared>> = futures::stream::iter(completions)
            .map(|c| async move { self.prepare(&c).await })
            .buffered(VERIFY_AT_ONCE)
            .collect()
            .await;
        let mut results: Vec<ApiResult<()>> = Vec::with_capacity(prepared.len());
        let mut ready = Vec::new();
        let mut recorded = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            match p {
                Ok(p) => {
                    results.push(Ok(()));
                    let label = match p.outcome {
                        JobOutcome::Succeeded { .. } => "succeeded",
                        JobOutcome::Incompatible { .. } => "incompatible",
                    };
                    ready.push((p.attempt.job_id, p.attempt.fencing_token, p.outcome));
                    recorded.push((i, label, p.engine_seconds, p.device));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if ready.is_empty() {
            return Ok(results);
        }
        let stored = self
            .registry
            .meta
            .complete_jobs(ready)
            .await
            .map_err(ApiError::from)?;
        for ((i, label, engine_seconds, device), r) in recorded.into_iter().zip(stored) {
            let done = match r {
                Ok(done) => done,
                Err(e) => {
                    results[i] = Err(e.into());
                    continue;
                }
            };
            record_port_duration(&done.ports, label);
            if label == "succeeded" {
                let worker = patchport_signing::WorkerInfo {
                    id: done.lease_owner,
                    device,
                };
                self.registry.sign_ports(&done.ports, &worker).await;
            }
            tracing::info!(
                job_id = done.job.id,
                engine_seconds,
                outcome = label,
                "job completed"
            );
        }
        Ok(results)
    }

    /// Checks a worker's artifact files: every blob exists; composed files are hashed
    /// here (a worker's word about composed bytes never counts unverified).
    async fn verify_files(&self, files: &[DeclaredFile]) -> ApiResult<Vec<ArtifactFile>> {
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let (path, segments) = match f {
                DeclaredFile::Blob(file) => {
                    match self.registry.blobs.size(&file.digest).await? {
                        Some(size) if size == file.size => {}
                        _ => {
                            return Err(ApiError::precondition(format!(
                                "{}: blob {} ({} bytes) is not stored",
                                file.path, file.digest, file.size
                            )));
                        }
                    }
                    out.push(ArtifactFile {
                        file: file.clone(),
                        segments: Vec::new(),
                    });
                    continue;
                }
                // The worker's planned size is not taken either: the bytes are hashed.
                DeclaredFile::Composed { path, segments, .. } => (path, segments),
            };
            let whole = self.stored_ranges(path, segments).await?;
            let shared = super::composed::shared_prefix(&whole);
            let (digest, size) = self
                .composed
                .digest(&self.registry, segments, shared)
                .await?;
            out.push(ArtifactFile {
                file: FileRef {
                    path: path.clone(),
                    digest,
                    size,
                },
                segments: segments.clone(),
            });
        }
        Ok(out)
    }

    /// Checks that every range of `segments` (of the file `path`) lies within a stored
    /// blob; says for each whether it is its whole blob.
    async fn stored_ranges(&self, path: &str, segments: &[BlobRange]) -> ApiResult<Vec<bool>> {
        let mut whole = Vec::with_capacity(segments.len());
        for r in segments {
            match self.registry.blobs.size(&r.digest).await? {
                Some(size)
                    if r.offset
                        .checked_add(r.length)
                        .is_some_and(|end| end <= size) =>
                {
                    whole.push(r.offset == 0 && r.length == size);
                }
                _ => {
                    return Err(ApiError::precondition(format!(
                        "{path}: range {}+{} of blob {} is not stored",
                        r.offset, r.length, r.digest
                    )));
                }
            }
        }
        Ok(whole)
    }
}

/// The most files one `PrepareComposed` may name.
const MAX_PREPARED_FILES: usize = 64;

/// The largest header a `PrepareComposed` file may carry (safetensors' own bound).
const MAX_PREPARED_HEADER: usize = 100 << 20;

#[tonic::async_trait]
impl WorkerService for Workers {
    #[tracing::instrument(skip_all, fields(worker = %req.get_ref().worker_id))]
    async fn lease_job(
        &self,
        req: Request<v1::LeaseJobRequest>,
    ) -> Result<Response<v1::LeaseJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let LeaseQuery {
            worker_id,
            loaded,
            wait,
            max,
        } = LeaseQuery::try_from(req.get_ref()).map_err(ApiError::from)?;
        let deadline = tokio::time::Instant::now() + wait;
        let none = || Ok(Response::new(v1::LeaseJobResponse { jobs: Vec::new() }));
        loop {
            if self.draining.is_cancelled() {
                // Shutting down: this process takes no new work.
                return none();
            }
            let leased = self
                .registry
                .meta
                .lease_jobs(&worker_id, &loaded, self.lease, max)
                .await
                .map_err(ApiError::from)?;
            if !leased.is_empty() {
                let mut bases = Bases::new();
                let mut jobs = Vec::with_capacity(leased.len());
                for l in &leased {
                    tracing::info!(job_id = l.job.id, attempt = l.job.attempts, "job leased");
                    jobs.push(self.job_to_proto(l, &mut bases).await?);
                }
                return Ok(Response::new(v1::LeaseJobResponse { jobs }));
            }
            if tokio::time::Instant::now() >= deadline {
                return none();
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = self.draining.cancelled() => {}
            }
        }
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let a = Attempt::try_from(req.get_ref()).map_err(ApiError::from)?;
        let cancelled = self
            .registry
            .meta
            .heartbeat(a.job_id, a.fencing_token, self.lease)
            .await
            .map_err(ApiError::from)?;
        let expires = patchport_store::meta::now_millis() + self.lease.as_millis() as i64;
        Ok(Response::new(v1::HeartbeatResponse {
            lease_expires_at: Some(timestamp(expires)),
            cancelled,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn complete_job(
        &self,
        req: Request<v1::CompleteJobRequest>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let mut results = self.complete(vec![req.into_inner()]).await?;
        match results.pop() {
            Some(Ok(())) => Ok(Response::new(v1::CompleteJobResponse {})),
            Some(Err(e)) => Err(e.into()),
            None => Err(ApiError::internal("completing a job", "no result").into()),
        }
    }

    #[tracing::instrument(skip_all, fields(completions = req.get_ref().completions.len()))]
    async fn complete_jobs(
        &self,
        req: Request<v1::CompleteJobsRequest>,
    ) -> Result<Response<v1::CompleteJobsResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let completions = req.into_inner().completions;
        if completions.len() > MAX_COMPLETIONS {
            return Err(ApiError::from(WireError::invalid(
                "completions",
                format!(
                    "{} completions; at most {MAX_COMPLETIONS} per call",
                    completions.len()
                ),
            ))
            .into());
        }
        let ids: Vec<String> = completions.iter().map(|c| c.job_id.clone()).collect();
        let results = self.complete(completions).await?;
        let results = ids
            .into_iter()
            .zip(results)
            .map(|(job_id, r)| {
                let (code, message) = match r {
                    Ok(()) => (tonic::Code::Ok, String::new()),
                    Err(e) => {
                        let status = Status::from(e);
                        (status.code(), status.message().to_owned())
                    }
                };
                v1::CompleteJobResult {
                    job_id,
                    code: code as i32,
                    message,
                }
            })
            .collect();
        Ok(Response::new(v1::CompleteJobsResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn fail_job(
        &self,
        req: Request<v1::FailJobRequest>,
    ) -> Result<Response<v1::FailJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let f = Failure::try_from(req.get_ref()).map_err(ApiError::from)?;
        // Read before the failure is recorded, for the duration metric (a requeue resets
        // the ports' start).
        let running = self.running_ports(f.attempt.job_id).await;
        let job = self
            .registry
            .meta
            .fail_job(
                f.attempt.job_id,
                f.attempt.fencing_token,
                &f.error,
                f.retryable,
            )
            .await
            .map_err(ApiError::from)?;
        let retried = job.state == patchport_store::meta::PortState::Queued;
        record_port_duration(&running, if retried { "retried" } else { "failed" });
        let retry_at = retried.then(|| timestamp(job.run_after));
        Ok(Response::new(v1::FailJobResponse { retry_at }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn prepare_composed(
        &self,
        req: Request<v1::PrepareComposedRequest>,
    ) -> Result<Response<v1::PrepareComposedResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        let a = Attempt::parse(&req.job_id, req.fencing_token).map_err(ApiError::from)?;
        if req.files.len() > MAX_PREPARED_FILES {
            return Err(ApiError::invalid(format!(
                "files: {} composed files, at most {MAX_PREPARED_FILES}",
                req.files.len()
            ))
            .into());
        }
        let mut files = Vec::with_capacity(req.files.len());
        for (i, f) in req.files.into_iter().enumerate() {
            if f.header.len() > MAX_PREPARED_HEADER {
                return Err(ApiError::invalid(format!(
                    "files[{i}].header: {} bytes, at most {MAX_PREPARED_HEADER}",
                    f.header.len()
                ))
                .into());
            }
            let ranges: Vec<BlobRange> =
                try_list(&format!("files[{i}].ranges"), &f.ranges).map_err(ApiError::from)?;
            files.push((f.header, ranges));
        }
        // Only the holder of the lease may ask; the call renews it.
        self.registry
            .meta
            .heartbeat(a.job_id, a.fencing_token, self.lease)
            .await
            .map_err(ApiError::from)?;
        let mut hashing_bytes = 0;
        for (i, (header, ranges)) in files.into_iter().enumerate() {
            if ranges.is_empty() {
                continue;
            }
            self.stored_ranges(&format!("files[{i}]"), &ranges).await?;
            hashing_bytes += self.composed.prepare(&self.registry, header, ranges);
        }
        Ok(Response::new(v1::PrepareComposedResponse { hashing_bytes }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn release_job(
        &self,
        req: Request<v1::ReleaseJobRequest>,
    ) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let a = Attempt::try_from(req.get_ref()).map_err(ApiError::from)?;
        self.registry
            .meta
            .release_job(a.job_id, a.fencing_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::ReleaseJobResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use patchport_core::layout::BlobRange;
    use patchport_core::port::{ModuleDiagnostics, RefusalKind};
    use tonic::Code;

    use super::*;

    fn request() -> v1::CompleteJobRequest {
        let composed = DeclaredFile::Composed {
            path: "model.safetensors".to_owned(),
            size: 3,
            segments: vec![BlobRange {
                digest: Digest::of(b"x"),
                offset: 0,
                length: 3,
            }],
        };
        v1::CompleteJobRequest {
            job_id: "7".to_owned(),
            fencing_token: 3,
            diagnostics: Some(
                (&PortDiagnostics {
                    modules: Vec::new(),
                    total: ModuleDiagnostics::default(),
                })
                    .into(),
            ),
            merged_files: vec![(&composed).into()],
            ..Default::default()
        }
    }

    /// The status a client gets for a request that does not parse.
    fn status(req: &v1::CompleteJobRequest) -> Status {
        Status::from(ApiError::from(Completion::try_from(req).unwrap_err()))
    }

    #[test]
    fn a_completion_is_parsed_once_into_domain_types() {
        let c = Completion::try_from(&request()).unwrap();
        assert_eq!((c.attempt.job_id, c.attempt.fencing_token), (7, 3));
        let Reported::Succeeded { merged_files, .. } = c.outcome else {
            panic!("no refusals: succeeded")
        };
        assert!(matches!(merged_files[0], DeclaredFile::Composed { .. }));

        let mut refused = request();
        refused.refusals = vec![(&Refusal::new(RefusalKind::Dora, "", String::new())).into()];
        // Refusals make it incompatible; the files of such a report are not looked at.
        refused.merged_files[0].segments.clear();
        let c = Completion::try_from(&refused).unwrap();
        assert!(
            matches!(c.outcome, Reported::Incompatible { ref refusals } if refusals[0].kind == RefusalKind::Dora)
        );
    }

    #[test]
    fn a_bad_field_is_invalid_argument_naming_it() {
        let mut req = request();
        req.refusals = vec![v1::Refusal {
            kind: "lossy".to_owned(),
            ..Default::default()
        }];
        let s = status(&req);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("refusals[0].kind: unknown refusal kind \"lossy\""),
            "{}",
            s.message()
        );

        let mut req = request();
        let Some(v1::segment::Source::Blob(r)) = &mut req.merged_files[0].segments[0].source else {
            unreachable!()
        };
        r.digest = "sha256:x".to_owned();
        let s = status(&req);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("merged_files[0].segments[0].blob.digest: invalid digest"),
            "{}",
            s.message()
        );

        let mut req = request();
        req.inline_blobs = vec![bytes::Bytes::from(vec![0u8; MAX_INLINE_BLOBS + 1])];
        let s = status(&req);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("inline_blobs: "), "{}", s.message());

        let mut req = request();
        req.diagnostics = None;
        assert_eq!(status(&req).message(), "diagnostics is required");
        let mut req = request();
        req.job_id = "seven".to_owned();
        assert!(status(&req).message().starts_with("job_id: "));
    }

    #[test]
    fn merged_tensor_blobs_are_the_segments_where_the_composed_header_puts_a_tensor() {
        let (base, header, merged) = (Digest::of(b"base"), Digest::of(b"h"), Digest::of(b"m"));
        let record = |name: &str, begin: u64, end: u64| TensorRecord {
            name: name.to_owned(),
            dtype: "F32".to_owned(),
            shape: vec![(end - begin) / 4],
            begin,
            end,
            digest: Digest::of(name.as_bytes()),
            non_finite: 0,
        };
        let info = |name: &str, begin: u64, end: u64| TensorInfo {
            name: name.to_owned(),
            dtype: safetensors::Dtype::F32,
            shape: vec![(end - begin) / 4],
            begin,
            end,
        };
        let range = |digest, offset, length| BlobRange {
            digest,
            offset,
            length,
        };
        let file = |segments| ArtifactFile {
            file: FileRef {
                path: "model.safetensors".to_owned(),
                digest: Digest::of(b"file"),
                size: 48,
            },
            segments,
        };
        let found =
            |file: &ArtifactFile, header: &Header, index: &BlobIndex| -> Vec<(String, Digest)> {
                merged_tensor_blobs(file, header, base, index)
                    .into_iter()
                    .map(|(t, r)| (t.name.clone(), r.digest))
                    .collect()
            };
        // The base's layout: header, a as the base's bytes, b merged in place.
        let index = BlobIndex {
            json_len: 8,
            tensors: vec![record("a.weight", 16, 32), record("b.weight", 32, 48)],
        };
        let in_place = Header {
            json_len: 8,
            tensors: vec![info("a.weight", 16, 32), info("b.weight", 32, 48)],
            metadata: BTreeMap::new(),
        };
        let f = file(vec![
            range(header, 0, 16),
            range(base, 16, 16),
            range(merged, 0, 16),
        ]);
        assert_eq!(
            found(&f, &in_place, &index),
            vec![("b.weight".to_owned(), merged)]
        );
        // Merged last: the base has b first; the composed file puts a, then b merged.
        let index = BlobIndex {
            json_len: 8,
            tensors: vec![record("b.weight", 16, 32), record("a.weight", 32, 48)],
        };
        let f = file(vec![
            range(header, 0, 16),
            range(base, 32, 16),
            range(merged, 0, 16),
        ]);
        assert_eq!(
            found(&f, &in_place, &index),
            vec![("b.weight".to_owned(), merged)]
        );
    }
}
