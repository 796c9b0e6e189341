//! What a port says about a patch/base pair: typed refusals and portability diagnostics.

use serde::{Deserialize, Serialize};

/// The method version of a port; part of every job key, so a new method re-ports.
pub const METHOD_VERSION: &str = "portllm-1";

/// Why a patch cannot be ported (never a silent lossy port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// DoRA: magnitude depends on old-base norms.
    Dora,
    /// `modules_to_save`: full copies of old-base modules.
    ModulesToSave,
    /// Trained embedding rows (`trainable_token_indices`).
    TrainableTokens,
    /// `lora_bias` or PEFT `bias` other than `none`.
    LoraBias,
    /// PiSSA / OLoRA / LoftQ / CorDA: the old base itself was rewritten.
    InitMethod,
    /// Not LoRA (IA3, OFT, prompt tuning, ...).
    PeftType,
    /// Different architecture family (model_type, sizes, heads, vocab).
    Architecture,
    /// A target module absent from the new base.
    MissingModule,
    /// A shape `B·A` cannot be added to.
    Shape,
    /// NaN or Inf in the patch.
    NonFinite,
    /// Adapter tensors that are not LoRA A/B pairs.
    UnknownTensor,
}

impl RefusalKind {
    /// The stable machine-readable name (`dora`, `modules_to_save`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Dora => "dora",
            RefusalKind::ModulesToSave => "modules_to_save",
            RefusalKind::TrainableTokens => "trainable_tokens",
            RefusalKind::LoraBias => "lora_bias",
            RefusalKind::InitMethod => "init_method",
            RefusalKind::PeftType => "peft_type",
            RefusalKind::Architecture => "architecture",
            RefusalKind::MissingModule => "missing_module",
            RefusalKind::Shape => "shape",
            RefusalKind::NonFinite => "non_finite",
            RefusalKind::UnknownTensor => "unknown_tensor",
        }
    }
}

/// One reason a port is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The kind.
    pub kind: RefusalKind,
    /// The module, field or PEFT type concerned (`ia3` for an IA3 adapter).
    pub subject: String,
    /// A sentence a user can act on.
    pub message: String,
}

impl Refusal {
    /// A refusal.
    pub fn new(kind: RefusalKind, subject: &str, message: String) -> Self {
        Self {
            kind,
            subject: subject.to_owned(),
            message,
        }
    }
}

/// Portability diagnostics of one target module, from weights alone (no data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModuleDiagnostics {
    /// Base module name (`model.layers.0.self_attn.q_proj`), or `total`.
    pub module: String,
    /// `‖W_new − W_old‖_F / ‖W_old‖_F`.
    pub base_drift: f64,
    /// `‖s·B·A‖_F / ‖W_old‖_F`.
    pub patch_size: f64,
    /// `base_drift / patch_size`.
    pub drift_to_patch: f64,
    /// `cos(vec(s·B·A), vec(W_new − W_old))`; 0 when either is zero.
    pub cosine: f64,
    /// Same tensor digest in both bases (nothing read).
    pub unchanged: bool,
}

/// Diagnostics of a whole port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PortDiagnostics {
    /// Per target module.
    pub modules: Vec<ModuleDiagnostics>,
    /// Aggregated over all target modules (Frobenius norms summed in squares).
    pub total: ModuleDiagnostics,
}
