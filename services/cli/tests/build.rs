//! The build service across processes: a registry, two `patchport worker` processes, a
//! `patchport watch` subscriber. Publishing v2 ports every patch registered on v1.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use patchport_tests::fixtures;
use patchport_tests::process::{
    Database, Proc, Serve, Server, Worker, assert_pulled_merged_is_offline, cli, path_arg as s,
};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn ok(url: &str, args: &[&str]) -> String {
    cli(BIN, url).args(args).ok()
}

/// A registry with `workers` in-process workers on `database` (Postgres when
/// `PATCHPORT_TEST_DATABASE_URL` is set, else SQLite: [`Database::fresh`]).
fn serve(database: &Database, workers: usize, lease_seconds: u64) -> Server {
    Serve::builder(BIN)
        .workers(workers)
        .lease_seconds(lease_seconds)
        .database(database.url())
        .start()
}

fn worker(url: &str, id: &str, stall_ms: Option<u64>) -> Proc {
    let worker = Worker::builder(BIN, url).id(id);
    match stall_ms {
        Some(ms) => worker.stall_ms(ms),
        None => worker,
    }
    .start()
}

/// `patchport watch --json --from CURSOR`, its events on a channel.
fn watch(url: &str, from: &str) -> (Proc, mpsc::Receiver<serde_json::Value>) {
    patchport_tests::process::watch(BIN, url, from)
}

/// Waits for `n` distinct `port.completed` subjects; returns them with every event type seen.
fn completions(
    rx: &mpsc::Receiver<serde_json::Value>,
    n: usize,
) -> (
    std::collections::BTreeMap<String, serde_json::Value>,
    std::collections::BTreeSet<String>,
) {
    let mut completed = std::collections::BTreeMap::new();
    let mut kinds = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while completed.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "only {} of {n} port.completed events in time",
                completed.len()
            )
        });
        kinds.insert(e["type"].as_str().unwrap_or_default().to_owned());
        if e["type"] == "port.completed" {
            let subject = e["subject"].as_str().unwrap_or_default().to_owned();
            assert!(
                completed
                    .insert(subject.clone(), e["payload"].clone())
                    .is_none(),
                "{subject} completed twice"
            );
        }
    }
    (completed, kinds)
}

const COPIES: usize = 50;
const REFUSED: [(&str, &str); 3] = [
    ("dora", "dora"),
    ("ia3", "ia3"),
    ("modules-to-save", "modules_to_save"),
];

/// The scenario of the build-service issue: v2 published with 50 patches (and the
/// fixtures' refused ones) on v1; every port completes once; compat and resolve answer.
fn scenario(url: &str, data: &Path) {
    let (_watch, rx) = watch(url, "origin");
    let f = fixtures().join("llama-micro");
    ok(
        url,
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
    for i in 0..COPIES {
        ok(
            url,
            &[
                "patch",
                "push",
                &s(f.join("patches/lora-qv")),
                "--name",
                &format!("acme/p{i}"),
                "--version",
                "1",
                "--base",
                "acme/llama:v1",
            ],
        );
    }
    for (p, _) in REFUSED {
        ok(
            url,
            &[
                "patch",
                "push",
                &s(f.join("patches").join(p)),
                "--name",
                &format!("acme/{p}"),
                "--version",
                "1",
                "--base",
                "acme/llama:v1",
            ],
        );
    }
    ok(
        url,
        &[
            "base",
            "push",
            &s(f.join("v2")),
            "--name",
            "acme/llama",
            "--version",
            "v2",
            "--parent",
            "v1",
        ],
    );

    let (completed, kinds) = completions(&rx, COPIES + REFUSED.len());
    for k in [
        "base.published",
        "patch.pushed",
        "port.queued",
        "port.started",
        "port.completed",
    ] {
        assert!(kinds.contains(k), "no {k} event: {kinds:?}");
    }
    assert_eq!(completed.len(), COPIES + REFUSED.len());

    // compat --base: 50 ported pairs with diagnostics, the refused ones with their reason.
    let rows: serde_json::Value =
        serde_json::from_str(&ok(url, &["compat", "--base", "acme/llama:v2", "--json"]))
            .expect("json");
    let rows = rows.as_array().expect("array");
    let ported: Vec<_> = rows.iter().filter(|r| r["kind"] == "ported").collect();
    assert_eq!(ported.len(), COPIES);
    for r in &ported {
        assert_eq!(
            r["diagnostics"]["modules"].as_array().map(Vec::len),
            Some(4),
            "{r}"
        );
    }
    for (p, reason) in REFUSED {
        let row = rows
            .iter()
            .find(|r| r["patch"] == format!("acme/{p}:1"))
            .unwrap_or_else(|| panic!("no compat row for {p}"));
        assert_eq!(row["kind"], "incompatible");
        assert!(row["reasons"].to_string().contains(reason), "{p}: {row}");
    }
    // compat --patch: native on v1, ported on v2.
    let rows: serde_json::Value =
        serde_json::from_str(&ok(url, &["compat", "--patch", "acme/p7:1", "--json"]))
            .expect("json");
    let kinds: Vec<_> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| (r["base"].clone(), r["kind"].clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                serde_json::json!("acme/llama:v1"),
                serde_json::json!("native")
            ),
            (
                serde_json::json!("acme/llama:v2"),
                serde_json::json!("ported")
            )
        ]
    );

    // resolve: the exact artifact for the base a server has loaded.
    let v2: serde_json::Value =
        serde_json::from_str(&ok(url, &["status", "acme/llama:v2", "--json"])).expect("json");
    let digest = v2["version"]["digest"].as_str().expect("digest").to_owned();
    let r: serde_json::Value = serde_json::from_str(&ok(
        url,
        &["resolve", "acme/p3:1", "--base-digest", &digest, "--json"],
    ))
    .expect("json");
    assert_eq!(r["kind"], "ported");
    let bad = cli(BIN, url)
        .args(["resolve", "acme/dora:1", "--base-digest", &digest])
        .output();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("incompatible"));

    // The merged model pulled from the registry equals the offline port.
    assert_pulled_merged_is_offline(
        BIN,
        url,
        "acme/p3:1@acme/llama:v2",
        (&f.join("v1"), &f.join("v2"), &f.join("patches/lora-qv")),
        data,
        &["model.safetensors", "config.json"],
    );
}

