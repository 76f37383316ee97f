"""Fixes from the QA review of the eval suites (/tmp/qa_eval.md): generation/perplexity data
errors, servers whose /tokenize answers no tokens, latency token counting without a usage
chunk, warm-up, interrupted sweeps, 5xx retries, compare and retrieval names, counts.

Everything runs against small in-test fake servers (a stdlib HTTP server, or an httpx
MockTransport whose streams advance loadgen's fake clock, from test_loadgen_guards), so no
model is loaded, every exact latency comes from the fake clock, and nothing asserts how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import JSONHandler
from test_loadgen_guards import FakeClock, run_level, sse, token
from typer.testing import CliRunner

from eval_suites import client as client_module
from eval_suites import loadgen
from eval_suites.cli import app
from eval_suites.client import OpenAIClient
from eval_suites.compare import markdown_tables
from eval_suites.errors import ServerRequestError, ServerUnreachableError, SuiteConfigError
from eval_suites.results import format_value, load_results, write_run
from eval_suites.runner import RunOptions, run_suite
from eval_suites.suites import SUITES
from eval_suites.suites.perplexity import load_documents

RUNNER = CliRunner()


def invoke(*args) -> object:
    return RUNNER.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The CLI printed exactly one `error: ...` line, exit 1, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    tracebacks = "Traceback" in result.output
    assert len(lines) == 1 and not tracebacks, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """loadgen's clock, moved only by the fake streams (as in test_loadgen_guards)."""
    fake = FakeClock()
    monkeypatch.setattr(loadgen, "clock", fake)
    monkeypatch.setattr(loadgen, "pause", fake.pause)
    return fake


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """Retries of 5xx answers wait 0 s here (the waits are the client's, not the test's)."""
    monkeypatch.setattr(client_module, "ERROR_BACKOFF_S", 0.0, raising=False)


