//! Load generator: many concurrent clients against one running registry for a fixed
//! time, pushing new patch versions, pulling them back (every byte compared with what
//! was pushed), querying compat, and holding `Subscribe` streams that must see one
//! `patch.pushed` event per push. Reports per operation the count, throughput, p50/p99
//! latency and errors (with the first messages), and the events lost; exits non-zero on
//! any error or lost event.
//!
//!   cargo run --release -p patchport-tests --example load -- \
//!       --registry http://127.0.0.1:PORT --clients 64 --seconds 60
//!
//! `bench/load/run.sh` starts `patchport serve` on a fresh Postgres database and runs
//! this against it. Everything is pushed under a fresh namespace, so a registry can be
//! loaded more than once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use patchport_client::{Client, NoProgress};
use patchport_core::{AnyRef, Reference};
use patchport_proto::v1;
use patchport_tests::{base, fixtures, patch, read_tree};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio_util::sync::CancellationToken;

/// Load a registry with concurrent pushes, pulls, compat queries and subscribers.
#[derive(Parser, Debug)]
struct Args {
    /// The registry to load (`http://host:port`).
    #[arg(long, env = "PATCHPORT_REGISTRY", default_value = patchport_client::DEFAULT_REGISTRY)]
    registry: String,
    /// Concurrent clients in all (each with its own connection), subscribers included.
    #[arg(long, env = "PATCHPORT_LOAD_CLIENTS", default_value_t = 64)]
    clients: usize,
    /// How many of the clients hold a `Subscribe` stream instead of sending requests.
    #[arg(long, env = "PATCHPORT_LOAD_SUBSCRIBERS", default_value_t = 8)]
    subscribers: usize,
    /// How long the load runs, in seconds.
    #[arg(long, env = "PATCHPORT_LOAD_SECONDS", default_value_t = 60)]
    seconds: u64,
    /// Relative weights of push, pull and compat among the request clients' operations.
    #[arg(long, env = "PATCHPORT_LOAD_MIX", default_value = "1:2:2")]
    mix: String,
    /// One compat query in this many asks about the base (every patch on it) instead of
    /// one patch.
    #[arg(long, env = "PATCHPORT_LOAD_BASE_COMPAT_EVERY", default_value_t = 16)]
    base_compat_every: u64,
    /// How long subscribers may take, after the load stops, to receive the last events.
    #[arg(long, env = "PATCHPORT_LOAD_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    /// Patch versions pushed before the clock starts, so pulls have something to read.
    #[arg(long, env = "PATCHPORT_LOAD_SEED_PATCHES", default_value_t = 16)]
    seed_patches: u64,
}

const OPS: [&str; 4] = ["push", "pull", "compat-patch", "compat-base"];

/// Latencies and errors of one operation.
#[derive(Debug)]
struct OpStats {
    latency_us: Histogram<u64>,
    errors: u64,
    first_errors: Vec<String>,
}

impl OpStats {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
            errors: 0,
            first_errors: Vec::new(),
        }
    }

    fn record(&mut self, started: Instant, result: anyhow::Result<()>) {
        match result {
            Ok(()) => {
                let us = started.elapsed().as_micros().max(1) as u64;
                self.latency_us.saturating_record(us);
            }
            Err(e) => {
                self.errors += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(format!("{e:#}"));
                }
            }
        }
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms with the same bounds");
        self.errors += other.errors;
        for e in &other.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e.clone());
            }
        }
    }
}

/// What every client shares.
#[derive(Debug)]
struct Shared {
    namespace: String,
    base_ref: String,
    adapter: Vec<u8>,
    adapter_config: Vec<u8>,
    scratch: PathBuf,
    next_key: AtomicU64,
    /// Pushed patch references and the key their bytes derive from.
    pushed: Mutex<Vec<(String, u64)>>,
    /// When each push started, for the push-to-event delay.
    push_started: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    /// The adapter weights of patch `key`: the fixture with its last element changed.
    fn adapter_bytes(&self, key: u64) -> Vec<u8> {
        patchport_tests::distinct_adapter(&self.adapter, key)
    }

