//! The merge kernel: `W ← round(W + s·L·R)` in place, with `s·L·R` accumulated in f64
//! and each element rounded once to the storage dtype.
//!
//! The CPU path is one fused pass over register tiles of `MR × NR` elements: the tile of
//! `L·R` is accumulated in f64 registers (FMA where the CPU has it, chosen at run time),
//! scaled, added to the loaded weight, rounded once and stored in place, and the tile's
//! diagnostics sums are accumulated on the way. Nothing is allocated per tile or per
//! element: the extra memory of a merge is the factors `L`, `R` in f64. Threads (std,
//! scoped) split the rows.
//!
//! The CUDA path (feature `cuda`) computes `s·L·R` with candle in f64 on the GPU and hands
//! it to the same fused pass, so rounding is identical.

use patchport_core::safetensors::Dtype;

use crate::device::Device;
use crate::error::EngineError;
use crate::numeric::{Bf16, Elem, F16, F32, F64};

/// Tensors smaller than this are merged on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 18;

/// A low-rank delta `s·L·R` of shape `[rows, cols]`, factors held in f64.
///
/// For a LoRA pair `A [r, in]`, `B [out, r]` on a weight stored `[out, in]`, `L = B` and
/// `R = A`; on a weight stored transposed (`fan_in_fan_out`, embeddings) `L = Aᵀ`,
/// `R = Bᵀ`.
#[derive(Debug, Clone)]
pub struct LowRankDelta {
    rows: usize,
    cols: usize,
    rank: usize,
    scale: f64,
    l: Vec<f64>,
    r: Vec<f64>,
}

impl LowRankDelta {
    /// The delta of a LoRA pair: `A` `[rank, in_features]` and `B` `[out_features, rank]`
    /// row-major, `scale·B·A`, or its transpose when `transpose`.
    pub fn from_lora(
        a: &[f64],
        b: &[f64],
        rank: usize,
        in_features: usize,
        out_features: usize,
        scale: f64,
        transpose: bool,
    ) -> Result<Self, EngineError> {
        if a.len() != rank * in_features || b.len() != out_features * rank || rank == 0 {
            return Err(EngineError::BadTensor {
                tensor: "lora_A/lora_B".to_owned(),
                message: format!(
                    "factor sizes {}/{} do not match rank {rank}, in {in_features}, out {out_features}",
                    a.len(),
                    b.len()
                ),
            });
        }
        if !transpose {
            return Ok(Self {
                rows: out_features,
                cols: in_features,
                rank,
                scale,
                l: b.to_vec(),
                r: a.to_vec(),
            });
        }
        // ΔWᵀ = s·Aᵀ·Bᵀ: L[i][k] = A[k][i], R[k][j] = B[j][k].
        let mut l = vec![0.0; in_features * rank];
        for k in 0..rank {
            for i in 0..in_features {
                l[i * rank + k] = a[k * in_features + i];
            }
        }
        let mut r = vec![0.0; rank * out_features];
        for j in 0..out_features {
            for k in 0..rank {
                r[k * out_features + j] = b[j * rank + k];
            }
        }
        Ok(Self {
            rows: in_features,
            cols: out_features,
            rank,
            scale,
            l,
            r,
        })
    }

    /// Rows of the weight this delta is added to.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the weight this delta is added to.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `L`, `[rows, rank]` row-major.
    pub fn left(&self) -> &[f64] {
        &self.l
    }

    /// `R`, `[rank, cols]` row-major.
    pub fn right(&self) -> &[f64] {
        &self.r
    }

    /// `‖s·L·R‖_F²` from the factors alone: `s²·Σ (LᵀL ∘ RRᵀ)` (rank² work per row).
    pub fn frobenius_sq(&self) -> f64 {
        let k = self.rank;
        let mut ltl = vec![0.0; k * k];
        for row in self.l.chunks_exact(k) {
            for p in 0..k {
                for q in 0..k {
                    ltl[p * k + q] += row[p] * row[q];
                }
            }
        }
        let mut total = 0.0;
        for p in 0..k {
            for q in 0..k {
                let rp = &self.r[p * self.cols..(p + 1) * self.cols];
                let rq = &self.r[q * self.cols..(q + 1) * self.cols];
                let rrt: f64 = rp.iter().zip(rq).map(|(x, y)| x * y).sum();
                total += ltl[p * k + q] * rrt;
            }
        }
        self.scale * self.scale * total
    }
}

