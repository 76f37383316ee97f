"""Server-Sent Events framing for streamed responses.

What it does: encodes chunks as `data: {json}\n\n`, ends every stream with
`data: [DONE]\n\n`, and turns an error raised after streaming has begun into an error
event (the HTTP status is already 200 by then) followed by `[DONE]`.
`StreamingOperation` adds the event stream to a route's documented 200 response, and
`GENERATION_ROUTE_DOCS` is what the completion and chat routes document.
What it does not do: decide chunk contents (the route modules do).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Schema
from litestar.response import Stream
from prometheus_client import Counter

from .errors import APIError, error_body, error_responses

log = logging.getLogger("atlas.api")
_encoder = msgspec.json.Encoder()


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def sse_error(status: int, message: str, param: str | None = None) -> bytes:
    return sse_event(error_body(status, message, param))


DONE = b"data: [DONE]\n\n"


async def _framed(events: AsyncIterator[bytes], errors: Counter) -> AsyncIterator[bytes]:
    """The events, then `[DONE]`; an error ends the stream as an error event. Each way a
    stream fails is counted in `errors` by status, as an error answer is, so dashboards see
    streamed and non-streamed failures alike: 499 when the client goes away mid-stream
    (the server stops reading its generator), as for a non-streamed request."""
    try:
        async for chunk in events:
            yield chunk
    except (GeneratorExit, asyncio.CancelledError):
        errors.labels(status="499").inc()
        raise
    except APIError as e:
        errors.labels(status=str(e.status)).inc()
        yield sse_event(e.body())
    except Exception:
        log.exception("error while streaming")
        errors.labels(status="500").inc()
        yield sse_error(
            500, "internal server error while streaming; the server log has the details"
        )
    yield DONE


def sse_response(events: AsyncIterator[bytes], errors: Counter) -> Stream:
    """A streamed answer; `errors` is the server's error counter (`Metrics.errors`)."""
    return Stream(
        _framed(events, errors),
        media_type="text/event-stream",
        # Also as a header: Litestar 2 lets the route's media type (JSON, for the same
        # route's non-streamed answers) override the Stream's own, and SSE clients such as
        # browsers' EventSource refuse a stream that is not labelled text/event-stream.
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )


@dataclass
class StreamingOperation(Operation):
    """An OpenAPI operation whose 200 answer is JSON, or an event stream with `stream: true`."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is not None and ok.content is not None:
            # Each event, as SSE-aware tools read one: its `data` is one JSON chunk in the
            # OpenAI shape (an error body if generation failed midway), the last `[DONE]`.
            event = Schema(
                type=OpenAPIType.OBJECT,
                properties={"data": Schema(type=OpenAPIType.STRING)},
                required=["data"],
                description="With `stream: true`: events whose data is a JSON chunk, then `[DONE]`",
            )
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=event)


# What both generation routes (completions and chat) document beside their summary.
GENERATION_ROUTE_DOCS: dict = {
    "responses": error_responses(400, 401, 404, 413, 429, 502, 503),
    "operation_class": StreamingOperation,
}
