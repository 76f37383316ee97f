"""Preallocated key/value cache in fixed slots.

Layout: for each layer, `k[layer]` and `v[layer]` are [n_slots, n_kv_heads, max_len,
head_dim]. A running sequence owns one slot for its whole life; the token at absolute
position p of that sequence has its keys at [slot, :, p, :]. Memory is allocated once,
up front, so the serving engine's memory use is bounded and known at start.

Why slots rather than paged blocks: at the 50M-150M scale Atlas serves, a slot of
max_len positions costs little (124M GPT-2, 1024 positions, fp32: 72 MiB per slot), and
slots keep the attention read a plain slice that SDPA consumes directly. Paging would
pay off for long contexts with very uneven lengths; see docs/architecture.md.

What it does not do: decide which sequence gets which slot (the engine's scheduler).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.n_slots, self.max_len = n_slots, max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [B, T, K, D] for rows `slots` [B] at `positions` [B, T]."""
        rows = slots[:, None]  # [B, 1] broadcasts against positions [B, T]
        # Advanced indices around a slice put the indexed dims first: target is [B, T, K, D].
        self.k[layer][rows, :, positions] = k.to(self.k[layer].dtype)
        self.v[layer][rows, :, positions] = v.to(self.v[layer].dtype)

    def read(
        self, layer: int, slots: Tensor, length: int, first: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys and values of positions [0, length) for rows `slots`: each [B, K, length, D].

        `first`, when the caller knows the slots are first, first + 1, ..., saves reading
        the slots back from the device to find out.
        """
        count = slots.numel()
        if first is None:
            first = int(slots[0])
            consecutive = count == 1 or _are_consecutive(slots, first)
        else:
            consecutive = True
        if consecutive:
            # Consecutive slots (the engine keeps decode batches sorted): a view, no gather copy.
            rows = slice(first, first + count)
            return self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]
        # index_select over the sliced view copies only `length` positions per row; an advanced
        # index (k[slots, :, :length]) gives the same tensor about 4x slower on CPU.
        return (
            self.k[layer][:, :, :length].index_select(0, slots),
            self.v[layer][:, :, :length].index_select(0, slots),
        )

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Copy positions [0, length) of slot `source` into each of `targets`, every layer.

        Slot numbers stay host integers (slices, no index tensor): building one on a GPU
        from a list would make the host wait for the device's queue."""
        for store in self.k + self.v:
            for target in targets:
                store[target, :, :length] = store[source, :, :length]

    def swap_slots(self, a: int, b: int, length: int) -> None:
        """Exchange positions [0, length) of slots a and b, every layer."""
        for store in self.k + self.v:
            held = store[a, :, :length].clone()
            store[a, :, :length] = store[b, :, :length]
            store[b, :, :length] = held


def _are_consecutive(slots: Tensor, first: int) -> bool:
    return bool((slots == torch.arange(first, first + slots.numel(), device=slots.device)).all())
