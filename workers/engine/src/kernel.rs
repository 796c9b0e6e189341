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

/// Sums over the elements of one merged tensor, for the diagnostics (core's type: they
/// are stored with a port's diagnostics, so a later port can reuse them).
pub use patchport_core::port::DeltaStats;

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
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(rows)
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
            handles.push(
                scope.spawn(move || cpu_rows::<E, O>(t * rows_per, part, opart, delta, write)),
            );
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
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return rows_avx512::<E, O>(row0, part, old, delta, write);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return rows_avx2_fma::<E, O>(row0, part, old, delta, write);
        }
        rows_impl::<E, O, false, 4, 8>(row0, part, old, delta, write)
    }
    #[cfg(target_arch = "aarch64")]
    {
        rows_impl::<E, O, true, 4, 8>(row0, part, old, delta, write)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        rows_impl::<E, O, false, 4, 8>(row0, part, old, delta, write)
    }
}

/// [`rows_impl`] compiled for AVX2 and FMA: `4 × 8` tiles (eight 4-lane accumulators).
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
        rows_impl::<E, O, true, 4, 8>(row0, part, old, delta, write)
    }
    // SAFETY: the only caller, `cpu_rows`, checked at run time that this CPU has AVX2
    // and FMA, the features `inner` is compiled for; `inner` itself is safe code.
    unsafe { inner::<E, O>(row0, part, old, delta, write) }
}

/// [`rows_impl`] compiled for AVX-512: `8 × 8` tiles, eight 8-lane accumulators (one
/// register per tile row; twice the lanes of AVX2, and `R`'s registers reused over twice
/// the rows). The same operations in the same order as the AVX2 path, so the same bytes.
/// (`8 × 16` tiles measured several times slower: the tile spills out of the registers.)
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn rows_avx512<E: Elem, O: Elem>(
    row0: usize,
    part: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn inner<E: Elem, O: Elem>(
        row0: usize,
        part: &mut [u8],
        old: Option<&[u8]>,
        delta: &LowRankDelta,
        write: bool,
    ) -> DeltaStats {
        rows_impl::<E, O, true, 8, 8>(row0, part, old, delta, write)
    }
    // SAFETY: the only caller, `cpu_rows`, checked at run time that this CPU has
    // AVX-512F, AVX2 and FMA, the features `inner` is compiled for; `inner` itself is
    // safe code.
    unsafe { inner::<E, O>(row0, part, old, delta, write) }
}

/// Columns of `R` packed and kept in L2 while all rows pass over them (`rank × NC × 8`
/// bytes: 128 KiB at rank 16); each row's segment of the weight is then a page-sized
/// sequential run (4 KiB of f32), which the prefetchers follow. Measured on a 2-core
/// VM: 128 and 4096 were both slower.
const NC: usize = 1024;

/// Per-lane partial sums of the diagnostics (independent lanes vectorise; a single
/// running f64 sum is a serial dependency chain).
struct Lanes<const NR: usize> {
    dd: [f64; NR],
    rr: [f64; NR],
    oo: [f64; NR],
    dr: [f64; NR],
}

/// The fused kernel over whole rows, on register tiles of `MR × NR` elements. For each
/// block of `NC` columns, `R`'s block is packed tile by tile (`[tile][k][NR]`,
/// zero-padded at the right edge); for each group of `MR` rows, `L`'s rows are packed
/// `[k][MR]`; then each `MR × NR` tile of `L·R` is accumulated in f64 registers (fused
/// multiply-add when `FMA`, `k` in order), scaled, added to the loaded weight, rounded
/// once and stored, and its diagnostics sums accumulated. The packing buffers are
/// allocated once per call (per thread and tensor).
#[inline(always)]
fn rows_impl<E: Elem, O: Elem, const FMA: bool, const MR: usize, const NR: usize>(
    row0: usize,
    part: &mut [u8],
    old: Option<&[u8]>,
    delta: &LowRankDelta,
    write: bool,
) -> DeltaStats {
    let cols = delta.cols;
    let k = delta.rank;
    let nrows = part.len() / (cols * E::SIZE);
    let mut lanes = Lanes::<NR> {
        dd: [0.0; NR],
        rr: [0.0; NR],
        oo: [0.0; NR],
        dr: [0.0; NR],
    };
    let mut rpack = vec![0.0f64; NC.div_ceil(NR) * k * NR];
    let mut lpack = vec![0.0f64; k * MR];
    let mut jb = 0;
    while jb < cols {
        let nc = NC.min(cols - jb);
        let tiles = nc.div_ceil(NR);
        for t in 0..tiles {
            let j = jb + t * NR;
            let nr = NR.min(cols - j);
            for kk in 0..k {
                let dst = &mut rpack[(t * k + kk) * NR..(t * k + kk + 1) * NR];
                dst[..nr].copy_from_slice(&delta.r[kk * cols + j..kk * cols + j + nr]);
                dst[nr..].fill(0.0);
            }
        }
        let mut i = 0;
        while i < nrows {
            let mr = MR.min(nrows - i);
            for kk in 0..k {
                for a in 0..MR {
                    lpack[kk * MR + a] = if a < mr {
                        delta.l[(row0 + i + a) * k + kk]
                    } else {
                        0.0
                    };
                }
            }
            for t in 0..tiles {
                let j = jb + t * NR;
                let nr = NR.min(cols - j);
                let rtile = &rpack[t * k * NR..(t + 1) * k * NR];
                let acc = tile_product::<FMA, MR, NR>(rtile, &lpack);
                let at = At {
                    i,
                    j,
                    cols,
                    scale: delta.scale,
                    write,
                };
                match (mr == MR && nr == NR, old) {
                    (true, None) => tile_store_same::<E, MR, NR>(&acc, &at, part, &mut lanes),
                    (true, Some(o)) => tile_store::<E, O, MR, NR, true>(
                        &acc,
                        &at,
                        MR,
                        NR,
                        part,
                        Some(o),
                        &mut lanes,
                    ),
                    (false, _) => {
                        tile_store::<E, O, MR, NR, false>(&acc, &at, mr, nr, part, old, &mut lanes)
                    }
                }
            }
            i += mr;
        }
        jb += nc;
    }
    let sum = |a: &[f64; NR]| a.iter().sum::<f64>();
    DeltaStats {
        delta_sq: sum(&lanes.dd),
        drift_sq: sum(&lanes.rr),
        old_sq: sum(&lanes.oo),
        dot: sum(&lanes.dr),
    }
}

