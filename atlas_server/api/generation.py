"""Shared machinery of the two generation routes (completions and chat completions).

What it does: turns request fields into engine `SamplingParams`, submits prompts to the
engine, merges the event streams of several prompts, aborts everything when the client
goes away, accumulates choices, formats logprobs in the OpenAI completions shape and keeps
JSON finite. What it does not do: the route-specific response shapes (see
`completions.py` and `chat.py`).

Token strings in logprobs: a token whose bytes are valid UTF-8 is shown as that text; a
token holding part of a multi-byte character is shown as `bytes:\\xe2\\x80` (the escaped
bytes), the convention vLLM and OpenAI use, so clients can still rebuild the bytes.
`text_offset` counts characters of the choice's text before the token, the text built
as the engine builds it (TextOffsets): the tokens that together make one character all
start where that character does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request

from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.types import (
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from ..tokenizer import Tokenizer
from .errors import (
    APIError,
    ClientDisconnected,
    RequestError,
    ServerDraining,
    ShutDownBeforeFinishing,
)
from .metrics import RequestTimer
from .schemas import _SamplingFields
from .state import ServerState

log = logging.getLogger("atlas.api")

# JSON has no -inf/NaN; a log-probability this low means "impossible" to every client.
LOGPROB_FLOOR = -9999.0


def finite(x: float | None) -> float | None:
    if x is None:
        return None
    if math.isnan(x) or x < LOGPROB_FLOOR:
        return LOGPROB_FLOOR
    return float(x)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def encode_text(state: ServerState, text: str, add_special_tokens: bool) -> tuple[list[int], str]:
    """(ids, text as the model reads it) of a text prompt. With `add_special_tokens`, the
    ids the checkpoint's source tokenizer adds around every text (an imported Llama 3's
    <|begin_of_text|>, Engine.text_adds) go around it, as HF's `encode(text)` and vLLM's
    completions put them; the text then shows them too, so an echo's `text_offset`s point
    into the text it returns."""
    ids = state.tokenizer.encode(text)
    if not add_special_tokens:
        return ids, text
    before, after = state.engine.text_adds
    if not before and not after:
        return ids, text
    decode = state.tokenizer.decode
    return before + ids + after, decode(before) + text + decode(after)


def truncated(ids: list[int], keep: int | None) -> list[int]:
    """The prompt's last `keep` tokens (vLLM's `truncate_prompt_tokens`); all when None."""
    return ids if keep is None or len(ids) <= keep else ids[-keep:]


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def check_ready(state: ServerState) -> None:
    if state.draining:
        raise ServerDraining
    if not state.ready:
        message = (
            "the model is still loading"
            if state.load_error is None
            else (f"the model failed to load: {state.load_error}")
        )
        raise APIError(503, message, headers={"Retry-After": "2"})


def sampling_params(
    req: _SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    end_token_ids: tuple[int, ...] = (),
) -> SamplingParams:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=0 if req.top_k is None or req.top_k < 0 else req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        seed=req.seed,
        stop=stops,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        # The chat template's end-of-turn ids are the chat route's EOS: no stop_reason, and
        # ignore_eos (vLLM's, for fixed-length benchmarks) ignores them too.
        end_token_ids=end_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=req.n,
    )


def max_tokens_for(
    state: ServerState,
    prompt_len: int,
    asked: int | None,
    fallback: int,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
    added: int = 0,
) -> int:
    """How many tokens to generate after a prompt, checked the OpenAI way: prompt +
    max_tokens within the context. `asked` is the client's value (under the name `param`);
    without one, `fallback` (completions: 16; chat: until the context is full) cut to what
    the context leaves, and a prompt that leaves nothing is refused as such. An asked 0
    (completions' scoring) needs one position past the prompt: the engine computes the
    prompt's logprobs while generating one token that the response leaves out. `added`:
    how many of the prompt's tokens the server put around a text prompt (encode_text),
    which a refusal names, since the client did not send them."""
    limit = state.max_model_len
    counted = (
        f" (including {added} the model's tokenizer adds to every text, such as its BOS; "
        '"add_special_tokens": false leaves them out)'
        if added
        else ""
    )
    if prompt_len > limit or (asked is None and prompt_len == limit):
        why = "more than that" if prompt_len > limit else "which leaves nothing to generate"
        raise RequestError(
            f"this model's maximum context length is {limit} tokens and the {prompt_param} "
            f"take {prompt_len}{counted}, {why}; shorten the {prompt_param}"
            if prompt_param == "messages"
            else f"this model's maximum context length is {limit} tokens and the "
            f"{prompt_param} has {prompt_len}{counted}, {why}; shorten the {prompt_param}",
            param=prompt_param,
        )
    if asked == 0 and prompt_len == limit:
        raise RequestError(
            f"this model's maximum context length is {limit} tokens; scoring a prompt "
            f"(max_tokens 0) takes one position past it, so it can have at most {limit - 1} "
            f"tokens, and this one has {prompt_len}{counted}; shorten the {prompt_param}",
            param=prompt_param,
        )
    if asked is None:
        return min(fallback, limit - prompt_len)
    if prompt_len + asked > limit:
        raise RequestError(
            f"this model's maximum context length is {limit} tokens; the {prompt_param} has "
            f"{prompt_len}{counted} and {param} asks for {asked} more ({prompt_len + asked}); shorten "
            f"the {prompt_param} or lower {param}",
            param=param,
        )
    return asked


def finish_reason(event: RequestOutput) -> str:
    """OpenAI's finish_reason of a finished choice: "stop" or "length".

    Aborts and engine errors never reach a client as a finish: `merged_events` turns an
    abort into a 503 and `raise_if_failed` an error into a 500 (an error event when
    streaming), on both routes.
    """
    return "stop" if event.finish_reason == "stop" else "length"


def raise_if_failed(event: RequestOutput) -> None:
    """An engine error on a choice fails the whole request (500, with the engine's reason)."""
    if event.finished and event.finish_reason == "error":
        raise APIError(500, f"generation failed: {event.error or 'engine error'}")


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cached_tokens: int = 0  # of its prompt's tokens, those served by the prefix cache

    def add(self, event: RequestOutput) -> None:
        self.cached_tokens = event.num_cached_tokens
        self.token_ids += event.token_ids
        self.text.append(event.text)
        if event.logprobs:
            self.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            self.finish_reason = finish_reason(event)
            self.stop_reason = event.stop_reason


def submit(state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str):
    """engine.submit with its refusals mapped to HTTP errors."""
    try:
        return state.engine.submit(prompt_ids, params, request_id=request_id)
    except InvalidRequestError as e:
        raise RequestError(str(e), param=e.param) from None
    except QueueFullError as e:
        raise APIError(
            429,
            f"the server is at capacity: {e}",
            code="queue_full",
            headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))},
        ) from None
    except EngineStoppedError as e:
        raise APIError(503, f"the engine is not accepting requests: {e}") from None


