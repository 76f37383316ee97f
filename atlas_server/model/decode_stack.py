"""A decode step through every block of a model in one call of Atlas's C kernels.

What it does: `DecodeStack.build(model, cache)` gathers, once, what the C function
`decode_stack` (cpu_kernels.c) reads: each block's norm weights, the column panels of its
four products (the `PanelWeight` copies `prepare_for_inference()` made, or the 8-bit
`Int8PanelWeight` ones with their scales), its biases and
its layer of the KV cache, and the shapes the blocks share. Calling the stack takes a
decode step's embedded tokens x [B, C], one token per row, through all the blocks in
place, storing each row's key and value in its cache slot on the way.

Why: block by block, a llama-124m step at one token spent 2.7-3.4 ms, 11-18% of it,
outside its products (`python bench/step_overhead.py`): per block about fifteen module
calls, small PyTorch operations and ctypes calls of a few microseconds each, and every C
call a new wake-up of OpenMP's threads. Here the step is one call and one parallel
region, with a barrier only where a step needs the whole result of the one before: a
one-row step then takes the time of its products called alone (1.18-1.29x faster than
block by block on the AVX2 host). The numbers are those of the block-by-block path to
float rounding: the same kernels in the same order (tests/test_decode_stack.py).

`current()` says whether the weights, their inference copies and the cache are still the
ones it was built from; `Transformer` rebuilds the stack when they are not (an in-place
change, `.to()`, a new `prepare_for_inference()`).

What it does not do: prompts (more than one token per row), arithmetic in any dtype but
fp32 (8-bit weights are widened as they are read), any device
but the CPU, autograd, or blocks that are not plain Atlas blocks (a LoRA-wrapped
projection, the reference attention, a weight without its panel copy): `build` returns
None and the model takes its block-by-block path. `ATLAS_DECODE_STACK=0` turns it off,
to compare the two.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor, nn

from . import native
from .kv_cache import KVCache
from .weight_copy import version_of

__all__ = ["DecodeStack"]

_LAYER_FIELDS = (
    "norm1_w",
    "norm1_b",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "norm2_w",
    "norm2_b",
    "w_in",
    "in_bias",
    "w_out",
    "out_bias",
    "k_cache",
    "v_cache",
    "qkv_scales",  # NULL for fp32 panels; an Int8PanelWeight's block scales
    "o_scales",
    "in_scales",
    "out_scales",
)
_MLP_CODES = {"swiglu": 0, "gelu": 1, "gelu_exact": 2}  # cpu_kernels.c's MLP_* values


class _BlockWeights(ctypes.Structure):
    """cpu_kernels.c's `struct block_weights`: one block's tensors, by address."""

    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_FIELDS]


class _StackShape(ctypes.Structure):
    """cpu_kernels.c's `struct stack_shape`."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            *("rows", "C", "H", "K", "D", "F", "R", "n_slots", "max_len"),
            *("slot_stride", "head_stride", "pos_stride", "table_len"),
            *("layer_norm", "mlp", "parallel_residual"),
        )
    ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def enabled() -> bool:
    """Whether the one-call decode step may be used (`ATLAS_DECODE_STACK=0` turns it off)."""
    return os.environ.get("ATLAS_DECODE_STACK", "1") != "0"


