"""The whole journey: push a base and a patch, publish v2, see the port complete, ask
compat, resolve by the digest of the local v2 and pull the port (adapter and merged).

    PATCHPORT_REGISTRY=http://127.0.0.1:50051 python journey.py tests/fixtures/llama-micro ./out
"""
import sys
from pathlib import Path

import patchport

fx, out = Path(sys.argv[1]), Path(sys.argv[2])  # the llama-micro fixtures, an output dir
c = patchport.Client()  # $PATCHPORT_REGISTRY, $PATCHPORT_TOKEN
c.push_base(fx / "v1", "acme/llama-micro", "v1")
c.push_patch(fx / "patches/lora-qv", "acme/qv", "1", base="acme/llama-micro:v1")
c.push_base(fx / "v2", "acme/llama-micro", "v2", parent="v1")  # publishing queues the port
done = next(e for e in c.watch(types=["port.completed"], cursor="0") if e.patch == "acme/qv:1")
print("port.completed", done.patch, "->", done.base, done.state)
print("compat", [(e.base, patchport.compat_kind(e.kind)) for e in c.compat(patch="acme/qv:1")])
res = c.resolve("acme/qv:1", patchport.base_digest(fx / "v2"))  # the weights we have loaded
print("resolved", res.kind, res.base)
print("adapter", c.pull(f"{res.patch}@{res.base}", out / "adapter"))
print("merged", c.pull(f"{res.patch}@{res.base}", out / "merged", merged=True))
