//! `patchport.v1.PortService`: ports of stored patches onto stored bases.
//!
//! Every port is a job in one queue, leased by workers: publishing a base queues its
//! fan-out, pushing a patch its catch-up ports, and `RequestPort` queues one pair (or
//! returns the port that is already queued, running or done) and answers at once. The
//! registry never ports.

use patchport_core::port::{METHOD_VERSION, PortOrigin};
use patchport_core::{Digest, PortRef, Reference, VersionRef};
use patchport_proto::convert::{WireError, parse_field};
use patchport_proto::v1::{self, port_service_server::PortService};
use patchport_store::meta::{ListFilter, Page, PortRecord, PortState};
use tonic::{Request, Response, Status};

use crate::auth::{Need, Principal, namespace_of};
use crate::convert::{compat_native, compat_port, port_to_proto};
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

use super::paging::{self, Part};

/// The port a `GetPortRequest` names (`GetPort`, `CancelPort`).
fn port_ref(reference: &str) -> Result<PortRef, WireError> {
    parse_field("reference", reference)
}

/// What a `QueryCompat` request asks about.
#[derive(Debug)]
enum CompatQuery {
    /// Every base the patch version works on.
    Patch(Reference),
    /// Every patch version that works on the base version.
    Base(Reference),
}

impl TryFrom<&v1::QueryCompatRequest> for CompatQuery {
    type Error = WireError;

    fn try_from(req: &v1::QueryCompatRequest) -> Result<Self, WireError> {
        use v1::query_compat_request::Subject;
        match &req.subject {
            Some(Subject::Patch(r)) => parse_field("patch", r).map(CompatQuery::Patch),
            Some(Subject::Base(r)) => parse_field("base", r).map(CompatQuery::Base),
            None => Err(WireError::invalid("subject", "set either patch or base")),
        }
    }
}

/// A `Resolve` request.
#[derive(Debug)]
struct ResolveQuery {
    patch: Reference,
    base_digest: Digest,
    require_pass: bool,
    require_signed: bool,
}

impl TryFrom<&v1::ResolveRequest> for ResolveQuery {
    type Error = WireError;

    fn try_from(req: &v1::ResolveRequest) -> Result<Self, WireError> {
        Ok(ResolveQuery {
            patch: parse_field("patch", &req.patch)?,
            base_digest: parse_field("base_digest", &req.base_digest)?,
            require_pass: req.require_pass,
            require_signed: req.require_signed,
        })
    }
}

/// A `RequestPort` request.
#[derive(Debug)]
struct PortRequest {
    patch: Reference,
    base: Reference,
    origin: PortOrigin,
}

impl TryFrom<&v1::RequestPortRequest> for PortRequest {
    type Error = WireError;

    fn try_from(req: &v1::RequestPortRequest) -> Result<Self, WireError> {
        Ok(PortRequest {
            patch: parse_field("patch", &req.patch)?,
            base: parse_field("base", &req.base)?,
            origin: PortOrigin::requested(req.priority)
                .map_err(|e| WireError::invalid("priority", e))?,
        })
    }
}

/// The port service.
#[derive(Debug, Clone)]
pub(crate) struct Ports {
    pub(crate) registry: Registry,
}

impl Ports {
    /// The caller, required to `need` on the namespace of each name.
    async fn caller(
        &self,
        md: &tonic::metadata::MetadataMap,
        needs: &[(Need, &str)],
    ) -> ApiResult<Principal> {
        let who = self.registry.auth.principal(md).await?;
        for (need, name) in needs {
            self.registry
                .auth
                .require(&who, *need, namespace_of(name))
                .await?;
        }
        Ok(who)
    }

    /// The port a reference names (the caller's read access already checked).
    pub(crate) async fn find_port(&self, r: &PortRef) -> ApiResult<PortRecord> {
        let (p, b) = self.lookup(&r.patch, &r.base).await?;
        self.registry
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
            .ok_or_else(|| ApiError::not_found(format!("no port {r}: request it first")))
    }

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
    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn get_port(
        &self,
        req: Request<v1::GetPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        let r = port_ref(&req.get_ref().reference).map_err(ApiError::from)?;
        self.caller(
            req.metadata(),
            &[
                (Need::Read, r.patch.name.as_str()),
                (Need::Read, r.base.name.as_str()),
            ],
        )
        .await?;
        Ok(Response::new(port_to_proto(&self.find_port(&r).await?)))
    }

