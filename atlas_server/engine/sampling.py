"""Next-token selection for a batch of sequences, each with its own SamplingParams.

What it does: turns the model's logits [B, V] for B sequences into B token ids, applying
per row, in this order: logit_bias (added first) -> min_tokens masking of EOS / stop ids
-> repetition penalty (HF/CTRL: over prompt + output) -> presence / frequency penalties
(OpenAI: over output only) -> greedy argmax for temperature 0, otherwise temperature ->
top-k -> top-p -> min-p -> a draw. Each step's work is batched tensor code over the rows
that need it; no Python loop ever walks the vocabulary.

Randomness: a row with a seed draws from its own torch.Generator, so its text does not
depend on who else is in the batch; rows without a seed share one draw from the global
generator. A draw is `argmax(p / E)` with E ~ Exp(1) per token, which picks token i
with probability p_i (the "exponential race"), so one uniform tensor per row suffices.

Logprobs are those of the raw model distribution (log_softmax of the logits before
bias, penalties and temperature), as OpenAI and vLLM report them. What it does not do:
stop strings or detokenization (see detokenizer.py and output.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .types import SamplingParams, TokenLogprob

__all__ = ["LOGPROB_FLOOR", "SamplingRow", "sample", "top_logprobs"]

LOGPROB_FLOOR = -9999.0


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned_until_min: tuple[int, ...] = ()  # EOS + stop ids, masked while below min_tokens


def _apply_logit_bias(logits: Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias.keys()), device=logits.device)
            bias = torch.tensor(list(row.params.logit_bias.values()), device=logits.device)
            logits[i].index_add_(0, ids, bias.to(logits.dtype))


def _mask_early_stops(logits: Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if row.banned_until_min and len(row.output_ids) < row.params.min_tokens:
            logits[i, list(row.banned_until_min)] = float("-inf")


def _apply_penalties(logits: Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_ids + row.output_ids, device=logits.device).unique()
            values = logits[i, seen]
            # CTRL: divide positive logits, multiply negative ones, so either way the
            # token becomes less likely.
            values = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
            logits[i, seen] = values
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            counts = torch.bincount(
                torch.tensor(row.output_ids, device=logits.device), minlength=vocab
            )[:vocab].to(logits.dtype)  # [V]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _truncate(scaled: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask (-inf) the tokens outside each row's top-k / top-p / min-p set. scaled: [B, V]."""
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(vocab, device=scaled.device)[None, :]  # [1, V]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]  # [B, 1]
        drop = rank >= k
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the
        # mass *before* it already reaches top_p (so the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = scaled.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    return scaled


def _draw(probs: Tensor, rows: list[SamplingRow]) -> Tensor:
    """One token per row from probs [B, V] by the exponential race (module docstring)."""
    uniform = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), probs.shape[-1], device=probs.device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            uniform[i] = torch.rand(probs.shape[-1], generator=row.generator, device=probs.device)
    exp_noise = -torch.log1p(-uniform)  # Exp(1); log1p(-u) is finite for u in [0, 1)
    return (probs / exp_noise).argmax(dim=-1)


def sample(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Token ids [B] for logits [B, V] (any float dtype), one row per entry of `rows`."""
    logits = logits.float().clone()  # [B, V]; processed in place below
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
        _apply_penalties(logits, rows)
    greedy = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if not sampled_rows:
        return greedy
    sub = [rows[i] for i in sampled_rows]
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in sub], device=device)
    top_k = torch.tensor([r.params.top_k for r in sub], device=device)
    top_p = torch.tensor([r.params.top_p for r in sub], device=device)
    min_p = torch.tensor([r.params.min_p for r in sub], device=device)
    scaled = logits[sampled_rows] / temperature[:, None]  # [b, V]
    scaled = _truncate(scaled, top_k, top_p, min_p)
    drawn = _draw(scaled.softmax(dim=-1), sub)
    greedy[sampled_rows] = drawn
    return greedy


def top_logprobs(logits: Tensor, chosen: Tensor, k: Tensor | int) -> list[TokenLogprob]:
    """Raw-model logprob of `chosen` [B] under logits [B, V], with each row's top-k.

    `k` is the largest k asked for in the batch; callers trim rows that asked for fewer.
    """
    # The floor keeps every value finite (JSON has no -inf) even for a token a model gives
    # a -inf logit; any real logprob is far above it.
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp_min(LOGPROB_FLOOR)  # [B, V]
    chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()  # [B]
    k = int(k)
    if k > 0:
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [B, k]
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    else:
        top_values = top_ids = [[] for _ in chosen_lp]
    return [
        TokenLogprob(int(t), lp, dict(zip(ids, vals, strict=True)))
        for t, lp, ids, vals in zip(chosen.tolist(), chosen_lp, top_ids, top_values, strict=True)
    ]
