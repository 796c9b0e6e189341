"""Local directories: scanning and hashing files, the layout checks, and the manifest
digest the registry gives a version (the same algorithm as the registry's own
``layout::manifest_digest`` in services/core)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

from .errors import LayoutError

__all__ = ["LocalFile", "scan_dir", "hash_file", "manifest_digest", "base_digest", "patch_digest"]

PathLike = Union[str, "os.PathLike[str]"]

#: The adapter config of a PEFT directory.
ADAPTER_CONFIG = "adapter_config.json"
#: The adapter weights of a PEFT directory.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: A base's model config.
MODEL_CONFIG = "config.json"

_READ = 1 << 20


@dataclass(frozen=True)
class LocalFile:
    """A file of a local directory, hashed.

    Attributes:
        path: Path relative to the directory, ``/``-separated.
        local: Where it is on disk.
        digest: ``sha256:<64 hex>`` of its bytes.
        size: Its size in bytes.
    """

    path: str
    local: Path
    digest: str
    size: int


def hash_file(path: PathLike) -> "tuple[str, int]":
    """The ``sha256:<hex>`` digest and size of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ)
            if not block:
                break
            h.update(block)
            size += len(block)
    return "sha256:" + h.hexdigest(), size


def scan_dir(path: PathLike) -> List[LocalFile]:
    """Every regular file under ``path`` (following symlinks), hashed, sorted by relative
    path. Entries whose name starts with ``.`` are skipped (``.git`` and ``.cache`` never
    travel), exactly as the CLI's push does."""
    root = Path(path)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a directory")
    out: List[LocalFile] = []
    stack = [(root, "")]
    while stack:
        abs_dir, rel = stack.pop()
        with os.scandir(abs_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel_path = entry.name if not rel else f"{rel}/{entry.name}"
                full = Path(entry.path)
                if full.is_dir():
                    stack.append((full, rel_path))
                elif full.is_file():
                    digest, size = hash_file(full)
                    out.append(LocalFile(rel_path, full, digest, size))
    out.sort(key=lambda f: f.path.encode("utf-8"))
    return out


def manifest_digest(kind: str, files: Sequence[LocalFile]) -> str:
    """The digest that identifies a version's content: sha256 over
    ``patchport-manifest-v1\\0<kind>\\n`` and the files' ``path\\0digest\\0size\\n`` lines
    in byte order of their paths."""
    h = hashlib.sha256()
    h.update(b"patchport-manifest-v1\0")
    h.update(kind.encode("utf-8"))
    h.update(b"\n")
    for f in sorted(files, key=lambda f: f.path.encode("utf-8")):
        h.update(f.path.encode("utf-8"))
        h.update(b"\0")
        h.update(f.digest.encode("ascii"))
        h.update(b"\0")
        h.update(str(f.size).encode("ascii"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def check_base_files(root: Path, files: Sequence[LocalFile]) -> None:
    """Raises :class:`LayoutError` unless the files are a Hugging Face model directory."""
    paths = {f.path for f in files}
    if MODEL_CONFIG not in paths:
        raise LayoutError(
            f"{root}: missing {MODEL_CONFIG}: a base version is a Hugging Face model "
            "directory with config.json at its root"
        )
    if not any(p.endswith(".safetensors") for p in paths):
        raise LayoutError(
            f"{root}: missing *.safetensors: a base version needs its weights as one or "
            "more .safetensors files"
        )


def check_patch_files(root: Path, files: Sequence[LocalFile]) -> None:
    """Raises :class:`LayoutError` unless the files are a PEFT adapter directory."""
    paths = {f.path for f in files}
    if ADAPTER_CONFIG not in paths:
        raise LayoutError(
            f"{root}: missing {ADAPTER_CONFIG}: a patch is a PEFT adapter directory "
            "(save_pretrained output) with adapter_config.json at its root"
        )
    if ADAPTER_WEIGHTS not in paths:
        raise LayoutError(
            f"{root}: missing {ADAPTER_WEIGHTS}: a patch needs its weights in "
            "adapter_model.safetensors"
        )


def base_digest(path: PathLike) -> str:
    """The digest the registry gives the directory ``path`` when it is pushed as a base,
    computed locally (no registry needed).

    A serving engine passes it to :meth:`patchport.Client.resolve` to get the adapter
    for the exact weights it has loaded.
    """
    root = Path(path)
    files = scan_dir(root)
    check_base_files(root, files)
    return manifest_digest("base", files)


def patch_digest(path: PathLike) -> str:
    """The digest the registry gives the directory ``path`` when it is pushed as a patch."""
    root = Path(path)
    files = scan_dir(root)
    check_patch_files(root, files)
    return manifest_digest("patch", files)
