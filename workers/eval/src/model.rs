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
//! Scoring runs items in padded, masked batches ([`TreeBatch`], [`Model::forward_trees`]):
//! each row is one item's prompt followed by its choices, each choice attending to the
//! prompt and to itself only, so the prompt is computed once per item and every weight
//! pass serves many items. [`Model::forward`] runs one unpadded sequence, optionally
//! after a [`KvCache`] of an earlier call on the same sequence (the cache is not
//! modified); both go through the same decoder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use crate::config::{Activation, ArchConfig, Family};
use crate::error::EvalError;

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
}

#[derive(Debug)]
enum Mlp {
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Plain {
        fc: Linear,
        proj: Linear,
        act: Activation,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Gated { gate, up, down } => {
                let g = gate.forward(x)?.silu()?;
                down.forward(&(g * up.forward(x)?)?)
            }
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
    q: Linear,
    k: Linear,
    v: Linear,
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
                        q: take.linear(
                            &format!("{p}.self_attn.q_proj"),
                            nh * d,
                            h,
                            cfg.qkv_bias,
                        )?,
                        k: take.linear(
                            &format!("{p}.self_attn.k_proj"),
                            nkv * d,
                            h,
                            cfg.qkv_bias,
                        )?,
                        v: take.linear(
                            &format!("{p}.self_attn.v_proj"),
                            nkv * d,
                            h,
                            cfg.qkv_bias,
                        )?,
                        o: take.linear(&format!("{p}.self_attn.o_proj"), h, nh * d, cfg.o_bias)?,
                        mlp: Mlp::Gated {
                            gate: take.linear(
                                &format!("{p}.mlp.gate_proj"),
                                im,
                                h,
                                cfg.mlp_bias,
                            )?,
                            up: take.linear(&format!("{p}.mlp.up_proj"), im, h, cfg.mlp_bias)?,
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
                    let part = |j: usize| -> Result<Linear, EvalError> {
                        Ok(Linear::new(
                            qkv_w.narrow(0, j * h, h)?.contiguous()?,
                            Some(qkv_b.narrow(0, j * h, h)?.contiguous()?),
                        ))
                    };
                    let mut attn_scale = 1.0 / (d as f64).sqrt();
                    if cfg.scale_attn_by_inverse_layer_idx {
                        attn_scale /= (i + 1) as f64;
                    }
                    blocks.push(Block {
                        ln1,
                        ln2,
                        q: part(0)?,
                        k: part(1)?,
                        v: part(2)?,
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

    /// Runs a padded batch of prompt trees (see [`TreeBatch`]) and returns the final-norm
    /// hidden states of every slot, `[rows · width, hidden]` (slot `s` of row `r` at
    /// `r · width + s`; padding slots hold values that mean nothing).
    pub fn forward_trees(&self, batch: &TreeBatch) -> candle_core::Result<Tensor> {
        self.run(
            &batch.ids,
            batch.rows,
            &batch.positions,
            Some(batch.visible.as_slice()),
            None,
            None,
        )
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
            let mut q = heads(b.q.forward(&h)?, nh)?;
            let mut k = heads(b.k.forward(&h)?, nkv)?;
            let mut v = heads(b.v.forward(&h)?, nkv)?;
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
        Ok(rows.into_iter().map(LogSoftmaxRow::new).collect())
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

/// Prompts with branches, run as one padded batch: row `r` holds tree `r`'s prompt, then
/// each of its branches in turn, then padding up to the longest row. A branch continues
/// its prompt (its first token sits at the position after the prompt's last) and attends
/// to the prompt and to its own earlier tokens, never to another branch, so each branch
/// gets the hidden states of an unpadded forward over `prompt ++ branch`: the prompt is
/// computed once for all its branches, and many items share each weight pass.
#[derive(Debug, Clone)]
pub struct TreeBatch {
    rows: usize,
    width: usize,
    ids: Vec<u32>,
    positions: Vec<usize>,
    /// `[rows, width, width]`: query slot attends to key slot.
    visible: Vec<bool>,
    /// Per tree: the slot of each branch's first token.
    starts: Vec<Vec<usize>>,
    /// Per tree: the prompt's length.
    prompt_lens: Vec<usize>,
}

impl TreeBatch {
    /// The slots a tree of `prompt_len` tokens with branches of `branch_lens` tokens
    /// takes in a row.
    pub fn width_of(prompt_len: usize, branch_lens: impl IntoIterator<Item = usize>) -> usize {
        prompt_len + branch_lens.into_iter().sum::<usize>()
    }

    /// Lays out `trees` (`(prompt, branches)`, every prompt non-empty) in one batch.
    pub fn new(trees: &[(&[u32], Vec<&[u32]>)]) -> Self {
        let rows = trees.len();
        let width = trees
            .iter()
            .map(|(p, bs)| Self::width_of(p.len(), bs.iter().map(|b| b.len())))
            .max()
            .unwrap_or(0);
        let mut ids = vec![0u32; rows * width];
        let mut positions = vec![0usize; rows * width];
        let mut visible = vec![false; rows * width * width];
        let mut starts = Vec::with_capacity(rows);
        let mut prompt_lens = Vec::with_capacity(rows);
        // Which segment each slot of a row belongs to: the prompt, a branch, or padding.
        const PROMPT: usize = 0;
        const PAD: usize = usize::MAX;
        let mut segment = vec![PAD; width];
        for (r, (prompt, branches)) in trees.iter().enumerate() {
            let base = r * width;
            segment.fill(PAD);
            let p = prompt.len();
            ids[base..base + p].copy_from_slice(prompt);
            for (s, pos) in positions[base..base + p].iter_mut().enumerate() {
                *pos = s;
            }
            segment[..p].fill(PROMPT);
            let mut slot = p;
            let mut st = Vec::with_capacity(branches.len());
            for (c, b) in branches.iter().enumerate() {
                st.push(slot);
                ids[base + slot..base + slot + b.len()].copy_from_slice(b);
                for j in 0..b.len() {
                    positions[base + slot + j] = p + j;
                }
                segment[slot..slot + b.len()].fill(c + 1);
                slot += b.len();
            }
            for q in 0..width {
                let vis = &mut visible[(base + q) * width..(base + q + 1) * width];
                if segment[q] == PAD {
                    // A padding slot sees itself only (a row of -inf would be NaN).
                    vis[q] = true;
                    continue;
                }
                for (k, v) in vis.iter_mut().enumerate().take(q + 1) {
                    *v = segment[k] == PROMPT || segment[k] == segment[q];
                }
            }
            starts.push(st);
            prompt_lens.push(p);
        }
        Self {
            rows,
            width,
            ids,
            positions,
            visible,
            starts,
            prompt_lens,
        }
    }

    /// Rows (trees).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Slots per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The hidden-state row of tree `tree`'s last prompt token.
    pub fn prompt_last(&self, tree: usize) -> usize {
        tree * self.width + self.prompt_lens[tree] - 1
    }

    /// The hidden-state row of token `j` of branch `branch` of tree `tree`.
    pub fn branch_token(&self, tree: usize, branch: usize, j: usize) -> usize {
        tree * self.width + self.starts[tree][branch] + j
    }
}

/// One row of f32 logits with its log-sum-exp (accumulated in f64).
#[derive(Debug, Clone)]
pub struct LogSoftmaxRow {
    logits: Vec<f32>,
    max: f32,
    log_sum: f64,
}

impl LogSoftmaxRow {
    fn new(logits: Vec<f32>) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
        Self {
            logits,
            max,
            log_sum: sum.ln(),
        }
    }

    /// `log_softmax(logits)[token]`; `None` outside the vocabulary.
    pub fn logprob(&self, token: u32) -> Option<f64> {
        let z = *self.logits.get(usize::try_from(token).ok()?)?;
        Some(f64::from(z - self.max) - self.log_sum)
    }
}
