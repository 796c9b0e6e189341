//! The quality gate on the worker: after a port, the three arms of `patchport-eval` on
//! the patch version's eval set, with the versions downloaded into a local cache (a
//! worker holds the bases it ports) and the reference arm (old base + patch) computed
//! once per patch, old base and eval set and cached on disk.
//!
//! An evaluation never fails a port: what cannot be evaluated says why
//! (`not_evaluable`), and what breaks is reported as `failed` with its cause.

use std::path::{Path, PathBuf};

use patchport_client::{Client, NoProgress};
use patchport_eval::{ArmResult, EvalError, EvalSet, GateReport, VerdictPolicy};
use patchport_proto::v1;

use crate::WorkerError;

/// Where downloaded versions and cached reference arms live.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The cache directory (created on first use).
    pub cache_dir: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

impl GateConfig {
    /// The default cache: `$PATCHPORT_CACHE_DIR`, else `<tmp>/patchport-worker-cache`.
    pub fn new(device: String) -> Self {
        let cache_dir = std::env::var_os("PATCHPORT_CACHE_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("patchport-worker-cache"));
        Self { cache_dir, device }
    }
}

fn not_evaluable(reason: impl Into<String>, eval_digest: &str) -> v1::Evaluation {
    v1::Evaluation {
        status: "not_evaluable".to_owned(),
        reason: reason.into(),
        eval_digest: eval_digest.to_owned(),
        ..Default::default()
    }
}

fn failed(reason: impl Into<String>, eval_digest: &str) -> v1::Evaluation {
    v1::Evaluation {
        status: "failed".to_owned(),
        reason: reason.into(),
        eval_digest: eval_digest.to_owned(),
        ..Default::default()
    }
}

fn arm(a: &ArmResult) -> v1::ArmResult {
    v1::ArmResult {
        metric: a.metric.as_str().to_owned(),
        value: a.value(),
        items: u32::try_from(a.n).unwrap_or(u32::MAX),
    }
}

/// The wire form of a gate report.
pub fn evaluation_of(report: &GateReport, eval_digest: &str) -> v1::Evaluation {
    let v = &report.verdict;
    v1::Evaluation {
        status: "evaluated".to_owned(),
        reason: String::new(),
        verdict: v.verdict.as_str().to_owned(),
        reference: Some(arm(&report.arms.reference)),
        base_alone: Some(arm(&report.arms.base_alone)),
        ported: Some(arm(&report.arms.ported)),
        delta: v.delta,
        standard_error: v.standard_error,
        threshold: v.threshold,
        gain_over_base: v.gain_over_base,
        eval_digest: eval_digest.to_owned(),
        seconds: report.seconds,
        report_json: serde_json::to_string(report).unwrap_or_default(),
    }
}

/// Downloads every file of a version into `<cache>/versions/<digest>` once (a marker
/// file says the directory is complete).
async fn fetch_version(
    client: &Client,
    cache: &Path,
    digest: &str,
    files: &[v1::FileEntry],
) -> Result<PathBuf, WorkerError> {
    let dir = cache.join("versions").join(digest.replace(':', "-"));
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    let tmp = cache.join("versions").join(format!(
        ".{}.{}",
        digest.replace(':', "-"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    for f in files {
        client
            .download_file(f, patchport_client::FileSource::Blob, &tmp, &NoProgress)
            .await?;
    }
    std::fs::write(tmp.join(".complete"), b"").map_err(|e| io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

fn io(path: &Path, e: std::io::Error) -> WorkerError {
    WorkerError::Task {
        message: format!("{}: {e}", path.display()),
    }
}

/// Runs the gate for a job whose port succeeded; `None` when the patch version has no
/// eval set.
pub async fn evaluate(
    client: &Client,
    job: &v1::Job,
    config: &GateConfig,
) -> Option<v1::Evaluation> {
    let patch = job.patch.as_ref()?;
    let eval_digest = patch.eval_digest.clone();
    if eval_digest.is_empty() {
        return None;
    }
    let (Some(source), Some(target)) = (job.source_base.as_ref(), job.target_base.as_ref()) else {
        return Some(failed("the job names no bases", &eval_digest));
    };
    for base in [source, target] {
        if !base.files.iter().any(|f| f.path == "tokenizer.json") {
            return Some(not_evaluable(
                format!("base {}:{} has no tokenizer.json", base.name, base.version),
                &eval_digest,
            ));
        }
    }
    match run(client, patch, source, target, &eval_digest, config).await {
        Ok(e) => Some(e),
        Err(e) => Some(failed(e.to_string(), &eval_digest)),
    }
}

async fn run(
    client: &Client,
    patch: &v1::PatchVersion,
    source: &v1::BaseVersion,
    target: &v1::BaseVersion,
    eval_digest: &str,
    config: &GateConfig,
) -> Result<v1::Evaluation, WorkerError> {
    let cache = &config.cache_dir;
    let old_dir = fetch_version(client, cache, &source.digest, &source.files).await?;
    let new_dir = fetch_version(client, cache, &target.digest, &target.files).await?;
    let patch_dir = fetch_version(client, cache, &patch.digest, &patch.files).await?;
    let size = client
        .blobs()
        .stat_blob(v1::StatBlobRequest {
            digest: eval_digest.to_owned(),
        })
        .await
        .map_err(patchport_client::ClientError::from)?
        .into_inner()
        .size;
    let eval_entry = v1::FileEntry {
        path: "eval.jsonl".to_owned(),
        digest: eval_digest.to_owned(),
        size,
        ..Default::default()
    };
    let eval_dir = fetch_version(
        client,
        cache,
        eval_digest,
        std::slice::from_ref(&eval_entry),
    )
    .await?;
    let reference_cache = cache.join("reference").join(format!(
        "{}_{}_{}.json",
        patch.digest.replace(':', "-"),
        source.digest.replace(':', "-"),
        eval_digest.replace(':', "-")
    ));
    let device = config.device.clone();
    let digest = eval_digest.to_owned();
    let outcome = tokio::task::spawn_blocking(move || -> Result<v1::Evaluation, String> {
        let set = match EvalSet::parse(
            &std::fs::read(eval_dir.join("eval.jsonl")).map_err(|e| e.to_string())?,
        ) {
            Ok(s) => s,
            Err(e) => return Ok(failed(format!("eval set: {e}"), &digest)),
        };
        let device = patchport_eval::parse_device(&device).map_err(|e| e.to_string())?;
        let reference = match std::fs::read(&reference_cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<ArmResult>(&b).ok())
        {
            Some(r) => r,
            None => {
                let r =
                    match patchport_eval::evaluate_dir(&old_dir, Some(&patch_dir), &set, &device) {
                        Ok(r) => r,
                        Err(e) => return Ok(gate_error(e, &digest)),
                    };
                if let Some(parent) = reference_cache.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                if let Ok(bytes) = serde_json::to_vec(&r) {
                    let _ = std::fs::write(&reference_cache, bytes);
                }
                r
            }
        };
        match patchport_eval::gate_with_reference(
            reference,
            &new_dir,
            &patch_dir,
            &set,
            &device,
            &VerdictPolicy::default(),
        ) {
            Ok(report) => Ok(evaluation_of(&report, &digest)),
            Err(e) => Ok(gate_error(e, &digest)),
        }
    })
    .await
    .map_err(|e| WorkerError::Task {
        message: e.to_string(),
    })?;
    outcome.map_err(|message| WorkerError::Task { message })
}

fn gate_error(e: EvalError, eval_digest: &str) -> v1::Evaluation {
    if e.is_not_evaluable() {
        not_evaluable(e.to_string(), eval_digest)
    } else {
        failed(e.to_string(), eval_digest)
    }
}
