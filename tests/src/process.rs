//! The one harness for tests of the real `patchport` binary: registry and worker
//! processes, client commands, and the database a test runs on.
//!
//! Cargo tells only the package that owns a binary where it is
//! (`env!("CARGO_BIN_EXE_patchport")`), so every entry point takes its path.
//!
//! ```no_run
//! use patchport_tests::process::{Database, Serve, Worker, cli};
//! # const BIN: &str = "patchport";
//! let db = Database::fresh(); // Postgres when PATCHPORT_TEST_DATABASE_URL is set
//! let server = Serve::builder(BIN).workers(0).database(db.url()).start();
//! let _worker = Worker::builder(BIN, server.url()).id("w0").start();
//! let bases = cli(BIN, server.url()).args(["list", "bases", "--json"]).json();
//! # let _ = bases;
//! ```
//!
//! Every process is SIGKILLed and reaped when its handle is dropped.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The variable naming a Postgres server tests may create databases on.
pub const DATABASE_VAR: &str = "PATCHPORT_TEST_DATABASE_URL";

/// The line `patchport serve` prints first, before its address.
const LISTENING: &str = "patchport registry listening on ";
/// The line it prints next when a metrics endpoint is configured.
const METRICS_LISTENING: &str = "patchport metrics listening on ";

/// Runs `f` to completion on a runtime of its own, on a thread of its own: callable from
/// plain tests and from inside a tokio runtime alike.
pub fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(f)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `file://<dir>`: a blob store in a directory.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// A path as a command-line argument.
pub fn path_arg(path: impl AsRef<Path>) -> String {
    path.as_ref().to_str().expect("utf-8 path").to_owned()
}

// ---------------------------------------------------------------------------------------
// Databases

/// Which database server a test ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// A SQLite file.
    Sqlite,
    /// A fresh database on the server `PATCHPORT_TEST_DATABASE_URL` names.
    Postgres,
}

impl fmt::Display for DatabaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        })
    }
}

/// The database of one test: a fresh Postgres database or a SQLite file in a temporary
/// directory (removed with it).
#[derive(Debug)]
pub struct Database {
    url: String,
    kind: DatabaseKind,
    _dir: Option<tempfile::TempDir>,
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// The Postgres server URL from `PATCHPORT_TEST_DATABASE_URL`; when it is not set, says
/// on stderr that `what` of the running test is skipped and why.
pub fn postgres_server(what: &str) -> Option<String> {
    match std::env::var(DATABASE_VAR) {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("{}: {what} skipped: {DATABASE_VAR} not set", test_name());
            None
        }
    }
}

impl Database {
    /// A fresh Postgres database when `PATCHPORT_TEST_DATABASE_URL` is set, else a SQLite
    /// file in a temporary directory. Says on stderr which one the running test got.
    pub fn fresh() -> Self {
        let db = match postgres_server("postgres variant") {
            Some(server) => block_on(Self::postgres_on(&server)),
            None => Self::sqlite(),
        };
        db.announce();
        db
    }

    /// [`fresh`](Self::fresh), for async code.
    pub async fn fresh_async() -> Self {
        let db = match postgres_server("postgres variant") {
            Some(server) => Self::postgres_on(&server).await,
            None => Self::sqlite(),
        };
        db.announce();
        db
    }

    fn announce(&self) {
        eprintln!("{}: runs on {}", test_name(), self.kind);
    }

    /// A fresh Postgres database, or `None` (saying on stderr that `what` is skipped,
    /// naming the variable) when `PATCHPORT_TEST_DATABASE_URL` is not set.
    pub fn postgres(what: &str) -> Option<Self> {
        let server = postgres_server(what)?;
        Some(block_on(Self::postgres_on(&server)))
    }

    /// A fresh database on the Postgres server at `server_url`.
    pub async fn postgres_on(server_url: &str) -> Self {
        let url = crate::fresh_postgres_db(server_url)
            .await
            .unwrap_or_else(|e| panic!("a fresh postgres database on {server_url}: {e:#}"));
        Self {
            url,
            kind: DatabaseKind::Postgres,
            _dir: None,
        }
    }

    /// A SQLite file in a temporary directory of its own.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            url: sqlite_url(dir.path()),
            kind: DatabaseKind::Sqlite,
            _dir: Some(dir),
        }
    }

    /// `postgres://…` or `sqlite://…`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What it runs on.
    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    /// Runs `sql` (one `BIGINT` column) and returns the column.
    pub fn query_i64s(&self, sql: &str) -> Vec<i64> {
        block_on(crate::query_i64s(&self.url, sql))
            .unwrap_or_else(|e| panic!("{sql} on {}: {e:#}", self.kind))
    }

    /// The first value of [`query_i64s`](Self::query_i64s) (a `COUNT(*)`).
    pub fn count(&self, sql: &str) -> i64 {
        self.query_i64s(sql)[0]
    }
}

