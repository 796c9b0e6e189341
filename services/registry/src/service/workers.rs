//! `patchport.v1.WorkerService`: the lease protocol of port workers. Every write of an
//! attempt is checked against its fencing token by the store; a stale token changes
//! nothing and answers FailedPrecondition.

use std::time::Duration;

use futures::StreamExt;

use patchport_core::layout::{ArtifactFile, BlobRange, FileRef};
use patchport_core::port::{ModuleDiagnostics, PortDiagnostics, Refusal};
use patchport_core::{Digest, VersionRef};
use patchport_proto::v1::{self, worker_service_server::WorkerService};
use patchport_store::meta::{JobOutcome, LeasedJob};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::convert::{base_to_proto, patch_to_proto, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// The longest a LeaseJob call waits for work.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The worker service.
#[derive(Debug, Clone)]
pub(crate) struct Workers {
    pub(crate) registry: Registry,
    /// How long a lease lasts without a heartbeat.
    pub(crate) lease: Duration,
    /// Cancelled at shutdown: long polls answer "no job" at once.
    pub(crate) draining: CancellationToken,
}

fn job_id(s: &str) -> ApiResult<i64> {
    s.parse()
        .map_err(|_| ApiError::invalid(format!("invalid job id {s:?}")))
}

fn diag(d: &v1::ModuleDiagnostics) -> ModuleDiagnostics {
    ModuleDiagnostics {
        module: d.module.clone(),
        base_drift: d.base_drift,
        patch_size: d.patch_size,
        drift_to_patch: d.drift_to_patch,
        cosine: d.cosine,
        unchanged: d.unchanged,
    }
}

fn refusal_kind(kind: &str) -> ApiResult<patchport_core::port::RefusalKind> {
    serde_json::from_value(serde_json::Value::String(kind.to_owned()))
        .map_err(|_| ApiError::invalid(format!("unknown refusal kind {kind:?}")))
}

/// Records a port attempt's time from its lease to its outcome.
fn record_port_duration(leased_at: Option<i64>, outcome: &'static str) {
    if let Some(at) = leased_at {
        let seconds = (patchport_store::meta::now_millis() - at).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::metrics::PORT_DURATION, "outcome" => outcome).record(seconds);
    }
}

impl Workers {
    /// Hashes the bytes a composed file's segments produce.
    async fn compose_digest(&self, segments: &[BlobRange]) -> ApiResult<(Digest, u64)> {
        let mut hasher = patchport_core::Hasher::new();
        for s in segments {
            let mut stream = self
                .registry
                .blobs
                .read(&s.digest, s.offset, Some(s.length))
                .await?;
            while let Some(chunk) = stream.next().await {
                hasher.update(&chunk?);
            }
        }
        let size = hasher.len();
        Ok((hasher.finish(), size))
    }

    /// When the running attempt of a job was leased (its ports' start), for the port
    /// duration metric; `None` when metrics are off or it is not known.
    async fn leased_at(&self, id: i64) -> Option<i64> {
        if !crate::metrics::enabled() {
            return None;
        }
        match self.registry.meta.job_ports(id).await {
            Ok(ports) => ports
                .iter()
                .filter(|p| p.state == patchport_store::meta::PortState::Running)
                .find_map(|p| p.started_at),
            Err(e) => {
                tracing::debug!(error = %e, "reading a job's ports for its duration failed");
                None
            }
        }
    }