/// `Σ_k L[a][k]·R[k][b]` for one `MR × NR` tile from packed panels.
#[inline(always)]
fn tile_product<const FMA: bool, const MR: usize, const NR: usize>(
    rtile: &[f64],
    lpack: &[f64],
) -> [[f64; NR]; MR] {
    let mut acc = [[0.0f64; NR]; MR];
    let (rs, _) = rtile.as_chunks::<NR>();
    let (ls, _) = lpack.as_chunks::<MR>();
    for (rv, lv) in rs.iter().zip(ls) {
        for (acc_row, &l) in acc.iter_mut().zip(lv) {
            for (x, &r) in acc_row.iter_mut().zip(rv) {
                *x = if FMA { l.mul_add(r, *x) } else { *x + l * r };
            }
        }
    }
    acc
}

/// Where a tile lands: weight rows from `i` (relative to the part), columns from `j`.
struct At {
    i: usize,
    j: usize,
    cols: usize,
    scale: f64,
    write: bool,
}

/// [`tile_store`] of a full tile when the old weight is the new one (a plain merge):
/// the drift `w_new − w_old` is zero, so only `Σ d²` and `Σ w²` are accumulated.
#[inline(always)]
fn tile_store_same<E: Elem, const MR: usize, const NR: usize>(
    acc: &[[f64; NR]; MR],
    at: &At,
    w: &mut [u8],
    lanes: &mut Lanes<NR>,
) {
    for (a, acc_row) in acc.iter().enumerate() {
        let woff = ((at.i + a) * at.cols + at.j) * E::SIZE;
        let wrow = &mut w[woff..woff + NR * E::SIZE];
        let x = E::load_n::<NR>(wrow);
        let d: [f64; NR] = std::array::from_fn(|b| at.scale * acc_row[b]);
        for b in 0..NR {
            lanes.dd[b] += d[b] * d[b];
            lanes.oo[b] += x[b] * x[b];
        }
        if at.write {
            let out: [f64; NR] = std::array::from_fn(|b| x[b] + d[b]);
            E::store_n::<NR>(&out, wrow);
        }
    }
}

