"""The scheduler: which sequences run in the next step, in which KV slots, and what to prefill.

What it does: holds the waiting and running requests and the free KV slots, and each step
`schedule()` returns a `StepPlan`, plain data that a model runner (runner.py) executes:
  1. admission: waiting requests, oldest first, take free slots (all n choices at once, or
     the queue waits: first come, first served); choice 0 takes the slot that already holds
     the longest prefix of its prompt (prefix_cache.py), or a copy of a running sequence's
     rows, and only the rest of the prompt is prefilled;
  2. every decoding sequence, one token each: decoders count against `max_batched_tokens`
     first, so running streams never stall behind a long prompt;
  3. prompt chunks, oldest request first, each cut to what is left of the budget; a prompt
     longer than the budget is prefilled over several steps while the others keep decoding;
  4. the decode batch in the lowest slots: a decoding sequence above slot B-1 (B decoders)
     moves into a low slot, once, at the transition, so attention reads the batch's KV rows
     as a view rather than a gather. Every move is a `SlotCopy` or `SlotSwap` in the plan,
     done before the forward, and the scheduler, the only owner of slot numbers, updates
     the sequences it moves (a prefilling sequence whose low slot is taken moves up).
`finish()` frees a sequence's slot (remembering the tokens its rows hold, for prefix
caching) and `abort()` ends a whole request; the output processor decides when a
sequence is finished and the engine reports it here.

What it does not do: run the model, touch a tensor, sample or emit events (runner.py,
output.py, engine.py), or take requests from other threads (the engine hands them over).
No preemption or swapping: a request is admitted only when all its slots are free, and
submit() refused anything whose prompt + max_tokens would not fit a slot.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from .prefix_cache import SlotContents
from .request import NO_SLOT, Request, Sequence

log = logging.getLogger("atlas.engine")


@dataclass(frozen=True)
class SlotCopy:
    """Copy KV positions [0, length) of slot `source` into each of `targets`, every layer."""

    source: int
    targets: tuple[int, ...]
    length: int


@dataclass(frozen=True)
class SlotSwap:
    """Exchange KV positions [0, length) of slots `a` and `b`, every layer."""

    a: int
    b: int
    length: int


SlotMove = SlotCopy | SlotSwap


@dataclass(frozen=True)
class DecodeBatch:
    """One token for each of B decoding sequences: row i writes its KV at `positions[i]` of
    slot `slots[i]` and gets a row of logits. Slots are in ascending order.

    Row i's input token is `tokens[i]`, unless `sampled_rows[i]` >= 0: then it is that row
    of the previous step's sampled ids, still on the device (overlap mode schedules a step
    before the host has read the last one's tokens), and `tokens[i]` is a placeholder 0.
    An empty `sampled_rows` means every token is given."""

    sequences: tuple[Sequence, ...]  # for the output processor; the runner needs only numbers
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    slots: tuple[int, ...]
    sampled_rows: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def feeds_sampled(self) -> bool:
        """Some input tokens are the previous step's sampled ids on the device."""
        return any(row >= 0 for row in self.sampled_rows)


