//! The hostile-client probes of issue #14 as a bench: starts `patchport serve` (the binary
//! given, so that a build from before the fix and one from after can be measured side by
//! side) and reports the registry process's RSS and the times a user would see:
//!
//! - `tokens`: N requests, each with a distinct well-formed but invalid token (every one
//!   must be UNAUTHENTICATED); the RSS growth.
//! - `uploads`: S upload streams that each send 15 MiB and stall; the RSS while they
//!   stall (`PATCHPORT_MAX_UPLOAD_STREAMS` is raised to S so all of them are served,
//!   unless `--upload-cap` says otherwise).
//! - `subscribe`: 2,000 Subscribe streams from one caller: how many the registry held.
//! - `patterns`: a patch whose adapter config has 400 keys like `k1x\w{60}` (refused
//!   after the fix), and one at the limit (256 realistic keys): the time `list patches`
//!   takes.
//!
//! Run:
//!
//!   cargo run -p patchport-tests --example hostile -- --bin target/debug/patchport \
//!       [--tokens 200000] [--uploads 40] [--only tokens,uploads,subscribe,patterns]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use patchport_client::{Client, NoProgress};
use patchport_core::Digest;
use patchport_proto::v1;
use patchport_tests::process::{Serve, Server};
use patchport_tests::{base, fixtures, patch};

/// Hostile-client probes against one `patchport serve` binary.
#[derive(Parser, Debug)]
struct Args {
    /// The `patchport` binary to start.
    #[arg(long)]
    bin: PathBuf,
    /// Requests with distinct invalid tokens.
    #[arg(long, default_value_t = 200_000)]
    tokens: usize,
    /// Stalled upload streams.
    #[arg(long, default_value_t = 40)]
    uploads: usize,
    /// `PATCHPORT_MAX_UPLOAD_STREAMS` for the registry (default: as many as `--uploads`,
    /// so every stream is served; 16 is the registry's default).
    #[arg(long)]
    upload_cap: Option<usize>,
    /// Subscribe streams.
    #[arg(long, default_value_t = 2_000)]
    subscriptions: usize,
    /// Comma-separated probes to run (default: all).
    #[arg(long, default_value = "tokens,uploads,subscribe,patterns")]
    only: String,
}

const ADMIN: &str = "admin-secret-for-the-hostile-bench-0123";

/// Resident set size of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn serve(args: &Args, auth: bool) -> Server {
    let mut b = Serve::builder(&args.bin).workers(0).env(
        "PATCHPORT_MAX_UPLOAD_STREAMS",
        args.upload_cap.unwrap_or(args.uploads).to_string(),
    );
    if auth {
        b = b.env("PATCHPORT_ADMIN_TOKEN", ADMIN);
    }
    b.start()
}

async fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await?)
}

async fn tokens(args: &Args) -> anyhow::Result<()> {
    let server = serve(args, true);
    let pid = server.id();
    let ch = channel(&server.url()).await?;
    // Warm up: the first requests allocate what every later one reuses.
    let warm = |i: usize| {
        let ch = ch.clone();
        async move {
            let mut c = v1::registry_service_client::RegistryServiceClient::new(ch);
            let mut req = tonic::Request::new(v1::ListRequest::default());
            let token = format!("pp_{i:016x}_{}", "ab".repeat(32));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.list_base_versions(req).await.err().map(|s| s.code())
        }
    };
    use futures::StreamExt as _;
    let warmup: Vec<_> = futures::stream::iter(0..2_000)
        .map(warm)
        .buffer_unordered(64)
        .collect()
        .await;
    drop(warmup);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_mib(pid);
    let started = Instant::now();
    let codes: Vec<_> = futures::stream::iter(2_000..2_000 + args.tokens)
        .map(warm)
        .buffer_unordered(64)
        .collect()
        .await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = rss_mib(pid);
    let unauthenticated = codes
        .iter()
        .filter(|c| **c == Some(tonic::Code::Unauthenticated))
        .count();
    println!(
        "tokens: {} requests with distinct invalid tokens in {:.1} s: {unauthenticated} UNAUTHENTICATED; registry RSS {before:.1} -> {after:.1} MiB (+{:.1} MiB)",
        args.tokens,
        elapsed.as_secs_f64(),
        after - before
    );
    Ok(())
}

