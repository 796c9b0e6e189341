//! What a port says about a patch/base pair: typed refusals and portability diagnostics.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The method version of a port; part of every job key, so a new method re-ports.
pub const METHOD_VERSION: &str = "portllm-1";

/// Why a port was queued, which decides its place in the queue: explicit requests before
/// catch-up ports (a patch pushed onto a base with descendants) before fan-out (a base
/// published), first in first out within a priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortOrigin {
    /// A base version was published: every patch of its ancestors is ported.
    Fanout,
    /// A patch version was pushed onto a base that already has descendants.
    CatchUp,
    /// A caller asked for this pair with `RequestPort`, with its own priority
    /// (`0..=MAX_REQUEST_PRIORITY`, higher first).
    Requested(u16),
}

/// The highest priority a `RequestPort` caller may ask for.
pub const MAX_REQUEST_PRIORITY: u16 = 999;

/// The lease protocol's limits, kept by the registry and respected by workers. The most
/// bytes one completion may carry in `inline_blobs`.
pub const MAX_INLINE_BLOBS: usize = 4 << 20;
/// The most jobs one LeaseJob call leases.
pub const MAX_LEASE_JOBS: usize = 64;
/// The most completions one CompleteJobs call carries.
pub const MAX_COMPLETIONS: usize = 64;

impl PortOrigin {
    /// The stored job priority (higher is leased first). Every request outranks every
    /// catch-up port, which outranks every fan-out port.
    pub fn job_priority(self) -> i64 {
        match self {
            PortOrigin::Fanout => 0,
            PortOrigin::CatchUp => 1_000,
            PortOrigin::Requested(p) => 2_000 + i64::from(p.min(MAX_REQUEST_PRIORITY)),
        }
    }

    /// A request's priority as given on the wire, validated.
    pub fn requested(priority: i32) -> Result<Self, PriorityOutOfRange> {
        u16::try_from(priority)
            .ok()
            .filter(|p| *p <= MAX_REQUEST_PRIORITY)
            .map(PortOrigin::Requested)
            .ok_or(PriorityOutOfRange(priority))
    }
}