def _check_not_aborted(event: RequestOutput) -> RequestOutput:
    # The engine aborts a request for two reasons: its client went away (then nobody reads
    # this), or the engine shut down, which the client must hear as an error, not a finish.
    if event.finished and event.finish_reason == "abort":
        raise ShutDownBeforeFinishing
    return event


async def merged_events(streams: list[AsyncIterator[RequestOutput]], offsets: list[int]):
    """Interleave several engine streams; yields (global choice offset, event).

    Raises ShutDownBeforeFinishing (503) if the engine aborts a request under it.
    """
    if len(streams) == 1:
        async for event in streams[0]:
            yield offsets[0], _check_not_aborted(event)
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            async for event in streams[i]:
                await queue.put((offsets[i], event))
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield item[0], _check_not_aborted(item[1])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Make sure every engine stream is closed (this aborts unfinished requests).
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


async def until_disconnect(request: Request, work) -> Any:
    """Run `work` (a coroutine); if the client disconnects first, cancel it and raise
    ClientDisconnected (answered quietly, see errors.py)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected
        return task.result()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def collect(
    state: ServerState, streams, offsets, n_choices: int, timer: RequestTimer
) -> list[Choice]:
    choices = [Choice(i) for i in range(n_choices)]
    async for offset, event in merged_events(streams, offsets):
        raise_if_failed(event)
        choice = choices[offset + event.index]
        choice.add(event)
        timer.on_queue_time(event.queue_time_s)
        timer.on_tokens(choice.index, time.perf_counter(), len(event.token_ids))
    timer.on_finish(time.perf_counter(), [c.finish_reason for c in choices if c.finish_reason])
    return choices


class TextOffsets:
    """Where each token's text starts in one choice's text: the echoed prompt (every token
    shown, as `decode` gives it), then the generated text (as the engine's detokenizer
    emits it: special tokens left out when it skips them). Counting per token instead,
    two tokens that split one character would each count a U+FFFD and every later offset
    would drift. One instance per choice; in a stream it carries across chunks."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._position = 0
        self._generated: IncrementalDetokenizer | None = None

    def prompt(self, ids: list[int]) -> list[int]:
        detok = IncrementalDetokenizer(self._tokenizer, skip_special_tokens=False)
        starts = self._advance(detok, ids)
        self._position += len(detok.flush())  # the echo ends an incomplete char as U+FFFD
        return starts

    def generated(self, ids: list[int]) -> list[int]:
        if self._generated is None:
            self._generated = IncrementalDetokenizer(self._tokenizer, self._skip)
        return self._advance(self._generated, ids)

    def _advance(self, detok: IncrementalDetokenizer, ids: list[int]) -> list[int]:
        starts = []
        for token_id in ids:
            starts.append(self._position)
            self._position += len(detok.add(token_id))
        return starts


