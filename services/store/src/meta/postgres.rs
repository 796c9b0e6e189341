//! The Postgres metadata store (production).

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::StoreError;

/// Metadata in Postgres.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects and runs the embedded migrations (under Postgres' migration lock, so
    /// several registry replicas can start together).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        sqlx::migrate!("../../migrations/postgres")
            .run(&pool)
            .await?;
        Ok(Self { pool })
    }

    /// The pool (for tests and future stores sharing the connection).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

super::sql::impl_sql_store!(PgStore, sqlx::Postgres);
