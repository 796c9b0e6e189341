//! Loading a base (+ adapter) for evaluation and scoring an eval set with it.
//!
//! The scoring rule, which decides the numbers:
//! - `ids = encode(prompt) ++ encode(continuation)`: prompt and continuation are
//!   tokenized **separately**, with **no special tokens** added (no BOS, no EOS, whatever
//!   the tokenizer's post-processor would add), and their ids concatenated. The
//!   tokenizer's own padding and truncation settings are switched off.
//! - `score(continuation) = Σ_j log_softmax(logits[len(prompt) − 1 + j])[c_j]` over the
//!   continuation tokens `c_j`: f32 logits, the log-sum-exp and the sum in f64.
//! - multiple choice: the prediction is the argmax of the unnormalised sums (longer
//!   choices are not length-normalised), ties to the lowest index; the metric is accuracy.
//! - completion: the item's value is the mean negative log-likelihood of its tokens,
//!   `−score / len`; the metric is the mean of the items' values (each item weighs the
//!   same, which is what the paired standard error of the verdict needs).
//!
//! Items run in packed prefix-tree batches ([`PrefixTree`]): every distinct token prefix
//! of the batch's `prompt ++ continuation` sequences is one node, attending to its
//! ancestors and itself, so an item's prompt is computed once for all its choices, a
//! beginning that several prompts share once for all of them, and nothing is padded. A
//! choice's log-probabilities are those of an unpadded forward over `prompt ++ choice`
//! (equal up to f32 rounding, tested against the one-sequence-at-a-time path to 1e-5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use patchport_core::evalset::{EvalSet, Item, ItemKind};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::config::ArchConfig;
use crate::error::EvalError;
use crate::model::{Model, normalize_layout};
use crate::tree::PrefixTree;
use crate::weights::{load_dir, merge_adapter, read};

/// What an arm measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Multiple choice: the fraction of items whose argmax choice is the label.
    Accuracy,
    /// Completion: the mean over items of the mean token negative log-likelihood.
    MeanNll,
}

impl Metric {
    /// `accuracy` or `mean_nll`.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::MeanNll => "mean_nll",
        }
    }

    /// Accuracy: higher is better. Mean NLL: lower is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Accuracy)
    }

    fn for_kind(kind: ItemKind) -> Self {
        match kind {
            ItemKind::MultipleChoice => Metric::Accuracy,
            ItemKind::Completion => Metric::MeanNll,
        }
    }
}

/// The score of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ItemScore {
    /// A multiple-choice item.
    Choice {
        /// The summed log-probability of each choice.
        logprobs: Vec<f64>,
        /// The argmax (ties: the lowest index).
        prediction: usize,
        /// `prediction == label`.
        correct: bool,
    },
    /// A completion item.
    Completion {
        /// Mean token negative log-likelihood of the completion.
        nll: f64,
        /// Completion tokens.
        tokens: usize,
    },
}

impl ItemScore {
    /// The item's contribution to the metric: 1 or 0 (accuracy), or its mean NLL.
    pub fn value(&self) -> f64 {
        match self {
            ItemScore::Choice { correct, .. } => f64::from(u8::from(*correct)),
            ItemScore::Completion { nll, .. } => *nll,
        }
    }
}

/// The result of one arm (one model on one eval set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmResult {
    /// What is measured.
    pub metric: Metric,
    /// The accuracy (multiple choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Items answered correctly (multiple choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<usize>,
    /// The mean token NLL (completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_nll: Option<f64>,
    /// Items scored.
    pub n: usize,
    /// Wall time of the scoring (not the loading), seconds.
    pub seconds: f64,
    /// Per-item scores, in eval-set order (may be left out of stored or printed results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemScore>,
}

impl ArmResult {
    /// The metric's value.
    pub fn value(&self) -> f64 {
        match self.metric {
            Metric::Accuracy => self.accuracy.unwrap_or(f64::NAN),
            Metric::MeanNll => self.mean_nll.unwrap_or(f64::NAN),
        }
    }

