"""Graceful shutdown of a real `atlas serve` process: what Kubernetes and Compose rely on.

The promise (docs/deployment.md, "Graceful shutdown"): after SIGTERM the server
  1. answers GET /health with 503 at once, the listener staying open while it drains;
  2. refuses new generation requests with 503 and an OpenAI error body;
  3. lets streams that were running finish normally (last chunk, usage, `data: [DONE]`) for up
     to `http.drain_timeout_s`;
  4. exits with status 0 once they are done.
The test starts the server as a subprocess, opens streaming completions over HTTP, sends
SIGTERM while they stream and checks those four points.

A second test lets the drain deadline pass with streams still running: the engine is
stopped, each stream ends with a 503 error event and `data: [DONE]`, and the server exits.

Both hold on a loaded machine (two busy processes beside the suite): no assertion times the
server; the deadlines are generous, and the server runs with the OpenMP wait policy it
sets itself (PASSIVE, atlas_server/cli.py), without which its idle OpenMP threads spin and
starve the event loop that streams (a run with one busy process beside it took over 150 s
instead of about 30).

What it does not cover: Kubernetes' own side (preStop, endpoint removal, grace period; see
tests/test_deploy_manifests.py); SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from servers import free_port

from atlas_server.checkpoint import save_checkpoint
from atlas_server.model import Transformer, load_preset

pytestmark = pytest.mark.timeout(120)

# Long enough that the streams outlive the checks made after SIGTERM: a tiny model decodes a
# token in about a millisecond, so its default 256-token context would be gone in a blink.
CONTEXT = 2048


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """gpt2-tiny with a 2048-token context, so one stream can run for seconds."""
    torch.manual_seed(0)
    model = Transformer(
        load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size, max_seq_len=CONTEXT)
    )
    root = tmp_path_factory.mktemp("drain")
    return save_checkpoint(
        root / "gpt2-tiny-2k", model, byte_tokenizer, {"source": __file__, "seed": 0}
    )


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(checkpoint: Path, tmp_path: Path, drain_timeout_s: float) -> Server:
    config = tmp_path / "server.toml"
    # RAG off: this is about the HTTP lifecycle, and the embedder would only slow the start.
    config.write_text(f"[http]\ndrain_timeout_s = {drain_timeout_s}\n\n[rag]\nenabled = false\n")
    port = free_port()
    log = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--config", str(config),
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, port, log)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"server exited early:\n{server.output()}"
        try:
            response = httpx.get(f"{server.url}/health", timeout=2)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            return server
        if response is not None and response.json().get("status") == "error":
            raise AssertionError(f"model failed to load: {response.json()}")
        assert time.monotonic() < deadline, f"/health never answered 200:\n{server.output()}"
        time.sleep(0.1)


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for server in started:  # whatever a failed assertion left running
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


@dataclass
class Stream:
    """One streaming completion read on its own thread, event by event."""

    events: list[dict] = field(default_factory=list)
    done: bool = False  # `data: [DONE]` arrived
    transport_error: str | None = None
    status: int | None = None
    first_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(c["text"] for e in self.events for c in e.get("choices", []))

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c["finish_reason"]
            for e in self.events
            for c in e.get("choices", [])
            if c.get("finish_reason")
        ]

    @property
    def usage(self) -> dict | None:
        usages = [e["usage"] for e in self.events if e.get("usage")]
        return usages[-1] if usages else None


def completion_body(max_tokens: int, stream: bool) -> dict:
    return {
        "prompt": "The server drains",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def read_stream(url: str, max_tokens: int, stream: Stream) -> None:
    try:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=completion_body(max_tokens, True), timeout=60
        ) as response:
            stream.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    stream.done = True
                    break
                stream.events.append(json.loads(payload))
                stream.first_event.set()
    except httpx.TransportError as e:
        stream.transport_error = repr(e)
    finally:
        stream.first_event.set()
        stream.finished.set()


def open_streams(server: Server, count: int, max_tokens: int) -> list[Stream]:
    streams = [Stream() for _ in range(count)]
    for stream in streams:
        threading.Thread(
            target=read_stream, args=(server.url, max_tokens, stream), daemon=True
        ).start()
    for stream in streams:
        assert stream.first_event.wait(30), "a stream produced nothing in 30 s"
        assert stream.status == 200 and stream.events, (stream, server.output())
    assert not any(s.finished.is_set() for s in streams), "streams ended before SIGTERM: too short"
    return streams


def health_after_sigterm(server: Server) -> int:
    """The first /health answer after SIGTERM that is not 200. The flip happens in the
    signal handler, before any other request is served; the deadline only bounds a hang."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/health", timeout=10).status_code
        if status != 200:
            return status
        time.sleep(0.01)
    raise AssertionError("/health still 200 thirty seconds after SIGTERM")


def assert_refused_with_503(server: Server, stream: bool) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions", json=completion_body(8, stream), timeout=10
    )
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def wait_exit(server: Server, within_s: float) -> int:
    try:
        return server.process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"server still running {within_s} s after SIGTERM:\n{server.output()}"
        ) from None


# Far above the streams' few seconds: on a loaded machine they have taken over 30 s, and a
# drain deadline reached here would end them with an error event instead of "length".
GENEROUS_DRAIN_S = 150


