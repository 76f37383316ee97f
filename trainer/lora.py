"""LoRA: low-rank adapters on chosen projections, trained alone, saved small, merged back.

What it does: `apply_lora(model, LoRAConfig(...))` wraps every projection (`Linear`) whose
module name matches a target in a `LoRALinear`: y = base(x) + dropout(x) @ A @ B * alpha/r,
with A [in, r] (Kaiming-uniform, as in the LoRA paper and peft) and B [r, out] zeros, in
the model's own [in, out] weight layout, so the adapted model starts equal to the base.
Every base parameter is frozen; only A and B train. Targets match a module's full name,
a dotted suffix ("attn.wqkv" matches "blocks.3.attn.wqkv") or an fnmatch glob
("blocks.[01].mlp.*"); the projections of a block are attn.wqkv (fused q, k, v), attn.wo,
mlp.w_in (SwiGLU: fused gate and up) and mlp.w_out; `lm_head` exists when embeddings are
untied. A target that matches nothing is an error listing what exists.

`save_adapter` writes a directory with adapter.safetensors (the A and B matrices, the
configuration and provenance in its metadata) and adapter.json (the same, plus the
safetensors file's sha256), whole or not at all (written beside it, then renamed);
`load_adapter` reads and checks both; `load_adapter_weights` puts them back into a wrapped
model (resuming). `merge_lora(base, adapter)` returns a plain
Transformer whose projections hold W + A @ B * alpha/r, refusing a base whose weights are
not the ones the adapter was trained on (sha256 of the weights, recorded at apply time).
`adapters_disabled(model)` runs the base model alone: the DPO reference without a copy.
What it does not do: adapters on embeddings, quantised bases (QLoRA), several adapters in
one model, or the `atlas checkpoint merge-lora` command (a thin wrapper over merge_lora).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from atlas_server.checkpoint import sha256_file
from atlas_server.io import atomic_directory
from atlas_server.model import Transformer
from atlas_server.model.transformer import Linear

from .artifacts import weights_sha256

FORMAT_NAME = "atlas-lora"
FORMAT_VERSION = 1
WEIGHTS_FILE, SIDECAR_FILE = "adapter.safetensors", "adapter.json"
DEFAULT_TARGETS = ("attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out")


class LoRAError(ValueError):
    """A LoRA configuration, adapter file or base model that cannot be used as asked."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise LoRAError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LoRAError("give at least one target module pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen `Linear` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        n_in, n_out = base.weight.shape  # [in, out]
        self.base = base
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n_in, rank, **kwargs))  # [in, r]
        self.lora_B = nn.Parameter(torch.zeros(rank, n_out, **kwargs))  # [r, out]
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and peft initialise A: U(±1/sqrt(in)).
        bound = 1.0 / math.sqrt(n_in)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: Tensor, gelu_tanh: bool = False) -> Tensor:
        y = self.base(x)  # [..., out]; the activation comes after the update
        if self.enabled:
            y = y + (self.dropout(x) @ self.lora_A @ self.lora_B) * self.scale  # [..., out]
        return F.gelu(y, approximate="tanh") if gelu_tanh else y


def matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


@dataclass
class LoRAReport:
    config: LoRAConfig
    modules: list[str]  # the adapted projections' names
    trainable: int
    total: int
    base_sha256: str  # weights_sha256 of the base model before adapters were added

    def __str__(self) -> str:
        return (
            f"LoRA rank {self.config.rank}, alpha {self.config.alpha:g} on"
            f" {len(self.modules)} projections: {self.trainable:,} trainable parameters"
            f" of {self.total:,} ({100 * self.trainable / max(1, self.total):.2f}%)"
        )


def apply_lora(model: Transformer, config: LoRAConfig) -> LoRAReport:
    """Wrap the matching projections of `model` in place and freeze everything else."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("the model already has LoRA adapters")
    base_sha256 = weights_sha256(model.state_dict())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for pattern in config.targets:
        if not any(matches(name, pattern) for name in linears):
            kinds = sorted({name.split(".", 2)[-1] for name in linears})
            raise LoRAError(f"LoRA target {pattern!r} matches no projection; projections: {kinds}")
    chosen = [name for name in linears if any(matches(name, p) for p in config.targets)]
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linears[name], config.rank, config.alpha, config.dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return LoRAReport(config, chosen, trainable, total, base_sha256)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. for DPO reference log-probs)."""
    wrapped = list(lora_modules(model).values())
    previous = [m.enabled for m in wrapped]
    for m in wrapped:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(wrapped, previous, strict=True):
            m.enabled = was


def remove_lora(model: Transformer) -> Transformer:
    """Put the base projections back in place of the wrappers (the adapters are dropped)."""
    for name, module in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


# --- the adapter on disk ---------------------------------------------------------------------
@dataclass
class Adapter:
    config: LoRAConfig
    tensors: dict[str, Tensor]  # "<module>.lora_A" [in, r] and "<module>.lora_B" [r, out]
    base_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors})


