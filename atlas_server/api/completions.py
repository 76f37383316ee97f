"""`POST /v1/completions`: the OpenAI text-completion endpoint.

What it does: accepts a prompt as a string, a list of strings, token ids or a list of
token-id lists; submits every prompt (each with `n` choices, indexed prompt-major as
OpenAI does) to the engine; answers with one JSON body or a Server-Sent Events stream;
supports `echo` + `logprobs` exactly as lm-evaluation-harness's `local-completions` uses
them for log-likelihoods (the prompt's tokens first, `null` for the first one), and
`max_tokens: 0` with echo to score a prompt without generating.
What it does not do: chat templates (see `chat.py`) or retrieval (the RAG augmenter).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, post
from litestar.response import Response

from .errors import RequestError
from .generation import (
    augment,
    check_model,
    check_ready,
    collect,
    completion_logprobs,
    default_max_tokens,
    merged_events,
    new_id,
    rag_sources,
    sampling_params,
    submit,
    until_disconnect,
    usage,
)
from .metrics import RequestTimer
from .schemas import CompletionRequest
from .sse import GENERATION_ROUTE_DOCS, sse_error, sse_event, sse_response
from .state import ServerState


def prompts_of(req: CompletionRequest, state: ServerState) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt."""
    tokenizer = state.tokenizer
    vocab = tokenizer.vocab_size
    raw = req.prompt
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise RequestError("prompt must not be empty", param="prompt")
    if len({type(x) for x in items}) > 1:
        raise RequestError(
            "a prompt list must hold only strings or only token-id lists", param="prompt"
        )
    if len(items) > 64:
        raise RequestError("at most 64 prompts per request", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            text = item
        elif isinstance(item, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in item
        ):
            bad = [x for x in item if not 0 <= x < vocab]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
                )
            ids, text = list(item), tokenizer.decode(item)
        else:
            raise RequestError(
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of token-id lists",
                param="prompt",
            )
        if not ids:
            raise RequestError("prompt must contain at least one token", param="prompt")
        prompts.append((ids, text))
    return prompts


def _choice_body(state: ServerState, req: CompletionRequest, choice, prompt, prompt_lp, citations):
    ids, prompt_text = prompt
    generated = "".join(choice.text)
    text = prompt_text + generated if req.echo else generated
    logprobs = None
    if req.logprobs is not None:
        entries, token_ids = list(choice.logprobs), list(choice.token_ids)
        if req.echo:
            prompt_entries = prompt_lp or [None] * len(ids)
            entries = list(prompt_entries) + entries
            token_ids = list(ids) + token_ids
        logprobs = completion_logprobs(state.tokenizer, entries, token_ids, 0)
    body = {
        "index": choice.index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }
    if citations is not None:
        body["citations"], body["dropped_citations"] = citations(generated)
    return body


