//! GPT-2, Llama and Qwen2 end to end, and the known traps: `rope_theta` inside
//! `rope_parameters`, tied embeddings without `lm_head.weight`, `head_dim` different from
//! `hidden / heads`, and scores that must not depend on batching, prefix sharing or the
//! KV-cache reuse.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use patchport_eval::{EvalError, EvalSet, Evaluator, ItemScore, evaluate_dir};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

const WORDS: &[&str] = &[
    "<unk>", "the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "big", "red", "house",
    "what", "is", "it", "yes", "no", "maybe", ":", "?", ".", "blue", "small", "tree",
];

/// A word-level tokenizer over [`WORDS`] (ids 0..25, in range of every micro fixture).
fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| ((*w).to_owned(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

fn mc_set() -> EvalSet {
    EvalSet::parse(
        br#"{"prompt": "the cat sat on the", "choices": [" mat", " big red house", " tree ."], "label": 0}
{"prompt": "what is it ?", "choices": [" yes", " no", " maybe it is a dog"], "label": 2}
{"prompt": "a dog", "choices": [" ran to the house", " sat"], "label": 1}
"#,
    )
    .expect("set")
}

/// A copy of a fixture model directory with the word-level tokenizer added.
fn with_tokenizer(model: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(model).expect("read model dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).expect("tokenizer");
    dir
}

fn choice_scores(arm: &patchport_eval::ArmResult) -> Vec<Vec<f64>> {
    arm.items
        .iter()
        .map(|s| match s {
            ItemScore::Choice { logprobs, .. } => logprobs.clone(),
            ItemScore::Completion { .. } => panic!("choice expected"),
        })
        .collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Every continuation scored through the prompt's KV cache equals the same sum taken
/// from one unpadded forward over `prompt ++ continuation` (all positions' logits).
fn assert_cache_matches_full_forward(ev: &Evaluator, set: &EvalSet) {
    for item in set.items() {
        let prompt = ev.encode(item.prompt()).expect("encode");
        let conts: Vec<Vec<u32>> = item
            .continuations()
            .iter()
            .map(|c| ev.encode(c).expect("encode"))
            .collect();
        let cached = ev.score_continuations(&prompt, &conts).expect("score");
        for (c, got) in conts.iter().zip(cached) {
            let ids: Vec<u32> = prompt.iter().chain(c).copied().collect();
            let logits: Vec<Vec<f32>> = ev
                .model()
                .logits(&ids)
                .expect("logits")
                .to_vec2()
                .expect("vec");
            let mut want = 0.0f64;
            for (j, &t) in c.iter().enumerate() {
                let row = &logits[prompt.len() - 1 + j];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = row
                    .iter()
                    .map(|&z| f64::from(z - max).exp())
                    .sum::<f64>()
                    .ln();
                want += f64::from(row[t as usize] - max) - lse;
            }
            assert!((got - want).abs() < 1e-4, "cached {got} vs full {want}");
        }
    }
}

#[test]
fn micro_fixtures_without_a_tokenizer_are_not_evaluable() {
    let set = mc_set();
    for base in ["llama-micro/v2", "gpt2-micro/v2"] {
        match evaluate_dir(&fixtures().join(base), None, &set, &Device::Cpu) {
            Err(EvalError::NotEvaluable { reason }) => {
                assert!(reason.contains("no tokenizer.json"), "{base}: {reason}")
            }
            other => panic!("{base}: expected not evaluable, got {other:?}"),
        }
    }
    // A mistyped path is an IO error, not a property of a model.
    let missing = fixtures().join("llama-micro/v9");
    assert!(matches!(
        evaluate_dir(&missing, None, &set, &Device::Cpu),
        Err(EvalError::Io { .. })
    ));
}

#[test]
fn gpt2_scores_and_merges_conv1d_lora_like_peft() {
    let set = mc_set();
    let v2 = with_tokenizer(&fixtures().join("gpt2-micro/v2"));
    let merged = with_tokenizer(&fixtures().join("gpt2-micro/expected/lora-c-attn@v2"));
    let patch = fixtures().join("gpt2-micro/patches/lora-c-attn");
    let base = evaluate_dir(v2.path(), None, &set, &Device::Cpu).expect("base");
    let ours = evaluate_dir(v2.path(), Some(&patch), &set, &Device::Cpu).expect("ported");
    let peft = evaluate_dir(merged.path(), None, &set, &Device::Cpu).expect("peft merged");
    let (b, o, p) = (
        choice_scores(&base),
        choice_scores(&ours),
        choice_scores(&peft),
    );
    assert!(o.iter().flatten().all(|x| x.is_finite() && *x < 0.0));
    // fan_in_fan_out: the Conv1D weight is [in, out]; merged at load like PEFT's merge.
    assert!(
        max_diff(&o, &p) < 1e-4,
        "vs PEFT merge_and_unload: {}",
        max_diff(&o, &p)
    );
    assert!(max_diff(&o, &b) > 1e-3, "the patch changes the scores");
    let ev = Evaluator::load(v2.path(), Some(&patch), &Device::Cpu).expect("load");
    assert_cache_matches_full_forward(&ev, &set);
}

#[test]
fn llama_micro_sharded_half_precision_and_patterned_adapters() {
    let set = mc_set();
    let score = |dir: &Path, patch: Option<&Path>| {
        choice_scores(&evaluate_dir(dir, patch, &set, &Device::Cpu).expect("evaluate"))
    };
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let sharded = with_tokenizer(&fixtures().join("llama-micro/v2-sharded"));
    let plain = score(v2.path(), None);
    assert_eq!(plain, score(sharded.path(), None), "sharded = single file");
    let bf16 = with_tokenizer(&fixtures().join("llama-micro/v2-bf16"));
    let d = max_diff(&plain, &score(bf16.path(), None));
    assert!(d > 0.0 && d < 0.05, "bf16 weights upcast to f32: {d}");
    // rank_pattern / alpha_pattern and rsLoRA scales, against PEFT's merge_and_unload.
    for patch in ["lora-patterns", "lora-all-rslora", "lora-qv"] {
        let merged = with_tokenizer(&fixtures().join(format!("llama-micro/expected/{patch}@v2")));
        let ours = score(
            v2.path(),
            Some(&fixtures().join("llama-micro/patches").join(patch)),
        );
        let peft = score(merged.path(), None);
        let d = max_diff(&ours, &peft);
        assert!(d < 1e-4, "{patch}: {d}");
        assert!(max_diff(&ours, &plain) > 1e-3, "{patch} changes the scores");
    }
    let ev = Evaluator::load(v2.path(), None, &Device::Cpu).expect("load");
    assert_cache_matches_full_forward(&ev, &set);
}

#[test]
fn adapters_that_are_not_additive_are_not_evaluable() {
    let set = mc_set();
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    for (patch, word) in [
        ("dora", "DoRA"),
        ("ia3", "IA3"),
        ("modules-to-save", "modules_to_save"),
    ] {
        let p = fixtures().join("llama-micro/patches").join(patch);
        match evaluate_dir(v2.path(), Some(&p), &set, &Device::Cpu) {
            Err(EvalError::NotEvaluable { reason }) => assert!(reason.contains(word), "{reason}"),
            other => panic!("{patch}: expected not evaluable, got {other:?}"),
        }
    }
}

/// A random decoder in a temp dir: `config` as given, weights from a fixed seed.
fn random_model(config: serde_json::Value, tensors: &[(&str, Vec<usize>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).expect("tokenizer");
    let mut map = HashMap::new();
    for (name, shape) in tensors {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)
        } else {
            Tensor::randn(0f32, 0.2, shape.as_slice(), &Device::Cpu)
        }
        .expect("tensor");
        map.insert((*name).to_owned(), t);
    }
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).expect("save");
    dir
}

/// Llama-shaped tensors: hidden 64, 4 heads of `head_dim`, 2 KV heads, 2 layers.
fn llama_tensors(head_dim: usize, bias: bool, lm_head: bool) -> Vec<(String, Vec<usize>)> {
    let (h, v, im) = (64, 40, 96);
    let mut t = vec![
        ("model.embed_tokens.weight".to_owned(), vec![v, h]),
        ("model.norm.weight".to_owned(), vec![h]),
    ];
    if lm_head {
        t.push(("lm_head.weight".to_owned(), vec![v, h]));
    }
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![4 * head_dim, h],
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![2 * head_dim, h],
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![2 * head_dim, h],
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, 4 * head_dim],
        ));
        if bias {
            t.push((format!("{p}.self_attn.q_proj.bias"), vec![4 * head_dim]));
            t.push((format!("{p}.self_attn.k_proj.bias"), vec![2 * head_dim]));
            t.push((format!("{p}.self_attn.v_proj.bias"), vec![2 * head_dim]));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![im, h]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![im, h]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, im]));
    }
    t
}

