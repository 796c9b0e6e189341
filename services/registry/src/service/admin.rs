//! `patchport.v1.AdminService`: tokens, namespace policies, the audit log.

use patchport_proto::convert::WireError;
use patchport_proto::v1::{self, admin_service_server::AdminService};
use patchport_store::meta::{AuditRecord, NamespacePolicyRecord, TokenRecord, now_millis};
use tonic::{Request, Response, Status};

use crate::auth::{Need, Principal, Scope, mint_token};
use crate::convert::timestamp;
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// Longest token lifetime accepted (ten years).
const MAX_EXPIRY_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// The admin service.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) registry: Registry,
}

/// A namespace, or `*`.
fn parse_namespace(s: &str, allow_star: bool) -> Result<String, WireError> {
    let s = s.trim();
    if allow_star && s == "*" {
        return Ok(s.to_owned());
    }
    if s.is_empty() {
        return Err(WireError::missing("namespace"));
    }
    format!("{s}/x")
        .parse::<patchport_core::Name>()
        .map_err(|_| WireError::invalid("namespace", format!("invalid namespace {s:?}")))?;
    Ok(s.to_owned())
}

/// A `CreateToken` request.
#[derive(Debug)]
struct CreateToken {
    /// A namespace, or `*`.
    namespace: String,
    scope: Scope,
    /// 0 for a token that never expires.
    expires_in_seconds: u64,
    description: String,
}

impl TryFrom<&v1::CreateTokenRequest> for CreateToken {
    type Error = WireError;

    fn try_from(req: &v1::CreateTokenRequest) -> Result<Self, WireError> {
        let namespace = parse_namespace(&req.namespace, true)?;
        let scope = Scope::parse(req.scope.trim()).map_err(|e| WireError::invalid("scope", e))?;
        if req.expires_in_seconds > MAX_EXPIRY_SECONDS {
            return Err(WireError::invalid(
                "expires_in_seconds",
                format!(
                    "expiry of {} s exceeds the limit of {MAX_EXPIRY_SECONDS} s (ten years)",
                    req.expires_in_seconds
                ),
            ));
        }
        if req.description.len() > 500 {
            return Err(WireError::invalid("description", "longer than 500 bytes"));
        }
        Ok(CreateToken {
            namespace,
            scope,
            expires_in_seconds: req.expires_in_seconds,
            description: req.description.clone(),
        })
    }
}

fn token_to_proto(t: &TokenRecord) -> v1::Token {
    v1::Token {
        id: t.id.clone(),
        namespace: t.namespace.clone(),
        scope: t.scope.clone(),
        description: t.description.clone(),
        created_by: t.created_by.clone(),
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        revoked_at: t.revoked_at.map(timestamp),
    }
}

fn audit_to_proto(e: AuditRecord) -> v1::AuditEntry {
    v1::AuditEntry {
        id: e.id,
        time: Some(timestamp(e.at)),
        actor: e.actor,
        action: e.action,
        target: e.target,
        namespace: e.namespace,
        outcome: e.outcome,
        detail: e.detail,
    }
}

impl Admin {
    async fn who(&self, md: &tonic::metadata::MetadataMap) -> ApiResult<Principal> {
        self.registry.auth.principal(md).await
    }

    async fn create(
        &self,
        who: &Principal,
        req: &v1::CreateTokenRequest,
    ) -> ApiResult<v1::CreateTokenResponse> {
        let CreateToken {
            namespace,
            scope,
            expires_in_seconds,
            description,
        } = req.try_into()?;
        // A worker token reads every namespace, so only a global admin may make one.
        let needs_global = namespace == "*" || scope == Scope::Worker;
        let auth = &self.registry.auth;
        if needs_global {
            self.registry.auth.require_global_admin(who)?;
        } else {
            auth.require(who, Need::Admin, &namespace).await?;
        }
        let expires_at =
            (expires_in_seconds > 0).then(|| now_millis() + (expires_in_seconds as i64) * 1000);
        let (record, secret) =
            mint_token(&namespace, scope, &description, &who.actor(), expires_at);
        let entry = self.registry.auth.entry(
            who,
            "CreateToken",
            &record.id,
            &record.namespace,
            &format!("scope {}", record.scope),
        );
        self.registry.meta.insert_token(&record, &entry).await?;
        tracing::info!(token = %record.id, namespace = %record.namespace, scope = %record.scope, "token created");
        Ok(v1::CreateTokenResponse {
            token: Some(token_to_proto(&record)),
            secret,
        })
    }