/// Adds a tile of `L·R` (scaled) to the weight, rounding once, and accumulates the
/// diagnostics. `FULL`: the tile is `MR × NR` (constant bounds, vectorised); otherwise
/// `mr × nr` at an edge.
#[inline(always)]
fn tile_store<E: Elem, O: Elem, const MR: usize, const NR: usize, const FULL: bool>(
    acc: &[[f64; NR]; MR],
    at: &At,
    mr: usize,
    nr: usize,
    w: &mut [u8],
    old: Option<&[u8]>,
    lanes: &mut Lanes<NR>,
) {
    if FULL {
        for (a, acc_row) in acc.iter().enumerate() {
            let row = at.i + a;
            let woff = (row * at.cols + at.j) * E::SIZE;
            let wrow = &mut w[woff..woff + NR * E::SIZE];
            let x = E::load_n::<NR>(wrow);
            let d: [f64; NR] = std::array::from_fn(|b| at.scale * acc_row[b]);
            let y = match old {
                None => x,
                Some(o) => {
                    let ooff = (row * at.cols + at.j) * O::SIZE;
                    O::load_n::<NR>(&o[ooff..ooff + NR * O::SIZE])
                }
            };
            for b in 0..NR {
                let r = x[b] - y[b];
                lanes.dd[b] += d[b] * d[b];
                lanes.rr[b] += r * r;
                lanes.oo[b] += y[b] * y[b];
                lanes.dr[b] += d[b] * r;
            }
            if at.write {
                let out: [f64; NR] = std::array::from_fn(|b| x[b] + d[b]);
                E::store_n::<NR>(&out, wrow);
            }
        }
        return;
    }
    for (a, acc_row) in acc.iter().enumerate().take(mr) {
        let row = at.i + a;
        let woff = (row * at.cols + at.j) * E::SIZE;
        let ooff = (row * at.cols + at.j) * O::SIZE;
        for b in 0..nr {
            let wc = &mut w[woff + b * E::SIZE..woff + (b + 1) * E::SIZE];
            let x = E::load(wc);
            let y = old.map_or(x, |o| O::load(&o[ooff + b * O::SIZE..]));
            let d = at.scale * acc_row[b];
            let r = if old.is_some() { x - y } else { 0.0 };
            lanes.dd[b] += d * d;
            lanes.rr[b] += r * r;
            lanes.oo[b] += y * y;
            lanes.dr[b] += d * r;
            if at.write {
                E::store(x + d, wc);
            }
        }
    }
}

/// Lanes of the diagnostics accumulators: independent partial sums let the compiler
/// vectorise the pass (a single running f64 sum is a serial dependency chain).
const LANES: usize = 8;

/// One pass over a block: `w ← round(w + d)` (when `write`) and the diagnostics sums.
#[inline(always)]
fn fused<E: Elem, O: Elem>(
    w: &mut [u8],
    old: Option<&[u8]>,
    d: &[f64],
    write: bool,
    stats: &mut DeltaStats,
) {
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

    /// Every SIMD code path this CPU can run gives the same bytes and sums as the AVX2
    /// one (the tests in `tests/kernel.rs` check whichever path `cpu_rows` picks against
    /// the f64 reference): 8×8 and 4×8 tiles, the same fused multiply-adds in the same
    /// order. Ragged rows and columns, several column blocks, with and without an old
    /// weight.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_and_avx2_paths_give_the_same_bytes() {
        let has = |f: &str| match f {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            _ => std::arch::is_x86_feature_detected!("fma"),
        };
        if !(has("avx512f") && has("avx2") && has("fma")) {
            eprintln!("skipped: this CPU lacks AVX-512F, AVX2 or FMA");
            return;
        }
        let (rows, cols, rank) = (21usize, 2100usize, 5usize);
        let a: Vec<f64> = (0..rank * cols)
            .map(|i| (i as f64 * 0.37).sin() * 0.1)
            .collect();
        let b: Vec<f64> = (0..rows * rank)
            .map(|i| (i as f64 * 0.91).cos() * 0.1)
            .collect();
        let d = LowRankDelta::from_lora(&a, &b, rank, cols, rows, 1.7, false).unwrap();
        fn both<E: Elem>(d: &LowRankDelta, w: &[u8], old: Option<&[u8]>) {
            let mut w1 = w.to_vec();
            let mut w2 = w.to_vec();
            let s1 = rows_avx512::<E, E>(0, &mut w1, old, d, true);
            let s2 = rows_avx2_fma::<E, E>(0, &mut w2, old, d, true);
            assert!(w1 == w2, "{} bytes per element: the paths differ", E::SIZE);
            // The lane sums are reduced in a different grouping (other tile shapes).
            for (x, y) in [
                (s1.delta_sq, s2.delta_sq),
                (s1.drift_sq, s2.drift_sq),
                (s1.old_sq, s2.old_sq),
                (s1.dot, s2.dot),
            ] {
                assert!((x - y).abs() <= 1e-12 * x.abs().max(y.abs()), "{x} vs {y}");
            }
        }
        let n = rows * cols;
        let vals: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 % 1009) as f64 - 504.0) * 1e-3)
            .collect();
        let olds: Vec<f64> = vals.iter().map(|v| v * 0.97 + 1e-4).collect();
        let enc = |dtype: Dtype, v: &[f64]| {
            let mut out = Vec::new();
            for &x in v {
                crate::numeric::encode_once(dtype, x, &mut out).unwrap();
            }
            out
        };
        for dtype in [Dtype::F64, Dtype::F32, Dtype::BF16, Dtype::F16] {
            let w = enc(dtype, &vals);
            let o = enc(dtype, &olds);
            for old in [None, Some(o.as_slice())] {
                match dtype {
                    Dtype::F64 => both::<F64>(&d, &w, old),
                    Dtype::F32 => both::<F32>(&d, &w, old),
                    Dtype::BF16 => both::<Bf16>(&d, &w, old),
                    _ => both::<F16>(&d, &w, old),
                }
            }
        }
    }

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
