//! `tests/fixtures/expectations.json` through the service: patches pushed on v1, the
//! newer bases published with `--parent v1`, an in-process worker ports everything, and
//! `compat` shows each pair's verdict (refused pairs with their reason).

use std::time::Duration;

use patchport_client::NoProgress;
use patchport_proto::v1;
use patchport_tests::{Backend, LocalWorker, TestRegistry, base, fixtures, patch};

#[tokio::test]
async fn the_fixture_expectations_hold_through_the_service() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let worker = LocalWorker::start(
        client.clone(),
        patchport_worker::WorkerConfig::new("w".into(), patchport_engine::Device::Cpu),
    );
    let f = fixtures();
    let expectations: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.join("expectations.json")).unwrap()).unwrap();
    // Patches on each family's v1, then the other versions of the same family as children.
    let mut pairs = Vec::new();
    for (pair, want) in expectations.as_object().unwrap() {
        let (patch_path, base_path) = pair.split_once(" -> ").unwrap();
        let (pf, _) = patch_path.split_once('/').unwrap();
        let (bf, bv) = base_path.split_once('/').unwrap();
        if pf != bf {
            continue; // a cross-family pair is not in any lineage (see below)
        }
        pairs.push((
            patch_path.to_owned(),
            bf.to_owned(),
            bv.to_owned(),
            want.clone(),
        ));
    }
    let mut pushed = std::collections::BTreeSet::new();
    for (patch_path, family, _, _) in &pairs {
        if pushed.insert(format!("{family}/v1")) {
            client
                .push_dir(
                    &f.join(family).join("v1"),
                    &base(&format!("fx/{family}"), "v1", None),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
        if pushed.insert(patch_path.clone()) {
            let name = format!("fx/{}", patch_path.rsplit('/').next().unwrap());
            client
                .push_dir(
                    &f.join(patch_path),
                    &patch(&name, "1", &format!("fx/{family}:v1")),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
    }
    for (_, family, version, _) in &pairs {
        if pushed.insert(format!("{family}/{version}")) {
            client
                .push_dir(
                    &f.join(family).join(version),
                    &base(&format!("fx/{family}"), version, Some("v1")),
                    &NoProgress,
                )
                .await
                .unwrap();
        }
    }
    for (patch_path, family, version, want) in &pairs {
        let reference = format!(
            "fx/{}:1@fx/{family}:{version}",
            patch_path.rsplit('/').next().unwrap()
        );
        let port = loop {
            let p = client
                .ports()
                .get_port(v1::GetPortRequest {
                    reference: reference.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if p.state != v1::PortState::Queued as i32 && p.state != v1::PortState::Running as i32 {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match want["verdict"].as_str().unwrap() {
            "ported" => assert_eq!(
                port.state,
                v1::PortState::Succeeded as i32,
                "{reference}: {port:?}"
            ),
            _ => {
                assert_eq!(
                    port.state,
                    v1::PortState::Incompatible as i32,
                    "{reference}"
                );
                let reason = want["reason"].as_str().unwrap();
                assert!(
                    port.refusals
                        .iter()
                        .any(|r| r.kind == reason || r.subject.contains(reason)),
                    "{reference}: {:?}",
                    port.refusals
                );
            }
        }
    }
    worker.stop().await;
}
