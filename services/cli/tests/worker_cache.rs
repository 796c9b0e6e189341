//! The worker's tensor cache across real processes: a `patchport worker` reads each base
//! tensor from the registry once whatever the number of patches it ports onto that base
//! (the registry's `patchport_pull_bytes_total` says what it served), a worker killed in
//! the middle of a fill leaves nothing servable behind, a cache that cannot store its
//! fills costs reads but no port, and the cache keeps its bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchport_core::Digest;
use patchport_tests::fixtures;
use patchport_tests::process::{
    Proc, Serve, Server, Worker, cli, http_get, metric_sum, path_arg as s, wait_port_completed,
};

const BIN: &str = env!("CARGO_BIN_EXE_patchport");

fn ok(url: &str, args: &[&str]) {
    cli(BIN, url).args(args).ok();
}

/// v1, the fixture LoRA on it as `acme/qv:1`, and v2 with `--parent v1` (one port job).
fn publish_lineage(url: &str) {
    patchport_tests::process::publish_lineage(BIN, url);
}

fn push_patch(url: &str, dir: &Path, name: &str) {
    ok(
        url,
        &[
            "patch",
            "push",
            &s(dir),
            "--name",
            name,
            "--version",
            "1",
            "--base",
            "acme/llama:v1",
        ],
    );
}

/// The fixture LoRA with its last element changed: a distinct patch with the same shape.
/// Returns its directory and the bytes of the files a port reads.
fn variant(dir: &Path) -> (PathBuf, u64) {
    let src = fixtures().join("llama-micro/patches/lora-qv");
    let out = dir.join("variant");
    std::fs::create_dir_all(&out).unwrap();
    let mut st = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let n = st.len();
    st[n - 4..].copy_from_slice(&0.125f32.to_le_bytes());
    std::fs::write(out.join("adapter_model.safetensors"), &st).unwrap();
    let config = std::fs::read(src.join("adapter_config.json")).unwrap();
    std::fs::write(out.join("adapter_config.json"), &config).unwrap();
    (out, (st.len() + config.len()) as u64)
}

/// A registry without in-process workers whose metrics say what it served.
fn metered_server() -> Server {
    Serve::builder(BIN)
        .workers(0)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
}

fn pulled(server: &Server) -> u64 {
    let (status, body) = http_get(server.metrics_addr().expect("metrics"), "/metrics");
    assert_eq!(status, 200, "{body}");
    metric_sum(&body, "patchport_pull_bytes_total") as u64
}

