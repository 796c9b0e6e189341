//! The forward pass: our own small decoder on candle-core/candle-nn ops, for the Llama
//! family (Llama, SmolLM, Mistral), Qwen2 and GPT-2.
//!
//! Why not candle-transformers' models: its Llama returns the logits of the last position
//! only and takes no attention mask, derives the head width as `hidden / heads` (ignoring
//! `head_dim`), and reads `rope_theta` only from the top level of `config.json`
//! (transformers 5 keeps it in `rope_parameters`; candle falls back to 10000 silently);
//! it has no GPT-2 at all. Scoring needs the log-probabilities at every continuation
//! position, so this module computes hidden states for all positions of a call and
//! projects only the rows it is asked for onto the vocabulary.
//!
//! Scoring runs items in packed prefix-tree batches ([`PrefixTree`],
//! [`Model::forward_tree`]): the distinct token prefixes of many items' prompts and
//! choices, one node each, every node attending to its ancestors and itself, so a shared
//! prefix (an item's prompt for all its choices, a beginning several prompts share) is
//! computed once, nothing is padded, and every weight pass serves many items; the head
//! runs only on the nodes whose next token is scored. [`Model::forward`] runs one
//! unpadded sequence, optionally after a [`KvCache`] of an earlier call on the same
//! sequence (the cache is not modified): the one-sequence reference the tests compare
//! the batches to. Both use the same weights (q/k/v and gate/up fused into one matmul
//! each at load).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

use crate::config::{Activation, ArchConfig, Family};
use crate::error::EvalError;
use crate::ops::{self, Attention, Heads};
use crate::tree::PrefixTree;

/// Keys and values of every layer for the positions seen so far, `[1, kv_heads, T, d]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
enum Norm {
    Rms {
        weight: Tensor,
        eps: f32,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f32,
    },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Rms { weight, eps } => candle_nn::ops::rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } => candle_nn::ops::layer_norm(x, weight, bias, *eps),
        }
    }

    /// The residual `x + delta` and its norm (RMS: one fused pass on the CPU).
    fn add_forward(&self, x: &Tensor, delta: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Norm::Rms { weight, eps } => ops::add_rms_norm(x, delta, weight, *eps),
            Norm::Layer { .. } => {
                let sum = (x + delta)?;
                let normed = self.forward(&sum)?;
                Ok((sum, normed))
            }
        }
    }
}

#[derive(Debug)]
enum Mlp {
    /// `down(silu(gate(x)) · up(x))`, gate and up fused into one `[2 · inter, hidden]`
    /// projection (gate rows first): one matmul instead of two.
    Gated { gate_up: Linear, down: Linear },
    Plain {
        fc: Linear,
        proj: Linear,
        act: Activation,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Gated { gate_up, down } => down.forward(&ops::silu_mul(&gate_up.forward(x)?)?),
            Mlp::Plain { fc, proj, act } => {
                let h = fc.forward(x)?;
                let h = match act {
                    Activation::GeluTanh => h.gelu()?,
                    Activation::GeluErf => h.gelu_erf()?,
                    Activation::Silu => h.silu()?,
                };
                proj.forward(&h)
            }
        }
    }
}

#[derive(Debug)]
struct Block {
    ln1: Norm,
    ln2: Norm,
    /// q, k and v fused into one `[(heads + 2 · kv_heads) · d, hidden]` projection.
    qkv: Linear,
    o: Linear,
    mlp: Mlp,
    /// `1 / sqrt(d)`, times `1 / (layer + 1)` for GPT-2's inverse-layer scaling.
    attn_scale: f64,
}

/// A loaded decoder, weights in f32.
#[derive(Debug)]
pub struct Model {
    cfg: ArchConfig,
    device: Device,
    embed: Tensor,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Norm,
    head: Tensor,
    inv_freq: Vec<f32>,
}

/// Takes named tensors out of a weight map, checking their shapes.
struct Take<'a> {
    weights: &'a mut HashMap<String, Tensor>,
    dir: &'a Path,
}