/// Sums over the elements of one merged tensor, for the diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeltaStats {
    /// `Σ d²` over the delta `d = s·B·A`.
    pub delta_sq: f64,
    /// `Σ (w_new − w_old)²`.
    pub drift_sq: f64,
    /// `Σ w_old²`.
    pub old_sq: f64,
    /// `Σ d·(w_new − w_old)`.
    pub dot: f64,
}

impl DeltaStats {
    /// Adds another set of sums.
    pub fn add(&mut self, o: &DeltaStats) {
        self.delta_sq += o.delta_sq;
        self.drift_sq += o.drift_sq;
        self.old_sq += o.old_sq;
        self.dot += o.dot;
    }
}

/// Adds `delta` to a weight stored as little-endian `dtype` bytes, in place: each element
/// becomes `round(w + s·Σ_k L[i][k]·R[k][j])` with the sum in f64 and one rounding.
pub fn merge_in_place(
    dtype: Dtype,
    weight: &mut [u8],
    delta: &LowRankDelta,
    device: Device,
) -> Result<DeltaStats, EngineError> {
    merge_tensor(dtype, weight, None, delta, true, device)
}

/// The merge with diagnostics: `new` is the new base's weight of `dtype` (merged in place
/// when `write`), `old` the old base's, either in the same dtype or as f64 (`None` when
/// known equal to `new`).
pub(crate) fn merge_tensor(
    dtype: Dtype,
    new: &mut [u8],
    old: Option<(Dtype, &[u8])>,
    delta: &LowRankDelta,
    write: bool,
    device: Device,
) -> Result<DeltaStats, EngineError> {
    fn with_new<E: Elem>(
        new: &mut [u8],
        old: Option<(Dtype, &[u8])>,
        delta: &LowRankDelta,
        write: bool,
        device: Device,
        dtype: Dtype,
    ) -> Result<DeltaStats, EngineError> {
        match old {
            None => merge_typed::<E, E>(new, None, delta, write, device),
            Some((d, o)) if d == dtype => merge_typed::<E, E>(new, Some(o), delta, write, device),
            Some((Dtype::F64, o)) => merge_typed::<E, F64>(new, Some(o), delta, write, device),
            Some((d, _)) => Err(EngineError::BadTensor {
                tensor: "weight".to_owned(),
                message: format!("old weight of dtype {d:?} must be given as {dtype:?} or F64"),
            }),
        }
    }
    match dtype {
        Dtype::F64 => with_new::<F64>(new, old, delta, write, device, dtype),
        Dtype::F32 => with_new::<F32>(new, old, delta, write, device, dtype),
        Dtype::BF16 => with_new::<Bf16>(new, old, delta, write, device, dtype),
        Dtype::F16 => with_new::<F16>(new, old, delta, write, device, dtype),
        other => Err(EngineError::BadTensor {
            tensor: "weight".to_owned(),
            message: format!("dtype {other:?} cannot take a floating-point delta"),
        }),
    }
}

fn merge_typed<E: Elem, O: Elem>(
    new: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
    device: Device,
) -> Result<DeltaStats, EngineError> {
    let n = delta.rows * delta.cols;
    let bytes = n * E::SIZE;
    if new.len() != bytes || old.is_some_and(|o| o.len() != n * O::SIZE) {
        return Err(EngineError::BadTensor {
            tensor: "weight".to_owned(),
            message: format!(
                "{} bytes for a [{}, {}] weight of {}-byte elements",
                new.len(),
                delta.rows,
                delta.cols,
                E::SIZE
            ),
        });
    }
    match device {
        Device::Cpu => Ok(cpu_merge::<E, O>(new, old, delta, write)),
        Device::Cuda(_) => {
            let d = crate::gpu::delta(device, delta)?;
            let mut stats = DeltaStats::default();
            let cols = delta.cols;
            let old_rows = old.map(|o| o.chunks(cols * O::SIZE));
            let mut old_rows = old_rows.into_iter().flatten();
            for (row, drow) in new.chunks_mut(cols * E::SIZE).zip(d.chunks(cols)) {
                let orow = old_rows.next();
                fused::<E, O>(row, orow, drow, write, &mut stats);
            }
            Ok(stats)
        }
    }
}

