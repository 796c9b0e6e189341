//! Tokens with the real binary: the bootstrap admin token from the server's environment,
//! `token create|list|revoke`, clients and a worker process authenticating with
//! PATCHPORT_TOKEN, and the refusal to serve without auth on a public address.

use patchport_tests::fixtures;
use patchport_tests::process::{Serve, Server, Worker, cli};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");
const ADMIN: &str = "bootstrap-admin-token-for-the-cli-test";

/// `patchport serve` with auth on, a debug log and `workers` in-process workers.
fn serve(workers: usize) -> Server {
    Serve::builder(BIN)
        .workers(workers)
        .env("PATCHPORT_ADMIN_TOKEN", ADMIN)
        .env("PATCHPORT_LOG", "debug")
        .start()
}

fn ok(url: &str, token: Option<&str>, args: &[&str]) -> String {
    cli(BIN, url).token(token).args(args).ok()
}

fn fails(url: &str, token: Option<&str>, args: &[&str]) -> String {
    cli(BIN, url).token(token).args(args).fails()
}

#[test]
fn tokens_from_the_command_line_and_an_authenticated_worker() {
    let mut server = serve(0);
    let url = server.url();
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
    let _w = Worker::builder(BIN, url)
        .id("w-auth")
        .token(&worker_token)
        .start();
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
    server.kill();
    let text = server.log();
    for secret in [ADMIN, push.as_str(), worker_token.as_str()] {
        assert!(!text.contains(secret), "a token appeared in the server log");
    }
    assert!(text.contains("auth on"), "{text}");
}

#[test]
fn a_public_address_needs_auth() {
    let out = Serve::builder(BIN)
        .listen("0.0.0.0:0")
        .workers(0)
        .env_remove("PATCHPORT_ADMIN_TOKEN")
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth"), "{err}");
}

#[test]
fn in_process_workers_work_with_auth_on() {
    let server = serve(1);
    let url = server.url();
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
