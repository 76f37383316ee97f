"""Next-token selection for a batch of sequences, each with its own SamplingParams.

What it does: turns the model's logits [B, V] for B sequences into B token ids, applying
per row, in this order: logit_bias (added first) -> min_tokens masking of EOS / stop ids
-> repetition penalty (HF/CTRL: over prompt + output) -> presence / frequency penalties
(OpenAI: over output only) -> greedy argmax for temperature 0 (or below 1e-5), otherwise temperature ->
top-k -> top-p -> min-p -> a draw. Every stage is one batched tensor operation over the
step's rows, on whatever device the logits live (the GPU when serving on CUDA); no Python
loop ever walks the vocabulary, and nothing is read back from the device until the end.

Host <-> device traffic: which stages run is decided from the rows' parameters on the host
(never by reading a tensor back), the per-row numbers travel as one small host tensor per
stage (pinned and asynchronous on CUDA), and `sample_step` returns the step's token ids,
with their logprobs when any row asked, through ONE device-to-host copy. So a CUDA step
queues forward -> sampling -> copy and the host waits once.

Randomness: a row with a seed draws from its own torch.Generator, so its text does not
depend on who else is in the batch; rows without a seed share one draw from the global
generator. A draw is `argmax(p / E)` with E ~ Exp(1) per token, which picks token i
with probability p_i (the "exponential race"), so one uniform tensor per row suffices.
A torch.Generator is a stateful stream, so each seeded row costs one `rand` launch
(queued, no sync), as in vLLM; the unseeded rows share one launch. CPU and CUDA generators
are different algorithms: a seed repeats its text on the same device, not across devices.

Logprobs are those of the raw model distribution (log_softmax of the logits before
bias, penalties and temperature), as OpenAI and vLLM report them. What it does not do:
stop strings or detokenization (see detokenizer.py and output.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .transfer import to_device
from .types import SamplingParams, TokenLogprob

__all__ = ["LOGPROB_FLOOR", "SampledStep", "SamplingRow", "sample", "sample_step", "top_logprobs"]

LOGPROB_FLOOR = -9999.0


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned_until_min: tuple[int, ...] = ()  # EOS + stop ids, masked while below min_tokens


@dataclass
class SampledStep:
    """A step's result on the host: one token per row, and its logprob entry where the
    row asked for one (`logprobs[i]` is None where row i did not)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


def _padded(device: torch.device, lists: list[list[int]], pad: int) -> Tensor:
    """Ragged token lists as one [B, L] tensor padded with `pad` (L >= 1)."""
    width = max(1, max(len(x) for x in lists))
    return to_device([x + [pad] * (width - len(x)) for x in lists], device)


def _apply_logit_bias(logits: Tensor, rows: list[SamplingRow]) -> None:
    index = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
    which = to_device([[i, t] for i, t, _ in index], logits.device)  # [n, 2]
    bias = to_device([b for _, _, b in index], logits.device, logits.dtype)  # [n]
    # Keys of one row are distinct, so accumulate adds each bias once, as a per-row add.
    logits.index_put_((which[:, 0], which[:, 1]), bias, accumulate=True)


def _mask_early_stops(logits: Tensor, rows: list[SamplingRow]) -> None:
    index = [
        [i, t]
        for i, r in enumerate(rows)
        if r.banned_until_min and len(r.output_ids) < r.params.min_tokens
        for t in r.banned_until_min
    ]
    if index:
        which = to_device(index, logits.device)  # [n, 2]
        # The value as a device tensor: a Python float assigned through advanced indexing
        # is built on the host and copied over with a blocking copy (a stream sync on CUDA).
        minus_inf = logits.new_full((len(index),), float("-inf"))  # [n]
        logits.index_put_((which[:, 0], which[:, 1]), minus_inf)


