//! Nothing computed twice (issue #15): a patch ported onto v2 and then onto a v3 whose
//! target tensors are mostly byte-identical to v2's. The v3 port reuses the v2 port's
//! merged tensors for those (the same blobs, not read, merged or uploaded again), computes
//! only the changed one, and is still byte for byte and number for number the port an
//! offline `patchport port --merged` makes. And two patches with the same targets
//! ported onto one base: the second merged file's shared beginning is not hashed again.
//! A real `patchport serve` with its in-process worker (the production loop), on SQLite
//! and on Postgres.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use patchport_proto::v1;
use patchport_tests::process::{
    Database, Proc, Serve, Server, assert_pulled_merged_is_offline, block_on, cli, http_get,
    metric_sum, path_arg as s, wait_port_completed,
};
use patchport_tests::{copy_dir, fixtures};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

/// The target tensor v3 changes; the patch's three other targets stay as in v2.
const CHANGED: &str = "model.layers.1.self_attn.q_proj.weight";
/// lora-qv's targets on llama-micro: q_proj and v_proj of two layers.
const TARGETS: usize = 4;

fn ok(url: &str, args: &[&str]) -> String {
    cli(BIN, url).args(args).ok()
}

fn metric(server: &Server, name: &str) -> u64 {
    let (status, body) = http_get(server.metrics_addr().expect("metrics"), "/metrics");
    assert_eq!(status, 200, "{body}");
    metric_sum(&body, name) as u64
}

/// llama-micro v2 with the first byte of `tensor`'s data flipped in its lowest bit (the
/// lowest mantissa bits of its first element): the other tensors are byte-identical.
fn v2_with_changed(dir: &Path, tensor: &str) -> PathBuf {
    let out = dir.join("v3");
    copy_dir(&fixtures().join("llama-micro/v2"), &out).expect("copy v2");
    let path = out.join("model.safetensors");
    let mut st = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(st[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).expect("header");
    let begin = header[tensor]["data_offsets"][0].as_u64().expect("offsets") as usize;
    st[8 + n + begin] ^= 1;
    std::fs::write(&path, &st).expect("write");
    out
}

fn get_port(url: &str, reference: &str) -> v1::Port {
    block_on(async {
        let mut ports = v1::port_service_client::PortServiceClient::connect(url.to_owned())
            .await
            .expect("connect");
        ports
            .get_port(v1::GetPortRequest {
                reference: reference.to_owned(),
            })
            .await
            .expect("get port")
            .into_inner()
    })
}

/// The merged tensors' blobs of a port's `model.safetensors`: every segment after the
/// header that starts a blob other than the base file's.
fn merged_blobs(port: &v1::Port, base_blob: &str) -> BTreeSet<String> {
    merged_segments(port, base_blob)
        .map(|b| b.digest.clone())
        .collect()
}

fn merged_segments<'a>(
    port: &'a v1::Port,
    base_blob: &'a str,
) -> impl Iterator<Item = &'a v1::BlobRange> {
    let file = port
        .merged_files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .expect("a merged model.safetensors");
    file.segments
        .iter()
        .skip(1)
        .filter_map(move |seg| match &seg.source {
            Some(v1::segment::Source::Blob(b)) if b.offset == 0 && b.digest != base_blob => Some(b),
            _ => None,
        })
}

/// The bytes of the merged tensors' segments of a port's `model.safetensors` (as
/// [`merged_blobs`] finds them).
fn merged_blobs_sizes(port: &v1::Port, base_blob: &str) -> u64 {
    merged_segments(port, base_blob).map(|b| b.length).sum()
}

/// The blob of a base version's `model.safetensors`.
fn base_blob(url: &str, reference: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ok(url, &["status", reference, "--json"])).expect("json");
    v["version"]["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .and_then(|f| f["digest"].as_str())
        .expect("model.safetensors")
        .to_owned()
}

/// The numbers of one module's diagnostics, as the offline report and the wire give them.
fn numbers(d: &serde_json::Value) -> [f64; 4] {
    ["base_drift", "patch_size", "drift_to_patch", "cosine"].map(|k| d[k].as_f64().expect(k))
}

