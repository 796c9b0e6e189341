//! Forward-pass ops that candle lacks, or that save passes over the activations, each a
//! candle `CustomOp` with a CPU kernel (rayon over rows) and, on every other device, the
//! same math from plain candle ops (CUDA never reaches a CPU kernel).
//!
//! - [`Attention`]: each query attends to its ancestors in a [`PrefixTree`] batch. On the
//!   CPU a kernel walks each query's ancestor chain (O(queries × depth)); elsewhere the
//!   dense masked product (O(queries × nodes)).
//! - [`rope_qkv`]: rotary embeddings on the q and k heads of a fused q/k/v projection.
//! - [`add_rms_norm`]: the residual add and the next RMS norm in one pass.
//! - [`silu_mul`]: `silu(gate) · up` over a fused `[rows, 2 · inter]` gate/up projection.
//! - [`exp_f32`], [`exp_f64`]: `exp` without a libm call, so the loops around it vectorise.
//!
//! [`PrefixTree`]: crate::tree::PrefixTree

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::tree::Ancestry;

/// The contiguous f32 elements of a CPU tensor.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: f32 expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: contiguous layout expected")
    };
    match v.get(a..b) {
        Some(v) => Ok(v),
        None => bail!("{what}: layout outside its storage"),
    }
}

/// `Σ a_i b_i` in eight f32 lanes (so it vectorises without reassociation flags).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` in f32 without a libm call, so that loops over it vectorise: `2^n · e^r` with
/// `n = round(x / ln 2)`, `r` reduced in two steps (Cody–Waite) to `|r| ≤ ln 2 / 2`, and
/// `e^r` by its degree-7 Taylor polynomial (truncation < 1e-8 relative). Within 2 ulp of
/// the correctly rounded value for `x` in `[-87.3, 88.3]` (tested); below, it returns
/// `e^-87.3` (≈ 1.2e-38) instead of a subnormal or 0, above, `e^88.3`; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer (|x / ln 2| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.3, 88.3);
    let shifted = c * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `n` sits in the low mantissa bits of `shifted` (integer ops only, so it vectorises):
    // 2^n has the biased exponent n + 127, in [1, 254] here.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if x.is_nan() { x } else { p * scale }
}

/// `e^x` in f64 without a libm call (vectorises): [`exp_f32`]'s method with an f64
/// two-step reduction and the degree-13 Taylor polynomial (truncation < 1e-17 relative).
/// Within 2 ulp for `x` in `[-708, 709]` (tested); below, `e^-708` (≈ 3e-308) instead
/// of a subnormal or 0, above, `e^709`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const C: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let c = x.clamp(-708.0, 709.0);
    let shifted = c * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let mut p = C[13];
    for k in (0..13).rev() {
        p = p * r + C[k];
    }
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(1023);
    let scale = f64::from_bits(biased << 52);
    if x.is_nan() { x } else { p * scale }
}

/// The head layout of a fused `[nodes, (heads + 2 · kv_heads) · d]` q/k/v projection: q
/// heads, then k heads, then v heads, `d` columns each. Grouped-query: q head `h` reads
/// kv head `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) d: usize,
}

impl Heads {
    fn width(self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.d
    }

    fn check(self, qkv: &Tensor) -> Result<usize> {
        let (nodes, w) = qkv.dims2()?;
        if w != self.width()
            || self.d == 0
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            bail!("q/k/v of width {w} do not fit {self:?}")
        }
        Ok(nodes)
    }
}

/// How a batch's queries attend: over ancestor chains (CPU) or with a dense mask.
#[derive(Debug, Clone)]
pub(crate) enum Attention {
    /// The CPU kernel over each query's ancestors.
    Tree(Arc<Ancestry>),
    /// For the matmul path: the `[queries, nodes]` additive mask (0 or `-inf`) and the
    /// query nodes (u32).
    Masked { mask: Tensor, queries: Tensor },
}

