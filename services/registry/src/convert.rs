//! Domain records to wire messages and back. Parsing of request fields happens here,
//! once: a failure is InvalidArgument.

use patchport_core::Digest;
use patchport_core::adapter::{AdapterConfig, InitLoraWeights, TargetModules};
use patchport_core::layout::{FileRef, TensorRecord};
use patchport_core::model_config::ModelConfig;
use patchport_proto::v1;
use patchport_store::meta::{BaseVersionRecord, PatchVersionRecord, VersionState};

use crate::error::{ApiError, ApiResult};

pub(crate) fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn state(s: VersionState) -> i32 {
    match s {
        VersionState::Published => v1::VersionState::Published as i32,
        VersionState::Yanked => v1::VersionState::Yanked as i32,
    }
}

pub(crate) fn file_to_proto(f: &FileRef) -> v1::FileEntry {
    v1::FileEntry {
        path: f.path.clone(),
        digest: f.digest.to_string(),
        size: f.size,
        segments: Vec::new(),
    }
}

/// Parses the file list of a push. Composed files cannot be pushed.
pub(crate) fn files_from_proto(files: &[v1::FileEntry]) -> ApiResult<Vec<FileRef>> {
    files
        .iter()
        .map(|f| {
            if !f.segments.is_empty() {
                return Err(ApiError::invalid(format!(
                    "file {:?}: composed files (segments) cannot be pushed; upload the bytes as a blob",
                    f.path
                )));
            }
            let digest: Digest = f
                .digest
                .parse()
                .map_err(|e: patchport_core::DigestError| ApiError::invalid(format!("file {:?}: {e}", f.path)))?;
            Ok(FileRef {
                path: f.path.clone(),
                digest,
                size: f.size,
            })
        })
        .collect()
}

pub(crate) fn model_config(json: &str) -> Option<v1::ModelConfig> {
    let c = ModelConfig::parse(json.as_bytes()).ok()?;
    Some(v1::ModelConfig {
        model_type: c.model_type,
        architectures: c.architectures,
        hidden_size: c.hidden_size.unwrap_or(0),
        num_hidden_layers: c.num_hidden_layers.unwrap_or(0),
        num_attention_heads: c.num_attention_heads.unwrap_or(0),
        num_key_value_heads: c.num_key_value_heads.unwrap_or(0),
        vocab_size: c.vocab_size.unwrap_or(0),
        torch_dtype: c.torch_dtype.unwrap_or_default(),
        raw_json: json.to_owned(),
    })
}

pub(crate) fn adapter_config(json: &str) -> Option<v1::AdapterConfig> {
    let c = AdapterConfig::parse(json.as_bytes()).ok()?;
    let (target_modules, target_modules_regex) = match &c.target_modules {
        TargetModules::None => (Vec::new(), String::new()),
        TargetModules::List(l) => (l.clone(), String::new()),
        TargetModules::Regex(r) => (Vec::new(), r.clone()),
    };
    let trainable_token_indices = c
        .raw
        .get("trainable_token_indices")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    Some(v1::AdapterConfig {
        peft_type: c.peft_type.clone(),
        r: c.r,
        lora_alpha: c.lora_alpha,
        use_rslora: c.use_rslora,
        use_dora: c.use_dora,
        fan_in_fan_out: c.fan_in_fan_out,
        target_modules,
        target_modules_regex,
        rank_pattern: c.rank_pattern_map().into_iter().collect(),
        alpha_pattern: c.alpha_pattern_map().into_iter().collect(),
        modules_to_save: c.modules_to_save.clone(),
        base_model_name_or_path: c.base_model_name_or_path.clone().unwrap_or_default(),
        revision: c.revision.clone().unwrap_or_default(),
        lora_bias: c.lora_bias,
        init_lora_weights: match &c.init_lora_weights {
            InitLoraWeights::Method(m) => m.clone(),
            InitLoraWeights::Bool(_) => String::new(),
        },
        trainable_token_indices,
        raw_json: json.to_owned(),
    })
}

