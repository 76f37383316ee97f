"""The `instruct` suite: does a chat model answer held-out instructions, and prefer right answers?

Data (committed, built by `python -m trainer.instruct_data` with seed 0; see
data/LICENSE-PSF-DOCS.md): `instruct/sft_heldout.jsonl`, chat records whose last message
is the reference answer, and `instruct/prefs_heldout.jsonl`, preference records (prompt,
chosen, rejected), both about standard-library functions no training file of that builder
mentions. Any chat / preference JSONL in the shapes `trainer.chat_data` reads can be
given instead (`data`, `pairs`; `pairs = ""` skips the preference part).

Answer quality: every conversation minus its last message goes to `/v1/chat/completions`
(greedy by default); the reply is scored against the reference with the configured metric
plugins (default ROUGE-1/2/L/Lsum from rouge-score, and SQuAD-normalised exact match), and
`stopped` is the share of replies that ended on their own (finish_reason "stop") rather
than at `max_tokens`: a base model rambles on, an instruction-tuned one stops.

Preference accuracy: for each pair, the log-likelihood of each response given the prompt,
exactly as the chat endpoint would feed it: `/tokenize` renders the prompt with the
generation prompt and the whole conversation with the response (the server's own chat
template), the response tokens are what follows the prompt up to and including the
template's end-of-message token, and one `/v1/completions` request with `echo` and
`logprobs` scores them (as the perplexity suite scores text). `preference_accuracy` is the
share of pairs whose chosen response has the higher summed log-likelihood,
`preference_accuracy_per_token` the same with per-token means, `logprob_margin` the mean
difference (nats). A plot (instruct.png) shows the per-item ROUGE-L and margin
distributions. What it does not do: judge with an LLM, or sample several answers per item.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import first_choice, gather_with_progress
from ..errors import CapabilityError, ServerRequestError, SuiteConfigError
from ..metrics import check_metrics, compute_metric
from .base import (
    RunContext,
    Suite,
    SuiteResult,
    data_path,
    file_sha256,
    metric,
    nothing_fits,
    stable_order,
)

__all__ = ["InstructConfig", "InstructSuite"]

END_OF_MESSAGE = "<|im_end|>"


@dataclass(frozen=True)
class InstructConfig:
    data: str  # chat JSONL; the last message of each record (an assistant's) is the reference
    pairs: str  # preference JSONL; "" = no preference accuracy
    max_tokens: int
    temperature: float
    metrics: tuple[str, ...]  # metric plugin names for the answers
    score_max_tokens: int  # generated tokens per scoring request (0 works on Atlas and vLLM)
    max_context_tokens: int  # 0 = the server's max_model_len; set it for servers without one

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise SuiteConfigError("instruct: max_tokens must be >= 1")
        if self.max_context_tokens < 0:
            raise SuiteConfigError("instruct: max_context_tokens must be >= 0 (0 = the server's)")
        if self.score_max_tokens not in (0, 1):
            raise SuiteConfigError("instruct: score_max_tokens must be 0 or 1")
        check_metrics(self.metrics)


@dataclass(frozen=True)
class Item:
    id: str
    messages: list[dict[str, str]]  # what is sent
    reference: str


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _records(path: Path, parse) -> list[tuple[str, Any]]:
    """(id, parsed) for each record: its "id" field, else file:line. Bad records stop the
    run with the trainer's own one-line message (file, line, what is wrong)."""
    from trainer.chat_data import ChatDataError, RecordError, iter_records

    out, problems = [], []
    for origin, raw in iter_records(str(path)):
        try:
            if isinstance(raw, RecordError):
                raise raw
            parsed = parse(raw, origin)
        except RecordError as e:
            problems.append(f"{origin}: {e}")
            continue
        except ChatDataError as e:
            raise SuiteConfigError(str(e)) from None
        record_id = raw.get("id") if isinstance(raw.get("id"), str) else origin
        out.append((record_id, parsed))
    if problems:
        raise SuiteConfigError(f"instruct: {len(problems)} bad record(s): {problems[0]}")
    if not out:
        raise SuiteConfigError(f"instruct: {path} holds no records")
    return out


def load_items(path: Path) -> list[Item]:
    from trainer.chat_data import parse_conversation

    items = []
    for record_id, conv in _records(path, parse_conversation):
        *prompt, last = conv.messages
        if last["role"] != "assistant" or not prompt:
            raise SuiteConfigError(
                f"instruct: {conv.origin}: the last message must be the reference answer"
                " (role assistant), after at least one prompt message"
            )
        items.append(Item(record_id, list(prompt), last["content"]))
    return items


