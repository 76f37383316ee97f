"""The serving engine: the engine thread, the request inbox, and the step loop.

What it does: `Engine.submit()` validates a request on the caller's thread (its
`SamplingParams` against this engine's limits), puts it in the inbox and returns an async
stream of `RequestOutput` events bound to the caller's event loop. `abort()`, `drain()`,
`shutdown()` and `stats()` may be called from any thread. One dedicated engine thread runs
everything else, one step at a time, along the data flow:

    inbox -> Scheduler.schedule() -> StepPlan -> ModelRunner.execute() -> StepLogits
          -> OutputProcessor.launch() / take_tokens() / emit_text() -> events,
             finished sequences -> Scheduler.finish()

  - scheduler.py: admission, KV slots, prefix reuse and packing under `max_batched_tokens`;
    returns a plain plan (which sequences decode in which slots, which prompt chunks
    prefill, which slot copies and moves come first);
  - runner.py: executes the plan on the model and its KV cache (the eager runner on the
    CPU; on CUDA cuda_runner.py's, with decode steps replayed from captured graphs);
  - output.py: sampling, incremental detokenizing, stop conditions, events.
The step's events go to each caller's loop with one `loop.call_soon_threadsafe` per loop.

Overlap (`EngineConfig.overlap`, on by default on CUDA): the host never waits for the
device with nothing queued behind. While step N's forward and sampling run, the engine
schedules step N+1 and queues its forward, each decode row's input token taken from step
N's sampled ids on the device (the plan says which row; the host has not read them yet).
Only then does it read step N's tokens (one copy, queued right behind N's sampling with
an event after it: the host waits for that event, not for N+1's forward), append them and
decide token-level finishes (stop token ids, EOS, max_tokens), queue step N+1's sampling, and detokenize, match stop strings and emit step
N's events while the device runs step N+1. Sampling is queued after the read on purpose:
penalties, min_tokens and seeded streams then see every earlier token, so they need no
device-side copy of the output history, and the forward, most of a step, is what overlaps.
A sequence that step N finished was already in step N+1's forward: that row is computed
and not sampled (max_tokens is known ahead, so a sequence whose step-N token is its last
is not scheduled at all). A stop string found in step N's text ends a sequence whose
step-N+1 token is already sampled: that token is dropped (never appended, no event). Its
slot is freed at once: anything that reuses the slot is queued after step N+1 on the same
stream. Outputs are the same as without overlap (tests/test_engine.py runs every test both
ways); events reach callers one step later, and an abort drops the token in flight. On the
CPU the forward and the host work share the same cores, so there is nothing to gain and it
is off.

KV memory: the model's slot cache (model/kv_cache.py), allocated once at start with
`max_running` slots of `max_model_len` positions; one slot per running sequence. Slots
rather than paged blocks because at Atlas's model sizes a full-length slot is small and
a slot is a plain slice attention reads directly (kv_cache.py gives the numbers); the
cost is that memory is reserved for the longest allowed sequence. A request whose
prompt + max_tokens exceeds `max_model_len` is refused in submit(), so an admitted
request always fits its slot. n > 1 choices prefill once and copy the prompt's KV rows
into the other choices' slots. Prefix caching (on unless `prefix_caching=False`) is the
scheduler's: see scheduler.py and prefix_cache.py.

What it does not do: HTTP, chat templates, tokenization of text (the API layer), or
preemption / swapping (the queue bound and up-front slot reservation make it unneeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model import Transformer
from ..tokenizer import Tokenizer
from .output import Emit, OutputProcessor, PendingStep
from .request import Request
from .runner import ModelRunner, make_runner, resolve_dtype, resolve_max_running
from .scheduler import Scheduler, StepPlan
from .types import (
    EngineConfig,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    validate_prompt,
)

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

log = logging.getLogger("atlas.engine")


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


def default_overlap(device: torch.device) -> bool:
    """Overlap host work with the device's where there is a separate device: CUDA."""
    return device.type == "cuda"


