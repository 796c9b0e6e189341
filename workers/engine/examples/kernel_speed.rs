//! Times the fused merge kernel on one 4096×4096 weight at rank 16 (f32, bf16, f16), with
//! a gemm anchor in the same run: the `gemm` crate (candle's matmul backend) doing
//! `W ← W + s·B·A` in place in f32, the same memory traffic with f32 accumulation and
//! no diagnostics (the kernel accumulates in f64, rounds once and sums the diagnostics),
//! and the touch floor: `w ← w + 1` over the same bytes, what reading and writing them
//! costs when repeated as the kernel's runs are (64 MiB may stay in a large L3 cache, so
//! this is not DRAM bandwidth).
//! A measurement, not a test:
//! `cargo run --release -p patchport-engine --example kernel_speed [f32|bf16|f16|all] [REPS]`.
//!
//! Threads: the kernel and the anchor both use every core the process may run on
//! (`std::thread::available_parallelism`), printed on each line.

use std::time::Instant;

use patchport_engine::{Device, LowRankDelta, merge_in_place};
use safetensors::Dtype;

/// Best and median of `reps` timings of `f`, milliseconds.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}

/// `w ← w + s·b·a` in f32 with the `gemm` crate (`b` `[n, rank]`, `a` `[rank, n]`).
#[allow(unsafe_code)]
fn gemm_anchor(w: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, s: f32, threads: usize) {
    assert!(w.len() == n * n && b.len() == n * rank && a.len() == rank * n);
    // SAFETY: the three buffers are live, row-major and of the lengths asserted above for
    // an `[n, rank] × [rank, n]` product into `[n, n]`; `w` is borrowed mutably, so it
    // aliases neither input.
    unsafe {
        gemm::gemm(
            n,
            n,
            rank,
            w.as_mut_ptr(),
            1,
            n as isize,
            true,
            b.as_ptr(),
            1,
            rank as isize,
            a.as_ptr(),
            1,
            n as isize,
            1.0,
            s,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// The touch floor: `w ← w + 1` over the same bytes in place, split in row blocks over
/// `threads` (no arithmetic to speak of: what reading and writing the weight costs).
fn memory_floor(w: &mut [f32], threads: usize) {
    let block = w.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for part in w.chunks_mut(block) {
            s.spawn(move || {
                for x in part.iter_mut() {
                    *x += 1.0;
                }
            });
        }
    });
}

fn main() {
    let (n, rank) = (4096usize, 16usize);
    let a: Vec<f64> = (0..rank * n)
        .map(|i| ((i * 7919 % 1000) as f64 - 500.0) * 1e-5)
        .collect();
    let b: Vec<f64> = (0..n * rank)
        .map(|i| ((i * 104_729 % 1000) as f64 - 500.0) * 1e-5)
        .collect();
    let delta = LowRankDelta::from_lora(&a, &b, rank, n, n, 2.0, false).expect("delta");
    let only = std::env::args().nth(1).filter(|o| o != "all");
    let reps: usize = std::env::args()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(7)
        .max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (dtype, size) in [(Dtype::F32, 4usize), (Dtype::BF16, 2), (Dtype::F16, 2)] {
        if only
            .as_deref()
            .is_some_and(|o| !format!("{dtype:?}").eq_ignore_ascii_case(o))
        {
            continue;
        }
        let mut w: Vec<u8> = (0..n * n * size).map(|i| (i % 97) as u8 & 0x3f).collect();
        let (best, median) = time(reps, || {
            merge_in_place(dtype, &mut w, &delta, Device::Cpu).expect("merge");
        });
        println!(
            "kernel {dtype:?}: {n}x{n} rank {rank}: best {best:.2} ms, median {median:.2} ms of {reps} ({threads} threads, {:.2} GB/s of weight)",
            (n * n * size) as f64 / best / 1e6
        );
        if dtype == Dtype::F32 {
            let mut w: Vec<f32> = (0..n * n).map(|i| (i % 97) as f32 * 1e-3).collect();
            let af: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            let bf: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let (best, median) = time(reps, || {
                gemm_anchor(&mut w, &bf, &af, n, rank, 2.0, threads);
            });
            println!(
                "anchor gemm F32 (f32 accumulation, no diagnostics): {n}x{n} rank {rank}: best {best:.2} ms, median {median:.2} ms of {reps} ({threads} threads)"
            );
            let (best, median) = time(reps, || memory_floor(&mut w, threads));
            println!(
                "touch floor F32 (w += 1 in place, the same bytes, cache-resident where they fit): best {best:.2} ms, median {median:.2} ms of {reps} ({threads} threads, {:.2} GB/s read + written)",
                2.0 * (n * n * 4) as f64 / best / 1e6
            );
        }
    }
}