fn cpu_merge<E: Elem, O: Elem>(
    new: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    let rows = delta.rows;
    let cols = delta.cols;
    if rows == 0 || cols == 0 {
        return DeltaStats::default();
    }
    let threads = if rows * cols >= PARALLEL_MIN_ELEMS {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows)
    } else {
        1
    };
    let rows_per = rows.div_ceil(threads);
    let chunk = rows_per * cols * E::SIZE;
    if threads == 1 {
        return cpu_rows::<E, O>(0, new, old, delta, write);
    }
    let old_chunk = rows_per * cols * O::SIZE;
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(threads);
        let mut old_chunks = old.map(|o| o.chunks(old_chunk));
        for (t, part) in new.chunks_mut(chunk).enumerate() {
            let opart = old_chunks.as_mut().and_then(Iterator::next);
            handles.push(scope.spawn(move || cpu_rows::<E, O>(t * rows_per, part, opart, delta, write)));
        }
        let mut total = DeltaStats::default();
        for h in handles {
            match h.join() {
                Ok(s) => total.add(&s),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        total
    })
}

/// Merges the rows `[row0, row0 + part.len() / row_bytes)` with the fastest code path
/// this CPU has.
fn cpu_rows<E: Elem, O: Elem>(
    row0: usize,
    part: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return rows_avx2_fma::<E, O>(row0, part, old, delta, write);
        }
        rows_impl::<E, O, false>(row0, part, old, delta, write)
    }
    #[cfg(target_arch = "aarch64")]
    {
        rows_impl::<E, O, true>(row0, part, old, delta, write)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        rows_impl::<E, O, false>(row0, part, old, delta, write)
    }
}

/// [`rows_impl`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn rows_avx2_fma<E: Elem, O: Elem>(
    row0: usize,
    part: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    #[target_feature(enable = "avx2,fma")]
    fn inner<E: Elem, O: Elem>(
        row0: usize,
        part: &mut [u8],
        old: Option<&[u8]>,
        delta: &LowRankDelta,
        write: bool,
    ) -> DeltaStats {
        rows_impl::<E, O, true>(row0, part, old, delta, write)
    }
    // SAFETY: the only caller, `cpu_rows`, checked at run time that this CPU has AVX2
    // and FMA, the features `inner` is compiled for; `inner` itself is safe code.
    unsafe { inner::<E, O>(row0, part, old, delta, write) }
}

/// Rows of a register tile.
const MR: usize = 4;
/// Columns of a register tile (two AVX2 registers of f64).
const NR: usize = 8;
/// Columns of `R` kept hot in L1 while all rows pass over them (`rank × NC × 8` bytes).
const NC: usize = 128;

/// Per-lane partial sums of the diagnostics (independent lanes vectorise; a single
/// running f64 sum is a serial dependency chain).
#[derive(Default)]
struct Lanes {
    dd: [f64; NR],
    rr: [f64; NR],
    oo: [f64; NR],
    dr: [f64; NR],
}

