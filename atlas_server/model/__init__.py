"""The Atlas transformer: config, model, attention paths and KV cache (torch only).

`Transformer` and `KVCache` are imported on first use: they import PyTorch (about 2 s on
a small machine) and the config half does not, so commands that only read presets or
tokenizers (`atlas --help`, `atlas tokenizer ...`) start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import ConfigError, ModelConfig, load_preset, preset_names

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .transformer import Transformer

_LAZY = {"KVCache": ".kv_cache", "Transformer": ".transformer"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer", "load_preset", "preset_names"]