def load_pairs(path: Path) -> list[Pair]:
    from trainer.chat_data import parse_preference

    return [
        Pair(record_id, list(p.prompt), p.chosen, p.rejected)
        for record_id, p in _records(path, parse_preference)
    ]


def seeded(things: list, seed: int, limit: int | None) -> list:
    by_id = {t.id: t for t in things}
    if len(by_id) != len(things):
        by_id = {f"{t.id}#{i}": t for i, t in enumerate(things)}
    order = [by_id[i] for i in stable_order(list(by_id), seed)]
    return order[:limit] if limit else order


class InstructSuite(Suite):
    name = "instruct"
    description = (
        "held-out instructions answered through chat (ROUGE, exact match, stopping)"
        " and preference accuracy on held-out pairs (echo + logprobs)"
    )
    metrics = (
        "rougeL",
        "exact_match",
        "stopped",
        "preference_accuracy",
        "preference_accuracy_per_token",
        "logprob_margin",
    )
    config_cls = InstructConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: InstructConfig = ctx.config
        data = data_path(cfg.data)
        items = seeded(load_items(data), ctx.seed, ctx.limit)
        # A conversation that does not fit the context with max_tokens is skipped and
        # counted (context_fit), as in every suite; a server's own "too long" 400 as well.
        for it in items:
            if await ctx.fit.fits(it.messages, cfg.max_tokens):
                ctx.fit.keep(it.id, trimmed=False)
            else:
                ctx.fit.skip(it.id, ctx.fit.too_long_reason("the conversation", cfg.max_tokens))
        items = [it for it in items if not ctx.fit.is_skipped(it.id)]
        answers = await gather_with_progress(
            (ctx.fit.refused_as_too_long(it.id, self.answer(ctx, cfg, it)) for it in items),
            desc="instruct answers",
        )
        answered = [(it, a) for it, a in zip(items, answers, strict=True) if a is not None]
        if not answered:
            raise nothing_fits(self.name, ctx.fit, "conversations")
        samples = [
            {
                "id": it.id,
                "kind": "answer",
                "question": it.messages[-1]["content"],
                "reference": it.reference,
                "prediction": text,
                "finish_reason": finish,
            }
            for it, (text, finish) in answered
        ]
        metrics, signatures = score_answers(cfg, samples)
        files = {cfg.data: file_sha256(data)}
        details: dict[str, Any] = {"items": len(answered), "signatures": signatures}
        if cfg.pairs:
            pairs_file = data_path(cfg.pairs)
            pairs = seeded(load_pairs(pairs_file), ctx.seed, ctx.limit)
            end_id = await end_of_message_id(ctx)
            scored = await gather_with_progress(
                (ctx.fit.refused_as_too_long(p.id, score_pair(ctx, cfg, p, end_id)) for p in pairs),
                desc="instruct pairs",
            )
            pair_samples = [
                {"id": p.id, "kind": "pair", **s}
                for p, s in zip(pairs, scored, strict=True)
                if s is not None
            ]
            if pair_samples:  # none fitted: no accuracy, rather than a 0 that means nothing
                metrics.update(preference_metrics(pair_samples))
            samples += pair_samples
            files[cfg.pairs] = file_sha256(pairs_file)
            details["pairs"] = len(pairs)
        plot = write_plot(ctx.output_dir, samples)
        if plot is not None:
            details["plot"] = plot.name
        return SuiteResult(metrics=metrics, samples=samples, data_files=files, details=details)

    async def answer(
        self, ctx: RunContext, cfg: InstructConfig, item: Item
    ) -> tuple[str, str | None]:
        body = {
            "messages": item.messages,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "seed": ctx.seed,
        }
        choice = first_choice(await ctx.client.chat(body), "/v1/chat/completions")
        text = (choice.get("message") or {}).get("content") or ""
        return text.strip(), choice.get("finish_reason")


def score_answers(
    cfg: InstructConfig, samples: list[dict[str, Any]]
) -> tuple[dict[str, dict], dict[str, str]]:
    from rouge_score import rouge_scorer

    predictions = [s["prediction"] for s in samples]
    references = [[s["reference"]] for s in samples]
    metrics: dict[str, dict] = {}
    signatures: dict[str, str] = {}
    for name in cfg.metrics:
        scores, flags, signature = compute_metric(name, predictions, references)
        if signature:
            signatures[name] = signature
        for key, value in scores.items():
            metrics[key] = metric(value, flags[key], f"{name} plugin: reply vs reference answer")
    # Per item, for samples.jsonl and the plot (the same scorer the rouge plugin uses).
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for s in samples:
        s["rougeL"] = scorer.score(s["reference"], s["prediction"])["rougeL"].fmeasure
    stopped = sum(s["finish_reason"] == "stop" for s in samples) / max(1, len(samples))
    metrics["stopped"] = metric(
        stopped, True, "share of replies that ended by themselves, not at max_tokens"
    )
    return metrics, signatures


