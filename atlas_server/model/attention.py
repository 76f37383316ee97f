"""Scaled dot-product attention, twice: a plain reference and PyTorch's fused kernel.

What it does: computes softmax(Q K^T / sqrt(D) + mask) V for grouped-query shapes,
either explicitly (`reference`, the readable oracle the tests compare against) or with
`torch.nn.functional.scaled_dot_product_attention` (`sdpa`, which dispatches to flash /
memory-efficient kernels on GPU). What it does not do: projections, RoPE or caching.

Shapes: q [B, H, T, D]; k, v [B, K, S, D] with H a multiple of K; mask None (causal,
T == S) or boolean [B, 1, T, S] where True means "may attend". `document_causal_mask`
builds that mask for packed training rows (several documents per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float
) -> Tensor:
    B, H, T, D = q.shape
    group = H // k.shape[1]
    if group > 1:  # grouped-query: each kv head serves `group` query heads
        k = k.repeat_interleave(group, dim=1)  # [B, H, S, D]
        v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)  # [B, H, T, S]
    if mask is None:
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0:
        weights = F.dropout(weights, dropout)
    return (weights @ v.float()).to(q.dtype)  # [B, H, T, D]


# `enable_gqa` (torch >= 2.5) lets the CUDA flash kernel read each kv head for its whole
# group of query heads, instead of attention reading (and autograd keeping) repeated copies.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    group = q.shape[1] // k.shape[1]
    if mask is None and group > 1 and q.is_cuda and _SDPA_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True
        )
    if group > 1:
        # Elsewhere (CPU kernels, masked decode, older torch) repeating the heads works.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def document_causal_mask(doc_ids: Tensor) -> Tensor:
    """Causal attention that never crosses documents: [B, T] ids -> boolean [B, 1, T, T].

    Token i may attend to token j when j <= i and both belong to the same document. Every
    token attends at least to itself, so no row of the softmax is empty (padding is given
    its own document id, as any other run of tokens)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
    return (same & causal)[:, None]  # [B, 1, T, T]


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, impl: str
) -> Tensor:
    if impl == "reference":
        return reference_attention(q, k, v, mask, dropout)
    return sdpa_attention(q, k, v, mask, dropout)