#[test]
fn publishing_a_base_ports_every_patch_through_two_worker_processes() {
    let data = tempfile::tempdir().expect("tempdir");
    let db = Database::fresh();
    let serve = serve(&db, 0, 30);
    let url = serve.url();
    let _workers = [worker(&url, "w0", None), worker(&url, "w1", None)];
    scenario(&url, data.path());
}

#[test]
fn the_same_scenario_runs_in_one_process_on_sqlite() {
    let data = tempfile::tempdir().expect("tempdir");
    let serve = serve(&Database::sqlite(), 2, 30);
    let url = serve.url();
    scenario(&url, data.path());
}

/// One patch on v1, a watcher from the origin, v2 published; returns when the port has
/// been leased (`port.started`).
fn publish_one(url: &str) -> (Proc, mpsc::Receiver<serde_json::Value>) {
    let (watch_proc, rx) = watch(url, "origin");
    patchport_tests::process::publish_lineage(BIN, url);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let e = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("port.started in time");
        if e["type"] == "port.started" {
            return (watch_proc, rx);
        }
    }
}

fn attempts(url: &str) -> u64 {
    let rows: serde_json::Value =
        serde_json::from_str(&ok(url, &["compat", "--base", "acme/llama:v2", "--json"]))
            .expect("json");
    rows[0]["attempts"].as_u64().expect("attempts")
}

/// No second `port.completed` arrives within `wait`.
fn no_more_completions(rx: &mpsc::Receiver<serde_json::Value>, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    while let Ok(e) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        assert_ne!(e["type"], "port.completed", "a port completed twice: {e}");
    }
}

#[test]
fn a_worker_killed_mid_port_costs_one_lease_and_the_port_completes_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let db = Database::fresh();
    let serve = serve(&db, 0, 2);
    let url = serve.url();
    // A worker that hangs after leasing, then is killed with SIGKILL.
    let mut doomed = worker(&url, "doomed", Some(600_000));
    let (_watch, rx) = publish_one(&url);
    doomed.kill();
    // Another worker gets the job once the lease has expired, and completes it.
    let _rescuer = worker(&url, "rescuer", None);
    let (completed, _) = completions(&rx, 1);
    assert_eq!(completed.len(), 1);
    no_more_completions(&rx, Duration::from_secs(3));
    assert_eq!(
        attempts(&url),
        2,
        "one attempt lost with the dead worker, one that completed"
    );
    let pulled = data.path().join("pulled");
    ok(
        &url,
        &[
            "pull",
            "acme/qv:1@acme/llama:v2",
            "--out",
            &s(pulled),
            "--merged",
        ],
    );
}

#[test]
fn a_stalled_workers_late_result_is_refused_by_the_fence() {
    let db = Database::fresh();
    let serve = serve(&db, 0, 2);
    let url = serve.url();
    // Stalls 6 s without heartbeats (its 2 s lease expires), then ports and tries to
    // complete with its old fencing token.
    let _late = worker(&url, "late", Some(6_000));
    let (_watch, rx) = publish_one(&url);
    let _rescuer = worker(&url, "rescuer", None);
    let (completed, _) = completions(&rx, 1);
    assert_eq!(completed.len(), 1);
    // The late worker wakes after ~6 s; its CompleteJob must change nothing.
    no_more_completions(&rx, Duration::from_secs(8));
    assert_eq!(attempts(&url), 2);
}

