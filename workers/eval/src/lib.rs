//! patchport's quality gate: scores a base version (optionally with a LoRA patch merged)
//! on a JSONL eval set, and judges a port from three arms on the same items: the old
//! base + patch (the reference), the new base alone, and the new base + ported patch.
//!
//! - [`EvalSet`]: multiple-choice items (accuracy) or completion items (mean token NLL),
//!   malformed lines refused with their line number.
//! - [`Evaluator`]: a base directory (`config.json`, `tokenizer.json`, safetensors,
//!   sharded or not) plus an optional PEFT adapter directory merged at load time in f32;
//!   Llama/SmolLM/Mistral, Qwen2 and GPT-2, on candle's CPU device (CUDA behind the `cuda`
//!   feature). A base without a tokenizer or with an unsupported architecture is
//!   [`EvalError::NotEvaluable`] with the reason, never a guess.
//! - [`verdict`]: improved / preserved / regressed against the reference, with the paired
//!   standard error and the threshold that decided it, and the gain over the new base.
//!
//! The scoring rule (it decides the numbers) is documented in [`score`]; why the forward
//! pass is our own and not candle-transformers' in [`model`].
//!
//! The API is plain and synchronous: loading and scoring are CPU-bound, so async callers
//! run it on a blocking thread.
//!
//! Architecture invariant: pure compute over local files. This crate never knows about
//! gRPC, a database, object storage, an async runtime or the port engine; the diagnostics
//! a drift-risk score is computed from live in `patchport-core`.

mod config;
mod error;
pub mod model;
mod ops;
pub mod score;
pub mod tree;
mod verdict;
mod weights;

use std::path::Path;

pub use candle_core::Device;
pub use config::{Activation, ArchConfig, Family};
pub use error::EvalError;
/// The eval-set format lives in `patchport-core` (the registry validates sets at push
/// without linking this crate); re-exported so callers keep one import path.
pub use patchport_core::evalset::{EvalSet, EvalSetError, Item, ItemKind};
pub use score::{ArmResult, Evaluator, ItemScore, Metric, evaluate_dir};
use serde::{Deserialize, Serialize};
pub use verdict::{Outcome, Verdict, VerdictPolicy, verdict};

/// Reads and parses a JSONL eval set from a file.
pub fn read_eval_set(path: &Path) -> Result<EvalSet, EvalError> {
    Ok(EvalSet::parse(&weights::read(path)?)?)
}

/// `cpu` or `cuda:N` (`cuda` = `cuda:0`; needs the `cuda` feature and a GPU).
pub fn parse_device(s: &str) -> Result<Device, EvalError> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| EvalError::Device {
                        message: format!("{s:?} is not cpu or cuda:N"),
                    })?,
                None => {
                    return Err(EvalError::Device {
                        message: format!("{s:?} is not cpu or cuda:N"),
                    });
                }
            };
            Device::new_cuda(ordinal).map_err(|e| EvalError::Device {
                message: format!("{s}: {e}"),
            })
        }
    }
}

/// The three arms of a port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arms {
    /// Old base + patch.
    pub reference: ArmResult,
    /// New base alone.
    pub base_alone: ArmResult,
    /// New base + ported patch.
    pub ported: ArmResult,
}

/// What the gate says about a port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// The verdict and what decided it.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The arms.
    pub arms: Arms,
    /// Seconds spent loading models and scoring, all arms together.
    pub seconds: f64,
}

/// Runs the three arms and the verdict. `ported_patch` is the ported adapter directory
/// (PortLLM's port is the same A/B tensors re-pointed at the new base, so the original
/// `patch` directory gives the same arm). Models are loaded one at a time.
pub fn gate(
    old_base: &Path,
    new_base: &Path,
    patch: &Path,
    ported_patch: &Path,
    set: &EvalSet,
    device: &Device,
    policy: &VerdictPolicy,
) -> Result<GateReport, EvalError> {
    let t0 = std::time::Instant::now();
    let reference = evaluate_dir(old_base, Some(patch), set, device)?;
    let mut report = gate_with_reference(reference, new_base, ported_patch, set, device, policy)?;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// [`gate`] with the reference arm already known (it depends only on the old base, the
/// patch and the eval set, so a service computes it once per patch version): what the
/// gate adds to a port is arms 2 and 3.
pub fn gate_with_reference(
    reference: ArmResult,
    new_base: &Path,
    ported_patch: &Path,
    set: &EvalSet,
    device: &Device,
    policy: &VerdictPolicy,
) -> Result<GateReport, EvalError> {
    let t0 = std::time::Instant::now();
    let base_alone = evaluate_dir(new_base, None, set, device)?;
    let ported = evaluate_dir(new_base, Some(ported_patch), set, device)?;
    let verdict = verdict(&reference, &base_alone, &ported, policy)?;
    Ok(GateReport {
        verdict,
        arms: Arms {
            reference,
            base_alone,
            ported,
        },
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda0", ""] {
            assert!(
                matches!(parse_device(bad), Err(EvalError::Device { .. })),
                "{bad}"
            );
        }
    }
}
