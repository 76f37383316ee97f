"""The one streaming generator of the generation routes, with a chunk formatter per route.

What it does: `stream_chunks(...)` reads the merged engine events of a request and yields
SSE chunks. What every stream does is here, once: timing metrics, token and prefix-cache
counts for `usage`, citations and `sources` on each choice's last chunk (RAG), the final
usage-only chunk when `stream_options.include_usage` asks for it, and failures: an engine
error on any choice becomes a 500 error event and an engine abort (shutdown) a 503 one,
each followed by `data: [DONE]` (see sse.py). What differs between completions and chat
is only the shape of a choice, which the route's `ChunkFormatter` builds.
What it does not do: SSE framing (sse.py) or non-streamed answers (`generation.collect`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ..engine.types import RequestOutput
from .generation import Grounding, finish_reason, merged_events, raise_if_failed, usage
from .metrics import RequestTimer
from .sse import sse_event
from .state import ServerState


class ChunkFormatter(Protocol):
    """Builds one route's choice objects from engine events."""

    def choice(self, index: int, event: RequestOutput, finish: str | None) -> dict | None:
        """The choice for this event of choice `index`, or None if it carries nothing.

        `finish` is the OpenAI finish_reason when this is the choice's last event.
        """
        ...


async def stream_chunks(
    state: ServerState,
    streams: list,
    offsets: list[int],
    formatter: ChunkFormatter,
    base: dict[str, Any],
    timer: RequestTimer,
    prompt_tokens: int,
    include_usage: bool,
    rag: Grounding | None = None,
) -> AsyncIterator[bytes]:
    """SSE chunks `{**base, "choices": [choice]}` for every event of `streams`.

    `offsets[i]` is the index of stream i's first choice; `base` holds the id, object,
    created and model fields. Ends the request's in-flight accounting when it ends.
    """
    texts: dict[int, list[str]] = {}  # generated text per choice, for citations
    cached: dict[int, int] = {}  # per prompt (stream offset): tokens the prefix cache served
    completion_tokens = 0
    finishes: list[str] = []  # one OpenAI finish_reason per finished choice
    try:
        async for offset, event in merged_events(streams, offsets):
            raise_if_failed(event)
            index = offset + event.index
            timer.on_queue_time(event.queue_time_s)
            timer.on_tokens(index, time.perf_counter(), len(event.token_ids))
            completion_tokens += len(event.token_ids)
            cached[offset] = event.num_cached_tokens
            texts.setdefault(index, []).append(event.text)
            finish = finish_reason(event) if event.finished else None
            if finish:
                finishes.append(finish)
            choice = formatter.choice(index, event, finish)
            if choice is None:
                continue
            extra: dict[str, Any] = {}
            if finish and rag is not None:
                rag.add_citations(choice, "".join(texts[index]))
                extra = rag.sources
            yield sse_event({**base, "choices": [choice], **extra})
        timer.on_finish(time.perf_counter(), finishes)
        if include_usage:
            total = usage(prompt_tokens, completion_tokens, sum(cached.values()))
            yield sse_event({**base, "choices": [], "usage": total})
    finally:
        state.leave()
