"""The scheduler alone, without a model: admission, the token budget, slots and their moves.

Each test drives `Scheduler` the way the engine does: `add()` requests, `schedule()` a
plan, play the output processor's part by appending a sampled token to every sequence
the plan gives a first or next token, and `finish()` sequences. A small simulated KV cache
(`Rows`: which token each slot holds at each position) executes the plan's moves and
writes, so the tests can check that every decode row reads exactly its own tokens, which
is what the real cache would give attention.
"""

from __future__ import annotations

import dataclasses

import pytest

from atlas_server.engine.request import Request, Sequence
from atlas_server.engine.scheduler import Scheduler, SlotCopy, SlotSwap, StepPlan
from atlas_server.engine.types import SamplingParams

TOKEN = 7  # what the simulated output processor samples


def request(rid: str, prompt: list[int], max_tokens: int = 4, **params) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), 0.0)


class Rows:
    """A simulated KV cache: rows[slot][position] = the token whose KV row is stored there."""

    def __init__(self, num_slots: int) -> None:
        self.rows: list[dict[int, int]] = [{} for _ in range(num_slots)]

    def execute(self, plan: StepPlan) -> None:
        for move in plan.moves:
            if isinstance(move, SlotCopy):
                for target in move.targets:
                    self.rows[target] = {
                        p: t for p, t in self.rows[move.source].items() if p < move.length
                    } | {p: t for p, t in self.rows[target].items() if p >= move.length}
            else:
                a, b = self.rows[move.a], self.rows[move.b]
                self.rows[move.a] = {p: t for p, t in b.items() if p < move.length} | {
                    p: t for p, t in a.items() if p >= move.length
                }
                self.rows[move.b] = {p: t for p, t in a.items() if p < move.length} | {
                    p: t for p, t in b.items() if p >= move.length
                }
        for token, position, slot in zip(
            plan.decode.tokens, plan.decode.positions, plan.decode.slots, strict=True
        ):
            self.rows[slot][position] = token
        for chunk in plan.prefill:
            for i, token in enumerate(chunk.tokens):
                self.rows[chunk.slot][chunk.start + i] = token
            for target in chunk.copy_to:
                self.rows[target] |= {
                    p: t for p, t in self.rows[chunk.slot].items() if p < chunk.end
                }

    def holds(self, seq: Sequence) -> list[int | None]:
        """What attention reads for seq's next token: its slot's rows up to that position."""
        length = len(seq.request.prompt_ids) + len(seq.output_ids)
        return [self.rows[seq.slot].get(p) for p in range(length)]


def step(scheduler: Scheduler, rows: Rows | None = None) -> tuple[StepPlan, list[Sequence]]:
    """schedule(), execute on `rows`, sample TOKEN for each row, finish at max_tokens."""
    plan = scheduler.schedule()
    if rows is not None:
        rows.execute(plan)
        for seq in plan.decode.sequences:  # each decode row sees exactly its own history
            assert rows.holds(seq) == seq.request.prompt_ids + seq.output_ids, plan
    sampled = list(plan.decode.sequences)
    for chunk in plan.prefill:
        if chunk.completes_prompt:
            sampled += chunk.request.sequences
    finished = []
    for seq in sampled:
        seq.output_ids.append(TOKEN)
        if len(seq.output_ids) >= seq.request.params.max_tokens:
            finished.append(seq)
    for seq in finished:
        scheduler.finish(seq)
    return plan, finished


def test_decoders_come_first_and_the_budget_is_respected():
    s = Scheduler(num_slots=4, max_batched_tokens=8)
    s.add(request("a", [1, 2, 3], max_tokens=10))
    plan, _ = step(s)
    assert plan.num_tokens == 3 and not plan.decode.tokens
    s.add(request("b", list(range(30, 50)), max_tokens=10))  # 20 tokens: longer than the budget
    plan, _ = step(s)
    assert plan.decode.slots == (0,)  # "a" decodes first...
    assert [(c.request.request_id, c.start, c.end) for c in plan.prefill] == [("b", 0, 7)]
    assert plan.num_tokens == 8  # ...and "b" gets what is left of the budget