async def end_of_message_id(ctx: RunContext) -> int | None:
    """The chat template's end-of-message token id (ChatML's <|im_end|>), if the server says."""
    info = await ctx.client.tokenizer_info() or {}
    for token_id, entry in (info.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("content") == END_OF_MESSAGE:
            return int(token_id)
    return None


async def tokenize_messages(
    ctx: RunContext, messages: list[dict], generation_prompt: bool
) -> list[int]:
    body = {
        "model": ctx.client.model,
        "messages": messages,
        "add_generation_prompt": generation_prompt,
    }
    try:
        answer = await ctx.client.cached_post("/tokenize", body)
    except ServerRequestError as e:
        raise CapabilityError(
            "the instruct suite's preference accuracy needs a vLLM-style /tokenize that renders"
            f" chat messages; the server refused ({e}); set pairs='' to skip it"
        ) from None
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ServerRequestError("/tokenize did not return a list of token ids")
    return tokens


async def response_logprob(
    ctx: RunContext, cfg: InstructConfig, pair: Pair, response: str, end_id: int | None
) -> tuple[float, int]:
    """(summed log-likelihood, token count) of `response` after the pair's prompt."""
    prompt = await tokenize_messages(ctx, pair.prompt, True)
    full = await tokenize_messages(
        ctx, [*pair.prompt, {"role": "assistant", "content": response}], False
    )
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        raise ServerRequestError(
            f"instruct: pair {pair.id}: the rendered conversation does not start with the rendered"
            " prompt, so the response tokens cannot be told apart"
        )
    scored = full[len(prompt) :]
    if end_id is not None and end_id in scored:
        scored = scored[: scored.index(end_id) + 1]  # up to the end of the message, inclusive
    ids = prompt + scored
    body = {
        "prompt": [ids],
        "max_tokens": cfg.score_max_tokens,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    choice = first_choice(await ctx.client.completion(body), "/v1/completions")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    values = logprobs[len(prompt) : len(ids)] if isinstance(logprobs, list) else []
    if len(values) != len(scored) or not all(isinstance(v, int | float) for v in values):
        raise CapabilityError(
            "the instruct suite needs /v1/completions with echo=true and logprobs (one logprob"
            " per prompt token) to score preference pairs; set pairs='' to skip them"
        )
    return float(sum(values)), len(scored)


async def score_pair(ctx: RunContext, cfg: InstructConfig, pair: Pair, end_id: int | None) -> dict:
    chosen, n_chosen = await response_logprob(ctx, cfg, pair, pair.chosen, end_id)
    rejected, n_rejected = await response_logprob(ctx, cfg, pair, pair.rejected, end_id)
    return {
        "question": pair.prompt[-1]["content"],
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "chosen_logprob": chosen,
        "rejected_logprob": rejected,
        "chosen_tokens": n_chosen,
        "rejected_tokens": n_rejected,
        "margin": chosen - rejected,
    }


def preference_metrics(pairs: list[dict[str, Any]]) -> dict[str, dict]:
    n = max(1, len(pairs))
    per_token = [
        p["chosen_logprob"] / p["chosen_tokens"] > p["rejected_logprob"] / p["rejected_tokens"]
        for p in pairs
    ]
    return {
        "preference_accuracy": metric(
            sum(p["margin"] > 0 for p in pairs) / n,
            True,
            "share of held-out pairs whose chosen response is the more likely (summed log-prob)",
        ),
        "preference_accuracy_per_token": metric(
            sum(per_token) / n, True, "the same with per-token mean log-probs (length-neutral)"
        ),
        "logprob_margin": metric(
            sum(p["margin"] for p in pairs) / n,
            True,
            "mean log p(chosen) - log p(rejected), nats",
        ),
    }


def write_plot(output_dir: Path, samples: list[dict[str, Any]]) -> Path | None:
    """instruct.png: per-item ROUGE-L and chosen-minus-rejected margins, as histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rouge = [s["rougeL"] for s in samples if s["kind"] == "answer"]
    margins = [s["margin"] for s in samples if s["kind"] == "pair"]
    panels = [("ROUGE-L F1 per answer", rouge, (0.0, 1.0))]
    if margins:
        panels.append(("log p(chosen) - log p(rejected), nats", margins, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (title, values, span) in zip(axes[0], panels, strict=True):
        finite = [v for v in values if math.isfinite(v)]
        ax.hist(finite, bins=20, range=span, color="#4C72B0")
        if span is None:
            ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("items")
    fig.tight_layout()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "instruct.png"
    tmp = output_dir / ".instruct.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
