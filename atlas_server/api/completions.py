"""`POST /v1/completions`: the OpenAI text-completion endpoint.

What it does: accepts a prompt as a string, a list of strings, token ids or a list of
token-id lists; submits every prompt (each with `n` choices, indexed prompt-major as
OpenAI does) to the engine; answers with one JSON body or a Server-Sent Events stream (the generator both routes
share, streaming.py);
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

from ..engine.types import RequestOutput
from ..tokenizer import Tokenizer
from .errors import RequestError
from .generation import (
    Grounding,
    TextOffsets,
    augment,
    check_model,
    check_ready,
    collect,
    completion_logprobs,
    encode_text,
    grounding,
    max_tokens_for,
    new_id,
    sampling_params,
    submit,
    truncated,
    until_disconnect,
    usage,
)
from .metrics import RequestTimer
from .schemas import CompletionRequest
from .sse import GENERATION_ROUTE_DOCS, sse_response
from .state import ServerState
from .streaming import stream_chunks


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
    # Each prompt is its own engine request, and all but an idle server's first one wait
    # in the queue: a list longer than the queue could never be admitted, so it is a 400
    # here rather than a 429 that a client would retry forever.
    max_queued = state.engine.config.max_queued
    if len(items) > max(1, max_queued):
        raise RequestError(
            f"this server queues at most {max_queued} requests (engine.max_queued), so it "
            f"cannot take {len(items)} prompts in one request; send at most {max(1, max_queued)}",
            param="prompt",
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids, text = encode_text(state, item, req.add_special_tokens is not False)
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
        kept = truncated(ids, req.truncate_prompt_tokens)
        if len(kept) < len(ids):  # an echo shows the prompt the model read
            ids, text = kept, tokenizer.decode(kept)
        prompts.append((ids, text))
    return prompts


def text_prompts(req: CompletionRequest) -> bool:
    """Whether the prompts are text (which add_special_tokens applies to), not token ids."""
    raw = req.prompt
    text = isinstance(raw, str) or bool(raw) and isinstance(raw[0], str)
    return text and req.add_special_tokens is not False


def _choice_body(
    state: ServerState, req: CompletionRequest, choice, prompt, prompt_lp, rag: Grounding | None
):
    ids, prompt_text = prompt
    generated = "".join(choice.text)
    text = prompt_text + generated if req.echo else generated
    logprobs = None
    if req.logprobs is not None:
        entries, token_ids = list(choice.logprobs), list(choice.token_ids)
        offsets = TextOffsets(state.tokenizer, req.skip_special_tokens)
        starts = offsets.prompt(ids) if req.echo else []
        starts += offsets.generated(token_ids)
        if req.echo:
            prompt_entries = prompt_lp or [None] * len(ids)
            entries = list(prompt_entries) + entries
            token_ids = list(ids) + token_ids
        logprobs = completion_logprobs(state.tokenizer, entries, token_ids, starts)
    body = {
        "index": choice.index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }
    if rag is not None:
        rag.add_citations(body, generated)
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
        # Tokens the server put around each text prompt (an imported Llama 3's BOS): an
        # error about the context names them, since the client never sent them.
        before, after = state.engine.text_adds
        added = len(before) + len(after) if text_prompts(data) else 0
        for i, (ids, _) in enumerate(prompts):
            max_tokens = max_tokens_for(state, len(ids), data.max_tokens, 16, added=added)
            if max_tokens == 0 and not (data.echo and not data.stream):
                raise RequestError(
                    "max_tokens 0 (scoring the prompt only) needs echo and no streaming",
                    param="max_tokens",
                )
            # Scoring only: the engine generates one token, which the response leaves out.
            params = sampling_params(data, max(1, max_tokens), data.logprobs, want_prompt_lp)
            streams.append(submit(state, ids, params, f"{request_id}-{i}"))
            offsets.append(i * data.n)
            state.metrics.on_prompt(len(ids))
    except BaseException:
        for s in streams:
            await s.aclose()
        state.leave()
        raise
    timer = RequestTimer(state.metrics, start)
    created = int(time.time())
    rag = grounding(state, augmentation)
    if data.stream:
        base = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
        }
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        include_usage = data.stream_options is not None and data.stream_options.include_usage
        formatter = CompletionChunks(state.tokenizer, data, prompts)
        return sse_response(
            stream_chunks(
                state, streams, offsets, formatter, base, timer, prompt_tokens, include_usage, rag
            ),
            state.metrics.errors,
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
    body_choices = [
        _choice_body(
            state, data, c, prompts[c.index // data.n], prompt_lps.get(c.index // data.n), rag
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
            **(rag.sources if rag is not None else {}),
        }
    )


class CompletionChunks:
    """Completions' streamed choices: text (after the echoed prompt, with `echo`) and
    logprobs in the completions shape."""

    def __init__(self, tokenizer: Tokenizer, req: CompletionRequest, prompts) -> None:
        self.tokenizer, self.req, self.prompts = tokenizer, req, prompts
        self.echoed: set[int] = set()
        self.prompt_lp: dict[int, list] = {}  # prompt index -> its prompt logprobs
        # choice index -> its text offsets: they run on across chunks, as in the
        # non-streamed response (and vLLM's stream)
        self.offsets: dict[int, TextOffsets] = {}

    def choice(self, index: int, event: RequestOutput, finish: str | None) -> dict | None:
        req = self.req
        prompt = index // req.n
        ids, prompt_text = self.prompts[prompt]
        text = event.text
        first = req.echo and index not in self.echoed
        if first:
            self.echoed.add(index)
            text = prompt_text + text
        logprobs = None
        if req.logprobs is not None:
            entries, token_ids = list(event.logprobs or []), list(event.token_ids)
            if event.prompt_logprobs is not None:
                self.prompt_lp[prompt] = event.prompt_logprobs
            offsets = self.offsets.setdefault(
                index, TextOffsets(self.tokenizer, req.skip_special_tokens)
            )
            starts = offsets.prompt(ids) if first else []
            starts += offsets.generated(token_ids)
            if first:
                entries = list(self.prompt_lp.get(prompt) or [None] * len(ids)) + entries
                token_ids = list(ids) + token_ids
            logprobs = completion_logprobs(self.tokenizer, entries, token_ids, starts)
        if not (text or finish or event.token_ids):
            return None
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish:
            choice["stop_reason"] = event.stop_reason
        return choice
