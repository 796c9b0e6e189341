//! `patchport.v1.RegistryService`: base and patch versions.

use patchport_core::layout::{self, FileRef};
use patchport_core::{Digest, Name, Reference, Version, VersionRef};
use patchport_proto::convert::{FieldError as _, WireError, parse_field, parse_optional, try_list};
use patchport_proto::v1::{self, registry_service_server::RegistryService};
use patchport_store::meta::AuditRecord;
use patchport_store::meta::{BaseVersionRecord, ListFilter, PatchVersionRecord};

use super::paging::{self, Part};
use tonic::{Request, Response, Status};

use crate::auth::{Need, Principal, namespace_of};
use crate::convert::{base_to_proto, patch_to_proto, tensor_to_proto};
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// The registry service.
#[derive(Debug, Clone)]
pub(crate) struct Versions {
    pub(crate) registry: Registry,
}

/// A `PushBaseVersion` request.
#[derive(Debug)]
struct PushBase {
    name: Name,
    version: Version,
    parent: Option<VersionRef>,
    files: Vec<FileRef>,
}

impl TryFrom<&v1::PushBaseVersionRequest> for PushBase {
    type Error = WireError;

    fn try_from(req: &v1::PushBaseVersionRequest) -> Result<Self, WireError> {
        let name: Name = parse_field("name", &req.name)?;
        // A full reference of this name, or a bare version or manifest digest.
        let parent = match req.parent.as_str() {
            "" => None,
            p => Some(VersionRef::of(&name, p).map_err(|e| e.at("parent"))?),
        };
        Ok(PushBase {
            name,
            version: parse_field("version", &req.version)?,
            parent,
            files: try_list("files", &req.files)?,
        })
    }
}

/// A `PushPatchVersion` request.
#[derive(Debug)]
pub(crate) struct PushPatch {
    pub(crate) name: Name,
    pub(crate) version: Version,
    pub(crate) base: Reference,
    pub(crate) files: Vec<FileRef>,
    pub(crate) eval_digest: Option<Digest>,
    pub(crate) allow_architecture_mismatch: bool,
}

impl TryFrom<&v1::PushPatchVersionRequest> for PushPatch {
    type Error = WireError;

    fn try_from(req: &v1::PushPatchVersionRequest) -> Result<Self, WireError> {
        Ok(PushPatch {
            name: parse_field("name", &req.name)?,
            version: parse_field("version", &req.version)?,
            base: parse_field("base", &req.base)?,
            files: try_list("files", &req.files)?,
            eval_digest: parse_optional("eval_digest", &req.eval_digest)?,
            allow_architecture_mismatch: req.allow_architecture_mismatch,
        })
    }
}

/// A `Yank*Version` request.
#[derive(Debug)]
struct Yank {
    reference: Reference,
    reason: String,
}

impl TryFrom<&v1::YankRequest> for Yank {
    type Error = WireError;

    fn try_from(req: &v1::YankRequest) -> Result<Self, WireError> {
        Ok(Yank {
            reference: parse_field("reference", &req.reference)?,
            reason: req.reason.clone(),
        })
    }
}

/// The version a `GetVersionRequest` names.
fn version_ref(req: &v1::GetVersionRequest) -> Result<Reference, WireError> {
    parse_field("reference", &req.reference)
}

/// The store filter of a `ListRequest` (`ListFilter` is the store's, so a function).
fn list_filter(req: &v1::ListRequest) -> Result<ListFilter, WireError> {
    let prefix = req.filter.trim().to_owned();
    if !prefix.is_empty() {
        // Either a namespace or a full name.
        let ok = if prefix.contains('/') {
            prefix.parse::<Name>().is_ok()
        } else {
            format!("{prefix}/x").parse::<Name>().is_ok()
        };
        if !ok {
            return Err(WireError::invalid(
                "filter",
                format!("invalid filter {prefix:?}: expected a namespace or namespace/name"),
            ));
        }
    }
    let (_, page) = paging::decode(
        &req.page_token,
        Part::Versions,
        &[Part::Versions],
        paging::page_size(req.page_size),
    )?;
    Ok(ListFilter {
        prefix,
        include_yanked: req.include_yanked,
        on_base: None,
        page,
    })
}

