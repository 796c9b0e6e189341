//! `patchport list` and `patchport status`.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use patchport_core::Reference;
use patchport_proto::v1;

use crate::output;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ListKind {
    /// Base model versions.
    Bases,
    /// Patch versions.
    Patches,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// What to list.
    kind: ListKind,
    /// Only this namespace or namespace/name.
    #[arg(long, default_value = "")]
    filter: String,
    /// Include yanked versions.
    #[arg(long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// A base or patch reference (namespace/name:version).
    reference: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn list(registry: &str, a: ListArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let req = v1::ListRequest {
        filter: a.filter,
        include_yanked: a.all,
        page_size: 1000,
        page_token: String::new(),
    };
    match a.kind {
        ListKind::Bases => {
            let versions = client.list_base_versions_all(req).await?;
            if a.json {
                output::print_json(&serde_json::Value::Array(
                    versions.iter().map(output::base_json).collect(),
                ));
            } else {
                println!(
                    "{:<40} {:<12} {:<10} {:>10} {:<10} DIGEST",
                    "BASE", "VERSION", "PARENT", "SIZE", "STATE"
                );
                for b in &versions {
                    println!(
                        "{:<40} {:<12} {:<10} {:>10} {:<10} {}",
                        b.name,
                        b.version,
                        if b.parent.is_empty() { "-" } else { &b.parent },
                        output::human_bytes(b.total_size),
                        output::state_name(b.state),
                        output::short_digest(&b.digest)
                    );
                }
            }
        }
        ListKind::Patches => {
            let versions = client.list_patch_versions_all(req).await?;
            if a.json {
                output::print_json(&serde_json::Value::Array(
                    versions.iter().map(output::patch_json).collect(),
                ));
            } else {
                println!(
                    "{:<40} {:<12} {:<40} {:<10} DIGEST",
                    "PATCH", "VERSION", "BASE", "STATE"
                );
                for p in &versions {
                    let base = p
                        .base
                        .as_ref()
                        .map(|b| format!("{}:{}", b.name, b.version))
                        .unwrap_or_default();
                    println!(
                        "{:<40} {:<12} {:<40} {:<10} {}",
                        p.name,
                        p.version,
                        base,
                        output::state_name(p.state),
                        output::short_digest(&p.digest)
                    );
                }
            }
        }
    }
    Ok(())
}

pub(crate) async fn status(registry: &str, a: StatusArgs) -> anyhow::Result<()> {
    let reference: Reference = a.reference.parse().context("parsing the reference")?;
    let client = super::connect(registry).await?;
    let req = v1::GetVersionRequest {
        reference: reference.to_string(),
    };
    let base = match client.registry().get_base_version(req.clone()).await {
        Ok(b) => Some(b.into_inner()),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => return Err(s.into()),
    };
    if let Some(b) = base {
        if a.json {
            output::print_json(
                &serde_json::json!({"kind": "base", "version": output::base_json(&b)}),
            );
        } else {
            output::print_base(&b);
        }
        return Ok(());
    }
    match client.registry().get_patch_version(req).await {
        Ok(p) => {
            let p = p.into_inner();
            // Its ports, with their quality gate.
            let ports: Vec<v1::Port> = client
                .query_compat_all(v1::query_compat_request::Subject::Patch(
                    reference.to_string(),
                ))
                .await?
                .into_iter()
                .filter_map(|e| e.port)
                .collect();
            if a.json {
                let ports: Vec<serde_json::Value> = ports
                    .iter()
                    .map(|port| {
                        serde_json::json!({
                            "base": port.base,
                            "state": output::port_state_name(port.state),
                            "risk": port.diagnostics.as_ref().map(|d| d.risk),
                            "high_risk": port.diagnostics.as_ref().map(|d| d.high_risk),
                            "evaluation": output::evaluation_json(port.evaluation.as_ref()),
                        })
                    })
                    .collect();
                output::print_json(&serde_json::json!({
                    "kind": "patch",
                    "version": output::patch_json(&p),
                    "ports": ports,
                }));
            } else {
                output::print_patch(&p);
                for port in &ports {
                    println!(
                        "  port onto {:<30} {:<12} {}",
                        port.base,
                        output::port_state_name(port.state),
                        output::gate_line(port)
                    );
                }
            }
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            anyhow::bail!("no base or patch version {reference}")
        }
        Err(s) => Err(s.into()),
    }
}