def test_chunked_prefill_continues_where_it_stopped_and_then_decodes():
    s = Scheduler(num_slots=2, max_batched_tokens=6)
    r = request("a", list(range(1, 15)), max_tokens=3)  # 14 tokens
    s.add(r)
    spans = []
    for _ in range(3):
        plan, _ = step(s)
        spans += [(c.start, c.end, c.logits) for c in plan.prefill]
    assert spans == [(0, 6, "none"), (6, 12, "none"), (12, 14, "last")]
    assert r.decoding and len(r.sequences[0].output_ids) == 1
    plan, _ = step(s)
    assert plan.decode.positions == (14,) and not plan.prefill


def test_oldest_prompt_is_prefilled_first():
    s = Scheduler(num_slots=3, max_batched_tokens=5)
    for rid in "abc":
        s.add(request(rid, list(range(1, 9))))
    plan, _ = step(s)
    assert [(c.request.request_id, len(c.tokens)) for c in plan.prefill] == [("a", 5)]
    plan, _ = step(s)
    assert [(c.request.request_id, len(c.tokens)) for c in plan.prefill] == [("a", 3), ("b", 2)]


def test_admission_waits_for_all_of_a_requests_slots_first_come_first_served():
    s = Scheduler(num_slots=3, max_batched_tokens=64)
    s.add(request("a", [1, 2], max_tokens=2, n=2))
    s.add(request("b", [3, 4], max_tokens=2, n=2))  # needs 2 slots; 1 is left
    s.add(request("c", [5, 6], max_tokens=2))  # would fit, but b was first
    plan, _ = step(s)
    assert [c.request.request_id for c in plan.prefill] == ["a"]
    assert plan.prefill[0].copy_to == (1,)  # choice 1 gets the prompt's rows after the forward
    assert s.num_waiting == 2 and s.num_free_slots == 1
    step(s)  # a's two choices reach max_tokens: both slots come back
    plan, _ = step(s)
    assert [c.request.request_id for c in plan.prefill] == ["b", "c"]


def test_slots_are_freed_on_finish_and_abort():
    s = Scheduler(num_slots=2, max_batched_tokens=16)
    s.add(request("a", [1, 2, 3], max_tokens=2))
    s.add(request("b", [4, 5, 6], max_tokens=50))
    step(s)
    assert s.num_free_slots == 0 and s.num_running_sequences() == 2
    _, finished = step(s)
    assert [q.request.request_id for q in finished] == ["a"] and s.num_free_slots == 1
    aborted = s.abort("b")
    assert aborted is not None and aborted.finished
    assert s.num_free_slots == 2 and not s.running and s.num_running_sequences() == 0
    assert s.abort("b") is None  # unknown now
    s.add(request("w", [1]))
    assert s.abort("w") is not None and s.num_waiting == 0  # a waiting request too
    assert not s.schedule().runs_model


def test_prefix_reuse_picks_the_longest_prefix():
    s = Scheduler(num_slots=4, max_batched_tokens=64)
    short, long = [1, 2, 3, 9], [1, 2, 3, 4, 5, 9]
    s.add(request("short", short, max_tokens=1))
    s.add(request("long", long, max_tokens=1))
    step(s)  # both prefilled, sampled, finished: their slots keep their rows
    assert s.num_free_slots == 4
    new = request("new", [1, 2, 3, 4, 5, 6, 7])
    s.add(new)
    plan, _ = step(s)
    assert new.cached == 5 and new.prefilled == 7  # [1..5] reused, [6, 7] prefilled
    assert plan.prefill[0].start == 5 and plan.prefill[0].tokens == (6, 7)
    # The slot "long" left holds more than the match (its 9): it keeps that for a prompt
    # that repeats it, and an empty slot gets a copy of the matched rows.
    assert plan.prefill[0].slot == 2 and plan.moves == [SlotCopy(1, (2,), 5)]
    assert s.prefix_hit_tokens_total == 5
    while s.num_running_sequences():
        step(s)
    # A prompt repeating all a free slot holds (a chat's next turn) takes it as it is.
    turn = request("turn", [*long, 8])
    s.add(turn)
    plan, _ = step(s)
    assert turn.cached == len(long) and plan.prefill[0].slot == 1 and not plan.moves


