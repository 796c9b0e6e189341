//! Events latency benchmark: how long an event takes from its commit to the
//! `EventService.Subscribe` streams of N concurrent subscribers, against one running
//! registry.
//!
//! One generator pushes `--events` patch versions, one every `--interval-ms`, each in
//! its own transaction that appends one `patch.pushed` event; N subscribers (each with
//! its own connection) subscribe to `patch.pushed` for that patch before the first push.
//! Per event and subscriber the latency is the wall clock when the event arrives minus
//! the event's `time` (stamped when the registry inserts the event row in the pushing
//! transaction). Every subscriber must receive every event exactly once; lost and
//! duplicate events are counted. Prints a markdown table row (with its header unless
//! `--row-only`) and exits non-zero on any lost or duplicate event or error.
//!
//!   cargo run --release -p patchport-tests --example events -- \
//!       --registry http://127.0.0.1:PORT --subscribers 10 --events 200 --interval-ms 20
//!
//! Only the public gRPC API through `patchport-client`, so the same program measures any
//! registry build. `bench/events/run.sh` runs it against `patchport serve` on SQLite and
//! on Postgres. Everything is pushed under a fresh namespace, so a registry can be
//! measured more than once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use patchport_client::{Client, NoProgress, PushKind};
use patchport_proto::v1;
use tokio_util::sync::CancellationToken;

/// Measure commit-to-subscriber latency of the event stream.
#[derive(Parser, Debug)]
struct Args {
    /// The registry (`http://host:port`).
    #[arg(long, env = "PATCHPORT_REGISTRY", default_value = patchport_client::DEFAULT_REGISTRY)]
    registry: String,
    /// Concurrent subscribers, each on its own connection.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Events generated (one patch version push each).
    #[arg(long, default_value_t = 200)]
    events: u64,
    /// Milliseconds between the starts of two pushes (a push that takes longer delays
    /// the next one; the rate reached is printed).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Seconds subscribers may take, after the last push, to receive the last events.
    #[arg(long, default_value_t = 15)]
    drain_seconds: u64,
    /// Milliseconds to keep listening after every subscriber has every event, to catch
    /// duplicates.
    #[arg(long, default_value_t = 1000)]
    linger_ms: u64,
    /// What to call the store in the table (`sqlite`, `postgres`).
    #[arg(long, default_value = "?")]
    store: String,
    /// Print only the table row, not the header.
    #[arg(long)]
    row_only: bool,
}

/// The longest a push or a subscription may take before the run fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Microseconds since the Unix epoch, now.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What one subscriber saw.
#[derive(Debug)]
struct Seen {
    /// Patch versions received (the generator's sequence numbers), with the id and
    /// cursor of the event that brought each.
    versions: HashMap<u64, (String, String)>,
    ids: HashSet<String>,
    duplicates: u64,
    /// The first duplicates, described.
    first_duplicates: Vec<String>,
    /// Events on the filtered subject that the generator did not push.
    unexpected: u64,
    /// Events of the warm-up push, committed before the subscription started: a stream
    /// that starts at the head may still deliver them (on Postgres the head is the last
    /// event below the oldest running transaction). Reported, not an error.
    early: u64,
    /// Events whose `time` was after their arrival (clock trouble).
    negative: u64,
    latency_us: Histogram<u64>,
    error: Option<String>,
}

impl Seen {
    fn new() -> Self {
        Self {
            versions: HashMap::new(),
            ids: HashSet::new(),
            duplicates: 0,
            first_duplicates: Vec::new(),
            unexpected: 0,
            early: 0,
            negative: 0,
            latency_us: histogram(),
            error: None,
        }
    }
}