    fn from_items(metric: Metric, items: Vec<ItemScore>, seconds: f64) -> Self {
        let n = items.len();
        let total: f64 = items.iter().map(ItemScore::value).sum();
        let mean = if n == 0 { f64::NAN } else { total / n as f64 };
        match metric {
            Metric::Accuracy => Self {
                metric,
                accuracy: Some(mean),
                correct: Some(
                    items
                        .iter()
                        .filter(|i| matches!(i, ItemScore::Choice { correct: true, .. }))
                        .count(),
                ),
                mean_nll: None,
                n,
                seconds,
                items,
            },
            Metric::MeanNll => Self {
                metric,
                accuracy: None,
                correct: None,
                mean_nll: Some(mean),
                n,
                seconds,
                items,
            },
        }
    }
}

/// Tree nodes (distinct token positions) per scoring batch: items are added to a batch
/// until it holds at least this many (so a batch ends at most one item past it). Large
/// enough that the weight matmuls run at gemm speed (measured flat from 256 to 1024 rows
/// at the 135M shape), and it bounds a batch's activations (the largest is the fused
/// gate/up output, nodes × 2 · intermediate floats).
pub const BATCH_NODES: usize = 1024;

/// Items packed into one [`PrefixTree`]: each item's prompt, then each continuation but
/// its last token after the prompt (the node of `c_j` predicts `c_{j+1}`; the prompt's
/// last node predicts `c_0`).
#[derive(Debug, Default)]
struct Packed {
    tree: PrefixTree,
    /// Per item: the node that predicts each continuation's tokens, in token order.
    predictors: Vec<Vec<Vec<usize>>>,
}

impl Packed {
    /// Adds an item (a non-empty prompt, continuations).
    fn add(&mut self, prompt: &[u32], continuations: &[Vec<u32>]) -> Result<(), EvalError> {
        let Some(&last) = self.tree.extend(None, prompt).last() else {
            return Err(
                candle_core::Error::Msg("an empty prompt predicts nothing".to_owned()).into(),
            );
        };
        let item = continuations
            .iter()
            .map(|c| {
                let mut p = vec![last];
                p.extend(
                    self.tree
                        .extend(Some(last), &c[..c.len().saturating_sub(1)]),
                );
                p.truncate(c.len());
                p
            })
            .collect();
        self.predictors.push(item);
        Ok(())
    }

    /// Each item's summed log-probability per continuation (`items` as added).
    fn score(
        &self,
        model: &Model,
        items: &[&(Vec<u32>, Vec<Vec<u32>>)],
    ) -> Result<Vec<Vec<f64>>, EvalError> {
        // The distinct predicting nodes: the head runs once per node, however many
        // continuations read it.
        let mut row_of = HashMap::new();
        let mut rows = Vec::new();
        for &node in self.predictors.iter().flatten().flatten() {
            row_of.entry(node).or_insert_with(|| {
                rows.push(node);
                rows.len() - 1
            });
        }
        let hidden = model.forward_tree(&self.tree, &rows)?;
        // The tokens each row predicts, for the head to read.
        let mut wanted: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
        let mut at: HashMap<(usize, u32), usize> = HashMap::new();
        for ((_, conts), preds) in items.iter().zip(&self.predictors) {
            for (c, p) in conts.iter().zip(preds) {
                for (&t, node) in c.iter().zip(p) {
                    if let Some(&r) = row_of.get(node) {
                        at.entry((r, t)).or_insert_with(|| {
                            wanted[r].push(t);
                            wanted[r].len() - 1
                        });
                    }
                }
            }
        }
        let logprobs = model.logprobs(&hidden, &wanted)?;
        let mut scores = Vec::with_capacity(items.len());
        for ((_, conts), preds) in items.iter().zip(&self.predictors) {
            let mut item = Vec::with_capacity(conts.len());
            for (c, p) in conts.iter().zip(preds) {
                let mut s = 0.0;
                for (&t, node) in c.iter().zip(p) {
                    let lp = row_of.get(node).and_then(|&r| {
                        let i = at.get(&(r, t))?;
                        logprobs.get(r)?.get(*i).copied().flatten()
                    });
                    s += lp.ok_or_else(|| {
                        candle_core::Error::Msg(format!("token id {t} is outside the vocabulary"))
                    })?;
                }
                item.push(s);
            }
            scores.push(item);
        }
        Ok(scores)
    }
}

