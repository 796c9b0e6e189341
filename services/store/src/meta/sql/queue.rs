//! The queue in SQL: ports and their jobs, leases with expiry, fencing tokens that
//! every write of an attempt checks, retries with backoff, cancellation through the
//! fence, priorities and queue positions.

/// Implements `Queue` for a store with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_queue {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Ports matching `filter` (a fixed `t.<column> = $1` clause) for `id`, oldest first.
            async fn ports_where(
                conn: &mut <$db as sqlx::Database>::Connection,
                filter: &'static str,
                id: i64,
                places: $crate::meta::sql::Places,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let rows = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE {filter} ORDER BY t.id",
                    $crate::meta::sql::port_select(places)
                )))
                .bind(id)
                .fetch_all(&mut *conn)
                .await?;
                rows.into_iter().map($crate::meta::sql::port_record).collect()
            }

            /// Indexes the blobs of `ports`' artifacts (`port_artifact_blobs`): blob reads
            /// through a port are authorised by this index.
            async fn index_port_artifacts(
                conn: &mut <$db as sqlx::Database>::Connection,
                ports: &[i64],
                digests: &[String],
            ) -> Result<(), $crate::meta::StoreError> {
                for port in ports {
                    for chunk in digests.chunks($crate::meta::access::HOLDERS_CHUNK) {
                        let values = (2..chunk.len() + 2)
                            .map(|i| format!("(${i})"))
                            .collect::<Vec<_>>()
                            .join(", ");
                        let sql = format!(
                            "INSERT INTO port_artifact_blobs (digest, port_id) \
                             SELECT d.column1, $1 FROM (VALUES {values}) AS d WHERE true \
                             ON CONFLICT (digest, port_id) DO NOTHING"
                        );
                        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(*port);
                        for d in chunk {
                            query = query.bind(d);
                        }
                        query.execute(&mut *conn).await?;
                    }
                }
                Ok(())
            }

            /// The ids of a job's ports in a state, oldest first.
            async fn job_port_ids(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
                state: $crate::meta::PortState,
            ) -> Result<Vec<i64>, $crate::meta::StoreError> {
                Ok(sqlx::query_scalar("SELECT id FROM ports WHERE job_id = $1 AND state = $2 ORDER BY id")
                    .bind(job_id)
                    .bind(state.as_str())
                    .fetch_all(&mut *conn)
                    .await?)
            }

            /// Ports by id, oldest first.
            async fn ports_by_id(
                conn: &mut <$db as sqlx::Database>::Connection,
                ids: &[i64],
                places: $crate::meta::sql::Places,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let mut q = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                        "{} WHERE t.id IN ({}) ORDER BY t.id",
                        $crate::meta::sql::port_select(places),
                        marks.join(", ")
                    )));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    for row in q.fetch_all(&mut *conn).await? {
                        out.push($crate::meta::sql::port_record(row)?);
                    }
                }
                Ok(out)
            }

            /// Creates (or finds, by key) the job porting a patch version onto a base
            /// version and the patch version's port row linked to it, with its events;
            /// returns the port's id. Idempotent: an existing port row is left alone,
            /// unless `retry` is set and it ended failed or cancelled, when it is queued
            /// again. A queued job is raised to `origin`'s priority when that is higher.
            async fn queue_port(
                conn: &mut <$db as sqlx::Database>::Connection,
                patch_id: i64,
                target_id: i64,
                max_attempts: u32,
                origin: patchport_core::port::PortOrigin,
                retry: bool,
            ) -> Result<i64, $crate::meta::StoreError> {
                use patchport_core::event::EventKind;
                use patchport_core::port::METHOD_VERSION;
                let now = $crate::meta::now_millis();
                let priority = origin.job_priority();
                let (patch_digest, source_id, source_digest): (String, i64, String) = sqlx::query_as(
                    "SELECT p.digest, p.base_id, s.digest FROM patch_versions p \
                     JOIN base_versions s ON s.id = p.base_id WHERE p.id = $1",
                )
                .bind(patch_id)
                .fetch_one(&mut *conn)
                .await?;
                let target_digest: String =
                    sqlx::query_scalar("SELECT digest FROM base_versions WHERE id = $1")
                        .bind(target_id)
                        .fetch_one(&mut *conn)
                        .await?;
                let key = format!("port:{patch_digest}:{source_digest}:{target_digest}:{METHOD_VERSION}");
                sqlx::query(
                    "INSERT INTO jobs (job_key, patch_digest, source_base_digest, target_base_digest, \
                     method_version, state, priority, max_attempts, run_after, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, 'queued', $8, $6, $7, $7, $7) \
                     ON CONFLICT (job_key) DO NOTHING",
                )
                .bind(&key)
                .bind(&patch_digest)
                .bind(&source_digest)
                .bind(&target_digest)
                .bind(METHOD_VERSION)
                .bind(i64::from(max_attempts))
                .bind(now)
                .bind(priority)
                .execute(&mut *conn)
                .await?;
                let (job_id, job_state): (i64, String) =
                    sqlx::query_as("SELECT id, state FROM jobs WHERE job_key = $1")
                        .bind(&key)
                        .fetch_one(&mut *conn)
                        .await?;
                sqlx::query(
                    "UPDATE jobs SET priority = $1, updated_at = $2 \
                     WHERE id = $3 AND state = 'queued' AND priority < $1",
                )
                .bind(priority)
                .bind(now)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
                let existing: Option<(i64, String)> = sqlx::query_as(
                    "SELECT id, state FROM ports WHERE patch_id = $1 AND base_id = $2 AND method_version = $3",
                )
                .bind(patch_id)
                .bind(target_id)
                .bind(METHOD_VERSION)
                .fetch_optional(&mut *conn)
                .await?;
                let port_id = match existing {
                    Some((id, state)) if !(retry && (state == "failed" || state == "cancelled")) => {
                        return Ok(id);
                    }
                    Some((id, _)) => {
                        sqlx::query(
                            "UPDATE ports SET state = 'queued', refusals_json = '[]', diagnostics_json = NULL, \
                             adapter_files_json = '[]', merged_files_json = '[]', attempts = 0, error = NULL, \
                             queued_at = $1, started_at = NULL, finished_at = NULL, evaluation_json = NULL, \
                             job_id = $2 WHERE id = $3",
                        )
                        .bind(now)
                        .bind(job_id)
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query("DELETE FROM port_artifact_blobs WHERE port_id = $1")
                            .bind(id)
                            .execute(&mut *conn)
                            .await?;
                        id
                    }
                    None => {
                        sqlx::query_scalar(
                            "INSERT INTO ports (patch_id, base_id, source_base_id, method_version, state, \
                             refusals_json, diagnostics_json, adapter_files_json, merged_files_json, attempts, \
                             error, queued_at, started_at, finished_at, job_id) \
                             VALUES ($1, $2, $3, $4, 'queued', '[]', NULL, '[]', '[]', 0, NULL, $5, NULL, NULL, $6) \
                             RETURNING id",
                        )
                        .bind(patch_id)
                        .bind(target_id)
                        .bind(source_id)
                        .bind(METHOD_VERSION)
                        .bind(now)
                        .bind(job_id)
                        .fetch_one(&mut *conn)
                        .await?
                    }
                };
                let one = [port_id];
                match job_state.as_str() {
                    "queued" => {
                        Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?;
                    }
                    "running" => {
                        // Another patch version with the same content is being ported
                        // right now: this one rides along.
                        sqlx::query(
                            "UPDATE ports SET state = 'running', \
                             attempts = (SELECT attempts FROM jobs WHERE id = $1), started_at = $2 \
                             WHERE id = $3",
                        )
                        .bind(job_id)
                        .bind(now)
                        .bind(port_id)
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query("UPDATE jobs SET cancel_requested = 0 WHERE id = $1")
                            .bind(job_id)
                            .execute(&mut *conn)
                            .await?;
                        Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?;
                        Self::emit_ports(conn, EventKind::PortStarted, None, &one).await?;
                    }
                    done => {
                        // The work is done: share a sibling's result when one holds it
                        // (unless a failure is being retried), otherwise queue the job
                        // again.
                        let share = done == "succeeded" || done == "incompatible" || (done == "failed" && !retry);
                        let copied = if share {
                            sqlx::query(
                                "UPDATE ports SET (state, refusals_json, diagnostics_json, \
                                 adapter_files_json, merged_files_json, attempts, error, started_at, \
                                 finished_at, evaluation_json) = (SELECT s.state, s.refusals_json, \
                                 s.diagnostics_json, s.adapter_files_json, s.merged_files_json, s.attempts, \
                                 s.error, s.started_at, s.finished_at, s.evaluation_json FROM ports s \
                                 WHERE s.job_id = $1 AND s.id <> $2 AND s.state = $3 ORDER BY s.id LIMIT 1) \
                                 WHERE id = $2 AND EXISTS (SELECT 1 FROM ports s WHERE s.job_id = $1 \
                                 AND s.id <> $2 AND s.state = $3)",
                            )
                            .bind(job_id)
                            .bind(port_id)
                            .bind(done)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected()
                        } else {
                            0
                        };
                        if copied == 1 {
                            sqlx::query(
                                "INSERT INTO port_artifact_blobs (digest, port_id) \
                                 SELECT a.digest, $2 FROM port_artifact_blobs a, ports s \
                                 WHERE s.id = a.port_id AND s.job_id = $1 AND s.id <> $2 AND s.state = $3 \
                                 ON CONFLICT (digest, port_id) DO NOTHING",
                            )
                            .bind(job_id)
                            .bind(port_id)
                            .bind(done)
                            .execute(&mut *conn)
                            .await?;
                            let kind = if done == "failed" { EventKind::PortFailed } else { EventKind::PortCompleted };
                            Self::emit_ports(conn, kind, Some(done), &one).await?;
                        } else {
                            sqlx::query(
                                "UPDATE jobs SET state = 'queued', attempts = 0, run_after = $1, priority = $3, \
                                 cancel_requested = 0, last_error = NULL, lease_owner = NULL, \
                                 lease_expires_at = NULL, updated_at = $1 WHERE id = $2",
                            )
                            .bind(now)
                            .bind(job_id)
                            .bind(priority)
                            .execute(&mut *conn)
                            .await?;
                            Self::emit_ports(conn, EventKind::PortQueued, None, &one).await?;
                        }
                    }
                }
                Ok(port_id)
            }

            /// Ends a running attempt (token checked) in `next` (`queued`, `failed` or
            /// `cancelled`), moving its running ports along with their events.
            #[allow(clippy::too_many_arguments)]
            async fn end_attempt(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
                fencing_token: i64,
                next: &str,
                run_after: i64,
                error: Option<&str>,
                attempts_delta: i64,
                detail: &str,
            ) -> Result<(), $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let n = sqlx::query(
                    "UPDATE jobs SET state = $1, run_after = $2, lease_owner = NULL, \
                     lease_expires_at = NULL, last_error = COALESCE($3, last_error), \
                     attempts = attempts + $4, updated_at = $5 \
                     WHERE id = $6 AND fencing_token = $7 AND state = 'running'",
                )
                .bind(next)
                .bind(run_after)
                .bind(error)
                .bind(attempts_delta)
                .bind(now)
                .bind(job_id)
                .bind(fencing_token)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err($crate::meta::queue::lease_lost(job_id));
                }
                use patchport_core::event::EventKind;
                let (kind, finished) = match next {
                    "queued" => (EventKind::PortQueued, None),
                    "failed" => (EventKind::PortFailed, Some(now)),
                    _ => (EventKind::PortCancelled, Some(now)),
                };
                let running =
                    Self::job_port_ids(conn, job_id, $crate::meta::PortState::Running).await?;
                sqlx::query(
                    "UPDATE ports SET state = $1, error = COALESCE($2, error), finished_at = $3, \
                     attempts = (SELECT attempts FROM jobs WHERE id = $4) \
                     WHERE job_id = $4 AND state = 'running'",
                )
                .bind(next)
                .bind(error)
                .bind(finished)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
                Self::emit_ports(conn, kind, Some(detail), &running).await?;
                Ok(())
            }

            async fn load_job(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<Option<$crate::meta::JobRecord>, $crate::meta::StoreError> {
                let row = sqlx::query_as::<_, $crate::meta::sql::JobRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE id = $1",
                    $crate::meta::sql::JOB_SELECT
                )))
                .bind(job_id)
                .fetch_optional(&mut *conn)
                .await?;
                row.map($crate::meta::sql::job_record).transpose()
            }

            async fn must_load_job(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                Self::load_job(conn, job_id)
                    .await?
                    .ok_or_else(|| $crate::meta::StoreError::NotFound {
                        what: format!("job {job_id}"),
                    })
            }

            async fn load_job_ports(
                conn: &mut <$db as sqlx::Database>::Connection,
                job_id: i64,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                Self::ports_where(conn, "t.job_id = $1", job_id, $crate::meta::sql::Places::Without).await
            }

            /// Where a running job goes when its attempt ends without an outcome.
            fn next_state(
                cancel_requested: i64,
                attempts: i64,
                max_attempts: i64,
                retryable: bool,
            ) -> &'static str {
                if cancel_requested != 0 {
                    "cancelled"
                } else if retryable && attempts < max_attempts {
                    "queued"
                } else {
                    "failed"
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::Queue for $store {
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
                    $crate::meta::sql::port_select($crate::meta::sql::Places::With)
                )))
                .bind(patch.id)
                .bind(base.id)
                .bind(method_version)
                .fetch_optional(&mut *conn)
                .await?;
                row.map($crate::meta::sql::port_record).transpose()
            }

            async fn request_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                origin: patchport_core::port::PortOrigin,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<$crate::meta::PortRecord, $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let mut tx = self.pool.begin().await?;
                let Some(patch) = Self::patch_by_ref(&mut tx, patch_name, patch_version).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("patch version {patch_name}:{patch_version}"),
                    });
                };
                let Some(base) = Self::base_by_ref(&mut tx, base_name, base_version).await? else {
                    return Err(StoreError::NotFound {
                        what: format!("base version {base_name}:{base_version}"),
                    });
                };
                if base.name != patch.base_name {
                    return Err(StoreError::FailedPrecondition {
                        message: format!(
                            "{}:{} was trained on {}, not {}: a port carries a patch onto another version of its own base",
                            patch.name, patch.version, patch.base_name, base.name
                        ),
                    });
                }
                if base.digest == patch.base_digest {
                    return Err(StoreError::FailedPrecondition {
                        message: format!(
                            "{}:{} was trained on {}:{} itself: it needs no port there (compat lists it as native)",
                            patch.name, patch.version, base.name, base.version
                        ),
                    });
                }
                let port_id =
                    Self::queue_port(&mut tx, patch.id, base.id, self.retry.max_attempts, origin, true).await?;
                let port = Self::ports_by_id(&mut tx, &[port_id], $crate::meta::sql::Places::With)
                    .await?
                    .pop()
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("port {port_id}"),
                    })?;
                let mut audit = audit.clone();
                audit.detail = format!("state {}", port.state.as_str());
                Self::write_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                Ok(port)
            }

            async fn get_job(
                &self,
                job_id: i64,
            ) -> Result<Option<$crate::meta::JobRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::load_job(&mut conn, job_id).await
            }

            async fn job_ports(
                &self,
                job_id: i64,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::load_job_ports(&mut conn, job_id).await
            }

            async fn list_ports_onto(
                &self,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                page: &$crate::meta::Page,
            ) -> Result<$crate::meta::Paged<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(base) = Self::base_by_ref(&mut conn, base_name, base_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("base version {base_name}:{base_version}"),
                    });
                };
                let limit = page.limit.map_or(String::new(), |l| format!(" LIMIT {}", i64::from(l) + 1));
                let rows = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE t.base_id = $1 AND t.id > $2 ORDER BY t.id{limit}",
                    $crate::meta::sql::port_summary_select($crate::meta::sql::Places::With)
                )))
                .bind(base.id)
                .bind(page.after_id)
                .fetch_all(&mut *conn)
                .await?;
                $crate::meta::Paged::cut(rows, page, |r| (String::new(), r.id), $crate::meta::sql::port_record)
            }

            async fn merged_ports_of(
                &self,
                patch_name: &patchport_core::Name,
                patch_digest: &patchport_core::Digest,
                source_base_digest: &patchport_core::Digest,
                method_version: &str,
                limit: u32,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let rows = sqlx::query_as::<_, $crate::meta::sql::PortRow>(sqlx::AssertSqlSafe(format!(
                    "{} WHERE p.name = $1 AND p.digest = $2 AND s.digest = $3 AND t.method_version = $4 \
                     AND t.state = 'succeeded' AND t.merged_files_json <> '[]' \
                     ORDER BY t.finished_at DESC, t.id DESC LIMIT $5",
                    $crate::meta::sql::port_select($crate::meta::sql::Places::Without)
                )))
                .bind(patch_name.as_str())
                .bind(patch_digest.to_string())
                .bind(source_base_digest.to_string())
                .bind(method_version)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map($crate::meta::sql::port_record).collect()
            }

            async fn list_ports_of(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                let mut conn = self.pool.acquire().await?;
                let Some(patch) = Self::patch_by_ref(&mut conn, patch_name, patch_version).await? else {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("patch version {patch_name}:{patch_version}"),
                    });
                };
                Self::ports_where(&mut conn, "t.patch_id = $1", patch.id, $crate::meta::sql::Places::With).await
            }

            async fn set_job_priority(
                &self,
                job_id: i64,
                priority: i64,
            ) -> Result<(), $crate::meta::StoreError> {
                let n = sqlx::query("UPDATE jobs SET priority = $1, updated_at = $2 WHERE id = $3")
                    .bind(priority)
                    .bind($crate::meta::now_millis())
                    .bind(job_id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if n == 0 {
                    return Err($crate::meta::StoreError::NotFound {
                        what: format!("job {job_id}"),
                    });
                }
                Ok(())
            }

            async fn lease_jobs(
                &self,
                worker_id: &str,
                loaded_base_digests: &[patchport_core::Digest],
                lease_duration: std::time::Duration,
                max: usize,
            ) -> Result<Vec<$crate::meta::LeasedJob>, $crate::meta::StoreError> {
                if max == 0 {
                    return Ok(Vec::new());
                }
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let affinity = if loaded_base_digests.is_empty() {
                    String::new()
                } else {
                    let n = loaded_base_digests.len();
                    let marks = |from: usize| -> String {
                        (0..n).map(|i| format!("${}", from + i)).collect::<Vec<_>>().join(", ")
                    };
                    // Both bases held first, then the target, then the source.
                    format!(
                        "CASE WHEN target_base_digest IN ({}) THEN 0 ELSE 2 END + \
                         CASE WHEN source_base_digest IN ({}) THEN 0 ELSE 1 END, ",
                        marks(2),
                        marks(2 + n)
                    )
                };
                // Priority first (requests, then catch-up, then fan-out), then the bases
                // this worker holds, then first in first out.
                let sql = format!(
                    "SELECT id FROM jobs WHERE state = 'queued' AND run_after <= $1 \
                     ORDER BY priority DESC, {affinity}id LIMIT {max}{}",
                    Self::SKIP_LOCKED
                );
                let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(now);
                for d in loaded_base_digests.iter().chain(loaded_base_digests) {
                    q = q.bind(d.to_string());
                }
                let ids = q.fetch_all(&mut *tx).await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let expires = now.saturating_add(lease_duration.as_millis() as i64);
                let mut leased = Vec::with_capacity(ids.len());
                for job_id in ids {
                    sqlx::query(
                        "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
                         attempts = attempts + 1, fencing_token = fencing_token + 1, \
                         cancel_requested = 0, updated_at = $3 WHERE id = $4",
                    )
                    .bind(worker_id)
                    .bind(expires)
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                    let starting =
                        Self::job_port_ids(&mut tx, job_id, $crate::meta::PortState::Queued).await?;
                    sqlx::query(
                        "UPDATE ports SET state = 'running', started_at = $1, error = NULL, \
                         attempts = (SELECT attempts FROM jobs WHERE id = $2) \
                         WHERE job_id = $2 AND state = 'queued'",
                    )
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                    Self::emit_ports(&mut tx, patchport_core::event::EventKind::PortStarted, Some(worker_id), &starting).await?;
                    let job = Self::must_load_job(&mut tx, job_id).await?;
                    let ports = Self::load_job_ports(&mut tx, job_id).await?;
                    leased.push($crate::meta::LeasedJob { job, ports });
                }
                tx.commit().await?;
                Ok(leased)
            }

            async fn heartbeat(
                &self,
                job_id: i64,
                fencing_token: i64,
                lease_duration: std::time::Duration,
            ) -> Result<bool, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let cancel: Option<i64> = sqlx::query_scalar(
                    "UPDATE jobs SET lease_expires_at = $1, updated_at = $2 \
                     WHERE id = $3 AND fencing_token = $4 AND state = 'running' \
                     RETURNING cancel_requested",
                )
                .bind(now.saturating_add(lease_duration.as_millis() as i64))
                .bind(now)
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(c) = cancel {
                    return Ok(c != 0);
                }
                // A job cancelled under this very lease: the worker is told to stop.
                let cancelled: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE id = $1 AND fencing_token = $2 AND state = 'cancelled'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&self.pool)
                .await?;
                match cancelled {
                    Some(_) => Ok(true),
                    None => Err($crate::meta::queue::lease_lost(job_id)),
                }
            }

            async fn complete_jobs(
                &self,
                completions: Vec<(i64, i64, $crate::meta::JobOutcome)>,
            ) -> Result<Vec<Result<$crate::meta::CompletedJob, $crate::meta::StoreError>>, $crate::meta::StoreError> {
                use $crate::meta::sql::to_json;
                use $crate::meta::JobOutcome;
                use patchport_core::event::EventKind;
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let mut results = Vec::with_capacity(completions.len());
                for (job_id, fencing_token, outcome) in completions {
                    let evaluation = match &outcome {
                        JobOutcome::Succeeded { evaluation, .. } => evaluation.clone(),
                        JobOutcome::Incompatible { .. } => None,
                    };
                    let (state, refusals, diagnostics, adapter, merged) = match &outcome {
                        JobOutcome::Succeeded { adapter_files, merged_files, diagnostics, .. } => (
                            "succeeded",
                            "[]".to_owned(),
                            Some(to_json(diagnostics)),
                            to_json(adapter_files),
                            to_json(merged_files),
                        ),
                        JobOutcome::Incompatible { refusals } => (
                            "incompatible",
                            to_json(refusals),
                            None,
                            "[]".to_owned(),
                            "[]".to_owned(),
                        ),
                    };
                    // The fence first: a stale token writes nothing of this completion. The
                    // owner read under the token is the one the update below clears (a new
                    // lease would have changed the token).
                    let owner: Option<Option<String>> = sqlx::query_scalar(
                        "SELECT lease_owner FROM jobs WHERE id = $1 AND fencing_token = $2 AND state = 'running'",
                    )
                    .bind(job_id)
                    .bind(fencing_token)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(lease_owner) = owner else {
                        results.push(Err($crate::meta::queue::lease_lost(job_id)));
                        continue;
                    };
                    let n = sqlx::query(
                        "UPDATE jobs SET state = $1, lease_owner = NULL, lease_expires_at = NULL, \
                         last_error = NULL, updated_at = $2 \
                         WHERE id = $3 AND fencing_token = $4 AND state = 'running'",
                    )
                    .bind(state)
                    .bind(now)
                    .bind(job_id)
                    .bind(fencing_token)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 0 {
                        results.push(Err($crate::meta::queue::lease_lost(job_id)));
                        continue;
                    }
                    let running =
                        Self::job_port_ids(&mut tx, job_id, $crate::meta::PortState::Running).await?;
                    let summary = evaluation.as_ref().map(|e| e.summary.clone());
                    sqlx::query(
                        "UPDATE ports SET state = $1, refusals_json = $2, diagnostics_json = $3, \
                         adapter_files_json = $4, merged_files_json = $5, error = NULL, finished_at = $6, \
                         evaluation_json = $8 \
                         WHERE job_id = $7 AND state = 'running'",
                    )
                    .bind(state)
                    .bind(refusals)
                    .bind(diagnostics)
                    .bind(adapter)
                    .bind(merged)
                    .bind(now)
                    .bind(job_id)
                    .bind(evaluation.map(|e| e.json))
                    .execute(&mut *tx)
                    .await?;
                    if let JobOutcome::Succeeded { adapter_files, merged_files, .. } = &outcome {
                        let digests = $crate::meta::sql::artifact_digests(adapter_files, merged_files);
                        Self::index_port_artifacts(&mut tx, &running, &digests).await?;
                    }
                    let completed =
                        Self::emit_ports(&mut tx, EventKind::PortCompleted, Some(state), &running).await?;
                    if let Some(summary) = &summary {
                        Self::append_port_events(&mut tx, EventKind::PortEvaluated, Some(summary), &completed)
                            .await?;
                    }
                    results.push(Ok($crate::meta::CompletedJob {
                        job: Self::must_load_job(&mut tx, job_id).await?,
                        lease_owner: lease_owner.unwrap_or_default(),
                        ports: completed,
                    }));
                }
                tx.commit().await?;
                Ok(results)
            }

            async fn fail_job(
                &self,
                job_id: i64,
                fencing_token: i64,
                error: &str,
                retryable: bool,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let row: Option<(i64, i64, i64)> = sqlx::query_as(
                    "SELECT attempts, max_attempts, cancel_requested FROM jobs \
                     WHERE id = $1 AND fencing_token = $2 AND state = 'running'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((attempts, max, cancel)) = row else {
                    return Err($crate::meta::queue::lease_lost(job_id));
                };
                let next = Self::next_state(cancel, attempts, max, retryable);
                let run_after = now + self.retry.backoff_millis(attempts as u32);
                let detail = if next == "queued" { "retry" } else { error };
                Self::end_attempt(&mut tx, job_id, fencing_token, next, run_after, Some(error), 0, detail).await?;
                let job = Self::must_load_job(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn release_job(
                &self,
                job_id: i64,
                fencing_token: i64,
            ) -> Result<$crate::meta::JobRecord, $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let cancel: Option<i64> = sqlx::query_scalar(
                    "SELECT cancel_requested FROM jobs \
                     WHERE id = $1 AND fencing_token = $2 AND state = 'running'",
                )
                .bind(job_id)
                .bind(fencing_token)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(cancel) = cancel else {
                    return Err($crate::meta::queue::lease_lost(job_id));
                };
                let next = if cancel != 0 { "cancelled" } else { "queued" };
                Self::end_attempt(&mut tx, job_id, fencing_token, next, now, None, -1, "released").await?;
                let job = Self::must_load_job(&mut tx, job_id).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn reap_expired(&self, now: i64) -> Result<usize, $crate::meta::StoreError> {
                let mut tx = self.pool.begin().await?;
                let expired: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, fencing_token, attempts, max_attempts, cancel_requested FROM jobs \
                     WHERE state = 'running' AND lease_expires_at < $1 ORDER BY id{}",
                    Self::SKIP_LOCKED
                )))
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                for &(id, token, attempts, max, cancel) in &expired {
                    let next = Self::next_state(cancel, attempts, max, true);
                    let run_after = now + self.retry.backoff_millis(attempts as u32);
                    tracing::warn!(job_id = id, attempts, next, "lease expired");
                    Self::end_attempt(&mut tx, id, token, next, run_after, Some("lease expired"), 0, "lease expired").await?;
                }
                tx.commit().await?;
                Ok(expired.len())
            }

            async fn cancel_port(
                &self,
                patch_name: &patchport_core::Name,
                patch_version: &patchport_core::VersionRef,
                base_name: &patchport_core::Name,
                base_version: &patchport_core::VersionRef,
                method_version: &str,
                audit: &$crate::meta::access::AuditRecord,
            ) -> Result<$crate::meta::PortRecord, $crate::meta::StoreError> {
                use $crate::meta::StoreError;
                let now = $crate::meta::now_millis();
                let mut tx = self.pool.begin().await?;
                let what = format!("port of {patch_name}:{patch_version} onto {base_name}:{base_version}");
                let (Some(patch), Some(base)) = (
                    Self::patch_by_ref(&mut tx, patch_name, patch_version).await?,
                    Self::base_by_ref(&mut tx, base_name, base_version).await?,
                ) else {
                    return Err(StoreError::NotFound { what });
                };
                let port: Option<(i64, String, Option<i64>)> = sqlx::query_as(
                    "SELECT id, state, job_id FROM ports \
                     WHERE patch_id = $1 AND base_id = $2 AND method_version = $3",
                )
                .bind(patch.id)
                .bind(base.id)
                .bind(method_version)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((port_id, state, job_id)) = port else {
                    return Err(StoreError::NotFound { what });
                };
                if state != "queued" && state != "running" {
                    return Err(StoreError::FailedPrecondition {
                        message: format!("{what} is {state}, only queued or running ports can be cancelled"),
                    });
                }
                sqlx::query("UPDATE ports SET state = 'cancelled', finished_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(port_id)
                    .execute(&mut *tx)
                    .await?;
                if let Some(job_id) = job_id {
                    // Once no port wants the work, the job is cancelled through its fence:
                    // a queued one is never leased, and a running one loses its lease at
                    // once (the worker hears it on its next heartbeat, and a late
                    // CompleteJob, FailJob or ReleaseJob is refused).
                    sqlx::query(
                        "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, \
                         lease_expires_at = NULL, cancel_requested = 0, updated_at = $1 \
                         WHERE id = $2 AND state IN ('queued', 'running') AND NOT EXISTS \
                         (SELECT 1 FROM ports WHERE job_id = $2 AND state IN ('queued', 'running'))",
                    )
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                }
                let rec = Self::emit_ports(
                    &mut tx,
                    patchport_core::event::EventKind::PortCancelled,
                    None,
                    &[port_id],
                )
                .await?
                .pop()
                .ok_or_else(|| StoreError::NotFound {
                    what: format!("port {port_id}"),
                })?;
                Self::write_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(rec)
            }

            async fn count_jobs_by_state(
                &self,
            ) -> Result<Vec<($crate::meta::PortState, u64)>, $crate::meta::StoreError> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                        .fetch_all(&self.pool)
                        .await?;
                let mut out: Vec<($crate::meta::PortState, u64)> =
                    $crate::meta::PortState::ALL.iter().map(|s| (*s, 0)).collect();
                for (state, n) in rows {
                    let state = $crate::meta::PortState::parse(&state)?;
                    if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
                        slot.1 = u64::try_from(n).unwrap_or(0);
                    }
                }
                Ok(out)
            }
        }
    };
}

pub(crate) use impl_queue;
