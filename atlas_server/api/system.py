"""Routes around generation: models, health, metrics, plugins and the tokenizer routes.

What it does: `GET /v1/models`, `GET /health` (200 ready, 503 while loading, after a failed
load or while draining), `GET /metrics` (Prometheus text), `GET /v1/plugins` (what `atlas
plugins` shows), `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` in the
shapes vLLM and lm-evaluation-harness use (`/tokenize` renders messages with the served
chat template, so its ids are what chat generation is fed). What it does not do: generate.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get, head, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Response

from .chat import prompt_ids
from .errors import APIError, RequestError, error_responses
from .generation import check_model, encode_text
from .schemas import DetokenizeRequest, TokenizeRequest, check_continuation
from .state import ServerState


class Health(msgspec.Struct):
    """What /health answers: status ok, loading, draining or error; when ok, what serves:
    {"device", "dtype", "matmul", "attention"}, the kernels being "C" (Atlas's own),
    "oneDNN" or "PyTorch"."""

    status: str
    model: str | None = None
    error: str | None = None
    backend: dict[str, str] | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.atlas


def _loaded(state: ServerState) -> None:
    if not state.ready:
        raise APIError(503, "the model is still loading", headers={"Retry-After": "2"})


@get(
    "/health",
    summary="Readiness: 200 when serving, 503 while loading or draining",
    responses={503: ResponseSpec(Health, description="Loading, draining, or the load failed.")},
)
async def health(request: Request) -> Response:
    body, status = _health(_state(request))
    return Response(body, status_code=status)


# Load balancers and uptime checkers often probe with HEAD: the same status, no body.
@head("/health", include_in_schema=False)
async def health_head(request: Request) -> Response[None]:
    return Response(content=b"", status_code=_health(_state(request))[1])


def _health(state) -> tuple[dict[str, Any], int]:
    if state.draining:
        return {"status": "draining"}, 503
    if state.load_error is not None:
        return {"status": "error", "error": state.load_error}, 503
    if not state.ready:
        return {"status": "loading"}, 503
    if state.engine is not None and state.engine.stopped_unexpectedly:
        return {
            "status": "error",
            "error": "the engine thread has stopped; the server log says why",
        }, 503
    backend = getattr(state.engine, "backend", None)
    # RAG's store, said but not judged: generation is served whatever it is, so a store
    # that cannot open (its RAG routes answer 503) does not take the server out of service.
    rag = state.rag.store_status() if state.rag is not None else "off"
    return {"status": "ok", "model": state.model_name, "backend": backend, "rag": rag}, 200


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> Response:
    state = _state(request)
    stats = state.engine.stats() if state.engine is not None else None
    # Litestar adds "; charset=utf-8" to a text/* media type itself.
    body = state.metrics.render(stats, model_name=state.model_name)
    return Response(body, media_type="text/plain; version=0.0.4")


@get(
    "/v1/models",
    summary="List the served model (OpenAI-compatible)",
    responses=error_responses(401),
)
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [_model_card(state)] if state.ready else []}


@get(
    "/v1/models/{model:path}",  # a path: served names may hold "/" (org/name)
    summary="Retrieve the served model (OpenAI-compatible)",
    responses=error_responses(401, 404, 503),
)
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    state = _state(request)
    _loaded(state)
    check_model(state, model.lstrip("/"))
    return _model_card(state)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "atlas",
        "root": state.checkpoint_path,
        "max_model_len": state.max_model_len,
    }


@post(
    "/tokenize",
    status_code=200,
    summary="Tokenize a prompt or chat messages (vLLM-compatible)",
    responses=error_responses(400, 404, 413, 503),
)
async def tokenize(request: Request, data: TokenizeRequest) -> dict[str, Any]:
    state = _state(request)
    _loaded(state)
    check_model(state, data.model)
    if (data.prompt is None) == (data.messages is None):
        raise RequestError("give exactly one of prompt or messages", param="prompt")
    if data.messages is not None:
        check_continuation(data)
        tokens = prompt_ids(
            state, data.messages, data.add_generation_prompt, data.continue_final_message
        )
        if data.add_special_tokens:
            before, after = state.engine.text_adds
            tokens = before + tokens + after
    else:
        tokens, _ = encode_text(state, data.prompt, data.add_special_tokens is not False)
    return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}


@post(
    "/detokenize",
    status_code=200,
    summary="Turn token ids back into text (vLLM-compatible)",
    responses=error_responses(400, 404, 413, 503),
)
async def detokenize(request: Request, data: DetokenizeRequest) -> dict[str, Any]:
    state = _state(request)
    _loaded(state)
    check_model(state, data.model)
    vocab = state.tokenizer.vocab_size
    bad = [t for t in data.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(
            f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
        )
    return {"prompt": state.tokenizer.decode(data.tokens)}


@get(
    "/tokenizer_info",
    summary="Tokenizer description (vLLM-compatible)",
    responses=error_responses(503),
)
async def tokenizer_info(request: Request) -> dict[str, Any]:
    state = _state(request)
    _loaded(state)
    tok = state.tokenizer
    specials = tok.special_tokens
    eos = next(iter(state.engine.outputs.eos_ids), None)  # what ends a generation here
    return {
        "tokenizer_class": "AtlasBPETokenizer",
        "vocab_size": tok.vocab_size,
        "model_max_length": state.max_model_len,
        "eos_token": None if eos is None else tok.decode([eos]),
        "eos_token_id": eos,
        # The start-of-text token the model was trained with (an imported Llama 3's
        # <|begin_of_text|>; <|endoftext|> for GPT-2-style ones): lm-eval-style scoring
        # puts it before a document.
        "bos_token": None if state.engine.bos_id is None else tok.decode([state.engine.bos_id]),
        "bos_token_id": state.engine.bos_id,
        "additional_special_tokens": sorted(specials),
        "added_tokens_decoder": {
            str(i): {"content": s, "special": True} for s, i in specials.items()
        },
        "chat_template": state.chat_template.source if state.chat_template else None,
        "pattern": tok.pattern,
    }


@get(
    "/v1/plugins",
    summary="Installed plugins and what they registered (Atlas)",
    responses=error_responses(401),
)
async def list_plugins(request: Request) -> dict[str, Any]:
    # Discovery imports the plugins' modules: done once, off the event loop.
    host = await _state(request).compute(_state(request).plugins)
    return {"object": "list", "data": host.describe()}