/// `sqlite://<dir>/registry.db`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}/registry.db", dir.display())
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process; SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, what: impl Into<String>) -> Self {
        let what = what.into();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Self { child, what }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no shutdown path runs), then reaps it. Nothing happens to a process that
    /// has exited already.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (the graceful shutdown); [`wait_exit`](Self::wait_exit) for the exit.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM {} failed", self.what);
    }

    /// Waits for the exit, however long it takes.
    pub fn wait(&mut self) -> ExitStatus {
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
    }

    /// Waits for the exit, failing the test (the process is killed on drop) after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("poll {}: {e}", self.what))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines on a thread, so a chatty child never blocks on a full pipe; the channel
/// closes at end of file.
pub fn lines(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Environment changes for a child: set, or removed (`None`), in order.
#[derive(Debug, Clone, Default)]
struct Env(Vec<(OsString, Option<OsString>)>);

impl Env {
    fn set(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
        self.0
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
    }

    fn remove(&mut self, key: impl AsRef<OsStr>) {
        self.0.push((key.as_ref().to_owned(), None));
    }

    /// The value it gives `key`, if it sets it.
    fn get(&self, key: &str) -> Option<&OsStr> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    fn apply(&self, cmd: &mut Command) {
        for (k, v) in &self.0 {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }
}

/// A `patchport` command line being built: the binary, arguments after the subcommand's
/// own, and environment changes.
#[derive(Debug, Clone)]
struct Invocation {
    bin: PathBuf,
    args: Vec<OsString>,
    env: Env,
}

impl Invocation {
    fn new(bin: impl AsRef<Path>) -> Self {
        Self {
            bin: bin.as_ref().to_owned(),
            args: Vec::new(),
            env: Env::default(),
        }
    }

    /// `bin <leading...> <args...>` with the environment changes.
    fn command<S: AsRef<OsStr>>(&self, leading: &[S]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(leading).args(&self.args);
        self.env.apply(&mut cmd);
        cmd
    }
}

/// The argument and environment setters of every builder here (each holds an
/// [`Invocation`] in `cmd`).
macro_rules! setters {
    () => {
        /// One more argument, after the others.
        pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
            self.cmd.args.push(arg.as_ref().to_owned());
            self
        }

        /// More arguments.
        pub fn args<I, S>(mut self, args: I) -> Self
        where
            I: IntoIterator<Item = S>,
            S: AsRef<OsStr>,
        {
            self.cmd
                .args
                .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
            self
        }

        /// Sets a variable in its environment.
        pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
            self.cmd.env.set(key, value);
            self
        }

        /// Removes a variable from its environment.
        pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
            self.cmd.env.remove(key);
            self
        }
    };
}

// ---------------------------------------------------------------------------------------
// Metrics

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// The sum of a metric's samples (every label set) in a Prometheus text `body`; 0 when
/// it has none.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// patchport serve

/// Builds a `patchport serve` process: `Serve::builder(bin)…start()`.
#[derive(Debug)]
pub struct Serve;

impl Serve {
    /// `patchport serve --listen 127.0.0.1:0`; by default its database and blobs are a
    /// SQLite file and a `file://` directory in a temporary directory of its own, and
    /// its in-process worker count is the binary's default.
    pub fn builder(bin: impl AsRef<Path>) -> ServeBuilder {
        ServeBuilder {
            cmd: Invocation::new(bin),
            listen: "127.0.0.1:0".to_owned(),
            workers: None,
            lease_seconds: None,
            database: None,
            blobs: None,
            log: None,
        }
    }
}

/// What `patchport serve` is started with; kept by the [`Server`] to restart it.
#[derive(Debug, Clone)]
pub struct ServeBuilder {
    cmd: Invocation,
    listen: String,
    workers: Option<usize>,
    lease_seconds: Option<u64>,
    database: Option<String>,
    blobs: Option<String>,
    log: Option<PathBuf>,
}

impl ServeBuilder {
    /// `--listen` (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// `--workers N`: in-process workers.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// `--lease-seconds S`.
    pub fn lease_seconds(mut self, s: u64) -> Self {
        self.lease_seconds = Some(s);
        self
    }

