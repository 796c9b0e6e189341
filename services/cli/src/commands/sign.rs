//! `patchport signing-key` and `patchport verify`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use patchport_proto::v1;
use patchport_signing::{PublicKey, SigningKey};

use crate::output;

#[derive(Debug, Args)]
pub(crate) struct SigningKeyArgs {
    /// Read this private key PEM file instead of asking the registry (offline).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Every public key the registry trusts (the active one first), not only the active one.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// A directory written by `patchport pull` (with model.sig).
    dir: PathBuf,
    /// A trusted public key PEM file (`patchport signing-key > key.pem`); repeat it, or
    /// put several keys in one file, to trust keys from before a rotation.
    #[arg(long = "public-key", required = true)]
    public_keys: Vec<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn signing_key(registry: &str, a: SigningKeyArgs) -> anyhow::Result<()> {
    if let Some(path) = a.key {
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let key = SigningKey::from_pem(&pem).with_context(|| format!("{}", path.display()))?;
        print!("{}", key.public_key().pem());
        return Ok(());
    }
    let keys = super::connect(registry)
        .await?
        .signing()
        .get_signing_keys(v1::GetSigningKeysRequest {})
        .await?
        .into_inner()
        .public_keys_pem;
    if keys.is_empty() {
        anyhow::bail!("the registry signs nothing: it was started without a signing key");
    }
    for pem in keys.iter().take(if a.all { keys.len() } else { 1 }) {
        print!("{pem}");
    }
    Ok(())
}

pub(crate) fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let mut trusted = Vec::new();
    for path in &a.public_keys {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        trusted.extend(PublicKey::parse_all(&text).with_context(|| format!("{}", path.display()))?);
    }
    let v = patchport_client::verify_dir(&a.dir, &trusted)
        .with_context(|| format!("verifying {}", a.dir.display()))?;
    if a.json {
        output::print_json(&serde_json::json!({
            "dir": a.dir.display().to_string(),
            "model": v.model.name,
            "files": v.model.files.len(),
            "key_hint": v.model.key_hint,
            "provenance": v.provenance.as_ref().map(|p| serde_json::to_value(&p.provenance).unwrap_or_default()),
        }));
    } else {
        println!(
            "verified {}: {} files of {} signed by key {}",
            a.dir.display(),
            v.model.files.len(),
            v.model.name,
            v.model.key_hint
        );
        if let Some(p) = &v.provenance {
            let p = &p.provenance;
            let input = |role: &str| {
                p.inputs
                    .iter()
                    .find(|i| i.name == role)
                    .and_then(|i| i.uri.clone())
                    .unwrap_or_default()
            };
            println!(
                "provenance: the {} of port {} (patch {}, old base {}, new base {}), method {} {}, worker {} on {}, verdict {}",
                p.artifact,
                p.port,
                input("patch"),
                input("old_base"),
                input("new_base"),
                p.method.name,
                p.method.version,
                if p.worker.id.is_empty() {
                    "unknown"
                } else {
                    &p.worker.id
                },
                if p.worker.device.is_empty() {
                    "unknown"
                } else {
                    &p.worker.device
                },
                p.verdict.as_deref().unwrap_or("none (not evaluated)")
            );
        }
    }
    Ok(())
}
