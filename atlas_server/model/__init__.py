"""The Atlas transformer: config, model, attention paths and KV cache (torch only)."""

from .config import ConfigError, ModelConfig, load_preset, preset_names
from .kv_cache import KVCache
from .transformer import Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer", "load_preset", "preset_names"]