def _apply_penalties(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Repetition, then presence/frequency penalties, for all rows at once. [B, V]."""
    device, (B, V) = logits.device, logits.shape
    per_row = to_device(
        [
            [r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
            for r in rows
        ],
        device,
        torch.float32,
    )  # [B, 3]
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        history = _padded(
            device,
            [
                r.prompt_ids + r.output_ids if r.params.repetition_penalty != 1.0 else []
                for r in rows
            ],
            V,
        )  # [B, L]; V marks padding, in the extra column dropped below
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, history, True)
        rep = per_row[:, 0:1].to(logits.dtype)  # [B, 1]
        # CTRL: divide positive logits, multiply negative ones, so either way the token
        # becomes less likely.
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen[:, :V], penalized, logits)
    if any((r.params.presence_penalty or r.params.frequency_penalty) for r in rows):
        outputs = _padded(
            device,
            [
                r.output_ids if (r.params.presence_penalty or r.params.frequency_penalty) else []
                for r in rows
            ],
            V,
        )  # [B, L]
        counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
        counts = counts[:, :V]  # [B, V]
        frequency, presence = per_row[:, 1:2], per_row[:, 2:3]  # [B, 1] each
        logits = logits - (frequency * counts + presence * (counts > 0))
    return logits


def _truncate(
    scaled: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, by_rank: bool, by_min_p: bool
) -> Tensor:
    """Mask (-inf) the tokens outside each row's top-k / top-p / min-p set. scaled: [B, V].

    `by_rank` (some row has top-k or top-p) and `by_min_p` come from the host, so deciding
    which stages run reads nothing back from the device.
    """
    vocab = scaled.shape[-1]
    if by_rank:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(vocab, device=scaled.device)[None, :]  # [1, V]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]  # [B, 1]
        drop = rank >= k
        # Top-k first, then top-p over what top-k kept, renormalised (as vLLM and
        # transformers do): top_k=2, top_p=0.6 over 0.50/0.30/0.18 keeps one token, whose
        # share of the two is 0.62, not two.
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the
        # mass *before* it already reaches top_p (so the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    if by_min_p:
        probs = scaled.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    return scaled


def _draw(probs: Tensor, rows: list[SamplingRow]) -> Tensor:
    """One token per row from probs [B, V] by the exponential race (module docstring)."""
    B, V = probs.shape
    device = probs.device
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == B:
        uniform = torch.rand(B, V, device=device)
    else:
        uniform = torch.empty_like(probs)
        if unseeded:
            noise = torch.rand(len(unseeded), V, device=device)
            uniform.index_copy_(0, to_device(unseeded, device), noise)
        for i, row in enumerate(rows):
            if row.generator is not None:  # a stateful stream: one launch per seeded row
                uniform[i] = torch.rand(V, generator=row.generator, device=device)
    # Exp(1); log1p(-u) is finite for u in [0, 1). A draw of exactly 0 (one in 2^24-2^25)
    # would make a removed token's 0 / 0 a NaN, which argmax picks: the floor keeps it 0.
    exp_noise = (-torch.log1p(-uniform)).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / exp_noise).argmax(dim=-1)


# Temperatures below this are greedy, as in vLLM: dividing fp32 logits by a smaller one
# overflows (1e-45 is a denormal; 1e-46 rounds to 0), and the softmax of infinities is NaN.
GREEDY_BELOW = 1e-5


def sample(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Token ids [B] for logits [B, V] (any float dtype), one row per entry of `rows`.

    The ids stay on the logits' device; nothing is read back (see `sample_step`).
    """
    logits = logits.float().clone()  # [B, V]; processed in place below
    device = logits.device
    if any(r.params.logit_bias for r in rows):
        _apply_logit_bias(logits, rows)
    if any(r.banned_until_min and r.params.min_tokens for r in rows):
        _mask_early_stops(logits, rows)
    if any(
        r.params.repetition_penalty != 1.0
        or r.params.presence_penalty
        or r.params.frequency_penalty
        for r in rows
    ):
        logits = _apply_penalties(logits, rows)
    greedy = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, r in enumerate(rows) if r.params.temperature >= GREEDY_BELOW]
    if not sampled_rows:
        return greedy
    everyone = len(sampled_rows) == len(rows)
    sub = rows if everyone else [rows[i] for i in sampled_rows]
    index = None if everyone else to_device(sampled_rows, device)  # [b]
    numbers = to_device(
        [[r.params.temperature, r.params.top_p, r.params.min_p] for r in sub], device, torch.float32
    )  # [b, 3]
    temperature, top_p, min_p = numbers.unbind(1)
    # Clamped here, not only in _truncate: a top_k past int64 (any Python int is a valid
    # SamplingParams) must not fail the tensor build, and with it every row of the step.
    vocab = logits.shape[-1]
    top_k = to_device([min(max(r.params.top_k, 0), vocab) for r in sub], device)  # [b]
    scaled = (logits if index is None else logits[index]) / temperature[:, None]  # [b, V]
    scaled = _truncate(
        scaled,
        top_k,
        top_p,
        min_p,
        by_rank=any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in sub),
        by_min_p=any(r.params.min_p > 0 for r in sub),
    )
    drawn = _draw(scaled.softmax(dim=-1), sub)
    if index is None:
        return drawn
    return greedy.index_copy_(0, index, drawn)


