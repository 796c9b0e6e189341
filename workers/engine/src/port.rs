//! The port itself: the ported adapter, the merged tensors one at a time, diagnostics.

use std::time::Instant;

use patchport_core::layout::count_non_finite;
use patchport_core::port::{ModuleDiagnostics, PortDiagnostics, Refusal, RefusalKind};
use patchport_core::safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::EngineError;
use crate::kernel::{DeltaStats, LowRankDelta, merge_tensor};
use crate::numeric::decode_f64;
use crate::offline::PortOptions;
use crate::plan::{ComposedFile, ModulePlan, Preflight, preflight};
use crate::source::ModelSource;

/// Receives the merged tensors, one at a time, in the order they appear in
/// [`PortOutcome::merged`]'s files. A registry stores each as a blob; the offline command
/// writes them into files as they come.
pub trait MergedSink {
    /// The merged model's files, once planned and before any tensor is merged (a sink
    /// that stores them elsewhere can prepare for them; nothing by default).
    fn planned(&mut self, _files: &[ComposedFile]) {}

    /// One merged tensor's bytes (the new base's dtype, shape and byte length).
    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()>;
}

/// The ported adapter: the patch's own files plus a re-pointed config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortedAdapter {
    /// The new `adapter_config.json` (`base_model_name_or_path`, `revision` re-pointed).
    pub config_json: Vec<u8>,
    /// The patch's files reused byte for byte (`adapter_model.safetensors`, README.md,
    /// ...): no new tensor bytes.
    pub reused_files: Vec<String>,
}

/// Wall time of the parts of a port, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Pre-flight (metadata reads and checks).
    pub preflight_s: f64,
    /// Reading tensors, merging and diagnostics.
    pub merge_s: f64,
    /// Time spent in the sink (storing or writing merged tensors and copies).
    pub write_s: f64,
    /// The whole port.
    pub total_s: f64,
}

/// What a port produced.
#[derive(Debug, Clone)]
pub struct PortOutcome {
    /// Why the port was refused; empty when it ported.
    pub refusals: Vec<Refusal>,
    /// The plan that was carried out.
    pub modules: Vec<ModulePlan>,
    /// Per-module and total diagnostics (empty when refused).
    pub diagnostics: PortDiagnostics,
    /// The ported adapter (`None` when refused).
    pub adapter: Option<PortedAdapter>,
    /// The merged model's files, when a sink was given and the port was not refused.
    pub merged: Option<Vec<ComposedFile>>,
    /// The base tensors taken from [`PortOptions::reuse`], in plan order: not read, not
    /// merged and not handed to the sink (their merged bytes are already stored).
    pub reused: Vec<String>,
    /// Timings.
    pub timings: Timings,
}

impl PortOutcome {
    /// True when the patch was ported.
    pub fn is_ported(&self) -> bool {
        self.refusals.is_empty()
    }
}

/// Ports `patch` (trained on `old`) onto `new`: pre-flight, then [`port_planned`].
pub fn port(
    old: &dyn ModelSource,
    new: &dyn ModelSource,
    patch: &dyn ModelSource,
    opts: &PortOptions,
    sink: Option<&mut dyn MergedSink>,
) -> Result<PortOutcome, EngineError> {
    let t0 = Instant::now();
    let pre = preflight(old, new, patch)?;
    let preflight_s = t0.elapsed().as_secs_f64();
    let mut out = port_planned(&pre, old, new, patch, opts, sink)?;
    out.timings.preflight_s = preflight_s;
    out.timings.total_s += preflight_s;
    Ok(out)
}

