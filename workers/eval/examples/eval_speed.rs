//! Evaluation speed on this machine's CPU:
//!
//! 1. items/s on the task-llama fixture (305 three-way multiple-choice items, 887k params);
//! 2. items/s on a Llama-shaped model of about 135M parameters (SmolLM2-135M's shape:
//!    hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocabulary 49152,
//!    tied embeddings), random weights generated into a temp dir, the fixture's tokenizer
//!    (its ids, < 2048, are in range);
//! 3. the time the gate adds to a port of the fixture: arms 2 and 3 (new base alone, new
//!    base + ported patch), loading included; arm 1 (old base + patch) is cached per patch.
//!
//! `cargo run --release -p patchport-eval --example eval_speed [-- ITEMS_135M]`
//! (default 40 items for the 135M model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use patchport_eval::{EvalSet, Evaluator, VerdictPolicy, evaluate_dir, gate_with_reference};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/task-llama")
}

fn main() -> anyhow::Result<()> {
    let n_big: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(40);
    let set = EvalSet::parse(&std::fs::read(fixture().join("eval.jsonl"))?)?;
    let cpu = Device::Cpu;
    let lora = fixture().join("patches/lora-qvo");
    println!(
        "threads: {} (candle/rayon), items: {}",
        candle_core::utils::get_num_threads(),
        set.len()
    );

    // 1. The fixture model.
    let t = Instant::now();
    let ev = Evaluator::load(&fixture().join("v2"), Some(&lora), &cpu)?;
    let load = t.elapsed().as_secs_f64();
    let arm = ev.evaluate(&set)?;
    println!(
        "task-llama v2+LoRA: load {load:.3} s, {} items in {:.3} s = {:.1} items/s (accuracy {:.4})",
        arm.n,
        arm.seconds,
        arm.n as f64 / arm.seconds,
        arm.value()
    );

    // 3. The gate's added time on a port (arms 2 and 3; arm 1 cached).
    let reference = evaluate_dir(&fixture().join("v1"), Some(&lora), &set, &cpu)?;
    let g = gate_with_reference(
        reference,
        &fixture().join("v2"),
        &lora,
        &set,
        &cpu,
        &VerdictPolicy::default(),
    )?;
    println!(
        "gate on task-llama v1 -> v2 (arms 2+3, loading included): {:.3} s, verdict {}",
        g.seconds,
        g.verdict.verdict.as_str()
    );

    // 2. A 135M-parameter Llama shape, random weights.
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let params = write_smollm2_shape(dir.path())?;
    println!(
        "135M-shape model: {params} parameters written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let big = Evaluator::load(dir.path(), None, &cpu)?;
    let load = t.elapsed().as_secs_f64();
    let subset = EvalSet::parse(
        std::fs::read_to_string(fixture().join("eval.jsonl"))?
            .lines()
            .take(n_big)
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    )?;
    let arm = big.evaluate(&subset)?;
    println!(
        "135M-shape: load {load:.2} s, {} items in {:.2} s = {:.2} items/s",
        arm.n,
        arm.seconds,
        arm.n as f64 / arm.seconds
    );
    println!(
        "135M-shape: estimated gate on 305 items (arms 2+3) = {:.0} s",
        2.0 * (load + 305.0 * arm.seconds / arm.n as f64)
    );
    Ok(())
}

/// SmolLM2-135M's shape with random weights (std 0.02, norms 1); returns the parameter count.
fn write_smollm2_shape(dir: &Path) -> anyhow::Result<usize> {
    let (h, layers, heads, kv, im, vocab) =
        (576usize, 30usize, 9usize, 3usize, 1536usize, 49152usize);
    let d = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": im,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": true,
        "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    std::fs::copy(fixture().join("tokenizer.json"), dir.join("tokenizer.json"))?;
    let cpu = Device::Cpu;
    let mut map = HashMap::new();
    let mut rand = |name: String, shape: &[usize]| -> anyhow::Result<()> {
        map.insert(name, Tensor::randn(0f32, 0.02, shape, &cpu)?);
        Ok(())
    };
    rand("model.embed_tokens.weight".into(), &[vocab, h])?;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        rand(format!("{p}.self_attn.q_proj.weight"), &[heads * d, h])?;
        rand(format!("{p}.self_attn.k_proj.weight"), &[kv * d, h])?;
        rand(format!("{p}.self_attn.v_proj.weight"), &[kv * d, h])?;
        rand(format!("{p}.self_attn.o_proj.weight"), &[h, heads * d])?;
        rand(format!("{p}.mlp.gate_proj.weight"), &[im, h])?;
        rand(format!("{p}.mlp.up_proj.weight"), &[im, h])?;
        rand(format!("{p}.mlp.down_proj.weight"), &[h, im])?;
    }
    let mut norms = vec!["model.norm.weight".to_owned()];
    for i in 0..layers {
        norms.push(format!("model.layers.{i}.input_layernorm.weight"));
        norms.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    for n in norms {
        map.insert(n, Tensor::ones(h, DType::F32, &cpu)?);
    }
    let params = map.values().map(Tensor::elem_count).sum();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    Ok(params)
}