/// A base (+ merged adapter) and its tokenizer, ready to score eval sets.
#[derive(Debug)]
pub struct Evaluator {
    model: Model,
    tokenizer: Tokenizer,
    base: PathBuf,
}

/// The argmax of `scores`, ties to the lowest index (NaN never wins).
pub fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || (scores[best].is_nan() && !s.is_nan()) {
            best = i;
        }
    }
    best
}

impl Evaluator {
    /// Loads the base in directory `base` (`config.json`, `tokenizer.json`, safetensors
    /// weights, sharded or not) on `device`, with the PEFT adapter in `patch` merged in f32
    /// (`W + s·B·A`). No tokenizer, no config or an unsupported architecture is
    /// [`EvalError::NotEvaluable`].
    pub fn load(base: &Path, patch: Option<&Path>, device: &Device) -> Result<Self, EvalError> {
        for dir in std::iter::once(base).chain(patch) {
            if !dir.is_dir() {
                return Err(EvalError::Io {
                    path: dir.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
                });
            }
        }
        let config_path = base.join("config.json");
        if !config_path.is_file() {
            return Err(EvalError::not_evaluable(format!(
                "{} has no config.json",
                base.display()
            )));
        }
        let tokenizer_path = base.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(EvalError::not_evaluable(format!(
                "{} has no tokenizer.json (the scores depend on the base's own tokenizer)",
                base.display()
            )));
        }
        let cfg = ArchConfig::parse(&read(&config_path)?)?;
        let mut tokenizer = Tokenizer::from_bytes(read(&tokenizer_path)?).map_err(|e| {
            EvalError::not_evaluable(format!("tokenizer.json cannot be loaded: {e}"))
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EvalError::Tokenizer {
                message: e.to_string(),
            })?;
        let mut weights = load_dir(base, device)?;
        normalize_layout(&cfg, &mut weights)?;
        if let Some(p) = patch {
            merge_adapter(&mut weights, p)?;
        }
        let model = Model::build(cfg, weights, base, device)?;
        Ok(Self {
            model,
            tokenizer,
            base: base.to_owned(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The resolved architecture.
    pub fn config(&self) -> &ArchConfig {
        self.model.config()
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EvalError::Tokenizer {
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The summed log-probability of each continuation's tokens after the prompt (one
    /// item through the batched path of [`Evaluator::evaluate`]).
    pub fn score_continuations(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
    ) -> Result<Vec<f64>, EvalError> {
        if prompt.is_empty() {
            return Err(
                candle_core::Error::Msg("an empty prompt predicts nothing".to_owned()).into(),
            );
        }
        let item = (prompt.to_vec(), continuations.to_vec());
        let mut out = self.score_batch(&[&item])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Scores items `(prompt, continuations)` (non-empty prompts) in one packed batch;
    /// returns each item's summed log-probability per continuation.
    fn score_batch(
        &self,
        items: &[&(Vec<u32>, Vec<Vec<u32>>)],
    ) -> Result<Vec<Vec<f64>>, EvalError> {
        let mut packed = Packed::default();
        for (p, cs) in items {
            packed.add(p, cs)?;
        }
        packed.score(&self.model, items)
    }

    fn item_ids(
        &self,
        set: &EvalSet,
        index: usize,
        item: &Item,
    ) -> Result<(Vec<u32>, Vec<Vec<u32>>), EvalError> {
        let err = |message: String| EvalError::Item {
            index,
            line: set.line_of(index),
            message,
        };
        let prompt = self.encode(item.prompt())?;
        if prompt.is_empty() {
            return Err(err("the prompt tokenizes to no tokens".to_owned()));
        }
        let mut conts = Vec::with_capacity(item.continuations().len());
        for (i, text) in item.continuations().iter().enumerate() {
            let ids = self.encode(text)?;
            if ids.is_empty() {
                return Err(err(format!("continuation {i} tokenizes to no tokens")));
            }
            conts.push(ids);
        }
        let vocab = self.model.vocab_size();
        if let Some(t) = prompt
            .iter()
            .chain(conts.iter().flatten())
            .find(|&&t| t as usize >= vocab)
        {
            return Err(err(format!(
                "token id {t} is outside the model's vocabulary of {vocab}"
            )));
        }
        let longest = prompt.len() + conts.iter().map(Vec::len).max().unwrap_or(0);
        if let Some(max) = self.model.max_len()
            && longest > max
        {
            let why = if self.config().sliding_window.is_some() {
                "the sliding window, which this evaluator does not apply"
            } else {
                "the model's positions"
            };
            return Err(err(format!("{longest} tokens exceed {why} ({max})")));
        }
        Ok((prompt, conts))
    }

    /// Scores every item of `set`: items sorted by their prompts' token ids (so items
    /// whose prompts begin alike share a batch and its tree nodes) and run in batches of
    /// about [`BATCH_NODES`] nodes; results in eval-set order.
    pub fn evaluate(&self, set: &EvalSet) -> Result<ArmResult, EvalError> {
        let t0 = Instant::now();
        let mut ids = Vec::with_capacity(set.len());
        for (index, item) in set.items().iter().enumerate() {
            ids.push(self.item_ids(set, index, item)?);
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by(|&a, &b| ids[a].0.cmp(&ids[b].0));
        let mut scores: Vec<Vec<f64>> = vec![Vec::new(); ids.len()];
        let mut start = 0;
        while start < order.len() {
            let mut packed = Packed::default();
            let mut end = start;
            while end < order.len() && (end == start || packed.tree.len() < BATCH_NODES) {
                let (p, cs) = &ids[order[end]];
                packed.add(p, cs)?;
                end += 1;
            }
            let batch: Vec<&(Vec<u32>, Vec<Vec<u32>>)> =
                order[start..end].iter().map(|&i| &ids[i]).collect();
            for (&i, s) in order[start..end]
                .iter()
                .zip(packed.score(&self.model, &batch)?)
            {
                scores[i] = s;
            }
            start = end;
        }
        let mut items = Vec::with_capacity(set.len());
        for ((item, s), (_, conts)) in set.items().iter().zip(scores).zip(&ids) {
            items.push(match item {
                Item::MultipleChoice { label, .. } => {
                    let prediction = argmax(&s);
                    ItemScore::Choice {
                        correct: prediction == *label,
                        prediction,
                        logprobs: s,
                    }
                }
                Item::Completion { .. } => {
                    let tokens = conts[0].len();
                    ItemScore::Completion {
                        nll: -s[0] / tokens as f64,
                        tokens,
                    }
                }
            });
        }
        Ok(ArmResult::from_items(
            Metric::for_kind(set.kind()),
            items,
            t0.elapsed().as_secs_f64(),
        ))
    }

    /// The base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

/// Loads `base` (+ `patch`) and scores `set`: one arm.
pub fn evaluate_dir(
    base: &Path,
    patch: Option<&Path>,
    set: &EvalSet,
    device: &Device,
) -> Result<ArmResult, EvalError> {
    Evaluator::load(base, patch, device)?.evaluate(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_go_to_the_lowest_index() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
        assert_eq!(argmax(&[-2.0, -2.0]), 0);
        assert_eq!(argmax(&[f64::NAN, -3.0, -4.0]), 1);
        assert_eq!(argmax(&[-3.0, f64::NAN, -1.0]), 2);
    }

    #[test]
    fn arm_values() {
        let items = vec![
            ItemScore::Choice {
                logprobs: vec![-1.0, -2.0],
                prediction: 0,
                correct: true,
            },
            ItemScore::Choice {
                logprobs: vec![-1.0, -2.0],
                prediction: 0,
                correct: false,
            },
        ];
        let a = ArmResult::from_items(Metric::Accuracy, items, 0.0);
        assert_eq!((a.value(), a.correct, a.n), (0.5, Some(1), 2));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["accuracy"], 0.5);
        assert!(json.get("mean_nll").is_none());
        let back: ArmResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
    }
}
