"""Makes N distinct rank-16 patches from the port-vs-peft LoRA: patch i is the LoRA with
every lora_B scaled by 1 + (i + 1) / 100, so no two share a tensor. Also prints the bytes
ONE port of such a patch reads: the target modules' weights (q/k/v/o) in both bases plus
the patch's files."""

import json
import os
import shutil
import struct
import sys

import torch
from safetensors.torch import load_file, save_file


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def target_bytes(path):
    h = header(path)
    total = 0
    for name, t in h.items():
        if name == "__metadata__":
            continue
        if any(f"self_attn.{m}.weight" in name for m in ("q_proj", "k_proj", "v_proj", "o_proj")):
            b, e = t["data_offsets"]
            total += e - b
    return total


def main(work, n):
    lora = os.path.join(work, "lora")
    tensors = load_file(os.path.join(lora, "adapter_model.safetensors"))
    for i in range(n):
        out = os.path.join(work, "patches", f"p{i}")
        if not os.path.exists(os.path.join(out, "adapter_config.json")):
            os.makedirs(out, exist_ok=True)
            scaled = {
                k: (v * (1.0 + (i + 1) / 100.0) if "lora_B" in k else v).contiguous()
                for k, v in tensors.items()
            }
            save_file(scaled, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.copy(os.path.join(lora, "adapter_config.json"), out)
    p0 = os.path.join(work, "patches", "p0")
    patch = sum(os.path.getsize(os.path.join(p0, f)) for f in os.listdir(p0))
    one = target_bytes(os.path.join(work, "v1", "model.safetensors")) + target_bytes(
        os.path.join(work, "v2", "model.safetensors")
    ) + patch
    print(one)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