def checkpoint_eos_ids(ckpt: Checkpoint) -> list[int]:
    """The ids that end a generation of this checkpoint: the eos ids `import-hf` recorded
    from the source model (generation_config.json's list: Llama 3 Instruct ends on two),
    else the tokenizer's end-of-text token by name, <|endoftext|> first (docs/interop.md,
    "BOS and EOS")."""
    from ..hf_export import special_ids

    eos = special_ids(ckpt.tokenizer, ckpt.provenance).eos
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def checkpoint_bos_id(ckpt: Checkpoint) -> int | None:
    """The checkpoint's start-of-text id as its exports name it (special_ids: the id
    `import-hf` recorded, else a BOS token by name, else the EOS, as GPT-2 has it); what
    /tokenizer_info reports and lm-eval-style scoring puts before a document."""
    from ..hf_export import special_ids

    return special_ids(ckpt.tokenizer, ckpt.provenance).bos


def checkpoint_text_adds(ckpt: Checkpoint) -> tuple[list[int], list[int]]:
    """(ids before, ids after) that the source tokenizer puts around every text it encodes
    (Llama 3's <|begin_of_text|>), as `import-hf` recorded them; ([], []) for an Atlas
    tokenizer, which adds nothing. The API puts them around text prompts, as HF's
    `encode(text)` and vLLM's completions do (docs/interop.md, "BOS and EOS")."""
    from ..hf_export import special_ids

    ids = special_ids(ckpt.tokenizer, ckpt.provenance)
    return list(ids.before), list(ids.after)


