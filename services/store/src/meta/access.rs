//! Tokens, namespace policies and the audit log: the records access control reads and
//! writes. The store never sees a token secret, only its sha256.

use super::StoreError;

/// A token's stored record (the secret's hash, never the secret).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRecord {
    /// Public id (the `<id>` of `pp_<id>_<secret>`).
    pub id: String,
    /// Lowercase hex sha256 of the secret.
    pub secret_hash: String,
    /// A namespace, or `*`.
    pub namespace: String,
    /// `read`, `push`, `admin` or `worker`.
    pub scope: String,
    /// Free text.
    pub description: String,
    /// Token id of the creator, or `bootstrap`.
    pub created_by: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; none never expires.
    pub expires_at: Option<i64>,
    /// Unix ms; none while valid.
    pub revoked_at: Option<i64>,
}

/// Per-namespace access and quality policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicyRecord {
    /// The namespace.
    pub namespace: String,
    /// Reads need no token.
    pub anonymous_read: bool,
    /// `resolve` returns only ports whose evaluation passed.
    pub require_pass: bool,
    /// `resolve` returns only signed artifacts.
    pub require_signed: bool,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRecord {
    /// Assigned by the store (0 when inserting).
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    /// Token id, `bootstrap` or `anonymous`.
    pub actor: String,
    /// The RPC name.
    pub action: String,
    /// The reference, token id or namespace acted on.
    pub target: String,
    /// The namespace concerned (`*` for global actions).
    pub namespace: String,
    /// `ok` or the refusal's gRPC code name.
    pub outcome: String,
    /// Free text (never a secret).
    pub detail: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct PolicyRow {
    namespace: String,
    anonymous_read: i64,
    require_pass: i64,
    require_signed: i64,
}

impl From<PolicyRow> for NamespacePolicyRecord {
    fn from(r: PolicyRow) -> Self {
        Self {
            namespace: r.namespace,
            anonymous_read: r.anonymous_read != 0,
            require_pass: r.require_pass != 0,
            require_signed: r.require_signed != 0,
        }
    }
}

pub(crate) const TOKEN_SELECT: &str = "SELECT id, secret_hash, namespace, scope, description, \
     created_by, created_at, expires_at, revoked_at FROM tokens";

/// Access-control records; every `MetadataStore` is one.
#[async_trait::async_trait]
pub trait Access: Send + Sync {
    /// Stores a new token (its id must be unique), with its audit row in the same
    /// transaction.
    async fn insert_token(
        &self,
        token: &TokenRecord,
        audit: &AuditRecord,
    ) -> Result<(), StoreError>;
    /// A token by id.
    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Tokens of one namespace (or all when `None`), oldest first.
    async fn list_tokens(
        &self,
        namespace: Option<&str>,
        include_revoked: bool,
    ) -> Result<Vec<TokenRecord>, StoreError>;
    /// Marks a token revoked at `at` (idempotent: the first revocation time stays).
    /// NotFound for an unknown id.
    async fn revoke_token(
        &self,
        id: &str,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<TokenRecord, StoreError>;
    /// A namespace's policy (the default when none was set).
    async fn namespace_policy(&self, namespace: &str) -> Result<NamespacePolicyRecord, StoreError>;
    /// Replaces a namespace's policy, with its audit row in the same transaction.
    async fn set_namespace_policy(
        &self,
        policy: &NamespacePolicyRecord,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<(), StoreError>;
    /// Namespaces whose reads need no token.
    async fn anonymous_namespaces(&self) -> Result<Vec<String>, StoreError>;
    /// Appends an audit entry on its own (its `id` is ignored): for refusals, which
    /// change nothing. A change that succeeds writes its row in its own transaction (the
    /// `audit` argument of each changing method), so no change is without its row.
    async fn insert_audit(&self, entry: &AuditRecord) -> Result<(), StoreError>;
    /// Newest first; one namespace or all.
    async fn list_audit(
        &self,
        namespace: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// The names (`namespace/name`) of every base or patch version holding this blob,
    /// as a file, an eval set, or a port artifact.
    async fn names_holding_blob(&self, digest: &str) -> Result<Vec<String>, StoreError>;
}

/// Implements `Access` for a struct with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_access {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Appends an audit row inside the caller's transaction.
            async fn write_audit(
                conn: &mut <$db as sqlx::Database>::Connection,
                e: &$crate::meta::access::AuditRecord,
            ) -> Result<(), $crate::meta::StoreError> {
                sqlx::query(
                    "INSERT INTO audit_log (at, actor, action, target, namespace, outcome, detail) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(e.at)
                .bind(&e.actor)
                .bind(&e.action)
                .bind(&e.target)
                .bind(&e.namespace)
                .bind(&e.outcome)
                .bind(&e.detail)
                .execute(&mut *conn)
                .await?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::access::Access for $store {
            async fn insert_token(
                &self,
                t: &$crate::meta::access::TokenRecord,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<(), $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO tokens (id, secret_hash, namespace, scope, description, \
                     created_by, created_at, expires_at, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&t.id)
                .bind(&t.secret_hash)
                .bind(&t.namespace)
                .bind(&t.scope)
                .bind(&t.description)
                .bind(&t.created_by)
                .bind(t.created_at)
                .bind(t.expires_at)
                .bind(t.revoked_at)
                .execute(&mut *tx)
                .await?;
                Self::write_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn get_token(
                &self,
                id: &str,
            ) -> Result<Option<$crate::meta::access::TokenRecord>, $crate::meta::StoreError> {
                use $crate::meta::access::{TOKEN_SELECT, TokenRecord};
                Ok(sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
                    "{TOKEN_SELECT} WHERE id = $1"
                )))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_tokens(
                &self,
                namespace: Option<&str>,
                include_revoked: bool,
            ) -> Result<Vec<$crate::meta::access::TokenRecord>, $crate::meta::StoreError> {
                use $crate::meta::access::{TOKEN_SELECT, TokenRecord};
                Ok(sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
                    "{TOKEN_SELECT} WHERE (CAST($1 AS TEXT) IS NULL OR namespace = $1) \
                     AND ($2 OR revoked_at IS NULL) ORDER BY created_at, id"
                )))
                .bind(namespace)
                .bind(include_revoked)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn revoke_token(
                &self,
                id: &str,
                at: i64,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<$crate::meta::access::TokenRecord, $crate::meta::StoreError> {
                use $crate::meta::access::{TOKEN_SELECT, TokenRecord};
                let mut tx = self.pool.begin().await?;
                sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                    .bind(id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                let token = sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
                    "{TOKEN_SELECT} WHERE id = $1"
                )))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| $crate::meta::StoreError::NotFound {
                    what: format!("token {id}"),
                })?;
                Self::write_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(token)
            }

            async fn namespace_policy(
                &self,
                namespace: &str,
            ) -> Result<$crate::meta::access::NamespacePolicyRecord, $crate::meta::StoreError> {
                let row = sqlx::query_as::<_, $crate::meta::access::PolicyRow>(
                    "SELECT namespace, anonymous_read, require_pass, require_signed FROM namespace_policies \
                     WHERE namespace = $1",
                )
                .bind(namespace)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Into::into).unwrap_or_else(|| {
                    $crate::meta::access::NamespacePolicyRecord {
                        namespace: namespace.to_owned(),
                        ..Default::default()
                    }
                }))
            }

            async fn set_namespace_policy(
                &self,
                p: &$crate::meta::access::NamespacePolicyRecord,
                at: i64,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<(), $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO namespace_policies (namespace, anonymous_read, require_pass, require_signed, updated_at) \
                     VALUES ($1, $2, $3, $5, $4) ON CONFLICT (namespace) DO UPDATE SET \
                     anonymous_read = excluded.anonymous_read, require_pass = excluded.require_pass, \
                     require_signed = excluded.require_signed, updated_at = excluded.updated_at",
                )
                .bind(&p.namespace)
                .bind(i64::from(p.anonymous_read))
                .bind(i64::from(p.require_pass))
                .bind(at)
                .bind(i64::from(p.require_signed))
                .execute(&mut *tx)
                .await?;
                Self::write_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn anonymous_namespaces(&self) -> Result<Vec<String>, $crate::meta::StoreError> {
                Ok(sqlx::query_scalar::<_, String>(
                    "SELECT namespace FROM namespace_policies WHERE anonymous_read <> 0 ORDER BY namespace",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn insert_audit(
                &self,
                e: &$crate::meta::access::AuditRecord,
            ) -> Result<(), $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::write_audit(&mut conn, e).await
            }

            async fn list_audit(
                &self,
                namespace: Option<&str>,
                limit: u32,
            ) -> Result<Vec<$crate::meta::access::AuditRecord>, $crate::meta::StoreError> {
                Ok(sqlx::query_as::<_, $crate::meta::access::AuditRecord>(
                    "SELECT id, at, actor, action, target, namespace, outcome, detail FROM audit_log \
                     WHERE (CAST($1 AS TEXT) IS NULL OR namespace = $1) ORDER BY id DESC LIMIT $2",
                )
                .bind(namespace)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn names_holding_blob(
                &self,
                digest: &str,
            ) -> Result<Vec<String>, $crate::meta::StoreError> {
                // Port artifacts are JSON lists of files and pieces; a digest is 71
                // characters of `sha256:<hex>`, so a substring match is exact.
                Ok(sqlx::query_scalar::<_, String>(
                    "SELECT b.name FROM base_files f JOIN base_versions b ON b.id = f.version_id \
                     WHERE f.digest = $1 \
                     UNION SELECT p.name FROM patch_files f JOIN patch_versions p ON p.id = f.version_id \
                     WHERE f.digest = $1 \
                     UNION SELECT p.name FROM patch_versions p WHERE p.eval_digest = $1 \
                     UNION SELECT p.name FROM ports o JOIN patch_versions p ON p.id = o.patch_id \
                     WHERE o.adapter_files_json LIKE $2 OR o.merged_files_json LIKE $2",
                )
                .bind(digest)
                .bind(format!("%{digest}%"))
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}

pub(crate) use impl_access;
