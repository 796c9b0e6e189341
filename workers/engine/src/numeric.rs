//! Element types: loading stored floats exactly as f64, and rounding an f64 *once* to the
//! storage dtype (round to nearest, ties to even).
//!
//! `f64 as f32` is a single correct rounding. For bf16 and f16 there is no such
//! primitive: `half`'s `from_f64` either goes through f32 (two roundings) or truncates the
//! low mantissa word before rounding, and both can land one ulp off on values just past a
//! halfway point. Here the f64 is first rounded to f32 with *round-to-odd*, then to the
//! 16-bit format with round-to-nearest-even; because f32 carries at least two more bits
//! than either 16-bit format over the whole range of both, the composition equals one
//! correct rounding (Boldo & Melquiond, "When double rounding is odd", 2005).

use patchport_core::safetensors::Dtype;

/// `x` rounded to f32 with round-to-odd: exact results stay, inexact ones go to the
/// neighbour (of the two bracketing f32 values) whose last mantissa bit is 1.
#[inline(always)]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let t = x as f32;
    let bits = t.to_bits();
    let back = f64::from(t);
    // NaN compares unequal and so counts as inexact; `| 1` keeps it a NaN.
    let inexact = back != x;
    let away = back.abs() > x.abs();
    let mag = (bits & 0x7fff_ffff) - u32::from(inexact && away);
    f32::from_bits((bits & 0x8000_0000) | mag | u32::from(inexact))
}

/// f32 to bf16 bits, round to nearest, ties to even; NaN stays NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    // Both computed, one selected: no branch, so the loop around it vectorises.
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x0040) as u16;
    if x.is_nan() { nan } else { rounded }
}

/// f32 to f16 bits, round to nearest, ties to even; NaN stays NaN (quiet). Branch-free
/// (F. Giesen's `float_to_half_fast3_rtne`), so the loop around it vectorises.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let b = x.to_bits();
    let sign = b & 0x8000_0000;
    let a = b ^ sign;
    // Inf or NaN, or too large: all exponent bits set.
    let special = if a > F32_INF { 0x7e00 } else { 0x7c00 };
    // Subnormal or zero: align the 10 mantissa bits at the bottom by adding a magic
    // float (round to nearest even in the FPU), then subtract its bits.
    let sub = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC);
    // Normal: re-bias the exponent and round to nearest even on bit 13.
    let odd = (a >> 13) & 1;
    let normal = a.wrapping_add((15u32.wrapping_sub(127) << 23).wrapping_add(0xfff) + odd) >> 13;
    let bits = if a >= F16_MAX {
        special
    } else if a < (113 << 23) {
        sub
    } else {
        normal
    };
    (bits | (sign >> 16)) as u16
}

/// `x` rounded once to bf16 (bits).
#[inline(always)]
pub fn round_to_bf16(x: f64) -> u16 {
    f32_to_bf16_bits(f64_to_f32_round_odd(x))
}

/// `x` rounded once to f16 (bits).
#[inline(always)]
pub fn round_to_f16(x: f64) -> u16 {
    f32_to_f16_bits(f64_to_f32_round_odd(x))
}

/// bf16 bits as f64 (exact).
#[inline(always)]
pub fn bf16_to_f64(b: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(b) << 16))
}

/// f16 bits as f64 (exact). Branch-free (F. Giesen's `half_to_float`), so the loop
/// around it vectorises.
#[inline(always)]
pub fn f16_to_f64(h: u16) -> f64 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    const MAGIC: u32 = 113 << 23;
    let h = u32::from(h);
    let o = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
    let exp = SHIFTED_EXP & ((h & 0x7fff) << 13);
    let inf_nan = o + ((128 - 16) << 23);
    let denorm = (f32::from_bits(o + (1 << 23)) - f32::from_bits(MAGIC)).to_bits();
    let bits = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        denorm
    } else {
        o
    };
    f64::from(f32::from_bits(bits | ((h & 0x8000) << 16)))
}

/// A floating storage dtype: its little-endian bytes load exactly into f64, and an f64
/// is stored with a single rounding.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const SIZE: usize;
    /// Loads one element from `SIZE` bytes.
    fn load(b: &[u8]) -> f64;
    /// Stores `v` rounded once into `SIZE` bytes.
    fn store(v: f64, out: &mut [u8]);
    /// Loads `N` elements from `N·SIZE` bytes (fixed-size, so it vectorises).
    fn load_n<const N: usize>(b: &[u8]) -> [f64; N];
    /// Stores `N` values rounded once into `N·SIZE` bytes.
    fn store_n<const N: usize>(v: &[f64; N], out: &mut [u8]);
}