fn llama_config(model_type: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "model_type": model_type,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": 40,
        "rms_norm_eps": 1e-6,
    });
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

fn refs(t: &[(String, Vec<usize>)]) -> Vec<(&str, Vec<usize>)> {
    t.iter().map(|(n, s)| (n.as_str(), s.clone())).collect()
}

#[test]
fn qwen2_with_tied_embeddings_and_no_lm_head() {
    let set = mc_set();
    let tensors = llama_tensors(16, true, false);
    let dir = random_model(
        llama_config(
            "qwen2",
            serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": true, "rope_theta": 1000000.0}),
        ),
        &refs(&tensors),
    );
    let ev =
        Evaluator::load(dir.path(), None, &Device::Cpu).expect("tied qwen2 loads without lm_head");
    let arm = ev.evaluate(&set).expect("evaluate");
    assert_eq!(arm.n, 3);
    assert!(choice_scores(&arm).iter().flatten().all(|x| x.is_finite()));
    assert_cache_matches_full_forward(&ev, &set);
    // The same weights claiming an untied head must fail loudly, not reuse the embedding.
    let untied = random_model(
        llama_config("qwen2", serde_json::json!({"tie_word_embeddings": false})),
        &refs(&tensors),
    );
    match Evaluator::load(untied.path(), None, &Device::Cpu) {
        Err(EvalError::Weights { message, .. }) => {
            assert!(message.contains("lm_head.weight"), "{message}")
        }
        other => panic!("expected a missing lm_head, got {other:?}"),
    }
    // Qwen2's q/k/v biases are required.
    let no_bias = random_model(
        llama_config("qwen2", serde_json::json!({"tie_word_embeddings": true})),
        &refs(&llama_tensors(16, false, false)),
    );
    assert!(matches!(
        Evaluator::load(no_bias.path(), None, &Device::Cpu),
        Err(EvalError::Weights { .. })
    ));
}

