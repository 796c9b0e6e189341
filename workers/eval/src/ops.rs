//! Forward-pass ops that candle lacks or runs single-threaded on the CPU, each a candle
//! `CustomOp` with a CPU kernel (rayon over rows) and, on every other device, the same
//! math from plain candle ops.
//!
//! - [`Attention`]: each query attends to its ancestors in a [`PrefixTree`] batch. On the
//!   CPU a kernel walks each query's ancestor chain (O(queries × depth)); elsewhere the
//!   dense masked product (O(queries × nodes)).
//! - [`silu_mul`]: `silu(gate) · up` over a fused `[rows, 2 · inter]` gate/up projection.
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

/// `Σ a_i b_i`, products and sum in f64 (eight lanes, so it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f64::from(x[l]) * f64::from(y[l]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// How a batch's queries attend: over ancestor chains (CPU) or with a dense mask.
#[derive(Debug, Clone)]
pub(crate) enum Attention {
    /// The CPU kernel over each query's ancestors.
    Tree(Arc<Ancestry>),
    /// `[queries, nodes]` additive mask (0 or `-inf`), for the matmul path.
    Masked(Tensor),
}

impl Attention {
    /// The chain kernel on the CPU, the masked product elsewhere (or when `masked`).
    pub(crate) fn new(ancestry: Ancestry, device: &Device, masked: bool) -> Result<Self> {
        if device.is_cpu() && !masked {
            return Ok(Self::Tree(Arc::new(ancestry)));
        }
        let shape = (ancestry.queries(), ancestry.nodes());
        Ok(Self::Masked(Tensor::from_vec(
            ancestry.mask(),
            shape,
            device,
        )?))
    }

    /// Softmax attention of `q` (`[queries, heads, d]`) over `k` and `v` (`[nodes,
    /// kv_heads, d]`, grouped-query: head `h` reads kv head `h / (heads / kv_heads)`),
    /// scores scaled by `scale`. Returns `[queries, heads · d]`.
    pub(crate) fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (nq, heads, d) = q.dims3()?;
        let (nodes, kv_heads, dk) = k.dims3()?;
        if dk != d || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
            bail!(
                "attention shapes: q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        match self {
            Self::Tree(ancestry) => {
                if ancestry.queries() != nq || ancestry.nodes() != nodes {
                    bail!(
                        "attention: {nq} queries over {nodes} nodes, the tree has {} over {}",
                        ancestry.queries(),
                        ancestry.nodes()
                    )
                }
                let op = TreeAttention {
                    ancestry: Arc::clone(ancestry),
                    heads,
                    kv_heads,
                    d,
                    scale,
                };
                q.contiguous()?
                    .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
            }
            Self::Masked(mask) => {
                let rep = heads / kv_heads;
                let q = q.transpose(0, 1)?.contiguous()?;
                let expand = |t: &Tensor| -> Result<Tensor> {
                    let t = t.transpose(0, 1)?;
                    if rep == 1 {
                        return t.contiguous();
                    }
                    t.unsqueeze(1)?
                        .expand((kv_heads, rep, nodes, d))?
                        .reshape((heads, nodes, d))
                };
                let (k, v) = (expand(k)?, expand(v)?);
                let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v)?.transpose(0, 1)?.reshape((nq, heads * d))
            }
        }
    }
}

/// The CPU kernel of [`Attention::Tree`]: per query (rayon), per head, the scores over
/// the ancestor chain, their max-shifted exponentials, their sum and the weighted sum of
/// the values, all in f64 (one rounding to f32 at the end; the chains are short, so this
/// costs little next to the projections).
struct TreeAttention {
    ancestry: Arc<Ancestry>,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f64,
}

