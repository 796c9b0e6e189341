//! Two registry replicas — two `patchport serve` processes on one Postgres database and
//! one S3 bucket prefix, as deploy/compose.yaml and the Kubernetes manifests run them —
//! behave as one registry to their clients:
//!
//! - a publish through one replica reaches a `watch` subscriber of the other;
//! - an upload started on one resumes on the other from the offset the first committed;
//! - leases and fences hold across both: a worker on replica A whose job is re-leased
//!   (its lease expired) or cancelled through replica B has its late result refused, and
//!   the port completes once.
//!
//! Needs `PATCHPORT_TEST_DATABASE_URL` and `PATCHPORT_TEST_S3_ENDPOINT` (see
//! scripts/s3-server.sh), so each test is `#[ignore]`d with that reason: `cargo test`
//! reports them ignored, and scripts/test.sh runs them (`--ignored`) when both are set.
//! Run without them, a test fails saying what is missing.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchport_core::Hasher;
use patchport_proto::v1;
use patchport_tests::process::{
    Database, Proc, Serve, Server, Worker, block_on, cli, path_arg as s, watch,
};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");
const PORT: &str = "acme/qv:1@acme/llama:v2";

/// Replica A and replica B over one fresh Postgres database and one fresh S3 prefix.
struct Replicas {
    a: Server,
    b: Server,
    db: Database,
}

/// Two replicas with `lease_seconds` leases and no in-process workers; panics, naming
/// what is missing, when Postgres or S3 is not configured.
fn replicas(lease_seconds: u64) -> Replicas {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    assert!(
        std::env::var("PATCHPORT_TEST_S3_ENDPOINT").is_ok(),
        "{test} needs PATCHPORT_TEST_S3_ENDPOINT (replicas share one S3 bucket; see scripts/s3-server.sh)"
    );
    let db = Database::postgres("two replicas on one database").unwrap_or_else(|| {
        panic!("{test} needs PATCHPORT_TEST_DATABASE_URL (replicas share one Postgres database)")
    });
    let bucket =
        std::env::var("PATCHPORT_TEST_S3_BUCKET").unwrap_or_else(|_| "patchport-test".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let blobs = format!("s3://{bucket}/replicas-{}-{nanos}", std::process::id());
    let start = || {
        Serve::builder(BIN)
            .workers(0)
            .lease_seconds(lease_seconds)
            .database(db.url())
            .blobs(&blobs)
            .start()
    };
    let a = start();
    let b = start();
    eprintln!("{test}: replicas {} and {} on {blobs}", a.url(), b.url());
    Replicas { a, b, db }
}

fn ok(url: &str, args: &[&str]) -> String {
    cli(BIN, url).args(args).ok()
}

/// Pushes llama-micro v1 and the lora-qv patch through `url`, then publishes v2 with
/// `--parent v1` (which queues the port of the patch).
fn publish(url: &str) {
    patchport_tests::process::publish_lineage(BIN, url);
}

/// The next event of `kind` for `subject`, within two minutes; every event read on the
/// way is returned too.
fn until(
    rx: &mpsc::Receiver<serde_json::Value>,
    kind: &str,
    subject: &str,
    seen: &mut Vec<serde_json::Value>,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} for {subject} in time; saw {seen:?}"));
        seen.push(e.clone());
        if e["type"] == kind && e["subject"] == subject {
            return e;
        }
    }
}

/// No `port.completed` arrives within `wait`.
fn no_more_completions(rx: &mpsc::Receiver<serde_json::Value>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while let Ok(e) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        assert_ne!(e["type"], "port.completed", "a second completion: {e}");
    }
}

/// The compat row of the port on v2, as `url` answers it.
fn port_row(url: &str) -> serde_json::Value {
    let rows: serde_json::Value =
        serde_json::from_str(&ok(url, &["compat", "--patch", "acme/qv:1", "--json"]))
            .expect("compat json");
    rows.as_array()
        .expect("array")
        .iter()
        .find(|r| r["base"] == "acme/llama:v2")
        .cloned()
        .unwrap_or_else(|| panic!("no compat row for v2: {rows}"))
}

fn worker(url: &str, id: &str) -> patchport_tests::process::WorkerBuilder {
    Worker::builder(BIN, url).id(id)
}

