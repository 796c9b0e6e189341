//! Test harness: starts the real registry in-process on `127.0.0.1:0` with its own
//! database and blob store, for every backend this machine offers.
//!
//! Backends: SQLite + `file://` always; Postgres when `PATCHPORT_TEST_DATABASE_URL` is set
//! (a fresh database per test); an S3-compatible server when `PATCHPORT_TEST_S3_ENDPOINT`
//! is set (a fresh prefix per test in `PATCHPORT_TEST_S3_BUCKET`). A visible line says
//! which were skipped.

pub mod faults;
pub mod ports;
pub mod postgres;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::Once;

use patchport_client::Client;
use patchport_registry::{Application, Config};
use patchport_store::blobs::BlobStore;

/// Where the fixtures live (`tests/fixtures`), for every test in the workspace.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Asserts that each of `names` holds the same bytes under `left` and under `right` (a
/// pulled merged model and the offline `port --merged` of the same pair, say).
pub fn assert_same_files(left: &Path, right: &Path, names: &[&str]) {
    for name in names {
        let read = |dir: &Path| {
            std::fs::read(dir.join(name))
                .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join(name).display()))
        };
        assert!(read(left) == read(right), "{name} differs");
    }
}

/// Copies every file of the directory `src` (a fixture, say) into `dst`, created if
/// missing, to change a copy in a temporary directory.
pub fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), to)?;
        }
    }
    Ok(())
}

/// One storage configuration a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file + `file://` blobs (the embedded default).
    Embedded,
    /// Postgres (or SQLite when no Postgres is configured) + S3 (or `memory://` when no
    /// S3 is configured). Only listed when at least one of the two is configured.
    Production,
}

static SKIP_NOTE: Once = Once::new();

/// The backends to run against on this machine.
pub fn backends() -> Vec<Backend> {
    let pg = std::env::var(process::DATABASE_VAR).is_ok();
    let s3 = std::env::var("PATCHPORT_TEST_S3_ENDPOINT").is_ok();
    SKIP_NOTE.call_once(|| {
        if !pg {
            eprintln!("postgres tests skipped: {} not set", process::DATABASE_VAR);
        }
        if !s3 {
            eprintln!("S3 tests skipped: PATCHPORT_TEST_S3_ENDPOINT not set");
        }
    });
    if pg || s3 {
        vec![Backend::Embedded, Backend::Production]
    } else {
        vec![Backend::Embedded]
    }
}

/// A fresh Postgres database on the configured server; returns its URL.
pub async fn fresh_postgres_db(base_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let name = format!("pp_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let mut url = url_without_db(base_url);
    url.push('/');
    url.push_str(&name);
    Ok(url)
}

/// Runs `sql` (one `BIGINT` column) on a `postgres://` or `sqlite://` database and
/// returns the column: tests look at what a registry stored, beside its API.
pub async fn query_i64s(database_url: &str, sql: &str) -> anyhow::Result<Vec<i64>> {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if database_url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(database_url).await?;
        Ok(sqlx::query_scalar(sql).fetch_all(&mut conn).await?)
    } else {
        let mut conn = sqlx::PgConnection::connect(database_url).await?;
        Ok(sqlx::query_scalar(sql).fetch_all(&mut conn).await?)
    }
}

fn url_without_db(url: &str) -> String {
    // postgres://user@host:port/db?params -> postgres://user@host:port
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}")
}

/// A running registry and what it stores into.
#[derive(Debug)]
pub struct TestRegistry {
    /// The backend.
    pub backend: Backend,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The configuration it was started with (to restart it on the same stores).
    pub config: Config,
    /// Holds the SQLite file and blob directory.
    pub dir: tempfile::TempDir,
    /// A blob store given by the test instead of `config.blobs`.
    blobs: Option<BlobStore>,
    /// The fresh database of a `Production` backend (`config.database`).
    database: Option<process::Database>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestRegistry {
    /// Starts a registry on fresh stores of `backend`.
    pub async fn start(backend: Backend) -> anyhow::Result<Self> {
        Self::start_configured(backend, |_| {}).await
    }

    /// Starts a registry on `backend` with `configure` applied to its config (auth,
    /// limits, TLS).
    pub async fn start_configured(
        backend: Backend,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let (mut config, dir, database) = Self::fresh_config(backend).await?;
        configure(&mut config);
        Self::start_with(backend, config, dir, database, None).await
    }

    /// The configuration of a registry on fresh stores of `backend`, the directory that
    /// holds its files, and the fresh database of a `Production` backend.
    async fn fresh_config(
        backend: Backend,
    ) -> anyhow::Result<(Config, tempfile::TempDir, Option<process::Database>)> {
        let dir = tempfile::tempdir()?;
        let files = process::file_url(&dir.path().join("blobs"));
        std::fs::create_dir_all(dir.path().join("blobs"))?;
        let (database, blobs) = match backend {
            Backend::Embedded => (None, files),
            Backend::Production => {
                let database = process::Database::fresh_async().await;
                let blobs = match std::env::var("PATCHPORT_TEST_S3_ENDPOINT") {
                    Ok(_) => {
                        let bucket = std::env::var("PATCHPORT_TEST_S3_BUCKET")
                            .unwrap_or_else(|_| "patchport-test".to_owned());
                        format!("s3://{bucket}/t-{}", uuid::Uuid::new_v4().simple())
                    }
                    Err(_) => "memory://".to_owned(),
                };
                (Some(database), blobs)
            }
        };
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            database: database
                .as_ref()
                .map_or_else(|| process::sqlite_url(dir.path()), |d| d.url().to_owned()),
            blobs,
            lease: std::time::Duration::from_secs(30),
            metrics_listen: None,
            shutdown_grace: std::time::Duration::from_secs(30),
            ..Config::default()
        };
        Ok((config, dir, database))
    }

