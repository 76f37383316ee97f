"""Engine edges a mutation pass found unguarded: what a failed step's slots are remembered
as holding (prefix caching), which stop string wins when several match, and how many
cached prompt tokens a completion with n > 1 choices reports.

References: the scheduler's own plan (no model) and the model's greedy loop
(`Transformer.generate`, no engine, no cache reuse); the OpenAI usage object counts a
prompt's cached tokens once, like its `prompt_tokens`.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_api import MODEL, running_server

from atlas_server.engine import SamplingParams
from atlas_server.engine.detokenizer import StopStringMatcher
from atlas_server.engine.request import Request
from atlas_server.engine.scheduler import Scheduler

PROMPT = [11, 12, 13, 14, 15, 16]


def _request(rid: str, prompt: list[int], n: int = 1) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=8, n=n), 0.0)


def _step(s: Scheduler):
    """schedule() and play the output processor: every sequence that gets a token gets 7."""
    plan = s.schedule()
    sampled = list(plan.decode.sequences)
    for chunk in plan.prefill:
        if chunk.completes_prompt:
            sampled += chunk.request.sequences
    for seq in sampled:
        seq.output_ids.append(7)
    return plan


# --- P2: Scheduler.abort(remember=False) ---------------------------------------------------
@pytest.mark.parametrize("steps_before_failure", [1, 3])
@pytest.mark.parametrize("n", [1, 2])
def test_a_failed_steps_slots_are_forgotten_not_offered_as_a_cached_prefix(steps_before_failure, n):
    """After a failed step the engine aborts with remember=False: the slots' rows may not
    be what the plan said, so the same prompt must be prefilled from scratch, from no slot
    and no copy. The default (remember=True, a client's abort) does reuse them: the
    control that shows the prompt would otherwise be served from the cache."""
    for remember in (False, True):
        s = Scheduler(num_slots=2, max_batched_tokens=16)
        s.add(_request("a", PROMPT, n=n))
        for _ in range(steps_before_failure):
            _step(s)
        assert s.abort("a", remember=remember) is not None
        assert s.num_free_slots == 2
        again = _request("b", PROMPT)
        s.add(again)
        plan = s.schedule()
        if remember:
            assert again.cached == len(PROMPT) - 1  # the control: reuse happens
            continue
        assert again.cached == 0 and s.prefix_hit_tokens_total == 0
        assert plan.moves == []  # no SlotCopy/SlotSwap of the forgotten rows
        assert [(c.start, c.tokens) for c in plan.prefill] == [(0, tuple(PROMPT))]


async def test_a_prompt_whose_step_failed_is_recomputed_not_read_from_stale_rows(
    varied_model, make_engine
):
    """Engine level: the slot first holds another prompt's rows; the next request's prefill
    step fails before it writes anything. Resent, the prompt must not reuse the slot (its
    rows are the other prompt's): no cached tokens, and the model's own output."""
    tok = varied_model.tokenizer
    other = tok.encode("Zebras graze on the open plains at dawn.")
    prompt = tok.encode("A quick note about prefix caches and failures.")
    assert other[0] != prompt[0]
    engine = make_engine(max_running=1, max_batched_tokens=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    events = [e async for e in engine.submit(other, greedy)]
    assert events[-1].finish_reason == "length"

    real_execute = engine.runner.execute
    failed = []

    def fail_first_prefill(plan, *sampled):
        if plan.prefill and not failed:
            failed.append(plan)
            raise RuntimeError("boom")
        return real_execute(plan, *sampled)

    engine.runner.execute = fail_first_prefill
    events = [e async for e in engine.submit(prompt, greedy)]
    assert failed and events[-1].finish_reason == "error"

    events = [e async for e in engine.submit(prompt, greedy)]
    assert events[-1].finish_reason == "length"
    ids = [t for e in events for t in e.token_ids]
    assert ids == varied_model.model.generate(prompt, 6)  # not read from the stale rows
    assert events[-1].num_cached_tokens == 0


# --- D1: StopStringMatcher, the earliest match wins ---------------------------------------
@pytest.mark.parametrize(
    ("stops", "feeds", "expected"),
    [
        (("B", "A"), ["xAyBz"], ("x", "A")),
        (("A", "B"), ["xAyBz"], ("x", "A")),
        (("yBz", "A"), ["xAyBz"], ("x", "A")),
        (("B", "A"), ["xB", "yAz"], ("x", "B")),  # B arrived first, in an earlier feed
        (("Bz", "A"), ["xAyB", "z"], ("x", "A")),
    ],
)
def test_the_earliest_stop_string_in_the_text_wins_not_the_first_listed(stops, feeds, expected):
    m = StopStringMatcher(stops)
    emitted, matched = "", None
    for text in feeds:
        out, matched = m.feed(text)
        emitted += out
        if matched is not None:
            break
    assert (emitted, matched) == expected


# --- A3: usage.prompt_tokens_details.cached_tokens with n > 1 -----------------------------
@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint) as (base, state):
        yield base, state


def _cached(base: str, prompt, n: int, stream: bool = False) -> tuple[int, int]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 3,
        "temperature": 0,
        "n": n,
        "ignore_eos": True,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = [x for x in r.iter_lines() if x.startswith("data: {")]
        usage = json.loads(lines[-1][len("data: ") :])["usage"]
    else:
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def test_cached_tokens_count_once_per_prompt_whatever_n(server):
    """The same prompt sent again with n=3 reports the cached tokens an n=1 request does:
    the choices share one prompt, which was served from the cache once."""
    base = server[0]
    prompt = "Cached tokens are counted per prompt, never per choice of it."
    first, prompt_tokens = _cached(base, prompt, 1)
    assert first == 0
    one, _ = _cached(base, prompt, 1)
    assert 0 < one <= prompt_tokens
    three, three_prompt_tokens = _cached(base, prompt, 3)
    assert three_prompt_tokens == prompt_tokens
    assert three == one and three <= prompt_tokens
    streamed, _ = _cached(base, prompt, 3, stream=True)
    assert streamed == one


def test_cached_tokens_of_several_prompts_with_n_choices_sum_per_prompt(server):
    base = server[0]
    prompts = ["Alpha prompt for the usage check, one.", "Beta prompt, a different start."]
    expected = []
    for p in prompts:
        _cached(base, p, 1)  # warm the cache with each prompt
        expected.append(_cached(base, p, 1)[0])
    assert all(c > 0 for c in expected)
    cached, prompt_tokens = _cached(base, prompts, 2)
    assert cached == sum(expected) <= prompt_tokens