/// The fused kernel over whole rows: for each `MR × NR` tile, accumulate
/// `Σ_k L[i][k]·R[k][j]` in f64 registers (fused multiply-add when `FMA`), scale, add to
/// the loaded weight, round once, store, and add the tile to the diagnostics sums.
/// Columns go in blocks of `NC` so the slice of `R` in use stays in L1.
#[inline(always)]
fn rows_impl<E: Elem, O: Elem, const FMA: bool>(
    row0: usize,
    part: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    let cols = delta.cols;
    let k = delta.rank;
    let nrows = part.len() / (cols * E::SIZE);
    let mut lanes = Lanes::default();
    // `R`'s last `cols % NR` columns, zero-padded to a full tile width.
    let tail = cols % NR;
    let full_end = cols - tail;
    let mut rpad = vec![0.0f64; k * NR];
    for kk in 0..k {
        rpad[kk * NR..kk * NR + tail].copy_from_slice(&delta.r[kk * cols + full_end..(kk + 1) * cols]);
    }
    let mut jb = 0;
    loop {
        let jend = (jb + NC).min(full_end);
        let last = jend == full_end;
        let mut i = 0;
        while i < nrows {
            let mr = MR.min(nrows - i);
            let l = &delta.l[(row0 + i) * k..(row0 + i + mr) * k];
            let mut j = jb;
            while j < jend {
                let t = Tile { i, j, mr, nr: NR, rj: j, r_stride: cols };
                if mr == MR {
                    tile::<E, O, FMA, MR>(&t, l, &delta.r, k, delta.scale, part, old, cols, write, &mut lanes);
                } else {
                    tile::<E, O, FMA, 1>(&t, l, &delta.r, k, delta.scale, part, old, cols, write, &mut lanes);
                }
                j += NR;
            }
            if last && tail > 0 {
                let t = Tile { i, j: full_end, mr, nr: tail, rj: 0, r_stride: NR };
                tile::<E, O, FMA, 1>(&t, l, &rpad, k, delta.scale, part, old, cols, write, &mut lanes);
            }
            i += mr;
        }
        if last {
            break;
        }
        jb = jend;
    }
    let sum = |a: &[f64; NR]| a.iter().sum::<f64>();
    DeltaStats {
        delta_sq: sum(&lanes.dd),
        drift_sq: sum(&lanes.rr),
        old_sq: sum(&lanes.oo),
        dot: sum(&lanes.dr),
    }
}

/// A tile: weight rows `[i, i + mr)` (relative to the part), columns `[j, j + nr)`,
/// reading `R` at column `rj` of rows `r_stride` apart.
struct Tile {
    i: usize,
    j: usize,
    mr: usize,
    nr: usize,
    rj: usize,
    r_stride: usize,
}

/// One tile. `ROWS` is the row count of the register block: `MR` for full tiles
/// (`t.mr == MR`, `t.nr == NR`), 1 for edge tiles, done row by row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<E: Elem, O: Elem, const FMA: bool, const ROWS: usize>(
    t: &Tile,
    l: &[f64],
    r: &[f64],
    k: usize,
    scale: f64,
    w: &mut [u8],
    old: Option<&[u8]>,
    cols: usize,
    write: bool,
    lanes: &mut Lanes,
) {
    let mut a0 = 0;
    while a0 < t.mr {
        let mut acc = [[0.0f64; NR]; ROWS];
        for kk in 0..k {
            let off = kk * t.r_stride + t.rj;
            let rv = &r[off..off + NR];
            for (a, acc_row) in acc.iter_mut().enumerate() {
                let lv = l[(a0 + a) * k + kk];
                for (x, &rb) in acc_row.iter_mut().zip(rv) {
                    *x = if FMA { lv.mul_add(rb, *x) } else { *x + lv * rb };
                }
            }
        }
        for (a, acc_row) in acc.iter().enumerate() {
            let row = t.i + a0 + a;
            let woff = (row * cols + t.j) * E::SIZE;
            let wrow = &mut w[woff..woff + t.nr * E::SIZE];
            match old {
                None => {
                    for (b, wc) in wrow.chunks_exact_mut(E::SIZE).enumerate() {
                        let x = E::load(wc);
                        let d = scale * acc_row[b];
                        lanes.dd[b] += d * d;
                        lanes.oo[b] += x * x;
                        if write {
                            E::store(x + d, wc);
                        }
                    }
                }
                Some(o) => {
                    let ooff = (row * cols + t.j) * O::SIZE;
                    let orow = &o[ooff..ooff + t.nr * O::SIZE];
                    for (b, (wc, oc)) in wrow
                        .chunks_exact_mut(E::SIZE)
                        .zip(orow.chunks_exact(O::SIZE))
                        .enumerate()
                    {
                        let x = E::load(wc);
                        let y = O::load(oc);
                        let d = scale * acc_row[b];
                        let r = x - y;
                        lanes.dd[b] += d * d;
                        lanes.rr[b] += r * r;
                        lanes.oo[b] += y * y;
                        lanes.dr[b] += d * r;
                        if write {
                            E::store(x + d, wc);
                        }
                    }
                }
            }
        }
        a0 += ROWS;
    }
}