#[test]
fn sigterm_releases_the_lease_so_another_worker_takes_the_job_at_once() {
    let db = Database::fresh();
    // A long lease: only a release can explain a quick hand-over.
    let serve = serve(&db, 0, 120);
    let url = serve.url();
    let mut leaving = worker(&url, "leaving", Some(600_000));
    let (_watch, rx) = publish_one(&url);
    leaving.terminate();
    let exit = leaving.wait();
    assert!(exit.success(), "worker exited with {exit:?} after SIGTERM");
    let _next = worker(&url, "next", None);
    // The job went back to the queue because it was released, not because its
    // (120 s) lease expired, and then completed once.
    let mut released = false;
    loop {
        let e = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("events in time");
        if e["type"] == "port.queued" && e["payload"]["detail"] == "released" {
            released = true;
        }
        if e["type"] == "port.completed" {
            break;
        }
    }
    assert!(
        released,
        "no port.queued(released) event before the completion"
    );
    no_more_completions(&rx, Duration::from_secs(2));
    assert_eq!(
        attempts(&url),
        1,
        "a released lease does not count as an attempt"
    );
}

/// A worker with a quick pace leases several jobs per call; on SIGTERM it gives back
/// every job it holds, the one it is porting and those leased ahead and not started, so
/// another worker takes them at once (their 120 s leases never expire here).
#[test]
fn sigterm_releases_the_jobs_leased_ahead_as_well() {
    const N: u64 = 6;
    let db = Database::fresh();
    let serve = serve(&db, 0, 120);
    let url = serve.url();
    let data = tempfile::tempdir().expect("tempdir");
    let (_watch, rx) = watch(&url, "origin");
    let f = fixtures().join("llama-micro");
    let push = |kind: &str, dir: &Path, name: &str, version: &str, extra: &[&str]| {
        let dir = s(dir);
        let mut args = vec![kind, "push", &dir, "--name", name, "--version", version];
        args.extend(extra);
        ok(&url, &args);
    };
    push("base", &f.join("v1"), "acme/llama", "v1", &[]);
    // N distinct patches, so N jobs.
    let src = patchport_tests::read_tree(&f.join("patches/lora-qv"));
    for i in 0..N {
        let d = data.path().join(format!("p{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let weights = patchport_tests::distinct_adapter(&src["adapter_model.safetensors"], i);
        std::fs::write(d.join("adapter_model.safetensors"), weights).expect("write");
        std::fs::write(d.join("adapter_config.json"), &src["adapter_config.json"]).expect("write");
        push(
            "patch",
            &d,
            &format!("acme/p{i}"),
            "1",
            &["--base", "acme/llama:v1"],
        );
    }
    push(
        "base",
        &f.join("v2"),
        "acme/llama",
        "v2",
        &["--parent", "v1"],
    );

    // Its first port runs at full speed (a quick pace: the next lease takes several
    // jobs); the first job of that lease stalls, the others wait behind it.
    let mut leaving = Worker::builder(BIN, &url)
        .id("leaving")
        .stall_ms(600_000)
        .stall_after(1)
        .start();
    let (mut started, mut completed) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while completed.is_empty() || started.len() < completed.len() + 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "the worker did not lease ahead in time: {} started, {} completed",
                started.len(),
                completed.len()
            )
        });
        let subject = e["subject"].as_str().unwrap_or_default().to_owned();
        match e["type"].as_str() {
            Some("port.started") => started.insert(subject),
            Some("port.completed") => completed.insert(subject),
            _ => false,
        };
    }
    leaving.terminate();
    let exit = leaving.wait();
    assert!(exit.success(), "worker exited with {exit:?} after SIGTERM");
    // Every job it held (leased and not completed: the stalled one and those behind it)
    // went back to the queue at once, released. Events of leases not read yet come
    // before their releases.
    let mut released = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held: std::collections::BTreeSet<String> =
            started.difference(&completed).cloned().collect();
        if released == held {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("released {released:?} of the held {held:?} in time"));
        let subject = e["subject"].as_str().unwrap_or_default().to_owned();
        match e["type"].as_str() {
            Some("port.started") => {
                started.insert(subject);
            }
            Some("port.completed") => {
                assert!(released.is_empty(), "{subject} completed after SIGTERM");
                completed.insert(subject);
            }
            Some("port.queued") if e["payload"]["detail"] == "released" => {
                assert!(held.contains(&subject), "{subject} released but not held");
                released.insert(subject);
            }
            _ => {}
        }
    }
    assert!(released.len() >= 2, "released: {released:?}");

    // Another worker ports the rest, each once, and no release counted as an attempt.
    let _next = worker(&url, "next", None);
    let (rest, _) = completions(&rx, N as usize - completed.len());
    assert!(
        rest.keys().all(|k| !completed.contains(k)),
        "a port completed twice"
    );
    no_more_completions(&rx, Duration::from_secs(2));
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&url, &["compat", "--base", "acme/llama:v2", "--json"]))
            .expect("json");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), N as usize, "{rows:?}");
    for row in rows {
        assert_eq!(row["attempts"], 1, "{row}");
    }
}
