//! Graceful shutdown and metrics of the real `patchport serve` process: SIGTERM turns
//! health NOT_SERVING, closes the listener, lets in-flight streams finish and exits 0;
//! an in-process worker releases its lease; `/metrics` counts what happened.

use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchport_proto::v1;
use patchport_tests::process::{Proc, Serve, cli, http_get};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn ok(url: &str, args: &[&str]) -> String {
    cli(BIN, url).args(args).ok()
}

/// `patchport watch --json --from origin`, its events on a channel.
fn watch(url: &str) -> (Proc, mpsc::Receiver<serde_json::Value>) {
    patchport_tests::process::watch(BIN, url, "origin")
}

/// Waits for an event of type `kind`; returns every event seen up to it.
fn wait_for(rx: &mpsc::Receiver<serde_json::Value>, kind: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let e = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no {kind} event in time; saw {seen:?}"));
        let done = e["type"] == kind;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// v1, one patch on it, and v2 with `--parent v1` (which queues the port).
fn publish_lineage(url: &str) {
    patchport_tests::process::publish_lineage(BIN, url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_health_not_serving_stops_accepting_and_lets_streams_finish() {
    let mut server = Serve::builder(BIN).workers(0).start();
    let client = patchport_client::Client::connect(&server.url())
        .await
        .expect("connect");

    // A blob large enough to be streamed in many messages.
    let blob: Vec<u8> = (0..(24u32 << 20)).map(|i| (i % 251) as u8).collect();
    let digest = client
        .upload_bytes(bytes::Bytes::from(blob.clone()))
        .await
        .expect("upload");

    let channel = tonic::transport::Channel::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = health.message().await.expect("health").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut events = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: "origin".to_owned(),
            types: Vec::new(),
            subject: String::new(),
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut download = client
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest: digest.to_string(),
            offset: 0,
            length: 0,
        })
        .await
        .expect("read blob")
        .into_inner();
    let mut got = download
        .message()
        .await
        .expect("first chunk")
        .expect("some data")
        .data
        .to_vec();

    server.terminate();

    // Health turns NOT_SERVING (the watch is a stream already in flight).
    let next = health.message().await.expect("health").expect("a status");
    assert_eq!(next.status(), ServingStatus::NotServing);

    // The listener closes: new connections are refused while the download is still open.
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(server.addr()).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the registry still accepts connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.try_wait().is_none(),
        "the registry exited with a download in flight"
    );

    // The download in flight completes, every byte.
    while let Some(chunk) = download.message().await.expect("download after SIGTERM") {
        got.extend_from_slice(&chunk.data);
    }
    assert!(got == blob, "the download after SIGTERM differs");

    // The event subscription ends cleanly (OK, not an error): the client resumes from its
    // cursor on another replica.
    while let Some(event) = events.message().await.expect("subscription ends with OK") {
        assert!(!event.cursor.is_empty());
    }

    drop(health);
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "serve exited with {status:?} after SIGTERM"
    );
}

#[test]
fn sigterm_makes_an_in_process_worker_release_its_lease() {
    // The in-process worker stalls after leasing; the lease (120 s) would outlive the test.
    let mut server = Serve::builder(BIN)
        .workers(1)
        .lease_seconds(120)
        .env("PATCHPORT_TEST_STALL_MS", "600000")
        .start();
    let (mut watcher, rx) = watch(&server.url());
    publish_lineage(&server.url());
    wait_for(&rx, "port.started");

    server.terminate();
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "serve exited with {status:?} after SIGTERM"
    );
    // The watcher's stream ended cleanly with the server: it exits 0 too.
    let status = watcher.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "watch exited with {status:?}");
    drop(rx);

    // On restart (no workers now) the port is queued again and the attempt did not count.
    let server = server.restart_with(|s| s.workers(0).env_remove("PATCHPORT_TEST_STALL_MS"));
    let rows: serde_json::Value = serde_json::from_str(&ok(
        &server.url(),
        &["compat", "--base", "acme/llama:v2", "--json"],
    ))
    .expect("json");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["patch"] == "acme/qv:1"))
        .unwrap_or_else(|| panic!("no compat row for acme/qv:1 in {rows}"));
    assert_eq!(row["kind"], "queued", "{row}");
    assert_eq!(
        row["attempts"], 0,
        "a released lease is not an attempt: {row}"
    );
    let (_watcher, rx) = watch(&server.url());
    let seen = wait_for(&rx, "base.published");
    let seen = [seen, {
        let mut rest = Vec::new();
        while let Ok(e) = rx.recv_timeout(Duration::from_secs(3)) {
            rest.push(e);
        }
        rest
    }]
    .concat();
    assert!(
        seen.iter()
            .any(|e| e["type"] == "port.queued" && e["payload"]["detail"] == "released"),
        "no port.queued(released) event: {seen:?}"
    );
}

#[test]
fn metrics_count_requests_by_method_and_code_bytes_and_queue_depth() {
    let server = Serve::builder(BIN)
        .workers(0)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = server.metrics_addr().expect("metrics address");
    publish_lineage(&server.url());
    let missing = cli(BIN, server.url())
        .args(["status", "acme/nope:1"])
        .output();
    assert!(!missing.status.success());

    // A sample line (not a `# HELP` or `# TYPE` comment) containing every part.
    let line_with = |body: &str, parts: &[&str]| {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
    };
    // The queue gauge is refreshed every few seconds: poll until everything shows.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = http_get(metrics, "/metrics");
        assert_eq!(status, 200, "{body}");
        let complete = line_with(&body, &["patchport_jobs{", "state=\"queued\"", "} 1"]).is_some()
            && line_with(
                &body,
                &["patchport_grpc_requests_total{", "code=\"NotFound\""],
            )
            .is_some();
        if complete {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics incomplete in time:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let push = line_with(
        &body,
        &[
            "patchport_grpc_requests_total{",
            "method=\"/patchport.v1.RegistryService/PushBaseVersion\"",
            "code=\"OK\"",
        ],
    )
    .unwrap_or_else(|| panic!("no PushBaseVersion OK counter:\n{body}"));
    // Each push is a validate_only call before the upload and the push itself.
    assert!(push.ends_with(" 4"), "two base pushes: {push}");
    let uploads = line_with(
        &body,
        &[
            "patchport_grpc_requests_total{",
            "method=\"/patchport.v1.BlobService/UploadChunks\"",
            "code=\"OK\"",
        ],
    );
    assert!(uploads.is_some(), "no UploadChunks OK counter:\n{body}");
    assert!(
        line_with(
            &body,
            &[
                "patchport_grpc_request_duration_seconds_bucket{",
                "PushBaseVersion",
                "le=\"+Inf\"",
                "} 4"
            ]
        )
        .is_some(),
        "no duration histogram for PushBaseVersion:\n{body}"
    );
    let pushed: f64 = line_with(&body, &["patchport_push_bytes_total "])
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no push bytes counter:\n{body}"));
    assert!(pushed > 0.0, "push bytes {pushed}");
    for state in ["running", "succeeded", "failed"] {
        assert!(
            line_with(&body, &["patchport_jobs{", &format!("state=\"{state}\"")]).is_some(),
            "no {state} gauge:\n{body}"
        );
    }
    // Anything but /metrics is not found.
    assert_eq!(http_get(metrics, "/").0, 404);
}