/// Carries out a [`Preflight`] made from the same sources: checks the patch tensors for
/// NaN/Inf (refusal `non_finite`, before anything is produced), builds the ported adapter,
/// and for each target module reads its weight in both bases, computes the diagnostics
/// and, when `sink` is given, hands the merged tensor to it. The merged model is produced
/// when a sink is given (`opts.merged` is read by [`crate::port_dirs`] only). A module
/// whose base tensor is in `opts.reuse` (with the module's name, the planned size and
/// the sums) is neither read nor merged nor handed to the sink: its diagnostics are made
/// from the earlier port's sums, which the total adds in plan order as a full port would.
pub fn port_planned(
    pre: &Preflight,
    old: &dyn ModelSource,
    new: &dyn ModelSource,
    patch: &dyn ModelSource,
    opts: &PortOptions,
    mut sink: Option<&mut dyn MergedSink>,
) -> Result<PortOutcome, EngineError> {
    let t0 = Instant::now();
    let refused = |refusals: Vec<Refusal>, t0: Instant| PortOutcome {
        refusals,
        modules: pre.modules.clone(),
        diagnostics: PortDiagnostics::default(),
        adapter: None,
        merged: None,
        reused: Vec::new(),
        timings: Timings {
            total_s: t0.elapsed().as_secs_f64(),
            ..Timings::default()
        },
    };
    if !pre.is_portable() {
        return Ok(refused(pre.refusals.clone(), t0));
    }
    let non_finite = scan_patch(pre, patch)?;
    if !non_finite.is_empty() {
        return Ok(refused(non_finite, t0));
    }

    let base_name = opts.new_base_name.clone().unwrap_or_else(|| new.name());
    let adapter = PortedAdapter {
        config_json: pre
            .adapter_config
            .repointed_json(&base_name, opts.new_base_revision.as_deref()),
        reused_files: pre.adapter_files.clone(),
    };

    if let Some(sink) = sink.as_deref_mut() {
        sink.planned(&pre.merged_files);
    }
    let mut bufs = Buffers::default();
    let mut modules = Vec::with_capacity(pre.modules.len());
    let mut total = DeltaStats::default();
    let mut all_unchanged = !pre.modules.is_empty();
    let mut write_s = 0.0;
    let mut reused = Vec::new();
    for plan in &pre.modules {
        let earlier = opts
            .reuse
            .get(&plan.base_tensor)
            .filter(|r| {
                r.diagnostics.module == plan.module && r.size == plan.new_range.1 - plan.new_range.0
            })
            .and_then(|r| r.diagnostics.sums.map(|s| (s, r.diagnostics.unchanged)));
        let (stats, unchanged) = if let Some(earlier) = earlier {
            reused.push(plan.base_tensor.clone());
            earlier
        } else {
            let (stats, unchanged) = merge_module(
                plan,
                old,
                new,
                patch,
                opts.device,
                sink.is_some(),
                &mut bufs,
            )?;
            if let Some(sink) = sink.as_deref_mut() {
                let t = Instant::now();
                sink.merged_tensor(&plan.base_tensor, &bufs.new)
                    .map_err(|source| EngineError::Sink {
                        tensor: plan.base_tensor.clone(),
                        source,
                    })?;
                write_s += t.elapsed().as_secs_f64();
            }
            (stats, unchanged)
        };
        tracing::debug!(module = %plan.module, unchanged, "merged");
        total.add(&stats);
        all_unchanged &= unchanged;
        modules.push(diagnostics(&plan.module, &stats, unchanged));
    }
    let total_s = t0.elapsed().as_secs_f64();
    Ok(PortOutcome {
        refusals: Vec::new(),
        modules: pre.modules.clone(),
        diagnostics: PortDiagnostics {
            modules,
            total: diagnostics("total", &total, all_unchanged),
        },
        adapter: Some(adapter),
        merged: sink.is_some().then(|| pre.merged_files.clone()),
        reused,
        timings: Timings {
            preflight_s: 0.0,
            merge_s: total_s - write_s,
            write_s,
            total_s,
        },
    })
}

/// Reused read buffers: the port's memory is these, sized by the largest tensor.
#[derive(Debug, Default)]
struct Buffers {
    new: Vec<u8>,
    old: Vec<u8>,
    raw: Vec<u8>,
    a: Vec<f64>,
    b: Vec<f64>,
}

fn read(
    src: &dyn ModelSource,
    file: &str,
    range: (u64, u64),
    buf: &mut Vec<u8>,
) -> Result<(), EngineError> {
    src.read_range(file, range.0, range.1, buf)
        .map_err(|source| EngineError::Io {
            path: src.location(file),
            source,
        })
}

/// Every LoRA factor of the plan checked for NaN and Inf (the patch is small; its
/// tensors are read again, one pair at a time, when merging).
fn scan_patch(pre: &Preflight, patch: &dyn ModelSource) -> Result<Vec<Refusal>, EngineError> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for plan in &pre.modules {
        for t in [&plan.lora_a, &plan.lora_b] {
            read(
                patch,
                patchport_core::layout::ADAPTER_WEIGHTS,
                (t.begin, t.end),
                &mut buf,
            )?;
            let n = count_non_finite(t.dtype, &buf);
            if n > 0 {
                out.push(Refusal::new(
                    RefusalKind::NonFinite,
                    &t.name,
                    format!("{}: {n} NaN or infinite values", t.name),
                ));
            }
        }
    }
    Ok(out)
}