def test_conversations_that_share_a_preamble_keep_their_own_rows():
    """Users taking turns with one system prompt: each next turn finds its own history. A
    prompt that took over a free slot matching only the preamble lost the other history."""
    s = Scheduler(num_slots=4, max_batched_tokens=64)
    rows = Rows(4)
    system = [1, 2, 3]
    firsts = [[*system, 10 + u, 20 + u] for u in range(3)]
    for u, prompt in enumerate(firsts):
        s.add(request(f"u{u}", prompt, max_tokens=2))
        while s.num_running_sequences() or s.num_waiting:
            step(s, rows)
    for u, prompt in enumerate(firsts):
        again = request(f"u{u}-2", [*prompt, TOKEN, 30])
        s.add(again)
        step(s, rows)  # the decode row check in step() proves the reused rows are its own
        assert again.cached == len(prompt) + 1, u
        while s.num_running_sequences():
            step(s, rows)


def test_prefix_of_a_running_sequence_is_an_explicit_copy():
    s = Scheduler(num_slots=3, max_batched_tokens=64)
    rows = Rows(3)
    running = request("running", [1, 2, 3, 4, 5], max_tokens=50)
    s.add(running)
    step(s, rows)
    step(s, rows)
    follower = request("follower", [1, 2, 3, 8])
    s.add(follower)
    plan, _ = step(s, rows)
    assert plan.moves == [SlotCopy(running.sequences[0].slot, (follower.sequences[0].slot,), 3)]
    assert follower.cached == 3 and rows.rows[follower.sequences[0].slot] == {
        0: 1, 1: 2, 2: 3, 3: 8
    }  # fmt: skip


def test_prefix_caching_off_and_prompt_logprobs_never_reuse():
    for scheduler, params in ((Scheduler(2, 64, prefix_caching=False), {}),
                              (Scheduler(2, 64), {"prompt_logprobs": 1})):  # fmt: skip
        scheduler.add(request("a", [1, 2, 3, 4], max_tokens=1))
        step(scheduler)
        again = request("b", [1, 2, 3, 4, 5], max_tokens=1, **params)
        scheduler.add(again)
        plan, _ = step(scheduler)
        assert again.cached == 0 and plan.prefill[0].start == 0
        assert plan.prefill[0].logits == ("all" if params else "last")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_decoder_moves_into_a_free_low_slot_by_an_explicit_copy_or_swap(prefix_caching):
    s = Scheduler(num_slots=3, max_batched_tokens=16, prefix_caching=prefix_caching)
    rows = Rows(3)
    a, b = request("a", [1, 2], max_tokens=2), request("b", [3, 4, 5], max_tokens=30)
    s.add(a)
    s.add(b)
    step(s, rows)  # a -> slot 0, b -> slot 1
    step(s, rows)  # a finishes: slot 0 is free (and, with caching, remembered as a's rows)
    plan, _ = step(s, rows)
    # b alone decodes: it belongs in slot 0 with its rows (3 prompt + 2 generated). Slot 0
    # holding nothing worth keeping, they are copied; holding a's cached rows, the two
    # slots trade rows, so a's prefix survives in slot 1.
    moved = SlotSwap(1, 0, 5) if prefix_caching else SlotCopy(1, (0,), 5)
    assert plan.moves == [moved]
    assert plan.decode.slots == (0,) and b.sequences[0].slot == 0
    if prefix_caching:
        assert rows.rows[1] == {0: 1, 1: 2, 2: TOKEN}
        again = request("again", [1, 2, TOKEN, 9])
        s.add(again)
        plan, _ = step(s, rows)
        assert again.cached == 3 and again.sequences[0].slot == 1 and not plan.moves