#[test]
fn head_dim_different_from_hidden_over_heads() {
    let set = mc_set();
    // hidden 64 / 4 heads = 16, but head_dim 32: q_proj is [128, 64].
    let tensors = llama_tensors(32, false, true);
    let dir = random_model(
        llama_config("llama", serde_json::json!({"head_dim": 32})),
        &refs(&tensors),
    );
    let ev = Evaluator::load(dir.path(), None, &Device::Cpu).expect("load");
    assert_eq!(ev.config().head_dim, 32);
    assert_eq!(ev.model().inv_freq().len(), 16);
    assert_cache_matches_full_forward(&ev, &set);
    // Without head_dim the shapes contradict the config: an error, not garbage.
    let wrong = random_model(
        llama_config("llama", serde_json::json!({})),
        &refs(&tensors),
    );
    match Evaluator::load(wrong.path(), None, &Device::Cpu) {
        Err(EvalError::Weights { message, .. }) => assert!(message.contains("q_proj"), "{message}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn rope_theta_from_rope_parameters_changes_the_scores() {
    let set = mc_set();
    let tensors = llama_tensors(16, false, true);
    let score = |extra: serde_json::Value| {
        let dir = random_model(llama_config("llama", extra), &refs(&tensors));
        let ev = Evaluator::load(dir.path(), None, &Device::Cpu).expect("load");
        (
            ev.model().inv_freq().to_vec(),
            choice_scores(&ev.evaluate(&set).expect("eval")),
        )
    };
    // randn is seeded per call, so compare theta's effect through inv_freq and through
    // one model directory evaluated under two configs.
    let (f5, _) = score(
        serde_json::json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}),
    );
    let (f4, _) = score(serde_json::json!({}));
    assert!((f5[1] - 1.0 / 100000f32.powf(2.0 / 16.0)).abs() < 1e-9);
    assert!((f4[1] - 1.0 / 10000f32.powf(2.0 / 16.0)).abs() < 1e-9);
    let dir = random_model(
        llama_config("llama", serde_json::json!({})),
        &refs(&tensors),
    );
    let a = choice_scores(&evaluate_dir(dir.path(), None, &set, &Device::Cpu).expect("eval"));
    let config = llama_config(
        "llama",
        serde_json::json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}),
    );
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    let b = choice_scores(&evaluate_dir(dir.path(), None, &set, &Device::Cpu).expect("eval"));
    assert!(max_diff(&a, &b) > 1e-6, "theta must reach the forward pass");
}