pub(crate) fn base_to_proto(r: &BaseVersionRecord) -> v1::BaseVersion {
    v1::BaseVersion {
        name: r.name.to_string(),
        version: r.version.to_string(),
        digest: r.digest.to_string(),
        parent: r
            .parent
            .as_ref()
            .map(|p| p.0.to_string())
            .unwrap_or_default(),
        parent_digest: r
            .parent
            .as_ref()
            .map(|p| p.1.to_string())
            .unwrap_or_default(),
        state: state(r.state),
        files: r.files.iter().map(file_to_proto).collect(),
        config: model_config(&r.config_json),
        tensor_count: r.tensor_count as u32,
        total_size: r.total_size,
        created_at: Some(timestamp(r.created_at)),
        yank_reason: r.yank_reason.clone().unwrap_or_default(),
    }
}

pub(crate) fn patch_to_proto(r: &PatchVersionRecord) -> v1::PatchVersion {
    v1::PatchVersion {
        name: r.name.to_string(),
        version: r.version.to_string(),
        digest: r.digest.to_string(),
        base: Some(v1::BaseRef {
            name: r.base_name.to_string(),
            version: r.base_version.to_string(),
            digest: r.base_digest.to_string(),
        }),
        state: state(r.state),
        files: r.files.iter().map(file_to_proto).collect(),
        adapter: adapter_config(&r.adapter_json),
        tensor_count: r.tensor_count as u32,
        total_size: r.total_size,
        created_at: Some(timestamp(r.created_at)),
        eval_digest: r.eval_digest.map(|d| d.to_string()).unwrap_or_default(),
    }
}

pub(crate) fn tensor_to_proto(file: &str, t: &TensorRecord) -> v1::TensorEntry {
    v1::TensorEntry {
        name: t.name.clone(),
        dtype: t.dtype.clone(),
        shape: t.shape.clone(),
        file: file.to_owned(),
        begin: t.begin,
        end: t.end,
        digest: t.digest.to_string(),
    }
}

pub(crate) fn artifact_to_proto(a: &patchport_core::layout::ArtifactFile) -> v1::FileEntry {
    v1::FileEntry {
        path: a.file.path.clone(),
        digest: a.file.digest.to_string(),
        size: a.file.size,
        segments: a
            .segments
            .iter()
            .map(|s| v1::Segment {
                source: Some(v1::segment::Source::Blob(v1::BlobRange {
                    digest: s.digest.to_string(),
                    offset: s.offset,
                    length: s.length,
                })),
            })
            .collect(),
    }
}

fn diagnostics_to_proto(d: &patchport_core::port::ModuleDiagnostics) -> v1::ModuleDiagnostics {
    v1::ModuleDiagnostics {
        module: d.module.clone(),
        base_drift: d.base_drift,
        patch_size: d.patch_size,
        drift_to_patch: d.drift_to_patch,
        cosine: d.cosine,
        unchanged: d.unchanged,
    }
}

