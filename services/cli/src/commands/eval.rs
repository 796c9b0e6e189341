//! `patchport eval`: offline evaluation of a base (+ patch) on a JSONL eval set.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use patchport_eval::{ArmResult, EvalError, GateReport, Metric, Outcome, Verdict};

/// Exit status when the model cannot be evaluated (no tokenizer, unsupported architecture).
pub(crate) const EXIT_NOT_EVALUABLE: i32 = 4;

/// Offline evaluation arguments.
#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// The base model directory (config.json, tokenizer.json, *.safetensors).
    #[arg(long)]
    base: PathBuf,
    /// A PEFT LoRA adapter directory, merged into the base (W + s·B·A) before scoring.
    #[arg(long)]
    patch: Option<PathBuf>,
    /// The eval set, JSONL: {"prompt","choices","label"} (accuracy) or
    /// {"prompt","completion"} (mean token NLL) per line.
    #[arg(long)]
    eval: PathBuf,
    /// cpu or cuda:N.
    #[arg(long, env = "PATCHPORT_DEVICE", default_value = "cpu")]
    device: String,
    /// Print the result as JSON (`accuracy` or `mean_nll`, `n`, ...).
    #[arg(long)]
    json: bool,
    /// With --json, also print every item's scores.
    #[arg(long)]
    items: bool,
}

/// Prints a not-evaluable answer and exits with [`EXIT_NOT_EVALUABLE`]; other errors are
/// handed back.
pub(crate) fn exit_if_not_evaluable(e: EvalError, json: bool) -> anyhow::Error {
    if let EvalError::NotEvaluable { reason } = &e {
        if json {
            println!(
                "{}",
                serde_json::json!({ "evaluable": false, "reason": reason })
            );
        } else {
            println!("not evaluable: {reason}");
        }
        std::process::exit(EXIT_NOT_EVALUABLE);
    }
    e.into()
}

pub(crate) async fn run(a: EvalArgs) -> anyhow::Result<()> {
    let (base, patch, eval, device) = (a.base.clone(), a.patch.clone(), a.eval, a.device);
    // Pure compute: run it on a blocking thread.
    let result = tokio::task::spawn_blocking(move || {
        let set = patchport_eval::read_eval_set(&eval)?;
        let device = patchport_eval::parse_device(&device)?;
        patchport_eval::evaluate_dir(&base, patch.as_deref(), &set, &device)
    })
    .await
    .context("the evaluation task failed")?;
    let mut arm = result.map_err(|e| exit_if_not_evaluable(e, a.json))?;
    if a.json {
        if !a.items {
            arm.items.clear();
        }
        println!("{}", serde_json::to_string_pretty(&arm)?);
    } else {
        let what = match &a.patch {
            Some(p) => format!("{} + {}", a.base.display(), p.display()),
            None => a.base.display().to_string(),
        };
        println!("{what}");
        println!("  {}", arm_line(&arm));
    }
    Ok(())
}

/// `accuracy 0.9246 (282/305), 1.20 s, 254.2 items/s`.
pub(crate) fn arm_line(arm: &ArmResult) -> String {
    let rate = arm.n as f64 / arm.seconds.max(1e-9);
    match arm.metric {
        Metric::Accuracy => format!(
            "accuracy {:.4} ({}/{}), {:.2} s, {rate:.1} items/s",
            arm.value(),
            arm.correct.unwrap_or(0),
            arm.n,
            arm.seconds
        ),
        Metric::MeanNll => format!(
            "mean_nll {:.4} (n={}), {:.2} s, {rate:.1} items/s",
            arm.value(),
            arm.n,
            arm.seconds
        ),
    }
}

/// The gate's verdict for humans.
pub(crate) fn print_gate(g: &GateReport, risk: f64) {
    let v: &Verdict = &g.verdict;
    println!(
        "gate: {} ({}, n={})",
        v.verdict.as_str(),
        v.metric.as_str(),
        v.n
    );
    println!("  drift risk (before evaluation)  {risk:.3}");
    println!(
        "  reference (old base + patch)    {}",
        arm_line(&g.arms.reference)
    );
    println!(
        "  new base alone                  {}",
        arm_line(&g.arms.base_alone)
    );
    println!(
        "  ported (new base + patch)       {}",
        arm_line(&g.arms.ported)
    );
    let sign = if v.metric.higher_is_better() {
        ""
    } else {
        " (NLL: lower is better, sign flipped)"
    };
    println!(
        "  delta {:+.4} vs reference, standard error {:.4}, threshold {:.4} = max({}, {}·SE){sign}",
        v.delta, v.standard_error, v.threshold, v.policy.min_margin, v.policy.se_multiplier
    );
    println!(
        "  gain over the new base alone {:+.4} ± {:.4}",
        v.gain_over_base, v.gain_standard_error
    );
    if v.verdict == Outcome::Regressed {
        println!("  the ported patch is worse than the original: do not trust this port");
    }
}
