//! Every version and port is signed in the OpenSSF Model Signing format, and the real
//! `model_signing` CLI verifies what `patchport pull` writes: a real `patchport serve
//! --workers 1` (its embedded signing key generated on first start), llama-micro v1 and
//! lora-qv pushed, v2 published (the port fanned out and done by the in-process worker),
//! the port and the patch pulled with their `model.sig` (and the port's
//! `provenance.json`). Flipping one byte of any file, or a statement signed by another
//! key, fails both `model_signing` and `patchport verify`. The `model_signing` part is
//! skipped (with the reason printed) when its venv cannot be made
//! (`scripts/model-signing.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use patchport_signing::{FileDigest, SigningKey, sign_model};
use patchport_tests::fixtures;
use patchport_tests::process::{Serve, cli, path_arg as s};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

/// The real `model_signing` executable, or why there is none.
fn model_signing() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/model-signing.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `model_signing verify key DIR --signature DIR/model.sig --public_key KEY
/// --ignore-paths DIR/model.sig`: (success, output).
fn ms_verify(bin: &Path, dir: &Path, key: &Path) -> (bool, String) {
    let sig = dir.join("model.sig");
    let out = Command::new(bin)
        .args(["verify", "key"])
        .arg(dir)
        .arg("--signature")
        .arg(&sig)
        .arg("--public_key")
        .arg(key)
        .arg("--ignore-paths")
        .arg(&sig)
        .output()
        .expect("run model_signing");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// A copy of `dir` with one byte of `file` flipped.
fn flipped(dir: &Path, file: &str, to: &Path) -> PathBuf {
    copy_dir(dir, to);
    let path = to.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    to.to_path_buf()
}

#[test]
fn pulled_ports_and_patches_verify_with_model_signing_and_tampering_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let server = Serve::builder(BIN).workers(1).start();
    let url = server.url();
    let run = |args: &[String]| cli(BIN, &url).args(args).ok();
    let f = fixtures().join("llama-micro");
    let push = |kind: &str, dir: PathBuf, name: &str, version: &str, extra: &[&str]| {
        let mut args = vec![
            kind.to_owned(),
            "push".to_owned(),
            s(dir),
            "--name".to_owned(),
            name.to_owned(),
            "--version".to_owned(),
            version.to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        run(&args);
    };
    push("base", f.join("v1"), "acme/llama", "v1", &[]);
    push(
        "patch",
        f.join("patches/lora-qv"),
        "acme/qv",
        "1",
        &["--base", "acme/llama:v1"],
    );
    push(
        "base",
        f.join("v2"),
        "acme/llama",
        "v2",
        &["--parent", "v1"],
    );
    // The fan-out queued the port; --wait returns once the worker completed it.
    cli(BIN, &url)
        .args(["request", "acme/qv:1", "--base", "acme/llama:v2", "--wait"])
        .ok();

    let key = t.join("registry.pem");
    std::fs::write(&key, cli(BIN, &url).arg("signing-key").ok()).unwrap();
    let pull = |reference: &str, out: &Path, merged: bool| {
        let mut c = cli(BIN, &url).args(["pull", reference, "--out"]).arg(out);
        if merged {
            c = c.arg("--merged");
        }
        c.ok()
    };
    let port = t.join("port");
    let merged = t.join("merged");
    let patch = t.join("patch");
    let base = t.join("base");
    let said = pull("acme/qv:1@acme/llama:v2", &port, false);
    assert!(
        said.contains("wrote model.sig and provenance.json"),
        "{said}"
    );
    pull("acme/qv:1@acme/llama:v2", &merged, true);
    let said = pull("acme/qv:1", &patch, false);
    assert!(said.contains("wrote model.sig (signed by key"), "{said}");
    assert!(!patch.join("provenance.json").exists());
    pull("acme/llama:v2", &base, false);

    // patchport verify: the signature over every file, and the port's provenance.
    let verify = |dir: &Path, key: &Path| {
        cli(BIN, &url)
            .args(["verify"])
            .arg(dir)
            .arg("--public-key")
            .arg(key)
    };
    for dir in [&port, &merged, &patch, &base] {
        verify(dir, &key).ok();
    }
    let v = verify(&port, &key).arg("--json").json();
    let p = &v["provenance"];
    assert_eq!(p["artifact"], "adapter");
    assert_eq!(p["port"], "acme/qv:1@acme/llama:v2");
    let inputs: Vec<String> = p["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}={}",
                i["name"].as_str().unwrap(),
                i["uri"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        inputs,
        [
            "patch=patchport:acme/qv:1",
            "old_base=patchport:acme/llama:v1",
            "new_base=patchport:acme/llama:v2"
        ]
    );
    assert_eq!(p["method"]["name"], "portllm");
    assert_eq!(p["worker"]["device"], "cpu");
    assert!(
        p["worker"]["id"].as_str().unwrap().contains("inproc"),
        "{p}"
    );
    assert!(p["diagnostics"]["risk"].is_number(), "{p}");
    let merged_v = verify(&merged, &key).arg("--json").json();
    assert_eq!(merged_v["provenance"]["artifact"], "merged");

    // Tampering: one byte of a weight file, of the config, of the provenance.
    let bad_weights = flipped(&port, "adapter_model.safetensors", &t.join("bad-weights"));
    let bad_config = flipped(&patch, "adapter_config.json", &t.join("bad-config"));
    let bad_provenance = flipped(&port, "provenance.json", &t.join("bad-provenance"));
    for dir in [&bad_weights, &bad_config, &bad_provenance] {
        let err = verify(dir, &key).fails();
        assert!(err.contains("does not match the files"), "{err}");
    }
    // Another key: not trusted; a statement re-signed by another key over the same files.
    let other = SigningKey::generate();
    let other_key = t.join("other.pem");
    std::fs::write(&other_key, other.public_key().pem()).unwrap();
    let err = verify(&port, &other_key).fails();
    assert!(err.contains("not among the trusted public keys"), "{err}");
    let forged = t.join("forged");
    copy_dir(&patch, &forged);
    let files: Vec<FileDigest> = std::fs::read_dir(&patch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "model.sig")
        .map(|name| {
            let bytes = std::fs::read(patch.join(&name)).unwrap();
            FileDigest::of(name, &bytes)
        })
        .collect();
    std::fs::write(
        forged.join("model.sig"),
        sign_model(&other, "acme/qv:1", &files).unwrap(),
    )
    .unwrap();
    verify(&forged, &other_key).ok();
    let err = verify(&forged, &key).fails();
    assert!(err.contains("not among the trusted public keys"), "{err}");
    // Rotation: trusting both keys (several in one file) accepts either signature.
    let both = t.join("both.pem");
    std::fs::write(
        &both,
        format!(
            "{}{}",
            std::fs::read_to_string(&key).unwrap(),
            other.public_key().pem()
        ),
    )
    .unwrap();
    verify(&forged, &both).ok();
    verify(&port, &both).ok();

    // resolve --require-signed: the registry signs, so the port resolves.
    let v2_digest = cli(BIN, &url)
        .args(["status", "acme/llama:v2", "--json"])
        .json()["version"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(BIN, &url)
        .args([
            "resolve",
            "acme/qv:1",
            "--base-digest",
            &v2_digest,
            "--require-signed",
        ])
        .ok();

    // The embedded key was generated beside the database (readable by its owner only) and
    // is kept across restarts; `signing-key --key` prints its public half offline.
    let db = server.database_url();
    let key_file =
        Path::new(db.strip_prefix("sqlite://").unwrap()).with_file_name("signing-key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    }
    let offline = cli(BIN, &url)
        .args(["signing-key", "--key"])
        .arg(&key_file)
        .ok();
    assert_eq!(offline, std::fs::read_to_string(&key).unwrap());
    let server = server.restart();
    let again = cli(BIN, server.url()).arg("signing-key").ok();
    assert_eq!(again, std::fs::read_to_string(&key).unwrap());

    // The real model_signing CLI.
    let ms = match model_signing() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("SKIPPED the model_signing part of this test: {why}");
            return;
        }
    };
    for dir in [&port, &merged, &patch, &base] {
        let (ok, out) = ms_verify(&ms, dir, &key);
        assert!(ok, "model_signing refused {}: {out}", dir.display());
    }
    for dir in [&bad_weights, &bad_config, &bad_provenance] {
        let (ok, out) = ms_verify(&ms, dir, &key);
        assert!(
            !ok,
            "model_signing accepted a flipped byte in {}: {out}",
            dir.display()
        );
    }
    let (ok, out) = ms_verify(&ms, &port, &other_key);
    assert!(!ok, "model_signing accepted another key: {out}");
    let (ok, out) = ms_verify(&ms, &forged, &key);
    assert!(
        !ok,
        "model_signing accepted a statement signed by another key: {out}"
    );
    let (ok, out) = ms_verify(&ms, &forged, &other_key);
    assert!(
        ok,
        "the forged statement is well-formed for its own key: {out}"
    );
    eprintln!(
        "model_signing ({}) verified the pulled port, merged model, patch and base, and refused 5 tampered or foreign signatures",
        ms.display()
    );
}
