"""A request whose body stops arriving is answered 408 and its connection closed.

What it does: an ASGI wrapper that times every read of a request's body. When no part of
the body arrives for `timeout` seconds (nginx's `client_body_timeout`, which also times
the gap between two reads, defaults to 60 s), the client gets the OpenAI error body with
status 408, `Connection: close`, and the request is counted in
`atlas:request_errors_total{status="408"}`; the handler waiting for the body sees a
disconnect, so it stops as for a client that hung up. Without it, a client that sends a
`Content-Length` and then less than that (a crashed uploader, a slow-loris) held a
request task and its connection open for as long as it kept the socket.
What it does not do: time the request line and headers (uvicorn holds no task for those;
put a proxy with header timeouts in front of a public server), time the response, or
touch WebSocket and lifespan messages. Once the body has arrived, reads pass through
untimed: a streaming handler waits on `receive()` for the client's disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from .errors import error_body

log = logging.getLogger("atlas.api")

BODY_STALLED = "the request body stopped arriving: no part of it came for {:g} s"


class BodyReadTimeout:
    """Wrap an ASGI app; `timeout` <= 0 turns the check off. `errors` is the
    `atlas:request_errors` counter (or None) that counts the 408s."""

    def __init__(self, app: Any, timeout: float, errors: Any = None) -> None:
        self.app, self.timeout, self.errors = app, timeout, errors

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.timeout <= 0:
            await self.app(scope, receive, send)
            return
        body_done = answered = started = False

        async def timed_receive() -> dict:
            nonlocal body_done, answered
            if body_done or answered:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                if not started:  # (Litestar reads the whole body before it answers)
                    answered = True
                    await self._answer_408(scope, send)
                return {"type": "http.disconnect"}  # the handler stops as for a hang-up
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if not answered:  # after the 408, the handler's own answer has nowhere to go
                started = True
                await send(message)

        await self.app(scope, timed_receive, guarded_send)

    async def _answer_408(self, scope, send) -> None:
        message = BODY_STALLED.format(self.timeout)
        log.info("%s %s: %s; answered 408", scope.get("method"), scope.get("path"), message)
        if self.errors is not None:
            self.errors.labels(status="408").inc()
        body = json.dumps(error_body(408, message, code="request_timeout")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body may still come: do not read it
        ]
        await send({"type": "http.response.start", "status": 408, "headers": headers})
        await send({"type": "http.response.body", "body": body})