impl Take<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, EvalError> {
        let t = self
            .weights
            .remove(name)
            .ok_or_else(|| EvalError::Weights {
                path: self.dir.to_owned(),
                message: format!("missing tensor {name}"),
            })?;
        if t.dims() != shape {
            return Err(EvalError::Weights {
                path: self.dir.to_owned(),
                message: format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    t.dims()
                ),
            });
        }
        Ok(t)
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, EvalError> {
        let w = self.get(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(w, b))
    }

    fn rows(&self, name: &str, cols: usize) -> Result<usize, EvalError> {
        match self.weights.get(name).map(Tensor::dims) {
            Some([rows, c]) if *c == cols => Ok(*rows),
            Some(shape) => Err(EvalError::Weights {
                path: self.dir.to_owned(),
                message: format!("tensor {name} has shape {shape:?}, expected [_, {cols}]"),
            }),
            None => Err(EvalError::Weights {
                path: self.dir.to_owned(),
                message: format!("missing tensor {name}"),
            }),
        }
    }
}

/// The GPT-2 tensor prefix: `transformer.` (GPT2LMHeadModel) or none (GPT2Model).
fn gpt2_prefix(weights: &HashMap<String, Tensor>) -> &'static str {
    if weights.contains_key("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    }
}

/// GPT-2 stores its Conv1D weights `[in, out]`; turn them into `[out, in]` like every
/// other linear layer, so LoRA deltas `B·A` (`[out, in]`) add to them directly.
pub(crate) fn normalize_layout(
    cfg: &ArchConfig,
    weights: &mut HashMap<String, Tensor>,
) -> Result<(), EvalError> {
    if cfg.family != Family::Gpt2 {
        return Ok(());
    }
    let p = gpt2_prefix(weights);
    for i in 0..cfg.num_layers {
        for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
            let key = format!("{p}h.{i}.{m}.weight");
            if let Some(t) = weights.get(&key) {
                let t = t.t()?.contiguous()?;
                weights.insert(key, t);
            }
        }
    }
    Ok(())
}

