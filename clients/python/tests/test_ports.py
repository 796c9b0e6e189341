"""Ports from Python: wait, compat, resolve (native, ported, refused), request, and the
merged model composed by the registry."""

import json
from pathlib import Path

import pytest

import patchport
from conftest import files_of, publish

V2 = "acme/llama-micro:v2"


def test_ported_and_refused_ports(client: patchport.Client, fixtures: Path, tmp_path: Path) -> None:
    publish(client, fixtures, ("lora-qv", "dora"))
    port = client.wait_port("acme/lora-qv:1", V2, timeout=120)
    assert patchport.port_state(port) == "succeeded" and port.merged_files

    with pytest.raises(patchport.Refused) as refused:
        client.wait_port("acme/dora:1", V2, timeout=120)
    assert refused.value.kinds == ["dora"] and "DoRA" in str(refused.value)

    kinds = {(e.patch, e.base): patchport.compat_kind(e.kind) for e in client.compat(base=V2)}
    assert kinds == {("acme/lora-qv:1", V2): "ported", ("acme/dora:1", V2): "incompatible"}
    by_patch = {e.base: patchport.compat_kind(e.kind) for e in client.compat(patch="acme/lora-qv:1")}
    assert by_patch == {"acme/llama-micro:v1": "native", V2: "ported"}

    v1_digest = patchport.base_digest(fixtures / "llama-micro/v1")
    v2_digest = patchport.base_digest(fixtures / "llama-micro/v2")
    native = client.resolve("acme/lora-qv:1", v1_digest)
    assert (native.kind, native.base) == ("native", "acme/llama-micro:v1")
    ported = client.resolve("acme/lora-qv:1", v2_digest)
    assert (ported.kind, ported.patch, ported.base) == ("ported", "acme/lora-qv:1", V2)
    with pytest.raises(patchport.Refused) as r:
        client.resolve("acme/dora:1", v2_digest)
    assert r.value.kinds == ["dora"] and "incompatible" in r.value.message
    with pytest.raises(patchport.FailedPrecondition, match="quality gate"):
        client.resolve("acme/lora-qv:1", v2_digest, require_pass=True)
    with pytest.raises(patchport.Refused):
        client.pull(f"acme/dora:1@{V2}", tmp_path / "nothing")

    # The resolved adapter is the patch's tensors, its config re-pointed at v2.
    adapter = client.download(ported.files, tmp_path / "resolved")
    pulled = client.pull(f"acme/lora-qv:1@{V2}", tmp_path / "port")
    assert files_of(adapter) == files_of(pulled)
    original = fixtures / "llama-micro/patches/lora-qv"
    assert (pulled / "adapter_model.safetensors").read_bytes() == (original / "adapter_model.safetensors").read_bytes()
    assert json.loads((pulled / "adapter_config.json").read_text())["base_model_name_or_path"] != json.loads(
        (original / "adapter_config.json").read_text()
    )["base_model_name_or_path"]


def test_a_sharded_merged_model_pulls_whole_files_the_registry_composes(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    client.push_base(fixtures / "llama-micro/v1", "acme/llama-micro", "v1")
    client.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "1", base="acme/llama-micro:v1")
    client.push_base(fixtures / "llama-micro/v2-sharded", "acme/llama-micro", "v2s", parent="v1")
    port = client.wait_port("acme/qv:1", "acme/llama-micro:v2s", timeout=120)
    composed = [f for f in port.merged_files if f.segments]
    assert composed, "the merged safetensors files are composed of segments"
    merged = client.pull("acme/qv:1@acme/llama-micro:v2s", tmp_path / "merged", merged=True)
    assert sorted(files_of(merged)) == sorted(f.path for f in port.merged_files)
    for f in port.merged_files:
        assert (merged / f.path).stat().st_size == f.size
    # Shards no target touched are the base's own bytes.
    base = fixtures / "llama-micro/v2-sharded"
    same = [f.path for f in port.merged_files if (base / f.path).is_file()
            and (base / f.path).read_bytes() == (merged / f.path).read_bytes()]
    assert "config.json" in same


def test_request_port_queues_a_pair_outside_the_lineage(
    client: patchport.Client, fixtures: Path
) -> None:
    client.push_base(fixtures / "llama-micro/v1", "acme/llama-micro", "v1")
    client.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "1", base="acme/llama-micro:v1")
    client.push_base(fixtures / "llama-micro/v2-f16", "acme/llama-micro", "f16")  # no parent: no fan-out
    queued = client.request_port("acme/qv:1", "acme/llama-micro:f16", priority=5)
    assert patchport.port_state(queued) in ("queued", "running", "succeeded")
    done = client.wait_port("acme/qv:1", "acme/llama-micro:f16", timeout=120)
    assert done.adapter_files
    with pytest.raises(patchport.NotFound):
        client.request_port("acme/qv:1", "acme/absent:1")
    with pytest.raises(patchport.InvalidArgument):
        client.request_port("acme/qv:1", "acme/llama-micro:f16", priority=5000)


def test_a_pulled_port_carries_the_registrys_signature_and_verifies_offline(
    client: patchport.Client, server: "object", fixtures: Path, tmp_path: Path
) -> None:
    import subprocess

    publish(client, fixtures)
    client.wait_port("acme/lora-qv:1", V2, timeout=120)
    pulled = client.pull(f"acme/lora-qv:1@{V2}", tmp_path / "port")
    assert (pulled / "model.sig").is_file() and (pulled / "provenance.json").is_file()
    binary = str(server.binary)  # type: ignore[attr-defined]
    url = client.url
    key = subprocess.run(
        [binary, "signing-key", "--registry", url], check=True, capture_output=True, text=True
    ).stdout
    (tmp_path / "key.pem").write_text(key)
    verify = [binary, "verify", str(pulled), "--public-key", str(tmp_path / "key.pem")]
    ok = subprocess.run(verify, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # One flipped byte in the weights and the signature no longer holds.
    weights = pulled / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = subprocess.run(verify, capture_output=True, text=True)
    assert bad.returncode != 0, bad.stdout
