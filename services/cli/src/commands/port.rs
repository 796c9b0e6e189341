//! `patchport port`: offline porting from local directories.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use patchport_engine::{Device, PortOptions, PortReport, Verdict, port_dirs};

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
}

pub(crate) async fn run(a: PortArgs) -> anyhow::Result<()> {
    let device: Device = a.device.parse()?;
    let opts = PortOptions {
        merged: a.merged,
        device,
        new_base_name: None,
        new_base_revision: None,
    };
    let (old, new, patch, out) = (a.old_base, a.new_base, a.patch, a.out.clone());
    // Pure compute: run it on a blocking thread.
    let report = tokio::task::spawn_blocking(move || port_dirs(&old, &new, &patch, &out, &opts))
        .await
        .context("the port task failed")??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &a.out);
    }
    if report.verdict == Verdict::Refused {
        // A refusal is an answer, not a crash; still, scripts must be able to tell.
        std::process::exit(2);
    }
    Ok(())
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
