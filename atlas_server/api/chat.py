"""`POST /v1/chat/completions`: the OpenAI chat endpoint.

What it does: renders the messages with the served checkpoint's chat template (ChatML by
default, or the checkpoint's own Jinja template: `atlas_server/chat_template.py`, the
renderer the trainer uses too), generates until the template's end-of-turn token or
`<|endoftext|>`, and answers in the OpenAI chat shape: one JSON body, or SSE deltas whose
first chunk carries the role (through the streaming generator both routes share,
streaming.py). Logprobs follow the chat shape (`content: [{token, logprob, bytes,
top_logprobs}]`).
What it does not do: tool calls or images (content parts other than text are refused).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, post
from litestar.response import Response

from ..chat_template import ChatTemplate, ChatTemplateError, message_text
from ..engine.types import RequestOutput
from ..tokenizer import Tokenizer
from .errors import RequestError
from .generation import (
    augment,
    check_model,
    check_ready,
    collect,
    finite,
    grounding,
    max_tokens_for,
    new_id,
    sampling_params,
    submit,
    token_text,
    truncated,
    until_disconnect,
    usage,
)
from .metrics import RequestTimer
from .schemas import ChatCompletionRequest, ChatMessage
from .sse import GENERATION_ROUTE_DOCS, sse_response
from .state import ServerState
from .streaming import stream_chunks


def chat_template(state: ServerState) -> ChatTemplate:
    """The served model's chat template, or a 400 saying why it has none."""
    if state.chat_template is None:
        raise RequestError(state.no_chat_template or "this model has no chat template", "messages")
    return state.chat_template


def prompt_ids(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool = False,
):
    """The ids the model is fed for these messages (atlas_server/chat_template.py)."""
    plain = [msgspec.to_builtins(m) for m in messages]
    try:
        return chat_template(state).prompt_ids(plain, add_generation_prompt, continue_final_message)
    except ChatTemplateError as e:
        raise RequestError(str(e), param=e.param) from None


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
    chat_template(state)  # before any retrieval: a model without one cannot chat
    tokenizer = state.tokenizer
    augmentation = None
    if data.rag is not None:
        plain = [msgspec.to_builtins(m) for m in data.messages]
        for i, m in enumerate(plain):  # before retrieval reads the question from them
            try:
                message_text(m.get("content"), i)
            except ChatTemplateError as e:
                raise RequestError(str(e), param=e.param) from None
        asked = (
            data.max_completion_tokens
            if data.max_completion_tokens is not None
            else data.max_tokens
        )
        augmentation = await augment(state, data.rag, messages=plain, max_tokens=asked)
        data = msgspec.structs.replace(
            data, messages=[msgspec.convert(m, ChatMessage) for m in augmentation.messages]
        )
    ids = prompt_ids(state, data.messages, data.add_generation_prompt, data.continue_final_message)
    ids = truncated(ids, data.truncate_prompt_tokens)
    # max_completion_tokens is OpenAI's newer name for max_tokens; errors name the one sent.
    param = "max_completion_tokens" if data.max_completion_tokens is not None else "max_tokens"
    asked = getattr(data, param)
    if asked == 0:
        raise RequestError(f"{param} must be >= 1 for a chat completion, got 0", param=param)
    max_tokens = max_tokens_for(
        state, len(ids), asked, state.max_model_len, param=param, prompt_param="messages"
    )
    top = data.top_logprobs or 0
    params = sampling_params(
        data,
        max_tokens,
        top if data.logprobs else None,
        None,
        end_token_ids=chat_template(state).stop_token_ids,
    )
    request_id = new_id("chatcmpl")
    start = time.perf_counter()
    state.enter()
    try:
        stream = submit(state, ids, params, request_id)
    except BaseException:
        state.leave()
        raise
    state.metrics.on_prompt(len(ids))
    timer = RequestTimer(state.metrics, start)
    created = int(time.time())
    rag = grounding(state, augmentation)
    if data.stream:
        base = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
        }
        include_usage = data.stream_options is not None and data.stream_options.include_usage
        formatter = ChatChunks(tokenizer, data.logprobs)
        return sse_response(
            stream_chunks(
                state, [stream], [0], formatter, base, timer, len(ids), include_usage, rag
            ),
            state.metrics.errors,
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
        if rag is not None:
            rag.add_citations(choice, text)
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
            **(rag.sources if rag is not None else {}),
        }
    )


class ChatChunks:
    """Chat's streamed choices: deltas, the first of each choice carrying the role."""

    def __init__(self, tokenizer: Tokenizer, logprobs: bool) -> None:
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.started: set[int] = set()

    def choice(self, index: int, event: RequestOutput, finish: str | None) -> dict | None:
        delta: dict[str, Any] = {}
        if index not in self.started:
            self.started.add(index)
            delta["role"] = "assistant"
        if event.text or not delta:
            delta["content"] = event.text
        logprobs = None
        if self.logprobs and event.logprobs:
            logprobs = chat_logprobs(self.tokenizer, event.logprobs, event.token_ids)
        # A token whose text is held back (a partial UTF-8 character) still gets its chunk
        # when logprobs were asked for, so a stream reports one entry per generated token.
        if not (delta.get("content") or "role" in delta or finish or logprobs):
            return None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
