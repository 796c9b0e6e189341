//! The merge kernel equals the f64 reference rounded once, on random shapes, dtypes,
//! ranks and layouts, and on a tensor big enough for the threaded, column-blocked path.

mod common;

use common::{ambiguous, elem_size, round_once, to_f64};
use patchport_engine::{Device, LowRankDelta, merge_in_place};
use proptest::prelude::*;
use safetensors::Dtype;

/// Weight bytes of `dtype` holding (a rounding of) `vals`.
fn encode(dtype: Dtype, vals: &[f64]) -> Vec<u8> {
    vals.iter().flat_map(|&v| round_once(dtype, v)).collect()
}

/// Merges with the engine and checks every element against `w + s·Σ_k` in f64 (summed
/// in order, no FMA) rounded once by exhaustive search.
#[allow(clippy::too_many_arguments)]
fn check(
    dtype: Dtype,
    rows_out: usize,
    cols_in: usize,
    rank: usize,
    a: &[f64],
    b: &[f64],
    w_vals: &[f64],
    scale: f64,
    transpose: bool,
) -> Result<(), TestCaseError> {
    let delta = LowRankDelta::from_lora(a, b, rank, cols_in, rows_out, scale, transpose).unwrap();
    let (rows, cols) = (delta.rows(), delta.cols());
    let mut w = encode(dtype, &w_vals[..rows * cols]);
    let w0 = to_f64(dtype, &w);
    let stats = merge_in_place(dtype, &mut w, &delta, Device::Cpu).unwrap();
    let size = elem_size(dtype);
    let mut dd = 0.0;
    for i in 0..rows {
        for j in 0..cols {
            let mut acc = 0.0;
            for k in 0..rank {
                // ΔW[o][i] = s·Σ_k B[o][k]·A[k][i]; transposed: element (i, o).
                let (o, inn) = if transpose { (j, i) } else { (i, j) };
                acc += b[o * rank + k] * a[k * cols_in + inn];
            }
            let d = scale * acc;
            dd += d * d;
            let exact = w0[i * cols + j] + d;
            let got = &w[(i * cols + j) * size..(i * cols + j + 1) * size];
            if dtype == Dtype::F64 {
                let g = f64::from_le_bytes(got.try_into().unwrap());
                prop_assert!(
                    (g - exact).abs() <= 4.0 * f64::EPSILON * (w0[i * cols + j].abs() + d.abs())
                );
            } else if got != round_once(dtype, exact).as_slice() {
                prop_assert!(
                    ambiguous(dtype, exact),
                    "({i}, {j}): {got:?} is not {exact:e} rounded once"
                );
            }
        }
    }
    prop_assert!((stats.delta_sq - dd).abs() <= 1e-9 * dd.max(1e-300));
    Ok(())
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        Just(Dtype::F32),
        Just(Dtype::BF16),
        Just(Dtype::F16),
        Just(Dtype::F64)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn kernel_equals_f64_reference_rounded_once(
        dtype in dtype_strategy(),
        out in 1usize..23,
        inn in 1usize..41,
        rank in 1usize..7,
        transpose in any::<bool>(),
        scale in prop_oneof![Just(2.0), Just(0.5), Just(16.0 / 8f64.sqrt()), 0.01f64..10.0],
        seed in any::<u64>(),
        magnitude in prop_oneof![Just(1.0), Just(1e-3), Just(100.0)],
    ) {
        // Values with f32 precision for the factors (as LoRA files hold), and a spread of
        // magnitudes for the weight.
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let a: Vec<f64> = (0..rank * inn).map(|_| f64::from(next() as f32 * 0.1)).collect();
        let b: Vec<f64> = (0..out * rank).map(|_| f64::from(next() as f32 * 0.1)).collect();
        let w: Vec<f64> = (0..out * inn).map(|_| next() * magnitude).collect();
        check(dtype, out, inn, rank, &a, &b, &w, scale, transpose)?;
    }
}

#[test]
fn large_tensor_through_the_threaded_blocked_path() {
    // 250 × 1100: more than one 1024-column block, a ragged last tile, rows split across
    // threads, 275k elements (over the threading threshold).
    let (out, inn, rank) = (250usize, 1100usize, 16usize);
    let a: Vec<f64> = (0..rank * inn)
        .map(|i| f64::from(((i * 37 % 101) as f32 - 50.0) * 1e-3))
        .collect();
    let b: Vec<f64> = (0..out * rank)
        .map(|i| f64::from(((i * 53 % 97) as f32 - 48.0) * 1e-3))
        .collect();
    let w: Vec<f64> = (0..out * inn)
        .map(|i| ((i * 7919 % 1009) as f64 - 504.0) * 1e-4)
        .collect();
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        for transpose in [false, true] {
            check(dtype, out, inn, rank, &a, &b, &w, 2.0, transpose).unwrap();
        }
    }
}

#[test]
fn wrong_sizes_are_errors_not_panics() {
    let d = LowRankDelta::from_lora(&[1.0; 6], &[1.0; 4], 2, 3, 2, 1.0, false).unwrap();
    let mut w = vec![0u8; 5];
    assert!(merge_in_place(Dtype::F32, &mut w, &d, Device::Cpu).is_err());
    let mut w = vec![0u8; 6];
    assert!(merge_in_place(Dtype::I8, &mut w, &d, Device::Cpu).is_err());
    assert!(LowRankDelta::from_lora(&[1.0; 5], &[1.0; 4], 2, 3, 2, 1.0, false).is_err());
}