/// Subscribes (the stream's response headers have arrived when this returns, so the
/// server holds its start cursor) and spawns the reader.
async fn subscriber(
    client: Client,
    subject: String,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut events = client.events();
    let subscribed = events.subscribe(v1::SubscribeRequest {
        cursor: String::new(),
        types: vec!["patch.pushed".into()],
        subject: subject.clone(),
    });
    let mut stream = tokio::time::timeout(CALL_TIMEOUT, subscribed)
        .await
        .context("no answer to Subscribe")??
        .into_inner();
    let prefix = format!("{subject}:");
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = stream.message() => m,
            };
            let received_us = now_us();
            let event = match msg {
                Ok(Some(e)) => e,
                Ok(None) => {
                    seen.lock().expect("unpoisoned").error = Some("stream ended".into());
                    return;
                }
                Err(e) => {
                    seen.lock().expect("unpoisoned").error =
                        Some(format!("{:?}: {}", e.code(), e.message()));
                    return;
                }
            };
            let mut seen = seen.lock().expect("unpoisoned");
            let version = event
                .subject
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u64>().ok());
            let Some(version) = version else {
                seen.unexpected += 1;
                continue;
            };
            if version == 0 {
                seen.early += 1;
                continue;
            }
            let fresh_id = seen.ids.insert(event.id.clone());
            if let Some((id, cursor)) = seen.versions.get(&version) {
                let again = format!(
                    "version {version}: event {id} (cursor {cursor}), then event {} (cursor {}){}",
                    event.id,
                    event.cursor,
                    if fresh_id {
                        ""
                    } else {
                        ", the same event again"
                    }
                );
                seen.duplicates += 1;
                if seen.first_duplicates.len() < 5 {
                    seen.first_duplicates.push(again);
                }
                continue;
            }
            seen.versions
                .insert(version, (event.id.clone(), event.cursor.clone()));
            if !fresh_id {
                seen.duplicates += 1;
                continue;
            }
            let Some(time) = event.time else {
                seen.unexpected += 1;
                continue;
            };
            let sent_us = time.seconds * 1_000_000 + i64::from(time.nanos) / 1_000;
            let latency = received_us - sent_us;
            if latency < 0 {
                seen.negative += 1;
            }
            seen.latency_us.saturating_record(latency.max(1) as u64);
        }
    }))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// The `lora-qv` adapter of the `llama-micro` fixture.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("llama-micro")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.subscribers > 0, "--subscribers must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    let namespace = format!(
        "events-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let base_name = format!("{namespace}/llama");
    let base_ref = format!("{base_name}:v1");
    let patch_name = format!("{namespace}/adapter");
    let adapter = fixtures().join("patches/lora-qv");
    let patch = |version: u64| PushKind::Patch {
        name: patch_name.clone(),
        version: version.to_string(),
        base: base_ref.clone(),
        eval: None,
        allow_architecture_mismatch: false,
    };

    // Setup: the base, and version 0 of the patch so that every measured push finds
    // its blobs already stored (no upload; one `FindMissingBlobs` + one
    // `PushPatchVersion` each).
    let generator = Client::connect(&args.registry)
        .await
        .with_context(|| format!("connecting to {}", args.registry))?;
    let base = PushKind::Base {
        name: base_name.clone(),
        version: "v1".into(),
        parent: None,
    };
    tokio::time::timeout(
        CALL_TIMEOUT,
        generator.push_dir(&fixtures().join("v1"), &base, &NoProgress),
    )
    .await
    .context("no answer")
    .and_then(|r| Ok(r?))
    .context("pushing the base")?;
    tokio::time::timeout(
        CALL_TIMEOUT,
        generator.push_dir(&adapter, &patch(0), &NoProgress),
    )
    .await
    .context("no answer")
    .and_then(|r| Ok(r?))
    .context("pushing the warm-up patch version")?;

    // Subscribers, each on its own connection, all subscribed before the first push.
    let stop = CancellationToken::new();
    let mut seen = Vec::with_capacity(args.subscribers);
    let mut tasks = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let client = Client::connect(&args.registry).await?;
        let s = Arc::new(Mutex::new(Seen::new()));
        tasks.push(
            subscriber(client, patch_name.clone(), s.clone(), stop.clone())
                .await
                .context("subscribing")?,
        );
        seen.push(s);
    }

    // The generator: one push every interval, sequentially.
    let mut push_us = histogram();
    let mut push_errors = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for version in 1..=args.events {
        ticker.tick().await;
        let t = Instant::now();
        let pushed = tokio::time::timeout(
            CALL_TIMEOUT,
            generator.push_dir(&adapter, &patch(version), &NoProgress),
        )
        .await;
        match pushed {
            Ok(Ok(o)) if o.created => {
                push_us.saturating_record(t.elapsed().as_micros().max(1) as u64);
            }
            Ok(Ok(_)) => push_errors.push(format!("push {version}: already existed")),
            Ok(Err(e)) => push_errors.push(format!("push {version}: {e:#}")),
            Err(_) => push_errors.push(format!("push {version}: no answer in {CALL_TIMEOUT:?}")),
        }
    }
    let generated = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        push_errors.is_empty(),
        "{} pushes failed; first: {}",
        push_errors.len(),
        push_errors[0]
    );

    // Wait for every subscriber to have every event, then linger for duplicates.
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.drain_seconds);
    loop {
        let done = seen.iter().all(|s| {
            let s = s.lock().expect("unpoisoned");
            s.error.is_some() || s.versions.len() as u64 >= args.events
        });
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = drain_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.linger_ms)).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }

    let mut all = histogram();
    let (mut lost, mut duplicates, mut unexpected, mut early, mut negative) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    let mut first_duplicates = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().expect("unpoisoned");
        all.add(&s.latency_us)
            .expect("histograms with the same bounds");
        lost += (1..=args.events)
            .filter(|v| !s.versions.contains_key(v))
            .count() as u64;
        duplicates += s.duplicates;
        unexpected += s.unexpected;
        early += s.early;
        negative += s.negative;
        if let Some(e) = &s.error {
            errors.push(format!("subscriber {i}: {e}"));
        }
        for d in &s.first_duplicates {
            if first_duplicates.len() < 5 {
                first_duplicates.push(format!("subscriber {i}: {d}"));
            }
        }
    }
    eprintln!(
        "{}: {} subscribers, {} events pushed in {generated:.2} s ({:.1}/s; push p50 {:.1} ms, p99 {:.1} ms), last events in {drained:.2} s after the last push; {} latency samples, min {:.1} ms; lost {lost}, duplicates {duplicates}, unexpected {unexpected}, committed before subscribing {early}, time after arrival {negative}, stream errors {}",
        args.store,
        args.subscribers,
        args.events,
        args.events as f64 / generated,
        ms(push_us.value_at_quantile(0.5)),
        ms(push_us.value_at_quantile(0.99)),
        all.len(),
        ms(all.min()),
        errors.len(),
    );
    for e in errors.iter().take(5) {
        eprintln!("  {e}");
    }
    for d in &first_duplicates {
        eprintln!("  duplicate at {d}");
    }
    if !args.row_only {
        println!("| store | subscribers | events | p50 ms | p99 ms | max ms | lost | duplicates |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    println!(
        "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {lost} | {duplicates} |",
        args.store,
        args.subscribers,
        args.events,
        ms(all.value_at_quantile(0.5)),
        ms(all.value_at_quantile(0.99)),
        ms(all.max()),
    );
    if lost > 0 || duplicates > 0 || unexpected > 0 || !errors.is_empty() {
        anyhow::bail!(
            "{lost} lost, {duplicates} duplicate, {unexpected} unexpected events, {} stream errors",
            errors.len()
        );
    }
    Ok(())
}
