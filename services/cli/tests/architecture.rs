//! The crate graph says who ports: no library crate under `services/` links the model
//! runtime (candle, tokenizers, gemm). Only the `patchport` binary, which runs workers
//! and the offline `port` command, may. Checked with `cargo tree` on the real lock file,
//! so a new dependency edge fails here and not in a review.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Library crates that must be here: the check fails if the discovery below misses one
/// (a renamed crate, a changed layout), instead of passing over nothing.
const EXPECTED: [&str; 5] = [
    "patchport-core",
    "patchport-store",
    "patchport-registry",
    "patchport-client",
    "patchport-telemetry",
];

/// A package in a normal-dependency tree that means "links the model runtime".
fn forbidden(package: &str) -> bool {
    package == "tokenizers"
        || package == "gemm"
        || package.starts_with("gemm-")
        || package == "candle"
        || package.starts_with("candle-")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the test says something even when it passes (libtest captures `eprintln!`).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The cargo that built this test (`CARGO` at compile time or at run time), else `cargo`
/// on PATH; `Err` says why none can be run.
fn cargo() -> Result<PathBuf, String> {
    find_cargo(
        [
            option_env!("CARGO").map(PathBuf::from),
            std::env::var_os("CARGO").map(PathBuf::from),
            Some(PathBuf::from("cargo")),
        ]
        .into_iter()
        .flatten(),
    )
}

/// The first candidate whose `--version` runs.
fn find_cargo(candidates: impl IntoIterator<Item = PathBuf>) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    for cargo in candidates {
        match Command::new(&cargo).arg("--version").output() {
            Ok(out) if out.status.success() => return Ok(cargo),
            Ok(out) => tried.push(format!("{} exited with {}", cargo.display(), out.status)),
            Err(e) => tried.push(format!("{}: {e}", cargo.display())),
        }
    }
    Err(format!(
        "no runnable cargo (CARGO unset or stale, none on PATH): {}",
        tried.join("; ")
    ))
}

fn run(cargo: &Path, args: &[&str]) -> String {
    let out = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cargo {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "cargo {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

/// Every workspace package under `services/` with a library target.
fn service_libraries(cargo: &Path) -> Vec<String> {
    let metadata: serde_json::Value = serde_json::from_str(&run(
        cargo,
        &["metadata", "--no-deps", "--format-version", "1"],
    ))
    .expect("cargo metadata is JSON");
    let services = workspace_root()
        .join("services")
        .canonicalize()
        .expect("services/ exists");
    let mut out: Vec<String> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().unwrap_or_default());
            let is_lib = p["targets"].as_array().is_some_and(|targets| {
                targets.iter().any(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "rlib"))
                })
            });
            manifest.starts_with(&services) && is_lib
        })
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

#[test]
fn no_service_library_links_the_model_runtime() {
    let cargo = match cargo() {
        Ok(cargo) => cargo,
        Err(why) => {
            say(&format!(
                "SKIPPED architecture check (no library under services/ links candle): {why}"
            ));
            return;
        }
    };
    let libraries = service_libraries(&cargo);
    for expected in EXPECTED {
        assert!(
            libraries.iter().any(|l| l == expected),
            "{expected} not found among the libraries under services/: {libraries:?}"
        );
    }
    assert!(
        !libraries.iter().any(|l| l == "patchport"),
        "the binary crate is allowed to link candle and is not checked: {libraries:?}"
    );

    let mut violations = Vec::new();
    for library in &libraries {
        let tree = run(
            &cargo,
            &["tree", "-p", library, "-e", "normal", "--prefix", "none"],
        );
        let mut found: Vec<&str> = tree
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|package| forbidden(package))
            .collect();
        found.sort_unstable();
        found.dedup();
        for package in found {
            // How it gets there, for the failure message.
            let path = run(
                &cargo,
                &["tree", "-p", library, "-e", "normal", "-i", package],
            );
            violations.push(format!("{library} links {package}:\n{path}"));
        }
    }
    assert!(
        violations.is_empty(),
        "library crates under services/ must not link the model runtime; depend on \
         patchport-core for formats and on patchport-telemetry for metrics instead:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_forbidden_names_are_the_model_runtime() {
    for name in [
        "candle-core",
        "candle-nn",
        "tokenizers",
        "gemm",
        "gemm-common",
    ] {
        assert!(forbidden(name), "{name}");
    }
    for name in [
        "patchport-core",
        "metrics",
        "tokio",
        "candlelight",
        "gemmology",
    ] {
        assert!(!forbidden(name), "{name}");
    }
}

#[test]
fn a_missing_cargo_is_reported_not_passed_over() {
    let why =
        find_cargo([PathBuf::from("/nonexistent/patchport/cargo")]).expect_err("no such cargo");
    assert!(why.contains("/nonexistent/patchport/cargo"), "{why}");
    assert!(why.contains("no runnable cargo"), "{why}");
}
