"""The Litestar application factory.

What it does: `create_app(state, ...)` assembles the routes — completions, chat, models,
the tokenizer routes, embeddings, plugins, health and metrics always; the RAG routes
(retrieve, collections) and the RAG prompt augmenter when `[rag] enabled` — the
OpenAI-shaped exception handlers, the optional bearer-token check (every route but
/health, /metrics and /schema), the body size limit and the OpenAPI schema (served at
/schema, with the bounds Litestar drops put back: openapi_bounds.py). On startup it
loads the checkpoint in a background thread, so /health answers 503 until the model is
ready, and builds and warms up the configured retriever and reranker; on shutdown it
stops the engine and closes the retrievers, rerankers and vector store. Nothing heavy
happens at creation: the embedder and the vector store open on first use.

Extension point: `extra_handlers` (Litestar route handlers or routers) for applications
that embed Atlas; a request with a `rag` field uses `state.augmenter` (any
`state.PromptAugmenter`), and its responses carry `citations`.

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
from .embeddings import SharedEmbedder, create_embeddings
from .errors import EXCEPTION_HANDLERS, error_body
from .openapi_bounds import restore_zero_bounds
from .schemas import REQUEST_BODIES
from .state import ServerState
from .system import (
    detokenize,
    health,
    health_head,
    list_models,
    list_plugins,
    metrics,
    retrieve_model,
    tokenize,
    tokenizer_info,
)

OPEN_PATHS = ("/health", "/metrics", "/schema")


def _auth_hook(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> Response | None:
        if expected is None or request.url.path.startswith(OPEN_PATHS):
            return None
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 7235: "bearer" is "Bearer"); the key is not.
        # Constant-time comparison: the time taken does not reveal how much of a guess matched.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
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


def install_rag(state: ServerState) -> None:
    """The RAG service and its augmenter (the store, and the configured retriever and
    reranker, open at start-up, `on_startup`; the embedder and other plugins when a
    request first needs them)."""
    from ..rag.service import RAGService, RetrievalDefaults
    from .retrieval import RAGAugmenter
    from .scoring import EngineScorer

    cfg = state.config.rag
    state.rag = RAGService(
        state.plugins(),
        state.embedder.get,
        store_config=cfg,
        defaults=RetrievalDefaults(cfg.retriever, cfg.reranker, cfg.top_k),
        score_texts=EngineScorer(state).score_texts,
    )
    state.augmenter = RAGAugmenter(state, state.rag)


def create_app(
    state: ServerState,
    api_key: str | None = None,
    plugin_host: Any = None,
    load_on_startup: bool = True,
    extra_handlers: Sequence[Any] = (),
) -> Litestar:
    """The app serving `state`; `plugin_host` defaults to every installed plugin."""
    state.plugin_host = plugin_host if plugin_host is not None else state.plugin_host
    state.embedder = state.embedder or SharedEmbedder()
    state.created = int(time.time())
    handlers = [
        create_completion,
        create_chat_completion,
        list_models,
        retrieve_model,
        tokenize,
        detokenize,
        tokenizer_info,
        create_embeddings,
        list_plugins,
        health,
        health_head,
        metrics,
    ]
    if state.config.rag.enabled:
        from .retrieval import RAG_ROUTES

        install_rag(state)
        handlers += RAG_ROUTES

    def on_startup(_: Litestar) -> None:
        if state.rag is not None:
            state.rag.open_store()
        if load_on_startup and not state.ready and state.engine is None:
            state.load_in_background(state.checkpoint_path)
        if state.rag is not None:
            # While the model loads; before the server answers anything, so no request
            # waits for a plugin's model or connection (a failure is logged, not fatal).
            state.rag.warm_up()

    def on_shutdown(_: Litestar) -> None:
        state.shutdown()

    cors = state.config.http.cors_allow_origins
    app = Litestar(
        route_handlers=[*handlers, *extra_handlers],
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
