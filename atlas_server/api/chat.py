"""`POST /v1/chat/completions`: the OpenAI chat endpoint over a ChatML template.

What it does: renders the messages with the tokenizer's chat special tokens
(`<|im_start|>role\\n...<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`),
generates until `<|im_end|>` or `<|endoftext|>`, and answers in the OpenAI chat shape:
one JSON body, or SSE deltas whose first chunk carries the role. Logprobs follow the chat
shape (`content: [{token, logprob, bytes, top_logprobs}]`).
What it does not do: tool calls or images (content parts other than text are refused).
"""

from __future__ import annotations

import time
from typing import Any, get_args

import msgspec
from litestar import Request, post
from litestar.response import Response

from ..tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer
from .errors import RequestError
from .generation import (
    augment,
    check_model,
    check_ready,
    collect,
    default_max_tokens,
    finite,
    merged_events,
    new_id,
    rag_sources,
    sampling_params,
    submit,
    token_text,
    until_disconnect,
    usage,
)
from .metrics import RequestTimer
from .schemas import ChatCompletionRequest, ChatMessage, Role
from .sse import GENERATION_ROUTE_DOCS, sse_event, sse_response
from .state import ServerState

ROLES = get_args(Role)


def message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                "only text content parts are supported", param=f"messages[{index}].content"
            )
        parts.append(part["text"])
    return "".join(parts)


def render_chat(
    tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool
) -> list[int]:
    """Token ids of the ChatML rendering of `messages`."""
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
    if missing:
        raise RequestError(
            f"this model's tokenizer has no chat tokens {missing}; use /v1/completions",
            param="messages",
        )
    start, end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    ids: list[int] = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise RequestError(
                f"unknown role {message.role!r}; use one of {list(ROLES)}",
                param=f"messages[{i}].role",
            )
        # Message text is encoded as plain text: special-token strings typed by a user never
        # become control tokens.
        ids += [
            start,
            *tokenizer.encode(f"{message.role}\n{message_text(message, i)}"),
            end,
            *tokenizer.encode("\n"),
        ]
    if add_generation_prompt:
        ids += [start, *tokenizer.encode("assistant\n")]
    return ids


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return tuple(
        tokenizer.special_tokens[t] for t in (IM_END, ENDOFTEXT) if t in tokenizer.special_tokens
    )


def chat_logprobs(tokenizer: Tokenizer, entries, token_ids) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_text(tokenizer, token_id)
        top = [
            {
                "token": token_text(tokenizer, t),
                "logprob": finite(lp),
                "bytes": list(tokenizer.token_bytes(t)),
            }
            for t, lp in (entry.top or {}).items()
        ]
        content.append(
            {
                "token": text,
                "logprob": finite(entry.logprob),
                "bytes": list(tokenizer.token_bytes(token_id)),
                "top_logprobs": top,
            }
        )
    return {"content": content}


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="Create a chat completion (OpenAI-compatible)",
    **GENERATION_ROUTE_DOCS,
)
async def create_chat_completion(request: Request, data: ChatCompletionRequest) -> Any:
    state: ServerState = request.app.state.atlas
    data.check_ranges()
    check_ready(state)
    check_model(state, data.model)
    tokenizer = state.tokenizer
    augmentation = None
    if data.rag is not None:
        plain = [msgspec.to_builtins(m) for m in data.messages]
        asked = (
            data.max_completion_tokens
            if data.max_completion_tokens is not None
            else data.max_tokens
        )
        augmentation = await augment(state, data.rag, messages=plain, max_tokens=asked)
        data = msgspec.structs.replace(
            data, messages=[msgspec.convert(m, ChatMessage) for m in augmentation.messages]
        )
    ids = render_chat(tokenizer, data.messages, data.add_generation_prompt)
    asked = (
        data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    )
    max_tokens = default_max_tokens(state, len(ids), asked, state.max_model_len)
    if max_tokens < 1:
        raise RequestError(
            "the messages fill the whole context; nothing is left to generate", param="messages"
        )
    top = data.top_logprobs or 0
    params = sampling_params(
        data,
        max_tokens,
        top if data.logprobs else None,
        None,
        extra_stop_ids=chat_stop_ids(tokenizer),
    )
    request_id = new_id("chatcmpl")
    start = time.perf_counter()
    state.enter()
    try:
        stream = submit(state, ids, params, request_id)
    except BaseException:
        state.leave()
        raise
    state.metrics.prompt_tokens.inc(len(ids))
    timer = RequestTimer(state.metrics, start)
    created = int(time.time())
    cite = (lambda text: state.augmenter.citations(augmentation, text)) if augmentation else None
    if data.stream:
        return sse_response(
            _stream(
                state,
                data,
                ids,
                stream,
                timer,
                request_id,
                created,
                cite,
                rag_sources(state, augmentation),
            )
        )
    try:
        choices = await until_disconnect(request, collect(state, [stream], [0], data.n, timer))
    finally:
        state.leave()
    body = []
    for c in choices:
        text = "".join(c.text)
        choice = {
            "index": c.index,
            "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(tokenizer, c.logprobs, c.token_ids)
            if data.logprobs
            else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if cite is not None:
            choice["citations"], choice["dropped_citations"] = cite(text)
        body.append(choice)
    return Response(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": body,
            "usage": usage(
                len(ids), sum(len(c.token_ids) for c in choices), choices[0].cached_tokens
            ),
            **rag_sources(state, augmentation),
        }
    )


async def _stream(
    state, data: ChatCompletionRequest, ids, stream, timer, request_id, created, cite, sources
):
    base = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": state.model_name,
    }
    started: set[int] = set()
    texts: dict[int, list[str]] = {}
    completion_tokens = cached_tokens = 0
    try:
        async for _, event in merged_events([stream], [0]):
            i = event.index
            cached_tokens = event.num_cached_tokens
            timer.on_queue_time(event.queue_time_s)
            timer.on_tokens(i, time.perf_counter(), len(event.token_ids))
            completion_tokens += len(event.token_ids)
            texts.setdefault(i, []).append(event.text)
            delta: dict[str, Any] = {}
            if i not in started:
                started.add(i)
                delta["role"] = "assistant"
            if event.text or not delta:
                delta["content"] = event.text
            finish = None
            if event.finished:
                finish = "stop" if event.finish_reason == "stop" else "length"
            choice: dict[str, Any] = {
                "index": i,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            if data.logprobs and event.logprobs:
                choice["logprobs"] = chat_logprobs(state.tokenizer, event.logprobs, event.token_ids)
            if finish and cite is not None:
                choice["citations"], choice["dropped_citations"] = cite("".join(texts[i]))
            if delta.get("content") or "role" in delta or finish:
                yield sse_event({**base, "choices": [choice], **(sources if finish else {})})
        timer.on_finish(time.perf_counter(), "stream")
        if data.stream_options is not None and data.stream_options.include_usage:
            total = usage(len(ids), completion_tokens, cached_tokens)
            yield sse_event({**base, "choices": [], "usage": total})
    finally:
        state.leave()
