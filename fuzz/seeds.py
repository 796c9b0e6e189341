#!/usr/bin/env python3
"""Regenerates fuzz/corpus/<target>/ from the fixtures and hand-made inputs.

Run from anywhere: python3 fuzz/seeds.py. Seeds are small (< 64 KiB): safetensors files
under 64 KiB are taken whole, larger ones by their header (prefix + JSON) only. Each
seed is named by the sha256 of its bytes, as libFuzzer names corpus entries.
"""
import hashlib
import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = ROOT / "fuzz" / "corpus"
LIMIT = 64 * 1024
MAX_HEADER_LEN = 100_000_000


def put(target, data):
    assert len(data) < LIMIT, (target, len(data))
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha256(data).hexdigest()[:40]).write_bytes(data)


def st(header, data=b""):
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)

    # safetensors_header and tensor_index: real files (whole or header only).
    for f in sorted(FIXTURES.rglob("*.safetensors")):
        b = f.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        if len(b) < LIMIT - 2:
            put("safetensors_header", b)
            for seed, mode in [(0, 0), (7, 0), (200, 0), (3, 1 | 4), (5, 2 | 8)]:
                put("tensor_index", bytes([seed, mode]) + b)
        head = b[: 8 + n]
        # The header and the first bytes of the data: a file cut short.
        put("safetensors_header", head)
        put("tensor_index", bytes([1, 1 | (63 << 2)]) + head + b[8 + n : 8 + n + 64])
    # Hand-made headers: edge cases of the prefix, the limit and the layout.
    tiny = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
    }
    nan = struct.pack("<ff", 1.0, float("nan")) + bytes([0x80, 0x3F, 0x80, 0x7F] * 2)
    for case in [
        b"",
        b"\x00" * 7,
        b"\x00" * 8,
        struct.pack("<Q", 2) + b"{}",
        struct.pack("<Q", MAX_HEADER_LEN) + b"{",
        struct.pack("<Q", MAX_HEADER_LEN + 1) + b"{}",
        struct.pack("<Q", 2**64 - 1) + b"{}",
        st(tiny, nan),
        st({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4),
        st({"z": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
            "y": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}),
        st({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
        st({"a": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 8]}}, b"\0" * 8),
        st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        st({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4),
    ]:
        put("safetensors_header", case)
        for seed, mode in [(0, 0), (9, 3), (17, 2)]:
            put("tensor_index", bytes([seed, mode]) + case)

    # adapter_config: every fixture's config, and hand-made edge cases.
    for f in sorted(FIXTURES.rglob("adapter_config.json")):
        put("adapter_config", f.read_bytes())
    for case in [
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "model\\..*\\.(q|v)_proj"},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8.5, "use_rslora": True,
         "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 1},
         "alpha_pattern": {"^model.*o_proj": 3.25}},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "lora_only", "lora_bias": True,
         "init_lora_weights": "pissa_niter_4", "trainable_token_indices": [1, 2],
         "modules_to_save": ["lm_head", "embed_tokens"], "use_dora": True},
        {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []},
        {"peft_type": "LORA", "r": 4294967295, "lora_alpha": 1e308},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"(": 2}},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"a{1000}{1000}": 2}},
        [1, 2],
    ]:
        put("adapter_config", json.dumps(case).encode())
    put("adapter_config", b"{")

    # model_config: every fixture's config.json, and edge cases.
    for f in sorted(FIXTURES.rglob("config.json")):
        if f.name == "config.json":
            put("model_config", f.read_bytes())
    for case in [b"{}", b'{"model_type":""}', b'{"model_type":"t5","d_model":512,"num_layers":6}',
                 b'{"model_type":"llama","hidden_size":-1,"architectures":[1,"A"]}', b"[" * 200]:
        put("model_config", case)

    # names: every shape of name, version, digest and reference, good and bad.
    d = "sha256:" + hashlib.sha256(b"x").hexdigest()
    for case in [
        "acme/llama-micro", "acme/med-qa", "Acme/x", "acme", "a/b/c", "acme/-x", "acme/\u00e9",
        "v1", "1.2.3+build-4", "-v1", "v 1", "a" * 129,
        d, d.upper(), d[:-1],
        "acme/qv:1", "acme/llama-micro:v2", f"acme/qv@{d}", f"acme/qv:{d}", "acme/qv:",
        "acme/qv@v2", "acme/qv:1@acme/llama-micro:v2", f"acme/qv@{d}@acme/llama:v2",
        f"acme/qv:1@acme/llama@{d}", f"acme/qv@{d}@acme/llama@{d}", "acme/qv:1@", "@", "@@sha256:",
        "acme/" + "n" * 128 + ":" + "V" * 128,
    ]:
        put("names", case.encode())


if __name__ == "__main__":
    main()
