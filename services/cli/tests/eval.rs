//! `patchport eval` and `patchport port --eval` with the real binary on the task-llama
//! fixture.

use std::process::Output;

use patchport_tests::fixtures;
use patchport_tests::process::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn task(p: &str) -> String {
    fixtures().join("task-llama").join(p).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Cli::new(BIN)
        .args(args)
        .env_remove("PATCHPORT_DEVICE")
        .output()
}

/// `v` as f64 equals `want` (serde_json's default parser may be 1 ulp off the printed value).
fn close(v: &serde_json::Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-12)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn eval_prints_the_accuracy_of_a_base_with_a_patch() {
    let (v2, lora, set) = (task("v2"), task("patches/lora-qvo"), task("eval.jsonl"));
    let out = run(&[
        "eval", "--base", &v2, "--patch", &lora, "--eval", &set, "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["n"], 305);
    assert_eq!(v["correct"], 282);
    assert!(close(&v["accuracy"], 282.0 / 305.0), "{}", v["accuracy"]);
    assert!(v.get("items").is_none());

    let out = run(&["eval", "--base", &v2, "--eval", &set]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("accuracy 0.6197 (189/305)"), "{text}");
}

#[test]
fn eval_refuses_what_it_cannot_score() {
    let set = task("eval.jsonl");
    let micro = fixtures().join("llama-micro/v2").display().to_string();
    let out = run(&["eval", "--base", &micro, "--eval", &set, "--json"]);
    assert_eq!(out.status.code(), Some(4));
    let v = json(&out);
    assert_eq!(v["evaluable"], false);
    assert!(
        v["reason"]
            .as_str()
            .expect("reason")
            .contains("tokenizer.json")
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":0}\n{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":5}\n",
    )
    .expect("write");
    let out = run(&[
        "eval",
        "--base",
        &task("v2"),
        "--eval",
        &bad.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eval set line 2: label 5 is out of range"),
        "{err}"
    );
}

#[test]
fn port_with_eval_gates_the_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v1, lora, set) = (task("v1"), task("patches/lora-qvo"), task("eval.jsonl"));
    let port = |new: &str| {
        let out_dir = dir.path().join(new).display().to_string();
        run(&[
            "port",
            "--old-base",
            &v1,
            "--new-base",
            &task(new),
            "--patch",
            &lora,
            "--out",
            &out_dir,
            "--eval",
            &set,
            "--json",
        ])
    };

    // v2 (small drift): 282/305 against the reference's 288/305, 7 items lost and 1
    // won: −1.97 points, beyond max(1 point, 2 SE = 1.84 points).
    let out = port("v2");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let small = json(&out);
    assert_eq!(small["verdict"], "ported");
    assert_eq!(small["gate"]["verdict"], "regressed");
    assert!(
        close(
            &small["gate"]["arms"]["reference"]["accuracy"],
            288.0 / 305.0
        ),
        "{}",
        small["gate"]["arms"]["reference"]["accuracy"]
    );
    assert!(
        close(
            &small["gate"]["arms"]["base_alone"]["accuracy"],
            189.0 / 305.0
        ),
        "{}",
        small["gate"]["arms"]["base_alone"]["accuracy"]
    );
    assert!(
        close(&small["gate"]["arms"]["ported"]["accuracy"], 282.0 / 305.0),
        "{}",
        small["gate"]["arms"]["ported"]["accuracy"]
    );
    assert!(small["gate"]["standard_error"].as_f64().expect("se") > 0.0);

    let out = port("v2-drift");
    assert_eq!(out.status.code(), Some(3), "regressed");
    let large = json(&out);
    assert_eq!(large["gate"]["verdict"], "regressed");
    assert!(
        close(&large["gate"]["arms"]["ported"]["accuracy"], 202.0 / 305.0),
        "{}",
        large["gate"]["arms"]["ported"]["accuracy"]
    );
    let risk = |v: &serde_json::Value| v["risk"].as_f64().expect("risk");
    assert!(risk(&large) > risk(&small));
    let delta = |v: &serde_json::Value| v["gate"]["delta"].as_f64().expect("delta");
    assert!(delta(&large) < 10.0 * delta(&small));
}
