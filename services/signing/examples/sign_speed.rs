//! The cost of signing a port from digests the registry already holds, next to what
//! re-reading its bytes would cost (a measurement, not a test).
//!
//!   cargo run --release -p patchport-signing --example sign_speed [-- DIR...]
//!
//! Without arguments it signs the manifests of the 1.4 GB port of `bench/port-vs-peft`
//! (the merged model: config.json, generation_config.json, one 1.4 GB model.safetensors;
//! the adapter: adapter_config.json, adapter_model.safetensors) and of larger synthetic
//! manifests (100, 1,000 and 10,000 files). Each DIR given is hashed once (what signing
//! from stored digests avoids) and then signed from those digests.

use std::io::Read as _;
use std::time::Instant;

use patchport_signing::{
    FileDigest, Method, PROVENANCE_FILE, PortProvenance, SigningKey, WorkerInfo, sign_model,
    sign_provenance,
};
use sha2::{Digest as _, Sha256};

/// Signs what the registry signs for one port artifact: the provenance over the files,
/// then model.sig over the files and provenance.json.
fn sign_port(key: &SigningKey, files: &[FileDigest]) -> usize {
    let predicate = PortProvenance {
        artifact: "merged".to_owned(),
        port: "acme/qv:1@acme/llama:v2".to_owned(),
        inputs: Vec::new(),
        method: Method {
            name: "portllm".to_owned(),
            version: "1".to_owned(),
        },
        worker: WorkerInfo {
            id: "bench".to_owned(),
            device: "cpu".to_owned(),
        },
        diagnostics: serde_json::json!({"risk": 0.25}),
        evaluation: None,
        verdict: None,
        finished_at: None,
    };
    let provenance = sign_provenance(key, files, &predicate).expect("sign provenance");
    let mut all = files.to_vec();
    all.push(FileDigest::of(PROVENANCE_FILE, provenance.as_bytes()));
    let sig = sign_model(key, "acme/qv:1@acme/llama:v2", &all).expect("sign model");
    provenance.len() + sig.len()
}

/// Mean microseconds per signing of `files`, over enough rounds for a stable number.
fn time(key: &SigningKey, label: &str, files: &[FileDigest]) {
    let rounds = (20_000 / files.len().max(1)).clamp(5, 2_000);
    sign_port(key, files); // warm-up
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        bytes = sign_port(key, files);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "{label:<44} {:>6} files  sign {:>10.1} µs  ({} bytes of model.sig + provenance.json, {rounds} rounds)",
        files.len(),
        us,
        bytes
    );
}

fn fake(path: &str, i: usize) -> FileDigest {
    FileDigest::of(path, &i.to_le_bytes())
}

fn hash_dir(dir: &std::path::Path) -> (Vec<FileDigest>, u64) {
    let mut out = Vec::new();
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let mut f = std::fs::File::open(&path).expect("open");
        let mut h = Sha256::new();
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        out.push(FileDigest::new(name, &hex::encode(h.finalize())).expect("digest"));
    }
    (out, total)
}

fn main() {
    let key = SigningKey::generate();
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        let merged: Vec<_> = ["config.json", "generation_config.json", "model.safetensors"]
            .iter()
            .enumerate()
            .map(|(i, p)| fake(p, i))
            .collect();
        let adapter: Vec<_> = ["adapter_config.json", "adapter_model.safetensors"]
            .iter()
            .enumerate()
            .map(|(i, p)| fake(p, i))
            .collect();
        time(&key, "1.4 GB port: merged model manifest", &merged);
        time(&key, "1.4 GB port: adapter manifest", &adapter);
        for n in [100, 1_000, 10_000] {
            let files: Vec<_> = (0..n)
                .map(|i| fake(&format!("shards/model-{i:05}.safetensors"), i))
                .collect();
            time(&key, &format!("synthetic manifest of {n} files"), &files);
        }
    }
    for dir in dirs {
        let start = Instant::now();
        let (files, bytes) = hash_dir(std::path::Path::new(&dir));
        let hashed = start.elapsed().as_secs_f64();
        println!(
            "{dir}: hashing {bytes} bytes took {hashed:.3} s ({:.0} MB/s): what re-reading would cost",
            bytes as f64 / hashed / 1e6
        );
        time(&key, &format!("{dir} from its digests"), &files);
    }
}
