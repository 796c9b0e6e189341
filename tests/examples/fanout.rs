//! Fan-out benchmark: N distinct tiny patches (llama-micro shape) on v1, publish v2, and
//! time from the publish call to the N-th `port.completed`, with W in-process workers (the
//! same gRPC loop as `patchport worker`). Also times the engine alone on one such port,
//! so the scheduling overhead per job can be read off.
//!
//!   cargo run --release -p patchport-tests --example fanout -- [N] [WORKERS] [DATABASE_URL] [CONCURRENCY]
//!
//! DATABASE_URL defaults to a fresh SQLite file (`sqlite` names it explicitly); for
//! Postgres give a server URL and a fresh database is created on it. CONCURRENCY (default
//! 1) is each worker's `--concurrency`.

use std::time::{Duration, Instant};

use patchport_client::NoProgress;
use patchport_proto::v1;
use patchport_registry::{Application, Config};
use patchport_tests::{base, fixtures, fresh_postgres_db};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var("PATCHPORT_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("PATCHPORT_LOG"))
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(1000), |s| s.parse())?;
    let workers: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let concurrency: usize = args.get(4).map_or(Ok(1), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let database = match args.get(3).map(String::as_str) {
        Some(url) if url.starts_with("postgres") => fresh_postgres_db(url).await?,
        None | Some("sqlite") => format!("sqlite://{}/registry.db", dir.path().display()),
        Some(url) => url.to_owned(),
    };
    let backend = if database.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    std::fs::create_dir_all(dir.path().join("blobs"))?;
    let app = Application::build(Config {
        listen: "127.0.0.1:0".parse()?,
        database,
        blobs: format!("file://{}/blobs", dir.path().display()),
        lease: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(30),
        ..Config::default()
    })
    .await?;
    let url = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until(std::future::pending()));
    let client = patchport_client::Client::connect(&url).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    for i in 0..workers {
        let client = client.clone();
        let stop = stop.clone();
        let cache_dir = dir.path().join(format!("cache-{i}"));
        tokio::spawn(async move {
            let mut config = patchport_worker::WorkerConfig::new(
                format!("bench-{i}"),
                patchport_engine::Device::Cpu,
            );
            config.cache_dir = cache_dir;
            config.concurrency = concurrency;
            let _ = patchport_worker::run(client, config, stop).await;
        });
    }

    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v1"), &base("bench/llama", "v1", None), &NoProgress)
        .await?;
    // N distinct adapters: the same LoRA with one element of its last tensor changed.
    let t_push = Instant::now();
    patchport_tests::push_distinct_patches(&client, "bench", n as u64, dir.path()).await?;
    let push_s = t_push.elapsed().as_secs_f64();

    let mut events = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: String::new(),
            types: vec!["port.completed".into()],
            subject: String::new(),
        })
        .await?
        .into_inner();
    let t0 = Instant::now();
    client
        .push_dir(
            &f.join("v2"),
            &base("bench/llama", "v2", Some("v1")),
            &NoProgress,
        )
        .await?;
    let publish_s = t0.elapsed().as_secs_f64();
    let mut done = 0;
    while done < n {
        let e = tokio::time::timeout(Duration::from_secs(600), events.message()).await??;
        if e.is_none() {
            anyhow::bail!("event stream ended after {done} completions");
        }
        done += 1;
    }
    let total = t0.elapsed().as_secs_f64();
    stop.cancel();

    // The engine alone on one such port (merged model included), for the overhead.
    let reps = 20;
    let out = tempfile::tempdir()?;
    let opts = patchport_engine::PortOptions {
        merged: true,
        ..Default::default()
    };
    let t = Instant::now();
    for _ in 0..reps {
        patchport_engine::port_dirs(
            &f.join("v1"),
            &f.join("v2"),
            &dir.path().join("p0"),
            out.path(),
            &opts,
        )?;
    }
    let engine = t.elapsed().as_secs_f64() / f64::from(reps);
    let per_job = total * workers as f64 / n as f64;
    println!(
        "backend {backend}, {n} patches, {workers} in-process workers (concurrency {concurrency}), {} cores",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!("pushing {n} patches: {push_s:.1} s");
    println!(
        "publish call (fan-out transaction included): {:.3} s",
        publish_s
    );
    println!(
        "publish -> {n}th port.completed: {total:.1} s ({:.1} ports/s)",
        n as f64 / total
    );
    println!(
        "worker time per job: {:.1} ms; engine alone (offline, merged): {:.1} ms; scheduling overhead per job: {:.1} ms",
        per_job * 1e3,
        engine * 1e3,
        (per_job - engine) * 1e3
    );
    Ok(())
}
