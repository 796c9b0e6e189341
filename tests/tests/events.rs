//! Events through gRPC: a subscriber that disconnects and resumes from its last cursor
//! misses nothing while several writers commit concurrently.

use std::collections::BTreeSet;
use std::time::Duration;

use patchport_client::NoProgress;
use patchport_proto::v1;
use patchport_tests::{TestRegistry, backends, base, fixtures, patch, push_fixture};

async fn read_until(
    client: &patchport_client::Client,
    cursor: &str,
    want: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    stop_after: Option<usize>,
) -> String {
    let mut stream = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: cursor.to_owned(),
            types: vec!["patch.pushed".into()],
            subject: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = cursor.to_owned();
    let mut got = 0;
    while !want.is_subset(seen) {
        let e = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("events in time")
            .unwrap()
            .expect("stream open");
        seen.insert(e.subject.clone());
        last = e.cursor;
        got += 1;
        if stop_after == Some(got) {
            break; // disconnect mid-stream
        }
    }
    last
}

/// `count` writers, each on its own connection, pushing `each` patch versions
/// `acme/{prefix}{w}-{i}:1` onto `acme/llama:v1` concurrently.
fn writers(
    reg: &TestRegistry,
    prefix: &str,
    count: usize,
    each: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|w| {
            let url = reg.url.clone();
            let dir = fixtures().join("llama-micro/patches/lora-qv");
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let client = patchport_client::Client::connect(&url).await.unwrap();
                for i in 0..each {
                    client
                        .push_dir(
                            &dir,
                            &patch(&format!("acme/{prefix}{w}-{i}"), "1", "acme/llama:v1"),
                            &NoProgress,
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn a_subscriber_resuming_from_its_cursor_misses_nothing_under_concurrent_writers() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
        // Four writers push 10 patches each, concurrently.
        let writers = writers(&reg, "w", 4, 10);
        let want: BTreeSet<String> = (0..4)
            .flat_map(|w| (0..10).map(move |i| format!("acme/w{w}-{i}:1")))
            .collect();
        let mut seen = BTreeSet::new();
        // Read a few, disconnect, resume from the last cursor, several times.
        let mut cursor = "origin".to_owned();
        for _ in 0..5 {
            cursor = read_until(&client, &cursor, &want, &mut seen, Some(5)).await;
        }
        read_until(&client, &cursor, &want, &mut seen, None).await;
        for w in writers {
            w.await.unwrap();
        }
        assert!(
            want.is_subset(&seen),
            "{backend:?}: missed {:?}",
            want.difference(&seen).collect::<Vec<_>>()
        );
    }
}

async fn subscribe(
    client: &patchport_client::Client,
    cursor: &str,
    types: &[&str],
) -> Result<tonic::Streaming<v1::Event>, tonic::Status> {
    client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: cursor.to_owned(),
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            subject: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn next(stream: &mut tonic::Streaming<v1::Event>) -> v1::Event {
    tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("an event in time")
        .expect("no stream error")
        .expect("stream open")
}

/// Cursors as a new user meets them: "0" replays the log, a made-up cursor is
/// INVALID_ARGUMENT, a cursor from a longer log (another or a restored database) is
/// OUT_OF_RANGE instead of silently delivering nothing, and so is an unknown type.
#[tokio::test]
async fn cursors_and_types_are_checked_when_subscribing() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
        let mut replay = subscribe(&client, "0", &[]).await.unwrap();
        let first = next(&mut replay).await;
        assert_eq!(
            (first.r#type.as_str(), first.subject.as_str()),
            ("base.published", "acme/llama:v1"),
            "{backend:?}"
        );
        let payload: serde_json::Value = serde_json::from_str(&first.payload_json).unwrap();
        assert!(
            payload["digest"].as_str().unwrap().starts_with("sha256:"),
            "{payload}"
        );
        for bad in ["nonsense", "sq:x", "pg:1"] {
            let e = subscribe(&client, bad, &[]).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{backend:?} {bad}");
            assert!(e.message().contains("\"0\""), "{}", e.message());
        }
        let ahead = match first.cursor.split(':').collect::<Vec<_>>().as_slice() {
            ["sq", _] => "sq:100000".to_owned(),
            ["pg", x, _] => format!("pg:{x}:100000"),
            other => panic!("unexpected cursor {other:?}"),
        };
        let e = subscribe(&client, &ahead, &[]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{backend:?}");
        assert!(e.message().contains("past the end"), "{}", e.message());
        let e = subscribe(&client, "", &["port.done"]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{backend:?}");
        assert!(e.message().contains("port.completed"), "{}", e.message());
    }
}

/// A requested port is announced from queued to completed, each event carrying what a
/// subscriber needs: digests, state, risk and the diagnostics summary.
#[tokio::test]
async fn port_events_carry_digests_state_and_diagnostics() {
    use patchport_tests::LocalWorker;
    use patchport_tests::ports::wait_port;
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
        push_fixture(&client, "llama-micro/v2", &base("acme/llama", "v2", None)).await;
        push_fixture(
            &client,
            "llama-micro/patches/lora-qv",
            &patch("acme/qv", "1", "acme/llama:v1"),
        )
        .await;
        let mut events = subscribe(&client, "", &["port.queued", "port.completed"])
            .await
            .unwrap();
        let asked = client
            .ports()
            .request_port(v1::RequestPortRequest {
                patch: "acme/qv:1".into(),
                base: "acme/llama:v2".into(),
                priority: 7,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(asked.state, v1::PortState::Queued as i32, "{backend:?}");
        assert_eq!(asked.queue_position, 1, "{backend:?}");
        let queued = next(&mut events).await;
        assert_eq!(queued.r#type, "port.queued");
        assert_eq!(queued.subject, "acme/qv:1@acme/llama:v2");
        let worker = LocalWorker::cpu(client.clone());
        let done = wait_port(&client, "acme/qv:1@acme/llama:v2").await;
        let completed = next(&mut events).await;
        worker.stop().await;
        assert_eq!(completed.r#type, "port.completed", "{backend:?}");
        let p: serde_json::Value = serde_json::from_str(&completed.payload_json).unwrap();
        assert_eq!(p["state"], "succeeded");
        assert_eq!(p["patch_digest"], done.patch_digest.as_str());
        assert_eq!(p["base_digest"], done.base_digest.as_str());
        assert_eq!(p["source_base_digest"], done.source_base_digest.as_str());
        let risk = done.diagnostics.as_ref().unwrap().risk;
        assert!((p["risk"].as_f64().unwrap() - risk).abs() < 1e-12, "{p}");
        assert_eq!(p["diagnostics"]["modules"], 4, "{p}");
        assert_eq!(p["refusal_kinds"], serde_json::json!([]));
        let bad = client
            .ports()
            .request_port(v1::RequestPortRequest {
                patch: "acme/qv:1".into(),
                base: "acme/llama:v2".into(),
                priority: 1000,
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().starts_with("priority:"), "{}", bad.message());
    }
}

/// Two registries on one Postgres database (replicas): a publish on one reaches a
/// subscriber of the other (the outbox is shared; NOTIFY wakes every replica).
#[tokio::test]
async fn a_publish_on_one_replica_reaches_a_subscriber_of_another() {
    if std::env::var("PATCHPORT_TEST_DATABASE_URL").is_err() {
        eprintln!(
            "SKIPPED replica event test: PATCHPORT_TEST_DATABASE_URL not set (needs Postgres)"
        );
        return;
    }
    let a = TestRegistry::start(patchport_tests::Backend::Production)
        .await
        .unwrap();
    let mut config = a.config.clone();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let b = TestRegistry::start_config(config, tempfile::tempdir().unwrap())
        .await
        .unwrap();
    let on_b = b.client().await.unwrap();
    let mut events = subscribe(&on_b, "", &["base.published"]).await.unwrap();
    let on_a = a.client().await.unwrap();
    push_fixture(&on_a, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    let e = next(&mut events).await;
    assert_eq!(e.subject, "acme/llama:v1");
}

/// Many streams share the registry's one outbox reader: each of them gets every event of
/// concurrent writers exactly once, in log order.
#[tokio::test]
async fn many_subscribers_each_get_every_event_once_in_order() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
        let mut streams = Vec::new();
        for _ in 0..12 {
            streams.push(subscribe(&client, "", &["patch.pushed"]).await.unwrap());
        }
        for w in writers(&reg, "m", 3, 8) {
            w.await.unwrap();
        }
        // Read every stream at once, as separate subscribers would (one connection
        // carries them all: reading them one by one would stall on flow control).
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    while ids.len() < 24 {
                        ids.push(next(&mut stream).await.id.parse::<i64>().unwrap());
                    }
                    // Nothing more arrives for these pushes.
                    let extra = tokio::time::timeout(Duration::from_millis(300), stream.message())
                        .await
                        .is_ok();
                    (ids, extra)
                })
            })
            .collect();
        let mut orders = Vec::new();
        for r in readers {
            let (ids, extra) = r.await.unwrap();
            assert!(!extra, "{backend:?}: an extra event after {ids:?}");
            let distinct: BTreeSet<i64> = ids.iter().copied().collect();
            assert_eq!(distinct.len(), 24, "{backend:?}: duplicates in {ids:?}");
            orders.push(ids);
        }
        assert!(
            orders.windows(2).all(|w| w[0] == w[1]),
            "{backend:?}: streams disagree on the order"
        );
    }
}