    #[tracing::instrument(skip_all)]
    async fn query_compat(
        &self,
        req: Request<v1::QueryCompatRequest>,
    ) -> Result<Response<v1::QueryCompatResponse>, Status> {
        let meta = &self.registry.meta;
        let mut entries = Vec::new();
        let mut next = None;
        let who = self.registry.auth.principal(req.metadata()).await?;
        let size = paging::page_size(req.get_ref().page_size);
        match CompatQuery::try_from(req.get_ref()).map_err(ApiError::from)? {
            CompatQuery::Patch(r) => {
                self.registry
                    .auth
                    .require(&who, Need::Read, r.name.namespace())
                    .await?;
                let p = meta
                    .get_patch_version(&r.name, &r.version)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| ApiError::not_found(format!("patch version {r} not found")))?;
                // One native pair and a port per base version it was ported onto: few,
                // paged by the last port id (0: the native pair).
                let (part, page) = paging::decode(
                    &req.get_ref().page_token,
                    Part::Natives,
                    &[Part::Natives, Part::Ports],
                    size,
                )
                .map_err(ApiError::from)?;
                let mut all = Vec::new();
                if part == Part::Natives {
                    all.push((0, compat_native(&p)));
                }
                for port in meta
                    .list_ports_of(&r.name, &r.version)
                    .await
                    .map_err(ApiError::from)?
                {
                    if port.id > page.after_id {
                        all.push((port.id, compat_port(&port)));
                    }
                }
                if all.len() > size as usize {
                    all.truncate(size as usize);
                    let after_id = all.last().map_or(0, |(id, _)| *id);
                    next = Some(paging::encode(
                        Part::Ports,
                        &Page {
                            after_id,
                            ..Page::first(size)
                        },
                    ));
                }
                entries.extend(all.into_iter().map(|(_, e)| e));
            }
            CompatQuery::Base(r) => {
                self.registry
                    .auth
                    .require(&who, Need::Read, r.name.namespace())
                    .await?;
                let b = meta
                    .get_base_version(&r.name, &r.version)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| ApiError::not_found(format!("base version {r} not found")))?;
                let (part, page) = paging::decode(
                    &req.get_ref().page_token,
                    Part::Natives,
                    &[Part::Natives, Part::Ports],
                    size,
                )
                .map_err(ApiError::from)?;
                // The patches trained on this base (selected in the store), then the
                // ports onto it, a page at a time.
                let mut ports_from = Some(page.clone());
                if part == Part::Natives {
                    let natives = meta
                        .list_patch_versions(&ListFilter {
                            on_base: Some(b.digest),
                            page,
                            ..ListFilter::default()
                        })
                        .await
                        .map_err(ApiError::from)?;
                    entries.extend(natives.items.iter().map(compat_native));
                    let left = size - entries.len() as u32;
                    if let Some(more) = natives.next {
                        next = Some(paging::encode(Part::Natives, &more));
                        ports_from = None;
                    } else if left == 0 {
                        next = Some(paging::encode(Part::Ports, &Page::first(size)));
                        ports_from = None;
                    } else {
                        ports_from = Some(Page::first(left));
                    }
                }
                if let Some(page) = ports_from {
                    let ports = meta
                        .list_ports_onto(&r.name, &r.version, &page)
                        .await
                        .map_err(ApiError::from)?;
                    entries.extend(ports.items.iter().map(compat_port));
                    next = ports.next.map(|more| {
                        paging::encode(
                            Part::Ports,
                            &Page {
                                limit: Some(size),
                                ..more
                            },
                        )
                    });
                }
            }
        }
        // Patches of namespaces the caller may not read stay invisible.
        let mut visible = Vec::with_capacity(entries.len());
        for e in entries {
            if self
                .registry
                .auth
                .allows(&who, Need::Read, namespace_of(&e.patch))
                .await?
            {
                visible.push(e);
            }
        }
        Ok(Response::new(v1::QueryCompatResponse {
            entries: visible,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(patch = %req.get_ref().patch))]
    async fn resolve(
        &self,
        req: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let q = ResolveQuery::try_from(req.get_ref()).map_err(ApiError::from)?;
        self.caller(req.metadata(), &[(Need::Read, q.patch.name.as_str())])
            .await?;
        let (r, digest) = (q.patch, q.base_digest);
        let meta = &self.registry.meta;
        let p = meta
            .get_patch_version(&r.name, &r.version)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::not_found(format!("patch version {r} not found")))?;
        // A namespace policy can require a passing evaluation (or a signature) whatever
        // the caller asks.
        let policy = meta
            .namespace_policy(r.name.namespace())
            .await
            .map_err(ApiError::from)?;
        let require_pass = q.require_pass || policy.require_pass;
        let require_signed = q.require_signed || policy.require_signed;
        if p.base_digest == digest {
            if require_signed {
                let kind = crate::signing::VersionKind::Patch;
                if self
                    .registry
                    .version_signature(kind, &p.name, &p.version, &p.files)
                    .await?
                    .is_none()
                {
                    return Err(ApiError::precondition(format!(
                        "patch version {}:{} is not signed (the registry has no signing key)",
                        p.name, p.version
                    ))
                    .into());
                }
            }
            return Ok(Response::new(v1::ResolveResponse {
                kind: v1::CompatKind::Native as i32,
                patch: format!("{}:{}", p.name, p.version),
                base: format!("{}:{}", p.base_name, p.base_version),
                adapter_files: p.files.iter().map(Into::into).collect(),
            }));
        }
        let ports = meta
            .list_ports_of(&r.name, &r.version)
            .await
            .map_err(ApiError::from)?;
        let Some(port) = ports.iter().find(|port| port.base_digest == digest) else {
            if let Some(hint) = self.file_digest_hint(&p, &ports, &digest).await? {
                return Err(ApiError::invalid(hint).into());
            }
            return Err(ApiError::not_found(format!(
                "no port of {r} for base {digest}: it is not a descendant of {}:{} in the registry \
                 (base_digest is a base version's manifest digest, BaseVersion.digest)",
                p.base_name, p.base_version
            ))
            .into());
        };
        if port.state != PortState::Succeeded {
            let reasons: Vec<&str> = port.refusals.iter().map(|x| x.message.as_str()).collect();
            return Err(ApiError::precondition(format!(
                "the port of {r} onto {}:{} is {}{}",
                port.base_name,
                port.base_version,
                port.state.as_str(),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(": {}", reasons.join("; "))
                }
            ))
            .into());
        }
        if require_pass {
            let why = match port.evaluation_json.as_deref().and_then(crate::convert::evaluation_from_json) {
                Some(e) if crate::convert::passed(&e) => None,
                Some(e) if e.status == "evaluated" => Some(format!(
                    "its evaluation regressed: {} {:.4} vs {:.4} for the patch on its own base (threshold {:.4})",
                    e.ported.as_ref().map(|a| a.metric.as_str()).unwrap_or("metric"),
                    e.ported.as_ref().map_or(0.0, |a| a.value),
                    e.reference.as_ref().map_or(0.0, |a| a.value),
                    e.threshold
                )),
                Some(e) => Some(format!("it is {}: {}", e.status.replace('_', " "), e.reason)),
                None => Some(
                    "it has not been evaluated (the patch version has no eval set, or the evaluation is pending)"
                        .to_owned(),
                ),
            };
            if let Some(why) = why {
                return Err(ApiError::precondition(format!(
                    "the port of {r} onto {}:{} has not passed the quality gate: {why}",
                    port.base_name, port.base_version
                ))
                .into());
            }
        }
        if require_signed
            && self
                .registry
                .port_signature(port, false, None, false)
                .await?
                .is_none()
        {
            return Err(ApiError::precondition(format!(
                "the port of {r} onto {}:{} is not signed (the registry has no signing key)",
                port.base_name, port.base_version
            ))
            .into());
        }
        Ok(Response::new(v1::ResolveResponse {
            kind: v1::CompatKind::Ported as i32,
            patch: format!("{}:{}", p.name, p.version),
            base: format!("{}:{}", port.base_name, port.base_version),
            adapter_files: port.adapter_files.iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(patch = %req.get_ref().patch, base = %req.get_ref().base))]
    async fn request_port(
        &self,
        req: Request<v1::RequestPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let req = req.into_inner();
        let ns = namespace_of(&req.patch).to_owned();
        let target = format!("{}@{}", req.patch, req.base);
        let out = self.request(&who, &req).await;
        let detail = match &out {
            Ok(p) => format!("state {}", p.state),
            Err(e) => e.to_string(),
        };
        self.registry
            .auth
            .audit_refusal(&who, "RequestPort", &target, &ns, &out, &detail)
            .await;
        Ok(Response::new(out?))
    }

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn cancel_port(
        &self,
        req: Request<v1::GetPortRequest>,
    ) -> Result<Response<v1::Port>, Status> {
        let who = self.registry.auth.principal(req.metadata()).await?;
        let reference = req.into_inner().reference;
        let ns = namespace_of(&reference).to_owned();
        let out = async {
            let r = port_ref(&reference)?;
            self.registry.auth.require(&who, Need::Push, &ns).await?;
            Ok(self
                .registry
                .meta
                .cancel_port(
                    &r.patch.name,
                    &r.patch.version,
                    &r.base.name,
                    &r.base.version,
                    METHOD_VERSION,
                    &self
                        .registry
                        .auth
                        .entry(&who, "CancelPort", &reference, &ns, ""),
                )
                .await?)
        }
        .await;
        self.registry
            .auth
            .audit_refusal(&who, "CancelPort", &reference, &ns, &out, "")
            .await;
        Ok(Response::new(port_to_proto(&out?)))
    }
}

