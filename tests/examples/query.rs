//! Query benchmark: concurrent read-only clients against a registry that holds many patch
//! versions and ports (seeded directly in its database by `bench/query/run.sh`). Each
//! client loops over the queries a serving fleet and a platform team make, drawn with
//! equal weight:
//!
//! - **compat-patch**: `QueryCompat` for one patch (its native base and every port);
//! - **compat-base**: `QueryCompat` for the new base (every patch ported onto it), one
//!   page of at most `--page-size` entries (a registry without pagination answers all);
//! - **resolve**: `Resolve` of one patch for the new base's digest;
//! - **list**: `ListPatchVersions` of the namespace, one page.
//!
//! Reports per query the count, p50/p99/max latency, the entries of the last answer and
//! the errors; exits non-zero on any error.
//!
//!   cargo run --release -p patchport-tests --example query -- --registry URL \
//!       --patches 100000 --base bench/llama:v2 --base-digest sha256:...

use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use patchport_client::Client;
use patchport_proto::v1;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Concurrent read-only queries against a seeded registry.
#[derive(Parser, Debug)]
struct Args {
    /// The registry (`http://host:port`).
    #[arg(long, default_value = patchport_client::DEFAULT_REGISTRY)]
    registry: String,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The seeded patches are `NAMESPACE/p<i>:1` for i in 1..=PATCHES.
    #[arg(long)]
    patches: u64,
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// The base every seeded patch was ported onto (`namespace/name:version`).
    #[arg(long)]
    base: String,
    /// Its manifest digest (what `Resolve` takes).
    #[arg(long)]
    base_digest: String,
    /// Entries asked for per page (compat --base and list).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
}

const OPS: [&str; 4] = ["compat-patch", "compat-base", "resolve", "list"];

struct Stats {
    latency_us: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    entries: usize,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            errors: 0,
            first_error: None,
            entries: 0,
        }
    }
}

async fn one(
    client: &Client,
    args: &Args,
    op: usize,
    rng: &mut StdRng,
) -> Result<usize, tonic::Status> {
    let patch = format!(
        "{}/p{}:1",
        args.namespace,
        rng.random_range(1..=args.patches)
    );
    Ok(match op {
        0 => client
            .ports()
            .query_compat(v1::QueryCompatRequest {
                subject: Some(v1::query_compat_request::Subject::Patch(patch)),
                ..Default::default()
            })
            .await?
            .into_inner()
            .entries
            .len(),
        1 => client
            .ports()
            .query_compat(v1::QueryCompatRequest {
                subject: Some(v1::query_compat_request::Subject::Base(args.base.clone())),
                page_size: args.page_size,
                ..Default::default()
            })
            .await?
            .into_inner()
            .entries
            .len(),
        2 => {
            client
                .ports()
                .resolve(v1::ResolveRequest {
                    patch,
                    base_digest: args.base_digest.clone(),
                    ..Default::default()
                })
                .await?;
            1
        }
        _ => client
            .registry()
            .list_patch_versions(v1::ListRequest {
                filter: args.namespace.clone(),
                page_size: args.page_size,
                ..Default::default()
            })
            .await?
            .into_inner()
            .versions
            .len(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let args = args.clone();
        let client = Client::connect(&args.registry).await?;
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(c as u64);
            let mut stats: Vec<Stats> = OPS.iter().map(|_| Stats::new()).collect();
            let mut n = c;
            while Instant::now() < deadline {
                let op = n % OPS.len();
                n += 1;
                let started = Instant::now();
                match one(&client, &args, op, &mut rng).await {
                    Ok(entries) => {
                        let us = started.elapsed().as_micros().max(1) as u64;
                        stats[op].latency_us.saturating_record(us);
                        stats[op].entries = entries;
                    }
                    Err(e) => {
                        stats[op].errors += 1;
                        stats[op].first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            stats
        }));
    }
    let mut total: Vec<Stats> = OPS.iter().map(|_| Stats::new()).collect();
    for t in tasks {
        for (acc, s) in total.iter_mut().zip(t.await?) {
            acc.latency_us.add(&s.latency_us).expect("same bounds");
            acc.errors += s.errors;
            acc.entries = acc.entries.max(s.entries);
            if acc.first_error.is_none() {
                acc.first_error = s.first_error;
            }
        }
    }
    println!(
        "| query | count | p50 ms | p99 ms | max ms | entries per answer | errors |\n|---|---|---|---|---|---|---|"
    );
    let ms = |us: u64| us as f64 / 1000.0;
    let mut failed = false;
    for (op, s) in OPS.iter().zip(&total) {
        let h = &s.latency_us;
        println!(
            "| {op} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            s.entries,
            s.errors
        );
        if let Some(e) = &s.first_error {
            eprintln!("{op}: first error: {e}");
            failed = true;
        }
    }
    anyhow::ensure!(!failed, "some queries failed");
    Ok(())
}
