//! The unbatched reference for the batched scoring: one item at a time, the prompt run
//! alone and each continuation run on the prompt's KV cache (the scoring path before
//! batching), through the model's public one-sequence API.

#![allow(dead_code, unreachable_pub)]

use patchport_eval::model::Model;
use patchport_eval::{EvalSet, Evaluator};

/// Each item's summed log-probability per continuation, computed one sequence at a time.
pub fn unbatched_scores(ev: &Evaluator, set: &EvalSet) -> Vec<Vec<f64>> {
    let model = ev.model();
    set.items()
        .iter()
        .map(|item| {
            let prompt = ev.encode(item.prompt()).expect("encode prompt");
            let (hidden, cache) = model.forward(&prompt, None).expect("prompt forward");
            let last = Model::last_row(&hidden).expect("last row");
            let first = model.log_softmax_rows(&last).expect("head").remove(0);
            item.continuations()
                .iter()
                .map(|text| {
                    let c = ev.encode(text).expect("encode continuation");
                    let mut s = first.logprob(c[0]).expect("in vocabulary");
                    if c.len() > 1 {
                        let (h, _) = model
                            .forward(&c[..c.len() - 1], Some(&cache))
                            .expect("continuation forward");
                        let rows = model.log_softmax_rows(&h).expect("head");
                        for (row, &t) in rows.iter().zip(&c[1..]) {
                            s += row.logprob(t).expect("in vocabulary");
                        }
                    }
                    s
                })
                .collect()
        })
        .collect()
}

/// The largest absolute difference between two score tables of the same shape.
pub fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "items");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "continuations");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}