    fn patch_ref(&self, key: u64) -> (String, String, String) {
        let name = format!("{}/adapter-{}", self.namespace, key % 16);
        let version = key.to_string();
        let reference = format!("{name}:{version}");
        (name, version, reference)
    }

    async fn push(&self, client: &Client) -> anyhow::Result<()> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (name, version, reference) = self.patch_ref(key);
        let dir = self.scratch.join(format!("push-{key}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            self.adapter_bytes(key),
        )?;
        std::fs::write(dir.join("adapter_config.json"), &self.adapter_config)?;
        self.push_started
            .lock()
            .expect("unpoisoned")
            .insert(reference.clone(), Instant::now());
        let outcome = client
            .push_dir(&dir, &patch(&name, &version, &self.base_ref), &NoProgress)
            .await
            .with_context(|| format!("push {reference}"));
        let _ = std::fs::remove_dir_all(&dir);
        if !outcome?.created {
            anyhow::bail!("push {reference}: the registry says it already existed");
        }
        self.pushed
            .lock()
            .expect("unpoisoned")
            .push((reference, key));
        Ok(())
    }

    fn pick(&self, rng: &mut StdRng) -> Option<(String, u64)> {
        let pushed = self.pushed.lock().expect("unpoisoned");
        (!pushed.is_empty()).then(|| pushed[rng.random_range(0..pushed.len())].clone())
    }

    async fn pull(&self, client: &Client, rng: &mut StdRng, n: u64) -> anyhow::Result<()> {
        let (reference, key) = self.pick(rng).context("nothing pushed yet")?;
        let r: Reference = reference.parse()?;
        let out = self
            .scratch
            .join(format!("pull-{n}-{}", rng.random::<u64>()));
        let result = client
            .pull(&AnyRef::Version(r), &out, false, &NoProgress)
            .await
            .with_context(|| format!("pull {reference}"));
        let check = result.and_then(|_| {
            let got = read_tree(&out);
            let want = BTreeMap::from([
                (
                    "adapter_config.json".to_owned(),
                    self.adapter_config.clone(),
                ),
                (
                    "adapter_model.safetensors".to_owned(),
                    self.adapter_bytes(key),
                ),
            ]);
            anyhow::ensure!(
                got == want,
                "pull {reference}: the files differ from what was pushed"
            );
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&out);
        check
    }

    async fn compat_patch(&self, client: &Client, rng: &mut StdRng) -> anyhow::Result<()> {
        let (reference, _) = self.pick(rng).context("nothing pushed yet")?;
        let resp = client
            .ports()
            .query_compat(v1::QueryCompatRequest {
                subject: Some(v1::query_compat_request::Subject::Patch(reference.clone())),
                ..Default::default()
            })
            .await
            .with_context(|| format!("compat --patch {reference}"))?
            .into_inner();
        anyhow::ensure!(
            resp.entries
                .iter()
                .any(|e| e.kind == v1::CompatKind::Native as i32),
            "compat --patch {reference}: no native entry"
        );
        Ok(())
    }

    async fn compat_base(&self, client: &Client) -> anyhow::Result<()> {
        let known: HashSet<String> = self
            .pushed
            .lock()
            .expect("unpoisoned")
            .iter()
            .map(|(r, _)| r.clone())
            .collect();
        let entries = client
            .query_compat_all(v1::query_compat_request::Subject::Base(
                self.base_ref.clone(),
            ))
            .await
            .with_context(|| format!("compat --base {}", self.base_ref))?;
        let listed: HashSet<String> = entries.into_iter().map(|e| e.patch).collect();
        let missing = known.iter().filter(|r| !listed.contains(*r)).count();
        anyhow::ensure!(
            missing == 0,
            "compat --base {}: {missing} patches pushed before the query are not listed",
            self.base_ref
        );
        Ok(())
    }
}

/// One request client: operations drawn by weight until `stop`.
async fn request_client(
    shared: Arc<Shared>,
    client: Client,
    id: u64,
    weights: [u64; 3],
    base_every: u64,
    stop: CancellationToken,
) -> Vec<OpStats> {
    let mut stats: Vec<OpStats> = OPS.iter().map(|_| OpStats::new()).collect();
    let mut rng = StdRng::seed_from_u64(id);
    let total: u64 = weights.iter().sum();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let roll = rng.random_range(0..total);
        let started = Instant::now();
        if roll < weights[0] {
            let r = shared.push(&client).await;
            stats[0].record(started, r);
        } else if roll < weights[0] + weights[1] {
            let r = shared.pull(&client, &mut rng, n).await;
            stats[1].record(started, r);
        } else if rng.random_range(0..base_every.max(1)) == 0 {
            let r = shared.compat_base(&client).await;
            stats[3].record(started, r);
        } else {
            let r = shared.compat_patch(&client, &mut rng).await;
            stats[2].record(started, r);
        }
    }
    stats
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    subjects: HashSet<String>,
    ids: HashSet<String>,
    duplicates: u64,
    error: Option<String>,
}

