"""SFT and DPO as tasks of the training loop: their data, loss modules and validation.

What it does: `sft_task()` and `dpo_task()` return `loop.Task`s, so `atlas-train sft` and
`atlas-train dpo` run through the same `setup` / `train_step` / `fit` as pretraining
(exact resume, logging, checkpoints, Ctrl-C). Both start from `model.init_from` and render
conversations through that checkpoint's own chat template (`TemplateRenderer.
for_checkpoint`: ChatML unless it has a chat_template.jinja), so the ids trained on are
the ids `/v1/chat/completions` serves.
  - SFT: conversations (`[sft] train`, `val`) are shuffled with the run's seed, packed
    into rows of `data.seq_len` (several per row, never attending across: doc ids), and
    trained with next-token loss on assistant tokens only. The micro-batches of a step are
    weighed by their trained tokens, so every assistant token counts alike.
  - DPO: preference pairs (`[dpo] train`, `val`), `data.micro_batch` pairs per micro-batch,
    chosen and rejected in one forward pass; the reference is `init_from`, either scored
    once into a cached log-prob file beside the data (`reference = "cached"`) or run frozen
    beside the policy (`"frozen"`; with LoRA, the policy with its adapters switched off).
    The cache file is named after the data file and a hash of everything its numbers
    depend on (`prefs.jsonl.ref-logps-<key>.safetensors`, `_cache_key`: reference
    weights, tokenized pairs, averaging, precision...), so each variant has its own file;
    one whose contents do not match is refused (dpo.py).
    Training logs reward margin, preference accuracy and the two rewards; validation gives
    loss, reward margin and preference accuracy on the held-out pairs.
Conversations or pairs longer than the row are skipped and counted (the count is printed
and recorded in each checkpoint's lineage); a bad record stops the run with `file:line`.
What it does not do: the loop itself (loop.py), the losses' maths (sft.py, dpo.py), or
reading and rendering records (chat_data.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from atlas_server.checkpoint import load_checkpoint, read_metadata
from atlas_server.model import Transformer
from atlas_server.tokenizer import Tokenizer

from .artifacts import arrays_sha256, weights_sha256
from .chat_data import (
    IGNORE,
    PackedRows,
    TemplateRenderer,
    TokenizedPair,
    chat_sources,
    pack_conversations,
    read_conversations,
    read_preferences,
    tokenize_conversation,
    tokenize_pair,
)
from .config import TrainConfig
from .data import DataError
from .dpo import (
    REFERENCE_VERSION,
    DPOOutput,
    PairBatch,
    ReferenceLogps,
    dpo_step_loss,
    frozen_copy,
    pairs_sha256,
    preference_loss,
    reference_logps,
    reference_path,
    sequence_logps,
    token_logps,
)
from .loader import LoaderPosition, epoch_permutation, eval_part, step_picks
from .loop import (
    Dist,
    Task,
    autocast_context,
    load_checkpoint_tokenizer,
    resolve_precision,
    say,
)
from .lora import adapters_disabled, lora_modules
from .sft import PackedLoader, SFTBatch


def _renderer(cfg: TrainConfig) -> tuple[Tokenizer, TemplateRenderer]:
    tokenizer = load_checkpoint_tokenizer(cfg.model.init_from)
    return tokenizer, TemplateRenderer.for_checkpoint(cfg.model.init_from, tokenizer)


def _raise_seq_len(cfg: TrainConfig) -> str:
    """What to do about data longer than data.seq_len: raise it, up to the model's limit."""
    limit = read_metadata(cfg.model.init_from)["model"]["max_seq_len"]
    if cfg.data.seq_len >= limit:
        return (
            f"data.seq_len is already {cfg.model.init_from}'s max_seq_len ({limit}):"
            " this model cannot train on them; use shorter records"
        )
    return f"raise data.seq_len (up to {cfg.model.init_from}'s max_seq_len, {limit})"


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.eot_id if tokenizer.eot_id is not None else 0


