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
headline metrics are those of the lowest and the highest concurrency. A level whose every
request the server refused with a 4xx other than 429 (a prompt too long for it, a wrong
model name) stops the run with that error: such a run measures nothing, and vLLM's
`bench serve` stops on its first test request likewise. What it does not do: cache
anything (every run measures afresh), load a server on another host unless
`allow_remote = true` says so (a load test is traffic its owner should expect), or run
unbounded (num_prompts and max_duration_s bound every level).

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

from ..errors import ServerRequestError, SuiteConfigError
from ..fit import PromptFitter
from .base import RunContext, Suite, SuiteResult, data_path, file_sha256, metric, nothing_fits

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
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
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
        "median_ttft_ms",
        "p99_tpot_ms",
        "output_throughput",
        "request_goodput",
        "failed",
        "short",
        "not_sent",
    )
    config_cls = LatencyConfig

    def check_server(self, base_url: str, config: LatencyConfig) -> None:
        if not config.allow_remote:
            require_loopback(base_url)

    async def run(self, ctx: RunContext) -> SuiteResult:
        from tqdm.auto import tqdm

        from .. import loadgen

        cfg: LatencyConfig = ctx.config
        lengths = load_lengths(data_path(cfg.lengths_file)) if cfg.lengths_file else None
        lengths = fit_lengths(cfg, lengths, ctx.fit)
        num_requests = min(cfg.num_prompts, ctx.limit) if ctx.limit else cfg.num_prompts
        levels = levels_of(cfg)
        details_levels, samples = [], []
        for index, level in enumerate(levels):
            spec = loadgen.LoadSpec(
                base_url=ctx.client.base_url,
                model=ctx.client.model,
                mode=level.mode,
                concurrency=level.concurrency or 1,
                request_rate=level.request_rate or 1.0,
                num_requests=num_requests,
                max_duration_s=cfg.max_duration_s,
                prompt_tokens=cfg.input_len,
                output_tokens=cfg.output_len,
                lengths=lengths,
                endpoint=cfg.endpoint,
                # Each level its own prompts: with one list for all, a server's prefix
                # cache served every level after the first warm (c4 showed a lower TTFT
                # than c1), and GPU servers that hold thousands of prompts more so.
                seed=level_seed(ctx.seed, index),
                api_key=ctx.client.api_key,
                slo_ttft_ms=cfg.slo_ttft_ms,
                slo_tpot_ms=cfg.slo_tpot_ms,
            )
            with tqdm(
                total=num_requests, desc=f"latency {level.load}", unit="req", leave=False
            ) as bar:
                records, summary = await loadgen.run_load(spec, progress=bar.update)
            refused = refused_level(level.load, records, cfg.endpoint)
            if refused is not None:
                raise refused
            details_levels.append(
                {
                    "load": level.load,
                    "concurrency": level.concurrency,
                    "request_rate": level.request_rate,
                    "summary": summary,
                }
            )
            samples += [{"load": level.load, **record_dict(r)} for r in records]
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
            },
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
        sum(d["summary"]["failed"] for d in details), False, "failed requests, all levels"
    )
    out["short"] = metric(
        sum(d["summary"]["short"] for d in details),
        False,
        "requests that finished with fewer tokens than asked (left out of latencies), all levels",
    )
    out["not_sent"] = metric(
        sum(d["summary"]["not_sent"] for d in details),
        False,
        "requests left unsent at a level's max_duration_s, all levels",
    )
    out["rate_limited"] = metric(
        sum(d["summary"]["rate_limited"] for d in details), False, "HTTP 429 answers, all levels"
    )
    return out