/// The manifest digest of a stored version (for the audit log).
trait VersionDigest {
    fn digest(&self) -> String;
}

impl VersionDigest for BaseVersionRecord {
    fn digest(&self) -> String {
        self.digest.to_string()
    }
}

impl VersionDigest for PatchVersionRecord {
    fn digest(&self) -> String {
        self.digest.to_string()
    }
}

impl Versions {
    /// Refuses names longer than the configured limit.
    fn check_name_len(&self, name: &str) -> ApiResult<()> {
        let max = self.registry.limits.max_name_len;
        if name.len() > max {
            return Err(ApiError::invalid(format!(
                "name of {} bytes; the limit is {max} (--max-name-length)",
                name.len()
            )));
        }
        Ok(())
    }

    /// A version push: push scope on its namespace (and read on `also_read`'s), the name
    /// limit, the caller's push budget, then `push`; audited either way.
    async fn push<R: VersionDigest>(
        &self,
        md: &tonic::metadata::MetadataMap,
        action: &str,
        name: &str,
        version: &str,
        also_read: Option<&str>,
        push: impl AsyncFnOnce(&Principal, &AuditRecord) -> ApiResult<(R, bool)>,
    ) -> ApiResult<(R, bool)> {
        let who = self.registry.auth.principal(md).await?;
        let ns = namespace_of(name).to_owned();
        let out = async {
            self.registry.auth.require(&who, Need::Push, &ns).await?;
            if let Some(other) = also_read {
                self.registry
                    .auth
                    .require(&who, Need::Read, namespace_of(other))
                    .await?;
            }
            self.check_name_len(name)?;
            self.registry.auth.take_push(&who)?;
            let entry =
                self.registry
                    .auth
                    .entry(&who, action, &format!("{name}:{version}"), &ns, "");
            push(&who, &entry).await
        }
        .await;
        let detail = match &out {
            Ok((rec, created)) => format!("digest {} created {created}", rec.digest()),
            Err(e) => e.to_string(),
        };
        self.registry
            .auth
            .audit_refusal(
                &who,
                action,
                &format!("{name}:{version}"),
                &ns,
                &out,
                &detail,
            )
            .await;
        out
    }

    /// A `validate_only` push: the caller's permission and the name limit, then `check`;
    /// nothing recorded, no push budget taken, no blob read.
    async fn validate(
        &self,
        md: &tonic::metadata::MetadataMap,
        name: &str,
        also_read: Option<&str>,
        check: impl AsyncFnOnce() -> ApiResult<()>,
    ) -> ApiResult<()> {
        let who = self.registry.auth.principal(md).await?;
        self.registry
            .auth
            .require(&who, Need::Push, namespace_of(name))
            .await?;
        if let Some(other) = also_read {
            self.registry
                .auth
                .require(&who, Need::Read, namespace_of(other))
                .await?;
        }
        self.check_name_len(name)?;
        check().await
    }

