//! The three arms of a port and the verdict.
//!
//! Arms, on the same items: the **reference** (old base + patch: what the user had), the
//! **new base alone**, and the **ported** patch (new base + the same adapter tensors).
//!
//! Per item `i` the *goodness* `g_i` is 1/0 (correct or not) for accuracy and `−nll_i` for
//! mean NLL, so that higher is better for both: for NLL the sign flips. Then
//! - `delta = mean(g_ported − g_reference)`, positive = the port is better;
//! - `standard_error = sd(g_ported − g_reference) / √n` (paired: per-item differences,
//!   sample standard deviation);
//! - `threshold = max(min_margin, se_multiplier · standard_error)`, by default
//!   `max(0.01, 2·SE)`: one accuracy point (or 0.01 nats of mean NLL) or two standard
//!   errors, whichever is larger;
//! - **regressed** when `delta < −threshold`, **improved** when `delta > threshold`,
//!   else **preserved**;
//! - `gain_over_base = mean(g_ported − g_base_alone)` with its own paired standard error:
//!   what the patch still adds on the new base.

use serde::{Deserialize, Serialize};

use crate::error::EvalError;
use crate::score::{ArmResult, Metric};

/// When a port counts as regressed or improved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VerdictPolicy {
    /// The smallest margin, in metric units (0.01 = one accuracy point).
    pub min_margin: f64,
    /// How many paired standard errors the margin is at least.
    pub se_multiplier: f64,
}

impl Default for VerdictPolicy {
    fn default() -> Self {
        Self {
            min_margin: 0.01,
            se_multiplier: 2.0,
        }
    }
}

/// The outcome of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Better than the reference by more than the threshold.
    Improved,
    /// Within the threshold of the reference.
    Preserved,
    /// Worse than the reference by more than the threshold.
    Regressed,
}

impl Outcome {
    /// `improved`, `preserved` or `regressed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Improved => "improved",
            Outcome::Preserved => "preserved",
            Outcome::Regressed => "regressed",
        }
    }
}

/// The verdict of a port, with everything that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The outcome.
    pub verdict: Outcome,
    /// The metric compared.
    pub metric: Metric,
    /// Items compared.
    pub n: usize,
    /// Metric value of the reference arm (old base + patch).
    pub reference: f64,
    /// Metric value of the new base alone.
    pub base_alone: f64,
    /// Metric value of the ported arm (new base + ported patch).
    pub ported: f64,
    /// Ported minus reference in goodness (positive = better; NLL sign flipped).
    pub delta: f64,
    /// Paired standard error of `delta`.
    pub standard_error: f64,
    /// `max(policy.min_margin, policy.se_multiplier · standard_error)`.
    pub threshold: f64,
    /// Ported minus new base alone in goodness (positive = the patch still helps).
    pub gain_over_base: f64,
    /// Paired standard error of `gain_over_base`.
    pub gain_standard_error: f64,
    /// The policy applied.
    pub policy: VerdictPolicy,
}