class DecodeStack:
    """A prepared model's blocks, and one KV cache, as `decode_stack` reads them."""

    def __init__(
        self,
        blocks: list[_BlockWeights],
        shape: _StackShape,
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache,
        copies: list[object],
        watched: list[Tensor],
        cached: list[Tensor],
    ) -> None:
        self._blocks = (_BlockWeights * len(blocks))(*blocks)
        self._shape, self._rope, self.cache = shape, rope, cache
        # Watched for changes (weights, biases, norms, RoPE tables), and the cache's layers,
        # whose contents change every step but whose storage must stay: references to both
        # keep the memory the C function reads alive.
        self._copies, self._watched, self._cached = copies, watched, cached
        self._state = self._current_state()
        one_row = _StackShape.from_buffer_copy(shape)
        one_row.rows = 1
        self._scratch_per_row = native._library().decode_stack_scratch(ctypes.byref(one_row))

    @classmethod
    def build(cls, model: nn.Module, cache: KVCache) -> DecodeStack | None:
        """The stack for `model` (a prepared `Transformer`) and `cache`, or None where any
        part is not what the C function covers (see the module docstring)."""
        from .transformer import Block, Linear, RMSNorm  # transformer.py imports this module

        config = model.config
        if not (enabled() and native.available()) or model.training:
            return None
        if config.attention != "sdpa" or config.head_dim > native._MAX_HEAD_DIM:
            return None
        H, K, D = config.n_heads, config.kv_heads, config.head_dim
        k0 = cache.k[0]
        if H % K or k0.shape[1:] != (K, cache.max_len, D) or k0.stride(3) != 1:
            return None
        norm_type = RMSNorm if config.norm == "rmsnorm" else nn.LayerNorm
        blocks, copies, watched, cached = [], [], [], []

        def norm(module: nn.Module) -> tuple[int | None, int | None] | None:
            if type(module) is not norm_type or module.weight is None:
                return None
            if module.eps != config.norm_eps:  # the C function takes one eps for all
                return None
            bias = getattr(module, "bias", None)  # RMSNorm has none; LayerNorm may not
            tensors = [module.weight] + ([bias] if bias is not None else [])
            if not _plain(tensors):
                return None
            watched.extend(tensors)
            return module.weight.data_ptr(), None if bias is None else bias.data_ptr()

        def product(module: nn.Module) -> tuple[int, int | None, int | None] | None:
            """(panels, bias, scales) addresses; scales only for 8-bit panels."""
            copy = getattr(module, "packed", None)
            # PanelWeight, or its 8-bit subclass Int8PanelWeight (with scales)
            if type(module) is not Linear or not isinstance(copy, native.PanelWeight):
                return None
            if copy.out_in or not copy.fresh():
                return None  # stale: the weight changed since prepare_for_inference()
            if module.bias is not None and not _plain([module.bias]):
                return None
            copies.append(copy)
            watched.extend([copy.source] + ([module.bias] if module.bias is not None else []))
            scales = copy.scales
            return (
                copy.panels.data_ptr(),
                None if module.bias is None else module.bias.data_ptr(),
                None if scales is None else scales.data_ptr(),
            )

        for index, block in enumerate(model.blocks):
            if type(block) is not Block or block.attn.impl != "sdpa":
                return None
            parts = (
                norm(block.attn_norm),
                product(block.attn.wqkv),
                product(block.attn.wo),
                norm(block.mlp_norm),
                product(block.mlp.w_in),
                product(block.mlp.w_out),
            )
            k, v = cache.k[index], cache.v[index]
            if None in parts or not _plain([k, v]) or k.shape != k0.shape:
                return None
            if k.stride() != k0.stride() or v.stride() != k0.stride():
                return None
            cached.extend([k, v])
            norm1, qkv, o, norm2, w_in, w_out = parts
            products = (qkv, o, w_in, w_out)
            if len({p[2] is None for p in products}) > 1:
                return None  # one block in two precisions: prepare_for_inference never does
            addresses = [
                *norm1, *qkv[:2], *o[:2], *norm2, *w_in[:2], *w_out[:2],
                k.data_ptr(), v.data_ptr(), *(p[2] for p in products),
            ]  # fmt: skip
            blocks.append(_BlockWeights(*addresses))
        rope = None
        if config.pos_encoding == "rope":
            rope = (model.rope_cos, model.rope_sin)
            if not _plain(list(rope)) or rope[0].shape != rope[1].shape:
                return None
            watched.extend(rope)
        shape = _StackShape(
            rows=0,
            C=config.d_model,
            H=H,
            K=K,
            D=D,
            F=config.ff_dim,
            R=config.rope_dims if rope is not None else 0,
            n_slots=cache.n_slots,
            max_len=cache.max_len,
            slot_stride=k0.stride(0),
            head_stride=k0.stride(1),
            pos_stride=k0.stride(2),
            table_len=rope[0].shape[0] if rope is not None else 0,
            layer_norm=int(config.norm == "layernorm"),
            mlp=_MLP_CODES[config.mlp],
            parallel_residual=int(config.parallel_residual),
            eps=config.norm_eps,
            scale=D**-0.5,
        )
        return cls(blocks, shape, rope, cache, copies, watched, cached)

    def _current_state(self) -> tuple[int, ...]:
        # Version counters catch in-place changes; addresses catch `.to()` and new storage.
        return tuple(version_of(t) for t in self._watched) + tuple(
            t.data_ptr() for t in self._watched
        )

    def current(self, model: nn.Module, cache: KVCache) -> bool:
        """Built from this cache, from the inference copies the model holds now, and no
        tensor it reads has changed since."""
        copies = [
            getattr(m, "packed", None)  # a LoRA wrapper has none
            for block in model.blocks
            for m in (block.attn.wqkv, block.attn.wo, block.mlp.w_in, block.mlp.w_out)
        ]
        return (
            cache is self.cache
            and len(copies) == len(self._copies)
            and all(a is b for a, b in zip(copies, self._copies, strict=True))
            and self._current_state() == self._state
        )

    def __call__(self, x: Tensor, positions: Tensor, slots: Tensor) -> None:
        """x [B, C] (fp32, contiguous) through every block, in place; row b is the token
        at positions[b] of the sequence in cache slot slots[b] (both [B] int64)."""
        B = x.shape[0]
        if not (x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()):
            raise ValueError("decode_stack needs x as a contiguous float32 CPU tensor")
        if x.shape != (B, self._shape.C) or positions.shape != (B,) or slots.shape != (B,):
            raise ValueError(
                f"unsupported shapes: x {tuple(x.shape)}, positions {tuple(positions.shape)}, "
                f"slots {tuple(slots.shape)} (d_model {self._shape.C})"
            )
        positions = positions.to(torch.int64).contiguous()
        slots = slots.to(torch.int64).contiguous()
        shape = _StackShape.from_buffer_copy(self._shape)  # a call's own: C reads it unlocked
        shape.rows = B
        scratch = torch.empty(B * self._scratch_per_row)
        cos, sin = self._rope if self._rope is not None else (None, None)
        with native._named("atlas::decode_stack"):
            bad = native._library().decode_stack(
                ctypes.byref(self._blocks),
                len(self._blocks),
                ctypes.byref(shape),
                x.data_ptr(),
                scratch.data_ptr(),
                slots.data_ptr(),
                positions.data_ptr(),
                None if cos is None else cos.data_ptr(),
                None if sin is None else sin.data_ptr(),
                torch.get_num_threads(),
            )
        if bad >= 0:
            raise IndexError(
                f"row {bad}: slot {int(slots[bad])} or position {int(positions[bad])} outside "
                f"the KV cache ({self._shape.n_slots} slots of {self._shape.max_len} positions)"
            )

    # The stack holds raw addresses: a copied or pickled model builds its own instead.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return type(None), ()


def _plain(tensors: list[Tensor]) -> bool:
    """fp32, on the CPU, contiguous: what the C function reads by address."""
    return all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
