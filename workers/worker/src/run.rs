//! The lease loop: lease jobs (preferring the base this worker already holds; several at
//! once when ports are quick), keep each lease alive with heartbeats from the moment it
//! was taken, port, and complete or fail each job with its fencing token. Completions go
//! to one completer per worker, which sends whatever has finished meanwhile in one
//! `CompleteJobs` call while the loops port on; a lease's heartbeat stops only when its
//! completion was answered. On shutdown the leases not yet ported are released, not left
//! to expire, and the completions already made are sent before the worker exits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchport_client::{Client, ClientError};
use patchport_engine::Device;
use patchport_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::{WorkerError, WorkerState, port_job_with};
use patchport_core::port::{MAX_COMPLETIONS, MAX_INLINE_BLOBS, MAX_LEASE_JOBS};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// A stable identity for leases and logs.
    pub worker_id: String,
    /// Where ports compute.
    pub device: Device,
    /// How long one LeaseJob call waits for work.
    pub lease_wait: Duration,
    /// How often a running job's lease is renewed.
    pub heartbeat_every: Duration,
    /// The quality gate after each successful port (None: ports only).
    pub gate: Option<crate::gate::GateConfig>,
    /// Where base tensors are cached (a directory; a second worker on it uses `DIR-N`).
    pub cache_dir: std::path::PathBuf,
    /// The cache's bound in bytes (0: no cache).
    pub cache_bytes: u64,
    /// Jobs ported at once (each its own lease loop; they share the cache).
    pub concurrency: usize,
    /// The most jobs one lease loop takes in one LeaseJob call. A loop leases ahead only
    /// as many as it expects to port within [`LEASE_AHEAD`] at its recent pace, so slow
    /// ports are still leased one at a time and spread over the workers.
    pub lease_batch: usize,
}

/// How much work (at a loop's recent pace) one LeaseJob call may take ahead.
pub const LEASE_AHEAD: Duration = Duration::from_secs(1);
/// The default of [`WorkerConfig::lease_batch`].
pub const DEFAULT_LEASE_BATCH: usize = 16;

/// The cache's default bound.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 30;

impl WorkerConfig {
    /// Defaults for `worker_id` on `device`.
    pub fn new(worker_id: String, device: Device) -> Self {
        let cache_bytes = std::env::var("PATCHPORT_CACHE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_CACHE_BYTES);
        let gate = crate::gate::GateConfig::new(match device {
            Device::Cpu => "cpu".to_owned(),
            Device::Cuda(n) => format!("cuda:{n}"),
        });
        Self {
            cache_dir: gate.cache_dir.join("tensors"),
            cache_bytes,
            concurrency: 1,
            lease_batch: DEFAULT_LEASE_BATCH,
            worker_id,
            device,
            lease_wait: Duration::from_secs(10),
            heartbeat_every: Duration::from_secs(5),
            gate: Some(gate),
        }
    }
}

/// Ports a job, then runs the quality gate on a successful port.
async fn port_and_evaluate(
    client: &Client,
    job: &v1::Job,
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
) -> Result<crate::PortResult, WorkerError> {
    let mut r = port_job_with(client, job, config.device, state).await?;
    if r.refusals.is_empty()
        && let Some(gate) = &config.gate
    {
        r.evaluation = crate::gate::evaluate(client, job, gate).await;
        if let Some(e) = &r.evaluation {
            tracing::info!(status = %e.status, verdict = %e.verdict, seconds = e.seconds, "port evaluated");
        }
    }
    Ok(r)
}

/// Leases and ports jobs until `shutdown` is cancelled: `config.concurrency` lease loops
/// sharing one tensor cache and one completer.
pub async fn run(
    client: Client,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let state = {
        let (dir, bytes) = (config.cache_dir.clone(), config.cache_bytes);
        tokio::task::spawn_blocking(move || WorkerState::with_cache(&dir, bytes))
            .await
            .map_err(|e| WorkerError::Task {
                message: e.to_string(),
            })?
            .unwrap_or_else(|e| {
                // Ports still work without it, reading every base tensor remotely.
                tracing::warn!(dir = %config.cache_dir.display(), error = %e, "no tensor cache");
                WorkerState::default()
            })
    };
    let state = Arc::new(state);
    let config = Arc::new(config);
    let (done, finished) = tokio::sync::mpsc::channel(MAX_COMPLETIONS * 2);
    let completer = tokio::spawn(completer(client.clone(), finished, shutdown.clone()));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (client, config, state, shutdown, done) = (
            client.clone(),
            config.clone(),
            state.clone(),
            shutdown.clone(),
            done.clone(),
        );
        loops.spawn(async move { lease_loop(client, &config, &state, shutdown, done).await });
    }
    // The completer ends when every loop has ended (and dropped its sender) and what they
    // finished is sent.
    drop(done);
    let mut result = Ok(());
    let mut settle = |r: Result<Result<(), WorkerError>, tokio::task::JoinError>| {
        let r = r.map_err(|e| WorkerError::Task {
            message: e.to_string(),
        });
        if let Err(e) | Ok(Err(e)) = r
            && result.is_ok()
        {
            // One loop failing stops the others: the worker exits with its error.
            shutdown.cancel();
            result = Err(e);
        }
    };
    while let Some(r) = loops.join_next().await {
        settle(r);
    }
    settle(completer.await);
    result
}