class Engine:
    """Continuous-batching generation over a Transformer with a preallocated KV cache."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        runner: ModelRunner | None = None,
        eos_ids: Sequence[int] | None = None,
        text_adds: tuple[Sequence[int], Sequence[int]] = ((), ()),
        bos_id: int | None = None,
    ) -> None:
        """`eos_ids`: the ids that end a generation (default: the tokenizer's <|endoftext|>;
        from_checkpoint passes the checkpoint's own). `text_adds`: the ids the checkpoint's
        source tokenizer adds before and after each text (checkpoint_text_adds); the engine
        does not use them, it carries them for the API's text prompts; so is `bos_id`
        (checkpoint_bos_id, default: the first end-of-text id) for /tokenizer_info."""
        model_max = model.config.max_seq_len
        self.max_model_len = config.max_model_len or model_max
        if not 1 <= self.max_model_len <= model_max:
            raise ValueError(f"max_model_len={self.max_model_len} must be in [1, {model_max}]")
        max_running = resolve_max_running(model.tok_emb.weight.device, config.max_running)
        config = dataclasses.replace(config, max_running=max_running)
        if config.max_running < 1 or config.max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        if config.max_batched_tokens < config.max_running:
            raise ValueError(
                f"max_batched_tokens={config.max_batched_tokens} must be >= max_running="
                f"{config.max_running}: every decoding sequence needs a token each step"
            )
        self.tokenizer = tokenizer
        self.text_adds = (list(text_adds[0]), list(text_adds[1]))
        self.runner = runner or make_runner(model, config, self.max_model_len)
        self.model, self.cache = self.runner.model, self.runner.cache
        if self.cache.n_slots < config.max_running:  # the KV budget holds fewer slots
            config = dataclasses.replace(config, max_running=self.cache.n_slots)
        self.config = config
        self.limits = RequestLimits(model.config.vocab_size, self.max_model_len, config.max_running)
        self.scheduler = Scheduler(
            config.max_running, config.max_batched_tokens, config.prefix_caching
        )
        self.outputs = OutputProcessor(tokenizer, model.tok_emb.weight.device, eos_ids)
        self.bos_id = bos_id if bos_id is not None else next(iter(self.outputs.eos_ids), None)
        device = model.tok_emb.weight.device
        self.overlap = default_overlap(device) if config.overlap is None else config.overlap
        # Overlap mode: the step sampled on the device whose tokens the host has not read.
        self._in_flight: PendingStep | None = None
        # What serves (device, dtype, kernels), for /health and the start-up log.
        self.backend = self.runner.describe()
        log.info(
            "engine: %s %s, %d KV slots x %d positions (%.0f MiB), kernels: matmul %s, "
            "attention %s%s",
            self.backend["device"],
            self.backend["dtype"],
            config.max_running,
            self.max_model_len,
            self.cache.nbytes / 2**20,
            self.backend["matmul"],
            self.backend["attention"],
            f", decode step {self.backend['decode_step']}" if "decode_step" in self.backend else "",
        )
        # Requests submitted but not yet taken in by the engine thread, with their emitters.
        self._inbox: deque[tuple[Request, Emit]] = deque()
        self._ids: set[str] = set()  # every request not yet finished
        self._abort_ids: deque[str] = deque()  # appended from any thread (atomic)
        self._lock = threading.Lock()  # guards _inbox and _ids
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        # Events produced by the engine thread, grouped by the caller's loop until flushed.
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._steps_total = 0
        self._step_seconds_ema = 0.05

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None) -> Engine:
        from ..checkpoint import load_checkpoint

        config = config or EngineConfig()
        dtype = resolve_dtype(config.device, config.dtype)
        ckpt = load_checkpoint(path, device=config.device, dtype=dtype)
        return cls(
            ckpt.model,
            ckpt.tokenizer,
            config,
            eos_ids=checkpoint_eos_ids(ckpt),
            text_adds=checkpoint_text_adds(ckpt),
            bos_id=checkpoint_bos_id(ckpt),
        )

    # --- lifecycle ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        """drain() was called: accepted requests finish, new ones are refused."""
        return self._draining

    @property
    def stopping(self) -> bool:
        """shutdown() was called."""
        return self._stopping

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
        prompt_ids = validate_prompt(prompt_ids, self.limits.vocab_size)
        params.validate(self.limits, len(prompt_ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        request = Request(request_id, prompt_ids, params, time.perf_counter())
        with self._lock:
            if request_id in self._ids:
                raise InvalidRequestError(f"request id {request_id!r} is in use", "request_id")
            waiting = len(self._inbox) + self.scheduler.num_waiting
            # A request that free slots take at the next step is not "queued".
            fits_now = not waiting and self.scheduler.num_free_slots >= params.n
            if waiting >= self.config.max_queued and not fits_now:
                raise QueueFullError(
                    f"{waiting} waiting for a slot (max_queued={self.config.max_queued})",
                    retry_after=self._retry_after(),
                )
            self._ids.add(request_id)
            self._inbox.append((request, self._emitter(loop, queue)))
            self._idle.clear()
        self._wake.set()
        return _RequestStream(self, request_id, params.n, queue)

    def abort(self, request_id: str) -> None:
        """Abort a request by id (queued or running); its slots free at the next step."""
        self._abort_ids.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        return EngineStats(
            running=scheduler.num_running_sequences(),
            waiting=len(self._inbox) + scheduler.num_waiting,
            kv_slots_used=self.config.max_running - scheduler.num_free_slots,
            kv_slots_total=self.config.max_running,
            kv_cache_bytes=self.cache.nbytes,
            prompt_tokens_total=scheduler.prompt_tokens_total,
            prefix_cache_hit_tokens_total=scheduler.prefix_hit_tokens_total,
            generation_tokens_total=self.outputs.generation_tokens_total,
            steps_total=self._steps_total,
        )

    def _emitter(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Emit:
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
            self._take_inbox()
            self._apply_aborts()
            if self.scheduler.running or self.scheduler.waiting or self._in_flight:
                started = time.perf_counter()
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as e:  # a bug or OOM must not kill the thread silently
                    log.exception("engine step failed")
                    self._fail_running(f"{type(e).__name__}: {e}")
                if self.scheduler.running or self.scheduler.waiting or self._in_flight:
                    self._wake.set()  # keep stepping while there is work
                self._step_seconds_ema = 0.9 * self._step_seconds_ema + 0.1 * (
                    time.perf_counter() - started
                )
            self._flush_outbox()
            with self._lock:
                if not self._ids:
                    self._idle.set()

    def _take_inbox(self) -> None:
        """Move submitted requests to the output processor and the scheduler's queue."""
        failed: list[tuple[Request, str]] = []
        with self._lock:  # so that submit() counts each request once, inbox or queue
            while self._inbox:
                request, emit = self._inbox.popleft()
                try:
                    self.outputs.add(request, emit)
                except Exception as e:  # a bug: fail this request, never the engine thread
                    log.exception("could not take request %s", request.request_id)
                    failed.append((request, f"{e!r}"))
                    continue
                self.scheduler.add(request)
        for request, error in failed:
            self._end(request, "error", error)

    def _step(self) -> None:
        """One scheduled forward: plan, run, sample and emit, free what finished.

        In overlap mode the step before this one is still in flight (sampled on the
        device, not read back): this step's forward is queued first, feeding on that
        step's tokens where the device has them, and only then are they read and emitted
        (see the module docstring)."""
        previous = self._in_flight
        if previous is not None and not self.outputs.has_live_rows(previous):
            self.outputs.discard(previous)  # all aborted: no read-back, no wait
            previous = self._in_flight = None
        plan: StepPlan = self.scheduler.schedule()
        for request, error in plan.rejected:
            self._end(request, "error", error)
        logits = None
        if plan.runs_model:
            self._steps_total += 1
            logits = self.runner.execute(plan, previous.queued.tokens if previous else None)
        # Token-level finishes of the previous step, before this step's sampling, so that
        # penalties and min_tokens see its tokens and a finished row is not sampled.
        retired = self._take_tokens(previous) if previous is not None else []
        self._in_flight = None
        pending = self.outputs.launch(plan, logits) if logits is not None else None
        if previous is not None:  # its text and events while the device runs this step
            self._emit_text(previous, retired)
        if pending is None:
            return
        if self.overlap:
            self._in_flight = pending
        else:
            self._emit_text(pending, self._take_tokens(pending))

    def _take_tokens(self, step: PendingStep) -> list[Request]:
        """Read a step's tokens and free the sequences they finished; returns the requests
        that ended, to forget once their final events are out (`_emit_text`)."""
        return [seq.request for seq in self.outputs.take_tokens(step) if self.scheduler.finish(seq)]

    def _emit_text(self, step: PendingStep, retired: list[Request]) -> None:
        """A step's text and events; frees what a stop string ended, forgets `retired`."""
        for seq in self.outputs.emit_text(step):
            if self.scheduler.finish(seq):
                retired.append(seq.request)
        for request in retired:
            self._forget(request)

    def _complete_in_flight(self) -> None:
        """With no next step to queue: read, emit and free the step in flight, if any."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._emit_text(step, self._take_tokens(step))

    def _end(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """Final events for what is still open of `request`; it is gone afterwards."""
        self.outputs.finish_request(request, reason, error)
        self._forget(request)

    def _forget(self, request: Request) -> None:
        self.outputs.forget(request)
        with self._lock:
            self._ids.discard(request.request_id)

    def _apply_aborts(self) -> None:
        while self._abort_ids:
            request = self.scheduler.abort(self._abort_ids.popleft())
            if request is not None:
                self._end(request, "abort")

    def _abort_all(self) -> None:
        self._take_inbox()
        self._in_flight = None  # its tokens would only be dropped
        for request_id in self.scheduler.request_ids():
            request = self.scheduler.abort(request_id)
            if request is not None:
                self._end(request, "abort")
        with self._lock:
            self._ids.clear()
            self._idle.set()

    def _fail_running(self, error: str) -> None:
        """After a failed step: end every running request (what their slots hold is unknown)."""
        try:  # a step queued before the failed one may be unread: its tokens are true
            self._complete_in_flight()
        except Exception:
            log.exception("could not emit the previous step's events")
            self._in_flight = None
        for request in list(self.scheduler.running):
            self.scheduler.abort(request.request_id, remember=False)
            self._end(request, "error", error)
        # Requests the scheduler already retired whose final events the failure cut off.
        for request in self.outputs.requests():
            if request.finished:
                self._end(request, "error", error)
