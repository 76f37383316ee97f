"""The Litestar application factory.

What it does: `create_app(state, ...)` assembles the routes (completions, chat, models,
tokenizer routes, health, metrics, plus any extra handlers such as the RAG routes), the
OpenAI-shaped exception handlers, the optional bearer-token check on /v1 routes, the body
size limit and the OpenAPI schema (served at /schema, with the bounds Litestar drops put
back: openapi_bounds.py). On startup it loads the checkpoint
in a background thread, so /health answers 503 until the model is ready; on shutdown it
stops the engine.

Extension points (used by the RAG package, never by editing the handlers): pass
`extra_handlers` (Litestar route handlers or routers) and `augmenter` (a
`state.PromptAugmenter`); a request with a `rag` field uses the augmenter and its
responses carry `citations`.

What it does not do: bind sockets or handle signals (see `commands/serve.py`).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from typing import Any

from litestar import Litestar, Request
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.response import Response

from .chat import create_chat_completion
from .completions import create_completion
from .errors import EXCEPTION_HANDLERS, error_body
from .openapi_bounds import restore_zero_bounds
from .schemas import REQUEST_BODIES
from .state import PromptAugmenter, ServerState
from .system import detokenize, health, list_models, metrics, tokenize, tokenizer_info

OPEN_PATHS = ("/health", "/metrics", "/schema")


def _auth_hook(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> Response | None:
        if expected is None or request.url.path.startswith(OPEN_PATHS):
            return None
        given = request.headers.get("authorization", "").encode()
        # Constant-time comparison: the time taken does not reveal how much of a guess matched.
        if hmac.compare_digest(given, expected):
            return None
        return Response(
            error_body(
                401,
                "missing or wrong API key; send `Authorization: Bearer KEY`",
                code="invalid_api_key",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    return check


def create_app(
    state: ServerState,
    api_key: str | None = None,
    extra_handlers: Sequence[Any] = (),
    augmenter: PromptAugmenter | None = None,
    plugin_host: Any = None,
    load_on_startup: bool = True,
) -> Litestar:
    state.augmenter = augmenter if augmenter is not None else state.augmenter
    state.plugin_host = plugin_host if plugin_host is not None else state.plugin_host
    state.created = int(time.time())

    def on_startup(_: Litestar) -> None:
        if load_on_startup and not state.ready and state.engine is None:
            state.load_in_background(state.checkpoint_path)

    def on_shutdown(_: Litestar) -> None:
        state.shutdown()

    cors = state.config.http.cors_allow_origins
    app = Litestar(
        route_handlers=[
            create_completion,
            create_chat_completion,
            list_models,
            tokenize,
            detokenize,
            tokenizer_info,
            health,
            metrics,
            *extra_handlers,
        ],
        state=State({"atlas": state}),
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=_auth_hook(api_key),
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        request_max_body_size=state.config.http.max_body_bytes,
        cors_config=CORSConfig(allow_origins=list(cors)) if cors else None,
        openapi_config=OpenAPIConfig(title="Atlas", version="0.1.0", path="/schema"),
        debug=False,
    )
    restore_zero_bounds(app, REQUEST_BODIES)
    return app
