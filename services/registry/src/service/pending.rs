//! The parts of API v1 that the build service implements (events and the worker
//! protocol). Until it is enabled they answer Unimplemented with a message
//! saying so, so clients can tell "not offered here" from a failure.

use std::pin::Pin;

use futures::Stream;
use patchport_proto::v1::{
    self, event_service_server::EventService, worker_service_server::WorkerService,
};
use tonic::{Request, Response, Status};

use crate::error::ApiError;

const MESSAGE: &str =
    "ports, compatibility queries, events and workers are not enabled on this registry yet";

fn pending<T>() -> Result<T, Status> {
    Err(ApiError::unimplemented(MESSAGE).into())
}

/// Event and worker services that are not enabled yet.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pending;

#[tonic::async_trait]
impl EventService for Pending {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

    async fn subscribe(
        &self,
        _: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        pending()
    }
}

#[tonic::async_trait]
impl WorkerService for Pending {
    async fn lease_job(
        &self,
        _: Request<v1::LeaseJobRequest>,
    ) -> Result<Response<v1::LeaseJobResponse>, Status> {
        pending()
    }
    async fn heartbeat(
        &self,
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        pending()
    }
    async fn complete_job(
        &self,
        _: Request<v1::CompleteJobRequest>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        pending()
    }
    async fn fail_job(
        &self,
        _: Request<v1::FailJobRequest>,
    ) -> Result<Response<v1::FailJobResponse>, Status> {
        pending()
    }
    async fn release_job(
        &self,
        _: Request<v1::ReleaseJobRequest>,
    ) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        pending()
    }
}