impl Ports {
    /// When a Resolve `base_digest` is the sha256 of a file of a base the patch works on
    /// (its own base's versions, or a port's base) rather than a manifest digest: a
    /// message naming the manifest digest(s) to pass instead. Not accepted in its place:
    /// one weights file may belong to several versions (a re-pushed tokenizer, a config
    /// fix), each with its own ports.
    async fn file_digest_hint(
        &self,
        p: &patchport_store::meta::PatchVersionRecord,
        ports: &[patchport_store::meta::PortRecord],
        digest: &Digest,
    ) -> ApiResult<Option<String>> {
        let meta = &self.registry.meta;
        let mut bases = meta
            .list_base_versions(&ListFilter {
                prefix: p.base_name.to_string(),
                include_yanked: true,
                ..ListFilter::default()
            })
            .await?
            .items;
        for port in ports {
            if port.base_name != p.base_name
                && let Some(b) = meta
                    .get_base_version(
                        &port.base_name,
                        &VersionRef::Version(port.base_version.clone()),
                    )
                    .await?
            {
                bases.push(b);
            }
        }
        let holders: Vec<String> = bases
            .iter()
            .filter_map(|b| {
                let f = b.files.iter().find(|f| f.digest == *digest)?;
                Some(format!(
                    "{} of {}:{} (manifest digest {})",
                    f.path, b.name, b.version, b.digest
                ))
            })
            .collect();
        if holders.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "base_digest {digest} is the sha256 of a file ({}), not a base version's manifest \
             digest: pass the manifest digest (BaseVersion.digest: sha256 over the version's \
             sorted file list, see \"Digests\" in the README)",
            holders.join("; ")
        )))
    }

    /// Queues the port (or finds it) and answers at once: the registry never ports.
    async fn request(&self, who: &Principal, req: &v1::RequestPortRequest) -> ApiResult<v1::Port> {
        self.registry
            .auth
            .require(who, Need::Push, namespace_of(&req.patch))
            .await?;
        self.registry
            .auth
            .require(who, Need::Read, namespace_of(&req.base))
            .await?;
        let PortRequest {
            patch,
            base,
            origin,
        } = PortRequest::try_from(req)?;
        let entry = self.registry.auth.entry(
            who,
            "RequestPort",
            &format!("{patch}@{base}"),
            patch.name.namespace(),
            "",
        );
        let port = self
            .registry
            .meta
            .request_port(
                &patch.name,
                &patch.version,
                &base.name,
                &base.version,
                origin,
                &entry,
            )
            .await?;
        tracing::info!(
            state = port.state.as_str(),
            queue_position = port.queue_position,
            "port requested"
        );
        Ok(port_to_proto(&port))
    }
}
