"""Direct Preference Optimization (DPO): response log-probs, the loss, reference log-probs.

What it does:
  - `PairBatch`: the chosen and rejected sequences of some preference pairs as one
    right-padded batch ([chosen rows; rejected rows], as TRL concatenates them), labelled on
    the response tokens only (chat_data.tokenize_pair marks the final assistant message);
  - `sequence_logps`: each row's summed (or, for IPO, length-averaged) log-probability of
    its response, from one forward pass over chosen and rejected together;
  - `preference_loss`, from policy and reference log-probs, with h the difference of
    log-ratios (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
      "sigmoid": -log sigmoid(beta h)  (DPO, Rafailov et al. 2023, eq. 7); with
                 label_smoothing e > 0 the conservative form -(1-e) log sigmoid(beta h)
                 - e log sigmoid(-beta h), for labels flipped with probability e;
      "ipo":     (h - 1/(2 beta))^2  (IPO, Azar et al. 2023, eq. 17) on length-averaged
                 log-probs, as the IPO authors and TRL compute it;
    with the logged numbers: implicit rewards beta (log pi - log ref) of chosen and
    rejected, their margin, and preference accuracy (chosen reward > rejected reward by
    more than a rounding tie, `TIE_RTOL`);
  - reference log-probs computed once with the frozen reference model (each process of a
    distributed run scoring its share of the pairs) and stored in a
    safetensors file beside the data, whose metadata holds the sha256 of the reference
    weights and of the tokenized pairs: a file made for other weights or other data is
    refused (`StaleReferenceError`), never silently reused. `frozen_copy` makes a
    reference model to run alongside instead (or, with LoRA, `lora.adapters_disabled`).
What it does not do: optimizer steps, schedules or logging (the training loop), sampling
responses or reward models (this is offline preference learning, not PPO/GRPO).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from atlas_server.model import Transformer
from atlas_server.progress import progress_bar

from .artifacts import arrays_sha256, save_safetensors_atomic, weights_sha256
from .chat_data import IGNORE, TokenizedPair
from .data import DataError

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FORMAT = "atlas-dpo-reference"
REFERENCE_VERSION = "1"


class StaleReferenceError(DataError):
    """A stored reference log-prob file that belongs to other weights or other data."""


@dataclass
class PairBatch:
    inputs: Tensor  # [2B, T] chosen rows first, then the rejected rows in the same order
    labels: Tensor  # [2B, T] next-token ids on response tokens, IGNORE elsewhere
    indices: list[int]  # which pairs (positions in the tokenized list), for the reference cache

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[TokenizedPair],
        indices: Sequence[int],
        pad_id: int,
        device: str | torch.device = "cpu",
    ) -> PairBatch:
        seqs = [(pairs[i].chosen_ids, pairs[i].chosen_mask) for i in indices]
        seqs += [(pairs[i].rejected_ids, pairs[i].rejected_mask) for i in indices]
        T = max(len(ids) for ids, _ in seqs) - 1
        inputs = np.full((len(seqs), T), pad_id, dtype=np.int64)
        labels = np.full((len(seqs), T), IGNORE, dtype=np.int64)
        for row, (ids, mask) in enumerate(seqs):
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            labels[row, :n] = np.where(mask[1:], ids[1:], IGNORE)
        return cls(
            torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device), list(indices)
        )

    @property
    def n_pairs(self) -> int:
        return len(self.indices)


def token_logps(model: Transformer, batch: PairBatch) -> Tensor:
    """log p(label | prefix) at each labelled position, 0 elsewhere: [2B, T]."""
    logits = model(batch.inputs)  # [2B, T, V]; right padding needs no mask under causality
    nll = F.cross_entropy(
        logits.float().transpose(1, 2),  # [2B, V, T]
        batch.labels,
        ignore_index=IGNORE,
        reduction="none",
    )  # [2B, T], 0 where ignored
    return -nll


def sequence_logps(model: Transformer, batch: PairBatch, average: bool = False) -> Tensor:
    """Each row's response log-probability, summed (or averaged per token): [2B]."""
    logps = token_logps(model, batch).sum(dim=1)  # [2B]
    if average:
        logps = logps / (batch.labels != IGNORE).sum(dim=1).clamp(min=1)
    return logps