    /// A yank: push scope on the reference's namespace, audited either way.
    async fn yank<R>(
        &self,
        req: Request<v1::YankRequest>,
        action: &str,
        yank: impl AsyncFnOnce(
            Reference,
            String,
            AuditRecord,
        ) -> Result<R, patchport_store::meta::StoreError>,
    ) -> ApiResult<R> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let req = req.into_inner();
        let ns = namespace_of(&req.reference).to_owned();
        let out = async {
            let Yank { reference, reason } = Yank::try_from(&req)?;
            self.registry.auth.require(&who, Need::Push, &ns).await?;
            let entry = self
                .registry
                .auth
                .entry(&who, action, &req.reference, &ns, &req.reason);
            Ok(yank(reference, reason, entry).await?)
        }
        .await;
        self.registry
            .auth
            .audit_refusal(&who, action, &req.reference, &ns, &out, &req.reason)
            .await;
        out
    }

    /// Keeps only what `who` may read.
    async fn readable<T>(
        &self,
        who: &Principal,
        items: Vec<T>,
        name: impl Fn(&T) -> &str,
    ) -> ApiResult<Vec<T>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if self
                .registry
                .auth
                .allows(who, Need::Read, namespace_of(name(&item)))
                .await?
            {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// The caller, required to read the namespace of a list filter (all readable
    /// namespaces when the filter is empty).
    async fn list_caller(&self, req: &Request<v1::ListRequest>) -> ApiResult<Principal> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let filter = req.get_ref().filter.trim();
        if !filter.is_empty() {
            self.registry
                .auth
                .require(&who, Need::Read, namespace_of(filter))
                .await?;
        }
        Ok(who)
    }

    async fn base(&self, r: &Reference) -> ApiResult<BaseVersionRecord> {
        self.registry
            .meta
            .get_base_version(&r.name, &r.version)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("base version {r} not found")))
    }

    async fn patch(&self, r: &Reference) -> ApiResult<PatchVersionRecord> {
        self.registry
            .meta
            .get_patch_version(&r.name, &r.version)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("patch version {r} not found")))
    }
}

