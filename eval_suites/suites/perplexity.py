"""The `perplexity` suite: rolling log-likelihood of held-out prose, as lm-evaluation-harness does it.

How: each document is tokenized (the server's `/tokenize`, else a local `--tokenizer`
file), cut into rolling windows, and every window is scored by one `/v1/completions`
request with token-id prompts, `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`
(exactly the request lm-eval's `local-completions` sends). The first window is
`[prefix] + tokens[:W]` and scores all W tokens, the prefix (the tokenizer's BOS, else
its end-of-text token, as lm-eval picks it) giving the first token something to
condition on; every later window scores the next `stride` tokens and
feeds as much preceding text as fits in W + 1 prompt tokens. With the default
`stride = W` the scored spans are disjoint and each window's first token is conditioned on
the token before it — lm-eval's `get_rolling_token_windows(context_len=1)` +
`make_disjoint_window` as lm-eval 0.4's `loglikelihood_rolling` runs them with its
`max_length = W + 2` (W + 1 prompt tokens plus the one generated token). A smaller stride gives every
scored token more context (the "strided" evaluation of the HF perplexity guide) at the
cost of more requests.

Fitting the server's context (`fit.py`): every window's prompt (W + 1 tokens) plus one
generated token must fit, so W is at most the context length - 2; a configured `window`
larger than that is lowered to it (and `stride` with it), which results.json records in
`details.window_requested` and `context_fit.notes`. A document that the server still
refuses as too long is skipped (left out of every total) and listed in `context_fit`.

Reports total NLL (nats), token / byte / word counts, token perplexity, word perplexity,
byte perplexity and bits per byte. Only bits per byte (and byte perplexity) compare across
tokenizers: token perplexity depends on how many tokens the text becomes. What it does not
do: score with the model directly (that is the test's reference) or use chat endpoints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import first_choice, gather_with_progress
from ..errors import ServerRequestError, SuiteConfigError
from ..fit import ContextWindow
from ..tokens import LocalTokenizer
from .base import (
    RunContext,
    Suite,
    SuiteResult,
    data_path,
    file_sha256,
    iter_jsonl,
    metric,
    nothing_fits,
)

__all__ = ["PerplexityConfig", "PerplexitySuite", "rolling_windows"]


@dataclass(frozen=True)
class PerplexityConfig:
    data: str  # JSONL with "id" and "text"; a relative path as base.data_path finds it
    window: int  # W: tokens scored per window; 0 = the context length - 2 (max 2048)
    stride: int  # tokens newly scored per later window; 0 = W (disjoint windows)
    prefix_token_id: int  # token fed before the first window; -1 = the BOS, else end-of-text
    max_tokens: int  # generated tokens per scoring request (lm-eval sends 1; vLLM/Atlas accept 0)
    max_context_tokens: int  # 0 = the server's max_model_len; set it for servers without one

    def validate(self) -> None:
        if self.window < 0 or self.stride < 0 or self.max_context_tokens < 0:
            raise SuiteConfigError("perplexity: window, stride and max_context_tokens must be >= 0")
        if self.max_tokens not in (0, 1):
            raise SuiteConfigError("perplexity: max_tokens must be 0 or 1")


@dataclass(frozen=True)
class Window:
    prompt: list[int]  # ids sent to the server
    scored: int  # the last `scored` prompt tokens are the ones this window predicts


def rolling_windows(tokens: list[int], prefix: int, window: int, stride: int) -> list[Window]:
    """Windows that together score every token exactly once (see the module docstring)."""
    if not tokens:
        return []
    first = min(window, len(tokens))
    windows = [Window([prefix, *tokens[:first]], first)]
    done = first
    while done < len(tokens):
        scored = min(stride, len(tokens) - done)
        end = done + scored
        windows.append(Window(tokens[max(0, end - window - 1) : end], scored))
        done = end
    return windows


def count_words(text: str) -> int:
    # lm-eval's wikitext convention: pieces between runs of whitespace.
    return len(re.split(r"\s+", text))


def load_documents(path: Path, limit: int | None) -> list[dict[str, str]]:
    """JSONL records with a "text" string; "id" is optional (default: line-N, N counting
    from 1), since docs/training.md's held-out files are plain {"text": ...} records. Each
    record keeps its place in the file (`_line`) for the errors that name it."""
    docs = []
    for number, record in iter_jsonl(path, "perplexity"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SuiteConfigError(f'perplexity: {path}:{number}: no "text" string')
        docs.append({**record, "id": str(record.get("id", f"line-{number}")), "_line": number})
    return docs[:limit] if limit else docs


def check_tokens(
    path: Path, docs: list[dict[str, Any]], token_lists: list[list[int]], source: str
) -> None:
    """Every text that has characters must have tokens: a tokenizer that answers none for
    one (a /tokenize route that reads another field than `prompt`) would score it as an
    empty document, and with no tokens at all there is nothing to divide by."""
    if not docs:
        raise SuiteConfigError(f"perplexity: {path} holds no documents")
    empty = [
        i for i, (d, t) in enumerate(zip(docs, token_lists, strict=True)) if d["text"] and not t
    ]
    if empty:
        first = docs[empty[0]]
        raise SuiteConfigError(
            f"perplexity: {source} returned no tokens for {len(empty)} non-empty text(s), e.g."
            f" {first['id']} ({path}:{first['_line']}); if the server's /tokenize does not take"
            ' vLLM\'s {"prompt": TEXT}, pass --tokenizer FILE'
        )
    if not any(token_lists):
        raise SuiteConfigError(
            f"perplexity: no document has any tokens: the {len(docs)} text(s) of {path} are empty"
        )


class PerplexitySuite(Suite):
    name = "perplexity"
    seeded = False  # every item, scored the same way whatever the seed
    description = "rolling log-likelihood of held-out Python documentation prose (echo + logprobs)"
    metrics = ("bits_per_byte", "token_perplexity", "word_perplexity", "byte_perplexity", "nll")
    config_cls = PerplexityConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: PerplexityConfig = ctx.config
        path = data_path(cfg.data)
        docs = load_documents(path, ctx.limit)
        local = ctx.fit.counter.local
        token_lists = await self._tokenize(ctx, local, docs)
        check_tokens(
            path, docs, token_lists, f"--tokenizer {ctx.tokenizer_file}" if local else "/tokenize"
        )
        window, stride = fit_window(cfg, ctx.fit.window, ctx.fit.notes)
        prefix = await resolve_prefix(ctx, cfg, local)
        probe = next((t for t in token_lists if t), [prefix])[:8]
        await ctx.client.probe_echo_logprobs(self.name, probe)

        jobs = [
            (d, w)
            for d, toks in enumerate(token_lists)
            for w in rolling_windows(toks, prefix, window, stride)
        ]
        for doc in docs:
            ctx.fit.keep(doc["id"], trimmed=False)
        scores = await gather_with_progress(
            (
                ctx.fit.refused_as_too_long(docs[d]["id"], score_window(ctx, w, cfg.max_tokens))
                for d, w in jobs
            ),
            desc="perplexity windows",
        )
        doc_ll = [0.0] * len(docs)
        doc_windows = [0] * len(docs)
        for (d, _), ll in zip(jobs, scores, strict=True):
            doc_ll[d] += ll or 0.0
            doc_windows[d] += 1
        samples = [
            {
                "id": doc["id"],
                "loglikelihood": doc_ll[i],
                "tokens": len(token_lists[i]),
                "bytes": len(doc["text"].encode("utf-8")),
                "words": count_words(doc["text"]),
                "windows": doc_windows[i],
            }
            for i, doc in enumerate(docs)
            if not ctx.fit.is_skipped(doc["id"])  # a refused window: the whole document goes
        ]
        if not samples:
            raise nothing_fits(self.name, ctx.fit, "documents")
        return SuiteResult(
            metrics=summarise(samples),
            samples=samples,
            data_files={cfg.data: file_sha256(path)},
            details={
                "window": window,
                "window_requested": cfg.window or None,
                "stride": stride,
                "prefix_token_id": prefix,
                "requests": len(jobs),
                "tokenizer": str(ctx.tokenizer_file) if local else "server /tokenize",
                "counts": {k: sum(s[k] for s in samples) for k in ("tokens", "bytes", "words")},
                "documents": len(samples),
            },
        )

    async def _tokenize(
        self, ctx: RunContext, local: LocalTokenizer | None, docs: list[dict]
    ) -> list[list[int]]:
        if local is not None:
            return [local.encode(d["text"]) for d in docs]
        return await gather_with_progress(
            (ctx.client.tokenize(d["text"]) for d in docs), desc="tokenize"
        )


async def score_window(ctx: RunContext, window: Window, max_tokens: int) -> float:
    body = {
        "prompt": [window.prompt],
        "max_tokens": max_tokens,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    response = await ctx.client.completion(body)
    logprobs = first_choice(response, "/v1/completions").get("logprobs") or {}
    token_logprobs = logprobs.get("token_logprobs")
    n = len(window.prompt)
    scored = token_logprobs[n - window.scored : n] if isinstance(token_logprobs, list) else []
    if len(scored) != window.scored or not all(isinstance(x, int | float) for x in scored):
        raise ServerRequestError(
            f"/v1/completions returned {len(scored)} prompt logprobs for {window.scored} scored tokens;"
            " the server must echo one logprob per prompt token"
        )
    # Entries after the prompt belong to the generated token(s): not part of the text.
    return float(sum(scored))


def fit_window(cfg: PerplexityConfig, context: ContextWindow, notes: list[str]) -> tuple[int, int]:
    """(window, stride) that fit the context; a lowered window is noted in `notes`."""
    # The prompt is W + 1 tokens and one more is generated (lm-eval's max_tokens=1; with
    # max_tokens=0 the same room is left, so both settings score the same windows).
    fits = None if context.tokens is None else context.tokens - 2
    if fits is not None and fits < 1:
        raise SuiteConfigError(
            f"perplexity: a {context.tokens}-token context ({context.source}) leaves no room"
            " for a window"
        )
    if cfg.window == 0:
        if fits is None:
            raise SuiteConfigError(
                "perplexity: the server does not report max_model_len in /v1/models; give"
                " its context length with --set max_context_tokens=N (or a window: --set window=N)"
            )
        window = min(fits, 2048)
    elif fits is not None and cfg.window > fits:
        window = fits
        notes.append(
            f"window {cfg.window} lowered to {window} to fit the {context.tokens}-token context"
        )
    else:
        window = cfg.window
    stride = cfg.stride or window
    if stride > window:
        if cfg.window and window == cfg.window:
            raise SuiteConfigError(f"perplexity: stride {stride} exceeds window {window}")
        notes.append(f"stride {stride} lowered to the window, {window}")
        stride = window
    return window, stride


async def resolve_prefix(
    ctx: RunContext, cfg: PerplexityConfig, local: LocalTokenizer | None
) -> int:
    # As lm-eval's prefix_token_id: the tokenizer's BOS where it has one (Llama 3's
    # <|begin_of_text|>), else its end-of-text token (GPT-2's serves as both).
    if cfg.prefix_token_id >= 0:
        return cfg.prefix_token_id
    if local is not None:
        for token_id in (local.bos_id, local.eot_id):
            if token_id is not None:
                return int(token_id)
    info = await ctx.client.tokenizer_info() or {}
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(info.get(key), int):
            return int(info[key])
    ids = await ctx.client.tokenize("<|endoftext|>")
    if len(ids) == 1:
        return ids[0]
    raise SuiteConfigError(
        "perplexity: cannot find the end-of-text token id; set --set prefix_token_id=N"
    )


def _exp(x: float) -> float:
    # A model that is all but certain of the wrong text (over ~709 nats a unit) has a
    # perplexity past float's range: infinite, not an OverflowError that loses the run.
    return math.exp(x) if x < 709.0 else math.inf


def summarise(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ll = sum(s["loglikelihood"] for s in samples)
    tokens = sum(s["tokens"] for s in samples)
    n_bytes = sum(s["bytes"] for s in samples)
    words = sum(s["words"] for s in samples)
    return {
        "nll": metric(-ll, False, "total negative log-likelihood of the text, nats"),
        "token_perplexity": metric(
            _exp(-ll / tokens), False, "exp(NLL / tokens); tokenizer-dependent"
        ),
        "word_perplexity": metric(_exp(-ll / words), False, "exp(NLL / whitespace words)"),
        "byte_perplexity": metric(_exp(-ll / n_bytes), False, "exp(NLL / UTF-8 bytes)"),
        "bits_per_byte": metric(
            -ll / (n_bytes * math.log(2)),
            False,
            "NLL / (UTF-8 bytes * ln 2); compares across tokenizers",
        ),
    }
