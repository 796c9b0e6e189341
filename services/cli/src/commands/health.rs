//! `patchport health`: one `grpc.health.v1.Health/Check` call against the registry, for
//! container health checks (Docker `HEALTHCHECK`, compose `healthcheck`) where the
//! kubelet's built-in gRPC probe is not available. Exits 0 when the answer is SERVING,
//! 1 otherwise (unreachable, NOT_SERVING while draining, unknown service).

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Health check arguments.
#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// The service to ask about; empty means the registry as a whole.
    #[arg(long, env = "PATCHPORT_HEALTH_SERVICE", default_value = "")]
    service: String,
    /// Seconds to wait for the connection and for the answer, each.
    #[arg(long, env = "PATCHPORT_HEALTH_TIMEOUT_SECONDS", default_value_t = 5)]
    timeout_seconds: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(registry: &str, a: HealthArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(a.timeout_seconds.max(1));
    let mut endpoint = Endpoint::from_shared(registry.to_owned())
        .with_context(|| format!("invalid registry URL {registry:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if endpoint.uri().scheme_str() == Some("https") {
        // The same trust as every other command: webpki roots plus --ca-cert.
        patchport_client::install_tls_provider();
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(pem) = super::client_options()?.ca_cert_pem {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("configuring TLS for the health check")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to the registry at {registry}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: a.service.clone(),
        })
        .await
        .with_context(|| format!("health check of {registry} failed"))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "registry": registry,
                "service": a.service,
                "status": status.as_str_name(),
            })
        );
    } else {
        println!("{}", status.as_str_name());
    }
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "registry at {registry} is {}",
        status.as_str_name().to_lowercase()
    );
    Ok(())
}
