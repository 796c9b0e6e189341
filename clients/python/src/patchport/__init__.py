"""patchport: the Python SDK of the patchport registry.

Push base models and LoRA adapters, watch ports happen, resolve the adapter for the base
a serving engine has loaded, and pull anything back with every byte verified::

    import patchport

    client = patchport.Client()                       # $PATCHPORT_REGISTRY, $PATCHPORT_TOKEN
    client.push_base("./v1", "acme/llama", "v1")
    client.push_patch("./adapter", "acme/qv", "1", base="acme/llama:v1")
    client.push_base("./v2", "acme/llama", "v2", parent="v1")   # queues the ports
    res = client.resolve("acme/qv:1", patchport.base_digest("./v2"))
    client.download(res.files, "./qv-for-v2")

See ``clients/python/README.md``; :mod:`patchport.peft` loads a port with PEFT and
:mod:`patchport.vllm` is a vLLM LoRA resolver.
"""

from ._client import DEFAULT_REGISTRY, Client, Event, PushStats, Resolution, compat_kind, port_state
from ._files import base_digest, manifest_digest, patch_digest, scan_dir
from . import errors
from .errors import *  # noqa: F403 - the error classes, listed once in errors.__all__

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Event",
    "Resolution",
    "PushStats",
    "DEFAULT_REGISTRY",
    "base_digest",
    "patch_digest",
    "manifest_digest",
    "scan_dir",
    "port_state",
    "compat_kind",
    *(name for name in errors.__all__ if name != "from_rpc_error"),
]
