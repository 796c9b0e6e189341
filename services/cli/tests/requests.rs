//! Every port is a leased job, asked for however: `patchport request` (RequestPort)
//! answers at once with a queued port, survives a registry SIGKILL, and a worker started
//! later ports it exactly once, announced once to every subscriber; a caller that gives
//! up leaves nothing running without a lease; a cancelled running port refuses the
//! worker's late result. Real processes, on SQLite always and Postgres when
//! `PATCHPORT_TEST_DATABASE_URL` is set.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchport_tests::fixtures;
use patchport_tests::process::{Database, Serve, Server, Worker, cli, path_arg as s, watch};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");
const PORT: &str = "acme/qv:1@acme/llama:v2";

fn databases(what: &str) -> Vec<Database> {
    let mut out = vec![Database::sqlite()];
    out.extend(Database::postgres(what));
    out
}

/// v1 and v2 of a base (v2 pushed without a parent, so nothing is queued by itself) and a
/// patch on v1.
fn setup(url: &str) {
    let f = fixtures().join("llama-micro");
    let run = |args: &[String]| cli(BIN, url).args(args).ok();
    run(&[
        "base".into(),
        "push".into(),
        s(f.join("v1")),
        "--name".into(),
        "acme/llama".into(),
        "--version".into(),
        "v1".into(),
    ]);
    run(&[
        "base".into(),
        "push".into(),
        s(f.join("v2")),
        "--name".into(),
        "acme/llama".into(),
        "--version".into(),
        "v2".into(),
    ]);
    run(&[
        "patch".into(),
        "push".into(),
        s(f.join("patches/lora-qv")),
        "--name".into(),
        "acme/qv".into(),
        "--version".into(),
        "1".into(),
        "--base".into(),
        "acme/llama:v1".into(),
    ]);
}

fn request(url: &str) -> serde_json::Value {
    cli(BIN, url)
        .args(["request", "acme/qv:1", "--base", "acme/llama:v2", "--json"])
        .json()
}

/// Events of `rx` until one of type `kind` about the port arrives (or the deadline).
fn until(rx: &mpsc::Receiver<serde_json::Value>, kind: &str, subject: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} about {subject} in time"));
        if e["type"] == kind && e["subject"] == subject {
            return e;
        }
    }
}

/// Every further event about the port within `quiet` (after the port is done nothing more
/// should come).
fn more(rx: &mpsc::Receiver<serde_json::Value>, quiet: Duration) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Ok(e) = rx.recv_timeout(quiet) {
        if e["subject"] == PORT {
            out.push(e);
        }
    }
    out
}

#[test]
fn a_requested_port_survives_a_registry_kill_and_completes_exactly_once() {
    for db in databases("postgres run of the requested-port kill test") {
        let server: Server = Serve::builder(BIN).workers(0).database(db.url()).start();
        let url = server.url();
        setup(&url);
        let asked_at = Instant::now();
        let port = request(&url);
        let answered = asked_at.elapsed();
        assert_eq!(port["state"], "queued", "{}: {port}", db.kind());
        assert_eq!(port["queue_position"], 1, "{}: {port}", db.kind());
        eprintln!(
            "{}: RequestPort answered {} with no worker running in {answered:?} (CLI process included)",
            db.kind(),
            port["state"]
        );
        // SIGKILL right after the answer; the job is in the database, not in the process.
        let mut server = server;
        server.kill();
        let server = server.restart();
        let url = server.url();
        let (_replay, from_zero) = watch(BIN, &url, "0");
        let (_live, from_head) = watch(BIN, &url, "");
        // The live subscriber is connected once it sees an event committed after it.
        cli(BIN, &url)
            .args(["patch", "push"])
            .arg(s(fixtures().join("llama-micro/patches/lora-qv")))
            .args([
                "--name",
                "acme/marker",
                "--version",
                "1",
                "--base",
                "acme/llama:v1",
            ])
            .ok();
        until(&from_head, "patch.pushed", "acme/marker:1");
        let _worker = Worker::builder(BIN, &url).id("late-worker").start();
        for (who, rx) in [("from cursor 0", &from_zero), ("from the head", &from_head)] {
            let done = until(rx, "port.completed", PORT);
            let p = &done["payload"];
            assert_eq!(p["state"], "succeeded", "{} {who}: {done}", db.kind());
            assert!(
                p["patch_digest"].as_str().unwrap().starts_with("sha256:"),
                "{done}"
            );
            assert!(p["risk"].is_number(), "{done}");
        }
        let later = more(&from_zero, Duration::from_secs(3));
        assert!(
            later.iter().all(|e| e["type"] != "port.completed"),
            "{}: a second port.completed: {later:?}",
            db.kind()
        );
        assert_eq!(
            db.count(&format!(
                "SELECT COUNT(*) FROM events WHERE kind = 'port.completed' AND subject = '{PORT}'"
            )),
            1,
            "{}: exactly one port.completed in the outbox",
            db.kind()
        );
        let again = request(&url);
        assert_eq!(again["state"], "succeeded", "{}: {again}", db.kind());
    }
}