    async fn job_to_proto(&self, leased: &LeasedJob) -> ApiResult<v1::Job> {
        let port = leased
            .ports
            .first()
            .ok_or_else(|| ApiError::internal("leasing a job", "a job without ports"))?;
        let meta = &self.registry.meta;
        let patch = meta
            .get_patch_version(&port.patch_name, &VersionRef::Digest(port.patch_digest))
            .await?
            .ok_or_else(|| ApiError::internal("leasing a job", "patch version vanished"))?;
        let source = meta
            .get_base_version(
                &patch.base_name,
                &VersionRef::Digest(leased.job.source_base_digest),
            )
            .await?
            .ok_or_else(|| ApiError::internal("leasing a job", "source base vanished"))?;
        let target = meta
            .get_base_version(
                &port.base_name,
                &VersionRef::Digest(leased.job.target_base_digest),
            )
            .await?
            .ok_or_else(|| ApiError::internal("leasing a job", "target base vanished"))?;
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
        })
    }

    /// Checks a worker's artifact files: every blob exists; composed files are hashed
    /// here (a worker's word about composed bytes never counts unverified).
    async fn verify_files(&self, files: &[v1::FileEntry]) -> ApiResult<Vec<ArtifactFile>> {
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            patchport_core::layout::validate_path(&f.path)?;
            if f.segments.is_empty() {
                let digest: Digest = f.digest.parse()?;
                match self.registry.blobs.size(&digest).await? {
                    Some(size) if size == f.size => {}
                    _ => {
                        return Err(ApiError::precondition(format!(
                            "{}: blob {digest} ({} bytes) is not stored",
                            f.path, f.size
                        )));
                    }
                }
                out.push(ArtifactFile {
                    file: FileRef {
                        path: f.path.clone(),
                        digest,
                        size: f.size,
                    },
                    segments: Vec::new(),
                });
                continue;
            }
            let mut segments = Vec::with_capacity(f.segments.len());
            for s in &f.segments {
                let Some(v1::segment::Source::Blob(r)) = &s.source else {
                    return Err(ApiError::invalid(format!(
                        "{}: segments must be blob ranges",
                        f.path
                    )));
                };
                let digest: Digest = r.digest.parse()?;
                match self.registry.blobs.size(&digest).await? {
                    Some(size)
                        if r.offset
                            .checked_add(r.length)
                            .is_some_and(|end| end <= size) => {}
                    _ => {
                        return Err(ApiError::precondition(format!(
                            "{}: range {}+{} of blob {digest} is not stored",
                            f.path, r.offset, r.length
                        )));
                    }
                }
                segments.push(BlobRange {
                    digest,
                    offset: r.offset,
                    length: r.length,
                });
            }
            let (digest, size) = self.compose_digest(&segments).await?;
            out.push(ArtifactFile {
                file: FileRef {
                    path: f.path.clone(),
                    digest,
                    size,
                },
                segments,
            });
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    #[tracing::instrument(skip_all, fields(worker = %req.get_ref().worker_id), err)]
    async fn lease_job(
        &self,
        req: Request<v1::LeaseJobRequest>,
    ) -> Result<Response<v1::LeaseJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        if req.worker_id.is_empty() || req.worker_id.len() > 200 {
            return Err(ApiError::invalid("worker_id must be 1-200 bytes").into());
        }
        let loaded = req
            .loaded_base_digests
            .iter()
            .map(|d| d.parse::<Digest>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::from)?;
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(req.wait_seconds)).min(MAX_WAIT);
        loop {
            if self.draining.is_cancelled() {
                // Shutting down: this process takes no new work.
                return Ok(Response::new(v1::LeaseJobResponse { job: None }));
            }
            if let Some(leased) = self
                .registry
                .meta
                .lease_job(&req.worker_id, &loaded, self.lease)
                .await
                .map_err(ApiError::from)?
            {
                tracing::info!(
                    job_id = leased.job.id,
                    attempt = leased.job.attempts,
                    "job leased"
                );
                let job = self.job_to_proto(&leased).await?;
                return Ok(Response::new(v1::LeaseJobResponse { job: Some(job) }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(v1::LeaseJobResponse { job: None }));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = self.draining.cancelled() => {}
            }
        }
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id), err)]
    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        let cancelled = self
            .registry
            .meta
            .heartbeat(job_id(&req.job_id)?, req.fencing_token, self.lease)
            .await
            .map_err(ApiError::from)?;
        let expires = patchport_store::meta::now_millis() + self.lease.as_millis() as i64;
        Ok(Response::new(v1::HeartbeatResponse {
            lease_expires_at: Some(timestamp(expires)),
            cancelled,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id), err)]
    async fn complete_job(
        &self,
        req: Request<v1::CompleteJobRequest>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        let id = job_id(&req.job_id)?;
        let leased_at = self.leased_at(id).await;
        let outcome = if req.refusals.is_empty() {
            let diagnostics = req
                .diagnostics
                .as_ref()
                .ok_or_else(|| ApiError::invalid("a port needs its diagnostics"))?;
            JobOutcome::Succeeded {
                adapter_files: self.verify_files(&req.adapter_files).await?,
                merged_files: self.verify_files(&req.merged_files).await?,
                diagnostics: PortDiagnostics {
                    modules: diagnostics.modules.iter().map(diag).collect(),
                    total: diagnostics.total.as_ref().map(diag).unwrap_or_default(),
                },
                evaluation: req
                    .evaluation
                    .as_ref()
                    .map(crate::convert::evaluation_record)
                    .transpose()?,
            }
        } else {
            JobOutcome::Incompatible {
                refusals: req
                    .refusals
                    .iter()
                    .map(|r| {
                        Ok(Refusal::new(
                            refusal_kind(&r.kind)?,
                            &r.subject,
                            r.message.clone(),
                        ))
                    })
                    .collect::<ApiResult<_>>()?,
            }
        };
        let label = match outcome {
            JobOutcome::Succeeded { .. } => "succeeded",
            JobOutcome::Incompatible { .. } => "incompatible",
        };
        self.registry
            .meta
            .complete_job(id, req.fencing_token, outcome)
            .await
            .map_err(ApiError::from)?;
        record_port_duration(leased_at, label);
        tracing::info!(engine_seconds = req.engine_seconds, "job completed");
        Ok(Response::new(v1::CompleteJobResponse {}))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id), err)]
    async fn fail_job(
        &self,
        req: Request<v1::FailJobRequest>,
    ) -> Result<Response<v1::FailJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        let id = job_id(&req.job_id)?;
        let leased_at = self.leased_at(id).await;
        let job = self
            .registry
            .meta
            .fail_job(id, req.fencing_token, &req.error, req.retryable)
            .await
            .map_err(ApiError::from)?;
        let retried = job.state == patchport_store::meta::PortState::Queued;
        record_port_duration(leased_at, if retried { "retried" } else { "failed" });
        let retry_at = retried.then(|| timestamp(job.run_after));
        Ok(Response::new(v1::FailJobResponse { retry_at }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id), err)]
    async fn release_job(
        &self,
        req: Request<v1::ReleaseJobRequest>,
    ) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        self.registry.auth.check_worker(req.metadata()).await?;
        let req = req.into_inner();
        self.registry
            .meta
            .release_job(job_id(&req.job_id)?, req.fencing_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::ReleaseJobResponse {}))
    }
}
