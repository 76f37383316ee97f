"""The `latency` suite: the load generator (`eval_suites/loadgen.py`) as an evaluation suite.

How: for each load level — a fixed concurrency from `concurrencies` (closed loop: N
clients each sending the next request when the previous one finishes) and/or a Poisson
arrival rate from `request_rates` (open loop, seeded) — it streams `num_prompts` requests
of `input_len` random prompt tokens and `output_len` generated tokens (`ignore_eos`, so
every request makes exactly that many; or per-request lengths from `lengths_file`) and
records TTFT, TPOT, ITL and end-to-end latency. Per level it reports what
`vllm bench serve` reports, with the same field names (`median_ttft_ms`, `p99_tpot_ms`,
`request_throughput`, `output_throughput`, ...), plus goodput under the stated SLO
(`slo_ttft_ms`, `slo_tpot_ms`) and counts of failed, short (fewer tokens than asked: left
out of the latencies), not-sent (past `max_duration_s`) and 429-answered requests. The
headline metrics are those of the lowest and the highest concurrency. Before the first
level, `warmup_requests` (default 1) requests are sent one at a time and not measured, as
`vllm bench serve` sends a test request first: a cold server's first request (lazy
compilation, CUDA graph capture, cold caches) would otherwise set the first level's tail
percentiles. A level whose every request the server refused with a 4xx other than 429 (a
prompt too long for it, a wrong model name) stops the run with that error, at the warm-up
already: such a run measures nothing, and vLLM's `bench serve` stops on its first test
request likewise. A level that completed no request (all failed or short) is a warning.
Output tokens come from the server's usage chunk, else from the generated text tokenized
by the server's /tokenize or the --tokenizer file (`loadgen.py`). Each finished level is
written to OUTPUT/levels.jsonl as it finishes (removed once results.json holds them all),
so an interrupted sweep keeps the levels it measured. What it does not do: cache anything
(every run measures afresh), load a server on another host unless `allow_remote = true`
says so (a load test is traffic its owner should expect), or run unbounded (num_prompts
and max_duration_s bound every level).

Fitting the server's context (`fit.py`): `input_len + output_len` must fit the context
length, else the run stops before sending anything with a one-line error that says so; rows
of `lengths_file` that do not fit are skipped and listed in results.json `context_fit`.
(With `endpoint = "chat"`, or a server without /tokenizer_info, prompts are `input_len`
random words, which the server may count as more tokens: a request it refuses counts as
failed.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import CapabilityError, ServerRequestError, SuiteConfigError
from ..fit import PromptFitter
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

__all__ = ["LatencyConfig", "LatencySuite"]

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# (summary field, higher is better, description) reported per headline level.
HEADLINE_FIELDS = (
    ("median_ttft_ms", False, "median time to first token, ms"),
    ("p99_ttft_ms", False, "99th percentile time to first token, ms"),
    ("median_tpot_ms", False, "median time per output token after the first, ms"),
    ("p99_tpot_ms", False, "99th percentile time per output token, ms"),
    ("median_itl_ms", False, "median inter-token latency, ms"),
    ("median_e2el_ms", False, "median end-to-end request latency, ms"),
    ("request_throughput", True, "completed requests per second"),
    ("output_throughput", True, "generated tokens per second"),
    ("request_goodput", True, "requests per second meeting the TTFT and TPOT SLOs"),
)


@dataclass(frozen=True)
class LatencyConfig:
    mode: str  # "sweep" | "poisson" | "both"
    concurrencies: tuple[int, ...]
    request_rates: tuple[float, ...]
    num_prompts: int
    input_len: int
    output_len: int
    lengths_file: str
    max_duration_s: float
    slo_ttft_ms: float
    slo_tpot_ms: float
    endpoint: str  # "completions" | "chat"
    max_context_tokens: int  # 0 = the server's max_model_len; set it for servers without one
    allow_remote: bool  # load a server that is not on this machine's loopback address
    warmup_requests: int  # unmeasured requests before the first level (0 = none)

    def validate(self) -> None:
        if self.mode not in ("sweep", "poisson", "both"):
            raise SuiteConfigError("latency: mode must be sweep, poisson or both")
        if self.mode != "poisson" and (not self.concurrencies or min(self.concurrencies) < 1):
            raise SuiteConfigError("latency: concurrencies must be integers >= 1")
        if self.mode != "sweep" and (not self.request_rates or min(self.request_rates) <= 0):
            raise SuiteConfigError("latency: request_rates must be > 0")
        if (
            self.num_prompts < 1
            or self.input_len < 1
            or self.output_len < 1
            or self.max_duration_s <= 0
        ):
            raise SuiteConfigError(
                "latency: num_prompts, input_len, output_len and max_duration_s must be > 0"
            )
        if self.endpoint not in ("completions", "chat"):
            raise SuiteConfigError("latency: endpoint must be completions or chat")
        if self.max_context_tokens < 0:
            raise SuiteConfigError("latency: max_context_tokens must be >= 0 (0 = the server's)")
        if self.warmup_requests < 0:
            raise SuiteConfigError("latency: warmup_requests must be >= 0 (0 = no warm-up)")


def require_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    if host not in LOOPBACK:
        raise SuiteConfigError(
            f"the latency suite loads only loopback servers (127.0.0.1, localhost, ::1) unless "
            f"told otherwise; to load {host!r}, a server you may load, add --set allow_remote=true"
        )


def refused_level(load: str, records: list[Any], endpoint: str) -> ServerRequestError | None:
    """The error to stop on when the server refused every request of a level as malformed.

    A 429 is an answer under load (counted, not fatal); a refusal with another 4xx means
    the run's own settings are wrong for this server, and would be again at every level.
    """
    if not records or any(r.success for r in records):
        return None
    refusals = [r for r in records if 400 <= r.status < 500 and r.status != 429]
    if len(refusals) < len(records):
        return None
    hint = (
        ' (with endpoint = "chat" prompts are input_len random words, which the server may '
        "count as many more tokens: lower input_len)"
        if endpoint == "chat"
        else ""
    )
    return ServerRequestError(
        f"latency: the server refused every request at {load}: {refusals[0].error}{hint}",
        refusals[0].status,
    )


def fit_lengths(
    cfg: LatencyConfig, lengths: list[tuple[int, int]] | None, fit: PromptFitter
) -> list[tuple[int, int]] | None:
    """Check fixed lengths against the context (an error) and drop rows that do not fit."""
    limit = fit.window.tokens
    if lengths is None:
        if limit is not None and cfg.input_len + cfg.output_len > limit:
            raise SuiteConfigError(
                f"latency: input_len {cfg.input_len} + output_len {cfg.output_len} ="
                f" {cfg.input_len + cfg.output_len} tokens do not fit the server's"
                f" {limit}-token context ({fit.window.source}); lower them, e.g."
                f" --set input_len={max(1, limit - cfg.output_len)}"
            )
        return None
    kept = []
    for row, (prompt_len, output_len) in enumerate(lengths, 1):
        key = f"{cfg.lengths_file}:{row}"
        if limit is not None and prompt_len + output_len > limit:
            fit.skip(key, f"input_len {prompt_len} + output_len {output_len} exceed {limit} tokens")
        else:
            fit.keep(key, trimmed=False)
            kept.append((prompt_len, output_len))
    if not kept:
        raise nothing_fits("latency", fit, f"rows of {cfg.lengths_file}")
    return kept


def load_lengths(path: Path) -> list[tuple[int, int]]:
    lengths = []
    for number, row in iter_jsonl(path, "latency"):
        try:
            pair = (int(row["input_len"]), int(row["output_len"]))
        except (KeyError, TypeError, ValueError):
            raise SuiteConfigError(
                f'{path}:{number}: each line must be {{"input_len": N, "output_len": M}}'
            ) from None
        if min(pair) < 1:  # as for the fixed input_len / output_len: the server would refuse it
            raise SuiteConfigError(
                f"{path}:{number}: input_len and output_len must be > 0, got {pair[0]} and {pair[1]}"
            )
        lengths.append(pair)
    return lengths


@dataclass(frozen=True)
class Level:
    key: str  # metric prefix: "c4" or "rate2"
    load: str  # human label: "concurrency 4" or "poisson 2 req/s"
    mode: str  # loadgen mode: "concurrency" | "poisson"
    concurrency: int | None
    request_rate: float | None


def levels_of(cfg: LatencyConfig) -> list[Level]:
    levels = []
    if cfg.mode in ("sweep", "both"):
        levels += [
            Level(f"c{c}", f"concurrency {c}", "concurrency", c, None)
            for c in sorted(set(cfg.concurrencies))
        ]
    if cfg.mode in ("poisson", "both"):
        levels += [
            Level(f"rate{r:g}", f"poisson {r:g} req/s", "poisson", None, r)
            for r in sorted(set(cfg.request_rates))
        ]
    return levels


def headline_levels(levels: list[Level]) -> list[Level]:
    """Lowest and highest concurrency (latency and throughput ends) and every Poisson rate."""
    sweep = [lv for lv in levels if lv.mode == "concurrency"]
    ends = [sweep[0], sweep[-1]] if sweep else []
    return list(dict.fromkeys(ends + [lv for lv in levels if lv.mode == "poisson"]))


class LatencySuite(Suite):
    name = "latency"
    description = (
        "streaming load: TTFT/TPOT/ITL/E2E p50-p99, throughput, goodput (vllm bench serve fields)"
    )
    metrics = (
        "{level}/median_ttft_ms",
        "{level}/p99_ttft_ms",
        "{level}/median_tpot_ms",
        "{level}/p99_tpot_ms",
        "{level}/median_itl_ms",
        "{level}/median_e2el_ms",
        "{level}/request_throughput",
        "{level}/output_throughput",
        "{level}/request_goodput",
        "failed",
        "short",
        "not_sent",
        "rate_limited",
    )
    metrics_note = (
        "{level}: cN for the lowest and the highest of concurrencies (c1, c8 by default) and"
        " rateR for each Poisson rate (rate2); every level's summary is in details.levels"
    )
    config_cls = LatencyConfig
    cached = False  # every run measures afresh

    def check_server(self, base_url: str, config: LatencyConfig) -> None:
        if not config.allow_remote:
            require_loopback(base_url)

    async def run(self, ctx: RunContext) -> SuiteResult:
        from atlas_server.progress import progress_bar

        from .. import loadgen

        cfg: LatencyConfig = ctx.config
        lengths = load_lengths(data_path(cfg.lengths_file)) if cfg.lengths_file else None
        lengths = fit_lengths(cfg, lengths, ctx.fit)
        num_requests = min(cfg.num_prompts, ctx.limit) if ctx.limit else cfg.num_prompts
        levels = levels_of(cfg)
        counter = OutputTokenCounter(ctx)

        def spec_for(level: Level, seed: int, requests: int) -> loadgen.LoadSpec:
            return loadgen.LoadSpec(
                base_url=ctx.client.base_url,
                model=ctx.client.model,
                mode=level.mode,
                concurrency=level.concurrency or 1,
                request_rate=level.request_rate or 1.0,
                num_requests=requests,
                max_duration_s=cfg.max_duration_s,
                prompt_tokens=cfg.input_len,
                output_tokens=cfg.output_len,
                lengths=lengths,
                endpoint=cfg.endpoint,
                seed=seed,
                api_key=ctx.client.api_key,
                slo_ttft_ms=cfg.slo_ttft_ms,
                slo_tpot_ms=cfg.slo_tpot_ms,
                count_tokens=counter.count,
            )

        # Written as each level finishes: an interrupted sweep keeps what it measured.
        levels_file = ctx.output_dir / LEVELS_FILE
        levels_file.unlink(missing_ok=True)  # an earlier interrupted run's
        warmup = await self.warm_up(ctx, cfg, spec_for)
        details_levels, samples, warnings = [], [], []
        for index, level in enumerate(levels):
            # Each level its own prompts: with one list for all, a server's prefix cache
            # served every level after the first warm (c4 showed a lower TTFT than c1), and
            # GPU servers that hold thousands of prompts more so.
            spec = spec_for(level, level_seed(ctx.seed, index), num_requests)
            with progress_bar(
                total=num_requests, desc=f"latency {level.load}", unit="req", leave=False
            ) as bar:
                records, summary = await loadgen.run_load(spec, progress=bar.update)
            refused = refused_level(level.load, records, cfg.endpoint)
            if refused is not None:
                raise refused
            if problem := measured_nothing(level.load, summary, records):
                warnings.append(problem)
            entry = {
                "load": level.load,
                "concurrency": level.concurrency,
                "request_rate": level.request_rate,
                "summary": summary,
            }
            details_levels.append(entry)
            level_samples = [{"load": level.load, **record_dict(r)} for r in records]
            samples += level_samples
            with levels_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps({**entry, "samples": level_samples}) + "\n")
        if counter.fallback:
            warnings.append(
                "the server sent no usage chunk and its output could not be tokenized"
                f" ({counter.fallback}): output tokens were counted as streamed chunks, too"
                " few where a server sends several tokens in one chunk; pass --tokenizer FILE"
            )
        levels_file.unlink(missing_ok=True)  # results.json holds every level from here on
        return SuiteResult(
            metrics=summarise(levels, details_levels),
            samples=samples,
            data_files={cfg.lengths_file: file_sha256(data_path(cfg.lengths_file))}
            if cfg.lengths_file
            else {},
            details={
                "levels": details_levels,
                "num_requests_per_level": num_requests,
                "slo": {"ttft_ms": cfg.slo_ttft_ms, "tpot_ms": cfg.slo_tpot_ms},
                "warmup": warmup,
                "output_tokens_from": counter.method(samples),
            },
            warnings=warnings,
        )

    async def warm_up(self, ctx: RunContext, cfg: LatencyConfig, spec_for) -> dict[str, Any]:
        """`warmup_requests` requests one at a time, not measured; a warm-up the server
        refused as malformed stops the run as a refused level would."""
        from .. import loadgen

        if not cfg.warmup_requests:
            return {"requests": 0}
        level = Level("warmup", "warm-up", "concurrency", 1, None)
        spec = spec_for(level, level_seed(ctx.seed, WARMUP_LEVEL), cfg.warmup_requests)
        records, summary = await loadgen.run_load(spec)
        refused = refused_level(level.load, records, cfg.endpoint)
        if refused is not None:
            raise refused
        return {
            "requests": cfg.warmup_requests,
            "completed": summary["completed"],
            "errors": summary["errors"],
        }


# The prompt seed index of the warm-up: no level's (levels count from 0).
WARMUP_LEVEL = 9_999
LEVELS_FILE = "levels.jsonl"


class OutputTokenCounter:
    """Tokens of a generated text, for streams without a usage chunk (`loadgen.py`): the
    --tokenizer file, else the server's /tokenize (not cached: the latency suite caches
    nothing). A tokenizer that is missing or answers no tokens for a non-empty text is
    given up (`fallback` says why), and loadgen counts streamed chunks instead."""

    def __init__(self, ctx: RunContext) -> None:
        self.client = ctx.client
        self.local = ctx.fit.counter.local
        self.fallback: str | None = None

    async def count(self, text: str) -> int | None:
        if self.local is not None:
            return len(self.local.encode(text))
        if self.fallback is not None:
            return None
        try:
            ids = await self.client.tokenize(text, cache=False)
        except CapabilityError:
            self.fallback = "the server has no /tokenize"
            return None
        except ServerRequestError as e:
            self.fallback = f"/tokenize failed: {str(e)[:160]}"
            return None
        if text and not ids:
            self.fallback = "/tokenize answered no tokens for a non-empty text"
            return None
        return len(ids)

    def method(self, samples: list[dict[str, Any]]) -> dict[str, int]:
        """Requests per way of counting output tokens: usage, tokenizer or chunks."""
        counts: dict[str, int] = {}
        for s in samples:
            if s["success"]:
                counts[s["tokens_from"]] = counts.get(s["tokens_from"], 0) + 1
        return counts


def measured_nothing(load: str, summary: dict[str, Any], records: list[Any]) -> str | None:
    """A warning for a level that completed no request: its throughputs are 0 and it has
    no latencies, which no one should read as a measurement."""
    if summary["completed"] or not records:
        return None
    short = [r for r in records if r.short]
    if short:
        first = short[0]
        return (
            f"no request at {load} completed: {len(short)} of {len(records)} finished with"
            f" fewer tokens than asked (e.g. {first.output_tokens} of"
            f" {first.requested_tokens}, counted by {first.tokens_from}: does the server stop"
            " at its end-of-text token despite ignore_eos?), so it has no latencies and"
            " throughput 0"
        )
    return (
        f"no request at {load} completed: all {len(records)} failed"
        f" ({summary['errors'][0] if summary['errors'] else 'no error text'})"
    )


def level_seed(seed: int, index: int) -> int:
    """The prompt seed of the index-th load level of a run seeded `seed` (distinct levels,
    distinct runs: seeds 0 and 1 share no level's prompts for fewer than 10,000 levels)."""
    return seed * 10_000 + index


def record_dict(record: Any) -> dict[str, Any]:
    return {
        "success": record.success,
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "output_tokens": record.output_tokens,
        "requested_tokens": record.requested_tokens,
        "short": record.short,
        "tokens_from": record.tokens_from,
        "token_chunks": record.token_chunks,
        "finish_reason": record.finish_reason,
        "ttft_s": record.ttft,
        "e2el_s": record.e2el,
        "tpot_s": record.tpot,
        "itl_s": record.itl,
        "error": record.error,
    }


def summarise(levels: list[Level], details: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_load = {d["load"]: d["summary"] for d in details}
    out: dict[str, dict[str, Any]] = {}
    for level in headline_levels(levels):
        summary = by_load[level.load]
        for field_name, higher, description in HEADLINE_FIELDS:
            if isinstance(summary.get(field_name), int | float):
                out[f"{level.key}/{field_name}"] = metric(
                    summary[field_name], higher, f"{description} ({level.load})"
                )
    out["failed"] = metric(
        sum(d["summary"]["failed"] for d in details),
        False,
        "failed requests, all levels",
        count=True,
    )
    out["short"] = metric(
        sum(d["summary"]["short"] for d in details),
        False,
        "requests that finished with fewer tokens than asked (left out of latencies), all levels",
        count=True,
    )
    out["not_sent"] = metric(
        sum(d["summary"]["not_sent"] for d in details),
        False,
        "requests left unsent at a level's max_duration_s, all levels",
        count=True,
    )
    out["rate_limited"] = metric(
        sum(d["summary"]["rate_limited"] for d in details),
        False,
        "HTTP 429 answers, all levels",
        count=True,
    )
    return out
