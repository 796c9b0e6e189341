"""PEFT loads the pulled port onto v2 exactly as it applies the original adapter onto v2,
and the pulled merged model matches PEFT's merge_and_unload within the port-fidelity
bound (workers/engine/tests/fixtures.rs: PEFT rounds B·A in f32, then the delta and the
sum, where patchport rounds the f64 sum once)."""

import json
from pathlib import Path

import pytest

import patchport
from conftest import publish, require

V2 = "acme/llama-micro:v2"


def _load(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _logits(model, ids):  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_peft_from_registry_equals_the_original_adapter_on_v2(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    for m in ("torch", "transformers", "peft"):
        require(m)
    import torch
    from peft import PeftModel

    import patchport.peft

    publish(client, fixtures)
    client.wait_port("acme/lora-qv:1", V2, timeout=120)
    v2 = fixtures / "llama-micro/v2"
    original = fixtures / "llama-micro/patches/lora-qv"
    ids = (torch.arange(24, dtype=torch.long) * 7 % 320).reshape(1, -1)

    ported = patchport.peft.from_registry(_load(v2), "acme/lora-qv:1", client, cache_dir=tmp_path / "cache")
    assert isinstance(ported, PeftModel)
    reference = PeftModel.from_pretrained(_load(v2), str(original)).eval()
    got, want = _logits(ported.eval(), ids), _logits(reference, ids)
    bare = _logits(_load(v2), ids)
    assert (want - bare).abs().max().item() > 1e-3, "the adapter changes the logits"
    diff = (got - want).abs().max().item()
    print(f"max |logits(port via registry) - logits(original adapter)| on v2 = {diff:.3g}")
    assert diff <= 1e-5

    # The port pulled by reference loads the same way.
    pulled = client.pull(f"acme/lora-qv:1@{V2}", tmp_path / "pulled")
    from_pull = PeftModel.from_pretrained(_load(v2), str(pulled)).eval()
    assert (_logits(from_pull, ids) - want).abs().max().item() <= 1e-5

    # Downloaded once: a second resolution reuses the cached directory.
    cached = sorted((tmp_path / "cache" / "adapters").iterdir())
    patchport.peft.from_registry(_load(v2), "acme/lora-qv:1", client, cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache" / "adapters").iterdir()) == cached and len(cached) == 1

    # By reference when the model's path is not the base's directory.
    by_ref = patchport.peft.from_registry(
        _load(v2), "acme/lora-qv:1", client, base=V2, cache_dir=tmp_path / "cache"
    )
    assert (_logits(by_ref.eval(), ids) - want).abs().max().item() <= 1e-5
    # On v1 the patch itself (native) is the answer.
    native = patchport.peft.from_registry(
        _load(fixtures / "llama-micro/v1"), "acme/lora-qv:1", client, cache_dir=tmp_path / "cache"
    )
    native_want = PeftModel.from_pretrained(_load(fixtures / "llama-micro/v1"), str(original)).eval()
    assert (_logits(native.eval(), ids) - _logits(native_want, ids)).abs().max().item() == 0.0
    # A base the registry does not know: no silent bare base.
    with pytest.raises(patchport.NotFound):
        patchport.peft.from_registry(_load(fixtures / "llama-micro/v2-f16"), "acme/lora-qv:1", client)


def test_the_merged_port_matches_peft_merge_and_unload(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    for m in ("torch", "transformers", "peft", "safetensors"):
        require(m)
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    publish(client, fixtures)
    client.wait_port("acme/lora-qv:1", V2, timeout=120)
    merged_dir = client.pull(f"acme/lora-qv:1@{V2}", tmp_path / "merged", merged=True)
    v2 = fixtures / "llama-micro/v2"
    original = fixtures / "llama-micro/patches/lora-qv"
    merged = _load(merged_dir)
    peft_merged = PeftModel.from_pretrained(_load(v2), str(original)).merge_and_unload().eval()
    base = _load(v2)

    cfg = json.loads((original / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(original / "adapter_model.safetensors"))
    eps = float(torch.finfo(torch.float32).eps)
    got_sd, peft_sd, base_sd = merged.state_dict(), peft_merged.state_dict(), base.state_dict()
    assert sorted(got_sd) == sorted(peft_sd)
    targets = 0
    worst = 0.0
    for name, w in base_sd.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key not in lora:
            assert torch.equal(got_sd[name], w), f"{name}: untouched, bit-identical to v2"
            continue
        targets += 1
        a = lora[a_key].double()
        b = lora[f"base_model.model.{module}.lora_B.weight"].double()
        delta = scale * (b @ a)
        terms = scale * (b.abs() @ a.abs())
        bound = 2 * eps * (w.double().abs() + delta.abs()) + cfg["r"] * eps * terms
        diff = (got_sd[name].double() - peft_sd[name].double()).abs()
        assert bool((diff <= bound).all()), f"{name}: beyond PEFT's rounding"
        # And it is the exact f64 sum rounded once (within one f32 ulp).
        exact = w.double() + delta
        assert bool(((got_sd[name].double() - exact).abs() <= eps * exact.abs() + 1e-30).all()), name
        worst = max(worst, float((diff / bound.clamp_min(1e-300)).max()))
    assert targets == 4  # q_proj and v_proj of two layers
    print(f"merged vs PEFT merge_and_unload: worst diff / bound = {worst:.3g} over {targets} tensors")
    ids = (torch.arange(24, dtype=torch.long) * 7 % 320).reshape(1, -1)
    assert (_logits(merged, ids) - _logits(peft_merged, ids)).abs().max().item() <= 1e-4