    /// `--database URL`.
    pub fn database(mut self, url: impl Into<String>) -> Self {
        self.database = Some(url.into());
        self
    }

    /// `--blobs URL` ([`file_url`] for a directory).
    pub fn blobs(mut self, url: impl Into<String>) -> Self {
        self.blobs = Some(url.into());
        self
    }

    // `arg`/`args` (`--metrics-listen`, `--tls-cert`, ...), `env`/`env_remove`
    // (`PATCHPORT_ADMIN_TOKEN`, `PATCHPORT_LOG`, failpoints such as
    // `PATCHPORT_TEST_STALL_MS`).
    setters!();

    /// Its stderr (the log) goes to `path`, appended across restarts; by default to a file
    /// in a temporary directory. Either way [`Server::log`] reads it.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    fn command(&self, home: &Path) -> Command {
        let mut leading = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            self.listen.clone(),
        ];
        if let Some(n) = self.workers {
            leading.extend(["--workers".to_owned(), n.to_string()]);
        }
        if let Some(s) = self.lease_seconds {
            leading.extend(["--lease-seconds".to_owned(), s.to_string()]);
        }
        let database = self.database.clone().unwrap_or_else(|| sqlite_url(home));
        let blobs = self
            .blobs
            .clone()
            .unwrap_or_else(|| file_url(&home.join("blobs")));
        leading.extend([
            "--database".to_owned(),
            database,
            "--blobs".to_owned(),
            blobs,
        ]);
        self.cmd.command(&leading)
    }

    fn has_metrics(&self) -> bool {
        self.cmd.args.iter().any(|a| a == "--metrics-listen")
            || self.cmd.env.get("PATCHPORT_METRICS_LISTEN").is_some()
    }

    /// Runs it to its exit without waiting for a listening line: for a start that must
    /// fail. Its stdout and stderr come back.
    pub fn output(self) -> Output {
        let home = tempfile::tempdir().expect("tempdir");
        self.command(home.path())
            .output()
            .expect("run patchport serve")
    }

    /// Starts it and waits for its listening line (and the metrics line when a metrics
    /// endpoint is configured).
    pub fn start(self) -> Server {
        let home = tempfile::tempdir().expect("tempdir");
        Server::spawn(self, home)
    }
}

/// A running `patchport serve`; SIGKILLed when dropped.
#[derive(Debug)]
pub struct Server {
    proc: Proc,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    log: PathBuf,
    log_start: u64,
    spec: ServeBuilder,
    /// Default database, blobs and log; kept across restarts.
    home: tempfile::TempDir,
}

impl Server {
    fn spawn(spec: ServeBuilder, home: tempfile::TempDir) -> Self {
        let log = spec
            .log
            .clone()
            .unwrap_or_else(|| home.path().join("serve.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open the log {}: {e}", log.display()));
        let log_start = file.metadata().expect("log metadata").len();
        let mut cmd = spec.command(home.path());
        cmd.stdout(Stdio::piped()).stderr(file);
        let mut proc = Proc::spawn(cmd, "patchport serve");
        let stdout = lines(proc.child.stdout.take().expect("stdout"));
        let mut server = Self {
            proc,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics: None,
            log,
            log_start,
            spec,
            home,
        };
        server.addr = server.address_line(&stdout, LISTENING);
        if server.spec.has_metrics() {
            server.metrics = Some(server.address_line(&stdout, METRICS_LISTENING));
        }
        // Whatever else it prints is read and dropped, so its stdout never breaks.
        std::thread::spawn(move || stdout.into_iter().for_each(drop));
        server
    }