    async fn revoke(&self, who: &Principal, id: &str) -> ApiResult<(TokenRecord, String)> {
        let id = id.trim();
        if id.is_empty() || id.len() > 64 {
            return Err(ApiError::invalid("token id is empty or too long"));
        }
        let record = self.registry.meta.get_token(id).await?;
        let namespace = record.as_ref().map(|r| r.namespace.clone());
        // Unknown ids and ids of other namespaces look the same to a namespace admin.
        match &namespace {
            Some(ns) if ns != "*" => self.registry.auth.require(who, Need::Admin, ns).await?,
            _ => {
                self.registry.auth.require_global_admin(who)?;
            }
        }
        let namespace =
            namespace.ok_or_else(|| ApiError::not_found(format!("token {id} not found")))?;
        let entry = self
            .registry
            .auth
            .entry(who, "RevokeToken", id, &namespace, "");
        let revoked = self
            .registry
            .meta
            .revoke_token(id, now_millis(), &entry)
            .await?;
        self.registry.auth.forget(id);
        tracing::info!(token = %id, "token revoked");
        Ok((revoked, namespace))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    #[tracing::instrument(skip_all, fields(namespace = %req.get_ref().namespace, scope = %req.get_ref().scope))]
    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = self.who(req.metadata()).await?;
        let req = req.into_inner();
        let out = self.create(&who, &req).await;
        let target = out
            .as_ref()
            .ok()
            .and_then(|o| o.token.as_ref().map(|t| t.id.clone()))
            .unwrap_or_default();
        self.registry
            .auth
            .audit_refusal(
                &who,
                "CreateToken",
                &target,
                req.namespace.trim(),
                &out,
                &format!("scope {}", req.scope.trim()),
            )
            .await;
        Ok(Response::new(out?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_tokens(
        &self,
        req: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let who = self.who(req.metadata()).await?;
        let req = req.into_inner();
        let filter = if req.namespace.trim().is_empty() {
            self.registry.auth.require_global_admin(&who)?;
            None
        } else {
            let ns = parse_namespace(&req.namespace, true).map_err(ApiError::from)?;
            if ns == "*" {
                self.registry.auth.require_global_admin(&who)?;
            } else {
                self.registry.auth.require(&who, Need::Admin, &ns).await?;
            }
            Some(ns)
        };
        let tokens = self
            .registry
            .meta
            .list_tokens(filter.as_deref(), req.include_revoked)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::ListTokensResponse {
            tokens: tokens.iter().map(token_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn revoke_token(
        &self,
        req: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::Token>, Status> {
        let who = self.who(req.metadata()).await?;
        let id = req.into_inner().id;
        let out = self.revoke(&who, &id).await;
        let ns = out.as_ref().map(|(_, ns)| ns.clone()).unwrap_or_default();
        self.registry
            .auth
            .audit_refusal(&who, "RevokeToken", id.trim(), &ns, &out, "")
            .await;
        Ok(Response::new(token_to_proto(&out?.0)))
    }

    #[tracing::instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn get_namespace_policy(
        &self,
        req: Request<v1::GetNamespacePolicyRequest>,
    ) -> Result<Response<v1::NamespacePolicy>, Status> {
        let who = self.who(req.metadata()).await?;
        let ns = parse_namespace(&req.into_inner().namespace, false).map_err(ApiError::from)?;
        self.registry.auth.require(&who, Need::Admin, &ns).await?;
        let p = self
            .registry
            .meta
            .namespace_policy(&ns)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::NamespacePolicy {
            namespace: p.namespace,
            anonymous_read: p.anonymous_read,
            require_pass: p.require_pass,
            require_signed: p.require_signed,
        }))
    }

    #[tracing::instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn set_namespace_policy(
        &self,
        req: Request<v1::NamespacePolicy>,
    ) -> Result<Response<v1::NamespacePolicy>, Status> {
        let who = self.who(req.metadata()).await?;
        let req = req.into_inner();
        let out: ApiResult<String> = async {
            let ns = parse_namespace(&req.namespace, false)?;
            self.registry.auth.require(&who, Need::Admin, &ns).await?;
            self.registry
                .meta
                .set_namespace_policy(
                    &NamespacePolicyRecord {
                        namespace: ns.clone(),
                        anonymous_read: req.anonymous_read,
                        require_pass: req.require_pass,
                        require_signed: req.require_signed,
                    },
                    now_millis(),
                    &self.registry.auth.entry(
                        &who,
                        "SetNamespacePolicy",
                        &ns,
                        &ns,
                        &format!(
                            "anonymous_read={} require_pass={} require_signed={}",
                            req.anonymous_read, req.require_pass, req.require_signed
                        ),
                    ),
                )
                .await?;
            self.registry.auth.forget_policies();
            Ok(ns)
        }
        .await;
        self.registry
            .auth
            .audit_refusal(
                &who,
                "SetNamespacePolicy",
                req.namespace.trim(),
                req.namespace.trim(),
                &out,
                &format!(
                    "anonymous_read={} require_pass={} require_signed={}",
                    req.anonymous_read, req.require_pass, req.require_signed
                ),
            )
            .await;
        out?;
        Ok(Response::new(req))
    }

    #[tracing::instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn list_audit(
        &self,
        req: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let who = self.who(req.metadata()).await?;
        let req = req.into_inner();
        let ns = if req.namespace.trim().is_empty() {
            self.registry.auth.require_global_admin(&who)?;
            None
        } else {
            let ns = parse_namespace(&req.namespace, false).map_err(ApiError::from)?;
            self.registry.auth.require(&who, Need::Admin, &ns).await?;
            Some(ns)
        };
        let limit = match req.limit {
            0 => 100,
            n => n.min(1000),
        };
        let entries = self
            .registry
            .meta
            .list_audit(ns.as_deref(), limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::ListAuditResponse {
            entries: entries.into_iter().map(audit_to_proto).collect(),
        }))
    }
}