def completion_logprobs(
    tokenizer: Tokenizer,
    entries: list[TokenLogprob | None],
    token_ids: list[int],
    offsets: list[int],
) -> dict[str, Any]:
    """The OpenAI completions `logprobs` object for `token_ids` (entries and `offsets`,
    from TextOffsets, align with them)."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(finite(entry.logprob))
        top = {token_text(tokenizer, t): finite(lp) for t, lp in entry.top.items()}
        top.setdefault(text, finite(entry.logprob))  # like vLLM: the chosen token is always listed
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets[: len(tokens)],
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` counts prompt tokens the prefix cache served."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Grounding:
    """What a RAG answer adds to each finished choice (citations of its text) and to the
    response (`sources`: every source the prompt numbered, in prompt order)."""

    cite: Callable[[str], tuple[list[dict[str, Any]], int]]
    sources: dict[str, Any]

    def add_citations(self, choice: dict[str, Any], text: str) -> None:
        choice["citations"], choice["dropped_citations"] = self.cite(text)


def grounding(state: ServerState, augmentation) -> Grounding | None:
    """The Grounding of an augmented request, or None without RAG."""
    if augmentation is None:
        return None
    augmenter = state.augmenter
    sources = {"sources": augmenter.sources(augmentation)} if hasattr(augmenter, "sources") else {}
    return Grounding(lambda text: augmenter.citations(augmentation, text), sources)


async def augment(
    state: ServerState,
    rag,
    prompt: str | None = None,
    messages: list | None = None,
    max_tokens: int | None = None,
):
    """Run the RAG augmenter, naming the failing plugin if it raises."""
    if state.augmenter is None:
        raise RequestError(
            "this server has no RAG enabled; start it with RAG configured or drop the `rag` field",
            param="rag",
        )
    try:
        # Leave room for the answer (16 tokens when the client set no max_tokens). A chat's
        # messages are counted as the ids its template renders, so the prompt may take
        # the rest; a text prompt's count leaves out the tokens the server adds around it
        # (a BOS), hence its 16 spare.
        answer = max_tokens if max_tokens is not None else 16
        budget = state.max_model_len - answer - (16 if prompt is not None else 0)
        return await state.augmenter.augment(rag, prompt, messages, max_prompt_tokens=budget)
    except APIError:
        raise
    except Exception as e:  # an augmenter of an embedding application, failing its own way
        log.error("the prompt augmenter failed", exc_info=e)
        raise APIError(
            502,
            f"the retrieval pipeline failed: {type(e).__name__}: {e}",
            param="rag",
            code="plugin_error",
        ) from None
