//! The lease loop: lease a job (preferring the base this worker already holds), keep the
//! lease alive with heartbeats, port, and complete or fail the job with its fencing
//! token. On shutdown the current lease is released, not left to expire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use patchport_client::{Client, ClientError};
use patchport_engine::Device;
use patchport_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::{WorkerError, WorkerState, port_job_with};

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
}

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
/// sharing one tensor cache.
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
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (client, config, state, shutdown) = (
            client.clone(),
            config.clone(),
            state.clone(),
            shutdown.clone(),
        );
        loops.spawn(async move { lease_loop(client, &config, &state, shutdown).await });
    }
    let mut result = Ok(());
    while let Some(r) = loops.join_next().await {
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
    }
    result
}

/// One lease loop.
async fn lease_loop(
    client: Client,
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let mut loaded: Vec<String> = Vec::new();
    let mut failures = 0u32;
    let mut workers = client.workers();
    while !shutdown.is_cancelled() {
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
        });
        tokio::pin!(call);
        let lease = tokio::select! {
            r = &mut call => r,
            () = shutdown.cancelled() => {
                // The registry may already have leased a job to this call, its answer
                // on the way: dropping the call would strand that lease until it
                // expires. Wait briefly for an answer and give back what it brought; a
                // call still long-polling after that holds nothing.
                let limit = config.lease_wait.min(Duration::from_secs(2));
                if let Ok(Ok(resp)) = tokio::time::timeout(limit, &mut call).await
                    && let Some(job) = resp.into_inner().job
                {
                    release(&client, &job.job_id, job.fencing_token).await;
                }
                break;
            }
        };
        let job = match lease {
            Ok(resp) => {
                failures = 0;
                match resp.into_inner().job {
                    Some(job) => job,
                    None => continue,
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
        };
        let target = job
            .target_base
            .as_ref()
            .map(|b| b.digest.clone())
            .unwrap_or_default();
        tracing::info!(job_id = %job.job_id, attempt = job.attempt, "job leased");
        run_one(&client, config, state, &job, &shutdown).await?;
        loaded = vec![target];
    }
    Ok(())
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
        job_id = %job.job_id,
        attempt = job.attempt,
        patch = %reference(job.patch.as_ref().map(|p| p.name.as_str()), job.patch.as_ref().map(|p| p.version.as_str())),
        source_base = %reference(job.source_base.as_ref().map(|b| b.name.as_str()), job.source_base.as_ref().map(|b| b.version.as_str())),
        target_base = %reference(job.target_base.as_ref().map(|b| b.name.as_str()), job.target_base.as_ref().map(|b| b.version.as_str())),
    )
)]
async fn run_one(
    client: &Client,
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
    job: &v1::Job,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let leased = Instant::now();
    let (job_id, token) = (job.job_id.clone(), job.fencing_token);
    // Fault-injection hooks for the crash tests: stall after leasing, without heartbeats,
    // as a hung or partitioned worker would: for a time, or until a file exists (the test
    // decides when the stalled worker wakes).
    let stall_ms = std::env::var("PATCHPORT_TEST_STALL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let stall_until = std::env::var_os("PATCHPORT_TEST_STALL_UNTIL").map(std::path::PathBuf::from);
    if stall_ms.is_some() || stall_until.is_some() {
        tracing::warn!(job_id = %job_id, ?stall_ms, ?stall_until, "stalling (PATCHPORT_TEST_STALL_*)");
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
                release(client, &job_id, token).await;
                record(leased, "released");
                return Ok(());
            }
        }
    }
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
        let (client, job_id, lost) = (client.clone(), job_id.clone(), lost.clone());
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
    let outcome = tokio::select! {
        r = port_and_evaluate(client, job, config, state) => Some(r),
        () = lost.cancelled() => None,
        () = shutdown.cancelled() => {
            heartbeat.abort();
            release(client, &job_id, token).await;
            record(leased, "released");
            return Ok(());
        }
    };
    heartbeat.abort();
    let Some(outcome) = outcome else {
        // Cancelled or the lease went to another worker: nothing of ours may be written.
        record(leased, "lost");
        return Ok(());
    };
    let label = match &outcome {
        Ok(r) if r.refusals.is_empty() => "succeeded",
        Ok(_) => "incompatible",
        Err(_) => "failed",
    };
    let reply = match outcome {
        Ok(r) => client
            .workers()
            .complete_job(v1::CompleteJobRequest {
                // Recorded in the port's signed provenance.
                device: config.device.to_string(),
                ..r.into_request(job_id.clone(), token)
            })
            .await
            .map(|_| ()),
        Err(e) => {
            let retryable = !matches!(e, WorkerError::BadJob { .. });
            tracing::warn!(job_id = %job_id, error = %e, retryable, "port failed");
            client
                .workers()
                .fail_job(v1::FailJobRequest {
                    job_id: job_id.clone(),
                    fencing_token: token,
                    error: e.to_string(),
                    retryable,
                })
                .await
                .map(|_| ())
        }
    };
    match reply {
        Ok(()) => {
            record(leased, label);
            Ok(())
        }
        // A stale fence: the job was leased again after our lease expired; our result
        // is refused by design and the other attempt owns it.
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            tracing::warn!(job_id = %job_id, error = %s.message(), "result refused by the fence");
            record(leased, "lost");
            Ok(())
        }
        Err(s) => Err(WorkerError::Registry {
            source: ClientError::from(s),
        }),
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
