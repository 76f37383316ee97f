"""The load generator (eval_suites/loadgen.py) on streams that end early, make fewer
tokens than asked, hang, or send odd chunks; Poisson throughput; lengths_file rows.

It runs against an in-process fake server (an httpx.MockTransport whose streams advance a
fake clock), so every latency asserted here is exact and no test depends on how fast the
machine is. The one test that needs real time (a level's deadline) asserts only what
happened, never how long it took.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from eval_suites import loadgen
from eval_suites.errors import SuiteConfigError
from eval_suites.suites.latency import load_lengths


class FakeClock:
    """loadgen's clock and Poisson pause: time moves only when the fake server or a pause
    moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def pause(self, seconds: float) -> None:
        # First let the requests already started run as far as they can (the fake server
        # answers without waiting, so a few loop turns finish them), then jump the clock.
        for _ in range(50):
            await asyncio.sleep(0)
        self.now += max(0.0, seconds)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(loadgen, "clock", fake)
    monkeypatch.setattr(loadgen, "pause", fake.pause)
    return fake


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def token(text: str = "a", finish: str | None = None) -> bytes:
    return sse({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def usage(n: int) -> bytes:
    return sse({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}})


def fake_server(stream, sent: list | None = None) -> httpx.MockTransport:
    """/v1/completions answers with `stream(max_tokens)` (an async iterator of SSE bytes);
    every other route is a 404 (so prompts are words). `sent` collects request bodies."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/completions":
            return httpx.Response(404, json={"error": {"message": "no such route"}})
        body = json.loads(request.content)
        if sent is not None:
            sent.append(body)
        return httpx.Response(200, content=stream(body["max_tokens"]))

    return httpx.MockTransport(handle)


def answering_at_once(clock: FakeClock, sent_at: list[float]):
    """A stream that answers in no (fake) time, noting when each request was sent."""

    async def instant(n):
        sent_at.append(clock.now)
        for _ in range(n):
            yield token()
        yield sse("[DONE]")

    return instant


def run_level(stream, *, sent: list | None = None, **spec) -> tuple[list, dict]:
    spec = {"base_url": "http://127.0.0.1:9", "num_requests": 1, "output_tokens": 10, **spec}
    load = loadgen.run_load(loadgen.LoadSpec(**spec), transport=fake_server(stream, sent))
    # Bounded so a regression that hangs fails here instead of stalling the suite.
    return asyncio.run(asyncio.wait_for(load, 120))


# --- streams that end early or make fewer tokens than asked ------------------------------------
def test_a_stream_cut_off_without_done_or_finish_reason_is_failed(clock):
    async def cut(n):
        for _ in range(3):  # 3 of 10 tokens, then the connection just ends
            yield token()

    records, summary = run_level(cut)
    assert (summary["completed"], summary["failed"], summary["short"]) == (0, 1, 0)
    assert "ended without [DONE] or a finish_reason after 3 chunks" in records[0].error
    assert summary["median_ttft_ms"] is None and summary["output_throughput"] == 0


def test_fewer_tokens_than_asked_is_short_and_left_out_of_latencies(clock):
    async def fewer(n):
        for _ in range(n // 2):
            clock.now += 0.01
            yield token()
        yield usage(n // 2)  # honest usage: 5 of the 10 asked
        yield sse("[DONE]")

    records, summary = run_level(fewer, num_requests=2)
    assert (summary["completed"], summary["failed"], summary["short"]) == (0, 0, 2)
    assert records[0].short and (records[0].output_tokens, records[0].requested_tokens) == (5, 10)
    assert summary["median_tpot_ms"] is None and summary["request_throughput"] == 0

    async def fewer_without_usage(n):  # counted from the chunks, stopped at EOS ("stop")
        for i in range(n - 1):
            yield token(finish="stop" if i == n - 2 else None)

    records, summary = run_level(fewer_without_usage)
    assert (summary["short"], records[0].output_tokens) == (1, 9)


def test_a_full_stream_ended_by_finish_reason_alone_completes(clock):
    async def full(n):
        for i in range(n):
            yield token(finish="length" if i == n - 1 else None)

    _, summary = run_level(full)
    assert (summary["completed"], summary["failed"], summary["short"]) == (1, 0, 0)


# --- chunks with empty text are tokens -----------------------------------------------------------
def test_ttft_and_tpot_count_a_first_chunk_with_empty_text(clock):
    """Atlas streams "" for a token that ends inside a UTF-8 character: it is still the
    first token (TTFT 100 ms here, not the 300 ms of the first non-empty chunk)."""

    async def empty_first(n):
        clock.now += 0.1
        yield token("")
        for _ in range(n - 1):
            clock.now += 0.2
            yield token()
        yield usage(n)
        yield sse("[DONE]")

    records, summary = run_level(empty_first)
    assert records[0].ttft == pytest.approx(0.1)
    assert records[0].tpot == pytest.approx(0.2) and records[0].itl == pytest.approx([0.2] * 9)
    assert summary["median_ttft_ms"] == pytest.approx(100.0)

    async def empty_first_without_usage(n):  # tokens counted from the chunks
        yield token("")
        for _ in range(n - 1):
            yield token()
        yield sse("[DONE]")

    records, _ = run_level(empty_first_without_usage)
    assert records[0].output_tokens == 10 and not records[0].short  # the "" chunk counted


# --- odd-shaped chunks are failed requests, not tracebacks ---------------------------------------
@pytest.mark.parametrize(
    ("chunk", "error"),
    [
        ("[1, 2, 3]", "a stream chunk is not a JSON object: [1, 2, 3]"),
        ('{"error": "plain string error"}', "plain string error"),
        ('{"error": {"message": "boom in the middle"}}', "boom in the middle"),
        ('{"choices": "a"}', "choices are not a list of objects"),
        ('{"choices": [], "usage": {"completion_tokens": "ten"}}', "no completion_tokens count"),
        ("{not json", "JSONDecodeError"),
    ],
)
def test_an_odd_shaped_chunk_fails_its_request_with_the_error_text(clock, chunk, error):
    async def odd(n):
        yield token()
        yield sse(chunk)

    records, summary = run_level(odd)
    assert summary["failed"] == 1 and error in records[0].error
    assert error[:40] in " ".join(summary["errors"])


# --- max_duration_s bounds a level ---------------------------------------------------------------
def test_a_hung_server_is_cut_off_at_max_duration_and_unsent_requests_are_counted():
    async def hang(n):
        await asyncio.sleep(3600)
        yield token()

    # Real time (the deadline is the event loop's); only the outcome is asserted.
    records, summary = run_level(hang, num_requests=3, max_duration_s=1.0)
    assert (summary["failed"], summary["not_sent"], summary["completed"]) == (1, 2, 0)
    assert records[0].error == "cut off at max_duration_s (1 s)"


def test_poisson_arrivals_after_the_deadline_are_not_sent(clock):
    sent_at: list[float] = []
    instant = answering_at_once(clock, sent_at)

    # Gaps average 10,000 s of fake time: arrivals after 300 s are never sent, nor waited for.
    records, summary = run_level(
        instant, mode="poisson", request_rate=0.0001, num_requests=4, max_duration_s=300
    )
    assert sent_at and max(sent_at) < 300 and summary["duration"] < 300
    assert summary["not_sent"] == 4 - len(sent_at) > 0
    assert summary["completed"] == len(records) == len(sent_at)


# --- Poisson throughput --------------------------------------------------------------------------
def test_poisson_duration_ends_at_the_last_completion_not_after_an_idle_gap(clock):
    sent_at: list[float] = []
    instant = answering_at_once(clock, sent_at)

    _, summary = run_level(instant, mode="poisson", request_rate=1.0, num_requests=3)
    assert sent_at[0] == 0.0 and len(sent_at) == 3
    # Answers take no (fake) time: the level lasts from the first send to the last.
    assert summary["duration"] == pytest.approx(sent_at[-1])
    assert summary["request_throughput"] == pytest.approx(3 / sent_at[-1])


# --- lengths_file ---------------------------------------------------------------------------------
def test_lengths_file_values_below_one_name_the_file_and_line(tmp_path: Path):
    path = tmp_path / "lengths.jsonl"
    path.write_text('{"input_len": 8, "output_len": 4}\n\n{"input_len": 8, "output_len": 0}\n')
    with pytest.raises(SuiteConfigError, match=f"{path}:3: input_len and output_len must be > 0"):
        load_lengths(path)
    path.write_text('{"input_len": 8, "output_len": 4}\n{"input_len": -2, "output_len": 4}\n')
    with pytest.raises(SuiteConfigError, match=f"{path}:2: .* got -2 and 4"):
        load_lengths(path)
    path.write_text('{"input_len": 8, "output_len": 4}\n')
    assert load_lengths(path) == [(8, 4)]
