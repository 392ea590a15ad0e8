"""Backend type name -> class, imported lazily so torch/llama.cpp load only when configured."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.base import Backend
    from gateway.settings import BackendConfig

_TYPES: dict[str, str] = {
    "fake": "backends.fake:FakeBackend",
    "llamacpp": "backends.llamacpp:LlamaCppBackend",
    "torch": "backends.torch_engine.backend:TorchBackend",
    "openai": "backends.openai_upstream:OpenAIUpstreamBackend",
}


def backend_class(type_name: str) -> type:
    try:
        target = _TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown backend type {type_name!r} (known: {', '.join(sorted(_TYPES))})") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_backend(name: str, config: BackendConfig) -> Backend:
    """Instantiate (cheaply; nothing loads until `start()`)."""
    cls = backend_class(type(config).__struct_config__.tag)  # type: ignore[union-attr]
    return cls(name, config)
