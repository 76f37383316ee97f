"""Prefix caching: a prompt whose start a KV slot already holds skips recomputing it, and
what it generates is exactly what the model generates from the whole prompt.

References: the model's own greedy loop (`Transformer.generate`, no engine, no cache
reuse) and an engine with `prefix_caching=False`.
"""

from __future__ import annotations

import asyncio
import random

from atlas_server.engine import Engine, SamplingParams
from atlas_server.engine.prefix_cache import SlotContents, common_prefix


async def generate(engine: Engine, prompt: list[int], max_tokens: int, **params):
    """(token ids, prompt tokens served from the cache) of one greedy request."""
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    events = [e async for e in engine.submit(prompt, sampling)]
    return [t for e in events for t in e.token_ids], events[-1].num_cached_tokens


def reference(varied_model, prompt: list[int], max_tokens: int) -> list[int]:
    return varied_model.model.generate(prompt, max_tokens)


def test_common_prefix_and_longest_match():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9], limit=10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], limit=2) == 2
    contents = SlotContents()
    contents.remember(0, [5, 6, 7, 8])
    contents.remember(1, [5, 6])
    prompt = [5, 6, 7, 8, 9]
    assert contents.longest_prefix(prompt, [0, 1], []) == (4, 0, True)
    # The last prompt token is never served from the cache: its logits are needed.
    assert contents.longest_prefix([5, 6, 7, 8], [0, 1], []) == (3, 0, True)
    # A running slot with a longer prefix wins; a tie goes to the free slot (no copy).
    assert contents.longest_prefix(prompt, [1], [(3, [5, 6, 7, 1])]) == (3, 3, False)
    assert contents.longest_prefix(prompt, [0], [(3, [5, 6, 7, 8])]) == (4, 0, True)
    contents.forget(0)
    assert contents.longest_prefix(prompt, [0, 1], []) == (2, 1, True)
    assert contents.longest_prefix([4, 6], [0, 1], []) == (0, None, False)


async def test_shared_prefix_is_reused_and_output_is_unchanged(varied_model, make_engine):
    tok = varied_model.tokenizer
    system = tok.encode("You are a careful assistant. Answer briefly and cite sources. " * 2)
    first, second = system + tok.encode("Q: first?"), system + tok.encode("Q: second one?")
    engine = make_engine(max_running=2, max_batched_tokens=32)
    ids, cached = await generate(engine, first, 8)
    assert cached == 0 and ids == reference(varied_model, first, 8)
    ids, cached = await generate(engine, second, 8)
    assert cached >= len(system)  # the system prompt (and any common start of "Q: ")
    assert cached == common_prefix(first, second, len(second) - 1)
    assert ids == reference(varied_model, second, 8)
    assert engine.stats().prefix_cache_hit_tokens_total == cached
    assert engine.stats().kv_slots_used == 0


async def test_next_chat_turn_reuses_the_previous_answer(varied_model, make_engine):
    """Turn 2 resends turn 1's prompt and answer: all but the answer's last token (never
    run through the model) come from the cache."""
    tok = varied_model.tokenizer
    engine = make_engine(max_running=2, max_batched_tokens=64)
    turn1 = tok.encode("user: tell me about caches\nassistant:")
    answer, _ = await generate(engine, turn1, 10)
    turn2 = turn1 + answer + tok.encode("\nuser: and prefixes?\nassistant:")
    ids, cached = await generate(engine, turn2, 10)
    assert cached == len(turn1) + len(answer) - 1
    assert ids == reference(varied_model, turn2, 10)


