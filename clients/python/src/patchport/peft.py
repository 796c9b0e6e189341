"""Load a patch from the registry onto the model you have loaded, with PEFT.

::

    from transformers import AutoModelForCausalLM
    import patchport.peft

    model = AutoModelForCausalLM.from_pretrained("/models/llama-v2")
    model = patchport.peft.from_registry(model, "acme/qv:1")

The base is identified by the digest of the model's local directory
(``model.name_or_path``), computed with :func:`patchport.base_digest`, so the adapter is
the one made for exactly those weights: the patch itself on its own base, the port
otherwise. Pass ``base=`` (a base reference or digest) for a model loaded from elsewhere.
Needs the ``peft`` extra (``pip install 'patchport[peft]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ._cache import fetch
from ._client import Client
from ._files import base_digest
from .errors import LayoutError

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = ["from_registry", "model_base_digest"]


def model_base_digest(model: Any, client: Optional[Client] = None, base: Optional[str] = None) -> str:
    """The registry digest of the base ``model`` was loaded from.

    Args:
        model: A transformers model (its ``name_or_path`` must be a local directory
            unless ``base`` is given).
        client: Used to look ``base`` up when it is a reference.
        base: A base reference (``namespace/name:version``) or digest (``sha256:...``)
            that overrides the model's own path.
    """
    if base is not None:
        if base.startswith("sha256:"):
            return base
        return (client or Client()).get_base(base).digest
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not Path(path).is_dir():
        raise LayoutError(
            f"the model's name_or_path {path!r} is not a local directory, so its base digest "
            "cannot be computed: pass base='namespace/name:version' (or its sha256 digest)"
        )
    return base_digest(path)


def from_registry(
    model: Any,
    patch: str,
    client: Optional[Client] = None,
    *,
    base: Optional[str] = None,
    require_pass: bool = False,
    cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    **kwargs: Any,
) -> "PeftModel":
    """The patch ``patch`` for the loaded ``model``'s base, as a ``PeftModel``.

    Resolves the adapter for the model's base digest (:func:`model_base_digest`), pulls
    it into the local cache (verified, once), and applies it with
    ``PeftModel.from_pretrained(model, dir, **kwargs)``.

    Args:
        model: The loaded base model (transformers).
        patch: ``namespace/name:version`` of the patch.
        client: The registry client (default: ``patchport.Client()``).
        base: A base reference or digest to resolve for instead of the model's path.
        require_pass: Only a port that passed the quality gate.
        cache_dir: Where adapters are kept (default ``$PATCHPORT_CACHE`` or
            ``~/.cache/patchport``).

    Raises:
        patchport.NotFound: no port of ``patch`` for this base.
        patchport.Refused: the port was refused (``.kinds``).
        patchport.FailedPrecondition: the port is not ready, or did not pass the gate.
    """
    from peft import PeftModel

    client = client or Client()
    digest = model_base_digest(model, client, base)
    resolution = client.resolve(patch, digest, require_pass=require_pass)
    path = fetch(client, resolution, cache_dir)
    return PeftModel.from_pretrained(model, str(path), **kwargs)
