"""Sampling, detokenization and stop strings, checked against plain reference code.

The references below are written from the definitions (OpenAI for presence/frequency
penalties, CTRL/HF for repetition penalty, the usual top-k/top-p/min-p), one token at a
time with Python loops, so they share nothing with the vectorised sampler.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from atlas_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from atlas_server.engine.sampling import SamplingRow, sample, sample_step, top_logprobs
from atlas_server.engine.types import SamplingParams

VOCAB = 24


def reference_probs(logits: list[float], p: SamplingParams, prompt: list[int], out: list[int]):
    """The distribution the sampler must draw from, computed one token at a time."""
    x = list(logits)
    for token, bias in p.logit_bias.items():
        x[token] += bias
    if p.repetition_penalty != 1.0:
        for token in set(prompt + out):
            x[token] = (
                x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
            )
    for token in set(out):
        x[token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    z = sum(math.exp(v) for v in x)
    probs = [math.exp(v) / z for v in x]
    # top-k, then top-p over what top-k kept, renormalised (transformers' and vLLM's order)
    top = order[: p.top_k] if p.top_k > 0 else order
    within = sum(probs[i] for i in top)
    mass = 0.0
    keep = set()
    for i in top:
        if mass >= p.top_p:
            break
        keep.add(i)
        mass += probs[i] / within
    kept = [probs[i] if i in keep else 0.0 for i in range(len(x))]
    z = sum(kept)
    kept = [v / z for v in kept]
    if p.min_p > 0:
        top = max(kept)
        kept = [v if v >= p.min_p * top else 0.0 for v in kept]
        z = sum(kept)
        kept = [v / z for v in kept]
    return kept


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5),
    SamplingParams(temperature=1.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05, logit_bias={3: 2.0}),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p)[15:70])
def test_sampled_frequencies_match_the_reference_distribution(params):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(VOCAB, generator=gen) * 2
    prompt, out = [1, 2, 3, 1], [4, 4, 5, 1, 9]
    expected = reference_probs(logits.tolist(), params, prompt, out)
    draws = 6000
    rows = [SamplingRow(params, prompt, out, None) for _ in range(draws)]
    torch.manual_seed(1)
    tokens = sample(logits.expand(draws, -1), rows)
    counts = torch.bincount(tokens, minlength=VOCAB).tolist()
    for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0:
            assert count == 0, f"token {token} is outside the reference support"
    total_variation = 0.5 * sum(abs(c / draws - p) for c, p in zip(counts, expected, strict=True))
    assert total_variation < 0.04


def test_top_k_top_p_and_min_p_keep_the_tokens_transformers_keeps():
    """The support after top-k, top-p and min-p together, against transformers' own
    warpers in their order (top-k, then top-p over what it kept, then min-p): top-p over
    the whole distribution kept two tokens of 0.50/0.30/0.18 at top_k=2, top_p=0.6."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(11)
    three = torch.log(torch.tensor([0.50, 0.30, 0.18] + [0.02 / (VOCAB - 3)] * (VOCAB - 3)))
    cases = [(three, SamplingParams(top_k=2, top_p=0.6))]
    for _ in range(60):
        top_k, top_p = random.Random(len(cases)).choice([0, 2, 5, 12]), float(torch.rand(1))
        min_p = random.Random(-len(cases)).choice([0.0, 0.05, 0.3])
        params = SamplingParams(top_k=top_k, top_p=max(top_p, 0.05), min_p=min_p)
        cases.append((torch.randn(VOCAB, generator=gen) * 3, params))
    for logits, params in cases:
        scores = logits[None].clone()
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        scores = TopPLogitsWarper(params.top_p)(None, scores)
        if params.min_p:
            scores = MinPLogitsWarper(params.min_p)(None, scores)
        theirs = set(torch.isfinite(scores[0]).nonzero().flatten().tolist())
        draws = 1000
        rows = [SamplingRow(params, [1], [], None) for _ in range(draws)]
        ours = set(sample(logits.expand(draws, -1), rows).tolist())
        # Every token we draw is one they keep; and in 1,000 draws every kept token of
        # 2% or more shows up (one is missed with probability 0.98^1000, 2e-9).
        assert ours <= theirs, (params, ours - theirs)
        probs = scores[0].softmax(-1)
        assert {i for i in theirs if probs[i] >= 0.02} <= ours, params
    assert set(sample(three.expand(64, -1), [SamplingRow(cases[0][1], [1], [], None)] * 64)
               .tolist()) == {0}  # fmt: skip