# Relative tolerance of a preference: cached reference log-probs come from batches padded
# otherwise than the policy's, so with policy == reference the rewards differ in the last
# bits (seen: 1 ulp of a -150 nat sum, which made step 1's accuracy 0.075 instead of 0).
# A margin under TIE_RTOL times the reference log-probs' size (tens of fp32 ulps) is a tie,
# and a tie is not a preference. bf16 autocast rounds more coarsely; that is not covered.
TIE_RTOL = 1e-6


@dataclass
class DPOOutput:
    loss: Tensor  # scalar: mean over the pairs
    chosen_rewards: Tensor  # [B] beta * (log pi - log ref) of the chosen responses (detached)
    rejected_rewards: Tensor  # [B] the same for the rejected responses
    tie_tolerance: Tensor | None = None  # [B] reward margins this small are ties (TIE_RTOL)

    @property
    def preferred(self) -> Tensor:
        """[B] bool: the chosen reward beats the rejected one by more than a tie."""
        margin = self.chosen_rewards - self.rejected_rewards
        return margin > (0.0 if self.tie_tolerance is None else self.tie_tolerance)

    def metrics(self) -> dict[str, float]:
        """What a training log shows: loss, rewards, reward margin, preference accuracy."""
        return {
            "loss": float(self.loss.detach()),
            "reward_chosen": float(self.chosen_rewards.mean()),
            "reward_rejected": float(self.rejected_rewards.mean()),
            "reward_margin": float((self.chosen_rewards - self.rejected_rewards).mean()),
            "preference_accuracy": float(self.preferred.float().mean()),
        }


def preference_loss(
    policy_chosen: Tensor,  # [B]
    policy_rejected: Tensor,  # [B]
    ref_chosen: Tensor,  # [B]
    ref_rejected: Tensor,  # [B]
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
) -> DPOOutput:
    """DPO / conservative DPO / IPO from sequence log-probs (see the module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss, not to IPO")
    chosen_ratio = policy_chosen - ref_chosen  # [B]
    rejected_ratio = policy_rejected - ref_rejected  # [B]
    h = chosen_ratio - rejected_ratio  # [B]
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    scale = ref_chosen.abs() + ref_rejected.abs()  # [B] the size of the numbers compared
    return DPOOutput(
        losses.mean(),
        beta * chosen_ratio.detach(),
        beta * rejected_ratio.detach(),
        beta * TIE_RTOL * scale.detach(),
    )


def dpo_step_loss(
    policy: Transformer,
    batch: PairBatch,
    ref_chosen: Tensor,  # [B]
    ref_rejected: Tensor,  # [B]
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
) -> DPOOutput:
    """The policy's log-probs for `batch` against given reference log-probs (averaged for
    IPO: the reference values must then be averaged too, see ReferenceLogps.average)."""
    logps = sequence_logps(policy, batch, average=loss_type == "ipo")  # [2B]
    chosen, rejected = logps.split(batch.n_pairs)
    return preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing, loss_type
    )


# --- the reference -----------------------------------------------------------------------------
def frozen_copy(model: Transformer) -> Transformer:
    """A copy of `model` to serve as the DPO reference: eval mode, no gradients."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def pairs_sha256(pairs: Sequence[TokenizedPair]) -> str:
    """Hash of the tokenized pairs (ids and response masks, in order)."""
    return arrays_sha256(
        a for p in pairs for a in (p.chosen_ids, p.chosen_mask, p.rejected_ids, p.rejected_mask)
    )


