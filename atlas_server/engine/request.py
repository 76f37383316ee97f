"""The engine thread's record of one request: its prompt, its output sequences, their slots.

What it does: `Request` and `Sequence` are the state the scheduler and the output
processor share inside the engine thread. Each field has one writer:
  - the scheduler (scheduler.py) writes `Sequence.slot` and `Sequence.finished`, and
    `Request.prefilled`, `Request.cached` and `Request.scheduled_time`;
  - the output processor (output.py) appends to `Sequence.output_ids`, and sets
    `Sequence.sampled_row` when it queues a token for the sequence on the device and
    clears it when it reads that token back (in overlap mode the next step is scheduled
    in between: the scheduler then feeds that row of the device's sampled ids).
Everything else is set once, when the engine takes the request in.

What it does not do: anything per step, or anything another thread may touch (submit()
hands requests over through the engine's inbox; see engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .types import SamplingParams

NO_SLOT = -1
NOT_SAMPLED = -1


@dataclass(eq=False)
class Sequence:
    """One output sequence (a choice) of a request; it owns a KV slot while it runs."""

    request: Request
    index: int  # the choice index, 0..n-1
    slot: int = NO_SLOT
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    # Its row in the last queued step's sampled ids while that token is not yet read back
    # (not in output_ids); NOT_SAMPLED otherwise.
    sampled_row: int = NOT_SAMPLED

    @property
    def in_flight(self) -> bool:
        """A token was sampled for this sequence on the device and not yet read back."""
        return self.sampled_row != NOT_SAMPLED

    @property
    def num_generated(self) -> int:
        """Generated tokens, the one still on the device included."""
        return len(self.output_ids) + self.in_flight

    @property
    def tokens_held(self) -> list[int]:
        """The tokens whose KV rows this sequence's slot holds: the prompt so far (choice 0
        only, until the prompt is complete and copied to the other choices), then the
        generated tokens that have been through the model: all but the last sampled one
        (which is in output_ids, or still on the device)."""
        r = self.request
        if r.decoding:
            return r.prompt_ids + (self.output_ids if self.in_flight else self.output_ids[:-1])
        return r.prompt_ids[: r.prefilled] if self.index == 0 else []

    @property
    def next_position(self) -> int:
        """Where this sequence's last sampled token goes in its slot when it is decoded."""
        return len(self.request.prompt_ids) + self.num_generated - 1


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    sequences: list[Sequence] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens scheduled into choice 0's slot (reused ones included)
    cached: int = 0  # of those, found already computed (prefix caching) at admission
    scheduled_time: float | None = None

    def __post_init__(self) -> None:
        if not self.sequences:
            self.sequences = [Sequence(self, i) for i in range(self.params.n)]

    @property
    def decoding(self) -> bool:
        """The whole prompt has been scheduled; every step now decodes its sequences."""
        return self.prefilled == len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)