    /// Waits (up to two minutes) for the line `prefix ADDR` on stdout.
    fn address_line(&self, stdout: &mpsc::Receiver<String>, prefix: &str) -> SocketAddr {
        let line = stdout.recv_timeout(Duration::from_secs(120)).ok();
        line.as_deref()
            .and_then(|l| l.trim().strip_prefix(prefix))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "patchport serve did not start: expected {prefix:?}, got {line:?}; log:\n{}",
                    self.log()
                )
            })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics endpoint's address, when one was configured (`--metrics-listen`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The `--database` it runs on.
    pub fn database_url(&self) -> String {
        self.spec
            .database
            .clone()
            .unwrap_or_else(|| sqlite_url(self.home.path()))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.proc.id()
    }

    /// SIGKILL: no shutdown path runs. The handle stays, to [`restart`](Self::restart).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM: the graceful shutdown.
    pub fn terminate(&self) {
        self.proc.terminate();
    }

    /// Waits for the exit, however long it takes.
    pub fn wait(&mut self) -> ExitStatus {
        self.proc.wait()
    }

    /// Waits for the exit, failing the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.proc.wait_exit(limit)
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait()
    }

    /// Kills it if it still runs and starts it again with the same command on the same
    /// address, database and blobs (a registry restart).
    pub fn restart(self) -> Self {
        self.restart_with(|spec| spec)
    }

    /// [`restart`](Self::restart) with `change` applied to what it is started with
    /// (another worker count, a failpoint removed).
    pub fn restart_with(self, change: impl FnOnce(ServeBuilder) -> ServeBuilder) -> Self {
        let Self {
            mut proc,
            addr,
            log,
            mut spec,
            home,
            ..
        } = self;
        proc.kill();
        spec.listen = addr.to_string();
        spec.log = Some(log);
        Self::spawn(change(spec), home)
    }

    /// What it has logged since this start (its stderr).
    pub fn log(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(self.log_start)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Waits for a log line containing `needle`, failing the test after `within`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().lines().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------------------
// patchport worker

/// Builds a `patchport worker` process: `Worker::builder(bin, url)…start()`.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// `patchport worker` against the registry at `url`; stdout and stderr discarded.
    pub fn builder(bin: impl AsRef<Path>, url: impl AsRef<OsStr>) -> WorkerBuilder {
        WorkerBuilder {
            cmd: Invocation::new(bin),
            id: None,
            log: None,
        }
        .env("PATCHPORT_REGISTRY", url)
    }
}

/// What `patchport worker` is started with.
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    cmd: Invocation,
    id: Option<String>,
    log: Option<PathBuf>,
}

impl WorkerBuilder {
    setters!();

    /// `--id ID`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// `PATCHPORT_TEST_STALL_MS`: after leasing a job it stalls this long, without
    /// heartbeats, before porting.
    pub fn stall_ms(self, ms: u64) -> Self {
        self.env("PATCHPORT_TEST_STALL_MS", ms.to_string())
    }

    /// `PATCHPORT_TEST_STALL_UNTIL`: after leasing a job it stalls, without heartbeats,
    /// until `path` exists (the test creates it when the worker should go on).
    pub fn stall_until(self, path: &Path) -> Self {
        self.env("PATCHPORT_TEST_STALL_UNTIL", path.as_os_str())
    }

    /// `PATCHPORT_TEST_STALL_AFTER`: the stall of [`stall_ms`](Self::stall_ms) or
    /// [`stall_until`](Self::stall_until) starts with the job after the first `n` this
    /// process ports (those run at full speed, giving the worker a quick pace).
    pub fn stall_after(self, n: u64) -> Self {
        self.env("PATCHPORT_TEST_STALL_AFTER", n.to_string())
    }

    /// `PATCHPORT_TOKEN`.
    pub fn token(self, token: &str) -> Self {
        self.env("PATCHPORT_TOKEN", token)
    }

    /// Its stderr (the log) goes to `path` instead of nowhere.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Starts it.
    pub fn start(self) -> Proc {
        let mut leading = vec!["worker"];
        if let Some(id) = &self.id {
            leading.extend(["--id", id]);
        }
        let mut cmd = self.cmd.command(&leading);
        cmd.stdout(Stdio::null());
        match &self.log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                cmd.stderr(file)
            }
            None => cmd.stderr(Stdio::null()),
        };
        Proc::spawn(cmd, format!("patchport worker {:?}", self.id))
    }
}

// ---------------------------------------------------------------------------------------
// Client commands

/// A `patchport` command; reusable (`Clone`, and every runner takes `&self`).
#[derive(Debug, Clone)]
pub struct Cli {
    cmd: Invocation,
}

/// `patchport …` against the registry at `url` (`PATCHPORT_REGISTRY`).
pub fn cli(bin: impl AsRef<Path>, url: impl AsRef<OsStr>) -> Cli {
    Cli::new(bin).env("PATCHPORT_REGISTRY", url)
}