@pytest.mark.timeout(GENEROUS_DRAIN_S + 90)
def test_sigterm_refuses_new_work_and_lets_running_streams_finish(
    long_context_checkpoint, tmp_path, servers
):
    server = start_server(long_context_checkpoint, tmp_path, drain_timeout_s=GENEROUS_DRAIN_S)
    servers.append(server)
    max_tokens = CONTEXT - 64
    streams = open_streams(server, count=3, max_tokens=max_tokens)

    server.process.send_signal(signal.SIGTERM)
    assert health_after_sigterm(server) == 503
    assert_refused_with_503(server, stream=False)
    assert_refused_with_503(server, stream=True)
    assert not all(s.finished.is_set() for s in streams), "streams ended before the checks"

    exit_code = wait_exit(server, within_s=GENEROUS_DRAIN_S + 5)
    for stream in streams:
        assert stream.finished.wait(5)
        assert stream.transport_error is None, stream.transport_error
        assert stream.done, "stream ended without data: [DONE]"
        assert stream.finish_reasons == ["length"]
        assert stream.usage["completion_tokens"] == max_tokens
    # Same prompt, greedy: the drain did not disturb what the streams generated.
    assert len({s.text for s in streams}) == 1
    assert exit_code == 0, server.output()
    assert "drain timeout" not in server.output()  # it ended because the streams did
    # Where it listens (uvicorn says so only when it binds the socket itself).
    assert f"listening on {server.url} " in server.output()


def test_streams_still_running_at_the_drain_deadline_end_with_a_503_event(
    long_context_checkpoint, tmp_path, servers
):
    """Past `drain_timeout_s` the engine is stopped: each running stream gets an OpenAI
    error event (503) and `data: [DONE]`, never a silent cut, and the server exits 0
    without waiting out uvicorn's own graceful-shutdown period."""
    server = start_server(long_context_checkpoint, tmp_path, drain_timeout_s=0.5)
    servers.append(server)
    max_tokens = CONTEXT - 64
    streams = open_streams(server, count=2, max_tokens=max_tokens)

    server.process.send_signal(signal.SIGTERM)
    exit_code = wait_exit(server, within_s=60)
    for stream in streams:
        assert stream.finished.wait(5)
        assert stream.transport_error is None, stream.transport_error
        assert stream.done, "stream ended without data: [DONE]"
        error = stream.events[-1]["error"]
        assert error["type"] == "service_unavailable" and "shut down" in error["message"]
        assert stream.finish_reasons == []  # cut short: no choice claims to have finished
        assert stream.text and stream.usage is None
    assert exit_code == 0, server.output()
    assert "drain timeout: ending" in server.output()
    # The streams were closed by the drain, not cut by uvicorn's own graceful-shutdown
    # timeout (5 s), which would cancel them and log this:
    assert "timeout graceful shutdown exceeded" not in server.output()


def test_a_request_still_uploading_at_shutdown_gets_the_openai_503_body(
    long_context_checkpoint, tmp_path, servers
):
    """A request whose body was still arriving when SIGTERM came was seen by no handler,
    so nothing answered it but uvicorn's cancellation at exit: a plain-text 500 and a
    traceback in the log (found by a QA pass)."""
    import socket

    server = start_server(long_context_checkpoint, tmp_path, drain_timeout_s=0.5)
    servers.append(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt":'
        )
        time.sleep(0.5)  # the request is inside the app, reading its body
        server.process.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"application/json" in head and json.loads(body)["error"]["message"].startswith(
        "the server shut down"
    )
    assert wait_exit(server, within_s=60) == 0, server.output()
    assert "Exception in ASGI application" not in server.output()


# What torch sees when it loads under `atlas` (a meta-path hook runs before its import).
_POLICY_AT_TORCH_IMPORT = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("policy:", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"),
                  flush=True)
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Spy())
import atlas_server.cli  # the CLI loads PyTorch only once a command needs it
import atlas_server.checkpoint
"""


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ({}, "PASSIVE 10000"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's policy, its spin count
        ({"GOMP_SPINCOUNT": "500"}, "None 500"),
    ],
)
def test_atlas_sets_the_openmp_wait_policy_before_torch_loads(monkeypatch, given, seen):
    """PASSIVE with a short GNU spin (GOMP_SPINCOUNT wins over the policy there) unless the
    user chose either; set before torch (and OpenMP) loads."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    out = subprocess.run(
        [sys.executable, "-c", _POLICY_AT_TORCH_IMPORT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"policy: {seen}"


def test_a_port_in_use_or_a_bad_log_level_is_one_line_and_exit_1(long_context_checkpoint):
    """The port is bound before the model loads: uvicorn's own bind error came while the
    loader thread was inside PyTorch, and the process aborted (exit 134). Engine settings
    the checkpoint cannot honour are refused before the load too."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra, needle in (
            ([], f"error: cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--log-level", "verbose"], "error: --log-level 'verbose' is not one of"),
            # Settings the checkpoint cannot honour: they failed the background load and
            # left a server answering 503 for good (found by a QA pass).
            (["--set", "engine.max_model_len=5000"],
             "error: engine.max_model_len=5000 exceeds the model's context of 2048 positions"),
            (["--set", "engine.kv_cache_gib=0.000001"], "holds no slot"),
        ):  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint",
                 str(long_context_checkpoint), "--port", str(port), "--set", "rag.enabled=false",
                 *extra],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 1, out.stderr[-2000:]
            assert needle in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


def test_shutdown_during_the_load_waits_for_it_and_stops_the_engine_it_started():
    """SIGTERM while the model loads: the shutdown hook waits for the loader (exiting under
    it aborted the process) and stops the engine the load then started."""
    from atlas_server.api import ServerState
    from atlas_server.config import ServerConfig

    class SlowLoad(ServerState):
        def load(self, checkpoint, engine=None):
            time.sleep(0.5)
            self.engine = engine

    class Engine:
        stopped = False

        def shutdown(self, timeout):
            Engine.stopped = True

    state = SlowLoad(config=ServerConfig(), model_name="m", checkpoint_path="unused")
    loader = state.load_in_background("unused", Engine())
    state.shutdown()
    assert not loader.is_alive() and Engine.stopped