    /// Starts a registry on fresh stores of `backend`, but over `blobs` (a wrapped or
    /// fault-injecting store) instead of the backend's blob store.
    pub async fn start_with_blobs(backend: Backend, blobs: BlobStore) -> anyhow::Result<Self> {
        let (config, dir, database) = Self::fresh_config(backend).await?;
        Self::start_with(backend, config, dir, database, Some(blobs)).await
    }

    /// Starts a registry with this configuration (its database, say a private Postgres
    /// cluster, and its blob url); `dir` is kept with it.
    pub async fn start_config(config: Config, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        Self::start_with(Backend::Production, config, dir, None, None).await
    }

    async fn start_with(
        backend: Backend,
        config: Config,
        dir: tempfile::TempDir,
        database: Option<process::Database>,
        blobs: Option<BlobStore>,
    ) -> anyhow::Result<Self> {
        let app = match &blobs {
            Some(b) => Application::build_with_blobs(config.clone(), b.clone()).await?,
            None => Application::build(config.clone()).await?,
        };
        let url = format!("http://{}", app.local_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = app
                .run_until(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            backend,
            url,
            config,
            dir,
            blobs,
            database,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Stops the server and starts a new one on the same stores (a registry restart).
    /// `memory://` blobs do not survive a restart, so such registries keep the
    /// in-memory store only within one process start.
    pub async fn restart(mut self) -> anyhow::Result<Self> {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse()?;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        let database = self.database.take();
        Self::start_with(self.backend, config, dir, database, self.blobs.take()).await
    }

    /// Stops the server.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// A client connected to it.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.url).await?)
    }

    /// A client sending `token` (none: anonymous).
    pub async fn client_as(&self, token: Option<&str>) -> anyhow::Result<Client> {
        let options = patchport_client::ClientOptions {
            token: token.map(str::to_owned),
            ..Default::default()
        };
        Ok(Client::connect_with(&self.url, options).await?)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The worker loop `patchport worker` and `serve --workers` run, in this process on
/// `client`; stopped (the loop told to end) when dropped.
#[derive(Debug)]
pub struct LocalWorker {
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), patchport_worker::WorkerError>>>,
}

impl LocalWorker {
    /// Starts the loop on the CPU with the default configuration.
    pub fn cpu(client: Client) -> Self {
        Self::start(
            client,
            patchport_worker::WorkerConfig::new(
                "test-worker".into(),
                patchport_engine::Device::Cpu,
            ),
        )
    }

    /// Starts the loop on a task of the current runtime.
    pub fn start(client: Client, config: patchport_worker::WorkerConfig) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(patchport_worker::run(client, config, stop.clone()));
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Tells the loop to end and waits for it; it must end without an error.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("the worker task")
                .expect("the worker loop ends cleanly");
        }
    }
}

impl Drop for LocalWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The weights of a distinct adapter made from `weights` (a safetensors file whose last
/// tensor is f32): its last element set to `(key + 1) · 1e-3`, so every key is another
/// patch of the same shape.
pub fn distinct_adapter(weights: &[u8], key: u64) -> Vec<u8> {
    let mut bytes = weights.to_vec();
    let len = bytes.len();
    let value = (key as f32 + 1.0) * 1e-3;
    bytes[len - 4..].copy_from_slice(&value.to_le_bytes());
    bytes
}

/// Pushes `n` distinct patches (the llama-micro `lora-qv` fixture, made distinct by
/// [`distinct_adapter`]) as `{namespace}/p{i}:1` trained on `{namespace}/llama:v1`, their
/// files written under `dir`: the setup of a fan-out of `n` ports once `v2` is published.
pub async fn push_distinct_patches(
    client: &Client,
    namespace: &str,
    n: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    let src = read_tree(&fixtures().join("llama-micro/patches/lora-qv"));
    let weights = &src["adapter_model.safetensors"];
    for i in 0..n {
        let d = dir.join(format!("p{i}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("adapter_model.safetensors"),
            distinct_adapter(weights, i),
        )?;
        std::fs::write(d.join("adapter_config.json"), &src["adapter_config.json"])?;
        client
            .push_dir(
                &d,
                &patch(
                    &format!("{namespace}/p{i}"),
                    "1",
                    &format!("{namespace}/llama:v1"),
                ),
                &patchport_client::NoProgress,
            )
            .await?;
    }
    Ok(())
}

/// Every file under `dir`, relative path to bytes.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    patchport_client::scan_dir(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f.local).unwrap_or_default();
            (f.path, bytes)
        })
        .collect()
}

/// A base push: `name`, `version`, optional parent version.
pub fn base(name: &str, version: &str, parent: Option<&str>) -> patchport_client::PushKind {
    patchport_client::PushKind::Base {
        name: name.to_owned(),
        version: version.to_owned(),
        parent: parent.map(str::to_owned),
    }
}

/// Pushes the fixture directory `dir` (relative to [`fixtures`], e.g. `llama-micro/v1`)
/// as `kind`; panics with both named when the push fails.
pub async fn push_fixture(
    client: &Client,
    dir: &str,
    kind: &patchport_client::PushKind,
) -> patchport_client::PushOutcome {
    client
        .push_dir(&fixtures().join(dir), kind, &patchport_client::NoProgress)
        .await
        .unwrap_or_else(|e| panic!("pushing fixture {dir} as {kind:?}: {e}"))
}

/// A patch push: `name`, `version`, the base reference it was trained on.
pub fn patch(name: &str, version: &str, base: &str) -> patchport_client::PushKind {
    patchport_client::PushKind::Patch {
        name: name.to_owned(),
        version: version.to_owned(),
        base: base.to_owned(),
        eval: None,
        allow_architecture_mismatch: false,
    }
}