#[test]
fn giving_up_leaves_nothing_running_and_a_cancelled_port_refuses_the_late_result() {
    for db in databases("postgres run of the cancellation test") {
        let server = Serve::builder(BIN)
            .workers(0)
            .lease_seconds(60)
            .database(db.url())
            .start();
        let url = server.url();
        setup(&url);
        // A caller that gives up at once: whatever reached the registry is a queued job,
        // never a port running in a request that no longer exists.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let gave_up = rt.block_on(async {
            let client = patchport_client::Client::connect(&url).await.unwrap();
            let mut req = tonic::Request::new(patchport_proto::v1::RequestPortRequest {
                patch: "acme/qv:1".into(),
                base: "acme/llama:v2".into(),
                priority: 0,
            });
            req.set_timeout(Duration::from_micros(1));
            client.ports().request_port(req).await
        });
        eprintln!(
            "{}: the hasty caller got {:?}",
            db.kind(),
            gave_up.map(|r| r.into_inner().state)
        );
        let port = request(&url);
        assert_eq!(port["state"], "queued", "{}: {port}", db.kind());
        let orphans = "SELECT COUNT(*) FROM ports p LEFT JOIN jobs j ON j.id = p.job_id \
                       WHERE p.state = 'running' AND (j.id IS NULL OR j.state <> 'running' \
                       OR j.lease_expires_at IS NULL)";
        assert_eq!(db.count(orphans), 0, "{}", db.kind());
        assert_eq!(
            db.count("SELECT COUNT(*) FROM ports WHERE job_id IS NULL"),
            0,
            "{}: every port is a job",
            db.kind()
        );

        // A worker that leases it and stalls (no heartbeats), as a slow GPU would, until
        // the port was cancelled.
        let log = tempfile::NamedTempFile::new().unwrap();
        let gate = tempfile::tempdir().unwrap();
        let go_on = gate.path().join("go-on");
        let _worker = Worker::builder(BIN, &url)
            .id("slow")
            .stall_until(&go_on)
            .log_to(log.path())
            .start();
        let (_events, rx) = watch(BIN, &url, "0");
        until(&rx, "port.started", PORT);
        let cancelled = cli(BIN, &url).args(["cancel", PORT, "--json"]).json();
        std::fs::write(&go_on, b"").unwrap();
        assert_eq!(
            cancelled["state"],
            "cancelled",
            "{}: {cancelled}",
            db.kind()
        );
        assert_eq!(db.count(orphans), 0, "{}", db.kind());
        // The worker wakes, ports, and its CompleteJob is refused by the fence.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("refused by the fence")
        {
            assert!(
                Instant::now() < deadline,
                "{}: the late result was not refused: {}",
                db.kind(),
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = cli(BIN, &url)
            .args(["compat", "--patch", "acme/qv:1", "--json"])
            .json();
        let row = status
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["base"] == "acme/llama:v2")
            .cloned()
            .unwrap();
        assert_eq!(row["kind"], "cancelled", "{}: {row}", db.kind());
        assert_eq!(
            db.count(&format!(
                "SELECT COUNT(*) FROM events WHERE kind = 'port.completed' AND subject = '{PORT}'"
            )),
            0,
            "{}",
            db.kind()
        );
    }
}
