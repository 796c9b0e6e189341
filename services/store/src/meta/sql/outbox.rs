//! The outbox in SQL: appending events (with their payloads, in the writer's
//! transaction, waking subscribers at commit) and reading them by cursor.

/// Implements `Outbox` for a store with a `pool: sqlx::Pool<$db>` field.
macro_rules! impl_outbox {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Appends one event about a version (and wakes subscribers at commit).
            async fn emit(
                conn: &mut <$db as sqlx::Database>::Connection,
                kind: patchport_core::event::EventKind,
                subject: &str,
                payload: &serde_json::Value,
            ) -> Result<(), $crate::meta::StoreError> {
                sqlx::query(
                    "INSERT INTO events (kind, subject, job_id, port_id, detail, payload_json, created_at) \
                     VALUES ($1, $2, NULL, NULL, NULL, $3, $4)",
                )
                .bind(kind.as_str())
                .bind(subject)
                .bind(payload.to_string())
                .bind($crate::meta::now_millis())
                .execute(&mut *conn)
                .await?;
                Self::notify_events(conn).await
            }

            /// Appends one event per port, in port order, each carrying the port as it
            /// stands now (call it after the change it announces); returns the ports as
            /// announced.
            async fn emit_ports(
                conn: &mut <$db as sqlx::Database>::Connection,
                kind: patchport_core::event::EventKind,
                detail: Option<&str>,
                ports: &[i64],
            ) -> Result<Vec<$crate::meta::PortRecord>, $crate::meta::StoreError> {
                if ports.is_empty() {
                    return Ok(Vec::new());
                }
                let records =
                    Self::ports_by_id(conn, ports, $crate::meta::sql::Places::Without).await?;
                Self::append_port_events(conn, kind, detail, &records).await?;
                Ok(records)
            }

            /// Appends one event per port already loaded (see `emit_ports`).
            async fn append_port_events(
                conn: &mut <$db as sqlx::Database>::Connection,
                kind: patchport_core::event::EventKind,
                detail: Option<&str>,
                ports: &[$crate::meta::PortRecord],
            ) -> Result<(), $crate::meta::StoreError> {
                let now = $crate::meta::now_millis();
                for port in ports {
                    let subject = format!(
                        "{}:{}@{}:{}",
                        port.patch_name, port.patch_version, port.base_name, port.base_version
                    );
                    let payload = $crate::meta::sql::port_event_payload(kind, port, detail);
                    sqlx::query(
                        "INSERT INTO events (kind, subject, job_id, port_id, detail, payload_json, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(kind.as_str())
                    .bind(subject)
                    .bind(port.job_id)
                    .bind(port.id)
                    .bind(detail)
                    .bind(payload)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                }
                Self::notify_events(conn).await
            }
        }

        #[async_trait::async_trait]
        impl $crate::meta::Outbox for $store {
            async fn read_events(
                &self,
                after: Option<&$crate::meta::EventCursor>,
                limit: u32,
            ) -> Result<(Vec<$crate::meta::EventRecord>, $crate::meta::EventCursor), $crate::meta::StoreError> {
                self.read_events_after(after, limit).await
            }

            async fn head_cursor(&self) -> Result<$crate::meta::EventCursor, $crate::meta::StoreError> {
                self.head_event_cursor().await
            }

            fn event_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
                self.wakeup_receiver()
            }
        }
    };
}

pub(crate) use impl_outbox;
