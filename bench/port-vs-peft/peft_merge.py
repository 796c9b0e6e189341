"""PEFT's own merge, as a user runs it: load the new base, apply the adapter,
merge_and_unload, save_pretrained with safetensors. Prints the phase times as JSON."""

import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

t1 = time.perf_counter()
new_base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(new_base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
t2 = time.perf_counter()
model = model.merge_and_unload()
t3 = time.perf_counter()
model.save_pretrained(out, safe_serialization=True)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "merge_s": t3 - t2, "save_s": t4 - t3}))