/// Lanes of the diagnostics accumulators: independent partial sums let the compiler
/// vectorise the pass (a single running f64 sum is a serial dependency chain).
const LANES: usize = 8;

/// One pass over a block: `w ← round(w + d)` (when `write`) and the diagnostics sums.
#[inline(always)]
fn fused<E: Elem, O: Elem>(w: &mut [u8], old: Option<&[u8]>, d: &[f64], write: bool, stats: &mut DeltaStats) {
    let mut dd = [0.0f64; LANES];
    let mut rr = [0.0f64; LANES];
    let mut oo = [0.0f64; LANES];
    let mut dr = [0.0f64; LANES];
    let step = LANES * E::SIZE;
    let whole = d.len() / LANES * LANES;
    match old {
        None => {
            let (wh, wt) = w.split_at_mut(whole * E::SIZE);
            for (wc, dc) in wh.chunks_exact_mut(step).zip(d.chunks_exact(LANES)) {
                for l in 0..LANES {
                    let x = E::load(&wc[l * E::SIZE..]);
                    let dv = dc[l];
                    dd[l] += dv * dv;
                    oo[l] += x * x;
                    if write {
                        E::store(x + dv, &mut wc[l * E::SIZE..]);
                    }
                }
            }
            for (wc, &dv) in wt.chunks_exact_mut(E::SIZE).zip(&d[whole..]) {
                let x = E::load(wc);
                dd[0] += dv * dv;
                oo[0] += x * x;
                if write {
                    E::store(x + dv, wc);
                }
            }
        }
        Some(o) => {
            let (wh, wt) = w.split_at_mut(whole * E::SIZE);
            let (oh, ot) = o.split_at(whole * O::SIZE);
            for ((wc, oc), dc) in wh
                .chunks_exact_mut(step)
                .zip(oh.chunks_exact(LANES * O::SIZE))
                .zip(d.chunks_exact(LANES))
            {
                for l in 0..LANES {
                    let x = E::load(&wc[l * E::SIZE..]);
                    let y = O::load(&oc[l * O::SIZE..]);
                    let dv = dc[l];
                    let r = x - y;
                    dd[l] += dv * dv;
                    rr[l] += r * r;
                    oo[l] += y * y;
                    dr[l] += dv * r;
                    if write {
                        E::store(x + dv, &mut wc[l * E::SIZE..]);
                    }
                }
            }
            for ((wc, oc), &dv) in wt
                .chunks_exact_mut(E::SIZE)
                .zip(ot.chunks_exact(O::SIZE))
                .zip(&d[whole..])
            {
                let x = E::load(wc);
                let y = O::load(oc);
                let r = x - y;
                dd[0] += dv * dv;
                rr[0] += r * r;
                oo[0] += y * y;
                dr[0] += dv * r;
                if write {
                    E::store(x + dv, wc);
                }
            }
        }
    }
    stats.delta_sq += dd.iter().sum::<f64>();
    stats.drift_sq += rr.iter().sum::<f64>();
    stats.old_sq += oo.iter().sum::<f64>();
    stats.dot += dr.iter().sum::<f64>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frobenius_from_factors_matches_elements() {
        let a: Vec<f64> = (0..3 * 5).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..4 * 3).map(|i| (i as f64 * 0.91).cos()).collect();
        for transpose in [false, true] {
            let d = LowRankDelta::from_lora(&a, &b, 3, 5, 4, 0.5, transpose).unwrap();
            let mut w = vec![0u8; d.rows() * d.cols() * 8];
            let s = merge_in_place(Dtype::F64, &mut w, &d, Device::Cpu).unwrap();
            let direct: f64 = w
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()).powi(2))
                .sum();
            assert!((d.frobenius_sq() - direct).abs() < 1e-12 * direct);
            assert!((s.delta_sq - direct).abs() < 1e-12 * direct);
        }
    }
}