pub(crate) fn port_to_proto(p: &patchport_store::meta::PortRecord) -> v1::Port {
    use patchport_store::meta::PortState;
    let state = match p.state {
        PortState::Queued => v1::PortState::Queued,
        PortState::Running => v1::PortState::Running,
        PortState::Succeeded => v1::PortState::Succeeded,
        PortState::Incompatible => v1::PortState::Incompatible,
        PortState::Failed => v1::PortState::Failed,
        PortState::Cancelled => v1::PortState::Cancelled,
    };
    v1::Port {
        patch: format!("{}:{}", p.patch_name, p.patch_version),
        patch_digest: p.patch_digest.to_string(),
        base: format!("{}:{}", p.base_name, p.base_version),
        base_digest: p.base_digest.to_string(),
        source_base_digest: p.source_base_digest.to_string(),
        state: state as i32,
        refusals: p
            .refusals
            .iter()
            .map(|r| v1::Refusal {
                kind: r.kind.as_str().to_owned(),
                message: r.message.clone(),
                subject: r.subject.clone(),
            })
            .collect(),
        diagnostics: p.diagnostics.as_ref().map(|d| v1::PortDiagnostics {
            modules: d.modules.iter().map(diagnostics_to_proto).collect(),
            total: Some(diagnostics_to_proto(&d.total)),
            risk: d.risk(),
        }),
        adapter_files: p.adapter_files.iter().map(artifact_to_proto).collect(),
        merged_files: p.merged_files.iter().map(artifact_to_proto).collect(),
        attempts: p.attempts,
        error: p.error.clone().unwrap_or_default(),
        method_version: p.method_version.clone(),
        queued_at: Some(timestamp(p.queued_at)),
        started_at: p.started_at.map(timestamp),
        finished_at: p.finished_at.map(timestamp),
        job_id: p.job_id.map(|id| id.to_string()).unwrap_or_default(),
        evaluation: p.evaluation_json.as_deref().and_then(evaluation_from_json),
        queue_position: p
            .queue_position
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

/// The verdicts a passing port may have.
pub(crate) fn passed(e: &v1::Evaluation) -> bool {
    e.status == "evaluated" && matches!(e.verdict.as_str(), "improved" | "preserved")
}

fn arm_json(a: Option<&v1::ArmResult>) -> serde_json::Value {
    a.map_or(
        serde_json::Value::Null,
        |a| serde_json::json!({"metric": a.metric, "value": a.value, "items": a.items}),
    )
}

fn arm_from(v: &serde_json::Value) -> Option<v1::ArmResult> {
    Some(v1::ArmResult {
        metric: v.get("metric")?.as_str()?.to_owned(),
        value: v.get("value")?.as_f64()?,
        items: u32::try_from(v.get("items")?.as_u64()?).ok()?,
    })
}

/// Largest evaluation report a worker may send.
const MAX_REPORT: usize = 8 << 20;

/// Checks a worker's evaluation and turns it into what the store keeps.
pub(crate) fn evaluation_record(
    e: &v1::Evaluation,
) -> ApiResult<patchport_store::meta::EvaluationRecord> {
    let summary = match e.status.as_str() {
        "evaluated" => match e.verdict.as_str() {
            v @ ("improved" | "preserved" | "regressed") => v.to_owned(),
            other => {
                return Err(ApiError::invalid(format!(
                    "evaluation verdict {other:?}: expected improved, preserved or regressed"
                )));
            }
        },
        s @ ("not_evaluable" | "failed") => s.to_owned(),
        other => {
            return Err(ApiError::invalid(format!(
                "evaluation status {other:?}: expected evaluated, not_evaluable or failed"
            )));
        }
    };
    if e.status == "evaluated"
        && (e.reference.is_none() || e.base_alone.is_none() || e.ported.is_none())
    {
        return Err(ApiError::invalid("an evaluated port needs its three arms"));
    }
    let numbers = [
        e.delta,
        e.standard_error,
        e.threshold,
        e.gain_over_base,
        e.seconds,
    ];
    if numbers.iter().any(|x| !x.is_finite()) {
        return Err(ApiError::invalid("evaluation numbers must be finite"));
    }
    if e.reason.len() > 4096 || e.report_json.len() > MAX_REPORT {
        return Err(ApiError::invalid("evaluation reason or report too large"));
    }
    let report: serde_json::Value = if e.report_json.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&e.report_json)
            .map_err(|err| ApiError::invalid(format!("evaluation report is not JSON: {err}")))?
    };
    let json = serde_json::json!({
        "status": e.status,
        "reason": e.reason,
        "verdict": e.verdict,
        "reference": arm_json(e.reference.as_ref()),
        "base_alone": arm_json(e.base_alone.as_ref()),
        "ported": arm_json(e.ported.as_ref()),
        "delta": e.delta,
        "standard_error": e.standard_error,
        "threshold": e.threshold,
        "gain_over_base": e.gain_over_base,
        "eval_digest": e.eval_digest,
        "seconds": e.seconds,
        "report": report,
    });
    Ok(patchport_store::meta::EvaluationRecord {
        summary,
        json: json.to_string(),
    })
}

/// A stored evaluation back on the wire (None if the stored JSON is unusable).
pub(crate) fn evaluation_from_json(s: &str) -> Option<v1::Evaluation> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let text = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let num = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_default()
    };
    Some(v1::Evaluation {
        status: text("status"),
        reason: text("reason"),
        verdict: text("verdict"),
        reference: v.get("reference").and_then(arm_from),
        base_alone: v.get("base_alone").and_then(arm_from),
        ported: v.get("ported").and_then(arm_from),
        delta: num("delta"),
        standard_error: num("standard_error"),
        threshold: num("threshold"),
        gain_over_base: num("gain_over_base"),
        eval_digest: text("eval_digest"),
        seconds: num("seconds"),
        report_json: v
            .get("report")
            .filter(|r| !r.is_null())
            .map(|r| r.to_string())
            .unwrap_or_default(),
    })
}
