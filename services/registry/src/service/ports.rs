//! `patchport.v1.PortService`: ports of stored patches onto stored bases.
//!
//! Until the build service queues ports for workers, `RequestPort` runs the port in this
//! process and returns its outcome; `GetPort` answers from what is stored.

use patchport_core::port::METHOD_VERSION;
use patchport_core::{PortRef, Reference};
use patchport_proto::v1::{self, port_service_server::PortService};
use patchport_store::meta::PortState;
use tonic::{Request, Response, Status};

use crate::convert::port_to_proto;
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

const PENDING: &str =
    "compatibility queries, resolution and cancellation arrive with the build service";

/// The port service.
#[derive(Debug, Clone)]
pub(crate) struct Ports {
    pub(crate) registry: Registry,
}

impl Ports {
    async fn lookup(
        &self,
        patch: &Reference,
        base: &Reference,
    ) -> ApiResult<(
        patchport_store::meta::PatchVersionRecord,
        patchport_store::meta::BaseVersionRecord,
    )> {
        let p = self
            .registry
            .meta
            .get_patch_version(&patch.name, &patch.version)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("patch version {patch} not found")))?;
        let b = self
            .registry
            .meta
            .get_base_version(&base.name, &base.version)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("base version {base} not found")))?;
        Ok((p, b))
    }
}

#[tonic::async_trait]
impl PortService for Ports {
    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference), err)]
    async fn get_port(
        &self,
        req: Request<v1::GetPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        let r: PortRef = req.into_inner().reference.parse().map_err(ApiError::from)?;
        let (p, b) = self.lookup(&r.patch, &r.base).await?;
        let port = self
            .registry
            .meta
            .get_port(
                &p.name,
                &r.patch.version,
                &b.name,
                &r.base.version,
                METHOD_VERSION,
            )
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::not_found(format!("no port {r}: request it first")))?;
        Ok(Response::new(port_to_proto(&port)))
    }

    async fn query_compat(
        &self,
        _: Request<v1::QueryCompatRequest>,
    ) -> Result<Response<v1::QueryCompatResponse>, Status> {
        Err(ApiError::unimplemented(PENDING).into())
    }

    async fn resolve(
        &self,
        _: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        Err(ApiError::unimplemented(PENDING).into())
    }

    #[tracing::instrument(skip_all, fields(patch = %req.get_ref().patch, base = %req.get_ref().base), err)]
    async fn request_port(
        &self,
        req: Request<v1::RequestPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        let req = req.into_inner();
        let patch: Reference = req
            .patch
            .parse()
            .map_err(|e| ApiError::invalid(format!("patch: {e}")))?;
        let base: Reference = req
            .base
            .parse()
            .map_err(|e| ApiError::invalid(format!("base: {e}")))?;
        let (p, b) = self.lookup(&patch, &base).await?;
        if b.name != p.base_name {
            return Err(ApiError::precondition(format!(
                "{patch} was trained on {}, not {}: a port carries a patch to a newer version of its own base",
                p.base_name, b.name
            ))
            .into());
        }
        if let Some(existing) = self
            .registry
            .meta
            .get_port(
                &p.name,
                &patch.version,
                &b.name,
                &base.version,
                METHOD_VERSION,
            )
            .await
            .map_err(ApiError::from)?
            && matches!(
                existing.state,
                PortState::Succeeded | PortState::Incompatible
            )
        {
            return Ok(Response::new(port_to_proto(&existing)));
        }
        let port = self.registry.run_port(&p, &b, true).await?;
        tracing::info!(state = port.state.as_str(), "port finished");
        Ok(Response::new(port_to_proto(&port)))
    }

    async fn cancel_port(
        &self,
        _: Request<v1::GetPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        Err(ApiError::unimplemented(PENDING).into())
    }
}