/// `n` multiple-choice items over [`WORDS`] with prompts of 1-13 words and 2-4 choices
/// of 1-6 words (deterministic), so that batches hold rows of many widths.
fn varied_set(n: usize) -> EvalSet {
    /// xorshift64.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, m: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % m as u64) as usize
        }
        fn words(&mut self, k: usize) -> String {
            (0..k)
                .map(|_| WORDS[1 + self.below(WORDS.len() - 1)])
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut lines = Vec::with_capacity(n);
    for _ in 0..n {
        let plen = 1 + rng.below(13);
        let prompt = rng.words(plen);
        let nc = 2 + rng.below(3);
        let choices: Vec<String> = (0..nc)
            .map(|_| {
                let k = 1 + rng.below(6);
                format!(" {}", rng.words(k))
            })
            .collect();
        lines.push(
            serde_json::json!({"prompt": prompt, "choices": choices, "label": 0}).to_string(),
        );
    }
    EvalSet::parse(lines.join("\n").as_bytes()).expect("set")
}

#[test]
fn batched_scores_equal_the_unbatched_reference() {
    // 300 items of varied lengths: several packed batches, prompts sharing beginnings.
    let set = varied_set(300);
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let patch = fixtures().join("llama-micro/patches/lora-qv");
    let gpt2 = with_tokenizer(&fixtures().join("gpt2-micro/v2"));
    for (name, dir, patch) in [
        ("llama-micro v2 + lora-qv", v2.path(), Some(patch.as_path())),
        ("llama-micro v2", v2.path(), None),
        ("gpt2-micro v2", gpt2.path(), None),
    ] {
        let ev = Evaluator::load(dir, patch, &Device::Cpu).expect("load");
        let batched = choice_scores(&ev.evaluate(&set).expect("evaluate"));
        let reference = common::unbatched_scores(&ev, &set);
        let d = common::max_abs_diff(&batched, &reference);
        eprintln!("{name}: max |batched - unbatched| = {d:.3e}");
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

#[test]
fn scores_do_not_depend_on_the_other_items() {
    // Items are batched with others (packed trees, shared prefixes): an item scored alone
    // or among others gives the same scores up to f32 rounding (the matmuls' blocking
    // depends on the batch shape), and the same set scored twice gives the same bits.
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let all = mc_set();
    let ev = Evaluator::load(v2.path(), None, &Device::Cpu).expect("load");
    let arm = ev.evaluate(&all).expect("all");
    assert_eq!(arm.items, ev.evaluate(&all).expect("again").items);
    let one = EvalSet::parse(
        br#"{"prompt": "what is it ?", "choices": [" yes", " no", " maybe it is a dog"], "label": 2}"#,
    )
    .expect("set");
    let alone = ev.evaluate(&one).expect("alone");
    let d = max_diff(&choice_scores(&alone), &choice_scores(&arm)[1..2]);
    assert!(d < 1e-6, "alone vs among others: {d}");
}

#[test]
fn completion_items_give_mean_nll() {
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let set = EvalSet::parse(
        br#"{"prompt": "the cat", "completion": " sat on the mat"}
{"prompt": "a dog", "completion": " ran"}"#,
    )
    .expect("set");
    let ev = Evaluator::load(v2.path(), None, &Device::Cpu).expect("load");
    let arm = ev.evaluate(&set).expect("eval");
    let per_item: Vec<f64> = arm.items.iter().map(ItemScore::value).collect();
    let p = ev.encode("the cat").expect("encode");
    let c = ev.encode(" sat on the mat").expect("encode");
    assert_eq!(c.len(), 4);
    let s = ev.score_continuations(&p, &[c]).expect("score")[0];
    // Scored alone vs batched with the other item: equal up to f32 rounding.
    assert!((per_item[0] - (-s / 4.0)).abs() < 1e-6);
    assert!((arm.mean_nll.expect("nll") - (per_item[0] + per_item[1]) / 2.0).abs() < 1e-12);
    assert!(arm.accuracy.is_none());
}

#[test]
fn prompts_that_share_prefixes_or_repeat_score_like_the_unbatched_reference() {
    // One batch: prompts that are prefixes of other prompts (an item's prompt ends inside
    // another's path, and its choices run along that path), the same item twice, and a
    // choice equal to the rest of another item's prompt. Shared nodes change nothing.
    let set = EvalSet::parse(
        br#"{"prompt": "the cat", "choices": [" sat on the", " ran", " sat"], "label": 0}
{"prompt": "the cat sat on the", "choices": [" mat", " big red house"], "label": 0}
{"prompt": "the cat sat", "choices": [" on the mat", " on a tree"], "label": 1}
{"prompt": "the cat", "choices": [" sat on the", " ran", " sat"], "label": 0}
{"prompt": "the", "choices": [" cat sat", " dog"], "label": 1}
{"prompt": "a dog", "choices": [" ran to the house", " sat"], "label": 1}
"#,
    )
    .expect("set");
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let gpt2 = with_tokenizer(&fixtures().join("gpt2-micro/v2"));
    for dir in [v2.path(), gpt2.path()] {
        let ev = Evaluator::load(dir, None, &Device::Cpu).expect("load");
        let batched = choice_scores(&ev.evaluate(&set).expect("evaluate"));
        assert_eq!(batched[0], batched[3], "a repeated item scores the same");
        let d = common::max_abs_diff(&batched, &common::unbatched_scores(&ev, &set));
        assert!(d <= 1e-5, "{}: {d}", dir.display());
    }
}

#[test]
fn the_masked_attention_of_other_devices_equals_the_cpu_tree_kernel() {
    // Non-CPU devices run the tree batch as a dense product with a [queries, nodes] mask;
    // run that path on the CPU and compare hidden states with the tree kernel.
    use patchport_eval::tree::PrefixTree;
    let set = varied_set(60);
    let v2 = with_tokenizer(&fixtures().join("llama-micro/v2"));
    let gpt2 = with_tokenizer(&fixtures().join("gpt2-micro/v2"));
    for dir in [v2.path(), gpt2.path()] {
        let ev = Evaluator::load(dir, None, &Device::Cpu).expect("load");
        let mut tree = PrefixTree::new();
        for item in set.items() {
            let p = ev.encode(item.prompt()).expect("encode");
            let last = tree.extend(None, &p).last().copied();
            for c in item.continuations() {
                tree.extend(last, &ev.encode(c).expect("encode"));
            }
        }
        let all: Vec<usize> = (0..tree.len()).collect();
        let some: Vec<usize> = (0..tree.len()).step_by(7).collect();
        for rows in [all, some] {
            let a = ev.model().forward_tree(&tree, &rows).expect("tree");
            let b = ev
                .model()
                .forward_tree_masked(&tree, &rows)
                .expect("masked");
            let d = (a - b)
                .and_then(|t| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                .expect("diff");
            assert!(d < 1e-5, "{}: {d}", dir.display());
        }
    }
}