@dataclass
class ReferenceLogps:
    chosen: Tensor  # [N] float32, one per pair in data order
    rejected: Tensor  # [N]
    average: bool  # per-token averages (IPO) rather than sums

    def for_batch(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        index = torch.tensor(batch.indices)
        device = batch.inputs.device
        return self.chosen[index].to(device), self.rejected[index].to(device)


@torch.no_grad()
def compute_reference_logps(
    reference: Transformer,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    average: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ReferenceLogps:
    """One pass of the reference model over every pair, in eval mode (no dropout)."""
    was_training = reference.training
    reference.eval()
    chosen, rejected = [], []
    try:
        starts = range(0, len(pairs), batch_size)
        for lo in progress_bar(
            starts, desc="reference log-probs", unit="batch", disable=not progress
        ):
            batch = PairBatch.from_pairs(
                pairs, range(lo, min(lo + batch_size, len(pairs))), pad_id, device
            )
            c, r = sequence_logps(reference, batch, average).float().cpu().split(batch.n_pairs)
            chosen.append(c)
            rejected.append(r)
    finally:
        reference.train(was_training)
    return ReferenceLogps(torch.cat(chosen), torch.cat(rejected), average)


def reference_path(data_file: str | Path) -> Path:
    """Where the reference log-probs of a preference file live: beside it."""
    data_file = Path(data_file)
    return data_file.with_name(f"{data_file.name}.ref-logps.safetensors")


def save_reference_logps(
    path: Path, logps: ReferenceLogps, model_sha256: str, data_sha256: str
) -> None:
    metadata = {
        "format": REFERENCE_FORMAT,
        "format_version": REFERENCE_VERSION,
        "model_sha256": model_sha256,
        "data_sha256": data_sha256,
        "average": str(logps.average).lower(),
        "pairs": str(len(logps.chosen)),
    }
    save_safetensors_atomic(path, {"chosen": logps.chosen, "rejected": logps.rejected}, metadata)


def load_reference_logps(
    path: Path, model_sha256: str, data_sha256: str, average: bool
) -> ReferenceLogps:
    """Read stored reference log-probs, refusing a file made for other weights or data."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise DataError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != REFERENCE_FORMAT or set(tensors) != {"chosen", "rejected"}:
        raise DataError(f"{path} is not an Atlas DPO reference log-prob file")
    stale = [
        f"{what} sha256 {meta.get(key, '?')[:12]}..., now {now[:12]}..."
        for what, key, now in (
            ("reference weights", "model_sha256", model_sha256),
            ("data", "data_sha256", data_sha256),
        )
        if meta.get(key) != now
    ]
    if meta.get("average") != str(average).lower():
        stale.append(f"average={meta.get('average')}, now {str(average).lower()}")
    if stale:
        raise StaleReferenceError(
            f"{path} was computed for other inputs ({'; '.join(stale)}); delete it or"
            " recompute the reference log-probs"
        )
    return ReferenceLogps(tensors["chosen"], tensors["rejected"], average)


def reference_logps(
    path: Path,
    reference: Transformer,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    average: bool = False,
    recompute: bool = False,
    rank: int = 0,
    world: int = 1,
    **compute_options,
) -> ReferenceLogps:
    """Stored reference log-probs when `path` holds ones for these weights and pairs;
    computed and stored when it holds none (or `recompute`); a stale file is refused.

    With `world` processes (torch.distributed initialized), each scores every world-th
    pair from its `rank` and the shares are gathered, so the pass takes 1/world of the
    time (every process scored every pair before); the first process stores the file.
    The processes agree first whether all of them see the file (nodes may not share a
    folder), so all take the same branch."""
    model_hash, data_hash = weights_sha256(reference.state_dict()), pairs_sha256(pairs)
    stored = path.is_file() and not recompute
    if world > 1:
        flag = torch.tensor([int(stored)], device=compute_options.get("device", "cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        stored = bool(flag.item())
    if stored:
        return load_reference_logps(path, model_hash, data_hash, average)
    share = compute_reference_logps(
        reference, pairs[rank::world], pad_id, average, **compute_options
    )
    logps = share if world == 1 else _gather_shares(share, len(pairs), world, compute_options)
    if not bool(torch.isfinite(logps.chosen).all() and torch.isfinite(logps.rejected).all()):
        raise DataError("the reference model gave non-finite log-probs; is it a trained model?")
    if rank == 0:
        save_reference_logps(path, logps, model_hash, data_hash)
    return logps


def _gather_shares(
    share: ReferenceLogps, n: int, world: int, compute_options: dict
) -> ReferenceLogps:
    """Every process's share (rank r held pairs r, r + world, ...) back in pair order."""
    m = -(-n // world)  # the largest share; shorter ones are padded to it
    # On the scoring device: NCCL gathers CUDA tensors only.
    mine = torch.zeros(2, m, device=compute_options.get("device", "cpu"))  # [2, m]
    mine[0, : len(share.chosen)] = share.chosen.to(mine.device)
    mine[1, : len(share.rejected)] = share.rejected.to(mine.device)
    shares = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shares, mine)
    # [world, 2, m] -> [2, m, world]: pair r + world * j is share r's j-th, at j * world + r.
    both = torch.stack(shares).permute(1, 2, 0).reshape(2, m * world)[:, :n].cpu()  # [2, n]
    return ReferenceLogps(both[0].contiguous(), both[1].contiguous(), share.average)