fn merge_module(
    plan: &ModulePlan,
    old: &dyn ModelSource,
    new: &dyn ModelSource,
    patch: &dyn ModelSource,
    device: Device,
    write: bool,
    bufs: &mut Buffers,
) -> Result<(DeltaStats, bool), EngineError> {
    let weights = patchport_core::layout::ADAPTER_WEIGHTS;
    let bad = |tensor: &str| EngineError::BadTensor {
        tensor: tensor.to_owned(),
        message: "bytes do not match the dtype".to_owned(),
    };
    read(
        patch,
        weights,
        (plan.lora_a.begin, plan.lora_a.end),
        &mut bufs.raw,
    )?;
    decode_f64(plan.lora_a.dtype, &bufs.raw, &mut bufs.a).ok_or_else(|| bad(&plan.lora_a.name))?;
    read(
        patch,
        weights,
        (plan.lora_b.begin, plan.lora_b.end),
        &mut bufs.raw,
    )?;
    decode_f64(plan.lora_b.dtype, &bufs.raw, &mut bufs.b).ok_or_else(|| bad(&plan.lora_b.name))?;
    let rank = plan.rank as usize;
    let in_f = plan.lora_a.shape[1] as usize;
    let out_f = plan.lora_b.shape[0] as usize;
    let delta = LowRankDelta::from_lora(
        &bufs.a,
        &bufs.b,
        rank,
        in_f,
        out_f,
        plan.scale,
        plan.transpose,
    )?;

    read(new, &plan.new_file, plan.new_range, &mut bufs.new)?;
    let new_digest = new.tensor_digest(&plan.new_file, &plan.base_tensor);
    let old_digest = old.tensor_digest(&plan.old_file, &plan.base_tensor);
    let unchanged = plan.old_dtype == plan.dtype
        && matches!((new_digest, old_digest), (Some(a), Some(b)) if a == b);
    let old_bytes = if unchanged {
        None
    } else if plan.old_dtype == plan.dtype {
        read(old, &plan.old_file, plan.old_range, &mut bufs.old)?;
        Some((plan.dtype, bufs.old.as_slice()))
    } else {
        // A base re-stored in another dtype (v2 in bf16 from v1 in f32): the drift is
        // measured on values, so the old weight goes to the kernel as f64.
        read(old, &plan.old_file, plan.old_range, &mut bufs.raw)?;
        bufs.old.clear();
        let mut vals = Vec::new();
        for chunk in bufs.raw.chunks(1 << 16) {
            decode_f64(plan.old_dtype, chunk, &mut vals).ok_or_else(|| bad(&plan.base_tensor))?;
            for v in &vals {
                bufs.old.extend_from_slice(&v.to_le_bytes());
            }
        }
        Some((Dtype::F64, bufs.old.as_slice()))
    };
    let stats =
        merge_tensor(plan.dtype, &mut bufs.new, old_bytes, &delta, write, device).map_err(|e| {
            match e {
                EngineError::BadTensor { message, .. } => EngineError::BadTensor {
                    tensor: plan.base_tensor.clone(),
                    message,
                },
                e => e,
            }
        })?;
    Ok((stats, unchanged))
}

fn diagnostics(module: &str, s: &DeltaStats, unchanged: bool) -> ModuleDiagnostics {
    let old_norm = s.old_sq.sqrt();
    let ratio = |x: f64| {
        if old_norm > 0.0 {
            x.sqrt() / old_norm
        } else {
            0.0
        }
    };
    let base_drift = ratio(s.drift_sq);
    let patch_size = ratio(s.delta_sq);
    let denom = (s.delta_sq * s.drift_sq).sqrt();
    ModuleDiagnostics {
        module: module.to_owned(),
        base_drift,
        patch_size,
        drift_to_patch: if patch_size > 0.0 {
            base_drift / patch_size
        } else {
            0.0
        },
        cosine: if denom > 0.0 { s.dot / denom } else { 0.0 },
        unchanged,
        sums: Some(*s),
    }
}