def test_a_decoder_trades_slots_with_a_prefilling_sequence_by_an_explicit_swap():
    """Slot 0 is taken by a long prompt while it prefills; the decoder above B-1 trades
    places with it (the scheduler moves both sequences, the plan says so), and the prompt
    goes on prefilling in its new slot with its rows intact."""
    s = Scheduler(num_slots=3, max_batched_tokens=8, prefix_caching=False)
    rows = Rows(3)
    a, b, c = (request(x, [i, i + 1], max_tokens=m) for x, i, m in
               (("a", 1, 2), ("b", 3, 30), ("c", 5, 30)))  # fmt: skip
    for r in (a, b, c):
        s.add(r)
    step(s, rows)  # a, b, c -> slots 0, 1, 2
    step(s, rows)  # a finishes: slot 0 is free
    long = request("long", list(range(40, 60)), max_tokens=2)
    s.add(long)
    plan, _ = step(s, rows)  # long takes slot 0; b (1) and c (2) decode: c belongs in 0
    # c's rows: 2 prompt tokens + 2 generated (the slot it swaps with holds nothing yet).
    assert plan.moves == [SlotSwap(2, 0, 4)]
    assert (c.sequences[0].slot, long.sequences[0].slot) == (0, 2)
    assert plan.decode.slots == (0, 1) and plan.prefill[0].slot == 2
    while not long.finished:  # step() checks long's rows once it decodes
        plan, _ = step(s, rows)
        assert plan.decode.slots == tuple(range(len(plan.decode.slots)))
    assert long.sequences[0].output_ids == [TOKEN, TOKEN]


def random_traffic(s: Scheduler, rng, step_once, busy) -> list[StepPlan]:
    """60 steps of random arrivals (prompts sharing stems, lengths, n) and aborts through
    `s` (4 slots, a budget of 10), `step_once()` running each, with the budget, the
    lowest-slot packing and the slot count checked after every step; then steps while
    `busy()`, and checks that every slot came back. Returns the plans."""
    stems = [[1, 2, 3, 4], [1, 2, 5], [6, 7, 8, 9, 10]]
    live: list[Request] = []
    plans = []
    for i in range(60):
        if rng.random() < 0.5:
            prompt = rng.choice(stems) + [rng.randint(11, 99) for _ in range(rng.randint(1, 12))]
            r = request(f"r{i}", prompt, max_tokens=rng.randint(1, 8), n=rng.choice([1, 1, 2]))
            s.add(r)
            live.append(r)
        if live and rng.random() < 0.1:
            s.abort(rng.choice(live).request_id)
        plan = step_once()
        plans.append(plan)
        assert plan.num_tokens <= 10
        assert plan.decode.slots == tuple(range(len(plan.decode.slots)))
        held = [q.slot for r in s.running for q in r.sequences if not q.finished]
        assert len(held) == len(set(held)) and len(held) + s.num_free_slots == 4
    for _ in range(200):
        if not busy():
            break
        step_once()
    assert s.num_free_slots == 4 and not s.running and not s.waiting
    return plans


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_keeps_every_sequence_on_its_own_rows(seed):
    """Random arrivals, lengths, n and aborts through few slots with prefix sharing: every
    decode row reads its own history (checked in step()), decode batches sit in the lowest
    slots, the budget holds, and all slots come back."""
    import random

    s = Scheduler(num_slots=4, max_batched_tokens=10)
    rows = Rows(4)
    random_traffic(s, random.Random(seed), lambda: step(s, rows)[0], lambda: s.running or s.waiting)