@post(
    "/v1/completions",
    status_code=200,
    summary="Create a completion (OpenAI-compatible)",
    **GENERATION_ROUTE_DOCS,
)
async def create_completion(request: Request, data: CompletionRequest) -> Any:
    state: ServerState = request.app.state.atlas
    data.check_ranges()
    check_ready(state)
    check_model(state, data.model)
    augmentation = None
    if data.rag is not None:
        if not isinstance(data.prompt, str):
            raise RequestError("rag needs the prompt as one string", param="rag")
        augmentation = await augment(
            state, data.rag, prompt=data.prompt, max_tokens=data.max_tokens
        )
        data = msgspec.structs.replace(data, prompt=augmentation.prompt)
    prompts = prompts_of(data, state)
    start = time.perf_counter()
    want_prompt_lp = data.logprobs if (data.echo and data.logprobs is not None) else None
    request_id = new_id("cmpl")
    streams, offsets = [], []
    state.enter()
    try:
        for i, (ids, _) in enumerate(prompts):
            max_tokens = default_max_tokens(state, len(ids), data.max_tokens, 16)
            if max_tokens == 0 and not (data.echo and not data.stream):
                raise RequestError(
                    "max_tokens 0 (scoring the prompt only) needs echo and no streaming",
                    param="max_tokens",
                )
            # Scoring only: the engine generates one token, which the response leaves out.
            params = sampling_params(data, max(1, max_tokens), data.logprobs, want_prompt_lp)
            streams.append(submit(state, ids, params, f"{request_id}-{i}"))
            offsets.append(i * data.n)
            state.metrics.prompt_tokens.inc(len(ids))
    except BaseException:
        for s in streams:
            await s.aclose()
        state.leave()
        raise
    timer = RequestTimer(state.metrics, start)
    created = int(time.time())
    if data.stream:
        # A RAG stream ends each choice with its citations and the sources it was given.
        cite = (
            (lambda text: state.augmenter.citations(augmentation, text)) if augmentation else None
        )
        rag = (cite, rag_sources(state, augmentation))
        return sse_response(
            _stream(state, data, prompts, streams, offsets, timer, request_id, created, rag)
        )
    try:
        choices = await until_disconnect(
            request, collect(state, streams, offsets, len(prompts) * data.n, timer)
        )
    finally:
        state.leave()
    if data.max_tokens == 0:
        for c in choices:
            c.token_ids, c.text, c.logprobs, c.finish_reason, c.stop_reason = (
                [],
                [],
                [],
                "length",
                None,
            )
    prompt_lps: dict[int, list] = {}
    for c in choices:
        if c.prompt_logprobs is not None:
            prompt_lps[c.index // data.n] = c.prompt_logprobs
    cite = None
    if augmentation is not None:

        def cite(text: str):
            return state.augmenter.citations(augmentation, text)

    body_choices = [
        _choice_body(
            state, data, c, prompts[c.index // data.n], prompt_lps.get(c.index // data.n), cite
        )
        for c in choices
    ]
    completion_tokens = sum(len(c.token_ids) for c in choices)
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    cached_tokens = sum(c.cached_tokens for c in choices if c.index % data.n == 0)
    return Response(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": body_choices,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
            **rag_sources(state, augmentation),
        }
    )


async def _stream(
    state, data: CompletionRequest, prompts, streams, offsets, timer, request_id, created, rag
):
    cite, sources = rag
    generated: dict[int, list[str]] = {}  # generated text per choice, for citations
    base = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": state.model_name,
    }
    completion_tokens = 0
    cached: dict[int, int] = {}  # prompt index -> its tokens served by the prefix cache
    echoed: set[int] = set()
    prompt_lp: dict[int, list] = {}
    try:
        async for offset, event in merged_events(streams, offsets):
            index = offset + event.index
            ids, prompt_text = prompts[index // data.n]
            timer.on_queue_time(event.queue_time_s)
            timer.on_tokens(index, time.perf_counter(), len(event.token_ids))
            completion_tokens += len(event.token_ids)
            cached[index // data.n] = event.num_cached_tokens
            text = event.text
            if cite is not None:
                generated.setdefault(index, []).append(event.text)
            logprobs = None
            first_of_choice = data.echo and index not in echoed
            if first_of_choice:
                echoed.add(index)
                text = prompt_text + text
            if data.logprobs is not None:
                entries, token_ids = list(event.logprobs or []), list(event.token_ids)
                if event.prompt_logprobs is not None:
                    prompt_lp[index // data.n] = event.prompt_logprobs
                if first_of_choice:
                    entries = list(prompt_lp.get(index // data.n) or [None] * len(ids)) + entries
                    token_ids = list(ids) + token_ids
                logprobs = completion_logprobs(state.tokenizer, entries, token_ids, 0)
            if event.finished and event.finish_reason == "error":
                yield sse_error(500, f"generation failed: {event.error or 'engine error'}")
                return
            finish = None
            if event.finished:
                finish = "stop" if event.finish_reason == "stop" else "length"
            if text or finish or event.token_ids:
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
                if finish:
                    choice["stop_reason"] = event.stop_reason
                    if cite is not None:
                        cited = cite("".join(generated[index]))
                        choice["citations"], choice["dropped_citations"] = cited
                yield sse_event({**base, "choices": [choice], **(sources if finish else {})})
        timer.on_finish(time.perf_counter(), "stream")
        if data.stream_options is not None and data.stream_options.include_usage:
            prompt_tokens = sum(len(ids) for ids, _ in prompts)
            total = usage(prompt_tokens, completion_tokens, sum(cached.values()))
            yield sse_event({**base, "choices": [], "usage": total})
    finally:
        state.leave()
