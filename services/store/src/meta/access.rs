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
    /// For each of `digests`, who holds the blob: the names (`namespace/name`) of the
    /// base and patch versions holding it as a file or an eval set, of the patch versions
    /// whose ports hold it as an artifact, and the namespaces that uploaded it (see
    /// [`Access::record_blob_owner`]). Indexed lookups, any number of digests.
    async fn blob_holders(&self, digests: &[String]) -> Result<Vec<BlobHolder>, StoreError>;
    /// Records that `namespace` uploaded the blob (proved it holds the bytes); idempotent.
    async fn record_blob_owner(
        &self,
        digest: &str,
        namespace: &str,
        at: i64,
    ) -> Result<(), StoreError>;
}

/// One holder of a blob (see [`Access::blob_holders`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobHolder {
    /// The blob.
    pub digest: String,
    /// A version's `namespace/name`, or an uploading namespace.
    pub holder: String,
    /// True when the holder is a namespace that uploaded the blob (no version yet).
    pub uploaded: bool,
}

/// Digests looked up per statement by [`Access::blob_holders`].
pub(crate) const HOLDERS_CHUNK: usize = 500;

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

            async fn blob_holders(
                &self,
                digests: &[String],
            ) -> Result<Vec<$crate::meta::access::BlobHolder>, $crate::meta::StoreError> {
                use $crate::meta::access::{BlobHolder, HOLDERS_CHUNK};
                let mut out = Vec::new();
                for chunk in digests.chunks(HOLDERS_CHUNK) {
                    let list = (1..=chunk.len())
                        .map(|i| format!("${i}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    // Every branch is an indexed lookup by digest (migration 0009).
                    let sql = format!(
                        "SELECT f.digest AS digest, b.name AS holder, CAST(0 AS BIGINT) AS owner FROM base_files f \
                         JOIN base_versions b ON b.id = f.version_id WHERE f.digest IN ({list}) \
                         UNION SELECT f.digest, p.name, CAST(0 AS BIGINT) FROM patch_files f \
                         JOIN patch_versions p ON p.id = f.version_id WHERE f.digest IN ({list}) \
                         UNION SELECT p.eval_digest, p.name, CAST(0 AS BIGINT) FROM patch_versions p \
                         WHERE p.eval_digest IN ({list}) \
                         UNION SELECT a.digest, p.name, CAST(0 AS BIGINT) FROM port_artifact_blobs a \
                         JOIN ports o ON o.id = a.port_id JOIN patch_versions p ON p.id = o.patch_id \
                         WHERE a.digest IN ({list}) \
                         UNION SELECT w.digest, w.namespace, CAST(1 AS BIGINT) FROM blob_owners w \
                         WHERE w.digest IN ({list})"
                    );
                    let mut query =
                        sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql));
                    for d in chunk {
                        query = query.bind(d);
                    }
                    out.extend(query.fetch_all(&self.pool).await?.into_iter().map(
                        |(digest, holder, owner)| BlobHolder {
                            digest,
                            holder,
                            uploaded: owner != 0,
                        },
                    ));
                }
                Ok(out)
            }

            async fn record_blob_owner(
                &self,
                digest: &str,
                namespace: &str,
                at: i64,
            ) -> Result<(), $crate::meta::StoreError> {
                sqlx::query(
                    "INSERT INTO blob_owners (digest, namespace, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (digest, namespace) DO NOTHING",
                )
                .bind(digest)
                .bind(namespace)
                .bind(at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_access;
