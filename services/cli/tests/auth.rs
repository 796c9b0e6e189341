//! Tokens with the real binary: the bootstrap admin token from the server's environment,
//! `token create|list|revoke`, clients and a worker process authenticating with
//! PATCHPORT_TOKEN, and the refusal to serve without auth on a public address.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");
const ADMIN: &str = "bootstrap-admin-token-for-the-cli-test";

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

/// `patchport serve` with auth on and `workers` in-process workers; returns the process,
/// its URL and its log, read on a thread (so the pipe never fills), whole at exit.
fn serve(data: &Path, workers: &str) -> (Proc, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", workers])
        .arg("--database")
        .arg(format!("sqlite://{}/registry.db", data.display()))
        .arg("--blobs")
        .arg(format!("file://{}/blobs", data.display()))
        .env("PATCHPORT_ADMIN_TOKEN", ADMIN)
        .env("PATCHPORT_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn patchport serve");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line.trim().rsplit(' ').next().expect("address").to_owned();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    (Proc(child), format!("http://{addr}"), log)
}

fn run(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("PATCHPORT_REGISTRY", url);
    match token {
        Some(t) => cmd.env("PATCHPORT_TOKEN", t),
        None => cmd.env_remove("PATCHPORT_TOKEN"),
    };
    cmd.output().expect("run patchport")
}

fn ok(url: &str, token: Option<&str>, args: &[&str]) -> String {
    let out = run(url, token, args);
    assert!(
        out.status.success(),
        "patchport {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fails(url: &str, token: Option<&str>, args: &[&str]) -> String {
    let out = run(url, token, args);
    assert!(!out.status.success(), "patchport {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tokens_from_the_command_line_and_an_authenticated_worker() {
    let data = tempfile::tempdir().unwrap();
    let (server, url, log) = serve(data.path(), "0");
    let url = url.as_str();
    let f = fixtures().join("llama-micro");
    let v1 = f.join("v1");
    let v2 = f.join("v2");
    let lora = f.join("patches/lora-qv");

    let push = ok(
        url,
        Some(ADMIN),
        &["token", "create", "--namespace", "acme", "--scope", "push"],
    );
    let push = push.trim().to_owned();
    assert!(push.starts_with("pp_"), "{push}");
    let worker: serde_json::Value = serde_json::from_str(&ok(
        url,
        Some(ADMIN),
        &[
            "token",
            "create",
            "--namespace",
            "*",
            "--scope",
            "worker",
            "--expires",
            "1d",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(worker["scope"], "worker");
    assert!(worker["expires_at_ms"].is_i64());
    let worker_token = worker["secret"].as_str().unwrap().to_owned();

    // Without a token nothing is pushed; with the push token it is.
    let err = fails(
        url,
        None,
        &[
            "base",
            "push",
            v1.to_str().unwrap(),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
    );
    assert!(err.contains("PATCHPORT_TOKEN"), "{err}");
    ok(
        url,
        Some(&push),
        &[
            "base",
            "push",
            v1.to_str().unwrap(),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
    );
    ok(
        url,
        Some(&push),
        &[
            "patch",
            "push",
            lora.to_str().unwrap(),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
    ok(
        url,
        Some(&push),
        &[
            "base",
            "push",
            v2.to_str().unwrap(),
            "--name",
            "acme/llama",
            "--version",
            "v2",
            "--parent",
            "v1",
        ],
    );
    let err = fails(
        url,
        Some(&push),
        &[
            "base",
            "push",
            v1.to_str().unwrap(),
            "--name",
            "other/llama",
            "--version",
            "v1",
        ],
    );
    assert!(err.contains("may not push to namespace \"other\""), "{err}");

    // A worker process with the worker token completes the port.
    let _w = Proc(
        Command::new(BIN)
            .args(["worker", "--id", "w-auth"])
            .env("PATCHPORT_REGISTRY", url)
            .env("PATCHPORT_TOKEN", &worker_token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut state = String::new();
    for _ in 0..300 {
        let compat: serde_json::Value = serde_json::from_str(&ok(
            url,
            Some(&push),
            &["compat", "--patch", "acme/qv:1", "--json"],
        ))
        .unwrap();
        state = compat.to_string();
        if state.contains("\"ported\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(state.contains("\"ported\""), "{state}");

    let listed = ok(url, Some(ADMIN), &["token", "list", "--json"]);
    assert!(
        !listed.contains(&push[push.len() - 20..]),
        "a secret was listed"
    );
    let id = push.split('_').nth(1).unwrap();
    ok(url, Some(ADMIN), &["token", "revoke", id]);
    let err = fails(url, Some(&push), &["list", "bases", "--filter", "acme"]);
    assert!(err.contains("invalid, expired or revoked token"), "{err}");
    let audit = ok(
        url,
        Some(ADMIN),
        &["audit", "--namespace", "acme", "--json"],
    );
    assert!(audit.contains("PushBaseVersion"), "{audit}");

    // The log never shows a token, even at debug level.
    drop(server);
    let text = log.join().unwrap();
    for secret in [ADMIN, push.as_str(), worker_token.as_str()] {
        assert!(!text.contains(secret), "a token appeared in the server log");
    }
    assert!(text.contains("auth on"), "{text}");
}

#[test]
fn a_public_address_needs_auth() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--workers", "0"])
        .arg("--database")
        .arg(format!("sqlite://{}/registry.db", data.path().display()))
        .arg("--blobs")
        .arg(format!("file://{}/blobs", data.path().display()))
        .env_remove("PATCHPORT_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth"), "{err}");
}

#[test]
fn in_process_workers_work_with_auth_on() {
    let data = tempfile::tempdir().unwrap();
    let (_server, url, _log) = serve(data.path(), "1");
    let url = url.as_str();
    let f = fixtures().join("llama-micro");
    let v1 = f.join("v1");
    let v2 = f.join("v2");
    let lora = f.join("patches/lora-qv");
    for args in [
        vec![
            "base",
            "push",
            v1.to_str().unwrap(),
            "--name",
            "acme/llama",
            "--version",
            "v1",
        ],
        vec![
            "patch",
            "push",
            lora.to_str().unwrap(),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
        vec![
            "base",
            "push",
            v2.to_str().unwrap(),
            "--name",
            "acme/llama",
            "--version",
            "v2",
            "--parent",
            "v1",
        ],
    ] {
        ok(url, Some(ADMIN), &args);
    }
    let mut state = String::new();
    for _ in 0..300 {
        state = ok(
            url,
            Some(ADMIN),
            &["compat", "--patch", "acme/qv:1", "--json"],
        );
        if state.contains("\"ported\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(state.contains("\"ported\""), "{state}");
}
