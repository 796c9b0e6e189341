//! Fault tests with real processes: `patchport serve` killed with SIGKILL in the middle
//! of an upload, of a publish transaction and of an event stream, then started again on
//! the same port and stores. Nothing half-done may be visible afterwards, and every
//! client picks up where it was.
//!
//! The registry runs on SQLite, or on a fresh Postgres database when
//! `PATCHPORT_TEST_DATABASE_URL` is set (the publish test runs on both then).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchport_tests::process::{Database, Proc, Serve, Server, cli, file_url, path_arg as s};
use patchport_tests::{copy_dir, fixtures};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

/// The failpoint line `PATCHPORT_TEST_FANOUT_PAUSE_MS` logs inside the transaction.
const FANOUT_PAUSED: &str = "test failpoint: publish paused mid fan-out";

/// `patchport serve` over `database` and `file://<data>/blobs`, with no in-process
/// workers; restarted on the same port and stores with [`Server::restart`].
fn serve(database: &Database, data: &Path, env: &[(&str, &str)]) -> Server {
    let mut serve = Serve::builder(BIN)
        .workers(0)
        .database(database.url())
        .blobs(file_url(&data.join("blobs")))
        // The failpoint test reads the log: info, as text, whatever the caller set.
        .env("PATCHPORT_LOG", "info")
        .env("PATCHPORT_LOG_FORMAT", "text");
    for (k, v) in env {
        serve = serve.env(k, v);
    }
    serve.start()
}

fn run(url: &str, args: &[&str]) -> std::process::Output {
    cli(BIN, url).args(args).output()
}

fn ok(url: &str, args: &[&str]) -> String {
    cli(BIN, url).args(args).ok()
}

fn json(url: &str, args: &[&str]) -> serde_json::Value {
    cli(BIN, url).args(args).json()
}

/// The command fails, saying `words`.
fn fails(url: &str, args: &[&str], words: &str) {
    let err = cli(BIN, url).args(args).fails();
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

/// Upload segments persisted so far under the blobs: on `file://` the records of durable
/// stretches of a session's data file (`uploads/<id>/<20-digit offset>.<len>.state`).
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
            let offset = name.strip_suffix(".state").and_then(|n| n.split_once('.'));
            offset.is_some_and(|(offset, _)| {
                offset.len() == 20 && offset.bytes().all(|b| b.is_ascii_digit())
            })
        })
        .count()
}

#[test]
fn a_registry_killed_mid_upload_shows_nothing_and_the_push_resumes() {
    const SIZE: usize = 128 << 20;
    let data = tempfile::tempdir().expect("tempdir");
    let db = Database::fresh();
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

    let mut registry = serve(&db, data.path(), &[]);
    let mut push = cli(BIN, registry.url()).args(push_args).spawn();
    // Kill the registry once two 16 MiB segments are persisted: the upload is partly
    // committed.
    let deadline = Instant::now() + Duration::from_secs(120);
    while persisted_segments(data.path()) < 2 {
        assert!(
            push.try_wait().is_none(),
            "the push ended before the registry was killed"
        );
        assert!(Instant::now() < deadline, "the upload made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    registry.kill();
    let status = push.wait();
    assert!(
        !status.success(),
        "the push cannot succeed without a registry"
    );
    assert!(!blob.exists(), "a blob appeared for a partial upload");

    // The same port and stores.
    let registry = registry.restart();
    let url = registry.url();
    fails(&url, &["status", "acme/big:v1"], "no base or patch version");
    assert_eq!(
        json(&url, &["list", "bases", "--json"]),
        serde_json::json!([])
    );
    fails(
        &url,
        &["pull", "acme/big:v1", "--out", &s(data.path().join("x"))],
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
            copy_dir(&qv, &dir).expect("copy");
            let mut readme = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("README.md"))
                .expect("readme");
            writeln!(readme, "\ncopy {i}").expect("write");
            dir
        })
        .collect()
}

fn publish_killed_mid_fan_out(database: &Database, data: &Path) {
    const PATCHES: usize = 8;
    let f = fixtures().join("llama-micro");
    let pause = [("PATCHPORT_TEST_FANOUT_PAUSE_MS", "600000")];
    let mut registry = serve(database, data, &pause);
    let url = registry.url();
    ok(
        &url,
        &[
            "base",
            "push",
            &s(f.join("v1")),
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
        &s(f.join("v2")),
        "--name",
        "acme/llama",
        "--version",
        "v2",
        "--parent",
        "v1",
    ];
    let mut publish = cli(BIN, &url).args(v2).spawn();
    // Half the jobs are inserted and the transaction is open: kill.
    registry.wait_for_log(FANOUT_PAUSED, Duration::from_secs(120));
    registry.kill();
    assert!(!publish.wait().success());

    let registry = registry.restart_with(|s| s.env_remove("PATCHPORT_TEST_FANOUT_PAUSE_MS"));
    let url = registry.url();
    fails(
        &url,
        &["status", "acme/llama:v2"],
        "no base or patch version",
    );
    assert_eq!(database.count("SELECT COUNT(*) FROM jobs"), 0);
    assert_eq!(database.count("SELECT COUNT(*) FROM ports"), 0);
    assert_eq!(database.count("SELECT COUNT(*) FROM base_versions"), 1);
    assert_eq!(
        database.count(
            "SELECT COUNT(*) FROM events WHERE kind IN ('base.published', 'port.queued') \
             AND subject LIKE '%acme/llama:v2%'"
        ),
        0
    );

    // Published again (no failpoint now): every job, in one go.
    ok(&url, &v2);
    assert_eq!(database.count("SELECT COUNT(*) FROM jobs"), PATCHES as i64);
    assert_eq!(database.count("SELECT COUNT(*) FROM ports"), PATCHES as i64);
    let rows = json(&url, &["compat", "--base", "acme/llama:v2", "--json"]);
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), PATCHES);
    assert!(rows.iter().all(|r| r["kind"] == "queued"), "{rows:?}");
}

#[test]
fn a_registry_killed_inside_the_publish_transaction_leaves_no_jobs() {
    let data = tempfile::tempdir().expect("tempdir");
    publish_killed_mid_fan_out(&Database::sqlite(), data.path());
    if let Some(db) = Database::postgres("postgres run") {
        let data = tempfile::tempdir().expect("tempdir");
        publish_killed_mid_fan_out(&db, data.path());
    }
}

/// `patchport watch --json --from CURSOR`: its events, as they come.
fn watch(url: &str, from: &str) -> (Proc, mpsc::Receiver<serde_json::Value>) {
    patchport_tests::process::watch(BIN, url, from)
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
    let db = Database::fresh();
    let f = fixtures().join("llama-micro");
    let mut registry = serve(&db, data.path(), &[]);
    let url = registry.url();
    ok(
        &url,
        &[
            "base",
            "push",
            &s(f.join("v1")),
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
        let qv = s(f.join("patches/lora-qv"));
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

    let registry = registry.restart();
    let (mut second, second_rx) = watch(&registry.url(), &cursor);
    writer.join().expect("writer");

    // Everything the store holds arrives, across both subscriptions, once: a cursor
    // means "the events after this one" (events.proto), so resuming from the last one
    // received repeats nothing. (The stream is at-least-once for a subscriber that
    // resumes from an older cursor than its last; event ids are for that dedupe.)
    let stored: BTreeSet<i64> = db.query_i64s("SELECT id FROM events").into_iter().collect();
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
    second.kill();

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