def test_penalties_are_transformers_repetition_penalty_and_openais_formula():
    """The penalised logits themselves, exactly, not through a sampled histogram: the
    repetition penalty against transformers' own processor (negative logits multiplied,
    positive divided, each seen token once however often), presence and frequency against
    OpenAI's formula (logit - count * frequency - (count > 0) * presence)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from atlas_server.engine.sampling import _apply_penalties

    gen = torch.Generator().manual_seed(21)
    prompt, out = [1, 2, 3, 1], [4, 4, 5, 1, 9, 4]
    for penalty in (1.8, 0.7):
        logits = torch.randn(1, VOCAB, generator=gen) * 3  # both signs among the seen tokens
        seen = torch.tensor([prompt + out])
        assert (logits[0, seen[0]] < 0).any() and (logits[0, seen[0]] > 0).any()
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        row = SamplingRow(SamplingParams(repetition_penalty=penalty), prompt, out, None)
        torch.testing.assert_close(_apply_penalties(logits.clone(), [row]), theirs)
    logits = torch.randn(1, VOCAB, generator=gen) * 3
    params = SamplingParams(presence_penalty=0.75, frequency_penalty=0.5)
    expected = logits.clone()
    for token in set(out):  # the output only: the prompt is not penalised
        expected[0, token] -= out.count(token) * 0.5 + 0.75
    row = SamplingRow(params, prompt, out, None)
    torch.testing.assert_close(_apply_penalties(logits.clone(), [row]), expected)


def test_top_p_at_an_exact_boundary_and_min_p_of_one():
    """Four tokens of exactly 0.25: top_p 0.5 keeps two (the mass before the third
    already reaches 0.5), as transformers' warper does; min_p 1.0 keeps only the most
    likely token (it used to be easy to drop it with the rest, leaving nothing)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.full((1, VOCAB), float("-inf"))
    logits[0, [2, 5, 7, 11]] = 0.0
    theirs = TopPLogitsWarper(0.5)(None, logits.clone())
    draws = 2000
    rows = [SamplingRow(SamplingParams(top_p=0.5), [1], [], None) for _ in range(draws)]
    ours = set(sample(logits.expand(draws, -1), rows).tolist())
    assert len(ours) == 2 == int(torch.isfinite(theirs).sum())
    peaked = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    rows = [SamplingRow(SamplingParams(min_p=1.0), [1], [], None) for _ in range(200)]
    assert set(sample(peaked.expand(200, -1), rows).tolist()) == {int(peaked.argmax())}


@pytest.mark.parametrize("params", CASES[4:], ids=lambda p: repr(p)[15:70])
def test_greedy_picks_the_argmax_after_bias_and_penalties(params):
    gen = torch.Generator().manual_seed(3)
    prompt, out = [1, 2, 3], [4, 4, 7]
    for _ in range(20):
        logits = torch.randn(VOCAB, generator=gen)
        greedy = SamplingParams(
            **{**params.__dict__, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        )
        ref = reference_probs(
            logits.tolist(), SamplingParams(**{**greedy.__dict__, "temperature": 1.0}), prompt, out
        )
        token = sample(logits[None], [SamplingRow(greedy, prompt, out, None)])
        assert int(token) == max(range(VOCAB), key=ref.__getitem__)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9.9e-6])