# --- SFT ---------------------------------------------------------------------------------------
@dataclass
class SFTData:
    """Packed conversations as the loop's batches: (inputs, labels, positions, doc_ids)."""

    rows: PackedRows
    sources: list[str]
    sha256: str  # of the tokenized conversations (ids and masks, in file order)
    conversations: int
    skipped_too_long: int
    rank: int = 0
    world: int = 1
    loader: PackedLoader | None = None  # training data only

    def check_batch(self, per_rank: int) -> None:
        self.loader.check_batch(per_rank)

    def next_batch(self, per_rank: int) -> tuple[Tensor, ...]:
        return self.step_batches(per_rank, 1)[0]

    def step_batches(self, per_rank: int, accum: int) -> list[tuple[Tensor, ...]]:
        """A step's micro-batches, the epoch rolling over for the step as a whole."""
        return [
            (b.inputs, b.labels, b.positions, b.doc_ids)
            for b in self.loader.step_batches(per_rank, accum)
        ]

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[Tensor, ...]]:
        """This rank's part of the first rows (`loader.eval_part`); the loop sums ranks."""
        n = len(self.rows.inputs)
        for pick in eval_part(n, batch_size, n_batches, self.rank, self.world):
            b = SFTBatch.from_rows(self.rows, pick)
            yield b.inputs, b.labels, b.positions, b.doc_ids

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def identity(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "conversations": self.conversations,
            "skipped_too_long": self.skipped_too_long,
        }


def load_sft_data(
    cfg: TrainConfig, sources: Sequence[str], d: Dist, split: str, train: bool
) -> SFTData:
    tokenizer, renderer = _renderer(cfg)
    files = chat_sources(sources)
    conversations = read_conversations(files)
    tokenized = [tokenize_conversation(c, renderer) for c in conversations]
    digest = arrays_sha256(a for t in tokenized for a in (t.ids, t.mask))
    # Packing is first-fit in the given order: shuffle first (seeded) so rows mix sources.
    order = np.random.default_rng([cfg.run.seed, 1]).permutation(len(tokenized))
    rows, stats = pack_conversations(
        [tokenized[i] for i in order], cfg.data.seq_len, _pad_id(tokenizer)
    )
    if d.main:
        say(
            f"sft {split}: {stats.examples:,} conversations in {stats.rows:,} rows of "
            f"{stats.seq_len} ({100 * stats.fill:.0f}% filled), {stats.trained_tokens:,} trained "
            f"tokens; skipped {stats.skipped_too_long} longer than {stats.seq_len + 1} tokens"
            + (f" (e.g. {', '.join(stats.skipped)})" if stats.skipped else "")
        )
    if stats.rows == 0:
        raise DataError(
            f"sft {split}: every conversation is longer than data.seq_len + 1 ="
            f" {cfg.data.seq_len + 1} tokens; {_raise_seq_len(cfg)}"
        )
    data = SFTData(rows, files, digest, len(conversations), stats.skipped_too_long, d.rank, d.world)
    if train:
        data.loader = PackedLoader(rows, cfg.run.seed, d.rank, d.world)
    return data


def sft_data(cfg: TrainConfig, d: Dist) -> tuple[SFTData, SFTData | None]:
    train = load_sft_data(cfg, cfg.sft.train, d, "train", train=True)
    if not cfg.sft.val:
        if d.main:
            say("warning: sft.val is empty; validation is skipped and no val loss is reported")
        return train, None
    return train, load_sft_data(cfg, cfg.sft.val, d, "val", train=False)


class SFTLoss(nn.Module):
    """Mean cross-entropy over a packed batch's trained (assistant) tokens."""

    def __init__(self, model: Transformer, cfg: TrainConfig | None = None) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, labels: Tensor, positions: Tensor, doc_ids: Tensor):
        logits = self.model(inputs, positions=positions, doc_ids=doc_ids)  # [B, L, V]
        total = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),  # [B*L, V]
            labels.reshape(-1),  # [B*L]
            ignore_index=IGNORE,
            reduction="sum",
        )
        return total / (labels != IGNORE).sum().clamp(min=1)


def trained_tokens(batch: tuple[Tensor, ...]) -> float:
    return float((batch[1] != IGNORE).sum())


def sft_task() -> Task:
    return Task(
        stage="sft",
        make_loss=SFTLoss,
        make_data=sft_data,
        batch_weight=trained_tokens,
        data_identity=lambda cfg, data: (data.identity(), data.sha256),
    )


