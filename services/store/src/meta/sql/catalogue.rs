//! The catalogue in SQL: versions, lineage, files, tensor indexes. A publish fans out
//! and a patch push catches up in the same transaction (the queue's `queue_port`).

/// Implements `Catalogue` for a store with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_catalogue {
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

            /// The files of many versions of `table`, by version id, in few statements.
            async fn files_of(
                conn: &mut <$db as sqlx::Database>::Connection,
                table: &'static str,
                ids: impl Iterator<Item = i64>,
            ) -> Result<std::collections::HashMap<i64, Vec<$crate::meta::sql::FileRow>>, $crate::meta::StoreError> {
                let ids: Vec<i64> = ids.collect();
                let mut rows = Vec::new();
                for chunk in ids.chunks($crate::meta::sql::FILES_CHUNK) {
                    let sql = $crate::meta::sql::files_of_sql(table, chunk.len());
                    let mut q = sqlx::query_as::<_, $crate::meta::sql::VersionFileRow>(sqlx::AssertSqlSafe(sql));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    rows.extend(q.fetch_all(&mut *conn).await?);
                }
                Ok($crate::meta::sql::group_files(rows))
            }

            /// The rows of a version listing (`select` aliased `alias`, see
            /// [`listing`](crate::meta::sql::listing)): the filter's base digest is
            /// resolved to its version ids first, so the statement filters by known ids.
            /// Planned with its values every time (not a cached generic plan): versions
            /// are spread very unevenly over bases and namespaces, and a plan made for an
            /// average value walks every row to find the few of a rare one.
            async fn listing_rows<R>(
                conn: &mut <$db as sqlx::Database>::Connection,
                select: &str,
                alias: &str,
                filter: &$crate::meta::ListFilter,
            ) -> Result<Vec<R>, $crate::meta::StoreError>
            where
                R: for<'r> sqlx::FromRow<'r, <$db as sqlx::Database>::Row> + Send + Unpin,
            {
                let base_ids = match &filter.on_base {
                    None => None,
                    Some(digest) => {
                        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM base_versions WHERE digest = $1 ORDER BY id")
                            .bind(digest.to_string())
                            .fetch_all(&mut *conn)
                            .await?;
                        if ids.is_empty() {
                            return Ok(Vec::new());
                        }
                        Some(ids)
                    }
                };
                let (tail, args) = $crate::meta::sql::listing(alias, filter, base_ids.as_deref());
                let mut q = sqlx::query_as::<_, R>(sqlx::AssertSqlSafe(format!("{select}{tail}"))).persistent(false);
                for a in args {
                    q = match a {
                        $crate::meta::sql::Arg::Text(t) => q.bind(t),
                        $crate::meta::sql::Arg::Int(i) => q.bind(i),
                    };
                }
                Ok(q.fetch_all(&mut *conn).await?)
            }

            async fn try_insert_base(
                &self,
                new: &$crate::meta::NewBaseVersion,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::base_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_base(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        let mut audit = audit.clone();
                        audit.detail = format!("digest {} created false", new.digest);
                        Self::write_audit(&mut tx, &audit).await?;
                        tx.commit().await?;
                        Ok((rec, false))
                    } else {
                        Err(StoreError::AlreadyExists {
                            what: format!("base version {}:{}", new.name, new.version),
                            existing: rec.digest,
                        })
                    };
                }
                let parent = match &new.parent {
                    None => None,
                    Some(p) => match Self::base_by_ref(&mut tx, &new.name, p).await? {
                        Some(row) => Some(row),
                        None => {
                            return Err(StoreError::NotFound {
                                what: format!("parent version {}:{}", new.name, p),
                            });
                        }
                    },
                };
                let parent_id = parent.as_ref().map(|r| r.id);
                let parent_ref = parent.map(|r| (r.version, r.digest));
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
                // Fan-out, in this transaction: every published patch version pinned to
                // an ancestor of the new version gets a port onto it.
                Self::emit(
                    &mut tx,
                    patchport_core::event::EventKind::BasePublished,
                    &format!("{}:{}", new.name, new.version),
                    &serde_json::json!({
                        "digest": new.digest.to_string(),
                        "parent": parent_ref.as_ref().map(|(v, d)| serde_json::json!({"version": v, "digest": d})),
                    }),
                )
                .await?;
                let patches: Vec<i64> = sqlx::query_scalar(
                    "WITH RECURSIVE anc (id) AS ( \
                     SELECT parent_id FROM base_versions WHERE id = $1 AND parent_id IS NOT NULL \
                     UNION ALL SELECT b.parent_id FROM base_versions b JOIN anc ON b.id = anc.id \
                     WHERE b.parent_id IS NOT NULL) \
                     SELECT p.id FROM patch_versions p JOIN anc ON p.base_id = anc.id \
                     WHERE p.state = 'published' ORDER BY p.id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                let half = patches.len() / 2;
                for (i, patch_id) in patches.into_iter().enumerate() {
                    if i == half && let Some(pause) = $crate::meta::sql::fanout_pause() {
                        tracing::warn!(queued = i, pause_ms = pause.as_millis() as u64, "test failpoint: publish paused mid fan-out");
                        tokio::time::sleep(pause).await;
                    }
                    Self::queue_port(
                        &mut tx,
                        patch_id,
                        id,
                        self.retry.max_attempts,
                        patchport_core::port::PortOrigin::Fanout,
                        false,
                    )
                    .await?;
                }
                let row = Self::base_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("base version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_base(&mut tx, row).await?;
                let mut audit = audit.clone();
                audit.detail = format!("digest {} created true", new.digest);
                Self::write_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                Ok((rec, true))
            }

            async fn try_insert_patch(
                &self,
                new: &$crate::meta::NewPatchVersion,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let this = patchport_core::VersionRef::Version(new.version.clone());
                if let Some(row) = Self::patch_by_ref(&mut tx, &new.name, &this).await? {
                    let rec = Self::load_patch(&mut tx, row).await?;
                    return if rec.digest == new.digest {
                        let mut audit = audit.clone();
                        audit.detail = format!("digest {} created false", new.digest);
                        Self::write_audit(&mut tx, &audit).await?;
                        tx.commit().await?;
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
                // Catch-up, in this transaction: a port onto every published descendant
                // of the pinned base.
                Self::emit(
                    &mut tx,
                    patchport_core::event::EventKind::PatchPushed,
                    &format!("{}:{}", new.name, new.version),
                    &serde_json::json!({
                        "digest": new.digest.to_string(),
                        "base": format!("{}:{}", base.name, base.version),
                        "base_digest": base.digest,
                    }),
                )
                .await?;
                let targets: Vec<i64> = sqlx::query_scalar(
                    "WITH RECURSIVE des (id) AS ( \
                     SELECT id FROM base_versions WHERE parent_id = $1 \
                     UNION ALL SELECT b.id FROM base_versions b JOIN des ON b.parent_id = des.id) \
                     SELECT b.id FROM base_versions b JOIN des ON b.id = des.id \
                     WHERE b.state = 'published' ORDER BY b.id",
                )
                .bind(base.id)
                .fetch_all(&mut *tx)
                .await?;
                for target_id in targets {
                    Self::queue_port(
                        &mut tx,
                        id,
                        target_id,
                        self.retry.max_attempts,
                        patchport_core::port::PortOrigin::CatchUp,
                        false,
                    )
                    .await?;
                }
                let row = Self::patch_by_ref(&mut tx, &new.name, &this)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("patch version {}:{}", new.name, new.version),
                    })?;
                let rec = Self::load_patch(&mut tx, row).await?;
                let mut audit = audit.clone();
                audit.detail = format!("digest {} created true", new.digest);
                Self::write_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                Ok((rec, true))
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::Catalogue for $store {
            async fn insert_base_version(
                &self,
                new: $crate::meta::NewBaseVersion,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<($crate::meta::BaseVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_base(&new, audit).await {
                    // A concurrent push of the same name and version won the race:
                    // answer as if it had come first.
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_base(&new, audit).await
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
            ) -> Result<$crate::meta::Paged<$crate::meta::BaseVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{BaseRow, BASE_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows: Vec<BaseRow> = Self::listing_rows(&mut conn, BASE_SELECT, "b", filter).await?;
                let mut files = Self::files_of(&mut conn, "base_files", rows.iter().map(|r| r.id)).await?;
                $crate::meta::Paged::cut(rows, &filter.page, |r| (r.name.clone(), r.id), |row| {
                    let f = files.remove(&row.id).unwrap_or_default();
                    $crate::meta::sql::base_record(row, $crate::meta::sql::files("base_files", f)?)
                })
            }

            async fn yank_base_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
                audit: &$crate::meta::access::AuditRecord,
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
                Self::write_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn insert_patch_version(
                &self,
                new: $crate::meta::NewPatchVersion,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<($crate::meta::PatchVersionRecord, bool), $crate::meta::StoreError> {
                match self.try_insert_patch(&new, audit).await {
                    Err($crate::meta::StoreError::Database { source })
                        if $crate::meta::sql::is_unique_violation(&source) =>
                    {
                        self.try_insert_patch(&new, audit).await
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
            ) -> Result<$crate::meta::Paged<$crate::meta::PatchVersionRecord>, $crate::meta::StoreError> {
                use $crate::meta::sql::{PatchRow, PATCH_SELECT};
                let mut conn = self.pool.acquire().await?;
                let rows: Vec<PatchRow> = Self::listing_rows(&mut conn, PATCH_SELECT, "v", filter).await?;
                let mut files = Self::files_of(&mut conn, "patch_files", rows.iter().map(|r| r.id)).await?;
                $crate::meta::Paged::cut(rows, &filter.page, |r| (r.name.clone(), r.id), |row| {
                    let f = files.remove(&row.id).unwrap_or_default();
                    $crate::meta::sql::patch_record(row, $crate::meta::sql::files("patch_files", f)?)
                })
            }

            async fn yank_patch_version(
                &self,
                name: &patchport_core::Name,
                version: &patchport_core::VersionRef,
                reason: &str,
                audit: &$crate::meta::access::AuditRecord,
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
                Self::write_audit(&mut tx, audit).await?;
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
        }
    };
}

pub(crate) use impl_catalogue;
