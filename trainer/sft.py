"""Supervised fine-tuning (SFT): batches of packed conversations and the assistant-only loss.

What it does: turns `chat_data.PackedRows` into tensors (`SFTBatch`), hands them out in a
seeded, resumable order (`PackedLoader`, the same position bookkeeping as
`loader.TokenLoader`), and computes next-token cross-entropy on assistant tokens only,
with the model attending within each conversation of a packed row (`doc_ids`) at
positions that restart per conversation. `sft_loss` returns the summed loss and the count
of trained tokens, so a training loop can divide by the count over all its micro-batches:
every assistant token then weighs the same whichever micro-batch it lands in, and a
packed row gives the same loss as its conversations run one by one (tests/test_sft.py).
What it does not do: optimizer steps, schedules, logging or checkpoints (the training
loop), or rendering conversations (chat_data.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from atlas_server.model import Transformer

from .chat_data import IGNORE, PackedRows
from .data import DataError
from .loader import LoaderPosition, epoch_permutation, step_picks


@dataclass
class SFTBatch:
    inputs: Tensor  # [B, L] token ids
    labels: Tensor  # [B, L] next-token ids, IGNORE where the loss does not train
    positions: Tensor  # [B, L] restarting at 0 per conversation
    doc_ids: Tensor  # [B, L] conversation of each token within its row (0 = padding)

    @classmethod
    def from_rows(
        cls, rows: PackedRows, indices: np.ndarray | list[int], device: str | torch.device = "cpu"
    ) -> SFTBatch:
        pick = np.asarray(indices, dtype=np.int64)
        return cls(
            *(
                torch.from_numpy(getattr(rows, name)[pick]).to(device)
                for name in ("inputs", "labels", "positions", "doc_ids")
            )
        )

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class SFTLoss:
    total: Tensor  # scalar: summed cross-entropy (nats) over the trained tokens
    tokens: int  # how many tokens were trained on

    @property
    def mean(self) -> Tensor:
        """Mean loss per trained token (0 for a batch without any)."""
        return self.total / max(1, self.tokens)


def sft_loss(model: Transformer, batch: SFTBatch) -> SFTLoss:
    """Cross-entropy of the labels that are not IGNORE; packed conversations never attend
    to one another (the model builds a block-diagonal causal mask from doc_ids)."""
    logits = model(batch.inputs, positions=batch.positions, doc_ids=batch.doc_ids)  # [B, L, V]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # [B*L, V]
        batch.labels.reshape(-1),  # [B*L]
        ignore_index=IGNORE,
        reduction="sum",
    )
    return SFTLoss(total, batch.trained_tokens)


class PackedLoader:
    """Packed rows in a permutation seeded by (seed, epoch); rank r of w takes the r-th
    slice of each global batch. The tail of an epoch too short for a global batch is
    skipped, as TokenLoader does."""

    def __init__(self, rows: PackedRows, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(rows.inputs) == 0:
            raise DataError("no packed rows: every conversation was skipped or none were given")
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.position = LoaderPosition()

    def __len__(self) -> int:
        return len(self.rows.inputs)

    def check_batch(self, per_rank: int) -> None:
        """Refuse a global batch larger than the packed rows (checked before a run writes)."""
        global_size = per_rank * self.world
        if global_size > len(self):
            raise DataError(
                f"a global batch of {global_size} rows exceeds the {len(self)} packed rows"
                " (data.micro_batch times the processes); lower data.micro_batch"
            )

    def next_batch(self, per_rank: int, device: str | torch.device = "cpu") -> SFTBatch:
        """This rank's `per_rank` rows of the next global batch of per_rank * world."""
        return self.step_batches(per_rank, 1, device)[0]

    def step_batches(
        self, per_rank: int, accum: int, device: str | torch.device = "cpu"
    ) -> list[SFTBatch]:
        """This rank's `accum` micro-batches for one optimizer step, the epoch rolling over
        for the step as a whole (`loader.step_picks`)."""
        self.check_batch(per_rank)
        self.position, picks = step_picks(
            self.position, len(self), self._order, per_rank, self.rank, self.world, accum
        )
        return [SFTBatch.from_rows(self.rows, pick, device) for pick in picks]

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, len(self))

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "cursor": self.position.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.position = LoaderPosition(int(state["epoch"]), int(state["cursor"]))
