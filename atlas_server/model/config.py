"""Model configuration: one frozen dataclass that chooses every architectural option.

What it does: names the shape of a decoder-only transformer (sizes, positional
encoding, norm, MLP kind, attention path) and loads the named presets that live in
`configs/models/*.toml`. What it does not do: build modules (see `transformer.py`)
or know anything about tokenizers, checkpoints or training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import tomlconfig  # a leaf that imports nothing of Atlas (docs/architecture.md)

PositionalEncoding = Literal["learned", "sinusoidal", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "gelu_exact", "swiglu"]
AttentionImpl = Literal["sdpa", "reference"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "pos_encoding": ("learned", "sinusoidal", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "gelu_exact", "swiglu"),
    "attention": ("sdpa", "reference"),
}


class ConfigError(ValueError):
    """A model config that cannot describe a valid model."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    d_ff: int | None = None  # None means 4 * d_model (gelu) or ~8/3 * d_model (swiglu)
    max_seq_len: int = 1024
    pos_encoding: PositionalEncoding = "learned"
    rope_theta: float = 10000.0
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    # "gelu" is GELU's tanh form (GPT-2's "gelu_new"), "gelu_exact" the erf form (Pythia's).
    mlp: MLPKind = "gelu"
    bias: bool = True  # biases of every projection and LayerNorm
    qkv_bias: bool | None = None  # the q|k|v projection's own bias (Qwen2); None: as `bias`
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head (GPT-NeoX); None: all
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention: AttentionImpl = "sdpa"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Types first: a config.json edited by hand ("tie_embeddings": "no" is truthy) must
        # not build a different model than it says.
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), _KINDS.get(field.name)
            if kind is None or (value is None and "None" in str(field.type)):
                continue
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if not ok:
                names = " or ".join(
                    k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))
                )
                raise ConfigError(f"{field.name} must be {names}, got {value!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}"
            )
        if self.pos_encoding == "rope" and self.rope_dims % 2:
            raise ConfigError(f"RoPE needs an even number of rotated dims, got {self.rope_dims}")
        if self.rotary_dim is not None:
            if self.pos_encoding != "rope":
                raise ConfigError("rotary_dim applies to pos_encoding='rope' only")
            if not 0 < self.rotary_dim <= self.head_dim:
                raise ConfigError(
                    f"rotary_dim={self.rotary_dim} must be in 1..head_dim ({self.head_dim})"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_dims(self) -> int:
        """How many dims of each head RoPE rotates (the first ones)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def has_qkv_bias(self) -> bool:
        return self.qkv_bias if self.qkv_bias is not None else self.bias

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            # Llama's rule: 2/3 of 4*d, rounded up to a multiple of 64 for matmul-friendly shapes.
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config keys {unknown}; known keys are {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# The JSON type each non-choice field must have (an int is a valid float).
_KINDS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
         "rotary_dim"),
        int,
    ),
    **dict.fromkeys(("rope_theta", "norm_eps", "dropout", "init_std"), (int, float)),
    **dict.fromkeys(("bias", "qkv_bias", "parallel_residual", "tie_embeddings"), bool),
}  # fmt: skip


def configs_dir() -> Path:
    """The `configs/` folder: inside the installed package, or at the repository root."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("cannot find the Atlas configs/ folder next to the package")


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.toml"))


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """Load `configs/models/NAME.toml`; keyword overrides (e.g. vocab_size) win."""
    path = configs_dir() / "models" / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no model preset {name!r}; available: {', '.join(preset_names())}")
    origin, data = tomlconfig.file_layer(path, ConfigError)
    data.pop("description", None)
    layers = [(origin, data), ("overrides", overrides)]
    return tomlconfig.decode(ModelConfig, layers, ConfigError, what="model config key")
