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
`max_tokens` with `ignore_eos` (honoured by Atlas and vLLM). A streamed chunk carries a
token when its choice has text (`text`, or chat's `delta.content`), even empty (a token
ending inside a UTF-8 character); a chunk that carries only a finish_reason (OpenAI sends
one after the last token) or only chat's role does not. TTFT runs to the first chunk
carrying a token, ITL is every gap between two of them. Output tokens are counted from the
server's usage chunk (`stream_options.include_usage`); without one, as `vllm bench serve`
does, by tokenizing the generated text with `LoadSpec.count_tokens` (the latency suite
passes the server's /tokenize or the --tokenizer file), since a server may bundle several
tokens in one chunk; without a tokenizer, one per chunk carrying a token. Each record says
which (`tokens_from`).

A request is `failed` when it gets an HTTP error, an error or malformed chunk, a stream that
ends without `[DONE]` or a finish_reason (cut short), or is cut off at `max_duration_s`;
it is `short` when it finished with fewer tokens than asked (a server that stops at EOS
despite `ignore_eos`): by the usage count where the server sent one; otherwise when it did
not end with finish_reason "length" (which says max_tokens was reached) and neither the
tokenizer's count nor the chunks carrying a token reach the tokens asked (re-tokenizing
generated text may merge tokens, so a count below max_tokens alone proves nothing). Only
`completed` requests (neither) enter the latencies and throughputs, so a server that makes
fewer tokens never looks faster; `not_sent` counts the requests the level's deadline left
unsent. It contacts only the URL it is given (the latency suite decides which servers may
be loaded); every run is bounded in requests and time. What it does not do: plots or
result files (the latency suite and bench/ do).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx

PERCENTILES = (50, 90, 99)
# The load generator's clock and its waits between Poisson arrivals; module attributes so a
# test can run a level on a fake clock.
clock = time.perf_counter


async def pause(seconds: float) -> None:
    await asyncio.sleep(max(0.0, seconds))


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
    # Tokens in a generated text, for streams without a usage chunk (None: cannot count,
    # the chunks carrying a token are counted instead); called after the level, untimed.
    count_tokens: Callable[[str], Awaitable[int | None]] | None = None


@dataclass
class RequestRecord:
    success: bool  # the stream finished ([DONE] or a finish_reason) without an error
    prompt_tokens: int
    output_tokens: int = 0
    requested_tokens: int = 0  # max_tokens asked (with ignore_eos: exactly what should come)
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    status: int = 0
    error: str | None = None
    # How output_tokens was counted: "usage" (the server's usage chunk), "tokenizer" (the
    # generated text re-tokenized), "chunks" (chunks carrying a token).
    tokens_from: str = "usage"
    token_chunks: int = 0  # streamed chunks that carried a token
    finish_reason: str | None = None
    text: str = ""  # the generated text (for counting; left out of `run`'s records)

    @property
    def short(self) -> bool:
        """Finished, but with fewer tokens than asked (a server that ignores ignore_eos);
        see the module docstring for a stream without a usage chunk."""
        if not self.success:
            return False
        if self.tokens_from == "usage":
            return self.output_tokens < self.requested_tokens
        if self.finish_reason == "length":  # the server says it reached max_tokens
            return False
        return max(self.output_tokens, self.token_chunks) < self.requested_tokens

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


def summarize(
    records: list[RequestRecord], duration: float, spec: LoadSpec, not_sent: int = 0
) -> dict:
    # Short requests are neither completed nor failed: their latencies and tokens are left
    # out, since fewer tokens than asked would flatter TPOT, E2E and throughput.
    ok = [r for r in records if r.success and not r.short]
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
        "failed": sum(1 for r in records if not r.success),
        "short": sum(1 for r in records if r.short),
        "not_sent": not_sent,
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


class StreamError(Exception):
    """A streamed chunk that ends its request as failed; the message is the record's error."""


def _chunk(data: str) -> dict:
    """One `data:` payload as a dict, or StreamError naming what the server sent instead."""
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise StreamError(f"a stream chunk is not a JSON object: {data[:120]}")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else None
        raise StreamError(str(message or error)[:200])
    choices = chunk.get("choices")
    if choices is not None and not (
        isinstance(choices, list) and all(isinstance(c, dict) for c in choices)
    ):
        raise StreamError(f"a stream chunk's choices are not a list of objects: {data[:120]}")
    usage = chunk.get("usage")
    if usage and not (isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int)):
        raise StreamError(f"a stream chunk's usage has no completion_tokens count: {data[:120]}")
    return chunk


def token_text(choice: dict) -> str | None:
    """The text a streamed choice carries ("" for a token that ends inside a UTF-8
    character), or None when it carries no token: only a finish_reason (OpenAI's last
    chunk), or a chat delta with only the role (OpenAI's and vLLM's first chunk) or no
    text at all."""
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat
        parts = [v for k in ("content", "reasoning_content") if isinstance(v := delta.get(k), str)]
        text = "".join(parts)
        if not text and ("role" in delta or not parts):
            return None
    else:
        raw = choice.get("text")
        text = raw if isinstance(raw, str) else ""
    if not text and choice.get("finish_reason"):
        return None
    return text


