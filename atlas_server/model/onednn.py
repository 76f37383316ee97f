"""Prepacked oneDNN matrix multiplies for CPU inference.

What it does: `PackedWeight.pack(w)` reorders a [in, out] weight once into oneDNN's
blocked layout, and `PackedWeight(x)` computes `x @ w` with it. On the x86 CPUs Atlas is
measured on, PyTorch's default fp32 matmul (MKL) runs at about 220 GFLOP/s on 2 cores
and 80-140 GFLOP/s for the 1-32-row products of decode, while the prepacked oneDNN
kernel reaches 300-510 GFLOP/s and reads a batch-1 weight stream about 1.6x faster
(`python bench/ceilings.py` prints both). This is the same kernel that
`torch.compile`'s CPU freezing pass swaps in for `nn.Linear`; calling it directly keeps
the eager engine readable and free of compile time.

What it does not do: autograd (the packed path is for inference only, so callers take it
only when no gradient is being recorded), other devices than the CPU, or keeping the
packed copy in sync with its source. A `PackedWeight` remembers the source tensor's
version counter and storage and reports itself stale once the source is modified in
place (an optimizer step, `load_state_dict`) or moved (`.to()`), so a caller falls back to the live weight rather
than using old numbers.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import Tensor

__all__ = ["PackedWeight", "packing_supported"]

_DTYPES = (torch.float32, torch.bfloat16)


def packing_supported(weight: Tensor) -> bool:
    """True when oneDNN can pack `weight` here (CPU, fp32/bf16, PyTorch built with it).

    `ATLAS_ONEDNN=0` turns packing off, to compare against PyTorch's default kernels.
    """
    return (
        os.environ.get("ATLAS_ONEDNN", "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedWeight:
    """A weight reordered for oneDNN; call it like `x @ weight (+ bias)`.

    `source` is the live weight, stored [in, out] (Atlas's `Linear`) or, with
    `out_in=True`, [out, in] (a tied embedding read as the output head).
    """

    def __init__(self, source: Tensor, out_in: bool = False) -> None:
        w = source.detach()
        w = w.contiguous() if out_in else w.t().contiguous()  # oneDNN wants [out, in]
        # A copy in oneDNN's blocked layout; batch size unknown at pack time (None).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.source, self.out_in = source, out_in
        # Identity of the numbers packed: an in-place change bumps the version counter, and
        # `.to()`/`.float()` swap in new storage.
        self.version, self.data_ptr = source._version, source.data_ptr()

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        # oneDNN's opaque tensors have no storage to copy: repack the copied source instead.
        return PackedWeight(copy.deepcopy(self.source, memo), self.out_in)

    def usable_for(self, x: Tensor) -> bool:
        """Fresh, and `x` is a CPU tensor of the packed dtype with no gradient being recorded."""
        return (
            self.source._version == self.version
            and self.source.data_ptr() == self.data_ptr
            and x.device.type == "cpu"
            and x.dtype == self.packed.dtype
            and not torch.is_grad_enabled()
        )

    def __call__(self, x: Tensor, bias: Tensor | None = None, gelu_tanh: bool = False) -> Tensor:
        """x [..., in] -> [..., out]; `gelu_tanh` applies GELU (tanh form) in the same pass."""
        if gelu_tanh:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