#[tonic::async_trait]
impl RegistryService for Versions {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name, version = %req.get_ref().version))]
    async fn push_base_version(
        &self,
        req: Request<v1::PushBaseVersionRequest>,
    ) -> Result<Response<v1::PushBaseVersionResponse>, Status> {
        let md = req.metadata().clone();
        let req = req.into_inner();
        // A parent is a version of the same name, or a full reference.
        let also_read = req.parent.contains('/').then_some(req.parent.as_str());
        if req.validate_only {
            self.validate(&md, &req.name, also_read, async || {
                let push = PushBase::try_from(&req)?;
                self.registry
                    .check_base_manifest(&push.name, push.parent.as_ref(), push.files)
                    .await
                    .map(drop)
            })
            .await?;
            return Ok(Response::new(v1::PushBaseVersionResponse::default()));
        }
        let out = self
            .push(
                &md,
                "PushBaseVersion",
                &req.name,
                &req.version,
                also_read,
                async |who, audit| {
                    let push = PushBase::try_from(&req)?;
                    self.registry
                        .push_base(who, push.name, push.version, push.parent, push.files, audit)
                        .await
                },
            )
            .await;
        let (rec, created) = out?;
        if created {
            tracing::info!(base = %format!("{}:{}", rec.name, rec.version), digest = %rec.digest, "base version published");
            let kind = crate::signing::VersionKind::Base;
            self.registry
                .sign_version(kind, &rec.name, &rec.version, &rec.files)
                .await;
        }
        Ok(Response::new(v1::PushBaseVersionResponse {
            version: Some(base_to_proto(&rec)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn get_base_version(
        &self,
        req: Request<v1::GetVersionRequest>,
    ) -> Result<Response<v1::BaseVersion>, Status> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let r = version_ref(req.get_ref()).map_err(ApiError::from)?;
        self.registry
            .auth
            .require(&who, Need::Read, r.name.namespace())
            .await?;
        Ok(Response::new(base_to_proto(&self.base(&r).await?)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_base_versions(
        &self,
        req: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListBaseVersionsResponse>, Status> {
        let filter = list_filter(req.get_ref()).map_err(ApiError::from)?;
        let who = self.list_caller(&req).await?;
        let page = self
            .registry
            .meta
            .list_base_versions(&filter)
            .await
            .map_err(ApiError::from)?;
        let versions = self.readable(&who, page.items, |v| v.name.as_str()).await?;
        Ok(Response::new(v1::ListBaseVersionsResponse {
            versions: versions.iter().map(base_to_proto).collect(),
            next_page_token: page
                .next
                .map(|p| paging::encode(Part::Versions, &p))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn yank_base_version(
        &self,
        req: Request<v1::YankRequest>,
    ) -> Result<Response<v1::BaseVersion>, Status> {
        let meta = self.registry.meta.clone();
        let rec = self
            .yank(req, "YankBaseVersion", async move |r, reason, audit| {
                meta.yank_base_version(&r.name, &r.version, &reason, &audit)
                    .await
            })
            .await?;
        Ok(Response::new(base_to_proto(&rec)))
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name, version = %req.get_ref().version))]
    async fn push_patch_version(
        &self,
        req: Request<v1::PushPatchVersionRequest>,
    ) -> Result<Response<v1::PushPatchVersionResponse>, Status> {
        let md = req.metadata().clone();
        let req = req.into_inner();
        if req.validate_only {
            self.validate(&md, &req.name, Some(&req.base), async || {
                let p = PushPatch::try_from(&req)?;
                self.registry
                    .check_patch_manifest(&p.base, p.files)
                    .await
                    .map(drop)
            })
            .await?;
            return Ok(Response::new(v1::PushPatchVersionResponse::default()));
        }
        let out = self
            .push(
                &md,
                "PushPatchVersion",
                &req.name,
                &req.version,
                Some(&req.base),
                async |who, audit| {
                    let p = PushPatch::try_from(&req)?;
                    self.registry.push_patch(who, p, audit).await
                },
            )
            .await;
        let (rec, created) = out?;
        if created {
            tracing::info!(patch = %format!("{}:{}", rec.name, rec.version), digest = %rec.digest, "patch version pushed");
            let kind = crate::signing::VersionKind::Patch;
            self.registry
                .sign_version(kind, &rec.name, &rec.version, &rec.files)
                .await;
        }
        Ok(Response::new(v1::PushPatchVersionResponse {
            version: Some(patch_to_proto(&rec)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn get_patch_version(
        &self,
        req: Request<v1::GetVersionRequest>,
    ) -> Result<Response<v1::PatchVersion>, Status> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let r = version_ref(req.get_ref()).map_err(ApiError::from)?;
        self.registry
            .auth
            .require(&who, Need::Read, r.name.namespace())
            .await?;
        Ok(Response::new(patch_to_proto(&self.patch(&r).await?)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_patch_versions(
        &self,
        req: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListPatchVersionsResponse>, Status> {
        let filter = list_filter(req.get_ref()).map_err(ApiError::from)?;
        let who = self.list_caller(&req).await?;
        let page = self
            .registry
            .meta
            .list_patch_versions(&filter)
            .await
            .map_err(ApiError::from)?;
        let versions = self.readable(&who, page.items, |v| v.name.as_str()).await?;
        Ok(Response::new(v1::ListPatchVersionsResponse {
            versions: versions.iter().map(patch_to_proto).collect(),
            next_page_token: page
                .next
                .map(|p| paging::encode(Part::Versions, &p))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn yank_patch_version(
        &self,
        req: Request<v1::YankRequest>,
    ) -> Result<Response<v1::PatchVersion>, Status> {
        let meta = self.registry.meta.clone();
        let rec = self
            .yank(req, "YankPatchVersion", async move |r, reason, audit| {
                meta.yank_patch_version(&r.name, &r.version, &reason, &audit)
                    .await
            })
            .await?;
        Ok(Response::new(patch_to_proto(&rec)))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn get_tensor_index(
        &self,
        req: Request<v1::GetVersionRequest>,
    ) -> Result<Response<v1::TensorIndex>, Status> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let r = version_ref(req.get_ref()).map_err(ApiError::from)?;
        let reference = req.into_inner().reference;
        self.registry
            .auth
            .require(&who, Need::Read, r.name.namespace())
            .await?;
        let (digest, files) = match self.base(&r).await {
            Ok(b) => (b.digest, b.files),
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
                let p = self
                    .patch(&r)
                    .await
                    .map_err(|_| ApiError::not_found(format!("no base or patch version {r}")))?;
                (p.digest, p.files)
            }
            Err(e) => return Err(e.into()),
        };
        let mut tensors = Vec::new();
        for f in files.iter().filter(|f| layout::is_safetensors(&f.path)) {
            let ix = self.registry.blob_index(f).await?;
            tensors.extend(ix.tensors.iter().map(|t| tensor_to_proto(&f.path, t)));
        }
        Ok(Response::new(v1::TensorIndex {
            reference,
            digest: digest.to_string(),
            tensors,
        }))
    }
}