async fn subscriber(
    shared: Arc<Shared>,
    client: Client,
    seen: Arc<Mutex<Seen>>,
    delay_us: Arc<Mutex<Histogram<u64>>>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = client
        .events()
        .subscribe(v1::SubscribeRequest {
            cursor: String::new(),
            types: vec!["patch.pushed".into()],
            subject: String::new(),
        })
        .await?
        .into_inner();
    let prefix = format!("{}/", shared.namespace);
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = stream.message() => m,
            };
            let event = match msg {
                Ok(Some(e)) => e,
                Ok(None) => {
                    seen.lock().expect("unpoisoned").error = Some("stream ended".into());
                    return;
                }
                Err(e) => {
                    seen.lock().expect("unpoisoned").error = Some(e.message().to_owned());
                    return;
                }
            };
            if !event.subject.starts_with(&prefix) {
                continue;
            }
            let started = shared
                .push_started
                .lock()
                .expect("unpoisoned")
                .get(&event.subject)
                .copied();
            if let Some(t) = started {
                delay_us
                    .lock()
                    .expect("unpoisoned")
                    .saturating_record(t.elapsed().as_micros().max(1) as u64);
            }
            let mut seen = seen.lock().expect("unpoisoned");
            if !seen.ids.insert(event.id) {
                seen.duplicates += 1;
            }
            seen.subjects.insert(event.subject);
        }
    }))
}