fn wire_numbers(d: &v1::ModuleDiagnostics) -> [f64; 4] {
    [d.base_drift, d.patch_size, d.drift_to_patch, d.cosine]
}

/// A registry with one in-process worker and metrics on `database`, acme/qv:1 ported
/// onto acme/llama:v2 (`publish_lineage`), and a `watch` of its events that has seen that
/// port complete.
fn lineage_ported(database: &Database) -> (Server, Proc, mpsc::Receiver<serde_json::Value>) {
    let server = Serve::builder(BIN)
        .workers(1)
        .database(database.url())
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let url = server.url();
    let (watch, rx) = patchport_tests::process::watch(BIN, &url, "origin");
    patchport_tests::process::publish_lineage(BIN, &url);
    wait_port_completed(&rx, &mut 0, 1);
    (server, watch, rx)
}

fn scenario(database: &Database) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, _watch, rx) = lineage_ported(database);
    let url = server.url();
    let mut seen = 1;
    assert_eq!(
        metric(&server, patchport_telemetry::WORKER_TENSORS_MERGED),
        TARGETS as u64
    );
    assert_eq!(
        metric(&server, patchport_telemetry::WORKER_TENSORS_REUSED),
        0
    );
    // The registry timed the port from its lease to its completion.
    let port_durations = format!("{}_count", patchport_telemetry::PORT_DURATION);
    assert_eq!(metric(&server, &port_durations), 1);

    // v3: v2 with one target tensor changed; publishing it ports acme/qv:1 onto it.
    let v3 = v2_with_changed(tmp.path(), CHANGED);
    ok(
        &url,
        &[
            "base",
            "push",
            &s(&v3),
            "--name",
            "acme/llama",
            "--version",
            "v3",
            "--parent",
            "v2",
        ],
    );
    wait_port_completed(&rx, &mut seen, 2);

    // The worker computed and stored the changed tensor only.
    assert_eq!(
        metric(&server, patchport_telemetry::WORKER_TENSORS_MERGED),
        TARGETS as u64 + 1,
        "the v3 port computed more than the changed tensor"
    );
    assert_eq!(
        metric(&server, patchport_telemetry::WORKER_TENSORS_REUSED),
        TARGETS as u64 - 1
    );
    assert_eq!(metric(&server, &port_durations), 2);

    // The reused tensors are the v2 port's blobs; the changed one is new.
    let p2 = get_port(&url, "acme/qv:1@acme/llama:v2");
    let p3 = get_port(&url, "acme/qv:1@acme/llama:v3");
    let b2 = merged_blobs(&p2, &base_blob(&url, "acme/llama:v2"));
    let b3 = merged_blobs(&p3, &base_blob(&url, "acme/llama:v3"));
    assert_eq!(b2.len(), TARGETS, "{b2:?}");
    assert_eq!(b3.len(), TARGETS, "{b3:?}");
    assert_eq!(b3.intersection(&b2).count(), TARGETS - 1);

    // The merged model pulled equals the offline port of the same pair, byte for byte.
    let f = fixtures().join("llama-micro");
    let report = assert_pulled_merged_is_offline(
        BIN,
        &url,
        "acme/qv:1@acme/llama:v3",
        (&f.join("v1"), &v3, &f.join("patches/lora-qv")),
        tmp.path(),
        &["model.safetensors", "config.json"],
    );

    // Fidelity: the diagnostics (the reused modules' included) and the total, hence the
    // risk, are the offline port's numbers exactly.
    let d3 = p3.diagnostics.as_ref().expect("diagnostics");
    let modules = report["diagnostics"]["modules"]
        .as_array()
        .expect("modules");
    assert_eq!(d3.modules.len(), modules.len());
    for (wire, offline) in d3.modules.iter().zip(modules) {
        assert_eq!(wire.module, offline["module"].as_str().expect("module"));
        assert_eq!(wire_numbers(wire), numbers(offline), "{}", wire.module);
        assert_eq!(
            wire.unchanged,
            offline["unchanged"].as_bool().expect("unchanged")
        );
    }
    let total = d3.total.as_ref().expect("total");
    assert_eq!(
        wire_numbers(total),
        numbers(&report["diagnostics"]["total"])
    );
    assert_eq!(d3.risk, report["risk"].as_f64().expect("risk"));
}

