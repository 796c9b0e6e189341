//! The build queue: the `Queue` trait and its types (port jobs, leases, fences,
//! outcomes, retry policy). The SQL is in `sql/queue.rs`.

use std::time::Duration;

use patchport_core::Digest;
use patchport_core::layout::ArtifactFile;
use patchport_core::port::{PortDiagnostics, Refusal};

use patchport_core::{Name, VersionRef};

use super::{Page, Paged, PortRecord, PortState, StoreError};

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a job fails for good (stored on each job when it is created).
    pub max_attempts: u32,
    /// Backoff before the second attempt (doubling each time).
    pub base: Duration,
    /// The longest backoff.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The backoff after the `attempt`th attempt failed (1-based): full jitter, a uniform
    /// draw in `[0, min(cap, base * 2^(attempt-1))]` milliseconds.
    pub fn backoff_millis(&self, attempt: u32) -> i64 {
        let ceiling = self.ceiling_millis(attempt);
        if ceiling == 0 {
            0
        } else {
            rand::random_range(0..=ceiling)
        }
    }

    /// The upper bound of `backoff_millis(attempt)`.
    pub fn ceiling_millis(&self, attempt: u32) -> i64 {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self.base.as_millis().min(i64::MAX as u128) as i64;
        let cap = self.cap.as_millis().min(i64::MAX as u128) as i64;
        base.saturating_mul(1i64 << exp).min(cap)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: i64,
    /// `port:<patch digest>:<source base digest>:<target base digest>:<method version>`.
    pub job_key: String,
    /// The patch content.
    pub patch_digest: Digest,
    /// The base it was trained on.
    pub source_base_digest: Digest,
    /// The base to port onto (what a worker must have loaded).
    pub target_base_digest: Digest,
    /// The port method.
    pub method_version: String,
    /// Where it stands (the port states).
    pub state: PortState,
    /// Higher first.
    pub priority: i64,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Unix ms before which it is not leased.
    pub run_after: i64,
    /// The worker holding the lease.
    pub lease_owner: Option<String>,
    /// Unix ms.
    pub lease_expires_at: Option<i64>,
    /// The current attempt's fence.
    pub fencing_token: i64,
    /// Every port of the running job was cancelled.
    pub cancel_requested: bool,
    /// The last attempt's error.
    pub last_error: Option<String>,
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedJob {
    /// The job (state running, attempts and fencing token already incremented).
    pub job: JobRecord,
    /// Its port rows (every patch version with this content), now running.
    pub ports: Vec<PortRecord>,
}

/// A recorded completion: the job after it, who held its lease, and the ports it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedJob {
    /// The job (state succeeded or incompatible, lease cleared).
    pub job: JobRecord,
    /// The worker that held the lease the completion was fenced by.
    pub lease_owner: String,
    /// The ports the completion ended (those running under that lease), as recorded.
    pub ports: Vec<PortRecord>,
}

/// What a finished attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Ported.
    Succeeded {
        /// The ported adapter.
        adapter_files: Vec<ArtifactFile>,
        /// The merged model.
        merged_files: Vec<ArtifactFile>,
        /// Portability diagnostics.
        diagnostics: PortDiagnostics,
        /// The quality gate's result, when the worker evaluated the port.
        evaluation: Option<EvaluationRecord>,
    },
    /// Refused by pre-flight: final, never retried.
    Incompatible {
        /// Why.
        refusals: Vec<Refusal>,
    },
}

/// A port's evaluation as the store keeps it: opaque JSON plus the one word the
/// `port.evaluated` event carries (`improved`, `preserved`, `regressed`,
/// `not_evaluable`, `failed`).
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    /// The event detail.
    pub summary: String,
    /// The full result.
    pub json: String,
}

pub(crate) fn lease_lost(job_id: i64) -> StoreError {
    StoreError::FailedPrecondition {
        message: format!("lease lost on job {job_id}"),
    }
}