/// One linear layer computing `parts` side by side: their weights stacked along the
/// output rows (and their biases, if they all have one).
fn fuse(parts: &[Linear]) -> Result<Linear, EvalError> {
    let weights: Vec<&Tensor> = parts.iter().map(Linear::weight).collect();
    let biases: Option<Vec<&Tensor>> = parts.iter().map(Linear::bias).collect();
    let bias = match biases {
        Some(b) => Some(Tensor::cat(&b, 0)?),
        None if parts.iter().any(|p| p.bias().is_some()) => {
            return Err(candle_core::Error::Msg("fused layers mix biases".to_owned()).into());
        }
        None => None,
    };
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

impl Model {
    /// Builds the model from f32 weights already in `[out, in]` layout (see
    /// [`normalize_layout`]) and merged with any adapter.
    pub(crate) fn build(
        cfg: ArchConfig,
        mut weights: HashMap<String, Tensor>,
        dir: &Path,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let mut take = Take {
            weights: &mut weights,
            dir,
        };
        let h = cfg.hidden_size;
        let eps = cfg.norm_eps as f32;
        let (embed, positions, blocks, final_norm) = match cfg.family {
            Family::Llama | Family::Qwen2 => {
                let vocab = take.rows("model.embed_tokens.weight", h)?;
                let embed = take.get("model.embed_tokens.weight", &[vocab, h])?;
                let (nh, nkv, d, im) = (
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    cfg.intermediate_size,
                );
                let mut blocks = Vec::with_capacity(cfg.num_layers);
                for i in 0..cfg.num_layers {
                    let p = format!("model.layers.{i}");
                    let rms = |t: Tensor| Norm::Rms { weight: t, eps };
                    blocks.push(Block {
                        ln1: rms(take.get(&format!("{p}.input_layernorm.weight"), &[h])?),
                        ln2: rms(take.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?),
                        qkv: fuse(&[
                            take.linear(&format!("{p}.self_attn.q_proj"), nh * d, h, cfg.qkv_bias)?,
                            take.linear(
                                &format!("{p}.self_attn.k_proj"),
                                nkv * d,
                                h,
                                cfg.qkv_bias,
                            )?,
                            take.linear(
                                &format!("{p}.self_attn.v_proj"),
                                nkv * d,
                                h,
                                cfg.qkv_bias,
                            )?,
                        ])?,
                        o: take.linear(&format!("{p}.self_attn.o_proj"), h, nh * d, cfg.o_bias)?,
                        mlp: Mlp::Gated {
                            gate_up: fuse(&[
                                take.linear(&format!("{p}.mlp.gate_proj"), im, h, cfg.mlp_bias)?,
                                take.linear(&format!("{p}.mlp.up_proj"), im, h, cfg.mlp_bias)?,
                            ])?,
                            down: take.linear(
                                &format!("{p}.mlp.down_proj"),
                                h,
                                im,
                                cfg.mlp_bias,
                            )?,
                        },
                        attn_scale: 1.0 / (d as f64).sqrt(),
                    });
                }
                let final_norm = Norm::Rms {
                    weight: take.get("model.norm.weight", &[h])?,
                    eps,
                };
                (embed, None, blocks, final_norm)
            }
            Family::Gpt2 => {
                let p = gpt2_prefix(take.weights);
                let vocab = take.rows(&format!("{p}wte.weight"), h)?;
                let embed = take.get(&format!("{p}wte.weight"), &[vocab, h])?;
                let n_pos = take.rows(&format!("{p}wpe.weight"), h)?;
                let positions = take.get(&format!("{p}wpe.weight"), &[n_pos, h])?;
                let d = cfg.head_dim;
                let im = cfg.intermediate_size;
                let mut blocks = Vec::with_capacity(cfg.num_layers);
                for i in 0..cfg.num_layers {
                    let b = format!("{p}h.{i}");
                    let ln = |take: &mut Take<'_>, name: &str| -> Result<Norm, EvalError> {
                        Ok(Norm::Layer {
                            weight: take.get(&format!("{b}.{name}.weight"), &[h])?,
                            bias: take.get(&format!("{b}.{name}.bias"), &[h])?,
                            eps,
                        })
                    };
                    let ln1 = ln(&mut take, "ln_1")?;
                    let ln2 = ln(&mut take, "ln_2")?;
                    let qkv_w = take.get(&format!("{b}.attn.c_attn.weight"), &[3 * h, h])?;
                    let qkv_b = take.get(&format!("{b}.attn.c_attn.bias"), &[3 * h])?;
                    let mut attn_scale = 1.0 / (d as f64).sqrt();
                    if cfg.scale_attn_by_inverse_layer_idx {
                        attn_scale /= (i + 1) as f64;
                    }
                    blocks.push(Block {
                        ln1,
                        ln2,
                        qkv: Linear::new(qkv_w, Some(qkv_b)),
                        o: take.linear(&format!("{b}.attn.c_proj"), h, h, true)?,
                        mlp: Mlp::Plain {
                            fc: take.linear(&format!("{b}.mlp.c_fc"), im, h, true)?,
                            proj: take.linear(&format!("{b}.mlp.c_proj"), h, im, true)?,
                            act: cfg.activation,
                        },
                        attn_scale,
                    });
                }
                let final_norm = Norm::Layer {
                    weight: take.get(&format!("{p}ln_f.weight"), &[h])?,
                    bias: take.get(&format!("{p}ln_f.bias"), &[h])?,
                    eps,
                };
                (embed, Some(positions), blocks, final_norm)
            }
        };
        // Tied embeddings: the head is the input embedding and `lm_head.weight` is
        // usually absent (when present it is a copy). Untied: it must be there.
        let head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            let vocab = take.rows("lm_head.weight", h)?;
            take.get("lm_head.weight", &[vocab, h])?
        };
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        Ok(Self {
            cfg,
            device: device.clone(),
            embed,
            positions,
            blocks,
            final_norm,
            head,
            inv_freq,
        })
    }

    /// The resolved architecture.
    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    /// Rows of the output head (the vocabulary the log-softmax runs over).
    pub fn vocab_size(&self) -> usize {
        self.head.dims()[0]
    }

    /// The rotary inverse frequencies `1 / theta^(2i/d)` (f32, as transformers computes them).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The longest sequence one forward accepts, if bounded (GPT-2's learned positions,
    /// a sliding window this implementation does not apply).
    pub fn max_len(&self) -> Option<usize> {
        match (self.positions.as_ref(), self.cfg.sliding_window) {
            (Some(p), _) => Some(p.dims()[0]),
            (None, w) => w,
        }
    }

    /// `cos` and `sin` of every position in `positions` (f32, as transformers computes
    /// them), `[positions.len(), head_dim / 2]` each.
    fn rope_tables(&self, positions: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), &self.device)?,
            Tensor::from_vec(sin, (positions.len(), half), &self.device)?,
        ))
    }

    /// Runs `ids` after the positions in `past` (none: from position 0) and returns the
    /// final-norm hidden states of every new position, `[len, hidden]`, and the cache
    /// extended with them. `past` itself is not modified. Token ids must be below
    /// [`Model::vocab_size`] and the total length within [`Model::max_len`]; the caller
    /// checks (see `score`).
    pub fn forward(
        &self,
        ids: &[u32],
        past: Option<&KvCache>,
    ) -> candle_core::Result<(Tensor, KvCache)> {
        let len = ids.len();
        let offset = past.map_or(0, |c| c.len);
        let total = offset + len;
        let positions: Vec<usize> = (offset..total).collect();
        // Causal mask over [len, total]: new position i sees cached and new positions
        // up to offset + i. Not needed for a single new position.
        let mask = (len > 1).then(|| {
            (0..len)
                .flat_map(|i| (0..total).map(move |j| j <= offset + i))
                .collect::<Vec<bool>>()
        });
        let mut layers = Vec::with_capacity(self.blocks.len());
        let x = self.run(ids, 1, &positions, mask.as_deref(), past, Some(&mut layers))?;
        Ok((x, KvCache { layers, len: total }))
    }

    /// Runs every node of `tree` (each attending to its ancestors and itself, see
    /// [`PrefixTree`]) and returns the final-norm hidden states of the nodes `rows`,
    /// `[rows.len(), hidden]`: those of an unpadded forward over each row's path, up to
    /// f32 rounding. Token ids must be below [`Model::vocab_size`] and depths within
    /// [`Model::max_len`] (the caller checks, see `score`).
    ///
    /// On the CPU attention walks each node's ancestor chain; on other devices it is the
    /// dense product with a `[nodes, nodes]` mask ([`Model::forward_tree_masked`]). The
    /// last layer runs its queries, output projection and MLP on `rows` only: nothing
    /// after it reads the other nodes.
    pub fn forward_tree(&self, tree: &PrefixTree, rows: &[usize]) -> candle_core::Result<Tensor> {
        self.tree_pass(tree, rows, false)
    }

    /// [`Model::forward_tree`] with the masked attention of non-CPU devices, on any
    /// device (so the CPU tests can compare the two).
    pub fn forward_tree_masked(
        &self,
        tree: &PrefixTree,
        rows: &[usize],
    ) -> candle_core::Result<Tensor> {
        self.tree_pass(tree, rows, true)
    }

    fn tree_pass(
        &self,
        tree: &PrefixTree,
        rows: &[usize],
        masked: bool,
    ) -> candle_core::Result<Tensor> {
        let n = tree.len();
        if let Some(r) = rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {r} is not a node of a tree of {n}")
        }
        let dev = &self.device;
        let mut x = self.embed.index_select(&Tensor::new(tree.ids(), dev)?, 0)?;
        if let Some(pos) = &self.positions {
            let p: Vec<u32> = tree.positions().iter().map(|&p| p as u32).collect();
            x = (x + pos.index_select(&Tensor::new(p.as_slice(), dev)?, 0)?)?;
        }
        let rope = match self.cfg.family {
            Family::Gpt2 => None,
            Family::Llama | Family::Qwen2 => Some(self.rope_tables(tree.positions())?),
        };
        let all: Vec<usize> = (0..n).collect();
        let attend_all = Attention::new(tree.ancestry(&all), dev, masked)?;
        let attend_rows = Attention::new(tree.ancestry(rows), dev, masked)?;
        let rows_u32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let rows_t = Tensor::new(rows_u32.as_slice(), dev)?;
        let heads = Heads {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            d: self.cfg.head_dim,
        };
        let Some(first) = self.blocks.first() else {
            return self.final_norm.forward(&x.index_select(&rows_t, 0)?);
        };
        // `h`: the normed input of the next sublayer, from the fused residual + norm.
        let mut h = first.ln1.forward(&x)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let mut qkv = b.qkv.forward(&h)?;
            if let Some((cos, sin)) = &rope {
                qkv = ops::rope_qkv(&qkv, cos, sin, heads)?;
            }
            let next_norm = match self.blocks.get(i + 1) {
                Some(next) => &next.ln1,
                None => &self.final_norm,
            };
            let y = if i + 1 == self.blocks.len() {
                x = x.index_select(&rows_t, 0)?;
                attend_rows.forward(&qkv, heads, b.attn_scale)?
            } else {
                attend_all.forward(&qkv, heads, b.attn_scale)?
            };
            let (x1, h1) = b.ln2.add_forward(&x, &b.o.forward(&y)?)?;
            let (x2, h2) = next_norm.add_forward(&x1, &b.mlp.forward(&h1)?)?;
            x = x2;
            h = h2;
        }
        Ok(h)
    }

    /// The decoder over `rows` sequences of `ids.len() / rows` slots each, slot `s` of row
    /// `r` at position `positions[r · width + s]`, after the cached positions of `past`
    /// (`rows` = 1 then). `visible[(r · width + q) · keys + k]`: whether query slot `q`
    /// of row `r` attends to key `k` of that row (`keys` = cached + new slots); `None`:
    /// every key (one new position). Pushes each layer's keys and values onto `layers`
    /// when given. Returns the final-norm hidden states, `[rows · width, hidden]`.
    fn run(
        &self,
        ids: &[u32],
        rows: usize,
        positions: &[usize],
        visible: Option<&[bool]>,
        past: Option<&KvCache>,
        mut layers: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let width = ids.len() / rows;
        let offset = past.map_or(0, |c| c.len);
        let keys = offset + width;
        let ids_t = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        if let Some(pos) = &self.positions {
            let p: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
            x = (x + pos.index_select(&Tensor::new(p.as_slice(), &self.device)?, 0)?)?;
        }
        let rope = match self.cfg.family {
            Family::Gpt2 => None,
            Family::Llama | Family::Qwen2 => {
                let (cos, sin) = self.rope_tables(positions)?;
                if rows == 1 {
                    Some((cos, sin))
                } else {
                    let half = self.inv_freq.len();
                    Some((
                        cos.reshape((rows, width, half))?,
                        sin.reshape((rows, width, half))?,
                    ))
                }
            }
        };
        let mask = match visible {
            Some(v) => {
                let m: Vec<f32> = v
                    .iter()
                    .map(|&see| if see { 0.0 } else { f32::NEG_INFINITY })
                    .collect();
                Some(Tensor::from_vec(m, (rows, 1, width, keys), &self.device)?)
            }
            None => None,
        };
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.ln1.forward(&x)?;
            let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((rows, width, n, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let qkv = b.qkv.forward(&h)?;
            let mut q = heads(qkv.narrow(1, 0, nh * d)?, nh)?;
            let mut k = heads(qkv.narrow(1, nh * d, nkv * d)?, nkv)?;
            let mut v = heads(qkv.narrow(1, (nh + nkv) * d, nkv * d)?, nkv)?;
            if let Some((cos, sin)) = &rope {
                q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
                k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
            }
            if let Some(p) = past {
                let (pk, pv) = &p.layers[i];
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            if let Some(l) = layers.as_deref_mut() {
                l.push((k.clone(), v.clone()));
            }
            let rep = nh / nkv;
            let (k, v) = if rep > 1 {
                let expand = |t: &Tensor| {
                    t.unsqueeze(2)?
                        .expand((rows, nkv, rep, keys, d))?
                        .reshape((rows, nh, keys, d))
                };
                (expand(&k)?, expand(&v)?)
            } else {
                (k, v)
            };
            let mut att = (q.matmul(&k.t()?.contiguous()?)? * b.attn_scale)?;
            if let Some(m) = &mask {
                att = att.broadcast_add(m)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((rows * width, nh * d))?;
            x = (x + b.o.forward(&y)?)?;
            let h = b.ln2.forward(&x)?;
            x = (x + b.mlp.forward(&h)?)?;
        }
        self.final_norm.forward(&x)
    }

    /// The head applied to every row of `hidden`, each row ready for log-probabilities.
    pub fn log_softmax_rows(&self, hidden: &Tensor) -> candle_core::Result<Vec<LogSoftmaxRow>> {
        let logits = hidden.matmul(&self.head.t()?)?.to_dtype(DType::F32)?;
        let rows: Vec<Vec<f32>> = logits.to_device(&Device::Cpu)?.to_vec2()?;
        Ok(rows.into_par_iter().map(LogSoftmaxRow::new).collect())
    }

    /// The head applied to every row of `hidden`, and for row `i` the log-probabilities of
    /// the tokens `tokens[i]` (`None` outside the vocabulary): the numbers of
    /// [`Model::log_softmax_rows`], read from the logits in place instead of copying each
    /// row out.
    pub fn logprobs(
        &self,
        hidden: &Tensor,
        tokens: &[Vec<u32>],
    ) -> candle_core::Result<Vec<Vec<Option<f64>>>> {
        let logits = hidden
            .matmul(&self.head.t()?)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let (rows, vocab) = logits.dims2()?;
        if tokens.len() != rows || vocab == 0 {
            candle_core::bail!("{} token lists for {rows} rows of {vocab}", tokens.len())
        }
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("logits are not on the CPU")
        };
        let data = match layout.contiguous_offsets() {
            Some((a, b)) => cpu.as_slice::<f32>()?.get(a..b),
            None => None,
        };
        let Some(data) = data else {
            candle_core::bail!("logits are not contiguous")
        };
        Ok(data
            .par_chunks(vocab)
            .zip(tokens.par_iter())
            .map(|(row, tokens)| {
                let (max, log_sum) = log_sum_exp(row);
                tokens
                    .iter()
                    .map(|&t| {
                        let z = *row.get(usize::try_from(t).ok()?)?;
                        Some(f64::from(z - max) - log_sum)
                    })
                    .collect()
            })
            .collect())
    }

    /// The last row of `hidden`, `[1, hidden]`.
    pub fn last_row(hidden: &Tensor) -> candle_core::Result<Tensor> {
        let n = hidden.dim(0)?;
        let last = n
            .checked_sub(1)
            .ok_or_else(|| candle_core::Error::Msg("no positions".to_owned()))?;
        hidden.narrow(0, last, 1)
    }

    /// Plain logits `[len, vocab]` of every position of `ids` from position 0.
    pub fn logits(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (hidden, _) = self.forward(ids, None)?;
        hidden.matmul(&self.head.t()?)?.to_dtype(DType::F32)
    }
}

/// One row of f32 logits with its log-sum-exp (accumulated in f64).
#[derive(Debug, Clone)]
pub struct LogSoftmaxRow {
    logits: Vec<f32>,
    max: f32,
    log_sum: f64,
}

/// The max of `logits` and `ln Σ e^(z − max)`, the exponentials and their sum in f64
/// (eight partial sums, so the loop vectorises, added at the end).
fn log_sum_exp(logits: &[f32]) -> (f32, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f64; 8];
    let chunks = logits.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| ops::exp_f64(f64::from(v - max)))
        .sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += ops::exp_f64(f64::from(v - max));
        }
    }
    (max, (lanes.iter().sum::<f64>() + tail).ln())
}

impl LogSoftmaxRow {
    fn new(logits: Vec<f32>) -> Self {
        let (max, log_sum) = log_sum_exp(&logits);
        Self {
            logits,
            max,
            log_sum,
        }
    }

    /// `log_softmax(logits)[token]`; `None` outside the vocabulary.
    pub fn logprob(&self, token: u32) -> Option<f64> {
        let z = *self.logits.get(usize::try_from(token).ok()?)?;
        Some(f64::from(z - self.max) - self.log_sum)
    }
}