/// A leased job: its lease is renewed from the moment it was taken until the job is
/// dropped (after its completion was answered, or its lease released).
struct Held {
    job: v1::Job,
    leased: Instant,
    /// Cancelled when the job was cancelled or its lease lost.
    lost: CancellationToken,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Held {
    fn new(client: &Client, config: &WorkerConfig, job: v1::Job) -> Self {
        // Renew at a third of the lease the registry granted (and at least as often as
        // configured).
        let every = job
            .lease_expires_at
            .as_ref()
            .map(|t| {
                let expires = t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                Duration::from_millis(((expires - now) / 3).max(100) as u64)
            })
            .map_or(config.heartbeat_every, |d| d.min(config.heartbeat_every));
        let lost = CancellationToken::new();
        let heartbeat = {
            let (client, job_id, token, lost) = (
                client.clone(),
                job.job_id.clone(),
                job.fencing_token,
                lost.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match client
                        .workers()
                        .heartbeat(v1::HeartbeatRequest {
                            job_id: job_id.clone(),
                            fencing_token: token,
                        })
                        .await
                    {
                        Ok(r) if !r.get_ref().cancelled => {}
                        Ok(_) => {
                            tracing::info!(job_id = %job_id, "job cancelled");
                            lost.cancel();
                            return;
                        }
                        Err(status) => {
                            tracing::warn!(job_id = %job_id, error = %status.message(), "lease lost");
                            lost.cancel();
                            return;
                        }
                    }
                }
            })
        };
        Held {
            job,
            leased: Instant::now(),
            lost,
            heartbeat,
        }
    }

    /// Gives the lease back (shutdown).
    async fn release(self, client: &Client) {
        self.heartbeat.abort();
        release(client, &self.job.job_id, self.job.fencing_token).await;
        record(self.leased, "released");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// A finished port on its way to the registry.
struct Done {
    held: Held,
    request: v1::CompleteJobRequest,
    /// The metric's outcome when the registry records it.
    label: &'static str,
    /// Told (or dropped) once the registry has answered, for a loop that waits for it.
    answered: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How many jobs one LeaseJob call asks for at a loop's recent `pace` (time per job):
/// as many as it ports within [`LEASE_AHEAD`], at least 1 and at most `batch`; 1 before
/// the loop has a pace.
fn jobs_per_lease(pace: Option<Duration>, batch: usize) -> u32 {
    let batch = batch.clamp(1, MAX_LEASE_JOBS) as u32;
    match pace {
        None => 1,
        Some(p) if p.is_zero() => batch,
        Some(p) => {
            (LEASE_AHEAD.as_secs_f64() / p.as_secs_f64()).clamp(1.0, f64::from(batch)) as u32
        }
    }
}

/// Whether a loop at `pace` ports on while its completions are sent (quick ports), or
/// waits for each answer (slow ports, and before it has a pace).
fn overlaps(pace: Option<Duration>) -> bool {
    pace.is_some_and(|p| p < LEASE_AHEAD)
}

/// One lease loop.
async fn lease_loop(
    client: Client,
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
    shutdown: CancellationToken,
    done: tokio::sync::mpsc::Sender<Done>,
) -> Result<(), WorkerError> {
    let mut loaded: Vec<String> = Vec::new();
    let mut failures = 0u32;
    let mut workers = client.workers();
    let mut ahead: VecDeque<Held> = VecDeque::new();
    // This loop's recent time per job (lease to completion handed on), for how many
    // jobs one lease may take.
    let mut pace: Option<Duration> = None;
    while !shutdown.is_cancelled() {
        if let Some(held) = ahead.pop_front() {
            let target = held
                .job
                .target_base
                .as_ref()
                .map(|b| b.digest.clone())
                .unwrap_or_default();
            let started = Instant::now();
            // Quick ports are completed while the next ones run; a slow port's loop waits
            // for its answer, so the registry's verification of a large port (hashing its
            // merged files) does not contend with the next port where both share a
            // machine, and each port's latency stays its own.
            let overlap = overlaps(pace);
            run_one(&client, config, state, held, &shutdown, &done, overlap).await?;
            let took = started.elapsed();
            pace = Some(pace.map_or(took, |p| (p * 3 + took) / 4));
            loaded = vec![target];
            continue;
        }
        let max_jobs = jobs_per_lease(pace, config.lease_batch);
        // The bases whose tensors the cache holds; without a cache, the last target.
        let held = state.held_versions();
        let call = workers.lease_job(v1::LeaseJobRequest {
            worker_id: config.worker_id.clone(),
            loaded_base_digests: if state.cache().is_some() {
                held
            } else {
                loaded.clone()
            },
            wait_seconds: config.lease_wait.as_secs() as u32,
            device: config.device.to_string(),
            max_jobs,
        });
        tokio::pin!(call);
        let lease = tokio::select! {
            r = &mut call => r,
            () = shutdown.cancelled() => {
                // The registry may already have leased jobs to this call, its answer
                // on the way: dropping the call would strand those leases until they
                // expire. Wait briefly for an answer and give back what it brought; a
                // call still long-polling after that holds nothing.
                let limit = config.lease_wait.min(Duration::from_secs(2));
                if let Ok(Ok(resp)) = tokio::time::timeout(limit, &mut call).await {
                    for job in resp.into_inner().jobs {
                        release(&client, &job.job_id, job.fencing_token).await;
                    }
                }
                break;
            }
        };
        match lease {
            Ok(resp) => {
                failures = 0;
                for job in resp.into_inner().jobs {
                    tracing::info!(job_id = %job.job_id, attempt = job.attempt, "job leased");
                    ahead.push_back(Held::new(&client, config, job));
                }
            }
            Err(status) => {
                // The registry is restarting or unreachable: back off and try again.
                failures += 1;
                let wait = Duration::from_millis(200 << failures.min(6));
                tracing::warn!(error = %status.message(), code = ?status.code(), ?wait, "lease failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        }
    }
    // Shutting down: what was leased ahead and not ported goes back at once.
    for held in ahead {
        held.release(&client).await;
    }
    Ok(())
}

/// Sends finished ports to the registry: everything that finished while the previous call
/// was on its way goes in the next `CompleteJobs` call. Ends when every sender is gone and
/// all is sent; a registry error stops the worker, as it would a lease loop.
async fn completer(
    client: Client,
    mut finished: tokio::sync::mpsc::Receiver<Done>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let mut next: Option<Done> = None;
    let mut batched = true;
    loop {
        let first = match next.take() {
            Some(d) => d,
            None => match finished.recv().await {
                Some(d) => d,
                None => return Ok(()),
            },
        };
        let mut bytes = inline_bytes(&first.request);
        let mut batch = vec![first];
        while batch.len() < MAX_COMPLETIONS && batched {
            match finished.try_recv() {
                // A call carries together at most what one completion alone may.
                Ok(d) if bytes + inline_bytes(&d.request) <= MAX_INLINE_BLOBS => {
                    bytes += inline_bytes(&d.request);
                    batch.push(d);
                }
                Ok(d) => {
                    next = Some(d);
                    break;
                }
                Err(_) => break,
            }
        }
        let answers = if batched {
            let requests = batch.iter().map(|d| d.request.clone()).collect();
            match client
                .workers()
                .complete_jobs(v1::CompleteJobsRequest {
                    completions: requests,
                })
                .await
            {
                Ok(r) => r
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|r| {
                        if r.code == 0 {
                            Ok(())
                        } else {
                            Err(tonic::Status::new(tonic::Code::from(r.code), r.message))
                        }
                    })
                    .collect(),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    // A registry from before CompleteJobs: one call per completion.
                    tracing::info!("the registry has no CompleteJobs; completing one job per call");
                    batched = false;
                    complete_each(&client, &batch).await
                }
                Err(s) => {
                    shutdown.cancel();
                    return Err(WorkerError::Registry {
                        source: ClientError::from(s),
                    });
                }
            }
        } else {
            complete_each(&client, &batch).await
        };
        for (d, answer) in batch.into_iter().zip(answers) {
            match answer {
                Ok(()) => {
                    record(d.held.leased, d.label);
                    if let Some(answered) = d.answered {
                        let _ = answered.send(());
                    }
                }
                // A stale fence: the job was leased again after our lease expired; our
                // result is refused by design and the other attempt owns it.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(job_id = %d.held.job.job_id, error = %s.message(), "result refused by the fence");
                    record(d.held.leased, "lost");
                }
                Err(s) => {
                    shutdown.cancel();
                    return Err(WorkerError::Registry {
                        source: ClientError::from(s),
                    });
                }
            }
        }
    }
}

/// The bytes a completion carries inline.
fn inline_bytes(r: &v1::CompleteJobRequest) -> usize {
    r.inline_blobs.iter().map(|b| b.len()).sum()
}

/// Completes a batch one `CompleteJob` call at a time (a registry without CompleteJobs).
async fn complete_each(client: &Client, batch: &[Done]) -> Vec<Result<(), tonic::Status>> {
    let mut out = Vec::with_capacity(batch.len());
    for d in batch {
        out.push(
            client
                .workers()
                .complete_job(d.request.clone())
                .await
                .map(|_| ()),
        );
    }
    out
}

/// `namespace/name:version`, or empty when the job lacks it.
fn reference(name: Option<&str>, version: Option<&str>) -> String {
    match (name, version) {
        (Some(n), Some(v)) => format!("{n}:{v}"),
        _ => String::new(),
    }
}

/// Records one port attempt's time from its lease to `outcome`.
fn record(leased: Instant, outcome: &'static str) {
    metrics::histogram!(crate::PORT_DURATION, "outcome" => outcome)
        .record(leased.elapsed().as_secs_f64());
}

#[tracing::instrument(
    name = "port",
    skip_all,
    fields(
        job_id = %held.job.job_id,
        attempt = held.job.attempt,
        patch = %reference(held.job.patch.as_ref().map(|p| p.name.as_str()), held.job.patch.as_ref().map(|p| p.version.as_str())),
        source_base = %reference(held.job.source_base.as_ref().map(|b| b.name.as_str()), held.job.source_base.as_ref().map(|b| b.version.as_str())),
        target_base = %reference(held.job.target_base.as_ref().map(|b| b.name.as_str()), held.job.target_base.as_ref().map(|b| b.version.as_str())),
    )
)]
async fn run_one(
    client: &Client,
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
    held: Held,
    shutdown: &CancellationToken,
    done: &tokio::sync::mpsc::Sender<Done>,
    overlap: bool,
) -> Result<(), WorkerError> {
    let job = &held.job;
    let (job_id, token) = (job.job_id.clone(), job.fencing_token);
    // Fault-injection hooks for the crash tests: stall after leasing, without heartbeats,
    // as a hung or partitioned worker would: for a time, or until a file exists (the test
    // decides when the stalled worker wakes); after the first `PATCHPORT_TEST_STALL_AFTER`
    // jobs of the process only (so a test can give a worker a quick pace first).
    let stall_ms = std::env::var("PATCHPORT_TEST_STALL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let stall_until = std::env::var_os("PATCHPORT_TEST_STALL_UNTIL").map(std::path::PathBuf::from);
    let stall_after = std::env::var("PATCHPORT_TEST_STALL_AFTER")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nth = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if (stall_ms.is_some() || stall_until.is_some()) && nth >= stall_after {
        tracing::warn!(job_id = %job_id, ?stall_ms, ?stall_until, "stalling (PATCHPORT_TEST_STALL_*)");
        held.heartbeat.abort();
        let woken = async {
            match (stall_ms, &stall_until) {
                (Some(ms), _) => tokio::time::sleep(Duration::from_millis(ms)).await,
                (None, Some(path)) => {
                    while !path.exists() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                (None, None) => {}
            }
        };
        tokio::select! {
            () = woken => {}
            () = shutdown.cancelled() => {
                held.release(client).await;
                return Ok(());
            }
        }
    }
    let outcome = tokio::select! {
        r = port_and_evaluate(client, job, config, state) => Some(r),
        () = held.lost.cancelled() => None,
        () = shutdown.cancelled() => {
            held.release(client).await;
            return Ok(());
        }
    };
    let Some(outcome) = outcome else {
        // Cancelled or the lease went to another worker: nothing of ours may be written.
        record(held.leased, "lost");
        return Ok(());
    };
    let label = match &outcome {
        Ok(r) if r.refusals.is_empty() => "succeeded",
        Ok(_) => "incompatible",
        Err(_) => "failed",
    };
    match outcome {
        Ok(r) => {
            let request = v1::CompleteJobRequest {
                // Recorded in the port's signed provenance.
                device: config.device.to_string(),
                ..r.into_request(job_id, token)
            };
            // The lease stays renewed until the completer has its answer.
            let (answered, answer) = if overlap {
                (None, None)
            } else {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            };
            if let Err(e) = done
                .send(Done {
                    held,
                    request,
                    label,
                    answered,
                })
                .await
            {
                // The completer has stopped (its registry error stops the worker).
                e.0.held.release(client).await;
            } else if let Some(answer) = answer {
                // Err: the completer stopped without answering; it stops the worker.
                let _ = answer.await;
            }
            Ok(())
        }
        Err(e) => {
            held.heartbeat.abort();
            let retryable = !matches!(e, WorkerError::BadJob { .. });
            tracing::warn!(job_id = %job_id, error = %e, retryable, "port failed");
            let reply = client
                .workers()
                .fail_job(v1::FailJobRequest {
                    job_id: job_id.clone(),
                    fencing_token: token,
                    error: e.to_string(),
                    retryable,
                })
                .await;
            match reply {
                Ok(_) => {
                    record(held.leased, label);
                    Ok(())
                }
                // A stale fence: the job was leased again after our lease expired.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(job_id = %job_id, error = %s.message(), "result refused by the fence");
                    record(held.leased, "lost");
                    Ok(())
                }
                Err(s) => Err(WorkerError::Registry {
                    source: ClientError::from(s),
                }),
            }
        }
    }
}

/// Gives the lease back (graceful shutdown): the job is queued again at once instead of
/// waiting for the lease to expire, and the attempt does not count.
async fn release(client: &Client, job_id: &str, token: i64) {
    match client
        .workers()
        .release_job(v1::ReleaseJobRequest {
            job_id: job_id.to_owned(),
            fencing_token: token,
        })
        .await
    {
        Ok(_) => tracing::info!(job_id = %job_id, "lease released on shutdown"),
        Err(s) => {
            tracing::warn!(job_id = %job_id, error = %s.message(), "releasing the lease failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_ports_lease_ahead_and_overlap_slow_ones_go_one_at_a_time() {
        let ms = |n| Some(Duration::from_millis(n));
        // No pace yet: one job, and the loop waits for its answer.
        assert_eq!(jobs_per_lease(None, 16), 1);
        assert!(!overlaps(None));
        // Tiny ports: the batch bound.
        assert_eq!(jobs_per_lease(ms(5), 16), 16);
        assert_eq!(jobs_per_lease(Some(Duration::ZERO), 16), 16);
        assert!(overlaps(ms(5)));
        // A second's worth at the pace.
        assert_eq!(jobs_per_lease(ms(100), 64), 10);
        assert_eq!(jobs_per_lease(ms(300), 16), 3);
        // Slow ports: one at a time, each answer awaited.
        assert_eq!(jobs_per_lease(ms(2_500), 16), 1);
        assert!(!overlaps(ms(2_500)));
        assert!(!overlaps(Some(LEASE_AHEAD)));
        // `--lease-batch 1` never leases ahead; out-of-range bounds are clamped.
        assert_eq!(jobs_per_lease(ms(1), 1), 1);
        assert_eq!(jobs_per_lease(ms(1), 0), 1);
        assert_eq!(jobs_per_lease(ms(1), 1_000), 64);
    }
}