impl Attention {
    /// The chain kernel on the CPU, the masked product elsewhere (or when `masked`).
    pub(crate) fn new(ancestry: Ancestry, device: &Device, masked: bool) -> Result<Self> {
        if device.is_cpu() && !masked {
            return Ok(Self::Tree(Arc::new(ancestry)));
        }
        let shape = (ancestry.queries(), ancestry.nodes());
        let queries: Vec<u32> = ancestry.query_nodes().map(|q| q as u32).collect();
        Ok(Self::Masked {
            mask: Tensor::from_vec(ancestry.mask(), shape, device)?,
            queries: Tensor::new(queries.as_slice(), device)?,
        })
    }

    /// Softmax attention of the query nodes over their ancestors, from a fused q/k/v
    /// projection (`[nodes, width]`, see [`Heads`]; rope already applied), scores scaled by
    /// `scale`. Returns `[queries, heads · d]`.
    pub(crate) fn forward(&self, qkv: &Tensor, heads: Heads, scale: f64) -> Result<Tensor> {
        let nodes = heads.check(qkv)?;
        let Heads {
            heads: h,
            kv_heads: g,
            d,
        } = heads;
        match self {
            Self::Tree(ancestry) => {
                if ancestry.nodes() != nodes {
                    bail!(
                        "attention over {nodes} nodes, the tree has {}",
                        ancestry.nodes()
                    )
                }
                let op = TreeAttention {
                    ancestry: Arc::clone(ancestry),
                    heads,
                    scale: scale as f32,
                };
                qkv.contiguous()?.apply_op1_no_bwd(&op)
            }
            Self::Masked { mask, queries } => {
                let nq = queries.dim(0)?;
                let rep = h / g;
                let q = qkv
                    .contiguous()?
                    .index_select(queries, 0)?
                    .narrow(1, 0, h * d)?
                    .reshape((nq, h, d))?
                    .transpose(0, 1)?
                    .contiguous()?;
                let expand = |at: usize| -> Result<Tensor> {
                    let t = qkv
                        .narrow(1, at * d, g * d)?
                        .reshape((nodes, g, d))?
                        .transpose(0, 1)?;
                    if rep == 1 {
                        return t.contiguous();
                    }
                    t.unsqueeze(1)?
                        .expand((g, rep, nodes, d))?
                        .reshape((h, nodes, d))
                };
                let (k, v) = (expand(h)?, expand(h + g)?);
                let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v)?.transpose(0, 1)?.reshape((nq, h * d))
            }
        }
    }
}

/// The CPU kernel of [`Attention::Tree`]: per query (rayon), per head, the scores over
/// the ancestor chain in f32 (scaled like candle's `(q·k) · scale`), their max-shifted
/// exponentials ([`exp_f32`]) summed in f64, and the weighted sum of the values divided by that sum
/// once at the end. Reads q, k and v in place from the fused projection.
struct TreeAttention {
    ancestry: Arc<Ancestry>,
    heads: Heads,
    scale: f32,
}