/// The merged model of `port_ref` (`patch@base`) as `patchport pull --merged` writes it
/// under `dir/pulled`, equal to the offline `patchport port --merged` of the same files
/// (`old`, `new`, `patch`, written under `dir/offline`) byte for byte in each of
/// `names`; returns the offline port's report (`--json`).
pub fn assert_pulled_merged_is_offline(
    bin: impl AsRef<Path>,
    url: &str,
    port_ref: &str,
    (old, new, patch): (&Path, &Path, &Path),
    dir: &Path,
    names: &[&str],
) -> serde_json::Value {
    let bin = bin.as_ref();
    let (offline, pulled) = (dir.join("offline"), dir.join("pulled"));
    let report = cli(bin, url)
        .args([
            "port",
            "--old-base",
            &path_arg(old),
            "--new-base",
            &path_arg(new),
            "--patch",
            &path_arg(patch),
            "--out",
            &path_arg(&offline),
            "--merged",
            "--json",
        ])
        .ok();
    cli(bin, url)
        .args(["pull", port_ref, "--out", &path_arg(&pulled), "--merged"])
        .ok();
    crate::assert_same_files(&pulled, &offline.join("merged"), names);
    serde_json::from_str(&report).expect("the offline port's report (--json)")
}

/// Waits for the `n`-th `port.completed` event of a `patchport watch --json` stream
/// (`seen` counts them from the stream's start, across calls); each port must have
/// succeeded. Panics after 120 s.
pub fn wait_port_completed(rx: &mpsc::Receiver<serde_json::Value>, seen: &mut usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while *seen < n {
        let e = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no port.completed #{n} in time"));
        if e["type"] == "port.completed" {
            assert_eq!(e["payload"]["state"], "succeeded", "{e}");
            *seen += 1;
        }
    }
}

/// The lineage most process tests start from, pushed with `patchport` at `url`:
/// `acme/llama` v1 (llama-micro), the lora-qv patch on it as `acme/qv:1`, then v2 with
/// `--parent v1`, which queues the port of the patch onto v2.
pub fn publish_lineage(bin: impl AsRef<Path>, url: &str) {
    let f = crate::fixtures().join("llama-micro");
    let (v1, qv, v2) = (
        path_arg(f.join("v1")),
        path_arg(f.join("patches/lora-qv")),
        path_arg(f.join("v2")),
    );
    for args in [
        &[
            "base",
            "push",
            &v1,
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ][..],
        &[
            "patch",
            "push",
            &qv,
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ][..],
        &[
            "base",
            "push",
            &v2,
            "--name",
            "acme/llama",
            "--version",
            "v2",
            "--parent",
            "v1",
        ][..],
    ] {
        cli(bin.as_ref(), url).args(args).ok();
    }
}

/// `patchport watch --json --from CURSOR` against `url`: its events as they come, on a
/// channel that closes when it exits.
pub fn watch(
    bin: impl AsRef<Path>,
    url: impl AsRef<OsStr>,
    from: &str,
) -> (Proc, mpsc::Receiver<serde_json::Value>) {
    cli(bin, url)
        .args(["watch", "--json", "--from", from])
        .spawn_json_lines()
}

impl Cli {
    /// `patchport …` with the environment as it is (offline commands, `--registry`).
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Self {
            cmd: Invocation::new(bin),
        }
    }

    setters!();

    /// `PATCHPORT_TOKEN`: set to `Some`, removed for `None` (anonymous).
    pub fn token(self, token: Option<&str>) -> Self {
        match token {
            Some(t) => self.env("PATCHPORT_TOKEN", t),
            None => self.env_remove("PATCHPORT_TOKEN"),
        }
    }

    fn command(&self) -> Command {
        self.cmd.command::<&str>(&[])
    }

    fn describe(&self) -> String {
        format!("patchport {:?}", self.cmd.args)
    }

    /// Runs it to its exit.
    pub fn output(&self) -> Output {
        self.command()
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.describe()))
    }

    /// Runs it; it must succeed. Its stdout.
    pub fn ok(&self) -> String {
        let out = self.output();
        assert!(
            out.status.success(),
            "{} failed: {}",
            self.describe(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs it; it must succeed and print JSON.
    pub fn json(&self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {out}", self.describe()))
    }

    /// Runs it; it must fail. Its stderr.
    pub fn fails(&self) -> String {
        let out = self.output();
        assert!(!out.status.success(), "{} succeeded", self.describe());
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts it in the background, its output discarded.
    pub fn spawn(&self) -> Proc {
        let mut cmd = self.command();
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        Proc::spawn(cmd, self.describe())
    }

    /// Starts it in the background; the JSON lines it prints come on the channel (other
    /// lines are skipped), which closes when it exits.
    pub fn spawn_json_lines(&self) -> (Proc, mpsc::Receiver<serde_json::Value>) {
        let mut cmd = self.command();
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut proc = Proc::spawn(cmd, self.describe());
        let raw = lines(proc.child.stdout.take().expect("stdout"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in raw {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        (proc, rx)
    }
}