# --- a fake OpenAI-compatible server -----------------------------------------------------------
class FakeServer(JSONHandler):
    """Completions (plain, echo + logprobs, streamed), chat (streamed), /tokenize (one token
    per UTF-8 byte), /tokenizer_info. Class attributes set by `fake_server` shape it."""

    protocol_version = "HTTP/1.1"
    max_model_len = 4096
    tokenize = "bytes"  # "bytes" | "empty" (200 with no tokens) | "missing" (404)
    usage = True  # streams end with a usage chunk
    per_chunk = 1  # tokens per streamed chunk
    finish_alone = False  # finish_reason in an empty chunk of its own (OpenAI's shape)
    role_chunk = False  # chat: a first chunk with only the role
    stop_at: int | None = None  # streams stop (finish_reason "stop") after this many tokens
    fail_after: int | None = None  # completions answered before every later one is a 500
    fail_every: int | None = None  # every N-th completion (1-based) is a 500
    refuse_streams = False  # streamed requests get a 400 ("maximum context length")
    posts: list[tuple[str, dict]]

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(
                {"data": [{"id": "fake", "object": "model", "max_model_len": self.max_model_len}]}
            )
        elif self.path == "/tokenizer_info":
            self.reply({"vocab_size": 257, "eos_token_id": 256, "bos_token_id": 256})
        else:
            self.status(404, {"error": {"message": "not found"}})

    def status(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        cls = type(self)
        cls.posts.append((self.path, body))
        if self.path == "/tokenize":
            if self.tokenize == "missing":
                return self.status(404, {"error": {"message": "not found"}})
            if self.tokenize == "empty":
                return self.reply({"tokens": []})
            text = body.get("prompt")
            if text is None:
                text = "".join(f"<{m['role']}>{m['content']}" for m in body["messages"])
            return self.reply({"tokens": list(text.encode())})
        answered = [p for p, _ in cls.posts if p != "/tokenize"]
        if (self.fail_after is not None and len(answered) > self.fail_after) or (
            self.fail_every and len(answered) % self.fail_every == 0
        ):
            return self.status(500, {"error": {"message": "internal boom"}})
        if body.get("stream") and self.refuse_streams:
            return self.status(400, {"error": {"message": "maximum context length exceeded"}})
        if body.get("stream"):
            return self.stream(body, chat=self.path.endswith("chat/completions"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            ids = prompt[0]
            logprobs = [None] + [-0.5] * (len(ids) - 1) + [-0.1]
            choice = {"index": 0, "text": "x", "logprobs": {"token_logprobs": logprobs}}
        else:
            choice = {"index": 0, "text": " What is it?", "finish_reason": "stop"}
        self.reply({"choices": [choice]})

    def stream(self, body: dict, chat: bool) -> None:
        n = body["max_tokens"] if self.stop_at is None else min(self.stop_at, body["max_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def send(payload) -> None:
            raw = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {raw}\n\n".encode())
            self.wfile.flush()

        def choice(text: str, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

        reason = "length" if self.stop_at is None else "stop"
        if chat and self.role_chunk:
            send(choice("", None, role=True))
        sent = 0
        while sent < n:
            k = min(self.per_chunk, n - sent)
            sent += k
            last = sent == n and not self.finish_alone
            send(choice("a" * k, reason if last else None))
        if self.finish_alone:
            send(choice("", reason))
        if self.usage:
            send({"choices": [], "usage": {"prompt_tokens": 16, "completion_tokens": n}})
        send("[DONE]")
        self.close_connection = True


class Posts(list):
    """The requests a fake server got, as (path, body); `.handler` reshapes the server."""

    handler: type[FakeServer]


@contextlib.contextmanager
def fake_server(**shape) -> Iterator[tuple[str, Posts]]:
    handler = type("Shaped", (FakeServer,), {**shape, "posts": Posts()})
    handler.posts.handler = handler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.posts
    finally:
        server.shutdown()
        server.server_close()


def completions(posts) -> list[dict]:
    return [body for path, body in posts if path.endswith("/completions")]


LATENCY = ("mode='sweep'", "concurrencies=[1]", "num_prompts=3", "input_len=8", "output_len=6")


def latency_run(tmp_path: Path, url: str, *overrides: str, name: str = "lat") -> dict:
    out = run_suite(
        RunOptions(
            suite="latency",
            base_url=url,
            output=tmp_path / name,
            use_cache=False,
            overrides=(*LATENCY, *overrides),
        )
    )
    results = json.loads((out / "results.json").read_text())
    results["_samples"] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    results["_dir"] = out
    return results


# --- A1 / D1: generation and perplexity data files name FILE:LINE and the key --------------------
@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"txt": "hello"}'], ":1 lacks id, question, paragraph"),
        (['{"id": "x", "question": "q"}'], ":1 lacks paragraph"),
        (
            [
                '{"id": "a", "question": "q", "paragraph": "p"}',
                '{"id": "b", "question": "q", "paragraph": 3}',
            ],
            ":2: paragraph is not a string",
        ),
        (
            [
                '{"id": "a", "question": "q", "paragraph": "p"}',
                '{"id": "a", "question": "r", "paragraph": "s"}',
            ],
            ":2: id 'a' repeats line 1",
        ),
        (['{"id": "a", "question": "q", "paragraph": "p"}', "{bad"], ":2 is not JSON"),
        (["[1, 2]"], ":1 is not a JSON object"),
    ],
)
def test_a_bad_generation_record_is_one_line_naming_file_line_and_key(tmp_path, lines, needle):
    data = tmp_path / "faq.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # Through the CLI: one line, exit 1, and not one generation request sent.
    with fake_server() as (url, posts):
        result = invoke(
            "run",
            "generation",
            "--base-url",
            url,
            "--set",
            f"data={data}",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    one_line_error(result, f"{data}{needle}")
    assert completions(posts) == [] and not (tmp_path / "r").exists()
    from eval_suites.suites.generation import load_records

    with pytest.raises(SuiteConfigError) as e:
        load_records(data)
    assert str(e.value).startswith("generation: ") and f"{data}{needle}" in str(e.value)


def test_generation_records_with_integer_ids_are_read_as_strings(tmp_path):
    from eval_suites.suites.generation import load_records

    data = tmp_path / "faq.jsonl"
    data.write_text('{"id": 7, "question": "Why?", "paragraph": "Because."}\n')
    assert load_records(data) == [{"id": "7", "question": "Why?", "paragraph": "Because."}]


def test_a_malformed_perplexity_line_names_the_file_and_its_line(tmp_path):
    data = tmp_path / "bad5.jsonl"
    data.write_text('{"text": "a"}\n{bad\n')
    with pytest.raises(SuiteConfigError, match=re.escape(f"perplexity: {data}:2 is not JSON")):
        load_documents(data, None)
    with fake_server() as (url, _):
        result = invoke(
            "run",
            "perplexity",
            "--base-url",
            url,
            "--set",
            f"data={data}",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    one_line_error(result, f"{data}:2 is not JSON")
    data.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(SuiteConfigError, match="is not UTF-8 text"):
        load_documents(data, None)


# --- A2: no tokens is an error, not a ZeroDivisionError ----------------------------------------------
def test_perplexity_against_a_tokenize_that_answers_no_tokens_is_one_line(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello world"}\n{"id": "two", "text": "more text"}\n')
    with fake_server(tokenize="empty") as (url, posts):
        result = invoke(
            "run",
            "perplexity",
            "--base-url",
            url,
            "--set",
            f"data={data}",
            "--set",
            "window=16",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    one_line_error(
        result,
        "/tokenize returned no tokens for 2 non-empty text(s)",
        f"line-1 ({data}:1)",
        "--tokenizer FILE",
    )
    assert completions(posts) == []  # no window scored, no probe


def test_perplexity_of_only_empty_texts_is_one_line(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text('{"text": ""}\n')
    with fake_server() as (url, _):
        result = invoke(
            "run",
            "perplexity",
            "--base-url",
            url,
            "--set",
            f"data={data}",
            "--set",
            "window=16",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    one_line_error(result, "no document has any tokens")


def test_generation_against_a_tokenize_that_answers_no_tokens_warns_of_the_estimate(tmp_path):
    """The prompts are fitted with the byte estimate (an upper bound: safe), and the run
    says so instead of passing silently."""
    with fake_server(tokenize="empty", max_model_len=400) as (url, _):
        result = invoke(
            "run",
            "generation",
            "--base-url",
            url,
            "--limit",
            "2",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    assert result.exit_code == 0, result.output
    assert "warning: prompts were fitted to the context with an estimate" in result.stderr
    assert "answered 0 tokens for a non-empty prompt" in result.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["warnings"] and "estimate" in results["context_fit"]["token_counter"]


# --- A5 / C2 / D4: output tokens without a usage chunk ------------------------------------------------
async def one_token_per_byte(text: str) -> int:
    return len(text.encode())


def test_bundled_tokens_without_usage_are_counted_by_the_tokenizer(clock):
    async def bundled(n):  # 2 tokens a chunk, no usage chunk
        for i in range(0, n, 2):
            clock.now += 0.04
            yield token("aa", finish="length" if i + 2 >= n else None)
        yield sse("[DONE]")

    # Without a tokenizer the chunks are counted, but a stream the server ended at
    # max_tokens ("length") is not short: it was every request, and throughput 0.
    records, summary = run_level(bundled)
    assert (summary["short"], summary["completed"], records[0].output_tokens) == (0, 1, 5)
    assert records[0].tokens_from == "chunks"
    # With the suite's tokenizer, the tokens of the generated text, as vllm bench serve.
    records, summary = run_level(bundled, num_requests=2, count_tokens=one_token_per_byte)
    assert [r.output_tokens for r in records] == [10, 10]
    assert records[0].tokens_from == "tokenizer" and records[0].token_chunks == 5
    assert (summary["completed"], summary["short"]) == (2, 0)
    assert summary["output_throughput"] > 0 and summary["median_tpot_ms"] == pytest.approx(
        (0.2 - 0.04) / 9 * 1000
    )


def test_a_finish_reason_in_its_own_chunk_is_no_token(clock):
    """OpenAI's stream shape: the last chunk has only the finish_reason. Counted as a token
    it gave 11 of 10 tokens, one extra ITL of 0 ms and a TPOT 10% low."""

    async def finish_alone(n):
        clock.now += 0.1
        yield token()
        for _ in range(n - 1):
            clock.now += 0.02
            yield token()
        yield token("", finish="length")  # at once after the last token
        yield sse("[DONE]")

    records, _ = run_level(finish_alone)  # without a tokenizer: the chunks carrying a token
    assert records[0].output_tokens == 10
    assert records[0].itl == pytest.approx([0.02] * 9)
    assert records[0].tpot == pytest.approx(0.02) and records[0].tokens_from == "chunks"
    records, _ = run_level(finish_alone, count_tokens=one_token_per_byte)
    assert records[0].output_tokens == 10 and not records[0].short
    assert records[0].finish_reason == "length" and records[0].tpot == pytest.approx(0.02)


def test_a_chat_role_only_first_chunk_is_no_token(clock):
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(404, json={})
        n = json.loads(request.content)["max_tokens"]

        async def stream():
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            clock.now += 0.1
            for i in range(n):
                clock.now += 0.02 if i else 0.0
                delta = {"content": "b"}
                yield sse(
                    {
                        "choices": [
                            {
                                "index": 0,
                                "delta": delta,
                                "finish_reason": "length" if i == n - 1 else None,
                            }
                        ]
                    }
                )
            yield sse("[DONE]")

        return httpx.Response(200, content=stream())

    spec = loadgen.LoadSpec(
        base_url="http://127.0.0.1:9", endpoint="chat", num_requests=1, output_tokens=10
    )
    records, _ = asyncio.run(loadgen.run_load(spec, transport=httpx.MockTransport(handle)))
    assert records[0].ttft == pytest.approx(0.1)  # the first content, not the role chunk
    assert (records[0].output_tokens, len(records[0].itl)) == (10, 9)
    assert records[0].tpot == pytest.approx(0.02)


def test_the_latency_suite_counts_tokens_of_servers_without_usage(tmp_path):
    """End to end through a real socket: bundled chunks (3 tokens each) and a separate
    finish chunk, no usage; the suite's tokenizer is the server's /tokenize."""
    with fake_server(usage=False, per_chunk=3, finish_alone=True) as (url, posts):
        results = latency_run(tmp_path, url)
    streamed = [b for b in completions(posts) if b.get("stream")]
    assert streamed and all(b["stream_options"] == {"include_usage": True} for b in streamed)
    level = results["details"]["levels"][0]["summary"]
    assert (level["completed"], level["short"], level["total_output_tokens"]) == (3, 0, 18)
    assert results["metrics"]["c1/output_throughput"]["value"] > 0
    assert results["details"]["output_tokens_from"] == {"tokenizer": 3}
    assert all(s["token_chunks"] == 2 and s["output_tokens"] == 6 for s in results["_samples"])
    assert results["warnings"] == []
    tokenized = [b for p, b in posts if p == "/tokenize"]
    assert tokenized and all(b["add_special_tokens"] is False for b in tokenized)
    assert results["cache"] is None  # --no-cache here; nothing of latency is cached anyway


def test_without_usage_or_tokenizer_the_chunks_are_counted_with_a_warning(tmp_path):
    with fake_server(usage=False, tokenize="missing") as (url, _):
        results = latency_run(tmp_path, url)
    assert results["details"]["output_tokens_from"] == {"chunks": 3}
    assert len(results["warnings"]) == 1 and "no usage chunk" in results["warnings"][0]


def test_a_level_where_every_request_is_short_warns_on_stderr(tmp_path):
    with fake_server(stop_at=2) as (url, _):
        result = invoke(
            "run",
            "latency",
            "--base-url",
            url,
            "--no-cache",
            "-o",
            tmp_path / "r",
            *[a for o in LATENCY for a in ("--set", o)],
        )
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: "))
    assert "no request at concurrency 1 completed: 3 of 3 finished with fewer tokens" in warning
    assert "e.g. 2 of 6" in warning
    assert "**warning: no request at concurrency 1" in (tmp_path / "r" / "report.md").read_text()


# --- C1: warm-up --------------------------------------------------------------------------------------
def test_one_unmeasured_warmup_request_goes_before_the_first_level(tmp_path):
    with fake_server() as (url, posts):
        results = latency_run(tmp_path, url)
    streamed = [b for b in completions(posts) if b.get("stream")]
    assert len(streamed) == 4 and len(results["_samples"]) == 3  # 1 warm-up + 3 measured
    assert streamed[0]["prompt"] not in [b["prompt"] for b in streamed[1:]]
    assert results["details"]["warmup"] == {"requests": 1, "completed": 1, "errors": []}
    with fake_server() as (url, posts):
        results = latency_run(tmp_path, url, "warmup_requests=0", name="cold")
    assert len([b for b in completions(posts) if b.get("stream")]) == 3
    assert results["details"]["warmup"] == {"requests": 0}
    with pytest.raises(SuiteConfigError, match="warmup_requests must be >= 0"):
        latency_run(tmp_path, url, "warmup_requests=-1", name="bad")


def test_a_warmup_the_server_refuses_stops_the_run_before_any_level(tmp_path):
    refused = pytest.raises(ServerRequestError, match="refused every request at warm-up: HTTP 400")
    with fake_server(refuse_streams=True) as (url, posts), refused:
        latency_run(tmp_path, url)
    assert len([b for b in completions(posts) if b.get("stream")]) == 1


# --- B1: Ctrl-C during latency; a server that fails mid-run in a cached suite -----------------------
def test_ctrl_c_in_a_latency_sweep_keeps_the_finished_levels_and_claims_no_cache(
    tmp_path, monkeypatch
):
    real = loadgen.run_load
    calls = []

    async def interrupted_at_the_second_level(spec, *args, **kwargs):
        calls.append(spec)
        if len(calls) == 3:  # the warm-up, concurrency 1, then Ctrl-C in concurrency 2
            raise KeyboardInterrupt
        return await real(spec, *args, **kwargs)

    monkeypatch.setattr(loadgen, "run_load", interrupted_at_the_second_level)
    out = tmp_path / "lint"
    sets = [
        "--set",
        "mode='sweep'",
        "--set",
        "concurrencies=[1,2]",
        "--set",
        "num_prompts=2",
        "--set",
        "input_len=8",
        "--set",
        "output_len=4",
    ]
    with fake_server() as (url, _):
        result = invoke("run", "latency", "--base-url", url, "-o", out, *sets)
    assert result.exit_code == 130, result.output
    assert "response cache" not in result.stderr
    assert "the latency suite caches nothing: a rerun measures everything again" in result.stderr
    assert f"the 1 load level(s) that finished are in {out / 'levels.jsonl'}" in result.stderr
    levels = [json.loads(x) for x in (out / "levels.jsonl").read_text().splitlines()]
    assert [lv["load"] for lv in levels] == ["concurrency 1"]
    assert levels[0]["summary"]["completed"] == 2 and len(levels[0]["samples"]) == 2
    # A finished run leaves no levels.jsonl beside results.json.
    monkeypatch.setattr(loadgen, "run_load", real)
    with fake_server() as (url, _):
        result = invoke("run", "latency", "--base-url", url, "-o", out, *sets)
    assert result.exit_code == 0, result.output
    assert not (out / "levels.jsonl").exists() and (out / "results.json").is_file()


def test_a_server_failing_mid_run_says_the_answers_so_far_are_cached(tmp_path):
    cache = tmp_path / "cache.sqlite"
    args = ["--limit", "3", "--concurrency", "1", "--cache", cache, "-o", tmp_path / "r"]
    with fake_server(fail_after=2) as (url, posts):
        result = invoke("run", "generation", "--base-url", url, *args)
        one_line_error(
            result,
            "HTTP 500 (after 3 retries): internal boom",
            "the 2 answer(s) received so far are in the response cache: rerun the same"
            " command to continue",
        )
        assert len(completions(posts)) >= 2 + 4  # two answers, then a failing one 4 times
        posts.handler.fail_after = None  # the server is back: a rerun asks only the rest
        posts.clear()
        result = invoke("run", "generation", "--base-url", url, *args)
        assert result.exit_code == 0, result.output
        assert len(completions(posts)) == 4
    cached = json.loads((tmp_path / "r" / "results.json").read_text())["cache"]
    assert (cached["hits"], cached["misses"]) == (2, 4)


# --- C6: retries of 5xx and connection resets --------------------------------------------------------
def client_answering(answers: list) -> tuple[OpenAIClient, list]:
    """An OpenAIClient whose transport plays `answers` in turn: a status code or an
    exception to raise."""
    seen: list = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer = answers[min(len(seen), len(answers) - 1)]
        seen.append(request.url.path)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"data": [], "error": {"message": f"status {answer}"}})

    client = OpenAIClient("http://127.0.0.1:9")
    client._http = httpx.AsyncClient(
        base_url=client.base_url, transport=httpx.MockTransport(handle)
    )
    return client, seen


def ask(client: OpenAIClient):
    async def go():
        async with client:
            return await client.request("GET", "/v1/models")

    return asyncio.run(go())


@pytest.mark.parametrize(
    "first",
    [500, 504, 520, httpx.RemoteProtocolError("Server disconnected"), httpx.ReadError("reset")],
)
def test_a_5xx_or_a_reset_connection_is_retried(first):
    client, seen = client_answering([first, first, 200])
    assert ask(client) == {"data": [], "error": {"message": "status 200"}}
    assert len(seen) == 3


def test_retries_of_errors_are_bounded_and_the_error_says_so():
    client, seen = client_answering([500])
    with pytest.raises(ServerRequestError, match=r"HTTP 500 \(after 3 retries\): status 500"):
        ask(client)
    assert len(seen) == 4  # lm-evaluation-harness's 3 retries
    client, seen = client_answering([httpx.ConnectError("refused")])  # nothing listens
    with pytest.raises(ServerUnreachableError, match="cannot reach"):
        ask(client)
    assert len(seen) == 1
    client, seen = client_answering([400])  # the request's own fault: not retried
    with pytest.raises(ServerRequestError, match="HTTP 400: status 400"):
        ask(client)
    assert len(seen) == 1


def test_a_server_that_fails_now_and_then_no_longer_ends_the_run(tmp_path):
    with fake_server(fail_every=3) as (url, posts):
        result = invoke(
            "run",
            "generation",
            "--base-url",
            url,
            "--limit",
            "3",
            "--concurrency",
            "1",
            "--no-cache",
            "-o",
            tmp_path / "r",
        )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "results.json").is_file()
    assert len(completions(posts)) == 6 + 2  # 6 items, 2 of them asked twice


# --- C3: compare and tokenizers -----------------------------------------------------------------------
def perplexity_run(folder: Path, tokens: int, token_ppl: float, bpb: float) -> Path:
    metric = lambda v: {"value": v, "higher_is_better": False, "description": ""}  # noqa: E731
    results = {
        "suite": "perplexity",
        "metrics": {
            "token_perplexity": metric(token_ppl),
            "bits_per_byte": metric(bpb),
            "word_perplexity": metric(bpb * 10),
            "nll": metric(bpb * 100),
        },
        "details": {"counts": {"tokens": tokens, "bytes": 6435, "words": 900}},
        "config": {"data": "perplexity/python_whatsnew.jsonl", "window": 0},
        "data": {"perplexity/python_whatsnew.jsonl": "ab" * 32},
        "run": {"seed": 0, "limit": None, "duration_s": 1.0, "started_at": "t"},
        "server": {"base_url": "http://127.0.0.1:1", "model": folder.name},
    }
    write_run(folder, results, [])
    return folder


def row(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |"))


def test_compare_marks_no_best_token_perplexity_between_different_tokenizers(tmp_path):
    a = load_results(perplexity_run(tmp_path / "atlas", 3012, 460.6, 2.0))
    b = load_results(perplexity_run(tmp_path / "fake", 6435, 1.57, 2.5))
    table = markdown_tables([a, b], ["atlas", "fake"])
    assert "**" not in row(table, "token_perplexity")
    assert "**2.0000**" in row(table, "bits_per_byte") and "**" in row(table, "word_perplexity")
    assert "No best token_perplexity marked" in table and "(3,012 vs 6,435)" in table
    same = load_results(perplexity_run(tmp_path / "same", 3012, 400.0, 1.9))
    table = markdown_tables([a, same], ["atlas", "same"])
    assert "**400.0000**" in row(table, "token_perplexity") and "No best token" not in table


# --- C5: retrieval metrics are named after the cutoff applied -----------------------------------------
class FakeRAG(JSONHandler):
    """Atlas's RAG routes, enough for the retrieval suite: every document is one chunk, and
    /v1/retrieve ranks the corpus in its file order (top_k of it)."""

    docs: list[dict] = []

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply({"data": [{"id": "fake", "object": "model"}]})
        else:
            self.reply({"data": []})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/documents"):
            FakeRAG.docs = body["documents"]
            n = len(body["documents"])
            self.reply({"chunks": n, "embedded": n, "total": n})
        else:
            chunks = [{"id": f"c{i}", "source": d["source"]} for i, d in enumerate(FakeRAG.docs)]
            self.reply({"data": chunks[: body["top_k"]]})


def test_retrieval_metrics_are_named_after_top_k(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"doc {s}", "source": s}) + "\n" for s in "abcdef")
    )
    questions = tmp_path / "questions.jsonl"
    rows = [("q1", ["b"], "dev"), ("q2", ["e"], "test")]
    questions.write_text(
        "".join(
            json.dumps({"id": i, "question": i, "relevant": r, "split": s}) + "\n"
            for i, r, s in rows
        )
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRAG)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def run(top_k: int) -> dict:
        out = run_suite(
            RunOptions(
                suite="retrieval",
                base_url=url,
                use_cache=False,
                output=tmp_path / f"k{top_k}",
                overrides=(f"corpus={corpus}", f"questions={questions}", f"top_k={top_k}"),
            )
        )
        return {k: v["value"] for k, v in load_results(out)["metrics"].items()}

    try:
        three, default = run(3), run(10)
    finally:
        server.shutdown()
    # top_k = 3: "b" at rank 2, "e" not retrieved; nothing is called @10.
    assert set(three) == {
        "ndcg_at_3",
        "recall_at_3",
        "mrr",
        "dev_ndcg_at_3",
        "dev_recall_at_3",
        "dev_mrr",
        "test_ndcg_at_3",
        "test_recall_at_3",
        "test_mrr",
    }
    assert three["ndcg_at_3"] == pytest.approx((1 / math.log2(3)) / 2)
    assert three["recall_at_3"] == 0.5 and three["mrr"] == pytest.approx(0.25)
    # The default top_k = 10 keeps the names docs/rag.md and docs/evaluation.md quote.
    assert {"ndcg_at_10", "recall_at_10", "test_ndcg_at_10"} <= set(default)
    assert default["mrr"] == pytest.approx((1 / 2 + 1 / 5) / 2)


def test_ndcg_and_recall_at_10_equal_the_ranking_plugins():
    from eval_suites.metrics import load_metric
    from eval_suites.suites.retrieval import score_rankings

    ranked = [["a", "b", "c"], ["x", "y"], list("pqrstuvwxyzab"), []]
    relevant = [{"b"}, {"z", "y"}, {"z", "a", "b"}, {"a"}]
    ours = score_rankings(ranked, relevant, 10)
    plugin = load_metric("ndcg").compute_ranking(ranked, relevant).scores["ndcg@10"]
    assert ours["ndcg_at_10"] == pytest.approx(plugin, rel=1e-12)
    plugin = load_metric("recall_at_k").compute_ranking(ranked, relevant).scores["recall@10"]
    assert ours["recall_at_10"] == pytest.approx(plugin, rel=1e-12)


# --- D2: `atlas-eval list` names latency metrics as results do -----------------------------------
def test_list_shows_the_latency_metric_patterns_that_results_use(tmp_path):
    from eval_suites.suites.latency import Level, summarise

    listing = invoke("list")
    assert "{level}/median_ttft_ms" in listing.output
    levels = [
        Level("c1", "concurrency 1", "concurrency", 1, None),
        Level("rate2", "poisson 2 req/s", "poisson", None, 2.0),
    ]
    summary = {
        "failed": 0,
        "short": 0,
        "not_sent": 0,
        "rate_limited": 0,
        "median_ttft_ms": 1.0,
        "p99_tpot_ms": 2.0,
        "output_throughput": 3.0,
    }
    names = summarise(levels, [{"load": lv.load, "summary": summary} for lv in levels])
    patterns = [
        re.escape(p).replace(r"\{level\}", r"(c\d+|rate[\d.]+)") for p in SUITES["latency"].metrics
    ]
    for name in names:
        assert any(re.fullmatch(p, name) for p in patterns), name


# --- D3: counts are integers --------------------------------------------------------------------------
def test_counts_are_shown_as_integers(tmp_path):
    assert (format_value(0), format_value(12345), format_value(0.0)) == ("0", "12,345", "0.0000")
    with fake_server() as (url, _):
        results = latency_run(tmp_path, url)
    report = (results["_dir"] / "report.md").read_text()
    assert "| failed | 0 |" in report and "| short | 0 |" in report
    assert results["metrics"]["failed"]["value"] == 0 and isinstance(
        results["metrics"]["failed"]["value"], int
    )
    table = markdown_tables([load_results(results["_dir"])], ["fake"])
    assert "| failed | 0 |" in table


# --- D5: --concurrency is refused by the latency suite -------------------------------------------
def test_latency_refuses_concurrency_and_points_to_concurrencies(tmp_path):
    result = invoke(
        "run",
        "latency",
        "--base-url",
        "http://127.0.0.1:9",
        "--concurrency",
        "8",
        "-o",
        tmp_path / "r",
    )
    one_line_error(result, "does not take --concurrency", "concurrencies=[")
    assert not (tmp_path / "r").exists()


# --- D6: one server, one cache identity ---------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["{}", "{}/", "{}/v1", "{}/v1/", "{}//v1//"])
def test_a_base_url_with_or_without_v1_is_one_server(spelling):
    from eval_suites.client import server_root

    assert server_root(spelling.format("http://127.0.0.1:8000")) == "http://127.0.0.1:8000"
    assert server_root("HTTP://LocalHost:8000/v1") == "http://localhost:8000"


def test_a_rerun_against_the_v1_spelling_is_answered_from_the_cache(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with fake_server() as (url, posts):
        first = run_suite(
            RunOptions(
                suite="generation", base_url=url, limit=2, cache_path=cache, output=tmp_path / "a"
            )
        )
        asked = len(completions(posts))
        second = run_suite(
            RunOptions(
                suite="generation",
                base_url=url + "/v1/",
                limit=2,
                cache_path=cache,
                output=tmp_path / "b",
            )
        )
    assert asked == 4 and len(completions(posts)) == asked  # nothing asked again
    a, b = load_results(first), load_results(second)
    assert b["cache"]["misses"] == 0 and a["metrics"] == b["metrics"]
    assert a["server"]["identity"] == b["server"]["identity"] == url
