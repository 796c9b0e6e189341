//! `patchport port`: offline porting from local directories.

use std::path::PathBuf;

use clap::Args;

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

pub(crate) async fn run(_args: PortArgs) -> anyhow::Result<()> {
    anyhow::bail!("the port engine is not wired in yet")
}
