"""The serving engine: request lifecycle, continuous-batching scheduler and KV slots.

What it does: `Engine.submit()` validates a request on the caller's thread, queues it and
returns an async stream of `RequestOutput` events bound to the caller's event loop. One
dedicated engine thread runs the model: each step it applies aborts, admits waiting
requests into free KV slots, runs one forward over every decoding sequence plus prompt
chunks within the token budget, samples, detokenizes, checks stop conditions and hands
events back with `loop.call_soon_threadsafe`.

Scheduling (iteration level): a step is one forward pass over
  1. every decoding sequence, one token each (they count against `max_batched_tokens`
     first, so running streams never stall behind a long prompt), then
  2. prompt chunks, oldest request first, each cut to what is left of the budget; a prompt
     longer than the budget is prefilled over several steps while the others keep decoding.
The step is one flattened batch (`Transformer.forward_segments`): all its tokens go
through every projection and MLP matmul together, so the weights are read once per step
(at 124M fp32, ~10 ms of DRAM traffic that a separate prompt forward would pay again), and
attention runs per segment (the decode rows as one [B, 1] batch against their KV slots,
each chunk as [1, T]), so nothing is padded: a padded [B, T] block mixing 1-token rows
with a T-token chunk would multiply the decode work by T (measured 8.5x slower for 16 rows
and a 64-token chunk). Measured against a decode forward plus separate chunk forwards
(`python bench/ab_serving.py 6efd908 de36c19`, alternating builds): +3% output throughput
with 16 streams of 128-token prompts, -2% with 4 (within the run-to-run noise).

KV memory: the model's slot cache (model/kv_cache.py), allocated once at start with
`max_running` slots of `max_model_len` positions; one slot per running sequence. Slots
rather than paged blocks because at Atlas's model sizes a full-length slot is small and
a slot is a plain slice attention reads directly (kv_cache.py gives the numbers); the
cost is that memory is reserved for the longest allowed sequence. A request whose
prompt + max_tokens exceeds `max_model_len` is refused in submit(), so an admitted
request always fits its slot. n > 1 choices prefill once and copy the prompt's KV rows
into the other choices' slots.

Prefix caching (engine/prefix_cache.py; on unless `prefix_caching=False`): a freed slot
keeps its rows, and the engine remembers which tokens they hold. A new prompt whose start
a slot already holds (a shared system prompt, the earlier turns of a chat) takes that
slot as it is, or a copy of a running sequence's rows, and prefills only the rest. Free
slots that hold nothing are used first, then the one freed longest ago.

What it does not do: HTTP, chat templates, tokenization of text (the API layer), or
preemption / swapping (the queue bound and up-front slot reservation make it unneeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..model import Transformer
from ..model.transformer import Segment
from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .prefix_cache import SlotContents
from .sampling import SamplingRow, sample, top_logprobs
from .types import (
    SEED_MAX,
    SEED_MIN,
    EngineConfig,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("atlas.engine")

MAX_LOGPROBS = 20


@dataclass
class _Choice:
    """One output sequence of a request; it owns one KV slot while it runs."""

    index: int
    slot: int
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finished: bool = False


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    emit: Callable[[RequestOutput], None]
    choices: list[_Choice] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the KV cache (of choice 0's slot)
    cached: int = 0  # of those, found already computed (prefix caching) at admission
    scheduled_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_prompt_logprobs: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)


class _RequestStream:
    """The async iterator submit() returns; closing or dropping it aborts the request."""

    def __init__(self, engine: Engine, request_id: str, n: int, queue: asyncio.Queue) -> None:
        self._engine, self.request_id = engine, request_id
        self._remaining, self._queue = n, queue

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            self._abandon()
            raise
        if event.finished:
            self._remaining -= 1
        return event

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if self._remaining:
            self._remaining = 0
            self._engine.abort(self.request_id)

    def __del__(self) -> None:
        # Garbage-collected before the end (e.g. a handler that stopped iterating).
        if getattr(self, "_remaining", 0):
            self._engine.abort(self.request_id)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class Engine:
    """Continuous-batching generation over a Transformer with a preallocated KV cache."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig) -> None:
        model_max = model.config.max_seq_len
        self.max_model_len = config.max_model_len or model_max
        if not 1 <= self.max_model_len <= model_max:
            raise ValueError(f"max_model_len={self.max_model_len} must be in [1, {model_max}]")
        if config.max_running < 1 or config.max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        if config.max_batched_tokens < config.max_running:
            raise ValueError(
                f"max_batched_tokens={config.max_batched_tokens} must be >= max_running="
                f"{config.max_running}: every decoding sequence needs a token each step"
            )
        self.model = model.prepare_for_inference()
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = model.config.vocab_size
        self.cache = model.new_cache(config.max_running, self.max_model_len)
        self._device = model.tok_emb.weight.device
        self._stop_ids_eos = tokenizer.eot_id
        self._free_slots = list(range(config.max_running - 1, -1, -1))  # pop() gives 0 first
        self._slot_contents = SlotContents()  # what free slots still hold (prefix caching)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids: set[str] = set()
        self._abort_ids: deque[str] = deque()  # appended from any thread (atomic)
        self._lock = threading.Lock()  # guards _waiting and _ids
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        # Events produced by the engine thread, grouped by the caller's loop until flushed.
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._counter = itertools.count()
        self._prompt_tokens_total = self._generation_tokens_total = self._steps_total = 0
        self._prefix_hit_tokens_total = 0
        self._step_seconds_ema = 0.05

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None) -> Engine:
        from ..checkpoint import load_checkpoint

        config = config or EngineConfig()
        ckpt = load_checkpoint(path, device=config.device, dtype=config.dtype)
        return cls(ckpt.model, ckpt.tokenizer, config)

    # --- lifecycle ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopped_unexpectedly(self) -> bool:
        """Started, not asked to stop, and its thread is gone (a bug killed it)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopping

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="atlas-engine", daemon=True)
            self._thread.start()
        return self

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, let the accepted ones finish; True if all did in time."""
        self._draining = True
        return self._idle.wait(timeout)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the engine thread; unfinished requests end with finish_reason "abort"."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._abort_all()
            self._flush_outbox()

    # --- requests -------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; returns its event stream on the running loop."""
        if self._stopping or self._draining:
            raise EngineStoppedError("the engine is shutting down")
        if self.stopped_unexpectedly:
            raise EngineStoppedError("the engine thread has stopped; the server log says why")
        prompt_ids = self._validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        request = _Request(
            request_id, prompt_ids, params, time.perf_counter(), self._emitter(loop, queue)
        )
        with self._lock:
            if request_id in self._ids:
                raise InvalidRequestError(f"request id {request_id!r} is in use", "request_id")
            # A request that a free slot takes at the next step is not "queued".
            fits_now = not self._waiting and len(self._free_slots) >= params.n
            if len(self._waiting) >= self.config.max_queued and not fits_now:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are queued (max_queued="
                    f"{self.config.max_queued})",
                    retry_after=self._retry_after(),
                )
            self._ids.add(request_id)
            self._waiting.append(request)
            self._idle.clear()
        self._wake.set()
        return _RequestStream(self, request_id, params.n, queue)

    def abort(self, request_id: str) -> None:
        """Abort a request by id (queued or running); its slots free at the next step."""
        self._abort_ids.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=sum(not c.finished for r in list(self._running) for c in r.choices),
            waiting=len(self._waiting),
            kv_slots_used=self.config.max_running - len(self._free_slots),
            kv_slots_total=self.config.max_running,
            kv_cache_bytes=self.cache.nbytes,
            prompt_tokens_total=self._prompt_tokens_total,
            prefix_cache_hit_tokens_total=self._prefix_hit_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            steps_total=self._steps_total,
        )

    def _emitter(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        def emit(event: RequestOutput) -> None:
            self._outbox.setdefault(loop, []).append((queue, event))

        return emit

    def _flush_outbox(self) -> None:
        """Hand this step's events over: one thread-safe call (one loop wake-up) per loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)

    def _retry_after(self) -> float:
        # Rough time for the queue to move by one request: a typical request's steps.
        return max(1.0, self._step_seconds_ema * 64)

    # --- validation -----------------------------------------------------------------
    def _validate(self, prompt_ids: list[int], p: SamplingParams) -> list[int]:
        def bad(message: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(message, param)

        if not prompt_ids:
            raise bad("the prompt is empty; give at least one token", "prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise bad("prompt token ids must be integers", "prompt")
        ids = list(prompt_ids)
        out_of_vocab = [t for t in ids if not 0 <= t < self.vocab_size]
        if out_of_vocab:
            raise bad(
                f"prompt token ids {out_of_vocab[:5]} are outside the vocabulary "
                f"[0, {self.vocab_size})",
                "prompt",
            )
        self._validate_params(p)
        if len(ids) + p.max_tokens > self.max_model_len:
            raise bad(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(ids)} and max_tokens asks for {p.max_tokens} more "
                f"({len(ids) + p.max_tokens}); shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        return ids

    def _validate_params(self, p: SamplingParams) -> None:
        checks: list[tuple[bool, str, str]] = [
            (p.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {p.max_tokens}"),
            (
                0 <= p.min_tokens <= p.max_tokens,
                "min_tokens",
                f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}",
            ),
            (
                math.isfinite(p.temperature) and p.temperature >= 0,
                "temperature",
                f"temperature must be >= 0, got {p.temperature}",
            ),
            (0 < p.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {p.top_p}"),
            (0 <= p.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {p.min_p}"),
            (
                -2 <= p.presence_penalty <= 2,
                "presence_penalty",
                f"presence_penalty must be in [-2, 2], got {p.presence_penalty}",
            ),
            (
                -2 <= p.frequency_penalty <= 2,
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}",
            ),
            (
                math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0,
                "repetition_penalty",
                f"repetition_penalty must be > 0, got {p.repetition_penalty}",
            ),
            (
                1 <= p.n <= self.config.max_running,
                "n",
                f"n must be in [1, {self.config.max_running}] (max_running), got {p.n}",
            ),
            (
                p.seed is None or SEED_MIN <= p.seed <= SEED_MAX,
                "seed",
                f"seed must be a 64-bit signed integer, got {p.seed}",
            ),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(p, name)
            ok = k is None or 0 <= k <= MAX_LOGPROBS
            checks.append((ok, name, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}"))
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param)
        for token, bias in p.logit_bias.items():
            if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token {token} is outside the vocabulary", "logit_bias"
                )
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequestError(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                    "logit_bias",
                )
        bad_stop_ids = [t for t in p.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop_ids:
            raise InvalidRequestError(
                f"stop_token_ids {bad_stop_ids} are outside the vocabulary", "stop_token_ids"
            )

    # --- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if self._stopping:
                self._abort_all()
                self._flush_outbox()
                return
            self._apply_aborts()
            self._admit()
            if self._running:
                self._wake.set()  # keep stepping while there is work
                started = time.perf_counter()
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as e:  # a bug or OOM must not kill the thread silently
                    log.exception("engine step failed")
                    self._fail_running(f"{type(e).__name__}: {e}")
                self._step_seconds_ema = 0.9 * self._step_seconds_ema + 0.1 * (
                    time.perf_counter() - started
                )
            self._flush_outbox()
            with self._lock:
                if not self._running and not self._waiting:
                    self._idle.set()

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._free_slots) >= self._waiting[0].params.n:
                request = self._waiting.popleft()
                try:
                    for i in range(request.params.n):
                        request.choices.append(self._new_choice(request, i))
                except Exception as e:  # a bug: fail this request, never the engine thread
                    log.exception("could not admit request %s", request.request_id)
                    self._free_slots.extend(c.slot for c in request.choices)
                    request.choices = []
                    self._ids.discard(request.request_id)
                    for i in range(request.params.n):
                        request.emit(self._final_event(request, i, "error", f"{e!r}"))
                    continue
                request.scheduled_time = time.perf_counter()
                self._running.append(request)

    def _new_choice(self, request: _Request, index: int) -> _Choice:
        p = request.params
        generator = None
        if p.seed is not None:
            # Each choice gets its own stream: distinct, and reproducible per (seed, index).
            generator = torch.Generator(device=self._device).manual_seed(p.seed + index)
        return _Choice(
            index,
            self._take_slot_for_prompt(request) if index == 0 else self._take_free_slot(),
            IncrementalDetokenizer(self.tokenizer),
            StopStringMatcher(p.stop),
            generator,
        )

    def _take_free_slot(self) -> int:
        """A free slot, sparing the ones that still hold a cached prefix: the lowest empty
        slot if any (decode batches pack into low slots), else the longest-free one."""
        empty = [s for s in self._free_slots if not self._slot_contents.holds(s)]
        slot = min(empty) if empty else self._free_slots[0]
        self._free_slots.remove(slot)
        self._slot_contents.forget(slot)
        return slot

    def _take_slot_for_prompt(self, r: _Request) -> int:
        """The slot for choice 0, with as much of the prompt's KV as the cache already holds.

        Sets r.prefilled (and r.cached) to the reused length: a free slot holding a prefix
        is taken as it is; a prefix held by a running sequence is copied into a free slot.
        """
        if not self.config.prefix_caching or r.params.prompt_logprobs is not None:
            return self._take_free_slot()
        # Lazily, and only for prompts that start alike: the token lists are built per match.
        running = (
            (c.slot, self._tokens_held(x, c)) for x in self._running for c in x.choices
            if not c.finished and x.prompt_ids[0] == r.prompt_ids[0]
        )  # fmt: skip
        length, source, source_is_free = self._slot_contents.longest_prefix(
            r.prompt_ids, self._free_slots, running
        )
        if source is None:
            return self._take_free_slot()
        if source_is_free:
            self._free_slots.remove(source)
            self._slot_contents.forget(source)
            slot = source
        else:
            slot = self._take_free_slot()
            self.cache.copy_slot(source, [slot], length)
        r.prefilled = r.cached = length
        self._prefix_hit_tokens_total += length
        return slot

    @staticmethod
    def _tokens_held(r: _Request, c: _Choice) -> list[int]:
        """The tokens whose KV rows c's slot holds: the prompt so far (choice 0 only, until
        the prompt is complete and forked), then the generated tokens but the last, which
        has not been through the model yet."""
        if r.decoding:
            return r.prompt_ids + c.output_ids[:-1]
        return r.prompt_ids[: r.prefilled] if c is r.choices[0] else []

    def _apply_aborts(self) -> None:
        while self._abort_ids:
            request_id = self._abort_ids.popleft()
            with self._lock:
                waiting = [r for r in self._waiting if r.request_id == request_id]
                for r in waiting:
                    self._waiting.remove(r)
                    self._ids.discard(request_id)
            for r in waiting:
                for i in range(r.params.n):
                    r.emit(self._final_event(r, i, "abort"))
            for r in [r for r in self._running if r.request_id == request_id]:
                self._finish_request(r, "abort")

    def _abort_all(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            for i in range(r.params.n):
                r.emit(self._final_event(r, i, "abort"))
        for r in list(self._running):
            self._finish_request(r, "abort")
        with self._lock:
            self._ids.clear()
            self._idle.set()

    def _fail_running(self, error: str) -> None:
        for r in list(self._running):
            self._finish_request(r, "error", error)

    def _finish_request(self, r: _Request, reason: FinishReason, error: str | None = None) -> None:
        """End every unfinished choice of a running request with `reason`."""
        for c in r.choices:
            if not c.finished:
                self._release(r, c)
                r.emit(self._final_event(r, c.index, reason, error))

    def _final_event(
        self, r: _Request, index: int, reason: FinishReason, error: str | None = None
    ) -> RequestOutput:
        generated = len(r.choices[index].output_ids) if r.choices else 0
        return RequestOutput(
            r.request_id,
            index,
            [],
            "",
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=len(r.prompt_ids),
            num_cached_tokens=r.cached,
            num_generated_tokens=generated,
            error=error,
            arrival_time=r.arrival_time,
            time=time.perf_counter(),
        )

    def _release(self, r: _Request, c: _Choice) -> None:
        c.finished = True
        if self.config.prefix_caching:
            self._slot_contents.remember(c.slot, self._tokens_held(r, c))
        self._free_slots.append(c.slot)
        if all(x.finished for x in r.choices):
            self._running.remove(r)
            with self._lock:
                self._ids.discard(r.request_id)

    # --- one step -------------------------------------------------------------------
    def _step(self) -> None:
        self._steps_total += 1
        decoding = [
            (r, c) for r in self._running if r.decoding for c in r.choices if not c.finished
        ]
        self._pack_decode_slots(decoding)
        # Slots 0..B-1 in order: the cache hands attention a view of every layer's KV rows
        # instead of a gather copy (at B=16 and ~190 positions, 450 MB less traffic a step).
        decoding.sort(key=lambda rc: rc[1].slot)
        budget = self.config.max_batched_tokens - len(decoding)
        chunks: list[tuple[_Request, int]] = []  # (request, prompt tokens to prefill now)
        for r in [r for r in self._running if not r.decoding]:
            if budget <= 0:
                break
            chunk = min(len(r.prompt_ids) - r.prefilled, budget)
            budget -= chunk
            chunks.append((r, chunk))
        if not decoding and not chunks:
            return
        decode_logits, chunk_logits = self._forward_step(decoding, chunks)
        rows: list[tuple[_Request, _Choice]] = list(decoding)
        logits: list[Tensor] = [decode_logits]  # [B, V]
        for (r, chunk), out in zip(chunks, chunk_logits, strict=True):
            start, end = r.prefilled, r.prefilled + chunk
            if r.params.prompt_logprobs is not None:
                self._collect_prompt_logprobs(r, out, start, end)  # out: [T, V]
            r.prefilled = end
            self._prompt_tokens_total += chunk
            if r.decoding:  # the prompt is complete: its last logits give the first token
                self._fork_prompt_kv(r)
                logits.append(out[-1:].expand(len(r.choices), -1))
                rows += [(r, c) for c in r.choices]
        if rows:
            self._sample_and_emit(rows, torch.cat(logits, dim=0))

    def _forward_step(
        self, decoding: list[tuple[_Request, _Choice]], chunks: list[tuple[_Request, int]]
    ) -> tuple[Tensor, list[Tensor]]:
        """One model forward for the whole step: the decode rows, then each prompt chunk.

        Returns the decode rows' logits [B, V] and, per chunk, the logits it needs: every
        position's [T, V] when the request wants prompt logprobs, else the last position's
        [1, V] when the chunk completes the prompt, else [0, V].
        """
        dev = self._device
        ids: list[int] = []
        segments: list[Segment] = []
        logit_rows: list[int] = list(range(len(decoding)))
        if decoding:
            ids += [c.output_ids[-1] for _, c in decoding]
            positions = [len(r.prompt_ids) + len(c.output_ids) - 1 for r, c in decoding]
            slots = [c.slot for _, c in decoding]
            n = len(decoding)
            consecutive = slots == list(range(slots[0], slots[0] + n))
            segments.append(
                Segment(
                    0,
                    n,
                    n,
                    1,
                    torch.tensor(slots, device=dev),
                    torch.tensor(positions, device=dev)[:, None],
                    kv_length=max(positions) + 1,
                    first_slot=slots[0] if consecutive else None,
                )
            )
        wanted: list[int] = []  # logit rows per chunk
        for r, chunk in chunks:
            start, end, at = r.prefilled, r.prefilled + chunk, len(ids)
            ids += r.prompt_ids[start:end]
            slot = r.choices[0].slot
            segments.append(
                Segment(
                    at,
                    at + chunk,
                    1,
                    chunk,
                    torch.tensor([slot], device=dev),
                    torch.arange(start, end, device=dev)[None],
                    kv_length=end,
                    first_slot=slot,
                )
            )
            if r.params.prompt_logprobs is not None:
                rows = list(range(at, at + chunk))
            else:
                rows = [at + chunk - 1] if end == len(r.prompt_ids) else []
            logit_rows += rows
            wanted.append(len(rows))
        out = self.model.forward_segments(
            torch.tensor(ids, device=dev),
            segments,
            self.cache,
            torch.tensor(logit_rows, dtype=torch.long, device=dev),
        ).float()  # [R, V]
        decode_logits, *per_chunk = out.split([len(decoding), *wanted])
        return decode_logits, per_chunk

    def _pack_decode_slots(self, decoding: list[tuple[_Request, _Choice]]) -> None:
        """Move decoding sequences into slots 0..B-1 (B = len(decoding)).

        A finished sequence leaves a hole that a new, still-prefilling request often takes,
        which would make attention gather the decode batch's KV rows every step. Instead, a
        decoding sequence above the first B slots trades places with whatever holds a low
        slot (a free slot, or a prefilling choice whose rows come along), once, at the
        transition: a copy of each moved sequence's filled positions.
        """
        n = len(decoding)
        misplaced = [(r, c) for r, c in decoding if c.slot >= n]
        if not misplaced:
            return
        held = {c.slot: (r, c) for r in self._running for c in r.choices if not c.finished}
        decoding_slots = {c.slot for _, c in decoding}
        holes = [s for s in range(n) if s not in decoding_slots]
        for (r, c), hole in zip(misplaced, holes, strict=True):
            length = len(r.prompt_ids) + len(c.output_ids)
            other = held.get(hole)
            if other is None:  # a free slot
                self.cache.copy_slot(c.slot, [hole], length)
                self._free_slots[self._free_slots.index(hole)] = c.slot
                self._slot_contents.forget(hole)
                if self.config.prefix_caching:  # the old slot still holds c's rows
                    self._slot_contents.remember(c.slot, self._tokens_held(r, c))
            else:  # a prefilling request's choice: its rows move up into c's slot
                self.cache.swap_slots(c.slot, hole, max(length, other[0].prefilled))
                other[1].slot = c.slot
            c.slot = hole

    def _collect_prompt_logprobs(self, r: _Request, logits: Tensor, start: int, end: int) -> None:
        if r.prompt_logprobs is None:
            r.prompt_logprobs = [None]  # the first prompt token has no context to score it
        # Logits at position i predict prompt token i + 1; the prompt's last position
        # predicts the first generated token, which is not a prompt logprob.
        targets = r.prompt_ids[start + 1 : end + 1]
        if targets:
            chosen = torch.tensor(targets, device=logits.device)
            r.prompt_logprobs += top_logprobs(
                logits[: len(targets)], chosen, r.params.prompt_logprobs or 0
            )

    def _fork_prompt_kv(self, r: _Request) -> None:
        """Copy choice 0's prompt KV rows into the slots of choices 1..n-1."""
        if len(r.choices) == 1:
            return
        self.cache.copy_slot(r.choices[0].slot, [c.slot for c in r.choices[1:]], len(r.prompt_ids))

    def _sample_and_emit(self, rows: list[tuple[_Request, _Choice]], logits: Tensor) -> None:
        eos = self._stop_ids_eos
        sampling_rows = [
            SamplingRow(
                r.params,
                r.prompt_ids,
                c.output_ids,
                c.generator,
                tuple(r.params.stop_token_ids)
                + ((eos,) if eos is not None and not r.params.ignore_eos else ()),
            )
            for r, c in rows
        ]
        tokens = sample(logits, sampling_rows)  # [N]
        wanted = [r.params.logprobs for r, _ in rows]
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if any(k is not None for k in wanted):
            entries = top_logprobs(logits, tokens, max(k or 0 for k in wanted))  # type: ignore[assignment]
            for entry, k in zip(entries, wanted, strict=True):
                if entry is not None and k is not None and len(entry.top) > k:
                    entry.top = dict(itertools.islice(entry.top.items(), k))
        now = time.perf_counter()
        for (r, c), token, entry in zip(rows, tokens.tolist(), entries, strict=True):
            self._append_token(r, c, token, entry if r.params.logprobs is not None else None, now)

    def _append_token(
        self, r: _Request, c: _Choice, token: int, entry: TokenLogprob | None, now: float
    ) -> None:
        p = r.params
        c.output_ids.append(token)
        self._generation_tokens_total += 1
        first = c.first_token_time is None
        if first:
            c.first_token_time = now
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        text = ""
        if token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif token == self._stop_ids_eos and not p.ignore_eos:
            reason = "stop"
        else:
            text, matched = c.stops.feed(c.detok.add(token), len(c.output_ids) >= p.min_tokens)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and len(c.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None and not isinstance(stop_reason, str):
            tail, matched = self._flush_tail(c, p)
            text += tail
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is not None:
            self._release(r, c)
        send_prompt_lp = (
            c.index == 0 and not r.sent_prompt_logprobs and r.prompt_logprobs is not None
        )
        if send_prompt_lp:
            r.sent_prompt_logprobs = True
        r.emit(
            RequestOutput(
                r.request_id,
                c.index,
                [token],
                text,
                logprobs=[entry] if entry is not None else None,
                prompt_logprobs=r.prompt_logprobs if send_prompt_lp else None,
                finished=reason is not None,
                finish_reason=reason,
                stop_reason=stop_reason,
                num_prompt_tokens=len(r.prompt_ids),
                num_cached_tokens=r.cached,
                num_generated_tokens=len(c.output_ids),
                queue_time_s=(r.scheduled_time or now) - r.arrival_time if first else None,
                arrival_time=r.arrival_time,
                first_token_time=c.first_token_time,
                time=now,
            )
        )

    @staticmethod
    def _flush_tail(c: _Choice, p: SamplingParams) -> tuple[str, str | None]:
        """Held text at the end of a stream, and a stop string that still matched in it."""
        text, matched = c.stops.feed(c.detok.flush(), len(c.output_ids) >= p.min_tokens)
        return (text, matched) if matched is not None else (text + c.stops.flush(), None)