LogitsWanted = Literal["none", "last", "all"]


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + len(tokens)) of one request, into `slot`.

    `logits`: "all" positions (the request wants prompt logprobs), the "last" one (the chunk
    completes the prompt: it gives the first token), or "none". `copy_to`: when the chunk
    completes the prompt of an n > 1 request, the other choices' slots, which receive a copy
    of the prompt's rows after the forward.
    """

    request: Request  # for the output processor
    slot: int
    start: int
    tokens: tuple[int, ...]
    logits: LogitsWanted
    copy_to: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.request.prompt_ids)


@dataclass
class StepPlan:
    """What one step does, in order: `moves` on the KV cache, one forward over `decode` and
    every chunk of `prefill`, then each chunk's `copy_to`. `rejected` lists requests whose
    admission failed (a bug); they hold no slot and must be ended with an error."""

    moves: list[SlotMove] = field(default_factory=list)
    decode: DecodeBatch = field(default_factory=lambda: DecodeBatch((), (), (), ()))
    prefill: list[PrefillChunk] = field(default_factory=list)
    rejected: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def runs_model(self) -> bool:
        return bool(self.decode.tokens or self.prefill)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(c.tokens) for c in self.prefill)


class Scheduler:
    """Admission, KV slots, prefix reuse and packing under a per-step token budget."""

    def __init__(self, num_slots: int, max_batched_tokens: int, prefix_caching: bool = True):
        if num_slots < 1 or max_batched_tokens < num_slots:
            raise ValueError(
                f"need num_slots >= 1 and max_batched_tokens ({max_batched_tokens}) >= "
                f"num_slots ({num_slots}): every decoding sequence needs a token each step"
            )
        self.num_slots = num_slots
        self.max_batched_tokens = max_batched_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the oldest prompt first
        self._free_slots = list(range(num_slots))  # the first-freed first
        self._contents = SlotContents()  # what free slots still hold (prefix caching)
        self.prompt_tokens_total = 0  # prompt tokens scheduled through the model
        self.prefix_hit_tokens_total = 0  # prompt tokens whose rows were reused

    # --- what other threads read (plain counts; a stale answer is harmless) ------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running_sequences(self) -> int:
        return sum(not s.finished for r in list(self.running) for s in r.sequences)

    # --- requests in and out -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, seq: Sequence) -> bool:
        """Free a finished sequence's slot; True when that ended its whole request."""
        self._release(seq, remember=self.prefix_caching)
        return self._retire_if_done(seq.request)

    def abort(self, request_id: str, remember: bool = True) -> Request | None:
        """End a request, waiting or running, and free its slots; None if it is unknown.

        `remember=False` forgets what the slots hold: after a failed step their rows may
        not be the ones the plan said.
        """
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                for seq in r.sequences:
                    seq.finished = True
                return r
        for r in self.running:
            if r.request_id == request_id:
                for seq in r.sequences:
                    if not seq.finished:
                        self._release(seq, remember=remember and self.prefix_caching)
                self._retire_if_done(r)
                return r
        return None

    def request_ids(self) -> list[str]:
        return [r.request_id for r in (*self.waiting, *self.running)]

    # --- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Admit what fits, then plan the next forward (see the module docstring)."""
        plan = StepPlan()
        self._admit(plan)
        # A sequence whose token on the device is its last (max_tokens) has nothing left to
        # decode: it finishes when the host reads that token.
        decoding = [
            s
            for r in self.running
            if r.decoding
            for s in r.sequences
            if not s.finished and s.num_generated < r.params.max_tokens
        ]
        self._pack_decode_slots(decoding, plan)
        decoding.sort(key=lambda s: s.slot)
        plan.decode = DecodeBatch(
            tuple(decoding),
            tuple(0 if s.in_flight else s.output_ids[-1] for s in decoding),
            tuple(s.next_position for s in decoding),
            tuple(s.slot for s in decoding),
            tuple(s.sampled_row for s in decoding) if any(s.in_flight for s in decoding) else (),
        )
        budget = self.max_batched_tokens - len(decoding)
        for r in self.running:
            if budget <= 0:
                break
            if r.decoding:
                continue
            start = r.prefilled
            end = min(len(r.prompt_ids), start + budget)
            budget -= end - start
            r.prefilled = end
            self.prompt_tokens_total += end - start
            complete = r.decoding
            wants_all = r.params.prompt_logprobs is not None
            plan.prefill.append(
                PrefillChunk(
                    r,
                    r.sequences[0].slot,
                    start,
                    tuple(r.prompt_ids[start:end]),
                    "all" if wants_all else "last" if complete else "none",
                    tuple(s.slot for s in r.sequences[1:]) if complete else (),
                )
            )
        return plan

    # --- admission ---------------------------------------------------------------------------
    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and len(self._free_slots) >= self.waiting[0].params.n:
            r = self.waiting.popleft()
            moves_before = len(plan.moves)
            try:
                for seq in r.sequences:
                    self._place(seq, plan)
            except Exception as e:  # a bug: fail this request, never the engine thread
                log.exception("could not admit request %s", r.request_id)
                del plan.moves[moves_before:]
                for seq in r.sequences:
                    if seq.slot != NO_SLOT:
                        self._free_slots.append(seq.slot)
                        seq.slot = NO_SLOT
                    seq.finished = True
                self.prefix_hit_tokens_total -= r.cached
                r.prefilled = r.cached = 0
                plan.rejected.append((r, f"{e!r}"))
                continue
            r.scheduled_time = time.perf_counter()
            self.running.append(r)

    def _place(self, seq: Sequence, plan: StepPlan) -> None:
        """Give `seq` a slot: choice 0 the one with the longest cached prefix of its prompt."""
        if seq.index == 0:
            seq.slot = self._slot_for_prompt(seq.request, plan)
        else:
            seq.slot = self._take_free_slot()

    def _take_free_slot(self, spare: int | None = None) -> int:
        """A free slot, sparing the ones that still hold a cached prefix: the lowest empty
        slot if any (decode batches pack into low slots), else the longest-free one
        (least recently used). Never `spare`, the source of a copy being planned."""
        candidates = [s for s in self._free_slots if s != spare]
        empty = [s for s in candidates if not self._contents.holds(s)]
        slot = min(empty) if empty else candidates[0]
        self._free_slots.remove(slot)
        self._contents.forget(slot)
        return slot

    def _slot_for_prompt(self, r: Request, plan: StepPlan) -> int:
        """Choice 0's slot, with as much of the prompt's KV as the cache already holds.

        Sets r.prefilled (and r.cached) to the reused length. A free slot whose every held
        token the prompt repeats (a chat's next turn) is taken as it is; one that holds more
        (another conversation sharing only a system prompt) keeps it while another free
        slot can take a copy of the matched rows, as a running sequence's prefix is copied:
        taken over, it lost that conversation's history to a few shared tokens, and users
        taking turns evicted each other's. Requests that want prompt logprobs need every
        position's logits: never reused.
        """
        if not self.prefix_caching or r.params.prompt_logprobs is not None:
            return self._take_free_slot()
        # Lazily, and only for prompts that start alike: the token lists are built per match.
        running = (
            (s.slot, s.tokens_held) for x in self.running for s in x.sequences
            if not s.finished and x.prompt_ids[0] == r.prompt_ids[0]
        )  # fmt: skip
        length, source, source_is_free = self._contents.longest_prefix(
            r.prompt_ids, self._free_slots, running
        )
        if source is None:
            return self._take_free_slot()
        keeps_more = len(self._contents.held(source)) > length
        if source_is_free and not (keeps_more and len(self._free_slots) > 1):
            self._free_slots.remove(source)
            self._contents.forget(source)
            slot = source
        else:
            slot = self._take_free_slot(spare=source)
            plan.moves.append(SlotCopy(source, (slot,), length))
        r.prefilled = r.cached = length
        self.prefix_hit_tokens_total += length
        return slot

    # --- slots -------------------------------------------------------------------------------
    def _release(self, seq: Sequence, remember: bool) -> None:
        seq.finished = True
        if seq.slot == NO_SLOT:
            return
        if remember:
            self._contents.remember(seq.slot, seq.tokens_held)
        else:
            self._contents.forget(seq.slot)
        self._free_slots.append(seq.slot)

    def _retire_if_done(self, r: Request) -> bool:
        if r.finished and r in self.running:
            self.running.remove(r)
            return True
        return r.finished

    def _pack_decode_slots(self, decoding: list[Sequence], plan: StepPlan) -> None:
        """Move decoding sequences into slots 0..B-1 (B = len(decoding)); see step 4 of the
        module docstring. A decoder above B-1 takes a low slot that is free (a copy of its
        rows; its old slot is freed and still holds them, or, when the low slot held a
        cached prefix, the two trade rows so that prefix is kept) or held by a sequence
        that is not decoding (a prefilling prompt, or an n > 1 choice waiting for its
        copy): the two trade slots and rows."""
        n = len(decoding)
        misplaced = [s for s in decoding if s.slot >= n]
        if not misplaced:
            return
        held = {s.slot: s for r in self.running for s in r.sequences if not s.finished}
        low_decoding = {s.slot for s in decoding if s.slot < n}
        holes = [slot for slot in range(n) if slot not in low_decoding]
        for seq, hole in zip(misplaced, holes, strict=True):
            length = len(seq.request.prompt_ids) + seq.num_generated
            other = held.get(hole)
            if other is None:  # a free slot
                cached = self._contents.held(hole)
                if cached:  # its cached rows trade places with seq's, not overwritten
                    plan.moves.append(SlotSwap(seq.slot, hole, max(length, len(cached))))
                    self._contents.forget(hole)
                    self._contents.remember(seq.slot, cached)
                else:
                    plan.moves.append(SlotCopy(seq.slot, (hole,), length))
                    if self.prefix_caching:  # the old slot still holds seq's rows
                        self._contents.remember(seq.slot, seq.tokens_held)
                self._free_slots[self._free_slots.index(hole)] = seq.slot
            else:  # a sequence that is not decoding: its rows move up into seq's slot
                plan.moves.append(SlotSwap(seq.slot, hole, max(length, len(other.tokens_held))))
                other.slot = seq.slot
            seq.slot = hole
