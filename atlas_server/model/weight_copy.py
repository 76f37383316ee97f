"""A weight copied into a kernel's own layout for inference, which knows when it is stale.

What it does: `WeightCopy` is the part the inference copies of a weight share (the
oneDNN-packed `onednn.PackedWeight`, the column panels of `native.PanelWeight`). It
remembers its source tensor's version counter and storage; `usable_for(x)` turns False
once the source is changed in place (an optimizer step, `load_state_dict`) or moved
(`.to()`, `.float()`), so callers fall back to the live weight rather than use old
numbers. A deep copy lays out the copied source afresh (a copied tensor starts a new
version counter). Subclasses lay the weight out and compute `x @ weight (+ bias)`.

What it does not do: refresh itself (`Transformer.prepare_for_inference()` makes new
copies), autograd, or any device but the CPU.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["WeightCopy", "version_of"]


def version_of(t: Tensor) -> int | None:
    """`t`'s version counter (bumped by every in-place change), or None for an inference
    tensor (made under `torch.inference_mode()`, e.g. a model copied or loaded there),
    which has none: outside that mode it cannot be changed in place at all, so its address
    is what identifies its numbers."""
    return None if t.is_inference() else t._version


class WeightCopy(ABC):
    """A copy of `source`, stored [in, out] (Atlas's `Linear`) or, with `out_in=True`,
    [out, in] (a tied embedding read as the output head); call it like `x @ weight`."""

    def __init__(self, source: Tensor, out_in: bool, dtype: torch.dtype) -> None:
        self.source, self.out_in, self.dtype = source, out_in, dtype
        # Identity of the numbers copied: an in-place change bumps the version counter, and
        # `.to()`/`.float()` swap in new storage.
        self.version, self.data_ptr = version_of(source), source.data_ptr()

    def __deepcopy__(self, memo: dict) -> WeightCopy:
        return type(self)(copy.deepcopy(self.source, memo), self.out_in)

    def fresh(self) -> bool:
        """The source still holds the numbers copied (no in-place change, same storage; a
        copy unpickled with its model has a new source and is not)."""
        return version_of(self.source) == self.version and self.source.data_ptr() == self.data_ptr

    def usable_for(self, x: Tensor) -> bool:
        """Fresh, and `x` is a CPU tensor of the copy's dtype with no gradient being recorded."""
        return (
            self.fresh()
            and x.device.type == "cpu"
            and x.dtype == self.dtype
            and not torch.is_grad_enabled()
        )

    @abstractmethod
    def __call__(self, x: Tensor, bias: Tensor | None = None, gelu_tanh: bool = False) -> Tensor:
        """x [..., in] -> [..., out]; `gelu_tanh` applies GELU (tanh form) to the result."""
