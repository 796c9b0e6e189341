"""A vLLM ``LoRAResolver`` that serves each patch as ported for the base vLLM has loaded.

Installed with the package, it is registered through the ``vllm.general_plugins`` entry
point (``patchport_lora_resolver``) under the resolver name ``patchport``. A request for
the adapter ``namespace/name:version`` then:

1. identifies the served base by the registry digest of the model directory vLLM serves
   (``$PATCHPORT_VLLM_MODEL_DIR``, else vLLM's model when it is a local directory; the
   digest is computed once per directory), or by ``$PATCHPORT_VLLM_BASE`` (a base
   reference ``namespace/name:version`` or a ``sha256:`` digest);
2. asks the registry's ``Resolve`` for that patch on that base: the patch itself on its
   own base, its port on a descendant;
3. downloads the adapter once (verified) into ``$PATCHPORT_CACHE`` (default
   ``~/.cache/patchport``) and hands vLLM a ``LoRARequest`` for that directory.

No port for the served base is a refusal (:class:`patchport.NotFound`,
:class:`patchport.Refused` with its kinds, or :class:`patchport.FailedPrecondition` for a
port not done), raised to vLLM with the registry's message: the request fails, it is never
answered from the bare base. Names that are not patchport references return None, so
vLLM's other resolvers may answer them.

Enable it in vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``,
``VLLM_PLUGINS=patchport_lora_resolver`` (or unset to load all plugins) and
``--enable-lora``; ``PATCHPORT_REGISTRY`` / ``PATCHPORT_TOKEN`` / ``PATCHPORT_CA_CERT`` as
for every client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ._cache import fetch
from ._client import Client
from ._files import base_digest
from .errors import LayoutError, PatchportError

__all__ = ["PatchportResolver", "register", "RESOLVER_NAME", "is_patch_reference"]

log = logging.getLogger("patchport.vllm")

#: The name the resolver is registered under in vLLM's ``LoRAResolverRegistry``.
RESOLVER_NAME = "patchport"

_REFERENCE = re.compile(
    r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*"
    r"(:[A-Za-z0-9][A-Za-z0-9._+-]*|@sha256:[0-9a-f]{64})$"
)

try:  # vLLM's own base class when vLLM is installed.
    from vllm.lora.resolver import LoRAResolver as _Base
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    _Base = object  # type: ignore[misc,assignment]


def is_patch_reference(name: str) -> bool:
    """Whether ``name`` is a patch version reference (``namespace/name:version`` or
    ``namespace/name@sha256:...``) this resolver answers for."""
    return bool(_REFERENCE.match(name))


class PatchportResolver(_Base):  # type: ignore[misc,valid-type]
    """Resolves ``namespace/name:version`` to the adapter ported for the served base.

    Args:
        client: The registry client (default: ``patchport.Client()`` from the
            environment, made on first use).
        model_dir: The served model's directory (default ``$PATCHPORT_VLLM_MODEL_DIR``,
            else the ``base_model_name`` vLLM passes, when it is a directory).
        base: A base reference or digest that overrides the directory
            (``$PATCHPORT_VLLM_BASE``).
        cache_dir: Where adapters are downloaded (``$PATCHPORT_CACHE``).
        require_pass: Only ports that passed the quality gate
            (``$PATCHPORT_VLLM_REQUIRE_PASS=1``).
    """

    def __init__(
        self,
        client: Optional[Client] = None,
        model_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        base: Optional[str] = None,
        cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        require_pass: bool = False,
    ) -> None:
        self._client = client
        self.model_dir = Path(model_dir) if model_dir else None
        self.base = base
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.require_pass = require_pass
        self._digests: Dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "PatchportResolver":
        """A resolver configured by ``PATCHPORT_VLLM_MODEL_DIR``, ``PATCHPORT_VLLM_BASE``,
        ``PATCHPORT_CACHE`` and ``PATCHPORT_VLLM_REQUIRE_PASS``."""
        return cls(
            model_dir=os.environ.get("PATCHPORT_VLLM_MODEL_DIR") or None,
            base=os.environ.get("PATCHPORT_VLLM_BASE") or None,
            cache_dir=os.environ.get("PATCHPORT_CACHE") or None,
            require_pass=os.environ.get("PATCHPORT_VLLM_REQUIRE_PASS", "") in ("1", "true", "yes"),
        )

    @property
    def client(self) -> Client:
        """The registry client (made from the environment on first use)."""
        with self._lock:
            if self._client is None:
                self._client = Client()
            return self._client

    def served_base_digest(self, base_model_name: str) -> str:
        """The registry digest of the base vLLM serves (computed once per directory)."""
        if self.base:
            if self.base.startswith("sha256:"):
                return self.base
            key = "ref:" + self.base
            if key not in self._digests:
                self._digests[key] = self.client.get_base(self.base).digest
            return self._digests[key]
        directory = self.model_dir or Path(base_model_name)
        if not directory.is_dir():
            raise LayoutError(
                f"patchport cannot tell which base vLLM serves: {str(directory)!r} is not a local "
                "model directory; set PATCHPORT_VLLM_MODEL_DIR to the served directory or "
                "PATCHPORT_VLLM_BASE to its registry reference"
            )
        key = "dir:" + str(directory.resolve())
        with self._lock:
            if key not in self._digests:
                self._digests[key] = base_digest(directory)
            return self._digests[key]

    def resolve_path(self, base_model_name: str, lora_name: str) -> Optional[Path]:
        """The local directory of ``lora_name`` for the served base, downloaded once;
        None when ``lora_name`` is not a patchport reference.

        Raises:
            patchport.NotFound / Refused / FailedPrecondition: no usable port for the
                served base (never the bare base instead).
        """
        if not is_patch_reference(lora_name):
            return None
        digest = self.served_base_digest(base_model_name)
        try:
            resolution = self.client.resolve(lora_name, digest, require_pass=self.require_pass)
        except PatchportError as e:
            log.warning("patchport refuses LoRA %s for the served base %s: %s", lora_name, digest, e)
            raise
        path = fetch(self.client, resolution, self.cache_dir)
        log.info("patchport: LoRA %s for %s (%s) at %s", lora_name, resolution.base, resolution.kind, path)
        return path

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's resolver hook: a ``LoRARequest`` for the adapter made for the served
        base, None for names that are not patchport references."""
        from vllm.lora.request import LoRARequest

        path = await asyncio.to_thread(self.resolve_path, base_model_name, lora_name)
        if path is None:
            return None
        lora_id = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:4], "big") & 0x7FFFFFFF
        return LoRARequest(lora_name=lora_name, lora_int_id=max(lora_id, 1), lora_path=str(path))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers :class:`PatchportResolver`
    (configured from the environment) as vLLM's ``patchport`` LoRA resolver."""
    try:
        from vllm.lora.resolver import LoRAResolverRegistry
    except ImportError:
        log.warning("patchport's vLLM plugin: vllm.lora.resolver is not importable; nothing registered")
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, PatchportResolver.from_env())
