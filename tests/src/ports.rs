//! Waiting for ports: every port is a job that a worker leases, so a test that wants an
//! outcome runs the worker loop ([`crate::LocalWorker`], `patchport worker`'s own loop in
//! this process over gRPC) and waits for the port to leave `queued`/`running`.

use std::time::Duration;

use patchport_client::Client;
use patchport_proto::v1;

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