async def _one(
    http: httpx.AsyncClient, spec: LoadSpec, record: RequestRecord, prompt, out_len: int
) -> None:
    """Stream one request, filling `record` as chunks arrive (so a request cut off at the
    level's deadline keeps what it had)."""
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
    start = clock()
    last = None
    chunks = 0  # chunks carrying a choice
    usage_tokens = None
    texts: list[str] = []
    finished = False  # [DONE] or a finish_reason seen: the server ended the stream on purpose
    try:
        async with http.stream(
            "POST", url, json=body, headers=headers, timeout=spec.timeout_s
        ) as r:
            record.status = r.status_code
            if r.status_code != 200:
                record.error = (
                    f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                )
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    continue
                chunk = _chunk(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                    if isinstance(chunk["usage"].get("prompt_tokens"), int):
                        record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if choices := chunk.get("choices"):
                    chunks += 1
                    for choice in choices:
                        if choice.get("finish_reason"):
                            record.finish_reason = str(choice["finish_reason"])
                            finished = True
                    carried = [t for c in choices if (t := token_text(c)) is not None]
                    if not carried:
                        continue  # a finish-only or role-only chunk: no token, not timed
                    # A chunk carrying a token, its text empty or not (Atlas streams "" for a
                    # token that ends inside a UTF-8 character), as `vllm bench serve`
                    # times them: else TTFT waits for the next non-empty one.
                    now = clock()
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    record.token_chunks += 1
                    texts += carried
    except (httpx.HTTPError, json.JSONDecodeError, StreamError) as e:
        record.error = str(e) if isinstance(e, StreamError) else f"{type(e).__name__}: {e}"
        record.output_tokens, record.tokens_from = record.token_chunks, "chunks"
        return
    record.e2el = clock() - start
    record.text = "".join(texts)
    if usage_tokens is not None:
        record.output_tokens, record.tokens_from = usage_tokens, "usage"
    else:  # counted again from the text after the level, where a tokenizer is given
        record.output_tokens, record.tokens_from = record.token_chunks, "chunks"
    if not finished:
        record.error = f"the stream ended without [DONE] or a finish_reason after {chunks} chunks"
    elif last is None:
        record.error = "no tokens streamed"
    else:
        record.success = True


async def count_output_tokens(records: list[RequestRecord], spec: LoadSpec) -> None:
    """Output tokens of finished streams without a usage chunk, from their generated text
    (`spec.count_tokens`), as `vllm bench serve` counts them; a count that cannot be made
    (None) leaves the chunk count."""
    if spec.count_tokens is None:
        return
    todo = [r for r in records if r.success and r.tokens_from == "chunks"]
    counts = await asyncio.gather(*(spec.count_tokens(r.text) for r in todo))
    for record, count in zip(todo, counts, strict=True):
        if count is not None:
            record.output_tokens, record.tokens_from = count, "tokenizer"


async def run_load(
    spec: LoadSpec, progress=None, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[list[RequestRecord], dict]:
    """Run one load test; returns the per-request records and the summary.

    The level ends at `max_duration_s` after its first request: requests still streaming
    then are cancelled and recorded as failed, and requests not yet sent are not sent (the
    summary's `not_sent`). The duration that throughputs divide by runs from the first
    request sent to the last one finished (or cut off).
    """
    rng = random.Random(spec.seed)
    limits = httpx.Limits(
        max_connections=max(spec.concurrency, 64),
        max_keepalive_connections=max(spec.concurrency, 64),
    )
    # `transport`: an in-process fake server in tests; None is the network.
    async with httpx.AsyncClient(limits=limits, transport=transport) as http:
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
        start = clock()
        deadline = start + spec.max_duration_s

        async def run_job(job) -> None:
            prompt, p_len, o_len = job
            if clock() >= deadline:
                return  # never sent: counted in the summary's not_sent
            record = RequestRecord(False, p_len, requested_tokens=o_len)
            try:
                await asyncio.wait_for(_one(http, spec, record, prompt, o_len), deadline - clock())
            except asyncio.TimeoutError:  # the level's deadline, not httpx's (caught in _one)
                record.success = False
                record.error = f"cut off at max_duration_s ({spec.max_duration_s:g} s)"
            records.append(record)
            if progress is not None:
                progress(1)

        if spec.mode == "concurrency":
            queue: asyncio.Queue = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker() -> None:
                while not queue.empty() and clock() < deadline:
                    await run_job(queue.get_nowait())

            await asyncio.gather(*[worker() for _ in range(max(1, spec.concurrency))])
        else:
            # Send times from seeded exponential gaps, the first request at once; no wait
            # after the last one (it would count as idle time in the throughputs).
            tasks, send_at = [], start
            for i, job in enumerate(jobs):
                if i:
                    send_at += rng.expovariate(spec.request_rate)
                    if send_at >= deadline:
                        break
                    await pause(send_at - clock())
                tasks.append(asyncio.create_task(run_job(job)))
            await asyncio.gather(*tasks)
        duration = clock() - start
    await count_output_tokens(records, spec)  # after the clock stopped: never timed
    return records, summarize(records, duration, spec, not_sent=len(jobs) - len(records))


def run(spec: LoadSpec) -> dict:
    """Synchronous wrapper: the summary plus the records as plain dicts (without texts)."""
    records, summary = asyncio.run(run_load(spec))
    return {
        "summary": summary,
        "records": [{k: v for k, v in asdict(r).items() if k != "text"} for r in records],
    }
