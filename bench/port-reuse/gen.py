"""Makes the port-reuse bench's models with numpy alone: a Llama-shaped bf16 base v1, v2
(every q/k/v/o weight drifted), v3 (v2 with ONE target tensor changed, every other byte
the same) and N distinct rank-16 q/k/v/o LoRA patches on v1.

    python3 gen.py WORK N [LAYERS] [HIDDEN]
"""

import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures", "llama-micro")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def bf16(a):
    """float32 -> bf16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes), written in name order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in sorted(tensors):
            f.write(tensors[name][2])
    os.replace(tmp, path)


def base(out, weights, cfg):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(
        os.path.join(out, "model.safetensors"),
        {n: ("BF16", list(w.shape), bf16(w)) for n, w in weights.items()},
    )


def main(work, n, layers, hidden):
    rng = np.random.default_rng(0)
    inter, vocab = hidden * 11 // 4, 32000
    with open(os.path.join(FIXTURES, "v1", "config.json")) as f:
        cfg = json.load(f)
    heads = hidden // 64
    cfg.update(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
        vocab_size=vocab, dtype="bfloat16", max_position_embeddings=2048,
    )
    w = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden), np.float32) * 0.02,
        "lm_head.weight": rng.standard_normal((vocab, hidden), np.float32) * 0.02,
        "model.norm.weight": np.ones(hidden, np.float32),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in TARGETS:
            w[p + f"self_attn.{m}.weight"] = rng.standard_normal((hidden, hidden), np.float32) * 0.02
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((inter, hidden), np.float32) * 0.02
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((inter, hidden), np.float32) * 0.02
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, inter), np.float32) * 0.02
        w[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    base(os.path.join(work, "v1"), w, cfg)
    for name in list(w):
        if any(f"self_attn.{m}." in name for m in TARGETS):
            w[name] = w[name] + rng.standard_normal(w[name].shape, np.float32) * 0.002
    base(os.path.join(work, "v2"), w, cfg)
    changed = "model.layers.0.self_attn.q_proj.weight"
    w[changed] = w[changed] + rng.standard_normal(w[changed].shape, np.float32) * 0.002
    base(os.path.join(work, "v3"), w, cfg)

    with open(os.path.join(FIXTURES, "patches", "lora-qv", "adapter_config.json")) as f:
        acfg = json.load(f)
    acfg.update(r=16, lora_alpha=32, target_modules=list(TARGETS), base_model_name_or_path="bench/v1")
    for k in range(n):
        out = os.path.join(work, "patches", f"p{k}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump(acfg, f, indent=2)
        t = {}
        for i in range(layers):
            for m in TARGETS:
                p = f"base_model.model.model.layers.{i}.self_attn.{m}."
                a = rng.standard_normal((16, hidden), np.float32) * 0.01
                b = rng.standard_normal((hidden, 16), np.float32) * 0.01
                t[p + "lora_A.weight"] = ("F32", [16, hidden], a.tobytes())
                t[p + "lora_B.weight"] = ("F32", [hidden, 16], b.tobytes())
        write_safetensors(os.path.join(out, "adapter_model.safetensors"), t)
    print(changed)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]),
         int(sys.argv[3]) if len(sys.argv) > 3 else 8,
         int(sys.argv[4]) if len(sys.argv) > 4 else 1024)