def test_a_temperature_below_1e_5_is_greedy_in_a_mixed_batch(temperature):
    """fp32 logits divided by 1e-45 are infinities, whose softmax is NaN: such rows are greedy
    (as in vLLM), beside a row that really samples."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5)) * 30
    tiny = SamplingParams(temperature=temperature, seed=1)
    warm = SamplingParams(temperature=1.0, seed=2)
    rows = [SamplingRow(tiny, [1], [], torch.Generator().manual_seed(1)),
            SamplingRow(warm, [1], [], torch.Generator().manual_seed(2))]  # fmt: skip
    tokens = sample(logits, rows)
    assert int(tokens[0]) == int(logits[0].argmax())
    alone = sample(logits[1:], [SamplingRow(warm, [1], [], torch.Generator().manual_seed(2))])
    assert int(tokens[1]) == int(alone[0])


def test_logit_bias_forces_a_token():
    logits = torch.randn(4, VOCAB)
    rows = [SamplingRow(SamplingParams(logit_bias={7: 100.0}), [1], [], None) for _ in range(4)]
    assert sample(logits, rows).tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(min_p=0.5)],
    ids=["top_k", "top_p", "min_p"],
)
def test_a_uniform_draw_of_exactly_zero_never_picks_a_removed_token(monkeypatch, params):
    """torch.rand can return 0.0 (one draw in 2^24 on the CPU, 2^25 on CUDA, several per
    step at a 50k vocabulary): the race must still choose among the kept tokens."""
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 3], logits[0, 4] = 4.0, 3.9  # the kept tokens; token 0 is removed
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    assert int(sample(logits, [SamplingRow(params, [1], [], None)])) in (3, 4)


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 50.0
    params = SamplingParams(temperature=0.0, min_tokens=2)
    early = SamplingRow(params, [1], [9], None, banned_until_min=(5,))
    late = SamplingRow(params, [1], [9, 9], None, banned_until_min=(5,))
    assert int(sample(logits, [early])) != 5
    assert int(sample(logits, [late])) == 5


def test_seeded_row_is_independent_of_its_batch_companions():
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(temperature=1.0)

    def draw_seq(companions: int) -> list[int]:
        gen = torch.Generator().manual_seed(42)
        out = []
        for _ in range(10):
            rows = [SamplingRow(params, [1], [], None) for _ in range(companions)]
            rows.insert(companions // 2, SamplingRow(params, [1], [], gen))
            tokens = sample(logits.expand(len(rows), -1), rows)
            out.append(int(tokens[companions // 2]))
        return out

    alone = draw_seq(0)
    assert draw_seq(5) == alone == draw_seq(2)
    assert len(set(alone)) > 1


def test_top_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(3, VOCAB)
    chosen = torch.tensor([0, 5, 9])
    entries = top_logprobs(logits, chosen, 4)
    ref = torch.log_softmax(logits.double(), -1)
    for row, entry in enumerate(entries):
        assert entry.token_id == int(chosen[row])
        assert entry.logprob == pytest.approx(float(ref[row, chosen[row]]), abs=1e-5)
        best = ref[row].topk(4)
        assert list(entry.top) == best.indices.tolist()
        assert list(entry.top.values()) == pytest.approx(best.values.tolist(), abs=1e-5)


def test_logprobs_stay_finite_for_masked_tokens():
    logits = torch.randn(1, VOCAB)
    logits[0, 3] = float("-inf")
    (entry,) = top_logprobs(logits, torch.tensor([3]), VOCAB)
    assert math.isfinite(entry.logprob) and all(math.isfinite(v) for v in entry.top.values())


def test_a_mixed_batch_samples_every_row_as_it_would_alone():
    """Bias, min_tokens, penalties and truncation are applied to the whole batch at once;
    each row must still get exactly its own: greedy and seeded rows pick, in a batch of
    different parameters, the tokens they pick alone."""
    gen = torch.Generator().manual_seed(5)
    mixed = [
        SamplingParams(temperature=0.0, logit_bias={3: 3.0, 11: -2.0}),
        SamplingParams(temperature=0.0, repetition_penalty=5.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, min_tokens=4, logit_bias={13: 6.0}),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.8, repetition_penalty=1.4),
        SamplingParams(temperature=1.2, min_p=0.05, logit_bias={2: 1.0}),
    ]
    histories = [([1, 2], [3, 3]), ([4, 5, 6], [7, 4]), ([8], [9, 9, 9, 2]), ([1], [5]),
                 ([2, 3], [4]), ([6], [6, 7])]  # fmt: skip
    logits = torch.randn(6, VOCAB, generator=gen)
    for i, (_, out) in enumerate(histories):
        logits[i, out] += 4.0  # the history leads, so a penalty applied or not decides
    logits[3, 0] += 50.0  # a stop id that min_tokens must mask

    def row(i: int) -> SamplingRow:
        generator = torch.Generator().manual_seed(100 + i) if i >= 4 else None
        prompt, out = histories[i]
        return SamplingRow(mixed[i], prompt, out, generator, banned_until_min=(0, 1))

    together = sample(logits, [row(i) for i in range(6)]).tolist()
    alone = [int(sample(logits[i : i + 1], [row(i)])) for i in range(6)]
    assert together == alone
    assert alone[3] == 13  # min_tokens masked 0, the bias chose 13
    assert alone[1] not in histories[1][0] + histories[1][1]  # penalised away
    assert alone[2] not in histories[2][1]


def test_sample_step_gives_tokens_and_logprobs_only_where_asked():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(temperature=0.0)
    rows = [SamplingRow(greedy, [1], [], None) for _ in range(3)]
    step = sample_step(logits, rows, [None, 0, 3])
    assert step.tokens == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits.double(), -1)
    assert step.logprobs[0] is None
    assert step.logprobs[1].top == {} and step.logprobs[1].token_id == step.tokens[1]
    assert step.logprobs[1].logprob == pytest.approx(float(ref[1].max()), abs=1e-5)
    assert list(step.logprobs[2].top) == ref[2].topk(3).indices.tolist()
    assert sample_step(logits, rows).logprobs == [None, None, None]


# --- detokenization -------------------------------------------------------------------
def test_multibyte_characters_are_held_until_complete(byte_tokenizer):
    text = "añb€c😀d"
    ids = byte_tokenizer.encode(text)
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    # Every emitted piece is whole characters; the bytes of € arrive as '', '', '€'.
    assert pieces[4:7] == ["", "", "€"]
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_text_equals_decode_of_random_bytes(byte_tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(byte_tokenizer)
        text = "".join(detok.add(t) for t in ids) + detok.flush()
        assert text == byte_tokenizer.decode(ids)


def test_stop_string_is_held_back_and_cut():
    matcher = StopStringMatcher(("###", "END"))
    emitted = []
    for piece in ["hello #", "#", " x E", "N", "D tail"]:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched:
            break
    assert "".join(emitted) == "hello ## x "
    assert matched == "END"
    assert emitted[1] == ""  # "##" might still become "###"


def test_stop_strings_are_ignored_when_not_checked():
    matcher = StopStringMatcher(("ab",))
    assert matcher.feed("xab", check=False) == ("xab", None)
    assert matcher.feed("zab") == ("z", "ab")


def test_a_stop_string_straddling_min_tokens_stops_and_is_cut():
    """A stop string that starts in the text before min_tokens and ends after it matches,
    as in vLLM (its window reaches len(stop) - 1 characters back); it used to be released
    with the unchecked text and leak into the answer. One that ends before never matches."""
    matcher = StopStringMatcher(("yL",))
    assert matcher.feed("ab y", check=False) == ("ab ", None)  # "y" may begin "yL"
    assert matcher.feed("Lq") == ("", "yL")
    aaa = StopStringMatcher(("AAA",))  # min_tokens=2, one "A" per token: stops at the third
    assert [aaa.feed("A", check=False), aaa.feed("A"), aaa.feed("A")] == [
        ("", None), ("", None), ("", "AAA")
    ]  # fmt: skip
    inner = StopStringMatcher(("ab", "xabc"))  # "ab" lies wholly before min_tokens
    assert inner.feed("xab", check=False) == ("", None)
    assert inner.feed("d") == ("xabd", None)
    assert inner.feed("ab") == ("", "ab")