def _logprob_table(logits: Tensor, chosen: Tensor, k: int) -> Tensor:
    """[B, 2 + 2k] float64 on the logits' device: chosen id, its logprob, top-k ids, their
    logprobs. float64 holds ids and float32 values exactly, so one copy carries all."""
    # The floor keeps every value finite (JSON has no -inf) even for a token a model gives
    # a -inf logit; any real logprob is far above it.
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp_min(LOGPROB_FLOOR)  # [B, V]
    parts = [chosen[:, None].double(), logprobs.gather(-1, chosen[:, None]).double()]
    if k > 0:
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [B, k]
        parts += [top_ids.double(), top_values.double()]
    return torch.cat(parts, dim=1)


def _entries(table: list[list[float]], k: int) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            int(row[0]),
            row[1],
            {int(t): v for t, v in zip(row[2 : 2 + k], row[2 + k :], strict=True)},
        )
        for row in table
    ]


@dataclass
class QueuedStep:
    """A step's sampling, queued on the logits' device and not yet read back.

    On CUDA the one device-to-host copy is queued right behind the sampling, into pinned
    host memory, with an event after it: `result()` waits for that event only, not for
    whatever was queued on the device since (in overlap mode, the next step's forward).
    Until then the host is free, which is what the engine's overlap mode uses (engine.py).
    """

    tokens: Tensor  # [B] token ids (int64), on the device: what the next step may feed
    table: Tensor  # what result() reads: `tokens`, or [B, 2 + 2k] ids, logprobs and top-k;
    # on CUDA its pinned host copy
    wanted: list[int | None]
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the copy into `table`

    def result(self) -> SampledStep:
        if self.ready is not None:
            self.ready.synchronize()
        wanted = self.wanted
        if all(k is None for k in wanted):
            return SampledStep(self.table.tolist(), [None] * len(wanted))
        k = max(k or 0 for k in wanted)
        entries = _entries(self.table.tolist(), k)
        out: list[TokenLogprob | None] = []
        for entry, want in zip(entries, wanted, strict=True):
            if want is None:
                out.append(None)
                continue
            if len(entry.top) > want:
                entry.top = dict(list(entry.top.items())[:want])
            out.append(entry)
        return SampledStep([e.token_id for e in entries], out)


def queue_step(
    logits: Tensor, rows: list[SamplingRow], logprobs: Sequence[int | None] | None = None
) -> QueuedStep:
    """Sample one token per row on the logits' device, without reading anything back.

    `logprobs[i]` is row i's top-k for logprobs (None: the row wants none). Entries hold at
    most the k their row asked for.
    """
    tokens = sample(logits, rows)  # [B], on the device
    wanted = list(logprobs) if logprobs is not None else [None] * len(rows)
    table = tokens
    if any(k is not None for k in wanted):
        table = _logprob_table(logits, tokens, max(k or 0 for k in wanted))
    if table.device.type != "cuda":
        return QueuedStep(tokens, table, wanted)
    host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
    host.copy_(table, non_blocking=True)  # the step's one copy, queued behind its sampling
    ready = torch.cuda.Event()
    ready.record()
    return QueuedStep(tokens, host, wanted, ready)


def sample_step(
    logits: Tensor, rows: list[SamplingRow], logprobs: Sequence[int | None] | None = None
) -> SampledStep:
    """Sample one token per row and bring the step's result to the host in one copy."""
    return queue_step(logits, rows, logprobs).result()


def top_logprobs(logits: Tensor, chosen: Tensor, k: Tensor | int) -> list[TokenLogprob]:
    """Raw-model logprob of `chosen` [B] under logits [B, V], with each row's top-k.

    `k` is the largest k asked for in the batch; callers trim rows that asked for fewer.
    One device-to-host copy.
    """
    k = int(k)
    return _entries(_logprob_table(logits, chosen, k).tolist(), k)
