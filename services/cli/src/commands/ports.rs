//! `patchport request` and `patchport cancel`: ask for the port of one patch/base pair
//! (a job in the registry's queue, leased by a worker) or cancel it.

use std::time::Duration;

use clap::Args;
use patchport_proto::v1;

/// Request arguments.
#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// The patch reference (namespace/name:version).
    patch: String,
    /// The base version to port it onto (namespace/name:version, another version of the
    /// patch's own base).
    #[arg(long)]
    base: String,
    /// 0 to 999, higher first; any request is leased before catch-up and fan-out ports.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Wait until a worker has finished the port (exit 1 unless it succeeded).
    #[arg(long)]
    wait: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Cancel arguments.
#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    /// The port reference (namespace/patch:version@namespace/base:version).
    port: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn port_json(p: &v1::Port) -> serde_json::Value {
    serde_json::json!({
        "patch": p.patch,
        "patch_digest": p.patch_digest,
        "base": p.base,
        "base_digest": p.base_digest,
        "state": crate::output::port_state_name(p.state),
        "queue_position": (p.queue_position > 0).then_some(p.queue_position),
        "job_id": p.job_id,
        "attempts": p.attempts,
        "error": (!p.error.is_empty()).then_some(&p.error),
        "refusals": p.refusals.iter().map(|r| serde_json::json!({"kind": r.kind, "subject": r.subject, "message": r.message})).collect::<Vec<_>>(),
        "risk": p.diagnostics.as_ref().map(|d| d.risk),
        "high_risk": p.diagnostics.as_ref().map(|d| d.high_risk),
    })
}

fn print_port(p: &v1::Port, json: bool) {
    if json {
        crate::output::print_json(&port_json(p));
        return;
    }
    let state = crate::output::port_state_name(p.state);
    let place = if p.queue_position > 0 {
        format!(" (place {} in the queue)", p.queue_position)
    } else {
        String::new()
    };
    println!("{}@{}: {state}{place}", p.patch, p.base);
    if !p.error.is_empty() {
        println!("  error: {}", p.error);
    }
    for r in &p.refusals {
        println!("  refused ({}): {}", r.kind, r.message);
    }
}

fn finished(p: &v1::Port) -> bool {
    p.state != v1::PortState::Queued as i32 && p.state != v1::PortState::Running as i32
}

pub(crate) async fn request(registry: &str, a: RequestArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let mut port = client
        .ports()
        .request_port(v1::RequestPortRequest {
            patch: a.patch.clone(),
            base: a.base.clone(),
            priority: a.priority,
        })
        .await?
        .into_inner();
    if a.wait {
        let reference = format!("{}@{}", port.patch, port.base);
        while !finished(&port) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            port = client
                .ports()
                .get_port(v1::GetPortRequest {
                    reference: reference.clone(),
                })
                .await?
                .into_inner();
        }
    }
    print_port(&port, a.json);
    if a.wait && port.state != v1::PortState::Succeeded as i32 {
        anyhow::bail!(
            "the port of {} onto {} is {}",
            port.patch,
            port.base,
            crate::output::port_state_name(port.state)
        );
    }
    Ok(())
}

pub(crate) async fn cancel(registry: &str, a: CancelArgs) -> anyhow::Result<()> {
    let client = super::connect(registry).await?;
    let port = client
        .ports()
        .cancel_port(v1::GetPortRequest { reference: a.port })
        .await?
        .into_inner();
    print_port(&port, a.json);
    Ok(())
}
