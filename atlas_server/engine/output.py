"""The output processor: from a step's logits to the events each request's stream receives.

What it does: each step in three calls, so that the engine can put other work between
them (engine.py, "Overlap"):
  - `launch(plan, logits)` collects prompt logprobs of the chunks that asked for them and
    queues sampling of one token for every decode row and every choice of a prompt that
    just completed (engine/sampling.py; each choice with its own seeded generator when
    the request has a seed); nothing is read back;
  - `take_tokens(step)` reads the tokens (one copy), appends them and returns the
    sequences a stop token id, EOS or max_tokens finished;
  - `emit_text(step)` detokenizes incrementally, checks stop strings (held back until
    they cannot match; detokenizer.py), emits one `RequestOutput` per row through the
    request's `emit`, and returns the sequences only a stop string finished.
The engine reports finished sequences to the scheduler to free their slots. `finish_request()` ends whatever is still open of a request (abort, error,
shutdown) with a final event per choice.

What it does not do: choose which sequences run or touch KV slots (scheduler.py), run the
model (runner.py), or deliver events across threads (`emit` is the engine's; engine.py
hands a step's events to each caller's event loop at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .request import NOT_SAMPLED, Request, Sequence
from .runner import StepLogits
from .sampling import QueuedStep, SamplingRow, queue_step, top_logprobs
from .scheduler import StepPlan
from .transfer import to_device
from .types import FinishReason, RequestOutput, SamplingParams, TokenLogprob

Emit = Callable[[RequestOutput], None]

_MASK64 = (1 << 64) - 1


def generator_seed(seed: int) -> int:
    """A request's 64-bit seed mixed (SplitMix64's finaliser) into a generator seed.

    PyTorch's CPU generator keeps only the low 32 bits of a seed, so seeds 0 and 2**32
    would draw the same stream; mixed, every one of the 64 bits changes the low 32 and two
    seeds collide only by chance (2**-32), as on CUDA where Philox keeps all 64.
    """
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(eq=False)
class _Choice:
    """What the output side keeps for one sequence: text state and its random stream."""

    seq: Sequence
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None
    first_token_time: float | None = None


@dataclass(eq=False)
class _Row:
    """One sampled row of a step between its two halves (take_tokens, then emit_text)."""

    state: _RequestState
    choice: _Choice
    token: int = -1
    entry: TokenLogprob | None = None
    count: int = 0  # the choice's generated tokens, this one included
    reason: FinishReason | None = None  # by token: stop token id or EOS
    stop_reason: str | int | None = None
    at_length: bool = False  # this token reached max_tokens
    first: bool = False  # the choice's first token
    now: float = 0.0
    dropped: bool = False  # the choice had ended: token not appended, no event


@dataclass(eq=False)
class PendingStep:
    """A step whose sampling is queued (`queued`); `rows` fill in as its halves run."""

    rows: list[_Row]
    queued: QueuedStep


@dataclass(eq=False)
class _RequestState:
    request: Request
    emit: Emit
    choices: list[_Choice] = field(default_factory=list)
    open: set[int] = field(default_factory=set)  # choice indices without a final event yet
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_prompt_logprobs: bool = False


class OutputProcessor:
    """Sampling, detokenizing, stop conditions and events; see the module docstring."""

    def __init__(
        self, tokenizer: Tokenizer, device: torch.device, eos_ids: Iterable[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        # The ids that end every generation unless ignore_eos: the checkpoint's own (an
        # imported model's </s> or <|end_of_text|>), else the tokenizer's <|endoftext|>.
        if eos_ids is None:
            eos_ids = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
        self.eos_ids = tuple(eos_ids)
        self.device = device
        self._states: dict[str, _RequestState] = {}
        self.generation_tokens_total = 0

    def add(self, request: Request, emit: Emit) -> None:
        """Start a request's output state (before the scheduler sees it)."""
        state = _RequestState(request, emit, open=set(range(request.params.n)))
        self._states[request.request_id] = state  # first, so finish_request() can end it
        p = request.params
        for seq in request.sequences:
            generator = None
            if p.seed is not None:
                # Each choice gets its own stream: distinct, and reproducible per (seed, index).
                generator = torch.Generator(device=self.device)
                generator.manual_seed(generator_seed(p.seed + seq.index))
            state.choices.append(
                _Choice(
                    seq,
                    IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens),
                    StopStringMatcher(p.stop),
                    generator,
                )
            )

    def finish_request(self, request: Request, reason: FinishReason, error: str | None = None):
        """A final event with `reason` for every choice still open; forgets the request."""
        state = self._states.pop(request.request_id, None)
        if state is None:
            return
        for index in sorted(state.open):
            generated = len(request.sequences[index].output_ids)
            state.emit(self._final_event(request, index, generated, reason, error))
        state.open.clear()

    def requests(self) -> list[Request]:
        """The requests with output state: taken in and not yet forgotten."""
        return [state.request for state in self._states.values()]

    def forget(self, request: Request) -> None:
        """Drop a request whose choices all finished on their own."""
        self._states.pop(request.request_id, None)

    # --- one step ---------------------------------------------------------------------
    def launch(self, plan: StepPlan, logits: StepLogits) -> PendingStep | None:
        """Queue the step's sampling on the device (prompt logprobs are read here); None if
        no row samples. Nothing of the sampled tokens is read back yet.

        A decode row whose sequence finished after the step was queued (overlap mode: by a
        token the host read since) is not sampled: its seeded stream stays where it was."""
        rows: list[Sequence] = list(plan.decode.sequences)
        parts: list[Tensor] = [logits.decode]  # [B, V]
        if any(seq.finished for seq in rows):
            alive = [i for i, seq in enumerate(rows) if not seq.finished]
            rows = [rows[i] for i in alive]
            index = to_device(alive, logits.decode.device)
            parts = [logits.decode.index_select(0, index)]  # [B_alive, V]
        for chunk, out in zip(plan.prefill, logits.prefill, strict=True):
            r = chunk.request
            if r.params.prompt_logprobs is not None:
                self._collect_prompt_logprobs(
                    self._states[r.request_id], out, chunk.start, chunk.end
                )
            if chunk.completes_prompt:  # its last logits give every choice's first token
                parts.append(out[-1:].expand(len(r.sequences), -1))
                rows += r.sequences
        if not rows:
            return None
        states = [self._states[seq.request.request_id] for seq in rows]
        choices = [state.choices[seq.index] for state, seq in zip(states, rows, strict=True)]
        sampling_rows = [
            SamplingRow(
                seq.request.params,
                seq.request.prompt_ids,
                seq.output_ids,
                choice.generator,
                self._ending_ids(seq.request.params),
            )
            for seq, choice in zip(rows, choices, strict=True)
        ]
        wanted = [seq.request.params.logprobs for seq in rows]
        queued = queue_step(torch.cat(parts, dim=0), sampling_rows, wanted)
        for i, seq in enumerate(rows):
            seq.sampled_row = i
        return PendingStep(
            [_Row(state, choice) for state, choice in zip(states, choices, strict=True)], queued
        )

    def has_live_rows(self, pending: PendingStep) -> bool:
        """Some row's choice is still open: its token is worth reading back."""
        return any(self._row_is_live(row) for row in pending.rows)

    def discard(self, pending: PendingStep) -> None:
        """Drop a step whose rows all ended (aborted) without reading its tokens."""
        for row in pending.rows:
            row.choice.seq.sampled_row = NOT_SAMPLED

    def _row_is_live(self, row: _Row) -> bool:
        seq = row.choice.seq
        return (
            not seq.finished
            and seq.index in row.state.open
            and self._states.get(seq.request.request_id) is row.state
        )

    def take_tokens(self, pending: PendingStep) -> list[Sequence]:
        """Wait for the step's tokens (the one device-to-host copy), append each to its
        sequence and return those that finished by token: a stop token id, EOS or
        max_tokens. Text, stop strings and events wait for `emit_text`.

        A row whose choice already ended (in overlap mode, by a stop string found in the
        text of the step before, while this step was already running) is dropped: its
        token is not appended and no event is sent for it."""
        step = pending.queued.result()
        now = time.perf_counter()
        finished = []
        for row, token, entry in zip(pending.rows, step.tokens, step.logprobs, strict=True):
            seq, p = row.choice.seq, row.state.request.params
            seq.sampled_row = NOT_SAMPLED
            if not self._row_is_live(row):
                row.dropped = True
                continue
            seq.output_ids.append(token)
            self.generation_tokens_total += 1
            row.token, row.entry, row.now = token, entry, now
            row.count = len(seq.output_ids)
            if row.choice.first_token_time is None:
                row.choice.first_token_time = now
                row.first = True
            if token in p.stop_token_ids:
                row.reason, row.stop_reason = "stop", token
            elif (token in self.eos_ids or token in p.end_token_ids) and not p.ignore_eos:
                row.reason = "stop"
            row.at_length = row.count >= p.max_tokens
            if row.reason is not None or row.at_length:
                finished.append(seq)
        return finished

    def emit_text(self, pending: PendingStep) -> list[Sequence]:
        """Detokenize the step's tokens, check stop strings, and emit one event per row;
        returns the sequences that only a stop string finished (the rest `take_tokens`
        returned already)."""
        late = []
        for row in pending.rows:
            if row.dropped or self._states.get(row.state.request.request_id) is not row.state:
                continue  # the request ended (abort, error) before its text was sent
            if self._emit_row(row):
                late.append(row.choice.seq)
        return late

    def _collect_prompt_logprobs(
        self, state: _RequestState, logits: Tensor, start: int, end: int
    ) -> None:
        r = state.request
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no context to score it
        # Logits at position i predict prompt token i + 1; the prompt's last position
        # predicts the first generated token, which is not a prompt logprob.
        targets = r.prompt_ids[start + 1 : end + 1]
        if targets:
            chosen = to_device(targets, logits.device)  # [n], no pageable-copy sync
            state.prompt_logprobs += top_logprobs(
                logits[: len(targets)], chosen, r.params.prompt_logprobs or 0
            )

    def _ending_ids(self, p: SamplingParams) -> tuple[int, ...]:
        """The ids that end this request's answer (masked below min_tokens)."""
        ends = () if p.ignore_eos else self.eos_ids + p.end_token_ids
        return tuple(p.stop_token_ids) + ends

    def _emit_row(self, row: _Row) -> bool:
        """One row's text and event; True if a stop string (and nothing before) ended it."""
        state, choice = row.state, row.choice
        r, seq = state.request, choice.seq
        p = r.params
        reason, stop_reason = row.reason, row.stop_reason
        text = ""
        if reason is None:
            text, matched = choice.stops.feed(
                choice.detok.add(row.token), row.count >= p.min_tokens
            )
            if matched is not None:
                reason, stop_reason = "stop", matched
        by_stop_string = reason is not None and not row.at_length and row.reason is None
        if reason is None and row.at_length:
            reason = "length"
        if reason is not None and not isinstance(stop_reason, str):
            tail, matched = _flush_tail(choice, p)
            text += tail
            if matched is not None:
                reason, stop_reason = "stop", matched
        if isinstance(stop_reason, str) and p.include_stop_str_in_output:
            text += stop_reason
        if reason is not None:
            state.open.discard(seq.index)
        send_prompt_lp = (
            seq.index == 0 and not state.sent_prompt_logprobs and state.prompt_logprobs is not None
        )
        if send_prompt_lp:
            state.sent_prompt_logprobs = True
        now = row.now
        state.emit(
            RequestOutput(
                r.request_id,
                seq.index,
                [row.token],
                text,
                logprobs=[row.entry] if row.entry is not None else None,
                prompt_logprobs=state.prompt_logprobs if send_prompt_lp else None,
                finished=reason is not None,
                finish_reason=reason,
                stop_reason=stop_reason,
                num_prompt_tokens=len(r.prompt_ids),
                num_cached_tokens=r.cached,
                num_generated_tokens=row.count,
                queue_time_s=(r.scheduled_time or now) - r.arrival_time if row.first else None,
                arrival_time=r.arrival_time,
                first_token_time=choice.first_token_time,
                time=now,
            )
        )
        return by_stop_string

    @staticmethod
    def _final_event(
        r: Request, index: int, generated: int, reason: FinishReason, error: str | None
    ) -> RequestOutput:
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


def _flush_tail(choice: _Choice, p: SamplingParams) -> tuple[str, str | None]:
    """Held text at the end of a stream, and a stop string that still matched in it."""
    text, matched = choice.stops.feed(
        choice.detok.flush(), len(choice.seq.output_ids) >= p.min_tokens
    )
    return (text, matched) if matched is not None else (text + choice.stops.flush(), None)