#[test]
fn a_port_onto_v3_reuses_the_v2_ports_merged_tensors_on_sqlite() {
    scenario(&Database::sqlite());
}

#[test]
fn a_port_onto_v3_reuses_the_v2_ports_merged_tensors_on_postgres() {
    if let Some(db) = Database::postgres("postgres variant") {
        scenario(&db);
    }
}

/// Two distinct patches with the same targets ported onto v2: their merged
/// `model.safetensors` files begin alike (the header, then v2's untouched tensors; the
/// merged tensors come last). The worker says how the first begins once it has planned
/// the port (PrepareComposed) and the registry hashes that beginning meanwhile, so
/// CompleteJob of the first reads and hashes only its merged tensors, and so does the
/// second's, from the same SHA-256 state. The digests they record are still those of
/// every byte: the pulls check them, and the files are the offline port's.
#[test]
fn a_second_patch_on_a_base_hashes_only_its_merged_tensors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, _watch, rx) = lineage_ported(&Database::sqlite());
    let url = server.url();
    let mut seen = 1;
    let hashed = |server: &Server| metric(server, patchport_telemetry::COMPOSED_BYTES_HASHED);
    let kept = |server: &Server| metric(server, patchport_telemetry::COMPOSED_BYTES_KEPT);
    let size = |port: &v1::Port| {
        port.merged_files
            .iter()
            .find(|f| f.path == "model.safetensors")
            .expect("a merged model.safetensors")
            .size
    };
    let first = get_port(&url, "acme/qv:1@acme/llama:v2");
    let first_merged = merged_blobs_sizes(&first, &base_blob(&url, "acme/llama:v2"));
    assert!(first_merged > 0);
    assert_eq!(
        (hashed(&server), kept(&server)),
        (first_merged, size(&first) - first_merged),
        "the first file: its beginning hashed ahead, its merged tensors at CompleteJob"
    );

    // The same patch with another alpha: other merged tensors, the same targets.
    let qv2 = tmp.path().join("qv2");
    copy_dir(&fixtures().join("llama-micro/patches/lora-qv"), &qv2).expect("copy");
    let config_path = qv2.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read")).expect("json");
    config["lora_alpha"] = serde_json::json!(config["lora_alpha"].as_f64().expect("alpha") * 2.0);
    std::fs::write(&config_path, config.to_string()).expect("write");
    ok(
        &url,
        &[
            "patch",
            "push",
            &s(&qv2),
            "--name",
            "acme/qv2",
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
    wait_port_completed(&rx, &mut seen, 2);

    let second = get_port(&url, "acme/qv2:1@acme/llama:v2");
    let merged_bytes: u64 = merged_blobs_sizes(&second, &base_blob(&url, "acme/llama:v2"));
    assert!(merged_bytes > 0);
    assert_eq!(
        hashed(&server) - first_merged,
        merged_bytes,
        "the second file: only its merged tensors read and hashed"
    );
    assert_eq!(
        kept(&server),
        size(&first) - first_merged + size(&second) - merged_bytes
    );

    let f = fixtures().join("llama-micro");
    for (port, patch) in [
        ("acme/qv:1@acme/llama:v2", f.join("patches/lora-qv")),
        ("acme/qv2:1@acme/llama:v2", qv2.clone()),
    ] {
        let out = tmp.path().join(port.replace([':', '@', '/'], "_"));
        std::fs::create_dir_all(&out).expect("dir");
        assert_pulled_merged_is_offline(
            BIN,
            &url,
            port,
            (&f.join("v1"), &f.join("v2"), &patch),
            &out,
            &["model.safetensors"],
        );
    }
}
