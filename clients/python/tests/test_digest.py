"""patchport.base_digest / patch_digest compute locally what the registry gives a pushed
directory, for every fixture (the sharded base included)."""

from pathlib import Path

import pytest

import patchport

BASES = [
    "llama-micro/v1",
    "llama-micro/v2",
    "llama-micro/v2-sharded",
    "llama-micro/v2-bf16",
    "llama-micro/v2-f16",
    "llama-micro/v3-vocab",
    "gpt2-micro/v1",
    "gpt2-micro/v2",
    "task-llama/v1",
    "task-llama/v2",
    "task-llama/v2-drift",
]


def test_every_base_fixture_digest_equals_the_registrys(client: patchport.Client, fixtures: Path) -> None:
    for i, rel in enumerate(BASES):
        family, version = rel.split("/")
        stored = client.push_base(fixtures / rel, f"fx/{family}", version)
        assert patchport.base_digest(fixtures / rel) == stored.digest, rel
        assert client.get_base(f"fx/{family}:{version}").digest == stored.digest


def test_patch_digest_equals_the_registrys(client: patchport.Client, fixtures: Path) -> None:
    client.push_base(fixtures / "llama-micro/v1", "fx/llama", "v1")
    for patch in ["lora-qv", "lora-all-rslora", "lora-patterns", "dora"]:
        stored = client.push_patch(fixtures / "llama-micro/patches" / patch, f"fx/{patch}", "1", base="fx/llama:v1")
        assert patchport.patch_digest(fixtures / "llama-micro/patches" / patch) == stored.digest, patch


def test_base_digest_refuses_a_directory_that_is_not_a_model(tmp_path: Path, fixtures: Path) -> None:
    with pytest.raises(patchport.LayoutError, match="config.json"):
        patchport.base_digest(fixtures / "llama-micro/patches/lora-qv")
    with pytest.raises(patchport.LayoutError, match="not a directory"):
        patchport.base_digest(tmp_path / "absent")
