"""Generates the benchmark inputs: a Llama-shaped base of about 1.4 GB in bf16 in two
versions (v2 = v1 + small drift) and a rank-16 LoRA on q/k/v/o trained on v1, in the
Hugging Face and PEFT layouts. Seeded, so every run gets the same bytes."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

HIDDEN = 2048
INTER = 5632
LAYERS = 13
HEADS = 32
KV_HEADS = 4
VOCAB = 32000
RANK = 16
ALPHA = 32
HEAD_DIM = HIDDEN // HEADS
KV = KV_HEADS * HEAD_DIM


def shapes():
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield p + "self_attn.k_proj.weight", (KV, HIDDEN)
        yield p + "self_attn.v_proj.weight", (KV, HIDDEN)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}


def write_base(path, tensors):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)


def main(work):
    g = torch.Generator().manual_seed(0)
    v1 = {}
    for name, shape in shapes():
        if len(shape) == 1:
            v1[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float32) * (1.0 / shape[-1] ** 0.5)
            v1[name] = t.to(torch.bfloat16)
    size = sum(t.numel() * t.element_size() for t in v1.values())
    print(f"base: {sum(t.numel() for t in v1.values()) / 1e6:.0f}M parameters, {size / 1e9:.2f} GB bf16")
    write_base(os.path.join(work, "v1"), v1)
    v2 = {}
    for name, t in v1.items():
        drift = torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.002
        v2[name] = (t.float() + drift * t.float().abs().mean()).to(torch.bfloat16)
    del v1
    write_base(os.path.join(work, "v2"), v2)
    del v2

    adapter = {}
    for i in range(LAYERS):
        for mod, out_f in [("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)]:
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            adapter[key + ".lora_A.weight"] = torch.randn((RANK, HIDDEN), generator=g) * (1.0 / HIDDEN**0.5)
            adapter[key + ".lora_B.weight"] = torch.randn((out_f, RANK), generator=g) * 0.01
    lora = os.path.join(work, "lora")
    os.makedirs(lora, exist_ok=True)
    save_file(adapter, os.path.join(lora, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": "bench/v1",
                "revision": None,
                "r": RANK,
                "lora_alpha": ALPHA,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "init_lora_weights": True,
                "modules_to_save": None,
                "rank_pattern": {},
                "alpha_pattern": {},
                "inference_mode": True,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main(sys.argv[1])
