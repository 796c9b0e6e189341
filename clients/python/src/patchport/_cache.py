"""A local cache of resolved adapters, keyed by content: a directory is filled once,
verified, then reused by every later resolution that yields the same files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from ._client import Client, Resolution
from ._files import LocalFile, manifest_digest

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$PATCHPORT_CACHE``, else ``~/.cache/patchport``."""
    env = os.environ.get("PATCHPORT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "patchport"


def fetch(client: Client, resolution: Resolution, cache_dir: Optional[PathLike] = None) -> Path:
    """The directory holding the resolved adapter's files, downloaded (every byte
    verified) the first time and reused afterwards.

    The directory is named after the digest of the adapter's file list, so two
    resolutions that yield the same bytes share it, and a new port gets a new one.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = manifest_digest(
        "adapter", [LocalFile(f.path, Path(), f.digest, f.size) for f in resolution.files]
    ).split(":", 1)[1]
    dest = root / "adapters" / key[:32]
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=dest.parent))
    try:
        client.download(resolution.files, tmp)
        (tmp / ".complete").write_text(f"{resolution.patch} for {resolution.base}\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished first; its copy is the same bytes.
            if not (dest / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
