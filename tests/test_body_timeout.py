"""A request body that stops arriving gets a 408 (atlas_server/api/body_timeout.py).

QA found that a client sending `Content-Length: 100` and then 12 bytes held a request task
and its connection for as long as it kept the socket open. The wrapper is tested at the
ASGI level (the reads after the body stay untimed, so a stream is never cut) and through
`atlas serve`'s own app stack over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atlas_server.api import ServerState, create_app
from atlas_server.api.body_timeout import BodyReadTimeout
from atlas_server.commands.serve import asgi_app
from atlas_server.config import HTTPSection, ModelSection, RAGSection, ServerConfig
from tests.servers import serving


def _run(app, messages, delays):
    """Run `app` on one HTTP request whose receive() yields `messages`, each after its
    delay; returns what the app sent."""
    sent: list[dict] = []

    async def main():
        queue = list(zip(delays, messages, strict=True))

        async def receive():
            delay, message = queue.pop(0) if queue else (3600, {"type": "http.disconnect"})
            await asyncio.sleep(delay)
            return message

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions"}
        await app(scope, receive, send)

    asyncio.run(main())
    return sent


def _echo_app(log):
    """Reads the body, then waits for the client's disconnect as a streaming handler does."""

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.append("disconnect during the body")
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        log.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        log.append(await receive())  # the stream's disconnect listener: not timed
        await send({"type": "http.response.body", "body": body})

    return app


def test_a_stalled_body_is_answered_408_and_the_handler_sees_a_disconnect():
    log: list = []
    part = {"type": "http.request", "body": b'{"prompt": "', "more_body": True}
    sent = _run(BodyReadTimeout(_echo_app(log), 0.2), [part, part], [0, 5])
    assert log == ["disconnect during the body"]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_timeout" and "0.2 s" in error["message"]


def test_a_slow_body_whose_parts_keep_coming_is_read_whole():
    """The timeout is between reads, as nginx's client_body_timeout: a large upload on a
    slow link takes longer than it in total and is still served."""
    log: list = []
    parts = [{"type": "http.request", "body": b"ab", "more_body": True}] * 4
    parts.append({"type": "http.request", "body": b"c", "more_body": False})
    end = {"type": "http.disconnect"}
    sent = _run(BodyReadTimeout(_echo_app(log), 0.5), [*parts, end], [0.15] * 5 + [0])
    assert log[0] == b"abababab" + b"c"
    assert sent[0]["status"] == 200


def test_reads_after_the_body_are_not_timed():
    """A streaming handler listens on receive() for the client leaving, for as long as the
    stream runs: timing that read would cut every stream longer than the timeout."""
    log: list = []
    whole = {"type": "http.request", "body": b"{}", "more_body": False}
    end = {"type": "http.disconnect", "sent by": "the client, after 0.5 s"}
    sent = _run(BodyReadTimeout(_echo_app(log), 0.1), [whole, end], [0, 0.5])
    assert log == [b"{}", end]
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"{}"


def test_zero_turns_the_timeout_off():
    log: list = []
    parts = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent = _run(BodyReadTimeout(_echo_app(log), 0), parts, [0, 0.3, 0])
    assert log[0] == b"ab" and sent[0]["status"] == 200


def test_a_negative_timeout_is_a_config_error():
    with pytest.raises(ValueError, match="http.body_timeout_s"):
        ServerConfig(http=HTTPSection(body_timeout_s=-1)).validate()


def _errors_with_status(base: str, status: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in family.samples:
            if sample.name == "atlas:request_errors_total" and sample.labels["status"] == status:
                return sample.value
    return 0.0


def test_atlas_serve_answers_a_stalled_upload_408_over_a_socket(tiny_checkpoint):
    """`atlas serve`'s app stack (serve.asgi_app) under uvicorn: the client that sent 12 of
    its 100 bytes gets the 408 and the server closes the connection."""
    config = ServerConfig(
        model=ModelSection(device="cpu", dtype="float32"),
        http=HTTPSection(body_timeout_s=1.0),
        rag=RAGSection(enabled=False),
    )
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    app = asgi_app(create_app(state, load_on_startup=False), state)
    with serving(app, ready=lambda status: status in (200, 503)) as base:
        url = urlsplit(base)
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": "'
            )
            answer = b""
            deadline = time.time() + 60
            while time.time() < deadline:  # until the server closes the connection
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert _errors_with_status(base, "408") == 1
