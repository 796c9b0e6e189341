//! Human and JSON renderings of registry messages.

use patchport_proto::v1;
use serde_json::{Value, json};

pub(crate) fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub(crate) fn short_digest(d: &str) -> &str {
    d.get(..19).unwrap_or(d)
}

pub(crate) fn state_name(state: i32) -> &'static str {
    match v1::VersionState::try_from(state) {
        Ok(v1::VersionState::Published) => "published",
        Ok(v1::VersionState::Yanked) => "yanked",
        _ => "unknown",
    }
}

pub(crate) fn port_state_name(state: i32) -> &'static str {
    match v1::PortState::try_from(state) {
        Ok(v1::PortState::Queued) => "queued",
        Ok(v1::PortState::Running) => "running",
        Ok(v1::PortState::Succeeded) => "succeeded",
        Ok(v1::PortState::Incompatible) => "incompatible",
        Ok(v1::PortState::Failed) => "failed",
        Ok(v1::PortState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn millis(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

pub(crate) fn file_json(f: &v1::FileEntry) -> Value {
    json!({"path": f.path, "digest": f.digest, "size": f.size})
}

pub(crate) fn base_json(b: &v1::BaseVersion) -> Value {
    let config = b.config.as_ref().map(|c| {
        json!({
            "model_type": c.model_type,
            "architectures": c.architectures,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size,
            "dtype": c.torch_dtype,
        })
    });
    json!({
        "name": b.name,
        "version": b.version,
        "reference": format!("{}:{}", b.name, b.version),
        "digest": b.digest,
        "parent": if b.parent.is_empty() { Value::Null } else { json!(b.parent) },
        "parent_digest": if b.parent_digest.is_empty() { Value::Null } else { json!(b.parent_digest) },
        "state": state_name(b.state),
        "yank_reason": if b.yank_reason.is_empty() { Value::Null } else { json!(b.yank_reason) },
        "config": config,
        "tensor_count": b.tensor_count,
        "total_size": b.total_size,
        "created_at_ms": millis(b.created_at.as_ref()),
        "files": b.files.iter().map(file_json).collect::<Vec<_>>(),
    })
}

pub(crate) fn patch_json(p: &v1::PatchVersion) -> Value {
    let adapter = p.adapter.as_ref().map(|a| {
        json!({
            "peft_type": a.peft_type,
            "r": a.r,
            "lora_alpha": a.lora_alpha,
            "use_rslora": a.use_rslora,
            "use_dora": a.use_dora,
            "fan_in_fan_out": a.fan_in_fan_out,
            "target_modules": a.target_modules,
            "target_modules_regex": a.target_modules_regex,
            "rank_pattern": a.rank_pattern,
            "alpha_pattern": a.alpha_pattern,
            "modules_to_save": a.modules_to_save,
            "base_model_name_or_path": a.base_model_name_or_path,
            "revision": a.revision,
            "lora_bias": a.lora_bias,
        })
    });
    json!({
        "name": p.name,
        "version": p.version,
        "reference": format!("{}:{}", p.name, p.version),
        "digest": p.digest,
        "base": p.base.as_ref().map(|b| json!({
            "name": b.name, "version": b.version, "digest": b.digest,
            "reference": format!("{}:{}", b.name, b.version),
        })),
        "state": state_name(p.state),
        "adapter": adapter,
        "tensor_count": p.tensor_count,
        "total_size": p.total_size,
        "eval_digest": if p.eval_digest.is_empty() { Value::Null } else { json!(p.eval_digest) },
        "created_at_ms": millis(p.created_at.as_ref()),
        "files": p.files.iter().map(file_json).collect::<Vec<_>>(),
    })
}

fn print_files(files: &[v1::FileEntry]) {
    println!("  files:");
    for f in files {
        println!(
            "    {:<44} {:>10}  {}",
            f.path,
            human_bytes(f.size),
            short_digest(&f.digest)
        );
    }
}

pub(crate) fn print_base(b: &v1::BaseVersion) {
    println!("base {}:{} ({})", b.name, b.version, state_name(b.state));
    println!("  digest   {}", b.digest);
    if !b.parent.is_empty() {
        println!(
            "  parent   {} ({})",
            b.parent,
            short_digest(&b.parent_digest)
        );
    }
    if let Some(c) = &b.config {
        println!(
            "  model    {} hidden {} layers {} heads {} vocab {} {}",
            c.model_type,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.vocab_size,
            c.torch_dtype
        );
    }
    println!(
        "  tensors  {} in {}",
        b.tensor_count,
        human_bytes(b.total_size)
    );
    print_files(&b.files);
}

pub(crate) fn print_patch(p: &v1::PatchVersion) {
    println!("patch {}:{} ({})", p.name, p.version, state_name(p.state));
    println!("  digest   {}", p.digest);
    if let Some(b) = &p.base {
        println!(
            "  base     {}:{} ({})",
            b.name,
            b.version,
            short_digest(&b.digest)
        );
    }
    if let Some(a) = &p.adapter {
        println!(
            "  adapter  {} r={} alpha={} targets [{}]{}{}",
            a.peft_type,
            a.r,
            a.lora_alpha,
            a.target_modules.join(", "),
            if a.use_rslora { " rslora" } else { "" },
            if a.use_dora { " dora" } else { "" }
        );
    }
    println!(
        "  tensors  {} in {}",
        p.tensor_count,
        human_bytes(p.total_size)
    );
    print_files(&p.files);
}

fn arm_json(a: Option<&v1::ArmResult>) -> Value {
    a.map_or(
        Value::Null,
        |a| json!({"metric": a.metric, a.metric.clone(): a.value, "items": a.items}),
    )
}

/// A port's quality-gate result (`null` when not evaluated).
pub(crate) fn evaluation_json(e: Option<&v1::Evaluation>) -> Value {
    let Some(e) = e else { return Value::Null };
    json!({
        "status": e.status,
        "reason": if e.reason.is_empty() { Value::Null } else { json!(e.reason) },
        "verdict": if e.verdict.is_empty() { Value::Null } else { json!(e.verdict) },
        "reference": arm_json(e.reference.as_ref()),
        "base_alone": arm_json(e.base_alone.as_ref()),
        "ported": arm_json(e.ported.as_ref()),
        "delta": e.delta,
        "standard_error": e.standard_error,
        "threshold": e.threshold,
        "gain_over_base": e.gain_over_base,
        "eval_digest": e.eval_digest,
        "seconds": e.seconds,
    })
}

/// One line about a port's gate: `risk 0.16 · regressed: accuracy 0.925 vs 0.944`.
pub(crate) fn gate_line(p: &v1::Port) -> String {
    let mut out = p.diagnostics.as_ref().map_or_else(String::new, |d| {
        format!(
            "risk {:.2}{}",
            d.risk,
            if d.high_risk { " (high)" } else { "" }
        )
    });
    if let Some(e) = &p.evaluation {
        let part = match e.status.as_str() {
            "evaluated" => format!(
                "{}: {} {:.4} vs {:.4} on the old base, {:.4} new base alone",
                e.verdict,
                e.ported.as_ref().map_or("metric", |a| a.metric.as_str()),
                e.ported.as_ref().map_or(0.0, |a| a.value),
                e.reference.as_ref().map_or(0.0, |a| a.value),
                e.base_alone.as_ref().map_or(0.0, |a| a.value),
            ),
            other => format!("{}: {}", other.replace('_', " "), e.reason),
        };
        if !out.is_empty() {
            out.push_str(" · ");
        }
        out.push_str(&part);
    }
    out
}