# --- DPO ---------------------------------------------------------------------------------------
@dataclass
class PairData:
    """Preference pairs as the loop's batches: (inputs [2B, T], labels [2B, T]) plus, with a
    cached reference, (reference chosen [B], reference rejected [B]) log-probs."""

    pairs: list[TokenizedPair]
    pad_id: int
    sources: list[str]
    sha256: str
    skipped_too_long: int
    seed: int
    rank: int = 0
    world: int = 1
    reference: ReferenceLogps | None = None
    position: LoaderPosition | None = None

    def _batch(self, indices: Sequence[int]) -> tuple[Tensor, ...]:
        batch = PairBatch.from_pairs(self.pairs, indices, self.pad_id)
        if self.reference is None:
            return batch.inputs, batch.labels
        return (batch.inputs, batch.labels, *self.reference.for_batch(batch))

    def check_batch(self, per_rank: int) -> None:
        """Refuse a global batch larger than the pairs (checked before a run writes)."""
        if per_rank * self.world > len(self.pairs):
            raise DataError(
                f"a global batch of {per_rank * self.world} pairs exceeds the {len(self.pairs)}"
                " pairs (data.micro_batch times the processes); lower data.micro_batch"
            )

    def next_batch(self, per_rank: int) -> tuple[Tensor, ...]:
        return self.step_batches(per_rank, 1)[0]

    def step_batches(self, per_rank: int, accum: int) -> list[tuple[Tensor, ...]]:
        """A step's micro-batches of pairs, the epoch rolling over for the step as a whole
        (`loader.step_picks`)."""
        self.check_batch(per_rank)
        n = len(self.pairs)
        self.position, picks = step_picks(
            self.position or LoaderPosition(),
            n,
            lambda epoch: epoch_permutation(self.seed, epoch, n),
            per_rank,
            self.rank,
            self.world,
            accum,
        )
        return [self._batch([int(i) for i in pick]) for pick in picks]

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[Tensor, ...]]:
        """This rank's part of the first pairs (`loader.eval_part`); `dpo_evaluate` sums
        the ranks."""
        for pick in eval_part(len(self.pairs), batch_size, n_batches, self.rank, self.world):
            yield self._batch([int(i) for i in pick])

    def state_dict(self) -> dict:
        p = self.position or LoaderPosition()
        return {"epoch": p.epoch, "cursor": p.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.position = LoaderPosition(int(state["epoch"]), int(state["cursor"]))

    def identity(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "pairs": len(self.pairs),
            "skipped_too_long": self.skipped_too_long,
        }


def load_pairs(cfg: TrainConfig, sources: Sequence[str], d: Dist, split: str) -> PairData:
    tokenizer, renderer = _renderer(cfg)
    files = chat_sources(sources)
    limit = cfg.data.seq_len + 1  # a sequence of n tokens takes n - 1 positions
    pairs, skipped = [], []
    for pair in read_preferences(files):
        t = tokenize_pair(pair, renderer)
        if max(len(t.chosen_ids), len(t.rejected_ids)) > limit:
            skipped.append(t.origin)
        else:
            pairs.append(t)
    if d.main:
        say(
            f"dpo {split}: {len(pairs):,} pairs; skipped {len(skipped)} longer than {limit} tokens"
            + (f" (e.g. {', '.join(skipped[:5])})" if skipped else "")
        )
    if not pairs:
        raise DataError(
            f"dpo {split}: every pair is longer than data.seq_len + 1 = {limit} tokens;"
            f" {_raise_seq_len(cfg)}"
        )
    return PairData(
        pairs, _pad_id(tokenizer), files, pairs_sha256(pairs), len(skipped), cfg.run.seed,
        d.rank, d.world,
    )  # fmt: skip


def _cache_key(cfg: TrainConfig, data: PairData, reference_sha256: str) -> str:
    """A hash of everything the cached numbers depend on: the reference weights, the
    tokenized pairs (the data, the chat template, and data.seq_len, which drops the long
    ones), IPO's per-token averaging, the precision, attention and device type. Another
    value of any of them is another file, so no setting can pick up a stale one."""
    parts = {
        "format": REFERENCE_VERSION,
        "reference": reference_sha256,
        "pairs": data.sha256,
        "average": cfg.dpo.loss_type == "ipo",
        "precision": resolve_precision(cfg, cfg.run.device),
        "attention": cfg.run.attention,
        "device": torch.device(cfg.run.device).type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _cache_file(cfg: TrainConfig, data: PairData, split: str, reference_sha256: str) -> Path:
    """Beside the data file when there is one local file; else in the run folder. The name
    carries `_cache_key`: each reference model and each setting that changes the numbers
    has its own file."""
    tag = "-" + _cache_key(cfg, data, reference_sha256)
    local = [s for s in data.sources if not s.startswith("hf:")]
    if len(data.sources) == 1 and local:
        path = reference_path(local[0])
        return path.with_name(path.name.replace(".ref-logps", f".ref-logps{tag}"))
    return Path(cfg.run.out_dir) / f"reference-logps{tag}-{split}.safetensors"


def dpo_data(cfg: TrainConfig, d: Dist) -> tuple[PairData, PairData | None]:
    train = load_pairs(cfg, cfg.dpo.train, d, "train")
    train.check_batch(cfg.data.micro_batch)  # before the reference pass, not after it
    val = load_pairs(cfg, cfg.dpo.val, d, "val") if cfg.dpo.val else None
    if val is None and d.main:
        say("warning: dpo.val is empty; validation is skipped")
    if cfg.dpo.reference == "cached":
        # With the policy's attention path: at step 0 the two then agree to the last bit.
        # On run.device, where the pairs' batches are put (a CPU copy fails on CUDA).
        reference = load_checkpoint(
            cfg.model.init_from, device=cfg.run.device, attention=cfg.run.attention
        ).model
        reference_sha256 = weights_sha256(reference.state_dict())
        for split, data in (("train", train), ("val", val)):
            if data is None:
                continue
            path = _cache_file(cfg, data, split, reference_sha256)
            was_there = path.is_file()
            # In the policy's precision: at step 0 policy and reference then agree exactly.
            with _autocast(cfg):
                data.reference = reference_logps(
                    path, reference, data.pairs, data.pad_id,
                    average=cfg.dpo.loss_type == "ipo", batch_size=cfg.data.micro_batch,
                    device=cfg.run.device, progress=d.main, rank=d.rank, world=d.world,
                )  # fmt: skip
            if d.main:
                say(
                    f"dpo {split}: reference log-probs {'read from' if was_there else 'written to'} {path}"
                )
    return train, val


def _autocast(cfg: TrainConfig):
    return autocast_context(resolve_precision(cfg, cfg.run.device), cfg.run.device)


class DPOLoss(nn.Module):
    """The DPO (or IPO) loss of the policy `model` against the reference's log-probs (given
    with the batch, or from a frozen reference computed here)."""

    def __init__(self, model: Transformer, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.beta, self.label_smoothing = cfg.dpo.beta, cfg.dpo.label_smoothing
        self.loss_type = cfg.dpo.loss_type
        self.sft_weight = cfg.dpo.sft_weight
        self.last: DPOOutput | None = None  # of the latest forward, for validation
        self.last_nll: Tensor | None = None
        self._pending: list[Tensor] = []
        reference = None
        if cfg.dpo.reference == "frozen" and not lora_modules(model):
            reference = frozen_copy(
                load_checkpoint(cfg.model.init_from, attention=cfg.run.attention).model
            )
            reference.to(next(model.parameters()).device)
        # Not a submodule: its weights are no part of the policy's state or optimizer.
        self.__dict__["reference"] = reference

    def _reference_logps(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        average = self.loss_type == "ipo"
        with torch.no_grad():
            if self.reference is not None:
                logps = sequence_logps(self.reference, batch, average)
            else:  # LoRA: the base model is the policy without its adapters
                with adapters_disabled(self.model):
                    was_training = self.model.training
                    self.model.eval()
                    logps = sequence_logps(self.model, batch, average)
                    self.model.train(was_training)
        return logps.split(batch.n_pairs)

    def forward(
        self,
        inputs: Tensor,
        labels: Tensor,
        ref_chosen: Tensor | None = None,
        ref_rejected: Tensor | None = None,
    ) -> Tensor:
        batch = PairBatch(inputs, labels, list(range(inputs.size(0) // 2)))
        if ref_chosen is None:
            ref_chosen, ref_rejected = self._reference_logps(batch)
        if self.sft_weight > 0:
            out, nll = self._with_chosen_nll(batch, ref_chosen, ref_rejected)
        else:
            out = dpo_step_loss(
                self.model, batch, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
                self.loss_type,
            )  # fmt: skip
            nll = None
        self.last, self.last_nll = out, nll
        if self.training:  # device tensors; read back with the loss, every log_every steps
            parts = [out.loss.detach()] if nll is None else [out.loss.detach(), nll.detach()]
            self._pending.append(torch.cat([_stats(out), torch.stack(parts)]))
        return out.loss if nll is None else out.loss + self.sft_weight * nll

    def _with_chosen_nll(
        self, batch: PairBatch, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> tuple[DPOOutput, Tensor]:
        """The preference loss and the chosen responses' mean next-token loss, from one
        forward pass: [B, T] token log-probs give both."""
        logps = token_logps(self.model, batch)  # [2B, T], 0 where not labelled
        counts = (batch.labels != IGNORE).sum(dim=1).clamp(min=1)  # [2B]
        sums = logps.sum(dim=1)  # [2B]
        seq = sums / counts if self.loss_type == "ipo" else sums
        chosen, rejected = seq.split(batch.n_pairs)
        out = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
            self.loss_type,
        )  # fmt: skip
        n = batch.n_pairs
        nll = -sums[:n].sum() / counts[:n].sum()  # mean over every chosen token
        return out, nll

    def pop_metrics(self) -> dict[str, float]:
        """Means of the training micro-batches since the last call."""
        if not self._pending:
            return {}
        means = torch.stack(self._pending).mean(dim=0).tolist()
        self._pending.clear()
        names = (*STAT_NAMES, "preference_loss", "chosen_nll")[: len(means)]
        return dict(zip(names, means, strict=True))


STAT_NAMES = ("reward_margin", "preference_accuracy", "reward_chosen", "reward_rejected")


def _stats(out: DPOOutput) -> Tensor:
    c, r = out.chosen_rewards, out.rejected_rewards  # [B]
    accuracy = out.preferred.float().mean()  # a tie within rounding is not a preference
    return torch.stack([(c - r).mean(), accuracy, c.mean(), r.mean()])  # [4]


@torch.no_grad()
def dpo_evaluate(
    loss_module: DPOLoss, data: PairData, cfg: TrainConfig, device: str, byte_table: Tensor
) -> dict[str, float]:
    """The loss trained on (`loss`), its preference part, reward margin and preference
    accuracy over the held-out pairs (pair-weighted), and with dpo.sft_weight the chosen
    responses' token loss (`chosen_nll`, the loss's other part). Each
    rank evaluates its part of the pairs and the sums are added over the ranks."""
    was_training = loss_module.training
    loss_module.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    n = 0
    for batch in data.eval_batches(cfg.data.micro_batch, cfg.run.eval_batches):
        with _autocast(cfg):  # the precision the reference log-probs were computed in
            loss_module(*(t.to(device) for t in batch))
        k = batch[0].size(0) // 2
        sums[0] += float(loss_module.last.loss) * k
        sums[1:5] += _stats(loss_module.last).double().cpu() * k
        if loss_module.last_nll is not None:
            sums[5] += float(loss_module.last_nll) * k
        n += k
    loss_module.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        totals = torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64)]).to(device)
        dist.all_reduce(totals)  # every rank evaluated its own part of the pairs
        sums, n = totals[:6].cpu(), int(totals[6])
    values = (sums / max(1, n)).tolist()
    metrics = dict(zip(("preference_loss", *STAT_NAMES), values[:5], strict=True))
    # `loss` is the objective training minimises, as train/loss is (and TRL's eval loss):
    # with sft_weight the chosen answers' token loss is part of it, and logged apart.
    metrics["loss"] = metrics["preference_loss"]
    if cfg.dpo.sft_weight > 0:
        metrics["chosen_nll"] = values[5]
        metrics["loss"] += cfg.dpo.sft_weight * values[5]
    return metrics


def dpo_task() -> Task:
    return Task(
        stage="dpo",
        make_loss=DPOLoss,
        make_data=dpo_data,
        evaluate=dpo_evaluate,
        data_identity=lambda cfg, data: (data.identity(), data.sha256),
    )


def task_for(cfg: TrainConfig) -> Task | None:
    """The task a config's stage runs (None: pretraining's default)."""
    return {"sft": sft_task, "dpo": dpo_task}.get(cfg.stage, lambda: None)()
