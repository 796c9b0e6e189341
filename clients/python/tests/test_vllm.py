"""The vLLM LoRA resolver: a patch reference resolves to the adapter made for the base
vLLM serves (by the digest of its directory, or a configured reference), downloaded once;
no port for that base is a refusal with the registry's message, never the bare base."""

import asyncio
import sys
from importlib import metadata
from pathlib import Path

import pytest

import patchport
from conftest import files_of, publish, require
from patchport.vllm import PatchportResolver, is_patch_reference

V2 = "acme/llama-micro:v2"


def test_the_plugin_is_declared_for_vllm() -> None:
    eps = metadata.entry_points()
    group = eps.select(group="vllm.general_plugins") if hasattr(eps, "select") else eps.get("vllm.general_plugins", [])
    ours = [e for e in group if e.name == "patchport_lora_resolver"]
    assert [e.value for e in ours] == ["patchport.vllm:register"]
    assert is_patch_reference("acme/qv:1") and is_patch_reference("acme/qv@sha256:" + "a" * 64)
    assert not is_patch_reference("meta-llama/Llama-3.1-8B") and not is_patch_reference("sql-lora")


def test_resolver_contract(client: patchport.Client, fixtures: Path, tmp_path: Path) -> None:
    publish(client, fixtures, ("lora-qv", "dora"))
    client.wait_port("acme/lora-qv:1", V2, timeout=120)
    with pytest.raises(patchport.Refused):
        client.wait_port("acme/dora:1", V2, timeout=120)
    v2 = str(fixtures / "llama-micro/v2")
    resolver = PatchportResolver(client=client, cache_dir=tmp_path / "cache")

    path = resolver.resolve_path(v2, "acme/lora-qv:1")
    assert path is not None
    assert files_of(path) == [".complete", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    port = client.pull(f"acme/lora-qv:1@{V2}", tmp_path / "port")
    assert (path / "adapter_config.json").read_bytes() == (port / "adapter_config.json").read_bytes()
    stamp = (path / "adapter_model.safetensors").stat().st_mtime_ns
    assert resolver.resolve_path(v2, "acme/lora-qv:1") == path  # downloaded once
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    # Not a patchport name: other resolvers may answer.
    assert resolver.resolve_path(v2, "sql-lora") is None
    # Refused port, and a base with no port: refusals, never the bare base.
    with pytest.raises(patchport.Refused) as r:
        resolver.resolve_path(v2, "acme/dora:1")
    assert r.value.kinds == ["dora"]
    with pytest.raises(patchport.NotFound, match="no port"):
        resolver.resolve_path(str(fixtures / "llama-micro/v2-f16"), "acme/lora-qv:1")
    with pytest.raises(patchport.LayoutError, match="PATCHPORT_VLLM_MODEL_DIR"):
        resolver.resolve_path("meta-llama/Llama-3.1-8B", "acme/lora-qv:1")
    # A configured base reference instead of a directory.
    by_ref = PatchportResolver(client=client, base=V2, cache_dir=tmp_path / "cache")
    assert by_ref.resolve_path("served-name", "acme/lora-qv:1") == path


def test_resolver_with_vllms_own_classes(
    client: patchport.Client, fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("vllm", "vLLM pins its own torch, so it lives in a venv of its own: see clients/python/README.md")
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    import patchport.vllm

    publish(client, fixtures, ("lora-qv", "dora"))
    client.wait_port("acme/lora-qv:1", V2, timeout=120)
    with pytest.raises(patchport.Refused):
        client.wait_port("acme/dora:1", V2, timeout=120)
    monkeypatch.setenv("PATCHPORT_REGISTRY", client.url)
    monkeypatch.setenv("PATCHPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PATCHPORT_VLLM_BASE", raising=False)
    monkeypatch.delenv("PATCHPORT_VLLM_MODEL_DIR", raising=False)
    # What vLLM's plugin loader does: call the entry point.
    ep = next(
        e for e in metadata.entry_points(group="vllm.general_plugins") if e.name == "patchport_lora_resolver"
    )
    ep.load()()
    resolver = LoRAResolverRegistry.get_resolver(patchport.vllm.RESOLVER_NAME)
    assert isinstance(resolver, LoRAResolver) and isinstance(resolver, PatchportResolver)

    v2 = str(fixtures / "llama-micro/v2")
    req = asyncio.run(resolver.resolve_lora(v2, "acme/lora-qv:1"))
    assert isinstance(req, LoRARequest)
    assert req.lora_name == "acme/lora-qv:1" and req.lora_int_id > 0
    assert "adapter_model.safetensors" in files_of(Path(req.lora_path))
    assert asyncio.run(resolver.resolve_lora(v2, "sql-lora")) is None
    with pytest.raises(patchport.Refused):
        asyncio.run(resolver.resolve_lora(v2, "acme/dora:1"))
    with pytest.raises(patchport.NotFound):
        asyncio.run(resolver.resolve_lora(str(fixtures / "llama-micro/v2-f16"), "acme/lora-qv:1"))
    print(f"vllm resolver: {type(resolver).__mro__[1].__module__} on Python {sys.version.split()[0]}")