fn parse_mix(mix: &str) -> anyhow::Result<[u64; 3]> {
    let parts: Vec<u64> = mix
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--mix {mix:?}: expected PUSH:PULL:COMPAT weights"))?;
    match parts[..] {
        [a, b, c] if a + b + c > 0 => Ok([a, b, c]),
        _ => anyhow::bail!("--mix {mix:?}: expected three weights, not all zero"),
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let weights = parse_mix(&args.mix)?;
    anyhow::ensure!(
        args.subscribers < args.clients,
        "--subscribers must leave at least one request client"
    );
    let requesters = args.clients - args.subscribers;
    let scratch = tempfile::tempdir()?;
    let namespace = format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let fx = fixtures().join("llama-micro");
    let src = read_tree(&fx.join("patches/lora-qv"));
    let shared = Arc::new(Shared {
        base_ref: format!("{namespace}/llama:v1"),
        namespace: namespace.clone(),
        adapter: src
            .get("adapter_model.safetensors")
            .context("the lora-qv fixture")?
            .clone(),
        adapter_config: src
            .get("adapter_config.json")
            .context("the lora-qv fixture")?
            .clone(),
        scratch: scratch.path().to_path_buf(),
        next_key: AtomicU64::new(0),
        pushed: Mutex::new(Vec::new()),
        push_started: Mutex::new(HashMap::new()),
    });

    // Every client its own connection.
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(Client::connect(&args.registry).await?);
    }
    let setup = clients[0].clone();
    setup
        .push_dir(
            &fx.join("v1"),
            &base(&format!("{namespace}/llama"), "v1", None),
            &NoProgress,
        )
        .await
        .context("pushing the base")?;

    // Subscribers first: every push from here on must reach each of them.
    let stop_subscribers = CancellationToken::new();
    let delay_us = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let mut seen = Vec::new();
    let mut sub_tasks = Vec::new();
    for client in clients.drain(..args.subscribers) {
        let s = Arc::new(Mutex::new(Seen::default()));
        sub_tasks.push(
            subscriber(
                shared.clone(),
                client,
                s.clone(),
                delay_us.clone(),
                stop_subscribers.clone(),
            )
            .await
            .context("subscribing")?,
        );
        seen.push(s);
    }
    for _ in 0..args.seed_patches {
        shared.push(&setup).await.context("pushing a seed patch")?;
    }
    println!(
        "registry {}; namespace {namespace}; {} clients: {requesters} sending requests (push:pull:compat = {}), {} subscribed; {} s; {} cores on this machine (shared with the registry when it runs here)",
        args.registry,
        args.clients,
        args.mix,
        args.subscribers,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    let stop = CancellationToken::new();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(request_client(
                shared.clone(),
                client,
                i as u64,
                weights,
                args.base_compat_every,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.cancel();
    let mut totals: Vec<OpStats> = OPS.iter().map(|_| OpStats::new()).collect();
    for t in tasks {
        let stats = t.await.context("a client task panicked")?;
        for (total, s) in totals.iter_mut().zip(&stats) {
            total.merge(s);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Every created push must reach every subscriber.
    let expected: HashSet<String> = shared
        .pushed
        .lock()
        .expect("unpoisoned")
        .iter()
        .map(|(r, _)| r.clone())
        .collect();
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.drain_seconds);
    loop {
        let done = seen.iter().all(|s| {
            let s = s.lock().expect("unpoisoned");
            s.error.is_some() || expected.iter().all(|r| s.subjects.contains(r))
        });
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = drain_started.elapsed().as_secs_f64();
    stop_subscribers.cancel();
    for t in sub_tasks {
        let _ = t.await;
    }

    println!(
        "\n{:<13} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "operation", "count", "ops/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    let mut errors = 0;
    for (name, s) in OPS.iter().zip(&totals) {
        let h = &s.latency_us;
        println!(
            "{:<13} {:>8} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            name,
            h.len(),
            h.len() as f64 / elapsed,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            s.errors
        );
        errors += s.errors;
    }
    let all: u64 = totals.iter().map(|s| s.latency_us.len()).sum();
    println!(
        "{:<13} {:>8} {:>9.1}",
        "all requests",
        all,
        all as f64 / elapsed
    );
    let d = delay_us.lock().expect("unpoisoned");
    println!(
        "\nevents: {} patch.pushed expected at each of {} subscribers; push start -> event received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; last events drained {:.2} s after the load stopped",
        expected.len(),
        seen.len(),
        ms(d.value_at_quantile(0.5)),
        ms(d.value_at_quantile(0.99)),
        ms(d.max()),
        drain
    );
    let mut lost = 0;
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().expect("unpoisoned");
        let missing = expected.iter().filter(|r| !s.subjects.contains(*r)).count();
        lost += missing;
        println!(
            "  subscriber {i}: {} events, {} distinct pushes, {missing} lost, {} duplicates{}",
            s.ids.len() as u64 + s.duplicates,
            s.subjects.len(),
            s.duplicates,
            s.error
                .as_ref()
                .map_or(String::new(), |e| format!(", stream error: {e}"))
        );
        if s.error.is_some() {
            errors += 1;
        }
    }
    println!("lost events: {lost}");
    for (name, s) in OPS.iter().zip(&totals) {
        for e in &s.first_errors {
            println!("  {name} error: {e}");
        }
    }
    println!("errors: {errors}");
    if errors > 0 || lost > 0 {
        anyhow::bail!("{errors} errors, {lost} lost events");
    }
    Ok(())
}