impl CustomOp1 for TreeAttention {
    fn name(&self) -> &'static str {
        "tree-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32s(s, l, "qkv")?;
        let Heads {
            heads: h,
            kv_heads: g,
            d,
        } = self.heads;
        let w = self.heads.width();
        let nq = self.ancestry.queries();
        if qkv.len() != self.ancestry.nodes() * w {
            bail!("tree-attention: q/k/v size does not match the tree")
        }
        let rep = h / g;
        // The `d` values of head `head` (a column offset) of node `node`; the nodes of an
        // ancestry are below `nodes`, checked above.
        let at = |node: usize, head: usize| -> &[f32] {
            let start = node * w + head * d;
            qkv.get(start..start + d).unwrap_or(&[])
        };
        let mut out = vec![0f32; nq * h * d];
        out.par_chunks_mut(h * d).enumerate().for_each(|(i, out)| {
            let keys = self.ancestry.of(i);
            let Some(&node) = keys.last() else {
                return;
            };
            // Per kv head, the `rep` q heads that read it together: each key and value
            // row is loaded once for all of them.
            let mut w = vec![0f32; rep * keys.len()];
            let mut sums = vec![0f64; rep];
            for (kv, out) in out.chunks_exact_mut(rep * d).enumerate() {
                let mut max = vec![f32::NEG_INFINITY; rep];
                for (jk, &j) in keys.iter().enumerate() {
                    let k = at(j, h + kv);
                    for (r, m) in max.iter_mut().enumerate() {
                        let s = dot(at(node, kv * rep + r), k) * self.scale;
                        w[r * keys.len() + jk] = s;
                        *m = m.max(s);
                    }
                }
                for (r, m) in max.iter().enumerate() {
                    let mut sum = 0f64;
                    for s in &mut w[r * keys.len()..(r + 1) * keys.len()] {
                        *s = exp_f32(*s - m);
                        sum += f64::from(*s);
                    }
                    sums[r] = sum;
                }
                for (jk, &j) in keys.iter().enumerate() {
                    let v = at(j, h + g + kv);
                    for (r, out) in out.chunks_exact_mut(d).enumerate() {
                        let e = w[r * keys.len() + jk];
                        for (o, &x) in out.iter_mut().zip(v) {
                            *o += e * x;
                        }
                    }
                }
                for (out, &sum) in out.chunks_exact_mut(d).zip(&sums) {
                    let inv = (1.0 / sum) as f32;
                    for o in out.iter_mut() {
                        *o *= inv;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((nq, h * d))))
    }
}

/// Rotary embeddings on the q and k heads of a fused q/k/v projection (`[nodes,
/// width]`, see [`Heads`]), node `i` at the angles of row `i` of `cos` and `sin`
/// (`[nodes, d / 2]`); v is copied. The same arithmetic as candle's `rope`.
pub(crate) fn rope_qkv(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: Heads) -> Result<Tensor> {
    let nodes = heads.check(qkv)?;
    if cos.dims() != [nodes, heads.d / 2] || sin.dims() != cos.dims() || !heads.d.is_multiple_of(2)
    {
        bail!(
            "rope tables {:?} for {nodes} nodes of {heads:?}",
            cos.dims()
        )
    }
    if qkv.device().is_cpu() {
        return qkv.contiguous()?.apply_op3_no_bwd(
            &cos.contiguous()?,
            &sin.contiguous()?,
            &RopeQkv { heads },
        );
    }
    let Heads {
        heads: h,
        kv_heads: g,
        d,
    } = heads;
    let rot = |at: usize, n: usize| -> Result<Tensor> {
        let t = qkv.narrow(1, at * d, n * d)?.reshape((1, nodes, n, d))?;
        candle_nn::rotary_emb::rope_thd(&t, cos, sin)?.reshape((nodes, n * d))
    };
    Tensor::cat(
        &[rot(0, h)?, rot(h, g)?, qkv.narrow(1, (h + g) * d, g * d)?],
        1,
    )
}

struct RopeQkv {
    heads: Heads,
}

impl CustomOp3 for RopeQkv {
    fn name(&self) -> &'static str {
        "rope-qkv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (
            f32s(s1, l1, "qkv")?,
            f32s(s2, l2, "cos")?,
            f32s(s3, l3, "sin")?,
        );
        let Heads {
            heads: h,
            kv_heads: g,
            d,
        } = self.heads;
        let (w, half) = (self.heads.width(), d / 2);
        let nodes = l1.shape().dims2()?.0;
        if x.len() != nodes * w || cos.len() != nodes * half || sin.len() != cos.len() {
            bail!("rope-qkv: sizes do not match")
        }
        let mut out = x.to_vec();
        out.par_chunks_mut(w)
            .zip(cos.par_chunks(half))
            .zip(sin.par_chunks(half))
            .for_each(|((row, cos), sin)| {
                for head in row[..(h + g) * d].chunks_exact_mut(d) {
                    let (a, b) = head.split_at_mut(half);
                    for (((x1, x2), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
                        let (v1, v2) = (*x1, *x2);
                        *x1 = v1 * c - v2 * s;
                        *x2 = v1 * s + v2 * c;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + delta` and its RMS norm (`weight`, `eps`), in one pass on the CPU: the residual
/// stream and the next sublayer's input. The same arithmetic as candle's add and
/// candle-nn's `rms_norm`.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (_, hidden) = x.dims2()?;
    if delta.dims() != x.dims() || weight.dims() != [hidden] {
        bail!(
            "add_rms_norm: x {:?}, delta {:?}, weight {:?}",
            x.dims(),
            delta.dims(),
            weight.dims()
        )
    }
    if !x.device().is_cpu() {
        let sum = (x + delta)?;
        let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, delta, alpha) = (
            f32s(s1, l1, "x")?,
            f32s(s2, l2, "delta")?,
            f32s(s3, l3, "weight")?,
        );
        let (rows, n) = l1.shape().dims2()?;
        if n == 0 || x.len() != rows * n || delta.len() != x.len() || alpha.len() != n {
            bail!("add-rms-norm: sizes do not match")
        }
        let mut out = vec![0f32; 2 * rows * n];
        let (sums, normed) = out.split_at_mut(rows * n);
        sums.par_chunks_mut(n)
            .zip(normed.par_chunks_mut(n))
            .zip(x.par_chunks(n).zip(delta.par_chunks(n)))
            .for_each(|((sum, normed), (x, delta))| {
                for ((s, &a), &b) in sum.iter_mut().zip(x).zip(delta) {
                    *s = a + b;
                }
                let sum2 = sum.iter().map(|&v| v * v).sum::<f32>();
                let m = (sum2 / n as f32 + self.eps).sqrt();
                for ((o, &s), &a) in normed.iter_mut().zip(sum.iter()).zip(alpha) {
                    *o = s / m * a;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((2, rows, n))))
    }
}

/// `silu(gate) · up` of a fused projection `[rows, 2 · inter]` (gate columns first):
/// `[rows, inter]`, `silu(g) = g / (1 + e^-g)` as candle computes it, with [`exp_f32`] on
/// the CPU (candle's libm `exp` on other devices).
pub(crate) fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let (_, two) = gate_up.dims2()?;
    if !two.is_multiple_of(2) {
        bail!("silu_mul: odd width {two}")
    }
    let inter = two / 2;
    if gate_up.device().is_cpu() {
        gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
    } else {
        gate_up.narrow(1, 0, inter)?.silu()? * gate_up.narrow(1, inter, inter)?
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "silu_mul")?;
        let (rows, two) = l.shape().dims2()?;
        let inter = two / 2;
        if inter == 0 || x.len() != rows * two {
            bail!("silu_mul: shape {:?}", l.shape())
        }
        let mut out = vec![0f32; rows * inter];
        out.par_chunks_mut(inter)
            .zip(x.par_chunks(two))
            .for_each(|(out, x)| {
                let (gate, up) = x.split_at(inter);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + exp_f32(-g)) * u;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, inter))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::PrefixTree;

    fn rand(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().expect("a").to_vec1().expect("a");
        let b: Vec<f32> = b.flatten_all().expect("b").to_vec1().expect("b");
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn tree_kernel_equals_the_masked_product() {
        let mut t = PrefixTree::new();
        let p = t.extend(None, &[1, 2, 3, 4]);
        t.extend(Some(p[3]), &[5, 6]);
        t.extend(Some(p[3]), &[7]);
        t.extend(Some(p[1]), &[8, 9, 10]);
        t.extend(None, &[11, 12]);
        let n = t.len();
        for heads in [
            Heads {
                heads: 6,
                kv_heads: 2,
                d: 12,
            },
            Heads {
                heads: 3,
                kv_heads: 3,
                d: 5,
            },
        ] {
            let qkv = rand((n, heads.width(), 1), 7)
                .reshape((n, heads.width()))
                .expect("qkv");
            for queries in [(0..n).collect::<Vec<_>>(), vec![n - 1, 5, 2]] {
                let out = |masked: bool| -> Tensor {
                    let a =
                        Attention::new(t.ancestry(&queries), &Device::Cpu, masked).expect("new");
                    a.forward(&qkv, heads, 0.3).expect("forward")
                };
                let (tree, dense) = (out(false), out(true));
                assert_eq!(tree.dims(), [queries.len(), heads.heads * heads.d]);
                let diff = max_diff(&tree, &dense);
                assert!(diff < 1e-6, "tree vs masked: {diff}");
            }
        }
    }

    #[test]
    fn rope_and_add_norm_equal_candle_ops() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            d: 6,
        };
        let n = 40;
        let qkv = rand((n, heads.width(), 1), 3)
            .reshape((n, heads.width()))
            .expect("qkv");
        let cos = rand((n, 3, 1), 4).reshape((n, 3)).expect("cos");
        let sin = rand((n, 3, 1), 5).reshape((n, 3)).expect("sin");
        let got = rope_qkv(&qkv, &cos, &sin, heads).expect("rope");
        let rot = |at: usize, k: usize| {
            let t = qkv
                .narrow(1, at * 6, k * 6)
                .and_then(|t| t.reshape((1, n, k, 6)))
                .expect("narrow");
            candle_nn::rotary_emb::rope_thd(&t, &cos, &sin)
                .and_then(|t| t.reshape((n, k * 6)))
                .expect("rope_thd")
        };
        let want = Tensor::cat(
            &[rot(0, 4), rot(4, 2), qkv.narrow(1, 36, 12).expect("v")],
            1,
        )
        .expect("cat");
        assert_eq!(max_diff(&got, &want), 0.0);

        let x = rand((n, 16, 1), 6).reshape((n, 16)).expect("x");
        let delta = rand((n, 16, 1), 7).reshape((n, 16)).expect("delta");
        let w = rand((16, 1, 1), 8).reshape(16).expect("w");
        let (sum, normed) = add_rms_norm(&x, &delta, &w, 1e-5).expect("add_rms_norm");
        let want_sum = (&x + &delta).expect("sum");
        let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).expect("rms");
        assert_eq!(max_diff(&sum, &want_sum), 0.0);
        assert_eq!(max_diff(&normed, &want), 0.0);
    }

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 88.3 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(
            worst < 2.0 * f64::from(f32::EPSILON),
            "relative error {worst:e}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1e30) >= 0.0 && exp_f32(-1e30) < 2e-38);
        assert!(exp_f32(1e30).is_finite());
    }

    #[test]
    fn exp_f64_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -708.0f64;
        while x <= 709.0 {
            let want = x.exp();
            worst = worst.max(((exp_f64(x) - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.0 * f64::EPSILON, "relative error {worst:e}");
        assert_eq!(exp_f64(0.0), 1.0);
        assert!(exp_f64(f64::NAN).is_nan());
        assert!(exp_f64(-1e300) >= 0.0 && exp_f64(-1e300) < 1e-307);
        assert!(exp_f64(1e300).is_finite());
    }

    #[test]
    fn silu_mul_equals_candle_ops() {
        let x = rand((50, 2, 7), 9).reshape((50, 14)).expect("reshape");
        let want = (x.narrow(1, 0, 7).expect("g").silu().expect("silu")
            * x.narrow(1, 7, 7).expect("u"))
        .expect("mul");
        let got = silu_mul(&x).expect("silu_mul");
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (got.to_vec2().expect("a"), want.to_vec2().expect("b"));
        for (a, b) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let mut t = PrefixTree::new();
        t.extend(None, &[1, 2]);
        let a = Attention::new(t.ancestry(&[0, 1]), &Device::Cpu, false).expect("new");
        let heads = Heads {
            heads: 2,
            kv_heads: 1,
            d: 4,
        };
        let qkv = |n: usize, w: usize| rand((n, w, 1), 1).reshape((n, w)).expect("qkv");
        assert!(a.forward(&qkv(2, 16), heads, 1.0).is_ok());
        assert!(a.forward(&qkv(3, 16), heads, 1.0).is_err());
        assert!(a.forward(&qkv(2, 15), heads, 1.0).is_err());
        let odd = Heads {
            heads: 3,
            kv_heads: 2,
            d: 4,
        };
        assert!(a.forward(&qkv(2, 28), odd, 1.0).is_err());
        let cs = qkv(2, 2);
        assert!(rope_qkv(&qkv(2, 16), &cs, &cs, heads).is_ok());
        assert!(rope_qkv(&qkv(2, 16), &qkv(3, 2), &qkv(3, 2), heads).is_err());
        assert!(add_rms_norm(&qkv(2, 4), &qkv(2, 3), &rand((4, 1, 1), 1), 1e-5).is_err());
        assert!(silu_mul(&rand((2, 1, 3), 1).reshape((2, 3)).expect("r")).is_err());
    }
}
