//! The README walk-through with the real binary: `patchport serve` in its own process,
//! every client command as a separate process.

use std::path::Path;
use std::process::Output;

use patchport_tests::fixtures;
use patchport_tests::process::{Serve, Server, cli};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn serve() -> Server {
    Serve::builder(BIN).start()
}

fn run(server: &Server, args: &[&str]) -> Output {
    cli(BIN, server.url()).args(args).output()
}

fn ok(server: &Server, args: &[&str]) -> String {
    cli(BIN, server.url()).args(args).ok()
}

/// The files of a directory, without the `model.sig` a pull writes beside them.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter(|e| e.as_ref().map_or(true, |e| e.file_name() != "model.sig"))
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_readme_walk_through_works_with_the_real_binary() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = serve();
    let f = fixtures().join("llama-micro");
    let v1 = f.join("v1");
    let v2 = f.join("v2");
    let qv = f.join("patches/lora-qv");
    let out = ok(
        &server,
        &[
            "base",
            "push",
            v1.to_str().unwrap(),
            "--name",
            "acme/llama-micro",
            "--version",
            "v1",
        ],
    );
    assert!(out.contains("base acme/llama-micro:v1 pushed"), "{out}");
    let json = ok(
        &server,
        &[
            "base",
            "push",
            v2.to_str().unwrap(),
            "--name",
            "acme/llama-micro",
            "--version",
            "v2",
            "--parent",
            "v1",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("push --json is JSON");
    assert_eq!(v["created"], true);
    assert_eq!(v["version"]["parent"], "v1");
    ok(
        &server,
        &[
            "patch",
            "push",
            qv.to_str().unwrap(),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama-micro:v1",
        ],
    );

    let out_dir = data.path().join("v2-copy");
    ok(
        &server,
        &[
            "pull",
            "acme/llama-micro:v2",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(files(&out_dir), files(&v2));
    assert!(out_dir.join("model.sig").exists(), "pull writes model.sig");
    let qv_dir = data.path().join("qv-copy");
    ok(
        &server,
        &["pull", "acme/qv:1", "--out", qv_dir.to_str().unwrap()],
    );
    assert_eq!(files(&qv_dir), files(&qv));

    let bases: serde_json::Value =
        serde_json::from_str(&ok(&server, &["list", "bases", "--json"])).expect("json");
    assert_eq!(bases.as_array().map(Vec::len), Some(2));
    let patches = ok(&server, &["list", "patches"]);
    assert!(
        patches.contains("acme/qv") && patches.contains("acme/llama-micro:v1"),
        "{patches}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&server, &["status", "acme/qv:1", "--json"])).expect("json");
    assert_eq!(status["kind"], "patch");
    assert_eq!(
        status["version"]["base"]["reference"],
        "acme/llama-micro:v1"
    );
    assert_eq!(status["version"]["adapter"]["r"], 4);
    let human = ok(&server, &["status", "acme/llama-micro:v2"]);
    assert!(human.contains("parent   v1"), "{human}");

    // Errors reach the user as one clear line and a failing exit code.
    let bad = run(
        &server,
        &[
            "pull",
            "acme/none:1",
            "--out",
            data.path().join("x").to_str().unwrap(),
        ],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("no base or patch version acme/none:1"),
        "{err}"
    );
}

#[test]
fn the_server_stops_on_sigterm() {
    let mut server = serve();
    server.terminate();
    let exit = server.wait();
    assert!(exit.success(), "serve exited with {exit:?} after SIGTERM");
}
