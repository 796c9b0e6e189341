//! `patchport base ...` and `patchport patch ...`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use patchport_client::{PushKind, PushOutcome};
use patchport_proto::v1;

use crate::output;
use crate::progress::Bars;

#[derive(Debug, Subcommand)]
pub(crate) enum BaseCommand {
    /// Push a Hugging Face model directory as a new base version.
    Push(BasePushArgs),
    /// Mark a base version yanked (kept, but no longer a port target).
    Yank(YankArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PatchCommand {
    /// Push a PEFT adapter directory as a new patch version, pinned to its base.
    Push(PatchPushArgs),
    /// Mark a patch version yanked.
    Yank(YankArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BasePushArgs {
    /// The model directory (config.json, *.safetensors, tokenizer files ...).
    dir: PathBuf,
    /// namespace/name
    #[arg(long)]
    name: String,
    /// The new version (immutable once pushed).
    #[arg(long)]
    version: String,
    /// The version of the same base this one evolved from: `v1`, or a full reference
    /// (namespace/name:version).
    #[arg(long)]
    parent: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PatchPushArgs {
    /// The adapter directory (adapter_config.json, adapter_model.safetensors).
    dir: PathBuf,
    /// namespace/name
    #[arg(long)]
    name: String,
    /// The new version (immutable once pushed).
    #[arg(long)]
    version: String,
    /// The base version it was trained on: namespace/name:version.
    #[arg(long)]
    base: String,
    /// An eval set (JSONL) to store with the patch.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Push onto a base of another architecture than the adapter was made for
    /// (`auto_mapping.base_model_class`), when its modules and shapes line up with it.
    #[arg(long)]
    allow_architecture_mismatch: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct YankArgs {
    /// namespace/name:version
    reference: String,
    /// Why (shown to users of the version).
    #[arg(long, default_value = "")]
    reason: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn report(out: &PushOutcome, json: bool) {
    let (kind, value, reference, digest) = match (&out.base, &out.patch) {
        (Some(b), _) => (
            "base",
            output::base_json(b),
            format!("{}:{}", b.name, b.version),
            b.digest.clone(),
        ),
        (_, Some(p)) => (
            "patch",
            output::patch_json(p),
            format!("{}:{}", p.name, p.version),
            p.digest.clone(),
        ),
        _ => return,
    };
    if json {
        output::print_json(&serde_json::json!({
            "kind": kind,
            "created": out.created,
            "uploaded_blobs": out.uploaded_blobs,
            "uploaded_bytes": out.uploaded_bytes,
            "skipped_blobs": out.skipped_blobs,
            "version": value,
        }));
    } else {
        let what = if out.created {
            "pushed"
        } else {
            "already present (no change)"
        };
        println!(
            "{kind} {reference} {what}\n  digest {digest}\n  uploaded {} blobs ({}), {} already in the registry",
            out.uploaded_blobs,
            output::human_bytes(out.uploaded_bytes),
            out.skipped_blobs
        );
    }
}

pub(crate) async fn run_base(registry: &str, cmd: BaseCommand) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    match cmd {
        BaseCommand::Push(a) => {
            let kind = PushKind::Base {
                name: a.name,
                version: a.version,
                parent: a.parent,
            };
            let out = client.push_dir(&a.dir, &kind, &Bars::default()).await?;
            report(&out, a.json);
        }
        BaseCommand::Yank(a) => {
            let b = client
                .registry()
                .yank_base_version(v1::YankRequest {
                    reference: a.reference,
                    reason: a.reason,
                })
                .await?
                .into_inner();
            if a.json {
                output::print_json(&output::base_json(&b));
            } else {
                println!("base {}:{} yanked", b.name, b.version);
            }
        }
    }
    Ok(())
}

pub(crate) async fn run_patch(registry: &str, cmd: PatchCommand) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    match cmd {
        PatchCommand::Push(a) => {
            let kind = PushKind::Patch {
                name: a.name,
                version: a.version,
                base: a.base,
                eval: a.eval,
                allow_architecture_mismatch: a.allow_architecture_mismatch,
            };
            let out = client.push_dir(&a.dir, &kind, &Bars::default()).await?;
            report(&out, a.json);
        }
        PatchCommand::Yank(a) => {
            let p = client
                .registry()
                .yank_patch_version(v1::YankRequest {
                    reference: a.reference,
                    reason: a.reason,
                })
                .await?
                .into_inner();
            if a.json {
                output::print_json(&output::patch_json(&p));
            } else {
                println!("patch {}:{} yanked", p.name, p.version);
            }
        }
    }
    Ok(())
}
