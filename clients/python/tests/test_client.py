"""Push, pull and errors against a real registry: dedupe, resume, layout checks before
any upload, byte-identical pulls, refused mismatching downloads, and typed errors that carry the
server's message while nothing stored is damaged."""

import hashlib
import shutil
from pathlib import Path

import grpc
import pytest

import patchport
from patchport.v1 import blobs_pb2, common_pb2, registry_pb2
from conftest import files_of


def _same_tree(a: Path, b: Path) -> None:
    assert files_of(a) == files_of(b)
    for rel in files_of(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_push_uploads_only_missing_blobs_and_pulls_back_identical(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    v1 = client.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
    assert v1.digest.startswith("sha256:") and v1.name == "acme/llama" and v1.version == "v1"
    assert client.last_push.created and client.last_push.uploaded_blobs == len(v1.files)
    again = client.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
    assert again.digest == v1.digest
    assert not client.last_push.created and client.last_push.uploaded_blobs == 0
    v2 = client.push_base(fixtures / "llama-micro/v2", "acme/llama", "v2", parent="v1")
    assert v2.parent == "v1" and v2.parent_digest == v1.digest
    # Only the files that changed travel (the tokenizer and configs are shared).
    assert 0 < client.last_push.uploaded_blobs < len(v2.files)
    assert client.last_push.skipped_blobs > 0
    p = client.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "1", base="acme/llama:v1")
    assert p.base.digest == v1.digest and p.adapter.r == 4

    out = client.pull("acme/llama:v2", tmp_path / "v2")
    assert out == tmp_path / "v2"
    _same_tree(fixtures / "llama-micro/v2", out)
    _same_tree(fixtures / "llama-micro/patches/lora-qv", client.pull("acme/qv:1", tmp_path / "qv"))
    by_digest = client.pull(f"acme/llama@{v1.digest}", tmp_path / "v1")
    _same_tree(fixtures / "llama-micro/v1", by_digest)


def test_an_interrupted_upload_resumes_from_the_committed_offset(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    src = fixtures / "llama-micro/v1"
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    # A cut upload: a session with its first part committed, then the client went away.
    start = client.blobs.StartUpload(blobs_pb2.StartUploadRequest(digest=digest, size=len(data)))
    half = 1 << 16
    assert len(data) > 2 * half
    resp = client.blobs.UploadChunks(
        iter([blobs_pb2.UploadChunk(upload_id=start.upload_id, offset=0, data=data[:half])])
    )
    assert resp.committed_offset == half
    stored = client.push_base(src, "acme/llama", "v1")
    total = sum(f.size for f in stored.files)
    # The weights resumed at the committed offset: only the rest of them was sent.
    assert client.last_push.uploaded_bytes == total - half
    _same_tree(src, client.pull("acme/llama:v1", tmp_path / "v1"))


def test_the_layout_is_checked_before_any_upload(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    not_adapter = shutil.copytree(fixtures / "llama-micro/patches/lora-qv", tmp_path / "a")
    (not_adapter / "adapter_config.json").unlink()
    weights = not_adapter / "adapter_model.safetensors"
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(patchport.LayoutError, match="adapter_config.json") as e:
        client.push_patch(not_adapter, "acme/qv", "1", base="acme/llama:v1")
    assert isinstance(e.value, patchport.InvalidArgument)
    no_weights = shutil.copytree(fixtures / "llama-micro/v1", tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(patchport.LayoutError, match="safetensors"):
        client.push_base(no_weights, "acme/llama", "v1")
    with pytest.raises(patchport.LayoutError, match="config.json"):
        client.push_base(fixtures / "llama-micro/patches/lora-qv", "acme/llama", "v1")
    # Nothing travelled.
    missing = client.blobs.FindMissingBlobs(blobs_pb2.FindMissingBlobsRequest(digests=[digest])).missing
    assert list(missing) == [digest]


def test_bad_input_gets_typed_errors_with_the_servers_message_and_damages_nothing(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    client.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
    client.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "1", base="acme/llama:v1")

    with pytest.raises(patchport.NotFound, match="base version acme/llama:v9 not found") as nf:
        client.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "2", base="acme/llama:v9")
    assert nf.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(patchport.NotFound, match="parent"):
        client.push_base(fixtures / "llama-micro/v2", "acme/llama", "v2", parent="v0")
    with pytest.raises(patchport.InvalidArgument) as bad:
        client.pull("not a reference", tmp_path / "x")
    assert "reference" in bad.value.message
    with pytest.raises(patchport.InvalidArgument):
        client.push_base(fixtures / "llama-micro/v1", "Acme/Llama", "v1")
    with pytest.raises(patchport.AlreadyExists) as dup:
        client.push_base(fixtures / "llama-micro/v2", "acme/llama", "v1")
    assert "v1" in str(dup.value)
    with pytest.raises(patchport.AlreadyExists):
        client.push_patch(fixtures / "llama-micro/patches/lora-all-rslora", "acme/qv", "1", base="acme/llama:v1")
    with pytest.raises(patchport.NotFound):
        client.pull("acme/llama:v7", tmp_path / "y")
    with pytest.raises(patchport.NotFound):
        client.resolve("acme/qv:1", "sha256:" + "0" * 64)

    # The earlier versions are intact.
    _same_tree(fixtures / "llama-micro/v1", client.pull("acme/llama:v1", tmp_path / "v1"))
    _same_tree(fixtures / "llama-micro/patches/lora-qv", client.pull("acme/qv:1", tmp_path / "qv"))
    listed = client.registry.ListBaseVersions(registry_pb2.ListRequest(filter="acme/llama")).versions
    assert [v.version for v in listed] == ["v1"]


def test_a_download_that_does_not_match_its_digest_is_refused_and_leaves_nothing(
    client: patchport.Client, fixtures: Path, tmp_path: Path
) -> None:
    v1 = client.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
    entry = next(f for f in v1.files if f.path == "config.json")
    other = next(f for f in v1.files if f.path == "model.safetensors")
    # An entry whose digest names other bytes than its size says.
    tampered = common_pb2.FileEntry(path=entry.path, digest=other.digest, size=entry.size)
    with pytest.raises(patchport.DigestMismatch, match="config.json"):
        client.download([tampered], tmp_path / "out")
    # A composed entry is no single blob: it needs the port it belongs to.
    composed = common_pb2.FileEntry(
        path=entry.path,
        digest=entry.digest,
        size=entry.size,
        segments=[common_pb2.Segment(blob=common_pb2.BlobRange(digest=other.digest, offset=0, length=entry.size))],
    )
    with pytest.raises(patchport.InvalidArgument, match="reference="):
        client.download([composed], tmp_path / "out")
    assert files_of(tmp_path / "out") == []


def test_permission_denied_carries_the_servers_message(binary: Path, tmp_path: Path, fixtures: Path) -> None:
    from conftest import Serve
    from patchport.v1 import admin_pb2, admin_pb2_grpc

    admin = "a" * 32
    server = Serve(binary, tmp_path / "reg", env={"PATCHPORT_ADMIN_TOKEN": admin}).start()
    try:
        root = patchport.Client(server.url, token=admin)
        root.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
        made = admin_pb2_grpc.AdminServiceStub(root._channel).CreateToken(
            admin_pb2.CreateTokenRequest(namespace="acme", scope="read"), metadata=root.metadata
        )
        reader = patchport.Client(server.url, token=made.secret)
        assert reader.get_base("acme/llama:v1").version == "v1"
        with pytest.raises(patchport.PermissionDenied) as denied:
            reader.push_base(fixtures / "llama-micro/v2", "acme/llama", "v2", parent="v1")
        assert denied.value.message
        with pytest.raises(patchport.Unauthenticated):
            patchport.Client(server.url).get_base("acme/llama:v1")
    finally:
        server.kill()


def test_a_token_never_crosses_plain_text_to_a_remote_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCHPORT_ALLOW_PLAINTEXT_TOKEN", raising=False)
    with pytest.raises(patchport.InvalidArgument, match="plain text"):
        patchport.Client("http://registry.example:50051", token="pp_x_y")
    with pytest.raises(patchport.InvalidArgument, match="invalid registry URL"):
        patchport.Client("registry.example:50051")
    monkeypatch.setenv("PATCHPORT_REGISTRY", "http://127.0.0.1:1")
    monkeypatch.setenv("PATCHPORT_TOKEN", "pp_x_y")
    c = patchport.Client()
    assert c.url == "http://127.0.0.1:1" and c.metadata == (("authorization", "Bearer pp_x_y"),)
    c.close()
