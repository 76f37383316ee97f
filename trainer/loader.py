"""Deterministic, resumable, rank-sharded batches from memory-mapped token shards.

What it does: cuts each split into windows of `seq_len + 1` tokens (stride `seq_len`,
never crossing a shard boundary), visits the training windows in a permutation seeded by
(seed, epoch), and hands each data-parallel rank its slice of every global batch. The
position — (epoch, cursor into the permutation) — is plain data saved in the trainer
state, so a resumed run continues at exactly the next batch.

An optimizer step's micro-batches come from `step_batches`, which decides the epoch
roll-over once for the step's whole global batch (micro_batch x processes x grad_accum):
a step either fits in what is left of the epoch or starts the next one, so B x accum A
gets exactly the windows of B*A x accum 1. `next_batch` is one step of one micro-batch.

Validation (`eval_batches`) is the first windows of the split in order, the same on every
call, split into equal contiguous parts over the ranks; the caller sums over the ranks.
`step_picks` and `eval_part` are that bookkeeping over item indices alone: the SFT and DPO
loaders (packed rows, preference pairs) walk their items with them too.
What it does not do: tokenization or shard writing (see `data.py`); sum validation losses
across ranks (the training loop does).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError, read_shard


@dataclass
class LoaderPosition:
    epoch: int = 0
    cursor: int = 0  # windows of the epoch's permutation already consumed (all ranks)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n items in `epoch` (read-only): drawn once, not for every micro-batch
    (the SFT and DPO loaders drew it per call, as the token loader once did)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def step_picks(
    position: LoaderPosition,
    n: int,
    order_of: Callable[[int], np.ndarray],
    per_rank: int,
    rank: int,
    world: int,
    accum: int,
) -> tuple[LoaderPosition, list[np.ndarray]]:
    """This rank's item indices for each of one optimizer step's `accum` micro-batches, and
    the position after the step, walking epochs of n items in the orders `order_of(epoch)`.

    The step takes the next per_rank * world * accum items of the order: micro-batch m is
    the m-th run of per_rank * world, rank r its r-th slice (so a step that stays inside an
    epoch gets the items it got one micro-batch at a time). When they do not fit in what is
    left of the epoch, that tail is dropped and the step starts the next epoch, as one
    micro-batch of the whole step would (accumulation is then a pure memory trade). A step
    larger than an epoch cannot fit in one: its micro-batches roll over one by one instead.
    """
    global_size = per_rank * world
    step_size = global_size * accum
    if step_size <= n and position.cursor + step_size > n:
        # The tail of an epoch that cannot fill a step is dropped, as in most loaders.
        position = LoaderPosition(position.epoch + 1, 0)
    picks = []
    for _ in range(accum):
        if position.cursor + global_size > n:  # only a step larger than an epoch
            position = LoaderPosition(position.epoch + 1, 0)
        lo = position.cursor + rank * per_rank
        picks.append(order_of(position.epoch)[lo : lo + per_rank])
        position = LoaderPosition(position.epoch, position.cursor + global_size)
    return position, picks


def eval_part(
    n: int, batch_size: int, n_batches: int, rank: int, world: int
) -> Iterator[np.ndarray]:
    """This rank's validation batches (item indices, the last batch maybe shorter).

    The set is the first batch_size * n_batches * world items in order (the same on every
    call), or all n rounded down to a multiple of world when there are fewer; rank r of w
    takes its r-th contiguous w-th. The parts are equal, so every rank runs as many batches
    (FSDP's forward is collective), and the set depends on the product alone:
    eval_batches * grad_accum batches of micro_batch are eval_batches global batches,
    however micro_batch, grad_accum and the processes split them.
    """
    part = min(n, batch_size * n_batches * world) // world
    lo = rank * part
    for start in range(lo, lo + part, batch_size):
        yield np.arange(start, min(start + batch_size, lo + part))


def window_table(lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """[N, 2] int64 (shard index, start offset) of every full window of `seq_len + 1`
    tokens at stride `seq_len`, shard by shard. Built with numpy: a Python list of tuples
    took seconds and over a GB for 8.8M windows."""
    window = seq_len + 1
    counts = np.array([max(0, (n - window) // seq_len + 1) for n in lengths], dtype=np.int64)
    table = np.empty((int(counts.sum()), 2), dtype=np.int64)
    table[:, 0] = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    # Each window's index within its shard times the stride: a running index minus the
    # index its shard's first window has.
    first = np.cumsum(counts) - counts
    table[:, 1] = (np.arange(len(table), dtype=np.int64) - np.repeat(first, counts)) * seq_len
    return table


class TokenLoader:
    def __init__(
        self, folder: str | Path, split: str, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        folder = Path(folder)
        try:
            self.manifest = json.loads((folder / "manifest.json").read_text())
        except FileNotFoundError:
            raise DataError(
                f"{folder} has no manifest.json; run `atlas-train prepare-data` first"
            ) from None
        self.shards = [read_shard(folder / s["file"]) for s in self.manifest[split]]
        self.seq_len, self.seed, self.rank, self.world = seq_len, seed, rank, world
        self.windows = window_table([len(s) for s in self.shards], seq_len)  # [N, 2]
        if len(self.windows) == 0:
            raise DataError(
                f"the {split} split has no window of {seq_len + 1} tokens; lower data.seq_len"
            )
        self.position = LoaderPosition()
        self._order: tuple[tuple[int, int], np.ndarray] | None = None  # ((epoch, N), order)

    def __len__(self) -> int:
        return len(self.windows)

    def _permutation(self, epoch: int) -> np.ndarray:
        # Cached: an epoch's permutation of 8.8M windows takes ~0.3-0.5 s, and it was once
        # recomputed for every micro-batch. Keyed by the table's length too, which tools
        # and tests may replace.
        key = (epoch, len(self.windows))
        if self._order is None or self._order[0] != key:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._order = (key, order)
        return self._order[1]

    def _gather(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for shard_index, start in self.windows[window_ids]:
            rows.append(
                np.asarray(
                    self.shards[shard_index][start : start + self.seq_len + 1], dtype=np.int64
                )
            )
        batch = torch.from_numpy(np.stack(rows))  # [B, T+1]
        return batch[:, :-1], batch[:, 1:]  # inputs [B, T], targets [B, T]

    def check_batch(self, per_rank: int) -> None:
        """Refuse a global batch larger than the split (checked before a run writes)."""
        global_size = per_rank * self.world
        if global_size > len(self.windows):
            raise DataError(
                f"a global batch of {global_size} exceeds the {len(self.windows)} training windows"
            )

    def next_batch(self, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `per_rank` sequences of the next global batch of per_rank * world."""
        return self.step_batches(per_rank, 1)[0]

    def step_batches(self, per_rank: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `accum` micro-batches of `per_rank` sequences for one optimizer step
        (`step_picks` says which windows)."""
        self.check_batch(per_rank)
        self.position, picks = step_picks(
            self.position, len(self.windows), self._permutation, per_rank, self.rank,
            self.world, accum,
        )  # fmt: skip
        return [self._gather(pick) for pick in picks]

    def eval_batches(
        self, batch_size: int, n_batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of the validation set (`eval_part`: the first windows of the
        split in order, in equal contiguous parts per rank)."""
        for pick in eval_part(len(self.windows), batch_size, n_batches, self.rank, self.world):
            yield self._gather(pick)

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "cursor": self.position.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.position = LoaderPosition(int(state["epoch"]), int(state["cursor"]))