/// Mean and paired standard error of `b − a` per item, in goodness.
fn paired(metric: Metric, a: &ArmResult, b: &ArmResult) -> (f64, f64) {
    let sign = if metric.higher_is_better() { 1.0 } else { -1.0 };
    let d: Vec<f64> = a
        .items
        .iter()
        .zip(&b.items)
        .map(|(x, y)| sign * (y.value() - x.value()))
        .collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    if d.len() < 2 {
        return (mean, 0.0);
    }
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The verdict from the three arms (scored on the same items in the same order).
pub fn verdict(
    reference: &ArmResult,
    base_alone: &ArmResult,
    ported: &ArmResult,
    policy: &VerdictPolicy,
) -> Result<Verdict, EvalError> {
    let metric = reference.metric;
    for (name, arm) in [("base alone", base_alone), ("ported", ported)] {
        if arm.metric != metric {
            return Err(EvalError::Mismatch {
                message: format!(
                    "the reference measures {}, the {name} arm {}",
                    metric.as_str(),
                    arm.metric.as_str()
                ),
            });
        }
    }
    for (name, arm) in [
        ("reference", reference),
        ("base alone", base_alone),
        ("ported", ported),
    ] {
        if arm.items.len() != reference.n || arm.n != reference.n || arm.n == 0 {
            return Err(EvalError::Mismatch {
                message: format!(
                    "the {name} arm has {} per-item scores for {} items, the reference {} items",
                    arm.items.len(),
                    arm.n,
                    reference.n
                ),
            });
        }
    }
    let (delta, standard_error) = paired(metric, reference, ported);
    let (gain_over_base, gain_standard_error) = paired(metric, base_alone, ported);
    let threshold = policy.min_margin.max(policy.se_multiplier * standard_error);
    let outcome = if delta < -threshold {
        Outcome::Regressed
    } else if delta > threshold {
        Outcome::Improved
    } else {
        Outcome::Preserved
    };
    Ok(Verdict {
        verdict: outcome,
        metric,
        n: reference.n,
        reference: reference.value(),
        base_alone: base_alone.value(),
        ported: ported.value(),
        delta,
        standard_error,
        threshold,
        gain_over_base,
        gain_standard_error,
        policy: *policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::ItemScore;

    fn acc(correct: &[bool]) -> ArmResult {
        let items: Vec<ItemScore> = correct
            .iter()
            .map(|&c| ItemScore::Choice {
                logprobs: vec![0.0, -1.0],
                prediction: 0,
                correct: c,
            })
            .collect();
        let n = items.len();
        let k = correct.iter().filter(|c| **c).count();
        ArmResult {
            metric: Metric::Accuracy,
            accuracy: Some(k as f64 / n as f64),
            correct: Some(k),
            mean_nll: None,
            n,
            seconds: 0.0,
            items,
        }
    }

    fn nll(values: &[f64]) -> ArmResult {
        let items: Vec<ItemScore> = values
            .iter()
            .map(|&v| ItemScore::Completion { nll: v, tokens: 3 })
            .collect();
        ArmResult {
            metric: Metric::MeanNll,
            accuracy: None,
            correct: None,
            mean_nll: Some(values.iter().sum::<f64>() / values.len() as f64),
            n: values.len(),
            seconds: 0.0,
            items,
        }
    }

    #[test]
    fn paired_standard_error_and_threshold() {
        // 100 items; the port loses 4 items and wins 1 against the reference.
        let reference: Vec<bool> = (0..100).map(|i| i < 90).collect();
        let mut ported = reference.clone();
        ported[..4].fill(false);
        ported[95] = true;
        let base = vec![false; 100];
        let v = verdict(
            &acc(&reference),
            &acc(&base),
            &acc(&ported),
            &VerdictPolicy::default(),
        )
        .unwrap();
        // d: four −1, one +1, 95 zeros: mean −0.03, sample var (4·0.97² + 0.03²·… ) / 99.
        let mean: f64 = -0.03;
        let var = (4.0 * (-1.0 - mean).powi(2) + (1.0 - mean).powi(2) + 95.0 * mean.powi(2)) / 99.0;
        assert!((v.delta - mean).abs() < 1e-12);
        assert!((v.standard_error - (var / 100.0).sqrt()).abs() < 1e-12);
        assert!((v.threshold - 2.0 * v.standard_error).abs() < 1e-12);
        // 0.03 < 2·SE (≈ 0.044): within the noise.
        assert_eq!(v.verdict, Outcome::Preserved);
        assert!((v.gain_over_base - 0.87).abs() < 1e-12);
        let strict = VerdictPolicy {
            min_margin: 0.01,
            se_multiplier: 0.5,
        };
        let v = verdict(&acc(&reference), &acc(&base), &acc(&ported), &strict).unwrap();
        assert_eq!(v.verdict, Outcome::Regressed);
        let v = verdict(&acc(&ported), &acc(&base), &acc(&reference), &strict).unwrap();
        assert_eq!(v.verdict, Outcome::Improved);
    }

    #[test]
    fn the_one_point_floor_applies_without_noise() {
        // Identical per-item differences: SE 0, so the floor of one point decides.
        let r = acc(&[true; 10]);
        let v = verdict(&r, &r, &r, &VerdictPolicy::default()).unwrap();
        assert_eq!(
            (v.verdict, v.standard_error, v.threshold),
            (Outcome::Preserved, 0.0, 0.01)
        );
    }

    #[test]
    fn lower_nll_is_better() {
        let reference = nll(&[2.0, 2.0, 2.0, 2.0]);
        let worse = nll(&[3.0, 3.1, 2.9, 3.0]);
        let v = verdict(&reference, &worse, &worse, &VerdictPolicy::default()).unwrap();
        assert!(v.delta < 0.0);
        assert_eq!(v.verdict, Outcome::Regressed);
        let v = verdict(&worse, &worse, &reference, &VerdictPolicy::default()).unwrap();
        assert!(v.delta > 0.0 && v.gain_over_base > 0.0);
        assert_eq!(v.verdict, Outcome::Improved);
    }

    #[test]
    fn arms_must_match() {
        let a = acc(&[true, false]);
        let b = acc(&[true]);
        assert!(matches!(
            verdict(&a, &a, &b, &VerdictPolicy::default()),
            Err(EvalError::Mismatch { .. })
        ));
        let c = nll(&[1.0, 2.0]);
        assert!(matches!(
            verdict(&a, &c, &a, &VerdictPolicy::default()),
            Err(EvalError::Mismatch { .. })
        ));
    }
}
