//! Times the fused merge kernel on one 4096×4096 weight at rank 16 (f32, bf16, f16).
//! A measurement, not a test:
//! `cargo run --release -p patchport-engine --example kernel_speed [f32|bf16|f16]`.

use std::time::Instant;

use patchport_engine::{Device, LowRankDelta, merge_in_place};
use safetensors::Dtype;

fn main() {
    let (n, rank) = (4096usize, 16usize);
    let a: Vec<f64> = (0..rank * n)
        .map(|i| ((i * 7919 % 1000) as f64 - 500.0) * 1e-5)
        .collect();
    let b: Vec<f64> = (0..n * rank)
        .map(|i| ((i * 104_729 % 1000) as f64 - 500.0) * 1e-5)
        .collect();
    let delta = LowRankDelta::from_lora(&a, &b, rank, n, n, 2.0, false).expect("delta");
    let only = std::env::args().nth(1);
    let reps: usize = std::env::args()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    for (dtype, size) in [(Dtype::F32, 4usize), (Dtype::BF16, 2), (Dtype::F16, 2)] {
        if only
            .as_deref()
            .is_some_and(|o| !format!("{dtype:?}").eq_ignore_ascii_case(o))
        {
            continue;
        }
        let mut w: Vec<u8> = (0..n * n * size).map(|i| (i % 97) as u8 & 0x3f).collect();
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            merge_in_place(dtype, &mut w, &delta, Device::Cpu).expect("merge");
            best = best.min(t.elapsed().as_secs_f64());
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "{dtype:?}: {n}x{n} rank {rank}: best of {reps} {:.2} ms ({threads} threads, {:.2} GB/s of weight)",
            best * 1e3,
            (n * n * size) as f64 / best / 1e9
        );
    }
}
