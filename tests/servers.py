"""Test helpers for servers: a free local port, an ASGI app served from a thread, and a
base for fake JSON servers (`JSONHandler`).

`serving(app)` runs the app under uvicorn in a daemon thread and yields its base URL
once `/health` answers (200, or any status `ready` accepts); it stops the server on exit.
What it does not do: start `atlas serve` as a process (the deploy and eval tests do that,
to test the command itself).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, ready: Callable[[int], bool] = lambda status: status == 200) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if ready(httpx.get(base + "/health").status_code):
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """A base for fake OpenAI-style servers in tests: quiet, `reply(payload)` sends JSON."""

    def log_message(self, *args):
        return

    def reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
