"""Deterministic, resumable, rank-sharded batches from memory-mapped token shards.

What it does: cuts each split into windows of `seq_len + 1` tokens (stride `seq_len`,
never crossing a shard boundary), visits the training windows in a permutation seeded by
(seed, epoch), and hands each data-parallel rank its slice of every global batch. The
position — (epoch, cursor into the permutation) — is plain data saved in the trainer
state, so a resumed run continues at exactly the next batch. Validation batches are the
first windows in order, identical on every call.
What it does not do: tokenization or shard writing (see `data.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError, read_shard


@dataclass
class LoaderPosition:
    epoch: int = 0
    cursor: int = 0  # windows of the epoch's permutation already consumed (all ranks)


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
        window = seq_len + 1
        # (shard index, start offset) of every full window
        starts = [
            (i, off)
            for i, shard in enumerate(self.shards)
            for off in range(0, len(shard) - window + 1, seq_len)
        ]
        if not starts:
            raise DataError(
                f"the {split} split has no window of {window} tokens; lower data.seq_len"
            )
        self.windows = np.array(starts, dtype=np.int64)  # [N, 2]
        self.position = LoaderPosition()

    def __len__(self) -> int:
        return len(self.windows)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

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
        self.check_batch(per_rank)
        global_size = per_rank * self.world
        if self.position.cursor + global_size > len(self.windows):
            # The tail of an epoch that cannot fill a global batch is dropped, as in most loaders.
            self.position = LoaderPosition(self.position.epoch + 1, 0)
        order = self._permutation(self.position.epoch)
        lo = self.position.cursor + self.rank * per_rank
        ids = order[lo : lo + per_rank]
        self.position.cursor += global_size
        return self._gather(ids)

    def eval_batches(self, batch_size: int, n_batches: int):
        """The first windows in order: the same validation set on every call."""
        total = min(len(self.windows), batch_size * n_batches)
        for lo in range(0, total - batch_size + 1, batch_size):
            yield self._gather(np.arange(lo, lo + batch_size))

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "cursor": self.position.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.position = LoaderPosition(int(state["epoch"]), int(state["cursor"]))
