"""oneDNN matrix multiplies for the CPU: packed weights for inference, an autograd op for training.

Why: on the x86 CPUs Atlas is measured on, PyTorch's default fp32 matmul (MKL) runs at
about 220 GFLOP/s on 2 cores and 80-140 GFLOP/s for the 1-32-row products of decode,
while oneDNN's kernels reach 300-510 GFLOP/s and read a batch-1 weight stream about 1.6x
faster (`python bench/ceilings.py` prints both; MKL takes its AVX2 path on AMD CPUs).

What it does:
- `PackedWeight(w)` reorders a weight once into oneDNN's blocked layout and computes
  `x @ w (+ bias)` with it: the serving path for bf16, and for fp32 where Atlas's own C
  kernels are not built (native.py; where they are, its column panels run fp32 decode
  faster). This is the kernel `torch.compile`'s CPU freezing pass swaps in for
  `nn.Linear`; calling it directly keeps the eager engine readable and free of compile
  time. Like every `WeightCopy`, it steps aside once its source changes.
- `train_matmul(x, w, bias)` is `x @ w (+ bias)` with a backward pass, each of the three
  products (forward, input gradient, weight gradient) one oneDNN call on the plain,
  possibly transposed operands (weights change every step, so packing them would not pay).
  Used by the model in training on the CPU in fp32.

What it does not do: other devices than the CPU, autocast (under autocast, and under
`torch.compile` or with distributed tensors, callers keep PyTorch's own matmul), or
anything but fp32/bf16. `ATLAS_ONEDNN=0` turns both paths off, to compare.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .weight_copy import WeightCopy

__all__ = ["PackedWeight", "packing_supported", "train_matmul"]

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
        # bf16 only where the CPU has native bf16 support (AVX-512 BF16 / AMX).
        and (weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedWeight(WeightCopy):
    """A weight reordered for oneDNN; call it like `x @ weight (+ bias)` (see WeightCopy)."""

    kernel = "oneDNN"  # what /health and the start-up log call this path

    def __init__(self, source: Tensor, out_in: bool = False) -> None:
        w = source.detach()
        w = w.contiguous() if out_in else w.t().contiguous()  # oneDNN wants [out, in]
        # A copy in oneDNN's blocked layout; batch size unknown at pack time (None).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        super().__init__(source, out_in, self.packed.dtype)

    def __call__(self, x: Tensor, bias: Tensor | None = None, gelu_tanh: bool = False) -> Tensor:
        """x [..., in] -> [..., out]; `gelu_tanh` applies GELU (tanh form) in the same pass."""
        if gelu_tanh:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def _linear(x2d: Tensor, weight_out_in: Tensor, bias: Tensor | None = None) -> Tensor:
    """x2d [M, in] @ weight_out_in.T -> [M, out]. oneDNN takes plain strided operands here
    (no reorder, no transposing copy): faster than reordering a weight used only once."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight_out_in, bias, "none", [], "")


class _TrainMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # x [..., in], weight [in, out] (possibly a transposed view, as the tied head is)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _linear(x.reshape(-1, x.shape[-1]), weight.t(), bias)  # [M, out]
        return y.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [M, out]
        x2d = x.reshape(-1, x.shape[-1])  # [M, in]
        grad_x = _linear(g, weight).view(x.shape)  # [M, out] @ [out, in]
        if weight.t().is_contiguous():
            # A transposed view of an [out, in] tensor (the tied head): compute dW^T = g^T x
            # in that tensor's own layout, so the gradient that reaches it is contiguous and
            # adds to the embedding's gradient without a strided pass over V x C numbers.
            grad_w = _linear(g.t(), x2d.t()).t()  # [out, in] -> view [in, out]
        else:
            # dW = x^T g: [in, M] @ [M, out], i.e. a linear with g^T [out, M] as its weight
            grad_w = _linear(x2d.t(), g.t())  # [in, out]
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def train_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """`x @ weight (+ bias)` through oneDNN with autograd, or None where it does not apply.

    It applies on the CPU, fp32, gradients recorded for x or weight, no autocast, not inside
    `torch.compile`, and plain (not distributed) tensors; callers use their own matmul
    on None.
    """
    if not (
        # First: under torch.compile, the checks below (mkldnn.is_available) break the graph.
        not torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and packing_supported(weight)
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    ):
        return None
    return _TrainMatmul.apply(x, weight, bias)
