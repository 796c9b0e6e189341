//! Events through gRPC: a subscriber that disconnects and resumes from its last cursor
//! misses nothing while several writers commit concurrently.

use std::collections::BTreeSet;
use std::time::Duration;

use patchport_client::NoProgress;
use patchport_proto::v1;
use patchport_tests::{TestRegistry, backends, base, fixtures, patch};

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

#[tokio::test]
async fn a_subscriber_resuming_from_its_cursor_misses_nothing_under_concurrent_writers() {
    for backend in backends() {
        let reg = TestRegistry::start(backend).await.unwrap();
        let client = reg.client().await.unwrap();
        let f = fixtures().join("llama-micro");
        client
            .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
            .await
            .unwrap();
        // Four writers push 10 patches each, concurrently.
        let mut writers = Vec::new();
        for w in 0..4 {
            let url = reg.url.clone();
            let dir = f.join("patches/lora-qv");
            writers.push(tokio::spawn(async move {
                let client = patchport_client::Client::connect(&url).await.unwrap();
                for i in 0..10 {
                    client
                        .push_dir(
                            &dir,
                            &patch(&format!("acme/w{w}-{i}"), "1", "acme/llama:v1"),
                            &NoProgress,
                        )
                        .await
                        .unwrap();
                }
            }));
        }
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
