//! The SQL shared by the Postgres and SQLite stores.
//!
//! Both dialects accept `$n` placeholders (numbered in order of first use), `RETURNING`,
//! `BIGINT` and `TEXT`, so one body serves both; `impl_sql_store!` stamps it onto each
//! backend's pool type. Dialect differences live in the backend modules.

use patchport_core::layout::{FileRef, TensorRecord};
use patchport_core::{Digest, Name, Version};

use super::{StoreError, VersionState};

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct BaseRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) digest: String,
    pub(crate) parent_version: Option<String>,
    pub(crate) parent_digest: Option<String>,
    pub(crate) state: String,
    pub(crate) yank_reason: Option<String>,
    pub(crate) config_json: String,
    pub(crate) model_type: String,
    pub(crate) tensor_count: i64,
    pub(crate) total_size: i64,
    pub(crate) created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PatchRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) digest: String,
    pub(crate) base_name: String,
    pub(crate) base_version: String,
    pub(crate) base_digest: String,
    pub(crate) state: String,
    pub(crate) yank_reason: Option<String>,
    pub(crate) adapter_json: String,
    pub(crate) peft_type: String,
    pub(crate) tensor_count: i64,
    pub(crate) total_size: i64,
    pub(crate) eval_digest: Option<String>,
    pub(crate) created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FileRow {
    pub(crate) path: String,
    pub(crate) digest: String,
    pub(crate) size: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TensorRow {
    pub(crate) name: String,
    pub(crate) dtype: String,
    pub(crate) shape: String,
    pub(crate) begin_offset: i64,
    pub(crate) end_offset: i64,
    pub(crate) digest: String,
    pub(crate) non_finite: i64,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PortRow {
    pub(crate) patch_name: String,
    pub(crate) patch_version: String,
    pub(crate) patch_digest: String,
    pub(crate) base_name: String,
    pub(crate) base_version: String,
    pub(crate) base_digest: String,
    pub(crate) source_base_digest: String,
    pub(crate) method_version: String,
    pub(crate) state: String,
    pub(crate) refusals_json: String,
    pub(crate) diagnostics_json: Option<String>,
    pub(crate) adapter_files_json: String,
    pub(crate) merged_files_json: String,
    pub(crate) attempts: i64,
    pub(crate) error: Option<String>,
    pub(crate) queued_at: i64,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: Option<i64>,
}

pub(crate) const PORT_SELECT: &str = "SELECT p.name AS patch_name, p.version AS patch_version, \
    p.digest AS patch_digest, b.name AS base_name, b.version AS base_version, \
    b.digest AS base_digest, s.digest AS source_base_digest, t.method_version, t.state, \
    t.refusals_json, t.diagnostics_json, t.adapter_files_json, t.merged_files_json, \
    t.attempts, t.error, t.queued_at, t.started_at, t.finished_at \
    FROM ports t JOIN patch_versions p ON p.id = t.patch_id \
    JOIN base_versions b ON b.id = t.base_id JOIN base_versions s ON s.id = t.source_base_id";

pub(crate) fn port_record(row: PortRow) -> Result<super::PortRecord, StoreError> {
    const T: &str = "ports";
    fn json<V: serde::de::DeserializeOwned>(s: &str) -> Result<V, StoreError> {
        serde_json::from_str(s).map_err(|e| corrupt(T, e))
    }
    Ok(super::PortRecord {
        patch_name: name(T, &row.patch_name)?,
        patch_version: version(T, &row.patch_version)?,
        patch_digest: digest(T, &row.patch_digest)?,
        base_name: name(T, &row.base_name)?,
        base_version: version(T, &row.base_version)?,
        base_digest: digest(T, &row.base_digest)?,
        source_base_digest: digest(T, &row.source_base_digest)?,
        method_version: row.method_version,
        state: super::PortState::parse(&row.state)?,
        refusals: json(&row.refusals_json)?,
        diagnostics: row.diagnostics_json.as_deref().map(json).transpose()?,
        adapter_files: json(&row.adapter_files_json)?,
        merged_files: json(&row.merged_files_json)?,
        attempts: row.attempts as u32,
        error: row.error,
        queued_at: row.queued_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
    })
}

pub(crate) fn to_json<V: serde::Serialize>(v: &V) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

pub(crate) const BASE_SELECT: &str = "SELECT b.id, b.name, b.version, b.digest, \
    p.version AS parent_version, p.digest AS parent_digest, b.state, b.yank_reason, \
    b.config_json, b.model_type, b.tensor_count, b.total_size, b.created_at \
    FROM base_versions b LEFT JOIN base_versions p ON p.id = b.parent_id";

pub(crate) const PATCH_SELECT: &str = "SELECT v.id, v.name, v.version, v.digest, \
    b.name AS base_name, b.version AS base_version, b.digest AS base_digest, v.state, \
    v.yank_reason, v.adapter_json, v.peft_type, v.tensor_count, v.total_size, \
    v.eval_digest, v.created_at \
    FROM patch_versions v JOIN base_versions b ON b.id = v.base_id";

fn corrupt(table: &'static str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        message: message.to_string(),
    }
}

pub(crate) fn digest(table: &'static str, s: &str) -> Result<Digest, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn name(table: &'static str, s: &str) -> Result<Name, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn version(table: &'static str, s: &str) -> Result<Version, StoreError> {
    s.parse().map_err(|e| corrupt(table, e))
}

pub(crate) fn files(table: &'static str, rows: Vec<FileRow>) -> Result<Vec<FileRef>, StoreError> {
    rows.into_iter()
        .map(|r| {
            Ok(FileRef {
                path: r.path,
                digest: digest(table, &r.digest)?,
                size: r.size as u64,
            })
        })
        .collect()
}

pub(crate) fn base_record(
    row: BaseRow,
    files: Vec<FileRef>,
) -> Result<super::BaseVersionRecord, StoreError> {
    const T: &str = "base_versions";
    let parent = match (row.parent_version, row.parent_digest) {
        (Some(v), Some(d)) => Some((version(T, &v)?, digest(T, &d)?)),
        _ => None,
    };
    Ok(super::BaseVersionRecord {
        name: name(T, &row.name)?,
        version: version(T, &row.version)?,
        digest: digest(T, &row.digest)?,
        parent,
        state: VersionState::parse(&row.state)?,
        yank_reason: row.yank_reason,
        files,
        config_json: row.config_json,
        model_type: row.model_type,
        tensor_count: row.tensor_count as u64,
        total_size: row.total_size as u64,
        created_at: row.created_at,
    })
}

pub(crate) fn patch_record(
    row: PatchRow,
    files: Vec<FileRef>,
) -> Result<super::PatchVersionRecord, StoreError> {
    const T: &str = "patch_versions";
    Ok(super::PatchVersionRecord {
        name: name(T, &row.name)?,
        version: version(T, &row.version)?,
        digest: digest(T, &row.digest)?,
        base_name: name(T, &row.base_name)?,
        base_version: version(T, &row.base_version)?,
        base_digest: digest(T, &row.base_digest)?,
        state: VersionState::parse(&row.state)?,
        yank_reason: row.yank_reason,
        files,
        adapter_json: row.adapter_json,
        peft_type: row.peft_type,
        tensor_count: row.tensor_count as u64,
        total_size: row.total_size as u64,
        eval_digest: row.eval_digest.map(|d| digest(T, &d)).transpose()?,
        created_at: row.created_at,
    })
}

pub(crate) fn tensor_record(row: TensorRow) -> Result<TensorRecord, StoreError> {
    const T: &str = "blob_tensors";
    Ok(TensorRecord {
        name: row.name,
        dtype: row.dtype,
        shape: serde_json::from_str(&row.shape).map_err(|e| corrupt(T, e))?,
        begin: row.begin_offset as u64,
        end: row.end_offset as u64,
        digest: digest(T, &row.digest)?,
        non_finite: row.non_finite as u64,
    })
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// Implements `MetadataStore` for a struct with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_sql_store {
    ($store:ty, $db:ty) => {
        impl $store {
            async fn base_by_ref(
                conn: &mut <$db as sqlx::Database>::Connection,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::sql::BaseRow>, $crate::meta::StoreError> {
                use $crate::meta::sql::{BaseRow, BASE_SELECT};
                let row = match version {
                    patchport_core::VersionRef::Version(v) => {
                        sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                            "{BASE_SELECT} WHERE b.name = $1 AND b.version = $2"
                        )))
                        .bind(name.as_str())
                        .bind(v.as_str())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                    patchport_core::VersionRef::Digest(d) => {
                        sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                            "{BASE_SELECT} WHERE b.name = $1 AND b.digest = $2 ORDER BY b.id LIMIT 1"
                        )))
                        .bind(name.as_str())
                        .bind(d.to_string())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                };
                Ok(row)
            }

            async fn patch_by_ref(
                conn: &mut <$db as sqlx::Database>::Connection,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::sql::PatchRow>, $crate::meta::StoreError> {
                use $crate::meta::sql::{PatchRow, PATCH_SELECT};
                let row = match version {
                    patchport_core::VersionRef::Version(v) => {
                        sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                            "{PATCH_SELECT} WHERE v.name = $1 AND v.version = $2"
                        )))
                        .bind(name.as_str())
                        .bind(v.as_str())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                    patchport_core::VersionRef::Digest(d) => {
                        sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                            "{PATCH_SELECT} WHERE v.name = $1 AND v.digest = $2 ORDER BY v.id LIMIT 1"
                        )))
                        .bind(name.as_str())
                        .bind(d.to_string())
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                };
                Ok(row)
            }

            async fn load_base(
                conn: &mut <$db as sqlx::Database>::Connection,
                row: $crate::meta::sql::BaseRow,
            ) -> Result<$crate::meta::BaseVersionRecord, $crate::meta::StoreError> {
                let files = sqlx::query_as::<_, $crate::meta::sql::FileRow>(
                    "SELECT path, digest, size FROM base_files WHERE version_id = $1 ORDER BY path",
                )
                .bind(row.id)
                .fetch_all(&mut *conn)
                .await?;
                let files = $crate::meta::sql::files("base_files", files)?;
                $crate::meta::sql::base_record(row, files)
            }

            async fn load_patch(
                conn: &mut <$db as sqlx::Database>::Connection,
                row: $crate::meta::sql::PatchRow,
            ) -> Result<$crate::meta::PatchVersionRecord, $crate::meta::StoreError> {
                let files = sqlx::query_as::<_, $crate::meta::sql::FileRow>(
                    "SELECT path, digest, size FROM patch_files WHERE version_id = $1 ORDER BY path",
                )
                .bind(row.id)
                .fetch_all(&mut *conn)
                .await?;
                let files = $crate::meta::sql::files("patch_files", files)?;
                $crate::meta::sql::patch_record(row, files)
            }

            async fn try_insert_base(
                &self,
                new: &$crate::meta::NewBaseVersion,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::base_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_base(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        Ok((rec, false))
                    } else {
                        Err(StoreError::AlreadyExists {
                            what: format!("base version {}:{}", new.name, new.version),
                            existing: rec.digest,
                        })
                    };
                }
                let parent_id = match &new.parent {
                    None => None,
                    Some(p) => match Self::base_by_ref(&mut tx, &new.name, p).await? {
                        Some(row) => Some(row.id),
                        None => {
                            return Err(StoreError::NotFound {
                                what: format!("parent version {}:{}", new.name, p),
                            });
                        }
                    },
                };
                let total: u64 = new.files.iter().map(|f| f.size).sum();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO base_versions (name, version, digest, parent_id, config_json, \
                     model_type, tensor_count, total_size, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                )
                .bind(new.name.as_str())
                .bind(new.version.as_str())
                .bind(new.digest.to_string())
                .bind(parent_id)
                .bind(&new.config_json)
                .bind(&new.model_type)
                .bind(new.tensor_count as i64)
                .bind(total as i64)
                .bind($crate::meta::now_millis())
                .fetch_one(&mut *tx)
                .await?;
                for f in &new.files {
                    sqlx::query(
                        "INSERT INTO base_files (version_id, path, digest, size) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(&f.path)
                    .bind(f.digest.to_string())
                    .bind(f.size as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                let row = Self::base_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("base version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_base(&mut tx, row).await?;
                tx.commit().await?;
                Ok((rec, true))
            }

            async fn try_insert_patch(
                &self,
                new: &$crate::meta::NewPatchVersion,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::patch_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_patch(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        Ok((rec, false))
                    } else {
                        Err(StoreError::AlreadyExists {
                            what: format!("patch version {}:{}", new.name, new.version),
                            existing: rec.digest,
                        })
                    };
                }
                let Some(base) = Self::base_by_ref(&mut tx, &new.base_name, &new.base).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("base version {}:{}", new.base_name, new.base),
                    });
                };
                let total: u64 = new.files.iter().map(|f| f.size).sum();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO patch_versions (name, version, digest, base_id, adapter_json, \
                     peft_type, tensor_count, total_size, eval_digest, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                )
                .bind(new.name.as_str())
                .bind(new.version.as_str())
                .bind(new.digest.to_string())
                .bind(base.id)
                .bind(&new.adapter_json)
                .bind(&new.peft_type)
                .bind(new.tensor_count as i64)
                .bind(total as i64)
                .bind(new.eval_digest.map(|d| d.to_string()))
                .bind($crate::meta::now_millis())
                .fetch_one(&mut *tx)
                .await?;
                for f in &new.files {
                    sqlx::query(
                        "INSERT INTO patch_files (version_id, path, digest, size) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(&f.path)
                    .bind(f.digest.to_string())
                    .bind(f.size as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                let row = Self::patch_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("patch version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_patch(&mut tx, row).await?;
                tx.commit().await?;
                Ok((rec, true))
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::MetadataStore for $store {
            async fn insert_base_version(
                &self,
                new: $crate::meta::NewBaseVersion,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_base(&new).await {
                    // A concurrent push of the same name and version won the race:
                    // answer as if it had come first.
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_base(&new).await
                    }
                    other => other,
                }
            }

            async fn get_base_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::BaseVersionRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                match Self::base_by_ref(&mut conn, name, version).await? {
                    Some(row) => Ok(Some(Self::load_base(&mut conn, row).await?)),
                    None => Ok(None),
                }
            }

            async fn list_base_versions(
                &self,
                filter: &$crate::meta::ListFilter,
            ) -> Result<Vec<$crate::meta::BaseVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{BaseRow, BASE_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows = sqlx::query_as::<_, BaseRow>(sqlx::AssertSqlSafe(format!(
                    "{BASE_SELECT} WHERE ($1 = '' OR b.name = $1 OR substr(b.name, 1, length($1) + 1) = $1 || '/') \
                     AND ($2 OR b.state = 'published') ORDER BY b.name, b.id"
                )))
                .bind(filter.prefix.as_str())
                .bind(filter.include_yanked)
                .fetch_all(&mut *conn)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push(Self::load_base(&mut conn, row).await?);
                }
                Ok(out)
            }

            async fn yank_base_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
            ) -> Result<$crate::meta::BaseVersionRecord, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let Some(row) = Self::base_by_ref(&mut tx, name, version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("base version {name}:{version}"),
                    });
                };
                sqlx::query("UPDATE base_versions SET state = 'yanked', yank_reason = $1 WHERE id = $2")
                    .bind(reason)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await?;
                let row = Self::base_by_ref(&mut tx, name, version).await?.ok_or_else(|| {
                    $crate::meta::StoreError::NotFound {
                        what: format!("base version {name}:{version}"),
                    }
                })?;
                let rec = Self::load_base(&mut tx, row).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn insert_patch_version(
                &self,
                new: $crate::meta::NewPatchVersion,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_patch(&new).await {
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_patch(&new).await
                    }
                    other => other,
                }
            }

            async fn get_patch_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
            ) -> Result<Option<$crate::meta::PatchVersionRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                match Self::patch_by_ref(&mut conn, name, version).await? {
                    Some(row) => Ok(Some(Self::load_patch(&mut conn, row).await?)),
                    None => Ok(None),
                }
            }

            async fn list_patch_versions(
                &self,
                filter: &$crate::meta::ListFilter,
            ) -> Result<Vec<$crate::meta::PatchVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{PatchRow, PATCH_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows = sqlx::query_as::<_, PatchRow>(sqlx::AssertSqlSafe(format!(
                    "{PATCH_SELECT} WHERE ($1 = '' OR v.name = $1 OR substr(v.name, 1, length($1) + 1) = $1 || '/') \
                     AND ($2 OR v.state = 'published') ORDER BY v.name, v.id"
                )))
                .bind(filter.prefix.as_str())
                .bind(filter.include_yanked)
                .fetch_all(&mut *conn)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push(Self::load_patch(&mut conn, row).await?);
                }
                Ok(out)
            }

            async fn yank_patch_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
            ) -> Result<$crate::meta::PatchVersionRecord, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let Some(row) = Self::patch_by_ref(&mut tx, name, version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("patch version {name}:{version}"),
                    });
                };
                sqlx::query("UPDATE patch_versions SET state = 'yanked', yank_reason = $1 WHERE id = $2")
                    .bind(reason)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await?;
                let row = Self::patch_by_ref(&mut tx, name, version).await?.ok_or_else(|| {
                    $crate::meta::StoreError::NotFound {
                        what: format!("patch version {name}:{version}"),
                    }
                })?;
                let rec = Self::load_patch(&mut tx, row).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn get_blob_index(
                &self,
                blob: &patchport_core::Digest,
            ) -> Result<Option<$crate::meta::BlobIndex>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let head: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT json_len, tensor_count FROM blob_indexes WHERE blob_digest = $1",
                )
                .bind(blob.to_string())
                .fetch_optional(&mut *conn)
                .await?;
                let Some((json_len, _)) = head else {
                    return Ok(None);
                };
                let rows = sqlx::query_as::<_, $crate::meta::sql::TensorRow>(
                    "SELECT name, dtype, shape, begin_offset, end_offset, digest, non_finite \
                     FROM blob_tensors WHERE blob_digest = $1 ORDER BY ordinal",
                )
                .bind(blob.to_string())
                .fetch_all(&mut *conn)
                .await?;
                let tensors = rows
                    .into_iter()
                    .map($crate::meta::sql::tensor_record)
                    .collect::<Result<_, _>>()?;
                Ok(Some($crate::meta::BlobIndex {
                    json_len: json_len as u64,
                    tensors,
                }))
            }

            async fn put_blob_index(
                &self,
                blob: &patchport_core::Digest,
                index: &$crate::meta::BlobIndex,
            ) -> Result<(), $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let inserted = sqlx::query(
                    "INSERT INTO blob_indexes (blob_digest, json_len, tensor_count) VALUES ($1, $2, $3) \
                     ON CONFLICT (blob_digest) DO NOTHING",
                )
                .bind(blob.to_string())
                .bind(index.json_len as i64)
                .bind(index.tensors.len() as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    // Indexed before (the same bytes give the same index).
                    return Ok(());
                }
                for (i, t) in index.tensors.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO blob_tensors (blob_digest, ordinal, name, dtype, shape, \
                         begin_offset, end_offset, digest, non_finite) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(blob.to_string())
                    .bind(i as i64)
                    .bind(&t.name)
                    .bind(&t.dtype)
                    .bind(serde_json::to_string(&t.shape).unwrap_or_default())
                    .bind(t.begin as i64)
                    .bind(t.end as i64)
                    .bind(t.digest.to_string())
                    .bind(t.non_finite as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn get_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                method_version: &str,
            ) -> Result<Option<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(patch) = Self::patch_by_ref(&mut conn, patch_name, patch_version).await? else {
                    return Ok(None);
                };
                let Some(base) = Self::base_by_ref(&mut conn, base_name, base_version).await? else {
                    return Ok(None);
                };
                let row = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE t.patch_id = $1 AND t.base_id = $2 AND t.method_version = $3",
                    $crate::meta::sql::PORT_SELECT
                )))
                .bind(patch.id)
                .bind(base.id)
                .bind(method_version)
                .fetch_optional(&mut *conn)
                .await?;
                row.map($crate::meta::sql::port_record).transpose()
            }

            async fn save_port(
                &self,
                u: $crate::meta::PortUpdate,
            ) -> Result<$crate::meta::PortRecord, $crate::meta::StoreError> {
                use $crate::meta::sql::to_json;
                let mut tx = self.pool.begin().await?;
                let Some(patch) = Self::patch_by_ref(&mut tx, &u.patch_name, &u.patch_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("patch version {}:{}", u.patch_name, u.patch_version),
                    });
                };
                let Some(base) = Self::base_by_ref(&mut tx, &u.base_name, &u.base_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("base version {}:{}", u.base_name, u.base_version),
                    });
                };
                let source: i64 = sqlx::query_scalar("SELECT base_id FROM patch_versions WHERE id = $1")
                    .bind(patch.id)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO ports (patch_id, base_id, source_base_id, method_version, state, \
                     refusals_json, diagnostics_json, adapter_files_json, merged_files_json, attempts, \
                     error, queued_at, started_at, finished_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                     ON CONFLICT (patch_id, base_id, method_version) DO UPDATE SET \
                     state = excluded.state, refusals_json = excluded.refusals_json, \
                     diagnostics_json = excluded.diagnostics_json, \
                     adapter_files_json = excluded.adapter_files_json, \
                     merged_files_json = excluded.merged_files_json, attempts = excluded.attempts, \
                     error = excluded.error, started_at = excluded.started_at, \
                     finished_at = excluded.finished_at",
                )
                .bind(patch.id)
                .bind(base.id)
                .bind(source)
                .bind(&u.method_version)
                .bind(u.state.as_str())
                .bind(to_json(&u.refusals))
                .bind(u.diagnostics.as_ref().map(to_json))
                .bind(to_json(&u.adapter_files))
                .bind(to_json(&u.merged_files))
                .bind(i64::from(u.attempts))
                .bind(u.error.as_deref())
                .bind($crate::meta::now_millis())
                .bind(u.started_at)
                .bind(u.finished_at)
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE t.patch_id = $1 AND t.base_id = $2 AND t.method_version = $3",
                    $crate::meta::sql::PORT_SELECT
                )))
                .bind(patch.id)
                .bind(base.id)
                .bind(&u.method_version)
                .fetch_one(&mut *tx)
                .await?;
                let rec = $crate::meta::sql::port_record(row)?;
                tx.commit().await?;
                Ok(rec)
            }
        }
    };
}

pub(crate) use impl_sql_store;
