"""Checks that patchport's merged model and PEFT's hold the same tensors: untouched ones
bit-identical, merged ones equal up to PEFT's extra rounding (it rounds the delta to bf16,
then the sum; patchport rounds once). Differences are measured in units of
eps_bf16 * (|W| + |delta|), W the new base's weight."""

import sys

import torch
from safetensors.torch import load_file

ours = load_file(sys.argv[1])
peft = load_file(sys.argv[2])
base = load_file(sys.argv[3])
assert sorted(ours) == sorted(peft), "different tensor names"
targets = [k for k in ours if not torch.equal(ours[k], base[k])]
for k in ours:
    if k not in targets:
        assert torch.equal(ours[k], peft[k]), f"{k}: untouched tensor differs"
differ = total = 0
worst = 0.0
eps = torch.finfo(torch.bfloat16).eps
for k in targets:
    a, b, w = ours[k].double(), peft[k].double(), base[k].double()
    differ += int((a != b).sum())
    total += a.numel()
    scale = (w.abs() + (a - w).abs()).clamp_min(1e-30)
    worst = max(worst, float(((a - b).abs() / (eps * scale)).max()))
print(f"compare: {len(ours) - len(targets)} untouched tensors identical; {len(targets)} merged "
      f"tensors: {differ} of {total} elements differ from PEFT's, by at most "
      f"{worst:.2f} eps*(|W|+|delta|)")