/// Implements the array forms from a fixed-width little-endian element.
macro_rules! arrays {
    ($w:literal, $to:expr, $from:expr) => {
        #[inline(always)]
        fn load_n<const N: usize>(b: &[u8]) -> [f64; N] {
            let (chunks, _) = b.as_chunks::<$w>();
            let to: fn([u8; $w]) -> f64 = $to;
            match chunks.first_chunk::<N>() {
                Some(c) => c.map(to),
                None => [0.0; N],
            }
        }
        #[inline(always)]
        fn store_n<const N: usize>(v: &[f64; N], out: &mut [u8]) {
            let from: fn(f64) -> [u8; $w] = $from;
            let (chunks, _) = out.as_chunks_mut::<$w>();
            for (c, &x) in chunks.iter_mut().zip(v) {
                *c = from(x);
            }
        }
    };
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct F64;
#[derive(Debug, Clone, Copy)]
pub(crate) struct F32;
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16;
#[derive(Debug, Clone, Copy)]
pub(crate) struct F16;

impl Elem for F64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..8].copy_from_slice(&v.to_le_bytes());
    }
    arrays!(8, f64::from_le_bytes, f64::to_le_bytes);
}

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..4].copy_from_slice(&(v as f32).to_le_bytes());
    }
    arrays!(4, |b| f64::from(f32::from_le_bytes(b)), |v| (v as f32)
        .to_le_bytes());
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        bf16_to_f64(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..2].copy_from_slice(&round_to_bf16(v).to_le_bytes());
    }
    arrays!(2, |b| bf16_to_f64(u16::from_le_bytes(b)), |v| {
        round_to_bf16(v).to_le_bytes()
    });
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f16_to_f64(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..2].copy_from_slice(&round_to_f16(v).to_le_bytes());
    }
    arrays!(2, |b| f16_to_f64(u16::from_le_bytes(b)), |v| round_to_f16(
        v
    )
    .to_le_bytes());
}

/// True for the dtypes a delta can be merged into and LoRA factors can be read from.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Decodes little-endian floats of `dtype` into `out` (replacing its contents), exactly.
/// Returns `None` for a dtype that is not F64/F32/F16/BF16 or a length that is not a
/// whole number of elements.
pub fn decode_f64(dtype: Dtype, bytes: &[u8], out: &mut Vec<f64>) -> Option<()> {
    fn go<E: Elem>(bytes: &[u8], out: &mut Vec<f64>) -> Option<()> {
        if !bytes.len().is_multiple_of(E::SIZE) {
            return None;
        }
        out.clear();
        out.extend(bytes.chunks_exact(E::SIZE).map(E::load));
        Some(())
    }
    match dtype {
        Dtype::F64 => go::<F64>(bytes, out),
        Dtype::F32 => go::<F32>(bytes, out),
        Dtype::BF16 => go::<Bf16>(bytes, out),
        Dtype::F16 => go::<F16>(bytes, out),
        _ => None,
    }
}