#[test]
#[ignore = "needs PATCHPORT_TEST_DATABASE_URL and PATCHPORT_TEST_S3_ENDPOINT; scripts/test.sh runs it when both are set"]
fn a_publish_on_one_replica_reaches_a_subscriber_of_the_other() {
    let r = replicas(30);
    let (_watch, rx) = watch(BIN, r.b.url(), "0");
    let _worker: Proc = worker(&r.a.url(), "on-a").start();
    publish(&r.a.url());

    let mut seen = Vec::new();
    let published = until(&rx, "base.published", "acme/llama:v2", &mut seen);
    assert_eq!(published["payload"]["parent"]["version"], "v1");
    until(&rx, "port.queued", PORT, &mut seen);
    let started = until(&rx, "port.started", PORT, &mut seen);
    assert_eq!(
        started["payload"]["detail"], "on-a",
        "leased through replica A"
    );
    let done = until(&rx, "port.completed", PORT, &mut seen);
    assert_eq!(done["payload"]["state"], "succeeded", "{done}");
    // Every event once, in order (ids rise), whichever replica wrote it.
    let ids: Vec<i64> = seen
        .iter()
        .map(|e| e["id"].as_str().and_then(|i| i.parse().ok()).expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids {ids:?}");
    // What A ported, B serves: pull the ported adapter through B.
    let out = tempfile::tempdir().expect("tempdir");
    ok(
        &r.b.url(),
        &["pull", PORT, "--out", &s(out.path().join("ported"))],
    );
    assert!(out.path().join("ported/adapter_model.safetensors").exists());
}

#[test]
#[ignore = "needs PATCHPORT_TEST_DATABASE_URL and PATCHPORT_TEST_S3_ENDPOINT; scripts/test.sh runs it when both are set"]
fn an_upload_started_on_one_replica_resumes_on_the_other() {
    let r = replicas(30);
    // 12 MiB of pseudo-random bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut h = Hasher::new();
    h.update(&data);
    let digest = h.finish().to_string();
    let size = data.len() as u64;

    block_on(async {
        let a = patchport_client::Client::connect(&r.a.url())
            .await
            .expect("connect to A");
        let b = patchport_client::Client::connect(&r.b.url())
            .await
            .expect("connect to B");
        let started = a
            .blobs()
            .start_upload(v1::StartUploadRequest {
                digest: digest.clone(),
                size,
            })
            .await
            .expect("StartUpload on A")
            .into_inner();
        assert!(!started.already_exists);
        assert_eq!(started.committed_offset, 0);
        let chunk = usize::try_from(started.max_chunk_size)
            .expect("chunk size")
            .min(1 << 20);
        let chunks = |from: usize, to: usize| {
            let id = started.upload_id.clone();
            let msgs: Vec<v1::UploadChunk> = (from..to)
                .step_by(chunk)
                .map(|o| v1::UploadChunk {
                    upload_id: id.clone(),
                    offset: o as u64,
                    data: data[o..(o + chunk).min(to)].to_vec().into(),
                })
                .collect();
            futures::stream::iter(msgs)
        };
        // The first 5 MiB through A.
        let half = 5 << 20;
        let committed = a
            .blobs()
            .upload_chunks(chunks(0, half))
            .await
            .expect("UploadChunks on A")
            .into_inner()
            .committed_offset;
        assert_eq!(committed, half as u64);

        // B knows the session and where it stands; starting it again resumes it.
        let status = b
            .blobs()
            .get_upload(v1::GetUploadRequest {
                upload_id: started.upload_id.clone(),
            })
            .await
            .expect("GetUpload on B")
            .into_inner();
        assert_eq!(status.committed_offset, half as u64);
        assert_eq!(status.digest, digest);
        let again = b
            .blobs()
            .start_upload(v1::StartUploadRequest {
                digest: digest.clone(),
                size,
            })
            .await
            .expect("StartUpload on B")
            .into_inner();
        assert_eq!(
            (again.upload_id.as_str(), again.committed_offset),
            (started.upload_id.as_str(), half as u64),
            "B resumes A's session"
        );

        // The rest through B, committed on B, readable through A.
        let committed = b
            .blobs()
            .upload_chunks(chunks(half, data.len()))
            .await
            .expect("UploadChunks on B")
            .into_inner()
            .committed_offset;
        assert_eq!(committed, size);
        let done = b
            .blobs()
            .commit_upload(v1::CommitUploadRequest {
                upload_id: started.upload_id.clone(),
            })
            .await
            .expect("CommitUpload on B")
            .into_inner();
        assert_eq!((done.digest.as_str(), done.size), (digest.as_str(), size));
        let stat = a
            .blobs()
            .stat_blob(v1::StatBlobRequest {
                digest: digest.clone(),
            })
            .await
            .expect("StatBlob on A")
            .into_inner();
        assert_eq!(stat.size, size);
        let mut stream = a
            .blobs()
            .read_blob(v1::ReadBlobRequest {
                digest: digest.clone(),
                offset: 0,
                length: 0,
            })
            .await
            .expect("ReadBlob on A")
            .into_inner();
        let mut back = Vec::with_capacity(data.len());
        while let Some(c) = stream.message().await.expect("a blob chunk") {
            back.extend_from_slice(&c.data);
        }
        assert!(back == data, "the blob read through A is the bytes sent");
    });
}

/// Waits (two minutes at most) until the worker log at `log` has a line with one of
/// `needles`; returns the one found.
fn wait_for_log(log: &std::path::Path, needles: &[&'static str]) -> &'static str {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(n) = needles.iter().find(|n| text.contains(**n)) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no {needles:?} in the worker log: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs PATCHPORT_TEST_DATABASE_URL and PATCHPORT_TEST_S3_ENDPOINT; scripts/test.sh runs it when both are set"]
fn a_job_re_leased_through_the_other_replica_refuses_the_first_workers_late_result() {
    // 2 s leases; the first worker stalls 6 s without heartbeats after leasing.
    let r = replicas(2);
    let logs = tempfile::tempdir().expect("tempdir");
    let late_log = logs.path().join("late.log");
    let (_watch, rx) = watch(BIN, r.a.url(), "0");
    let _late: Proc = worker(&r.a.url(), "late-on-a")
        .stall_ms(6_000)
        .log_to(&late_log)
        .start();
    publish(&r.a.url());
    let mut seen = Vec::new();
    let first = until(&rx, "port.started", PORT, &mut seen);
    assert_eq!(first["payload"]["detail"], "late-on-a");
    // Its lease expires; a worker of replica B takes the job and completes it.
    let _rescuer: Proc = worker(&r.b.url(), "rescuer-on-b").start();
    let done = until(&rx, "port.completed", PORT, &mut seen);
    assert_eq!(done["payload"]["state"], "succeeded", "{done}");
    assert!(
        seen.iter().any(|e| e["type"] == "port.started"
            && e["subject"] == PORT
            && e["payload"]["detail"] == "rescuer-on-b"),
        "replica B's worker leased the job: {seen:?}"
    );
    // The first worker wakes after ~6 s: its heartbeat through replica A finds the lease
    // lost, or its CompleteJob with the old fencing token is refused; nothing changes.
    wait_for_log(&late_log, &["refused by the fence", "lease lost"]);
    no_more_completions(&rx, Duration::from_secs(3));
    let row = port_row(&r.b.url());
    assert!(row["attempts"].as_u64() >= Some(2), "{row}");
    assert_eq!(
        r.db.count("SELECT COUNT(*) FROM events WHERE kind = 'port.completed'"),
        1
    );
}

#[test]
#[ignore = "needs PATCHPORT_TEST_DATABASE_URL and PATCHPORT_TEST_S3_ENDPOINT; scripts/test.sh runs it when both are set"]
fn a_job_cancelled_through_the_other_replica_refuses_the_running_workers_result() {
    let r = replicas(30);
    let gate = tempfile::tempdir().expect("tempdir");
    let go_on = gate.path().join("go-on");
    let log = gate.path().join("worker.log");
    let _worker: Proc = worker(&r.a.url(), "on-a")
        .stall_until(&go_on)
        .log_to(&log)
        .start();
    let (_watch, rx) = watch(BIN, r.b.url(), "0");
    publish(&r.a.url());
    let mut seen = Vec::new();
    until(&rx, "port.started", PORT, &mut seen);
    // Cancelled through B while the worker on A holds the lease.
    let cancelled = cli(BIN, r.b.url()).args(["cancel", PORT, "--json"]).json();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    std::fs::write(&go_on, b"").expect("go on");
    // The worker either learns of the cancel and drops the job, or wakes, ports, and its
    // CompleteJob through A is refused by the fence: either way nothing lands.
    wait_for_log(&log, &["refused by the fence", "job cancelled"]);
    no_more_completions(&rx, Duration::from_secs(2));
    assert_eq!(port_row(&r.a.url())["kind"], "cancelled");
    assert_eq!(
        r.db.count("SELECT COUNT(*) FROM events WHERE kind = 'port.completed'"),
        0
    );
}