async fn uploads(args: &Args) -> anyhow::Result<()> {
    let server = serve(args, false);
    let pid = server.id();
    let client = Client::connect(&server.url()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_mib(pid);
    const SENT: usize = 15 << 20;
    const CHUNK: usize = 4 << 20;
    let mut held = Vec::new();
    for i in 0..args.uploads {
        // Each stream uploads a blob of its own, 32 MiB declared, 15 MiB sent.
        let declared = 32u64 << 20;
        let digest = Digest::of(format!("hostile upload {i}").as_bytes());
        let start = client
            .blobs()
            .start_upload(v1::StartUploadRequest {
                digest: digest.to_string(),
                size: declared,
            })
            .await?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut blobs = client.blobs();
        let call = tokio::spawn(async move {
            blobs
                .upload_chunks(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        let data = Bytes::from(vec![(i % 251) as u8; CHUNK]);
        let mut offset = 0;
        while offset < SENT {
            let n = CHUNK.min(SENT - offset);
            tx.send(v1::UploadChunk {
                upload_id: start.upload_id.clone(),
                offset: offset as u64,
                data: data.slice(..n),
            })
            .await?;
            offset += n;
        }
        held.push((tx, call));
    }
    // Let every stream's bytes reach the registry, then stall.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled = rss_mib(pid);
    let ended = held.iter().filter(|(_, call)| call.is_finished()).count();
    println!(
        "uploads: {} streams x 15 MiB sent, then stalled: registry RSS {before:.1} -> {stalled:.1} MiB (+{:.1} MiB); {ended} streams already ended",
        args.uploads,
        stalled - before
    );
    drop(held);
    Ok(())
}

async fn subscribe(args: &Args) -> anyhow::Result<()> {
    let server = serve(args, false);
    let pid = server.id();
    let ch = channel(&server.url()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_mib(pid);
    let mut open = Vec::new();
    let mut refused = 0;
    let mut first_refusal = None;
    for _ in 0..args.subscriptions {
        let mut c = v1::event_service_client::EventServiceClient::new(ch.clone());
        match c
            .subscribe(v1::SubscribeRequest {
                cursor: "0".into(),
                ..Default::default()
            })
            .await
        {
            Ok(s) => open.push(s),
            Err(e) => {
                refused += 1;
                first_refusal.get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_mib(pid);
    println!(
        "subscribe: {} Subscribe streams from one caller: {} held, {refused} refused ({}); registry RSS {before:.1} -> {after:.1} MiB",
        args.subscriptions,
        open.len(),
        first_refusal.unwrap_or_else(|| "none".into())
    );
    Ok(())
}

/// A copy of the lora-qv fixture with `n` rank_pattern keys made by `key`.
fn adapter(n: usize, key: impl Fn(usize) -> String) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    patchport_tests::copy_dir(&fixtures().join("llama-micro/patches/lora-qv"), dir.path())?;
    let path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["rank_pattern"] =
        serde_json::Value::Object((0..n).map(|i| (key(i), serde_json::json!(4))).collect());
    std::fs::write(&path, serde_json::to_vec(&config)?)?;
    Ok(dir)
}

async fn list_time(client: &Client) -> String {
    let started = Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(300),
        client
            .registry()
            .list_patch_versions(v1::ListRequest::default()),
    )
    .await
    {
        Ok(Ok(r)) => format!(
            "{:.3} s ({} versions)",
            started.elapsed().as_secs_f64(),
            r.into_inner().versions.len()
        ),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "no answer within 300 s".to_owned(),
    }
}

async fn patterns(args: &Args) -> anyhow::Result<()> {
    let server = serve(args, false);
    let client = Client::connect(&server.url()).await?;
    client
        .push_dir(
            &fixtures().join("llama-micro/v1"),
            &base("acme/llama", "v1", None),
            &NoProgress,
        )
        .await
        .context("pushing the base")?;
    let realistic = |i: usize| format!(r"model\.layers\.{}\.self_attn\.(q|k|v|o)_proj", i + 1000);
    for v in 0..8 {
        let dir = adapter(256, realistic)?;
        client
            .push_dir(
                dir.path(),
                &patch("acme/at-limit", &format!("{v}"), "acme/llama:v1"),
                &NoProgress,
            )
            .await
            .context("pushing a patch at the limit")?;
    }
    println!(
        "patterns: list patches with 8 patch versions of 256 rank_pattern keys each: {}",
        list_time(&client).await
    );
    let hostile = adapter(400, |i| format!(r"k{i}x\w{{60}}"))?;
    let started = Instant::now();
    let pushed = client
        .push_dir(
            hostile.path(),
            &patch("acme/hostile", "1", "acme/llama:v1"),
            &NoProgress,
        )
        .await;
    match pushed {
        Ok(_) => println!(
            "patterns: the hostile patch (400 keys like k1x\\w{{60}}) was ACCEPTED in {:.1} s; list patches now takes {}",
            started.elapsed().as_secs_f64(),
            list_time(&client).await
        ),
        Err(e) => println!(
            "patterns: the hostile patch was refused in {:.2} s: {e}",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("binary: {}", args.bin.display());
    for probe in args.only.split(',') {
        match probe.trim() {
            "tokens" => tokens(&args).await?,
            "uploads" => uploads(&args).await?,
            "subscribe" => subscribe(&args).await?,
            "patterns" => patterns(&args).await?,
            "" => {}
            other => anyhow::bail!("unknown probe {other:?}"),
        }
    }
    Ok(())
}