/// The filled entries of a cache directory: (digest named, path).
fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .filter(|(n, _)| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every filled entry holds the bytes its name says.
fn assert_verified(dir: &Path) {
    for (name, path) in entries(dir) {
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(Digest::of(&bytes).hex(), name, "{}", path.display());
    }
}

fn worker(url: &str, cache: &Path, extra: &[&str]) -> patchport_tests::process::WorkerBuilder {
    Worker::builder(BIN, url)
        .id("cache-test")
        .args(["--no-eval", "--cache-dir", &s(cache)])
        .args(extra)
}

#[test]
fn a_second_port_on_the_same_bases_reads_no_base_bytes() {
    let server = metered_server();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (_watch, rx): (Proc, _) = patchport_tests::process::watch(BIN, &url, "origin");
    publish_lineage(&url);
    let _worker = worker(&url, &cache, &[]).start();
    let mut seen = 0;
    wait_port_completed(&rx, &mut seen, 1);
    let first = pulled(&server);
    let held = entries(&cache.join("tensors"));
    assert!(!held.is_empty(), "the first port filled the cache");
    assert_verified(&cache.join("tensors"));

    // A second patch on v1 is caught up onto v2 by the same worker: the registry serves
    // it the patch's files and nothing of either base.
    let (dir, patch_bytes) = variant(tmp.path());
    push_patch(&url, &dir, "acme/qv2");
    wait_port_completed(&rx, &mut seen, 2);
    let second = pulled(&server) - first;
    assert_eq!(
        second, patch_bytes,
        "the second port read {second} bytes; its patch files are {patch_bytes} (first port: {first})"
    );
    assert_eq!(entries(&cache.join("tensors")).len(), held.len());
}

#[test]
fn a_worker_killed_mid_fill_leaves_no_servable_entry() {
    let server = Serve::builder(BIN).workers(0).lease_seconds(2).start();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let hook = tmp.path().join("filling");
    let (_watch, rx): (Proc, _) = patchport_tests::process::watch(BIN, &url, "origin");
    publish_lineage(&url);
    let mut stalled = worker(&url, &cache, &[])
        .env("PATCHPORT_TEST_CACHE_FILL_STALL", &hook)
        .start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !hook.exists() {
        assert!(Instant::now() < deadline, "no fill reached its rename");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Written and synced, not yet renamed: killed here.
    let partial = PathBuf::from(std::fs::read_to_string(&hook).unwrap());
    stalled.kill();
    assert!(partial.exists(), "{}", partial.display());
    assert!(
        entries(&cache.join("tensors")).is_empty(),
        "an unfinished fill is never an entry"
    );

    // The next worker on the same cache removes the leftover and ports the job (after
    // the dead worker's lease expires).
    let _worker = worker(&url, &cache, &[]).start();
    let mut seen = 0;
    wait_port_completed(&rx, &mut seen, 1);
    assert!(!partial.exists(), "the leftover fill was removed");
    assert!(!entries(&cache.join("tensors")).is_empty());
    assert_verified(&cache.join("tensors"));
}

#[test]
fn the_cache_stays_within_its_bound() {
    let server = Serve::builder(BIN).workers(0).start();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (_watch, rx): (Proc, _) = patchport_tests::process::watch(BIN, &url, "origin");
    publish_lineage(&url);
    // The port reads 8 tensors of 16 KiB (q and v of two layers, in both bases); the
    // bound holds two.
    let bound = 40_000u64;
    let _worker = worker(&url, &cache, &["--cache-bytes", &bound.to_string()]).start();
    let mut seen = 0;
    wait_port_completed(&rx, &mut seen, 1);
    let (dir, _) = variant(tmp.path());
    push_patch(&url, &dir, "acme/qv2");
    wait_port_completed(&rx, &mut seen, 2);
    let held = entries(&cache.join("tensors"));
    let total: u64 = held
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(!held.is_empty());
    assert!(total <= bound, "{total} bytes cached, bound {bound}");
    assert_verified(&cache.join("tensors"));
}

#[test]
fn a_worker_whose_cache_cannot_store_still_ports() {
    let server = metered_server();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let (_watch, rx): (Proc, _) = patchport_tests::process::watch(BIN, &url, "origin");
    publish_lineage(&url);
    let mut seen = 0;
    let filled = tmp.path().join("filled");
    {
        let _worker = worker(&url, &filled, &[]).start();
        wait_port_completed(&rx, &mut seen, 1);
    }
    let names: Vec<String> = entries(&filled.join("tensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!names.is_empty());

    // A cache where every entry the next port fills is taken by a directory: no fill
    // can be stored (as on a full disk).
    let blocked = tmp.path().join("blocked");
    for n in &names {
        let d = blocked.join("tensors").join(n);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("in-the-way"), b"x").unwrap();
    }
    let before = pulled(&server);
    let (dir, patch_bytes) = variant(tmp.path());
    push_patch(&url, &dir, "acme/qv2");
    let _worker = worker(&url, &blocked, &[]).start();
    wait_port_completed(&rx, &mut seen, 2);
    let read = pulled(&server) - before;
    assert!(
        read > patch_bytes,
        "the port read the base tensors it could not cache ({read} bytes)"
    );
    let leftovers: Vec<_> = std::fs::read_dir(blocked.join("tensors"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".fill-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "failed fills are removed: {leftovers:?}"
    );
}
