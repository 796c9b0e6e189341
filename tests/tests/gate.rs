//! The quality gate in the service: a worker evaluates every port of a patch that has an
//! eval set, the verdict and the three arms are stored with the port, carried by a
//! `port.evaluated` event, shown by compat, and `resolve --require-pass` (or a namespace
//! policy) returns only ports that passed. The fixture is task-llama: the accuracies must
//! be the ones transformers + PEFT measured (results.json).

use std::time::Duration;

use patchport_client::{Client, NoProgress, PushKind};
use patchport_engine::Device;
use patchport_proto::v1;
use patchport_tests::{Backend, LocalWorker, TestRegistry, base, copy_dir, fixtures};
use tonic::Code;

fn accuracy(name: &str) -> f64 {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("task-llama/results.json")).unwrap())
            .unwrap();
    r["accuracy"][name].as_f64().unwrap()
}

async fn port(client: &Client, patch: &str, base: &str) -> v1::Port {
    patchport_tests::ports::wait_port(client, &format!("{patch}@{base}")).await
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn every_port_is_evaluated_and_resolve_can_require_a_pass() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("task-llama");
    let push_base = |dir: &'static str, version: &'static str, parent: Option<&'static str>| {
        let client = client.clone();
        let f = f.clone();
        async move {
            client
                .push_dir(
                    &f.join(dir),
                    &base("acme/tiny", version, parent),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
    };
    push_base("v1", "v1", None).await;

    // A malformed eval set is refused at push, with its line number.
    let bad = tempfile::tempdir().unwrap();
    let bad_eval = bad.path().join("eval.jsonl");
    std::fs::write(
        &bad_eval,
        "{\"prompt\": \"a\", \"choices\": [\"x\", \"y\"], \"label\": 0}\n{\"prompt\": \"b\"}\n",
    )
    .unwrap();
    let patch_kind = |eval: std::path::PathBuf| PushKind::Patch {
        name: "acme/qvo".into(),
        version: "1".into(),
        base: "acme/tiny:v1".into(),
        eval: Some(eval),
        allow_architecture_mismatch: false,
    };
    let err = client
        .push_dir(
            &f.join("patches/lora-qvo"),
            &patch_kind(bad_eval),
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("line 2"), "{err}");

    client
        .push_dir(
            &f.join("patches/lora-qvo"),
            &patch_kind(f.join("eval.jsonl")),
            &NoProgress,
        )
        .await
        .unwrap();
    // Three descendants: small drift, large drift, and the same weights again.
    push_base("v2", "v2", Some("v1")).await;
    push_base("v2-drift", "v2-drift", Some("v1")).await;
    // Same weights, another generation config: a new version whose port changes nothing.
    let again = tempfile::tempdir().unwrap();
    copy_dir(&f.join("v1"), again.path()).unwrap();
    std::fs::write(
        again.path().join("generation_config.json"),
        "{\"max_new_tokens\": 8}",
    )
    .unwrap();
    client
        .push_dir(
            again.path(),
            &base("acme/tiny", "v1-again", Some("v1")),
            &NoProgress,
        )
        .await
        .unwrap();

    let cache = tempfile::tempdir().unwrap();
    let mut config = patchport_worker::WorkerConfig::new("gate-test".into(), Device::Cpu);
    config.gate.as_mut().unwrap().cache_dir = cache.path().to_owned();
    let worker = LocalWorker::start(client.clone(), config);

    let small = port(&client, "acme/qvo:1", "acme/tiny:v2").await;
    let large = port(&client, "acme/qvo:1", "acme/tiny:v2-drift").await;
    let same = port(&client, "acme/qvo:1", "acme/tiny:v1-again").await;
    worker.stop().await;

    let arms = |p: &v1::Port| {
        let e = p.evaluation.as_ref().expect("evaluated");
        assert_eq!(e.status, "evaluated", "{}", e.reason);
        (
            e.reference.as_ref().unwrap().value,
            e.base_alone.as_ref().unwrap().value,
            e.ported.as_ref().unwrap().value,
        )
    };
    let (r, b, p) = arms(&small);
    assert!(close(r, accuracy("v1+LoRA(v1)")), "{r}");
    assert!(close(b, accuracy("v2 zero-shot")), "{b}");
    assert!(close(p, accuracy("v2+LoRA(v1) ported")), "{p}");
    let (r2, b2, p2) = arms(&large);
    assert!(close(r2, r));
    assert!(close(b2, accuracy("v2-drift zero-shot")), "{b2}");
    assert!(close(p2, accuracy("v2-drift+LoRA(v1) ported")), "{p2}");
    assert_eq!(large.evaluation.as_ref().unwrap().verdict, "regressed");
    // The small drift loses 7 items and wins 1: just past max(1 point, 2 SE).
    assert_eq!(small.evaluation.as_ref().unwrap().verdict, "regressed");
    let e = same.evaluation.as_ref().unwrap();
    assert_eq!(e.verdict, "preserved");
    assert!(close(e.delta, 0.0));
    assert_eq!(e.ported.as_ref().unwrap().items, 305);

    // The drift risk, known before evaluating, ranks the large drift higher.
    let risk = |p: &v1::Port| p.diagnostics.as_ref().unwrap().risk;
    assert!(
        risk(&large) > risk(&small),
        "{} {}",
        risk(&large),
        risk(&small)
    );
    assert!(risk(&same) < risk(&small));
    // The high-risk flag is computed by the registry and travels on the wire.
    let high = |p: &v1::Port| p.diagnostics.as_ref().unwrap().high_risk;
    assert!(high(&large), "{}", risk(&large));
    assert!(!high(&small) && !high(&same), "{}", risk(&small));

    // Compat carries it all; resolve --require-pass returns only the passing port.
    let compat = client
        .ports()
        .query_compat(v1::QueryCompatRequest {
            subject: Some(v1::query_compat_request::Subject::Patch(
                "acme/qvo:1".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        compat
            .entries
            .iter()
            .filter(|e| e.port.as_ref().is_some_and(|p| p.evaluation.is_some()))
            .count(),
        3
    );
    let resolve = |base: &v1::Port, require_pass: bool| v1::ResolveRequest {
        patch: "acme/qvo:1".into(),
        base_digest: base.base_digest.clone(),
        require_pass,
        ..Default::default()
    };
    client
        .ports()
        .resolve(resolve(&small, false))
        .await
        .unwrap();
    let refused = client
        .ports()
        .resolve(resolve(&small, true))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("regressed"),
        "{}",
        refused.message()
    );
    client.ports().resolve(resolve(&same, true)).await.unwrap();
    // A namespace policy requires it whatever the caller asks.
    client
        .admin()
        .set_namespace_policy(v1::NamespacePolicy {
            namespace: "acme".into(),
            anonymous_read: false,
            require_pass: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = client
        .ports()
        .resolve(resolve(&large, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Each port announced its verdict.
    let mut events = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: "origin".into(),
            types: vec!["port.evaluated".into()],
            subject: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut verdicts = Vec::new();
    while verdicts.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
        verdicts.push(payload["detail"].as_str().unwrap().to_owned());
    }
    verdicts.sort();
    assert_eq!(verdicts, ["preserved", "regressed", "regressed"]);
}

#[tokio::test]
async fn a_base_without_a_tokenizer_is_not_evaluable() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("patches/lora-qv"),
            &PushKind::Patch {
                name: "acme/qv".into(),
                version: "1".into(),
                base: "acme/llama:v1".into(),
                eval: Some(fixtures().join("task-llama/eval.jsonl")),
                allow_architecture_mismatch: false,
            },
            &NoProgress,
        )
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("v2"),
            &base("acme/llama", "v2", Some("v1")),
            &NoProgress,
        )
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut config = patchport_worker::WorkerConfig::new("gate-test".into(), Device::Cpu);
    config.gate.as_mut().unwrap().cache_dir = cache.path().to_owned();
    let worker = LocalWorker::start(client.clone(), config);
    let p = port(&client, "acme/qv:1", "acme/llama:v2").await;
    worker.stop().await;
    assert_eq!(p.state, v1::PortState::Succeeded as i32);
    let e = p.evaluation.expect("an evaluation record");
    assert_eq!(e.status, "not_evaluable");
    assert!(e.reason.contains("tokenizer.json"), "{}", e.reason);
}
