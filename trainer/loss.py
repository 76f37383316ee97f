"""What the training loop minimises: a module that maps one batch to one scalar loss.

The loop is task-agnostic. It takes the next batch from its data (a tuple of tensors),
moves it to the device and calls `loss_module(*batch)`; DDP or FSDP wrap that module, and
`torch.compile` compiles it, so the model's forward, the output head and the loss are one
graph (and so is their backward). Pretraining uses `NextTokenLoss`. A fine-tuning task
brings its own module over the same model: SFT is `NextTokenLoss` with `IGNORE_INDEX` on
the positions that must not be learned; DPO a module that also holds reference log-probs.

Two cross-entropy paths, chosen by `run.cross_entropy`:
- chunked (`chunked_cross_entropy`, the default): the head and the loss together over
  chunks of rows, so no more than `chunk_rows` x V logits ever exist. For GPT-2's
  50,257-token head at 16 x 1024 tokens, the plain path keeps ~3.3 GB of fp32 logits and
  as much again for their gradient; the chunked one ~0.2 GB. Each chunk computes its gradients with respect
  to the hidden states and the head weight in the forward pass (the softmax is at hand
  then), and the backward pass only scales them: one pass over the logits, no recompute,
  the approach of Liger Kernel's fused linear cross-entropy, in plain PyTorch. On a CPU,
  chunks small enough to stay in cache make the loss cheaper than the plain path too.
- plain: the model's logits [N, V], then `F.cross_entropy` in fp32 (on the CPU the head
  runs through oneDNN, model/onednn.py).

What it does not do: choose data, or reduce across processes (DDP averages gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas_server.model import Transformer
from atlas_server.model.onednn import packing_supported

__all__ = ["IGNORE_INDEX", "NextTokenLoss", "chunked_cross_entropy", "default_chunk_rows"]

IGNORE_INDEX = -100  # a target that contributes nothing (as in F.cross_entropy)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N]; on the CPU in fp32 through oneDNN, which takes the (possibly
    transposed) operands as they are and beats PyTorch's default kernel there (onednn.py);
    under torch.compile the compiler picks."""
    if (
        not torch.compiler.is_compiling()  # first: the checks below break a compiled graph
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and packing_supported(b)
    ):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def default_chunk_rows(vocab_size: int, device_type: str) -> int:
    """Rows per chunk, a power of two: on a GPU, ~256 MiB of fp32 logits per chunk (big
    products keep it busy); on a CPU, ~8 MiB, at least 256 rows, so that a chunk's logits
    stay in the last-level cache from the product to the softmax to the gradient products
    (measured 5-17% faster per quickstart step than one chunk, bench/bench_train.py)."""
    budget = 256 * 2**20 if device_type == "cuda" else 8 * 2**20
    rows = max(1 if device_type == "cuda" else 256, budget // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        # hidden [N, C], weight [C, V] (the tied head is a transposed view of [V, C]), targets [N]
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            h = hidden.to(dtype)
            w = weight.to(dtype)  # [C, V]
            valid = targets != IGNORE_INDEX  # [N]
            safe = torch.where(valid, targets, 0)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if want_h else None  # [N, C]
            # d loss / d W accumulated as [V, C] in fp32: the layout of a tied embedding.
            grad_wt = torch.zeros(w.shape[1], w.shape[0], dtype=torch.float32, device=h.device)
            for lo in range(0, h.shape[0], chunk_rows):
                hi = min(lo + chunk_rows, h.shape[0])
                logits = _matmul(h[lo:hi], w).float()  # [n, V]
                lse = torch.logsumexp(logits, dim=-1)  # [n]
                target_logit = logits.gather(1, safe[lo:hi, None])[:, 0]  # [n]
                keep = valid[lo:hi]
                total = total + torch.where(keep, lse - target_logit, 0.0).sum()
                if want_h or want_w:
                    # d(sum of losses)/d logits = softmax - one_hot(target); 0 on ignored rows.
                    grad = logits.sub_(lse[:, None]).exp_()  # [n, V], in place of the logits
                    grad.scatter_add_(1, safe[lo:hi, None], torch.full_like(lse[:, None], -1.0))
                    grad.mul_(keep[:, None])
                    grad = grad.to(dtype)
                    if want_h:
                        grad_h[lo:hi] = _matmul(grad, w.t())  # [n, C]
                    if want_w:
                        grad_wt += _matmul(grad.t(), h[lo:hi]).float()  # [V, C]
            count = valid.sum().clamp(min=1)
        ctx.save_for_backward(grad_h, grad_wt if want_w else None, count)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_wt, count = ctx.saved_tensors
        scale = grad_loss / count
        h_dtype, w_dtype = ctx.dtypes
        dh = (grad_h * scale).to(h_dtype) if grad_h is not None else None
        dw = (grad_wt * scale).to(w_dtype).t() if grad_wt is not None else None
        return dh, dw, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight` against `targets`, chunk by chunk.

    hidden [N, C], weight [C, V], targets [N] (IGNORE_INDEX skips a row). Equal, up to
    float rounding, to `F.cross_entropy((hidden @ weight).float(), targets)`, gradients
    included, without ever holding the [N, V] logits. Under autocast the products run in
    the autocast dtype and the softmax in fp32, as in the plain path.
    """
    rows = chunk_rows or default_chunk_rows(weight.shape[1], hidden.device.type)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows)


class NextTokenLoss(nn.Module):
    """Pretraining's loss: mean next-token cross-entropy of `model` on (inputs, targets).

    Called as `loss_module(idx, targets)`, both [B, T]; targets equal to IGNORE_INDEX are
    skipped. `chunked` picks the chunked head + loss (see the module docstring).
    """

    def __init__(self, model: Transformer, chunked: bool = False, chunk_rows: int | None = None):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.chunk_rows = chunk_rows

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        # A wrapped head (LoRA on lm_head) is no single matrix to chunk against: plain path.
        if self.chunked and self.model.head_is_one_matrix():
            hidden = self.model.hidden_states(idx)  # [B, T, C]
            return chunked_cross_entropy(
                hidden.flatten(0, 1), self.model.output_weight(), targets.flatten(), self.chunk_rows
            )
        logits = self.model(idx)  # [B, T, V]
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )
