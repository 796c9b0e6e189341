//! `patchport pull`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use patchport_core::AnyRef;

use crate::output;
use crate::progress::Bars;

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// A base (ns/name:version), patch (ns/name:version) or port (patch@base) reference.
    reference: String,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// For a port: the merged model instead of the ported adapter.
    #[arg(long)]
    merged: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(registry: &str, a: PullArgs) -> anyhow::Result<()> {
    let reference: AnyRef = a.reference.parse().context("parsing the reference")?;
    let client = super::connect(registry).await?;
    let out = client
        .pull(&reference, &a.out, a.merged, &Bars::default())
        .await?;
    // After the files: model.sig (and provenance.json for a port), as the registry signed
    // them; `patchport verify` checks them offline.
    let signed = client
        .write_signature(&reference, &a.out, a.merged)
        .await
        .context("writing the signature")?;
    if a.json {
        output::print_json(&serde_json::json!({
            "kind": out.kind,
            "reference": a.reference,
            "digest": out.digest,
            "out": a.out.display().to_string(),
            "bytes": out.bytes,
            "files": out.files.iter().map(output::file_json).collect::<Vec<_>>(),
            "signed_by": signed.as_ref().map(|s| s.key_hint.clone()),
        }));
    } else {
        println!(
            "pulled {} {} into {}: {} files, {}, every digest verified",
            out.kind,
            a.reference,
            a.out.display(),
            out.files.len(),
            output::human_bytes(out.bytes)
        );
        match &signed {
            Some(s) => println!(
                "wrote {}{} (signed by key {})",
                patchport_signing::SIGNATURE_FILE,
                if s.provenance {
                    format!(" and {}", patchport_signing::PROVENANCE_FILE)
                } else {
                    String::new()
                },
                s.key_hint
            ),
            None => println!("not signed: the registry has no signing key"),
        }
    }
    Ok(())
}
