//! The build service across processes: a registry, two `patchport worker` processes, a
//! `patchport watch` subscriber. Publishing v2 ports every patch registered on v1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ok(url: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("PATCHPORT_REGISTRY", url)
        .output()
        .expect("run patchport");
    assert!(
        out.status.success(),
        "patchport {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn publishing_a_base_ports_every_patch_through_worker_processes() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "0"])
        .arg("--database")
        .arg(format!("sqlite://{}/registry.db", data.path().display()))
        .arg("--blobs")
        .arg(format!("file://{}/blobs", data.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut line = String::new();
    let out = serve.stdout.take().expect("stdout");
    BufReader::new(out)
        .read_line(&mut line)
        .expect("listening line");
    let url = format!("http://{}", line.trim().rsplit(' ').next().expect("addr"));
    let _serve = Proc(serve);
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc(
                Command::new(BIN)
                    .args(["worker", "--id", &format!("w{i}")])
                    .env("PATCHPORT_REGISTRY", &url)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn worker"),
            )
        })
        .collect();
    let mut watch = Command::new(BIN)
        .args(["watch", "--json", "--from", "origin"])
        .env("PATCHPORT_REGISTRY", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let stdout = watch.stdout.take().expect("stdout");
    let _watch = Proc(watch);
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });

    let f = fixtures().join("llama-micro");
    let s = |p: PathBuf| p.to_str().expect("utf-8 path").to_owned();
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
    let n = 6;
    for i in 0..n {
        ok(
            &url,
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
    ok(
        &url,
        &[
            "patch",
            "push",
            &s(f.join("patches/dora")),
            "--name",
            "acme/dora",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
    ok(
        &url,
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

    // Every port completes once: n ported, the DoRA patch incompatible.
    let mut completed = std::collections::BTreeMap::new();
    let mut kinds = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while completed.len() < n + 1 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = rx
            .recv_timeout(left)
            .expect("port.completed events in time");
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
    for k in [
        "base.published",
        "patch.pushed",
        "port.queued",
        "port.started",
        "port.completed",
    ] {
        assert!(kinds.contains(k), "no {k} event: {kinds:?}");
    }

    // The merged model pulled from the registry equals the offline port.
    let offline = data.path().join("offline");
    ok(
        &url,
        &[
            "port",
            "--old-base",
            &s(f.join("v1")),
            "--new-base",
            &s(f.join("v2")),
            "--patch",
            &s(f.join("patches/lora-qv")),
            "--out",
            &s(offline.clone()),
            "--merged",
        ],
    );
    let pulled = data.path().join("pulled");
    ok(
        &url,
        &[
            "pull",
            "acme/p3:1@acme/llama:v2",
            "--out",
            &s(pulled.clone()),
            "--merged",
        ],
    );
    for name in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(pulled.join(name)).expect("pulled")
                == std::fs::read(offline.join("merged").join(name)).expect("offline"),
            "{name} differs"
        );
    }
    drop(workers);
}
