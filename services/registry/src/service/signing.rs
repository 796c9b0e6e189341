//! `patchport.v1.SigningService`: the model signature (and a port's provenance) of a
//! version or port artifact, and the public keys that verify them.

use patchport_core::AnyRef;
use patchport_proto::convert::parse_field;
use patchport_proto::v1::{self, signing_service_server::SigningService};
use tonic::{Request, Response, Status};

use crate::auth::Need;
use crate::error::{ApiError, ApiResult};
use crate::service::ports::Ports;
use crate::signing::VersionKind;
use crate::state::Registry;

/// The signing service.
#[derive(Debug, Clone)]
pub(crate) struct Signing {
    pub(crate) registry: Registry,
}

impl Signing {
    async fn signature(
        &self,
        md: &tonic::metadata::MetadataMap,
        req: &v1::GetSignatureRequest,
    ) -> ApiResult<v1::Signature> {
        let reference: AnyRef = parse_field("reference", &req.reference)?;
        let who = self.registry.auth.principal(md).await?;
        let names = match &reference {
            AnyRef::Version(r) => vec![&r.name],
            AnyRef::Port(p) => vec![&p.patch.name, &p.base.name],
        };
        for n in names {
            self.registry
                .auth
                .require(&who, Need::Read, n.namespace())
                .await?;
        }
        let meta = &self.registry.meta;
        let (record, what) = match &reference {
            AnyRef::Version(r) => {
                if req.merged {
                    return Err(ApiError::invalid(
                        "merged: applies to port references (patch@base), not to versions",
                    ));
                }
                let record = if let Some(b) = meta.get_base_version(&r.name, &r.version).await? {
                    self.registry
                        .version_signature(VersionKind::Base, &b.name, &b.version, &b.files)
                        .await?
                } else if let Some(p) = meta.get_patch_version(&r.name, &r.version).await? {
                    self.registry
                        .version_signature(VersionKind::Patch, &p.name, &p.version, &p.files)
                        .await?
                } else {
                    return Err(ApiError::not_found(format!("no base or patch version {r}")));
                };
                (record, format!("version {r}"))
            }
            AnyRef::Port(p) => {
                let port = Ports {
                    registry: self.registry.clone(),
                }
                .find_port(p)
                .await?;
                let artifact = if req.merged { "merged" } else { "adapter" };
                let files = if req.merged {
                    &port.merged_files
                } else {
                    &port.adapter_files
                };
                if files.is_empty() {
                    return Err(ApiError::precondition(format!(
                        "port {p} has no {artifact} artifact (state {})",
                        port.state.as_str()
                    )));
                }
                let record = self
                    .registry
                    .port_signature(&port, req.merged, None, false)
                    .await?;
                (record, format!("the {artifact} of port {p}"))
            }
        };
        let record = record.ok_or_else(|| {
            ApiError::precondition(format!(
                "{what} is not signed: the registry has no signing key"
            ))
        })?;
        Ok(v1::Signature {
            model_signature: record.model_sig,
            provenance: record.provenance.unwrap_or_default(),
            key_hint: record.key_hint,
        })
    }
}

#[tonic::async_trait]
impl SigningService for Signing {
    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference), err)]
    async fn get_signature(
        &self,
        req: Request<v1::GetSignatureRequest>,
    ) -> Result<Response<v1::Signature>, Status> {
        Ok(Response::new(
            self.signature(req.metadata(), req.get_ref()).await?,
        ))
    }

    /// Public keys are public: no token needed.
    #[tracing::instrument(skip_all, err)]
    async fn get_signing_keys(
        &self,
        _req: Request<v1::GetSigningKeysRequest>,
    ) -> Result<Response<v1::SigningKeys>, Status> {
        Ok(Response::new(v1::SigningKeys {
            public_keys_pem: self
                .registry
                .signing
                .as_ref()
                .map(|k| k.trusted().iter().map(|k| k.pem().to_owned()).collect())
                .unwrap_or_default(),
        }))
    }
}