impl CustomOp3 for TreeAttention {
    fn name(&self) -> &'static str {
        "tree-attention"
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
        let (q, k, v) = (f32s(s1, l1, "q")?, f32s(s2, l2, "k")?, f32s(s3, l3, "v")?);
        let (h, g, d) = (self.heads, self.kv_heads, self.d);
        let (nq, nodes) = (self.ancestry.queries(), self.ancestry.nodes());
        if q.len() != nq * h * d || k.len() != nodes * g * d || v.len() != k.len() {
            bail!("tree-attention: buffer sizes do not match the tree")
        }
        let rep = h / g;
        let mut out = vec![0f32; nq * h * d];
        out.par_chunks_mut(h * d)
            .zip(q.par_chunks(h * d))
            .enumerate()
            .for_each(|(i, (out, q))| {
                let keys = self.ancestry.of(i);
                let mut w = vec![0f64; keys.len()];
                let mut acc = vec![0f64; d];
                for ((head, out), q) in out.chunks_exact_mut(d).enumerate().zip(q.chunks_exact(d)) {
                    let kv = head / rep;
                    fn row(t: &[f32], at: usize, d: usize) -> &[f32] {
                        t.get(at..at + d).unwrap_or(&[])
                    }
                    let mut max = f64::NEG_INFINITY;
                    for (w, &j) in w.iter_mut().zip(keys) {
                        *w = dot(q, row(k, (j * g + kv) * d, d)) * self.scale;
                        max = max.max(*w);
                    }
                    acc.fill(0.0);
                    let mut sum = 0f64;
                    for (w, &j) in w.iter().zip(keys) {
                        let e = (w - max).exp();
                        sum += e;
                        for (a, &x) in acc.iter_mut().zip(row(v, (j * g + kv) * d, d)) {
                            *a += e * f64::from(x);
                        }
                    }
                    for (o, a) in out.iter_mut().zip(&acc) {
                        *o = (a / sum) as f32;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((nq, h * d))))
    }
}

/// `silu(gate) · up` of a fused projection `[rows, 2 · inter]` (gate columns first):
/// `[rows, inter]`, in f32 as candle computes `silu` then the product.
pub(crate) fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let (_, two) = gate_up.dims2()?;
    if two % 2 != 0 {
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
                    *o = g / (1.0 + (-g).exp()) * u;
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

    #[test]
    fn tree_kernel_equals_the_masked_product() {
        let mut t = PrefixTree::new();
        let p = t.extend(None, &[1, 2, 3, 4]);
        t.extend(Some(p[3]), &[5, 6]);
        t.extend(Some(p[3]), &[7]);
        t.extend(Some(p[1]), &[8, 9, 10]);
        t.extend(None, &[11, 12]);
        let n = t.len();
        let (heads, kv, d) = (6, 2, 12);
        let (k, v) = (rand((n, kv, d), 2), rand((n, kv, d), 3));
        for queries in [(0..n).collect::<Vec<_>>(), vec![n - 1, 5, 2]] {
            let q = rand((queries.len(), heads, d), 1);
            let out = |masked: bool| -> Vec<Vec<f32>> {
                let a = Attention::new(t.ancestry(&queries), &Device::Cpu, masked).expect("new");
                a.forward(&q, &k, &v, 0.3)
                    .expect("forward")
                    .to_vec2()
                    .expect("vec")
            };
            let (tree, dense) = (out(false), out(true));
            let diff = tree
                .iter()
                .flatten()
                .zip(dense.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "tree vs masked: {diff}");
        }
    }

    #[test]
    fn silu_mul_equals_candle_ops() {
        let x = rand((5, 2, 7), 9).reshape((5, 14)).expect("reshape");
        let want = (x.narrow(1, 0, 7).expect("g").silu().expect("silu")
            * x.narrow(1, 7, 7).expect("u"))
        .expect("mul");
        let got = silu_mul(&x).expect("silu_mul");
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (got.to_vec2().expect("a"), want.to_vec2().expect("b"));
        assert_eq!(a, b);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let mut t = PrefixTree::new();
        t.extend(None, &[1, 2]);
        let a = Attention::new(t.ancestry(&[0, 1]), &Device::Cpu, false).expect("new");
        let k = rand((2, 2, 4), 1);
        assert!(a.forward(&rand((3, 2, 4), 2), &k, &k, 1.0).is_err());
        assert!(a.forward(&rand((2, 3, 4), 2), &k, &k, 1.0).is_err());
        assert!(silu_mul(&rand((2, 1, 3), 1).reshape((2, 3)).expect("r")).is_err());
    }
}