async def test_conversations_sharing_a_system_prompt_keep_their_own_histories(
    varied_model, make_engine
):
    """Users taking turns with one system prompt: each next turn reuses its own whole
    history. A QA pass found turn 2 reusing only the system prompt for every user (each
    request took over the slot of the previous user, who shared just that prefix)."""
    tok = varied_model.tokenizer
    engine = make_engine(max_running=6, max_batched_tokens=64)
    system = tok.encode("system: answer briefly.\n")
    firsts = [system + tok.encode(f"user: question {u}?\nassistant:") for u in range(4)]
    answers = [(await generate(engine, prompt, 6))[0] for prompt in firsts]
    for prompt, answer in zip(firsts, answers, strict=True):
        second = prompt + answer + tok.encode("\nuser: more?\nassistant:")
        ids, cached = await generate(engine, second, 6)
        assert cached == len(prompt) + len(answer) - 1, (len(system), cached)
        assert ids == reference(varied_model, second, 6)
    # Four conversations in six slots, plus the second turns' own: nothing was lost.
    assert engine.stats().kv_slots_used == 0


async def test_prefix_of_a_running_sequence_is_copied(varied_model, gated_engine):
    tok = varied_model.tokenizer
    shared = tok.encode("a shared preamble that both requests start with, ")
    long_prompt = shared + tok.encode("A")
    long_tokens = 255 - len(long_prompt)  # runs for the rest of the 256-token context
    # Behind a StepGate (conftest.py), so the long request is certainly still running.
    engine, gate = gated_engine(max_running=3, max_batched_tokens=16)
    long_request = asyncio.ensure_future(generate(engine, long_prompt, long_tokens))
    deadline = asyncio.get_running_loop().time() + 30
    while engine.stats().generation_tokens_total < 1:  # its prompt is in its slot
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    follower = asyncio.ensure_future(generate(engine, shared + tok.encode("B"), 8))
    # The follower's task has not run yet: permits given now could all go to the long
    # request's steps before the follower reaches the engine (a loaded CI run timed out so).
    while engine.stats().running + engine.stats().waiting < 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    gate.allow(20)  # enough for the follower's 8 tokens, far from the long request's end
    ids, cached = await asyncio.wait_for(follower, 30)
    assert cached == len(shared)
    assert ids == reference(varied_model, shared + tok.encode("B"), 8)
    assert not long_request.done()  # the source was running throughout
    gate.open()
    ids_a, cached_a = await long_request
    assert cached_a == 0 and ids_a == reference(varied_model, long_prompt, long_tokens)


async def test_prompt_logprobs_and_disabled_caching_never_reuse(varied_model, make_engine):
    tok = varied_model.tokenizer
    prompt = tok.encode("score every token of this prompt")
    engine = make_engine(max_running=2, max_batched_tokens=64)
    await generate(engine, prompt, 2)
    _, cached = await generate(engine, prompt, 2, prompt_logprobs=1)
    assert cached == 0  # needs the logits of every prompt position
    plain = make_engine(max_running=2, max_batched_tokens=64, prefix_caching=False)
    await generate(plain, prompt, 2)
    ids, cached = await generate(plain, prompt, 4)
    assert cached == 0 and plain.stats().prefix_cache_hit_tokens_total == 0
    assert ids == reference(varied_model, prompt, 4)


async def test_many_overlapping_requests_match_the_reference(varied_model, make_engine):
    """Staggered requests over three shared prefixes, through few slots: slots are reused,
    packed for decoding and copied between, and every output is still the model's own."""
    tok = varied_model.tokenizer
    rng = random.Random(0)
    stems = [tok.encode(s * 3) for s in ("alpha beta ", "gamma delta ", "alpha gamma ")]
    jobs = [
        (rng.choice(stems) + tok.encode(f" q{i} " * rng.randint(1, 3)), rng.randint(3, 12))
        for i in range(24)
    ]
    engine = make_engine(max_running=4, max_batched_tokens=24)

    async def staggered(i, prompt, n):
        await asyncio.sleep(0.002 * i)
        return await generate(engine, prompt, n)

    results = await asyncio.gather(*(staggered(i, p, n) for i, (p, n) in enumerate(jobs)))
    for (prompt, n), (ids, _) in zip(jobs, results, strict=True):
        assert ids == reference(varied_model, prompt, n)
    assert sum(cached for _, cached in results) > 0
    assert engine.stats().kv_slots_used == 0
