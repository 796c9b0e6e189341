//! Fault tests with real processes: `patchport serve` killed with SIGKILL in the middle
//! of an upload, of a publish transaction and of an event stream, then started again on
//! the same port and stores. Nothing half-done may be visible afterwards, and every
//! client picks up where it was.
//!
//! The registry runs on SQLite, or on a fresh Postgres database when
//! `PATCHPORT_TEST_DATABASE_URL` is set (the publish test runs on both then).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchport_tests::postgres::free_port;
use patchport_tests::query_i64s;

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

/// The failpoint line `PATCHPORT_TEST_FANOUT_PAUSE_MS` logs inside the transaction.
const FANOUT_PAUSED: &str = "test failpoint: publish paused mid fan-out";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().expect("runtime").block_on(f)
}

/// A fresh Postgres database when `PATCHPORT_TEST_DATABASE_URL` is set, else SQLite.
fn database(data: &Path) -> String {
    match std::env::var("PATCHPORT_TEST_DATABASE_URL") {
        Ok(url) => block_on(patchport_tests::fresh_postgres_db(&url)).expect("fresh database"),
        Err(_) => sqlite(data),
    }
}

fn sqlite(data: &Path) -> String {
    format!("sqlite://{}/registry.db", data.display())
}

fn count(database: &str, sql: &str) -> i64 {
    block_on(query_i64s(database, sql)).expect("query")[0]
}

/// A `patchport serve` process on a fixed port; SIGKILLed when dropped.
struct Registry {
    child: Child,
    url: String,
    stderr: mpsc::Receiver<String>,
}

impl Registry {
    /// Starts `patchport serve` on `127.0.0.1:port` over `database` and
    /// `file://<data>/blobs`, with no in-process workers, and waits until it listens.
    fn start(port: u16, database: &str, data: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--workers", "0", "--database", database])
            .arg("--blobs")
            .arg(format!("file://{}/blobs", data.display()))
            // The failpoint test reads the log: info, as text, whatever the caller set.
            .env("PATCHPORT_LOG", "info")
            .env("PATCHPORT_LOG_FORMAT", "text")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stderr = lines(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the listening line");
        assert!(
            line.starts_with("patchport registry listening on"),
            "serve did not start: {line:?} {:?}",
            stderr.try_iter().collect::<Vec<_>>()
        );
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stderr,
        }
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the registry");
        self.child.wait().expect("reap the registry");
    }

    /// Waits for a log line containing `needle`.
    fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("no log line {needle:?} in time"),
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads lines on a thread, so a chatty child never blocks on a full pipe.
fn lines(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
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

fn run(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("PATCHPORT_REGISTRY", url)
        .output()
        .expect("run patchport")
}

fn ok(url: &str, args: &[&str]) -> String {
    let out = run(url, args);
    assert!(
        out.status.success(),
        "patchport {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(url: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(url, args)).expect("JSON output")
}

/// The command fails, saying `words`.
fn fails(url: &str, args: &[&str], words: &str) {
    let out = run(url, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "patchport {args:?} succeeded");
    assert!(err.contains(words), "patchport {args:?}: {err}");
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = patchport_core::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finish().to_string()
}

/// A base model directory with one `size`-byte safetensors file (one F32 tensor of
/// pseudo-random bits) and the llama-micro config.
fn big_model(dir: &Path, size: usize) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(
        fixtures().join("llama-micro/v1/config.json"),
        dir.join("config.json"),
    )
    .expect("config");
    let mut header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        size / 4,
        size / 4 * 4
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    f.write_all(&(header.len() as u64).to_le_bytes())
        .expect("write");
    f.write_all(header.as_bytes()).expect("write");
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut left = size / 4 * 4;
    let mut i: u64 = 0;
    while left > 0 {
        // Every MiB differs: its index in the first bytes.
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = left.min(block.len());
        f.write_all(&block[..n]).expect("write");
        left -= n;
        i += 1;
    }
    f.flush().expect("flush");
    path
}

/// Upload segments persisted so far (`uploads/<id>/<20-digit offset>` under the blobs).
fn persisted_segments(data: &Path) -> usize {
    let Ok(sessions) = std::fs::read_dir(data.join("blobs/uploads")) else {
        return 0;
    };
    sessions
        .filter_map(Result::ok)
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit())
        })
        .count()
}

