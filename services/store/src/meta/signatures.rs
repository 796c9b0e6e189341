//! Signatures the registry made (model signatures and port provenance), by subject.
//! The store only keeps the documents; `patchport-signing` makes and checks them.

use super::StoreError;

/// One stored signature.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SignatureRecord {
    /// `base:ns/name:version`, `patch:ns/name:version` or `port:<id>:adapter|merged`.
    pub subject: String,
    /// The Sigstore bundle JSON (`model.sig`).
    pub model_sig: String,
    /// The provenance envelope JSON (`provenance.json`), for port artifacts.
    pub provenance: Option<String>,
    /// The signing key's hint.
    pub key_hint: String,
    /// Unix ms.
    pub created_at: i64,
}

/// Signature records; every `MetadataStore` is one.
#[async_trait::async_trait]
pub trait Signatures: Send + Sync {
    /// The signature of a subject, if one was stored.
    async fn get_signature(&self, subject: &str) -> Result<Option<SignatureRecord>, StoreError>;
    /// Stores a signature and returns the one stored: with `replace` it overwrites any
    /// earlier one; without, the first one stored stays (and is returned).
    async fn put_signature(
        &self,
        record: &SignatureRecord,
        replace: bool,
    ) -> Result<SignatureRecord, StoreError>;
}

/// Implements `Signatures` for a struct with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_signatures {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::meta::signatures::Signatures for $store {
            async fn get_signature(
                &self,
                subject: &str,
            ) -> Result<Option<$crate::meta::signatures::SignatureRecord>, $crate::meta::StoreError>
            {
                Ok(
                    sqlx::query_as::<_, $crate::meta::signatures::SignatureRecord>(
                        "SELECT subject, model_sig, provenance, key_hint, created_at \
                     FROM signatures WHERE subject = $1",
                    )
                    .bind(subject)
                    .fetch_optional(&self.pool)
                    .await?,
                )
            }

            async fn put_signature(
                &self,
                r: &$crate::meta::signatures::SignatureRecord,
                replace: bool,
            ) -> Result<$crate::meta::signatures::SignatureRecord, $crate::meta::StoreError> {
                let sql = if replace {
                    "INSERT INTO signatures (subject, model_sig, provenance, key_hint, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subject) DO UPDATE SET \
                     model_sig = excluded.model_sig, provenance = excluded.provenance, \
                     key_hint = excluded.key_hint, created_at = excluded.created_at"
                } else {
                    "INSERT INTO signatures (subject, model_sig, provenance, key_hint, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subject) DO NOTHING"
                };
                sqlx::query(sql)
                    .bind(&r.subject)
                    .bind(&r.model_sig)
                    .bind(&r.provenance)
                    .bind(&r.key_hint)
                    .bind(r.created_at)
                    .execute(&self.pool)
                    .await?;
                self.get_signature(&r.subject).await?.ok_or_else(|| {
                    $crate::meta::StoreError::Corrupt {
                        table: "signatures",
                        message: format!("{} vanished after it was stored", r.subject),
                    }
                })
            }
        }
    };
}

pub(crate) use impl_signatures;