/// Rounds `v` once to `dtype` and appends its little-endian bytes to `out`.
pub fn encode_once(dtype: Dtype, v: f64, out: &mut Vec<u8>) -> Option<()> {
    match dtype {
        Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
        Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        Dtype::BF16 => out.extend_from_slice(&round_to_bf16(v).to_le_bytes()),
        Dtype::F16 => out.extend_from_slice(&round_to_f16(v).to_le_bytes()),
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every finite value of a 16-bit format, sorted, with its bits.
    fn table(to_f64: fn(u16) -> f64) -> Vec<(f64, u16)> {
        let mut t: Vec<(f64, u16)> = (0..=u16::MAX)
            .map(|b| (to_f64(b), b))
            .filter(|(v, _)| v.is_finite())
            .filter(|(v, b)| !(*v == 0.0 && *b != 0)) // keep +0 only
            .collect();
        t.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        t
    }

    /// Correct rounding by search: nearest value, ties to the even bit pattern,
    /// overflow to infinity past the halfway point above the largest finite value.
    fn nearest(t: &[(f64, u16)], x: f64, inf_bits: u16, sign_bit: u16) -> u16 {
        let max = t.last().unwrap().0;
        let prev_max = t[t.len() - 2].0;
        let overflow = max + (max - prev_max) / 2.0;
        if x >= overflow {
            return inf_bits;
        }
        if x <= -overflow {
            return inf_bits | sign_bit;
        }
        let i = t.partition_point(|(v, _)| *v <= x);
        if i == 0 {
            return t[0].1; // between -overflow and the most negative finite value
        }
        if i == t.len() {
            return t[i - 1].1;
        }
        let (lo, lo_b) = t[i - 1];
        if lo == x {
            if x == 0.0 && x.is_sign_negative() {
                return sign_bit;
            }
            return lo_b;
        }
        let (hi, hi_b) = t[i];
        let mid = (lo + hi) / 2.0; // exact: both have at most 11 significant bits
        let r = if x < mid {
            lo_b
        } else if x > mid {
            hi_b
        } else if lo_b & 1 == 0 {
            lo_b
        } else {
            hi_b
        };
        // A result of zero keeps the sign of x.
        if r & !sign_bit == 0 && x < 0.0 {
            sign_bit
        } else {
            r
        }
    }

    fn check(x: f64) {
        type Tables = (Vec<(f64, u16)>, Vec<(f64, u16)>);
        thread_local! {
            static T: Tables = (table(bf16_to_f64), table(f16_to_f64));
        }
        T.with(|(tb, th)| {
            assert_eq!(
                round_to_bf16(x),
                nearest(tb, x, 0x7f80, 0x8000),
                "bf16 {x:e}"
            );
            assert_eq!(round_to_f16(x), nearest(th, x, 0x7c00, 0x8000), "f16 {x:e}");
        });
    }

    #[test]
    fn halfway_points_and_edges() {
        // Exactly halfway between 1 and the next bf16 (ties to even), and just past it:
        // truncating the low bits first would call the second one a tie too.
        for x in [
            1.0 + 2f64.powi(-8),
            1.0 + 2f64.powi(-8) + 2f64.powi(-40),
            1.0 + 2f64.powi(-8) - 2f64.powi(-40),
            1.0 + 3.0 * 2f64.powi(-8),
            1.0 + 2f64.powi(-11) + 2f64.powi(-45),
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            3.3961e38,
            f64::MAX,
            -f64::MAX,
            1e-45,
            -1e-45,
            2f64.powi(-25),
            2f64.powi(-25) + 2f64.powi(-60),
            2f64.powi(-134),
            2f64.powi(-134) + 2f64.powi(-170),
            0.0,
            -0.0,
        ] {
            check(x);
        }
        assert_eq!(round_to_bf16(f64::INFINITY), 0x7f80);
        assert!(f32::from_bits(u32::from(round_to_bf16(f64::NAN)) << 16).is_nan());
        assert!(half::f16::from_bits(round_to_f16(f64::NAN)).is_nan());
    }

    #[test]
    fn f16_to_f64_matches_half_everywhere() {
        for b in 0..=u16::MAX {
            let ours = f16_to_f64(b);
            let theirs = half::f16::from_bits(b).to_f64();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn f32_to_f16_matches_half_on_a_sweep() {
        // Every 4099th f32 bit pattern plus the neighbourhood of the f16 boundaries.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(4099).collect();
        for edge in [
            0x477f_e000u32,
            0x4780_0000,
            0x3880_0000,
            0x3300_0000,
            0x7f80_0000,
            0x7fc0_0000,
        ] {
            bits.extend((edge - 4096..edge + 4096).flat_map(|b| [b, b | 0x8000_0000]));
        }
        for b in bits {
            let x = f32::from_bits(b);
            let ours = f32_to_f16_bits(x);
            let theirs = half::f16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(half::f16::from_bits(ours).is_nan(), "{b:#x}");
            } else {
                assert_eq!(ours, theirs, "{b:#x} {x:e}");
            }
        }
    }

    proptest! {
        #[test]
        fn round_once_matches_exhaustive_search(bits in any::<u64>()) {
            let x = f64::from_bits(bits);
            prop_assume!(x.is_finite());
            check(x);
        }

        #[test]
        fn round_once_in_range(m in -70000.0f64..70000.0, e in -30i32..30) {
            check(m * 2f64.powi(e));
        }

        #[test]
        fn round_odd_brackets(x in any::<f64>()) {
            prop_assume!(x.is_finite() && x.abs() < f64::from(f32::MAX));
            let t = f64_to_f32_round_odd(x);
            let tf = f64::from(t);
            if tf != x {
                prop_assert_eq!(t.to_bits() & 1, 1);
                let other = f64::from(f32::from_bits(if tf.abs() > x.abs() { t.to_bits() - 1 } else { t.to_bits() + 1 }));
                prop_assert!((tf - x).abs() <= (tf - other).abs());
            }
        }
    }
}
