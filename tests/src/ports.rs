//! Waiting for ports: every port is a job that a worker leases, so a test that wants an
//! outcome runs the worker loop (`patchport worker`'s own, in this process over gRPC) and
//! waits for the port to leave `queued`/`running`.

use std::time::Duration;

use patchport_client::Client;
use patchport_proto::v1;
use tokio_util::sync::CancellationToken;

/// The worker loop of `patchport worker`, running in this process until stopped.
#[derive(Debug)]
pub struct InProcessWorker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), patchport_worker::WorkerError>>,
}

impl InProcessWorker {
    /// Starts the loop against the registry `client` speaks to, with the default config.
    pub fn start(client: Client) -> Self {
        Self::start_with(
            client,
            patchport_worker::WorkerConfig::new(
                "test-worker".into(),
                patchport_engine::Device::Cpu,
            ),
        )
    }

    /// Starts the loop with `config`.
    pub fn start_with(client: Client, config: patchport_worker::WorkerConfig) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(patchport_worker::run(client, config, stop.clone()));
        Self { stop, task }
    }

    /// Stops the loop (a running lease is released) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("worker task")
            .expect("worker loop ended cleanly");
    }
}

/// Waits (up to two minutes) until the port `patch@base` is no longer queued or running.
pub async fn wait_port(client: &Client, reference: &str) -> v1::Port {
    for _ in 0..1200 {
        let p = client
            .ports()
            .get_port(v1::GetPortRequest {
                reference: reference.to_owned(),
            })
            .await
            .map(|r| r.into_inner());
        if let Ok(p) = p
            && p.state != v1::PortState::Queued as i32
            && p.state != v1::PortState::Running as i32
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the port {reference} did not finish in two minutes");
}
