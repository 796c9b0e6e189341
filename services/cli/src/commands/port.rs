//! `patchport port`: offline porting from local directories.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use patchport_engine::{Device, PortOptions, PortReport, Verdict, port_dirs};
use patchport_eval::{GateReport, Outcome, VerdictPolicy};

use super::eval::{exit_if_not_evaluable, print_gate};

/// Offline port arguments.
#[derive(Debug, Args)]
pub(crate) struct PortArgs {
    /// The base the patch was trained on.
    #[arg(long)]
    old_base: PathBuf,
    /// The new base version.
    #[arg(long)]
    new_base: PathBuf,
    /// The PEFT adapter directory.
    #[arg(long)]
    patch: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Also write the merged model (new base + delta) under OUT/merged.
    #[arg(long)]
    merged: bool,
    /// cpu or cuda:N.
    #[arg(long, env = "PATCHPORT_DEVICE", default_value = "cpu")]
    device: String,
    /// Print the verdict and diagnostics as JSON.
    #[arg(long)]
    json: bool,
    /// Gate the port on this JSONL eval set: score the old base + patch, the new base
    /// alone and the new base + ported patch on the same items, and print the verdict
    /// (exit status 3 when regressed, 4 when the bases cannot be evaluated).
    #[arg(long)]
    eval: Option<PathBuf>,
}

/// Exit status of a port whose gate says regressed.
const EXIT_REGRESSED: i32 = 3;

pub(crate) async fn run(a: PortArgs) -> anyhow::Result<()> {
    let device: Device = a.device.parse()?;
    let opts = PortOptions {
        merged: a.merged,
        device,
        new_base_name: None,
        new_base_revision: None,
        ..PortOptions::default()
    };
    let (old, new, patch, out) = (
        a.old_base.clone(),
        a.new_base.clone(),
        a.patch.clone(),
        a.out.clone(),
    );
    // Pure compute: run it on a blocking thread.
    let report = tokio::task::spawn_blocking(move || port_dirs(&old, &new, &patch, &out, &opts))
        .await
        .context("the port task failed")??;
    let risk = report.diagnostics.risk();
    let gate = match (&a.eval, report.verdict) {
        (Some(eval), Verdict::Ported) => Some(run_gate(&a, eval.clone()).await?),
        _ => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("risk".to_owned(), serde_json::json!(risk));
            if let Some(g) = &gate {
                obj.insert("gate".to_owned(), serde_json::to_value(g)?);
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report, &a.out);
        match &gate {
            Some(g) => print_gate(g, risk),
            None if report.verdict == Verdict::Ported => {
                println!(
                    "  drift risk {risk:.3} (not evaluated: pass --eval FILE to gate the port)"
                );
            }
            None => {}
        }
    }
    if report.verdict == Verdict::Refused {
        // A refusal is an answer, not a crash; still, scripts must be able to tell.
        std::process::exit(2);
    }
    if gate.is_some_and(|g| g.verdict.verdict == Outcome::Regressed) {
        std::process::exit(EXIT_REGRESSED);
    }
    Ok(())
}

/// The three arms on the directories of this port; the ported arm reads the adapter just
/// written to `--out`.
async fn run_gate(a: &PortArgs, eval: PathBuf) -> anyhow::Result<GateReport> {
    let (old, new, patch, out, device) = (
        a.old_base.clone(),
        a.new_base.clone(),
        a.patch.clone(),
        a.out.clone(),
        a.device.clone(),
    );
    let result = tokio::task::spawn_blocking(move || {
        let set = patchport_eval::read_eval_set(&eval)?;
        let device = patchport_eval::parse_device(&device)?;
        patchport_eval::gate(
            &old,
            &new,
            &patch,
            &out,
            &set,
            &device,
            &VerdictPolicy::default(),
        )
    })
    .await
    .context("the evaluation task failed")?;
    let mut gate = result.map_err(|e| exit_if_not_evaluable(e, a.json))?;
    for arm in [
        &mut gate.arms.reference,
        &mut gate.arms.base_alone,
        &mut gate.arms.ported,
    ] {
        arm.items.clear();
    }
    Ok(gate)
}

fn print_report(r: &PortReport, out: &std::path::Path) {
    match r.verdict {
        Verdict::Refused => {
            println!("refused: this patch cannot be ported onto the new base without loss");
            for x in &r.refusals {
                println!("  {:<16} {}", x.kind.as_str(), x.message);
            }
        }
        Verdict::Ported => {
            println!("ported ({}) into {}", r.method, out.display());
            let t = &r.diagnostics.total;
            println!(
                "  total: base drift {:.4}  patch size {:.4}  drift/patch {:.2}  cosine {:+.4}",
                t.base_drift, t.patch_size, t.drift_to_patch, t.cosine
            );
            println!(
                "  {:<48} {:>10} {:>10} {:>11} {:>8}",
                "module", "drift", "patch", "drift/patch", "cosine"
            );
            for m in &r.diagnostics.modules {
                println!(
                    "  {:<48} {:>10.4} {:>10.4} {:>11.2} {:>+8.4}{}",
                    m.module,
                    m.base_drift,
                    m.patch_size,
                    m.drift_to_patch,
                    m.cosine,
                    if m.unchanged { " unchanged" } else { "" }
                );
            }
            for f in &r.files {
                println!("  wrote {} ({} bytes)", f.path, f.bytes);
            }
        }
    }
}
