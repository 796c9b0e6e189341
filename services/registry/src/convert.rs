//! Store records to wire messages, as functions (the store's types are foreign to
//! `patchport-proto`), and a worker's evaluation to what the store keeps. Core domain
//! types meet the wire through `patchport_proto::convert`; request messages are parsed
//! by each service's request types.

use patchport_core::adapter::{AdapterConfig, InitLoraWeights, TargetModules};
use patchport_core::layout::TensorRecord;
use patchport_core::model_config::ModelConfig;
use patchport_proto::convert::WireError;
use patchport_proto::v1;
use patchport_store::meta::{
    BaseVersionRecord, EventRecord, PatchVersionRecord, PortRecord, PortState, VersionState,
};

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
    // Validated at push: no pattern is compiled to list or get a patch.
    let c = AdapterConfig::parse_stored(json.as_bytes()).ok()?;
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
        files: r.files.iter().map(Into::into).collect(),
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
        files: r.files.iter().map(Into::into).collect(),
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

pub(crate) fn port_to_proto(p: &PortRecord) -> v1::Port {
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
        refusals: p.refusals.iter().map(Into::into).collect(),
        diagnostics: p.diagnostics.as_ref().map(Into::into),
        adapter_files: p.adapter_files.iter().map(Into::into).collect(),
        merged_files: p.merged_files.iter().map(Into::into).collect(),
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

/// A patch version on its own base, as a compat entry.
pub(crate) fn compat_native(p: &PatchVersionRecord) -> v1::CompatEntry {
    v1::CompatEntry {
        patch: format!("{}:{}", p.name, p.version),
        patch_digest: p.digest.to_string(),
        base: format!("{}:{}", p.base_name, p.base_version),
        base_digest: p.base_digest.to_string(),
        kind: v1::CompatKind::Native as i32,
        port: None,
    }
}

/// A port, as a compat entry: without its file lists (`GetPort` and pulls have them), so
/// a page of compat entries stays small.
pub(crate) fn compat_port(port: &PortRecord) -> v1::CompatEntry {
    let kind = match port.state {
        PortState::Queued => v1::CompatKind::Queued,
        PortState::Running => v1::CompatKind::Running,
        PortState::Succeeded => v1::CompatKind::Ported,
        PortState::Incompatible => v1::CompatKind::Incompatible,
        PortState::Failed => v1::CompatKind::Failed,
        PortState::Cancelled => v1::CompatKind::Cancelled,
    };
    v1::CompatEntry {
        patch: format!("{}:{}", port.patch_name, port.patch_version),
        patch_digest: port.patch_digest.to_string(),
        base: format!("{}:{}", port.base_name, port.base_version),
        base_digest: port.base_digest.to_string(),
        kind: kind as i32,
        port: Some(v1::Port {
            adapter_files: Vec::new(),
            merged_files: Vec::new(),
            ..port_to_proto(port)
        }),
    }
}

pub(crate) fn event_to_proto(e: EventRecord) -> v1::Event {
    let payload_json = e.payload_json.clone().unwrap_or_else(|| {
        serde_json::json!({
            "job_id": e.job_id,
            "port_id": e.port_id,
            "detail": e.detail,
        })
        .to_string()
    });
    v1::Event {
        id: e.id.to_string(),
        cursor: e.cursor.to_string(),
        r#type: e.kind.as_str().to_owned(),
        time: Some(timestamp(e.created_at)),
        subject: e.subject,
        payload_json,
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

/// Checks a worker's evaluation and turns it into what the store keeps (fields named
/// within the evaluation: `status`, `report_json`, ...).
pub(crate) fn evaluation_record(
    e: &v1::Evaluation,
) -> Result<patchport_store::meta::EvaluationRecord, WireError> {
    let summary = match e.status.as_str() {
        "evaluated" => match e.verdict.as_str() {
            v @ ("improved" | "preserved" | "regressed") => v.to_owned(),
            other => {
                return Err(WireError::invalid(
                    "verdict",
                    format!("{other:?}: expected improved, preserved or regressed"),
                ));
            }
        },
        s @ ("not_evaluable" | "failed") => s.to_owned(),
        other => {
            return Err(WireError::invalid(
                "status",
                format!("{other:?}: expected evaluated, not_evaluable or failed"),
            ));
        }
    };
    if e.status == "evaluated" {
        let arms = [
            ("reference", &e.reference),
            ("base_alone", &e.base_alone),
            ("ported", &e.ported),
        ];
        if let Some((arm, _)) = arms.iter().find(|(_, a)| a.is_none()) {
            return Err(WireError::missing(*arm));
        }
    }
    let numbers = [
        ("delta", e.delta),
        ("standard_error", e.standard_error),
        ("threshold", e.threshold),
        ("gain_over_base", e.gain_over_base),
        ("seconds", e.seconds),
    ];
    if let Some((field, _)) = numbers.iter().find(|(_, x)| !x.is_finite()) {
        return Err(WireError::invalid(*field, "must be finite"));
    }
    if e.reason.len() > 4096 {
        return Err(WireError::invalid("reason", "longer than 4096 bytes"));
    }
    if e.report_json.len() > MAX_REPORT {
        return Err(WireError::invalid("report_json", "larger than 8 MiB"));
    }
    let report: serde_json::Value = if e.report_json.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&e.report_json)
            .map_err(|err| WireError::invalid("report_json", format!("not JSON: {err}")))?
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