/// A request priority outside `0..=MAX_REQUEST_PRIORITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is out of range: use 0 (the default) to {MAX_REQUEST_PRIORITY}, higher first")]
pub struct PriorityOutOfRange(pub i32);

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
    /// Every kind.
    pub const ALL: [RefusalKind; 11] = [
        RefusalKind::Dora,
        RefusalKind::ModulesToSave,
        RefusalKind::TrainableTokens,
        RefusalKind::LoraBias,
        RefusalKind::InitMethod,
        RefusalKind::PeftType,
        RefusalKind::Architecture,
        RefusalKind::MissingModule,
        RefusalKind::Shape,
        RefusalKind::NonFinite,
        RefusalKind::UnknownTensor,
    ];

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

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal kind name that is not one of [`RefusalKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown refusal kind {0:?}: expected one of dora, modules_to_save, trainable_tokens, lora_bias, init_method, peft_type, architecture, missing_module, shape, non_finite, unknown_tensor"
)]
pub struct UnknownRefusalKind(pub String);

impl FromStr for RefusalKind {
    type Err = UnknownRefusalKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RefusalKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownRefusalKind(s.chars().take(100).collect()))
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
    /// The sums the numbers above are made of (absent on diagnostics stored before they
    /// were kept): a later port that reuses this module's merged tensor adds these same
    /// sums into its total instead of computing them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<DeltaStats>,
}

/// The sums behind a module's diagnostics, over its elements, in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaStats {
    /// `Σ d²` over the delta `d = s·B·A`.
    pub delta_sq: f64,
    /// `Σ (w_new − w_old)²`.
    pub drift_sq: f64,
    /// `Σ w_old²`.
    pub old_sq: f64,
    /// `Σ d·(w_new − w_old)`.
    pub dot: f64,
}

impl DeltaStats {
    /// Adds another set of sums.
    pub fn add(&mut self, o: &DeltaStats) {
        self.delta_sq += o.delta_sq;
        self.drift_sq += o.drift_sq;
        self.old_sq += o.old_sq;
        self.dot += o.dot;
    }
}

/// A merged tensor that an earlier port of the same patch version already stored and a
/// new port reuses as it is, with no compute and no upload: the tensor's bytes (digest,
/// dtype, shape) are the same in the earlier port's new base and in this one, the old
/// base and the method are the same, so `W_new + s·B·A` is the same bytes and its
/// diagnostics the same numbers (`diagnostics.sums` is what the new port's total adds).
#[derive(Debug, Clone, PartialEq)]
pub struct ReusedTensor {
    /// The base tensor (`<module>.weight`).
    pub tensor: String,
    /// The stored merged tensor's blob.
    pub digest: crate::Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The earlier port's diagnostics of the module, with their sums.
    pub diagnostics: ModuleDiagnostics,
}

/// Diagnostics of a whole port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PortDiagnostics {
    /// Per target module.
    pub modules: Vec<ModuleDiagnostics>,
    /// Aggregated over all target modules (Frobenius norms summed in squares).
    pub total: ModuleDiagnostics,
}

impl PortDiagnostics {
    /// Drift-risk score in `[0, 1)`, from weights alone (before any evaluation).
    ///
    /// `risk = r² / (r² + R²)`, `r = total.drift_to_patch = ‖W_new − W_old‖ / ‖s·B·A‖`
    /// (Frobenius norms summed in squares over every target module), `R =`
    /// [`RISK_HALF_RATIO`] `= 0.5`.
    ///
    /// Why `r`: the reference is `W_old + s·B·A` and the port `W_new + s·B·A`, so the port
    /// sits exactly `W_new − W_old` away from the reference: `r` is that distance in units
    /// of the patch itself. At `r = 0` the port is the reference (risk 0); at `r = 0.5`,
    /// half a patch away (risk ½); at `r ≥ 1` the base moved more than the patch did and
    /// the risk is above 0.8. The cosine between drift and patch is not used (it is ≈ 0
    /// for the fixtures' drifts; both signs move the port away from the reference).
    /// A zero patch has risk 0 when nothing moved and 1 otherwise.
    pub fn risk(&self) -> f64 {
        let t = &self.total;
        if t.patch_size.is_nan() || t.patch_size <= 0.0 {
            return if t.base_drift > 0.0 { 1.0 } else { 0.0 };
        }
        let r = t.base_drift / t.patch_size;
        if !r.is_finite() {
            return 1.0;
        }
        let r2 = r * r;
        r2 / (r2 + RISK_HALF_RATIO * RISK_HALF_RATIO)
    }

    /// The drift risk is at least [`HIGH_RISK`]: flag the port for review. The one place
    /// the flag is computed (the wire's `PortDiagnostics.high_risk`, events, the CLI).
    pub fn high_risk(&self) -> bool {
        self.risk() >= HIGH_RISK
    }
}

/// The drift-to-patch ratio at which [`PortDiagnostics::risk`] is one half.
pub const RISK_HALF_RATIO: f64 = 0.5;

/// Ports whose drift risk is at least this are flagged `high_risk` for review
/// (provisional: two measured scenarios do not calibrate it; see ARCHITECTURE.md).
pub const HIGH_RISK: f64 = 0.5;

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(base_drift: f64, patch_size: f64) -> PortDiagnostics {
        PortDiagnostics {
            modules: Vec::new(),
            total: ModuleDiagnostics {
                module: "total".to_owned(),
                base_drift,
                patch_size,
                drift_to_patch: base_drift / patch_size,
                cosine: 0.0,
                unchanged: false,
                sums: None,
            },
        }
    }

    #[test]
    fn risk_is_bounded_monotone_and_half_at_the_half_ratio() {
        assert_eq!(diag(0.0, 0.1).risk(), 0.0);
        assert!((diag(0.05, 0.1).risk() - 0.5).abs() < 1e-12);
        let mut last = 0.0;
        for d in [0.01, 0.05, 0.1, 0.5, 1.0, 10.0] {
            let r = diag(d, 0.1).risk();
            assert!(r > last && r < 1.0, "{d}: {r}");
            last = r;
        }
        assert_eq!(diag(0.0, 0.0).risk(), 0.0);
        assert_eq!(diag(0.1, 0.0).risk(), 1.0);
        assert_eq!(diag(f64::NAN, 0.1).risk(), 1.0);
        assert_eq!(PortDiagnostics::default().risk(), 0.0);
    }

    #[test]
    fn requests_outrank_catch_up_which_outranks_fan_out() {
        let lowest_request = PortOrigin::requested(0).map(PortOrigin::job_priority);
        assert_eq!(lowest_request, Ok(2_000));
        assert!(PortOrigin::CatchUp.job_priority() > PortOrigin::Fanout.job_priority());
        assert!(PortOrigin::Requested(0).job_priority() > PortOrigin::CatchUp.job_priority());
        assert_eq!(
            PortOrigin::requested(999).map(PortOrigin::job_priority),
            Ok(2_999)
        );
        for bad in [-1, 1_000, i32::MAX, i32::MIN] {
            assert_eq!(PortOrigin::requested(bad), Err(PriorityOutOfRange(bad)));
        }
    }

    #[test]
    fn every_refusal_kind_round_trips_through_its_name() {
        for k in RefusalKind::ALL {
            assert_eq!(k.as_str().parse::<RefusalKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
            // The stored (serde) name is the same name.
            let json = serde_json::to_value(k).unwrap();
            assert_eq!(json, serde_json::Value::String(k.as_str().to_owned()));
        }
        assert_eq!(
            "lora".parse::<RefusalKind>(),
            Err(UnknownRefusalKind("lora".to_owned()))
        );
        assert!("".parse::<RefusalKind>().is_err());
    }
}