def adapter_of(model: Transformer, report: LoRAReport, provenance: dict | None = None) -> Adapter:
    """The adapter matrices of a LoRA-wrapped model, detached, on the CPU."""
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().cpu().contiguous()
    if not tensors:
        raise LoRAError("the model has no LoRA adapters")
    return Adapter(report.config, tensors, report.base_sha256, dict(provenance or {}))


def save_adapter(directory: str | os.PathLike, adapter: Adapter) -> Path:
    """Write adapter.safetensors and adapter.json into `directory`, replacing it whole."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        description = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": {**asdict(adapter.config), "targets": list(adapter.config.targets)},
            "modules": adapter.modules,
            "base_sha256": adapter.base_sha256,
            "provenance": adapter.provenance,
        }
        metadata = {k: json.dumps(v) for k, v in description.items()}
        save_file(adapter.tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        description["adapter_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / SIDECAR_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return directory


def load_adapter(directory: str | os.PathLike) -> Adapter:
    """Read an adapter directory, checking the sidecar, the file hash and the shapes."""
    directory = Path(directory)
    sidecar, weights = directory / SIDECAR_FILE, directory / WEIGHTS_FILE
    for path in (sidecar, weights):
        if not path.is_file():
            raise LoRAError(f"{path} is missing; is {directory} an Atlas LoRA adapter?")
    try:
        description = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{sidecar} is not valid JSON: {e}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise LoRAError(f"{sidecar} is not an Atlas LoRA adapter description")
    if not isinstance(description.get("format_version"), int) or (
        description["format_version"] > FORMAT_VERSION
    ):
        raise LoRAError(
            f"{sidecar} has format version {description.get('format_version')};"
            f" this Atlas reads up to {FORMAT_VERSION}"
        )
    if sha256_file(weights) != description.get("adapter_sha256"):
        raise LoRAError(f"{weights} does not match the sha256 {sidecar} records; it was changed")
    try:
        raw = description["config"]
        config = LoRAConfig(
            int(raw["rank"]), float(raw["alpha"]), float(raw["dropout"]), tuple(raw["targets"])
        )
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (KeyError, TypeError, ValueError) as e:
        raise LoRAError(f"{directory}: unreadable adapter ({e})") from None
    adapter = Adapter(
        config, tensors, str(description.get("base_sha256")), description.get("provenance") or {}
    )
    if adapter.modules != sorted(description.get("modules") or []):
        raise LoRAError(f"{weights} holds other modules than {sidecar} lists")
    for module in adapter.modules:
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[1] != config.rank:
            raise LoRAError(f"{weights}: {module} needs lora_A [in, {config.rank}] and lora_B")
        if b.shape[0] != config.rank:
            raise LoRAError(f"{weights}: {module}.lora_B must be [{config.rank}, out]")
    return adapter


def load_adapter_weights(model: Transformer, adapter: Adapter) -> None:
    """Copy a saved adapter's matrices into a model wrapped with the same configuration
    (resuming LoRA training)."""
    wrapped = lora_modules(model)
    if sorted(wrapped) != adapter.modules:
        raise LoRAError(
            f"the adapter covers {len(adapter.modules)} projections, the model wraps"
            f" {len(wrapped)}; apply_lora with the adapter's own configuration first"
        )
    with torch.no_grad():
        for name, module in wrapped.items():
            for part in ("lora_A", "lora_B"):
                target, saved = getattr(module, part), adapter.tensors[f"{name}.{part}"]
                if target.shape != saved.shape:
                    raise LoRAError(
                        f"{name}.{part}: saved {list(saved.shape)}, model {list(target.shape)}"
                    )
                target.copy_(saved)


def merge_lora(base: Transformer, adapter: Adapter, check_base: bool = True) -> Transformer:
    """A copy of `base` with each adapted projection's weight set to W + A @ B * alpha/r."""
    if lora_modules(base):
        raise LoRAError("merge into the plain base model, not one that carries adapters")
    if check_base and weights_sha256(base.state_dict()) != adapter.base_sha256:
        raise LoRAError(
            "the adapter was trained on other base weights (tensor sha256 "
            f"{adapter.base_sha256[:12]}...);"
            " load the base checkpoint it names in its provenance (in the same dtype)"
        )
    merged = copy.deepcopy(base)
    for module in adapter.modules:
        try:
            linear = merged.get_submodule(module)
        except AttributeError:
            raise LoRAError(f"the base model has no projection {module!r}") from None
        a, b = adapter.tensors[f"{module}.lora_A"], adapter.tensors[f"{module}.lora_B"]
        if not isinstance(linear, Linear) or (a.shape[0], b.shape[1]) != tuple(linear.weight.shape):
            raise LoRAError(f"{module}: the adapter does not fit the base projection's shape")
        with torch.no_grad():
            delta = (a.double() @ b.double()) * adapter.config.scale  # [in, out]
            linear.weight.add_(delta.to(linear.weight.dtype).to(linear.weight.device))
        linear.packed = None  # any inference copy is of the old weight
    return merged