#[test]
fn a_registry_killed_mid_upload_shows_nothing_and_the_push_resumes() {
    const SIZE: usize = 128 << 20;
    let data = tempfile::tempdir().expect("tempdir");
    let db = database(data.path());
    let port = free_port().expect("free port");
    let model_dir = data.path().join("big");
    let model = big_model(&model_dir, SIZE);
    let digest = sha256_file(&model);
    let hex = digest.trim_start_matches("sha256:");
    let blob = data
        .path()
        .join("blobs/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let push_args = [
        "base",
        "push",
        &s(&model_dir),
        "--name",
        "acme/big",
        "--version",
        "v1",
        "--json",
    ];

    let registry = Registry::start(port, &db, data.path(), &[]);
    let mut push = Command::new(BIN)
        .args(push_args)
        .env("PATCHPORT_REGISTRY", &registry.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn push");
    // Kill the registry once two 16 MiB segments are persisted: the upload is partly
    // committed.
    let deadline = Instant::now() + Duration::from_secs(120);
    while persisted_segments(data.path()) < 2 {
        assert!(
            push.try_wait().expect("poll push").is_none(),
            "the push ended before the registry was killed"
        );
        assert!(Instant::now() < deadline, "the upload made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    registry.kill();
    let status = push.wait().expect("wait for the push");
    assert!(
        !status.success(),
        "the push cannot succeed without a registry"
    );
    assert!(!blob.exists(), "a blob appeared for a partial upload");

    // The same port and stores.
    let registry = Registry::start(port, &db, data.path(), &[]);
    let url = registry.url.clone();
    fails(&url, &["status", "acme/big:v1"], "no base or patch version");
    assert_eq!(
        json(&url, &["list", "bases", "--json"]),
        serde_json::json!([])
    );
    fails(
        &url,
        &["pull", "acme/big:v1", "--out", &s(&data.path().join("x"))],
        "no base or patch version",
    );
    let kept = persisted_segments(data.path());
    assert!(kept >= 2, "the committed segments were lost: {kept}");

    // Pushing again resumes: only what the registry lacks is sent.
    let out = json(&url, &push_args);
    assert_eq!(out["created"], true);
    assert_eq!(out["uploaded_blobs"], 1, "{out}");
    assert_eq!(
        out["skipped_blobs"], 1,
        "config.json was stored before: {out}"
    );
    let sent = out["uploaded_bytes"].as_u64().expect("uploaded_bytes");
    let len = std::fs::metadata(&model).expect("model").len();
    assert!(
        sent > 0 && sent <= len - 2 * (16 << 20),
        "sent {sent} of {len} bytes: no resume from the committed segments"
    );
    assert!(blob.exists());

    let pulled = data.path().join("pulled");
    ok(&url, &["pull", "acme/big:v1", "--out", &s(&pulled)]);
    assert_eq!(sha256_file(&pulled.join("model.safetensors")), digest);
    assert_eq!(
        std::fs::read(pulled.join("config.json")).expect("pulled config"),
        std::fs::read(model_dir.join("config.json")).expect("config")
    );
}

/// Patches whose contents differ (their README), so each gets its own port job.
fn distinct_patches(data: &Path, n: usize) -> Vec<PathBuf> {
    let qv = fixtures().join("llama-micro/patches/lora-qv");
    (0..n)
        .map(|i| {
            let dir = data.join(format!("patch-{i}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for f in [
                "adapter_config.json",
                "adapter_model.safetensors",
                "README.md",
            ] {
                std::fs::copy(qv.join(f), dir.join(f)).expect("copy");
            }
            let mut readme = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("README.md"))
                .expect("readme");
            writeln!(readme, "\ncopy {i}").expect("write");
            dir
        })
        .collect()
}

fn publish_killed_mid_fan_out(database: &str, data: &Path) {
    const PATCHES: usize = 8;
    let port = free_port().expect("free port");
    let f = fixtures().join("llama-micro");
    let pause = [("PATCHPORT_TEST_FANOUT_PAUSE_MS", "600000")];
    let registry = Registry::start(port, database, data, &pause);
    let url = registry.url.clone();
    ok(
        &url,
        &[
            "base",
            "push",
            &s(&f.join("v1")),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
    );
    for (i, dir) in distinct_patches(data, PATCHES).iter().enumerate() {
        let name = format!("acme/p{i}");
        ok(
            &url,
            &[
                "patch",
                "push",
                &s(dir),
                "--name",
                &name,
                "--version",
                "1",
                "--base",
                "acme/llama:v1",
            ],
        );
    }
    let v2 = [
        "base",
        "push",
        &s(&f.join("v2")),
        "--name",
        "acme/llama",
        "--version",
        "v2",
        "--parent",
        "v1",
    ];
    let mut publish = Command::new(BIN)
        .args(v2)
        .env("PATCHPORT_REGISTRY", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn publish");
    // Half the jobs are inserted and the transaction is open: kill.
    registry.wait_for_log(FANOUT_PAUSED, Duration::from_secs(120));
    registry.kill();
    assert!(!publish.wait().expect("wait").success());

    let registry = Registry::start(port, database, data, &[]);
    let url = registry.url.clone();
    fails(
        &url,
        &["status", "acme/llama:v2"],
        "no base or patch version",
    );
    assert_eq!(count(database, "SELECT COUNT(*) FROM jobs"), 0);
    assert_eq!(count(database, "SELECT COUNT(*) FROM ports"), 0);
    assert_eq!(count(database, "SELECT COUNT(*) FROM base_versions"), 1);
    assert_eq!(
        count(
            database,
            "SELECT COUNT(*) FROM events WHERE kind IN ('base.published', 'port.queued') \
             AND subject LIKE '%acme/llama:v2%'"
        ),
        0
    );

    // Published again (no failpoint now): every job, in one go.
    ok(&url, &v2);
    assert_eq!(count(database, "SELECT COUNT(*) FROM jobs"), PATCHES as i64);
    assert_eq!(
        count(database, "SELECT COUNT(*) FROM ports"),
        PATCHES as i64
    );
    let rows = json(&url, &["compat", "--base", "acme/llama:v2", "--json"]);
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), PATCHES);
    assert!(rows.iter().all(|r| r["kind"] == "queued"), "{rows:?}");
}

#[test]
fn a_registry_killed_inside_the_publish_transaction_leaves_no_jobs() {
    let data = tempfile::tempdir().expect("tempdir");
    publish_killed_mid_fan_out(&sqlite(data.path()), data.path());
    match std::env::var("PATCHPORT_TEST_DATABASE_URL") {
        Ok(_) => {
            let data = tempfile::tempdir().expect("tempdir");
            publish_killed_mid_fan_out(&database(data.path()), data.path());
        }
        Err(_) => eprintln!("postgres run skipped: PATCHPORT_TEST_DATABASE_URL not set"),
    }
}

/// `patchport watch --json --from CURSOR`: its events, as they come.
fn watch(url: &str, from: &str) -> (Child, mpsc::Receiver<serde_json::Value>) {
    let mut child = Command::new(BIN)
        .args(["watch", "--json", "--from", from])
        .env("PATCHPORT_REGISTRY", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let raw = lines(child.stdout.take().expect("stdout"));
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
    (child, rx)
}

fn event_id(e: &serde_json::Value) -> i64 {
    e["id"]
        .as_str()
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("event without an id: {e}"))
}

#[test]
fn a_subscriber_resumes_from_its_cursor_after_a_registry_kill_without_gaps_or_duplicates() {
    const PUSHES: usize = 12;
    let data = tempfile::tempdir().expect("tempdir");
    let db = database(data.path());
    let port = free_port().expect("free port");
    let f = fixtures().join("llama-micro");
    let registry = Registry::start(port, &db, data.path(), &[]);
    let url = registry.url.clone();
    ok(
        &url,
        &[
            "base",
            "push",
            &s(&f.join("v1")),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
    );
    let (mut first, first_rx) = watch(&url, "origin");

    // Another process pushes patches one after another, each until it is in.
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let writer = {
        let url = url.clone();
        let qv = s(&f.join("patches/lora-qv"));
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            for i in 0..PUSHES {
                let name = format!("acme/e{i}");
                let args = [
                    "patch",
                    "push",
                    &qv,
                    "--name",
                    &name,
                    "--version",
                    "1",
                    "--base",
                    "acme/llama:v1",
                ];
                while !run(&url, &args).status.success() {
                    assert!(Instant::now() < deadline, "{name} never got in");
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = done_tx.send(i + 1);
            }
        })
    };
    // Some pushes are in, the rest still to come: kill.
    let deadline = Instant::now() + Duration::from_secs(120);
    while done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) != Ok(4) {
        assert!(Instant::now() < deadline, "the writer made no progress");
    }
    registry.kill();
    // The first subscriber's stream broke; it saw what it saw.
    let _ = first.wait();
    let seen_first: Vec<serde_json::Value> = first_rx.iter().collect();
    let cursor = seen_first
        .last()
        .map(|e| e["cursor"].as_str().expect("cursor").to_owned())
        .unwrap_or_else(|| "origin".to_owned());

    let registry = Registry::start(port, &db, data.path(), &[]);
    let (mut second, second_rx) = watch(&registry.url, &cursor);
    writer.join().expect("writer");

    // Everything the store holds arrives, across both subscriptions, once: a cursor
    // means "the events after this one" (events.proto), so resuming from the last one
    // received repeats nothing. (The stream is at-least-once for a subscriber that
    // resumes from an older cursor than its last; event ids are for that dedupe.)
    let stored: BTreeSet<i64> = block_on(query_i64s(&db, "SELECT id FROM events"))
        .expect("events")
        .into_iter()
        .collect();
    let mut seen_second = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen_first.len() + seen_second.len() < stored.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match second_rx.recv_timeout(left) {
            Ok(e) => seen_second.push(e),
            Err(_) => panic!(
                "{} of {} events after the restart",
                seen_first.len() + seen_second.len(),
                stored.len()
            ),
        }
    }
    // Anything more would be a duplicate; give it a few polls to show up.
    while let Ok(e) = second_rx.recv_timeout(Duration::from_secs(1)) {
        seen_second.push(e);
    }
    let _ = second.kill();
    let _ = second.wait();

    let first_ids: Vec<i64> = seen_first.iter().map(event_id).collect();
    let second_ids: Vec<i64> = seen_second.iter().map(event_id).collect();
    let all: Vec<i64> = first_ids.iter().chain(&second_ids).copied().collect();
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "duplicates: {first_ids:?} then {second_ids:?}"
    );
    assert_eq!(
        unique, stored,
        "events missed: {first_ids:?} then {second_ids:?}"
    );
    assert!(!seen_first.is_empty() && !seen_second.is_empty());
    let pushed: BTreeSet<String> = seen_first
        .iter()
        .chain(&seen_second)
        .filter(|e| e["type"] == "patch.pushed")
        .map(|e| e["subject"].as_str().unwrap_or_default().to_owned())
        .collect();
    let want: BTreeSet<String> = (0..PUSHES).map(|i| format!("acme/e{i}:1")).collect();
    assert_eq!(pushed, want);
}
