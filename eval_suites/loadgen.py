"""An async load generator for OpenAI-compatible servers, reporting like `vllm bench serve`.

What it does: sends streaming `/v1/completions` (or chat) requests to a server, either
at a fixed concurrency (a pool of workers, each sending its next request as soon as the
previous one ends) or as a Poisson process at a request rate (seeded exponential gaps),
with fixed prompt/output lengths or lengths from a list; records per request the time to
first token (TTFT), the gaps between streamed chunks (ITL), time per output token after
the first (TPOT), end-to-end latency (E2EL), token counts, errors and 429s; and
summarises them with the field names of `vllm bench serve`'s JSON (`mean_ttft_ms`,
`p99_itl_ms`, `request_throughput`, `output_throughput`, ...) so the two compare directly.
Goodput counts requests that met the stated SLO (TTFT and TPOT limits).

Prompts are random token ids when the server has `/tokenizer_info` (Atlas, vLLM), which
fixes the prompt length exactly; otherwise random words. Output length is fixed by
`max_tokens` with `ignore_eos` (honoured by Atlas and vLLM). Output tokens are counted from
the server's usage chunk (`stream_options.include_usage`), else one per content chunk.
Only loopback or explicitly given URLs are contacted; every run is bounded in requests
and time. What it does not do: plots or result files (the latency suite and bench/ do).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx

PERCENTILES = (50, 90, 99)


@dataclass
class LoadSpec:
    base_url: str
    model: str | None = None
    mode: Literal["concurrency", "poisson"] = "concurrency"
    concurrency: int = 1
    request_rate: float = 1.0  # requests/s in poisson mode
    num_requests: int = 32
    max_duration_s: float = 300.0
    prompt_tokens: int = 128
    output_tokens: int = 64
    lengths: list[tuple[int, int]] | None = None  # (prompt, output) pairs, cycled
    endpoint: Literal["completions", "chat"] = "completions"
    seed: int = 0
    api_key: str | None = None
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 200.0
    timeout_s: float = 600.0


@dataclass
class RequestRecord:
    success: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    status: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (
            (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None
        )


def _percentiles(
    values: list[float], name: str, unit_scale: float = 1000.0
) -> dict[str, float | None]:
    if not values:  # nothing measured (every request failed): null, never a 0 ms "best"
        keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
        return dict.fromkeys(keys + [f"p{p}_{name}_ms" for p in PERCENTILES])
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile does
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    out = {
        f"mean_{name}_ms": statistics.fmean(values) * unit_scale,
        f"median_{name}_ms": pct(50) * unit_scale,
        f"std_{name}_ms": (statistics.pstdev(values) if len(values) > 1 else 0.0) * unit_scale,
    }
    out.update({f"p{p}_{name}_ms": pct(p) * unit_scale for p in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration: float, spec: LoadSpec) -> dict:
    ok = [r for r in records if r.success]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [gap for r in ok for gap in r.itl]
    good = [
        r
        for r in ok
        if r.ttft * 1000 <= spec.slo_ttft_ms
        and (r.tpot is None or r.tpot * 1000 <= spec.slo_tpot_ms)
    ]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    summary = {
        "mode": spec.mode,
        "max_concurrency": spec.concurrency if spec.mode == "concurrency" else None,
        "request_rate": spec.request_rate if spec.mode == "poisson" else None,
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "rate_limited": sum(1 for r in records if r.status == 429),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "request_goodput": len(good) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
        "slo": {"ttft_ms": spec.slo_ttft_ms, "tpot_ms": spec.slo_tpot_ms},
    }
    summary.update(_percentiles([r.ttft for r in ok], "ttft"))
    summary.update(_percentiles(tpots, "tpot"))
    summary.update(_percentiles(itls, "itl"))
    summary.update(_percentiles([r.e2el for r in ok], "e2el"))
    errors = [r.error for r in records if r.error]
    summary["errors"] = sorted(set(errors))[:10]
    return summary


def _auth(spec: LoadSpec) -> dict[str, str]:
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}


async def _vocab_size(http: httpx.AsyncClient, spec: LoadSpec) -> int | None:
    # With the key: a server that wants one answers 401 without it, and the prompts would
    # fall back to words whose token count is not the asked input_len.
    try:
        url = spec.base_url.rstrip("/") + "/tokenizer_info"
        r = await http.get(url, headers=_auth(spec), timeout=10)
        return int(r.json()["vocab_size"]) if r.status_code == 200 else None
    except (httpx.HTTPError, KeyError, ValueError, json.JSONDecodeError):
        return None


def _make_prompt(rng: random.Random, n_tokens: int, vocab: int | None, chat: bool):
    if vocab and not chat:
        # Stay clear of the top ids, where special tokens usually live.
        return [
            rng.randrange(0, max(1, min(vocab, 256 if vocab <= 512 else vocab - 64)))
            for _ in range(n_tokens)
        ]
    words = ("time", "data", "model", "server", "token", "value", "list", "file", "error", "method")
    return " ".join(rng.choice(words) for _ in range(n_tokens))


async def _one(
    http: httpx.AsyncClient, spec: LoadSpec, prompt, prompt_len: int, out_len: int
) -> RequestRecord:
    url = spec.base_url.rstrip("/") + (
        "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    )
    body: dict = {
        "max_tokens": out_len,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": out_len,
        "stream_options": {"include_usage": True},
    }
    if spec.model:
        body["model"] = spec.model
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    headers = _auth(spec)
    record = RequestRecord(False, prompt_len)
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with http.stream(
            "POST", url, json=body, headers=headers, timeout=spec.timeout_s
        ) as r:
            record.status = r.status_code
            if r.status_code != 200:
                record.error = (
                    f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                )
                return record
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                    return record
                if chunk.get("usage"):
                    record.output_tokens = int(chunk["usage"]["completion_tokens"])
                    record.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                choices = chunk.get("choices") or []
                text = (
                    (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))
                    if choices
                    else None
                )
                if text:
                    now = time.perf_counter()
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.e2el = time.perf_counter() - start
    record.output_tokens = record.output_tokens or chunks
    record.success = last is not None
    if not record.success:
        record.error = "no tokens streamed"
    return record


async def run_load(spec: LoadSpec, progress=None) -> tuple[list[RequestRecord], dict]:
    """Run one load test; returns the per-request records and the summary."""
    rng = random.Random(spec.seed)
    limits = httpx.Limits(
        max_connections=max(spec.concurrency, 64),
        max_keepalive_connections=max(spec.concurrency, 64),
    )
    async with httpx.AsyncClient(limits=limits) as http:
        vocab = await _vocab_size(http, spec)
        jobs = []
        for i in range(spec.num_requests):
            p_len, o_len = (
                spec.lengths[i % len(spec.lengths)]
                if spec.lengths
                else (spec.prompt_tokens, spec.output_tokens)
            )
            jobs.append((_make_prompt(rng, p_len, vocab, spec.endpoint == "chat"), p_len, o_len))
        records: list[RequestRecord] = []
        deadline = time.perf_counter() + spec.max_duration_s
        start = time.perf_counter()

        async def run_job(job) -> None:
            if time.perf_counter() < deadline:
                records.append(await _one(http, spec, *job))
                if progress is not None:
                    progress(1)

        if spec.mode == "concurrency":
            queue: asyncio.Queue = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker() -> None:
                while not queue.empty():
                    await run_job(queue.get_nowait())

            await asyncio.gather(*[worker() for _ in range(max(1, spec.concurrency))])
        else:
            tasks = []
            for job in jobs:
                tasks.append(asyncio.create_task(run_job(job)))
                await asyncio.sleep(rng.expovariate(spec.request_rate))
                if time.perf_counter() > deadline:
                    break
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return records, summarize(records, duration, spec)


def run(spec: LoadSpec) -> dict:
    """Synchronous wrapper: the summary plus the records as plain dicts."""
    records, summary = asyncio.run(run_load(spec))
    return {"summary": summary, "records": [asdict(r) for r in records]}