class AheadOfTokens:
    """The engine's overlap mode, simulated: step N+1 is scheduled and executed on `rows`
    before step N's tokens are appended, its rows fed step N's sampled ids by
    `sampled_rows`; then step N's tokens are read (a token STOP finishes its sequence, as
    EOS would) and step N+1's rows are sampled, except the sequences that just finished."""

    STOP = 2

    def __init__(self, scheduler: Scheduler, rows: Rows, rng) -> None:
        self.scheduler, self.rows, self.rng = scheduler, rows, rng
        self.sampled: list[tuple[Sequence, int]] = []  # the step in flight: (seq, its token)
        self.counter = 1000

    def step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        decode = plan.decode
        if decode.feeds_sampled:
            fed = [
                self.sampled[row][1] if row >= 0 else token
                for token, row in zip(decode.tokens, decode.sampled_rows, strict=True)
            ]
            decode = dataclasses.replace(decode, tokens=tuple(fed), sampled_rows=())
        for seq, position in zip(decode.sequences, decode.positions, strict=True):
            # Never past the last token that will be fed: prompt + max_tokens - 2.
            assert position <= len(seq.request.prompt_ids) + seq.request.params.max_tokens - 2
        self.rows.execute(dataclasses.replace(plan, decode=decode))
        for seq, token in self.sampled:  # read step N: append, finish by token
            seq.sampled_row = -1
            if seq.finished:
                continue
            seq.output_ids.append(token)
            if token == self.STOP or len(seq.output_ids) >= seq.request.params.max_tokens:
                self.scheduler.finish(seq)
        for seq in decode.sequences:  # what step N+1 fed: each row its own history
            if not seq.finished:
                assert self.rows.holds(seq) == seq.request.prompt_ids + seq.output_ids, plan
        sampled = [seq for seq in decode.sequences if not seq.finished]
        for chunk in plan.prefill:
            if chunk.completes_prompt:
                sampled += chunk.request.sequences
        self.sampled = []
        for i, seq in enumerate(sampled):
            self.counter += 1
            token = self.STOP if self.rng.random() < 0.1 else self.counter
            seq.sampled_row = i
            self.sampled.append((seq, token))
        return plan


@pytest.mark.parametrize("seed", range(20))
def test_scheduling_ahead_of_the_tokens_feeds_each_row_its_own_sampled_id(seed):
    """Overlap mode's order (see AheadOfTokens) under random traffic, early stops and
    aborts: every decode row reads its own history, fed the right row of the last step's
    sampled ids at the right position; a sequence whose token in flight is its last is
    not scheduled again; decode batches stay in the lowest slots and all slots return."""
    import random

    rng = random.Random(seed)
    s = Scheduler(num_slots=4, max_batched_tokens=10)
    ahead = AheadOfTokens(s, Rows(4), rng)
    plans = random_traffic(s, rng, ahead.step, lambda: s.running or s.waiting or ahead.sampled)
    fed = sum(row >= 0 for plan in plans for row in plan.decode.sampled_rows)
    assert fed > 20  # most decode rows took their input from the device


def test_a_failed_admission_returns_the_slots_and_is_reported():
    s = Scheduler(num_slots=3, max_batched_tokens=16)
    real_place = s._place

    def failing(seq, plan):
        if seq.index == 1:
            raise RuntimeError("bug")
        real_place(seq, plan)

    s._place = failing  # type: ignore[method-assign]
    s.add(request("bad", [1, 2], n=2))
    s.add(request("good", [3, 4]))
    plan = s.schedule()
    assert [(r.request_id, "bug" in e) for r, e in plan.rejected] == [("bad", True)]
    assert [c.request.request_id for c in plan.prefill] == ["good"]
    assert s.num_free_slots == 2


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Scheduler(num_slots=8, max_batched_tokens=4)