/// The build queue: ports, their jobs, leases and fences (DESIGN.md §5). Every change
/// appends its events to the outbox in its transaction.
#[async_trait::async_trait]
pub trait Queue: Send + Sync {
    /// The port of a patch version onto a base version with a method.
    async fn get_port(
        &self,
        patch_name: &Name,
        patch_version: &VersionRef,
        base_name: &Name,
        base_version: &VersionRef,
        method_version: &str,
    ) -> Result<Option<PortRecord>, StoreError>;
    /// Asks for the port of a patch version onto another version of its base: returns
    /// the port as it stands when it is queued, running or done, and otherwise (no port
    /// yet, or one that failed or was cancelled) queues it as a job with `origin`'s
    /// priority, in one transaction with its `port.queued` event. A queued job is raised
    /// to that priority. NotFound for an unknown version, FailedPrecondition for a base
    /// of another name or the patch's own base.
    async fn request_port(
        &self,
        patch_name: &Name,
        patch_version: &VersionRef,
        base_name: &Name,
        base_version: &VersionRef,
        origin: patchport_core::port::PortOrigin,
        audit: &super::AuditRecord,
    ) -> Result<PortRecord, StoreError>;
    /// A job by id.
    async fn get_job(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError>;
    /// The port rows of a job, by id.
    async fn job_ports(&self, job_id: i64) -> Result<Vec<PortRecord>, StoreError>;
    /// The succeeded merged ports of a patch version (by name and digest) from the old
    /// base `source_base_digest` with `method_version`, newest first, at most `limit`:
    /// where a lease looks for merged tensors to reuse. One indexed read without queue
    /// places (a lease is the queue's own read, on every job).
    async fn merged_ports_of(
        &self,
        patch_name: &Name,
        patch_digest: &patchport_core::Digest,
        source_base_digest: &patchport_core::Digest,
        method_version: &str,
        limit: u32,
    ) -> Result<Vec<PortRecord>, StoreError>;
    /// Every port of a patch version, oldest first.
    async fn list_ports_of(
        &self,
        patch_name: &Name,
        patch_version: &VersionRef,
    ) -> Result<Vec<PortRecord>, StoreError>;
    /// Ports onto a base version, by id (its fan-out, among others), one page of them
    /// (keyed by id), without their file lists (`adapter_files` and `merged_files` empty:
    /// what a compat answer shows; [`get_port`](Self::get_port) has them).
    async fn list_ports_onto(
        &self,
        base_name: &Name,
        base_version: &VersionRef,
        page: &Page,
    ) -> Result<Paged<PortRecord>, StoreError>;
    /// Sets a job's priority (higher is leased first).
    async fn set_job_priority(&self, job_id: i64, priority: i64) -> Result<(), StoreError>;
    /// Leases up to `max` ready jobs in one transaction, in the order they are due: by
    /// priority (higher first), then jobs whose bases are in `loaded_base_digests` (both,
    /// then the target, then the source), then oldest. Marks each and its ports running,
    /// bumps its attempts and fencing token. Empty when none is ready.
    async fn lease_jobs(
        &self,
        worker_id: &str,
        loaded_base_digests: &[Digest],
        lease_duration: Duration,
        max: usize,
    ) -> Result<Vec<LeasedJob>, StoreError>;
    /// Leases the next ready job ([`lease_jobs`](Self::lease_jobs) with `max` 1).
    async fn lease_job(
        &self,
        worker_id: &str,
        loaded_base_digests: &[Digest],
        lease_duration: Duration,
    ) -> Result<Option<LeasedJob>, StoreError> {
        Ok(self
            .lease_jobs(worker_id, loaded_base_digests, lease_duration, 1)
            .await?
            .pop())
    }
    /// Renews a lease; FailedPrecondition "lease lost" when the token is stale or the
    /// job is no longer running. `Ok(true)` asks the worker to stop: every port of the
    /// job was cancelled.
    async fn heartbeat(
        &self,
        job_id: i64,
        fencing_token: i64,
        lease_duration: Duration,
    ) -> Result<bool, StoreError>;
    /// Records the final outcome of attempts, each on its job and every running port of
    /// it, in one transaction. One result per completion, in order: a stale token is that
    /// completion's FailedPrecondition "lease lost" and changes nothing of it; the others
    /// are recorded, each answered with what it changed (so a caller needs no read after).
    /// An error of the store itself fails them all (`Err`).
    async fn complete_jobs(
        &self,
        completions: Vec<(i64, i64, JobOutcome)>,
    ) -> Result<Vec<Result<CompletedJob, StoreError>>, StoreError>;
    /// Records the final outcome of one attempt ([`complete_jobs`](Self::complete_jobs)
    /// with one completion).
    async fn complete_job(
        &self,
        job_id: i64,
        fencing_token: i64,
        outcome: JobOutcome,
    ) -> Result<JobRecord, StoreError> {
        self.complete_jobs(vec![(job_id, fencing_token, outcome)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(lease_lost(job_id)))
            .map(|c| c.job)
    }
    /// Records a failed attempt: queued again after a backoff while attempts remain and
    /// the error is retryable, failed otherwise.
    async fn fail_job(
        &self,
        job_id: i64,
        fencing_token: i64,
        error: &str,
        retryable: bool,
    ) -> Result<JobRecord, StoreError>;
    /// Gives a lease back unfinished (graceful shutdown): queued again, the attempt not
    /// counted.
    async fn release_job(&self, job_id: i64, fencing_token: i64) -> Result<JobRecord, StoreError>;
    /// Requeues (or fails, when out of attempts) running jobs whose lease expired
    /// before `now` (unix ms); returns how many.
    async fn reap_expired(&self, now: i64) -> Result<usize, StoreError>;
    /// Cancels a queued or running port; once none of its ports still wants the work its
    /// job is cancelled through the fence: never leased again, and a running attempt's
    /// lease ends at once (its heartbeat answers "cancelled", its complete is refused).
    async fn cancel_port(
        &self,
        patch_name: &Name,
        patch_version: &VersionRef,
        base_name: &Name,
        base_version: &VersionRef,
        method_version: &str,
        audit: &super::AuditRecord,
    ) -> Result<PortRecord, StoreError>;
    /// How many jobs are in each state (queue depth): every state of
    /// [`PortState::ALL`], in that order, zeros included.
    async fn count_jobs_by_state(&self) -> Result<Vec<(PortState, u64)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling_millis(1), 2_000);
        assert_eq!(p.ceiling_millis(2), 4_000);
        assert_eq!(p.ceiling_millis(8), 256_000);
        assert_eq!(p.ceiling_millis(9), 300_000);
        assert_eq!(p.ceiling_millis(1_000), 300_000);
        for attempt in 1..20 {
            let b = p.backoff_millis(attempt);
            assert!((0..=p.ceiling_millis(attempt)).contains(&b));
        }
    }
}
