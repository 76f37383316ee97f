"""Metric edges a mutation pass found unguarded: SQuAD normalisation and best-reference exact
match, nDCG's ideal DCG cut at k, multi-reference BLEU/chrF, the load generator's
interpolated percentiles and its goodput under the TPOT SLO.

References, independent of the code under test: the official SQuAD v1.1 evaluation script's
`normalize_answer`, `f1_score` and `metric_max_over_ground_truths` (written out below from
its published text), `sklearn.metrics.ndcg_score` and a hand formula for nDCG, sacrebleu's
`corpus_bleu`/`corpus_chrf` given one reference stream per reference, and
`numpy.percentile` (method "linear") for the latency percentiles.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import pytest
import sacrebleu

from eval_suites.loadgen import PERCENTILES, LoadSpec, RequestRecord, _percentiles, summarize
from plugins.metrics import BLEU, CHRF, ExactMatch, Ranking, TokenF1, normalize_answer, token_f1

# --- SQuAD v1.1 (evaluate-v1.1.py, as published with the data set) --------------------------


def squad_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def squad_exact_match_score(prediction, ground_truth):
    return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


def squad_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


NORMALISATION_CASES = [
    "The Cat",
    "the cat.",
    "A cat sat on the mat!",
    "  An   apple,\ta   day\n",
    "THE END",
    "Theater and another anthem",  # articles only as whole words
    "the-cat",  # punctuation goes first: "thecat", no article left
    "Hello, World... (again)?",
    "an",
    "a.b.c",
    "Ünïcode: the café",
]


@pytest.mark.parametrize("text", NORMALISATION_CASES)
def test_normalize_answer_is_squad_v1_1(text):
    assert normalize_answer(text) == squad_normalize_answer(text)


def test_normalisation_drops_articles_punctuation_case_and_spacing():
    assert normalize_answer("  The  Cat, an Apple  and A dog! ") == "cat apple and dog"
    assert ExactMatch().compute(["the cat"], [["Cat."]]).scores["exact_match"] == 1.0
    assert ExactMatch().compute(["a cat"], [["cats"]]).scores["exact_match"] == 0.0


def test_exact_match_takes_the_best_of_all_references_not_the_first():
    predictions = ["The cat.", "Paris", "blue whale", "42"]
    references = [["dog", "cat"], ["London", "Rome", "paris!"], ["whale"], ["forty-two", "42"]]
    expected = [
        squad_metric_max_over_ground_truths(squad_exact_match_score, p, refs)
        for p, refs in zip(predictions, references, strict=True)
    ]
    assert expected == [True, True, False, True]
    got = ExactMatch().compute(predictions, references).scores["exact_match"]
    assert got == pytest.approx(sum(expected) / len(expected)) == 0.75
    assert ExactMatch().compute(["The cat."], [["dog", "cat"]]).scores["exact_match"] == 1.0


TOKEN_F1_CASES = [
    ("the cat sat", "a cat sat down"),
    ("The Cat, the hat.", "cat hat"),
    ("an apple a day", "apple day keeps"),
    ("Paris, France", "paris"),
    ("blue blue whale", "blue whale whale"),
    ("nothing in common", "other words"),
]


@pytest.mark.parametrize(("prediction", "reference"), TOKEN_F1_CASES)
def test_token_f1_is_squad_v1_1(prediction, reference):
    assert token_f1(prediction, reference) == pytest.approx(squad_f1_score(prediction, reference))


def test_token_f1_takes_the_best_reference():
    predictions = [p for p, _ in TOKEN_F1_CASES]
    references = [["zzz", r, "the"] for _, r in TOKEN_F1_CASES]
    expected = [
        squad_metric_max_over_ground_truths(squad_f1_score, p, refs)
        for p, refs in zip(predictions, references, strict=True)
    ]
    got = TokenF1().compute(predictions, references).scores["token_f1"]
    assert got == pytest.approx(sum(expected) / len(expected))


# --- nDCG@k ------------------------------------------------------------------------------


def _ndcg_by_hand(ranked: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1 / math.log2(rank + 1) for rank, x in enumerate(ranked[:k], 1) if x in relevant)
    ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


def test_ndcg_ideal_dcg_counts_at_most_k_relevant_documents():
    # Three relevant documents; the best one is ranked first, the others 3rd and 12th.
    ranked = [f"d{i}" for i in range(12)]
    relevant = {"d0", "d2", "d11"}
    scores = Ranking("ndcg").compute_ranking([ranked], [relevant]).scores
    assert scores["ndcg@1"] == pytest.approx(1.0)  # the ideal @1 is one relevant doc, not three
    by_hand_3 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    assert scores["ndcg@3"] == pytest.approx(by_hand_3)
    for k in (1, 3, 5, 10):
        assert scores[f"ndcg@{k}"] == pytest.approx(_ndcg_by_hand(ranked, relevant, k))


def test_ndcg_equals_sklearn_with_binary_relevance():
    from sklearn.metrics import ndcg_score

    docs = [f"d{i}" for i in range(20)]
    ranked = [
        docs[:12],
        [docs[i] for i in (5, 0, 7, 1, 9, 2, 11, 3, 13, 4, 15, 6)],
        [docs[i] for i in (19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8)],
    ]
    # Several relevant documents each (more than 1 and 3), some never retrieved (d0 and d1
    # for the third query): they still count in the ideal ranking.
    relevant = [{"d0", "d2", "d3", "d7"}, {"d0", "d1", "d2", "d3", "d4", "d5"}, {"d0", "d1", "d9"}]
    scores = Ranking("ndcg").compute_ranking(ranked, relevant).scores
    # sklearn wants a relevance and a score per document: the ranked documents score by
    # position, the rest below them (beyond position 12 > k, so only the ideal sees them).
    y_true, y_score = [], []
    for ids, rel in zip(ranked, relevant, strict=True):
        position = {d: len(docs) - i for i, d in enumerate(ids)}
        y_true.append([1.0 if d in rel else 0.0 for d in docs])
        y_score.append([float(position.get(d, -j)) for j, d in enumerate(docs)])
    for k in (1, 3, 5, 10):
        expected = ndcg_score(np.array(y_true), np.array(y_score), k=k)
        assert scores[f"ndcg@{k}"] == pytest.approx(expected), k


# --- BLEU and chrF with several references -----------------------------------------------

PREDICTIONS = [
    "the cat is sitting on the mat today",
    "a quick brown fox jumps over the lazy dog",
    "it is raining heavily in the city tonight",
]
REFERENCES = [
    ["a dog lay under a table", "the cat is sitting on the mat today"],
    ["the fast brown fox leaped over a lazy dog", "a quick brown fox jumps over the lazy dog"],
    ["heavy rain falls on the town this evening", "it rains heavily in the city tonight"],
]


def _streams(references: list[list[str]]) -> list[list[str]]:
    return [[refs[i] for refs in references] for i in range(len(references[0]))]


def test_bleu_scores_every_reference_like_sacrebleu():
    got = BLEU().compute(PREDICTIONS, REFERENCES).scores["bleu"]
    expected = sacrebleu.corpus_bleu(PREDICTIONS, _streams(REFERENCES)).score
    first_only = sacrebleu.corpus_bleu(PREDICTIONS, [[r[0] for r in REFERENCES]]).score
    assert got == pytest.approx(expected)
    assert expected > first_only + 10  # the second references decide this score


def test_chrf_scores_every_reference_like_sacrebleu():
    got = CHRF().compute(PREDICTIONS, REFERENCES).scores["chrf"]
    expected = sacrebleu.corpus_chrf(PREDICTIONS, _streams(REFERENCES)).score
    first_only = sacrebleu.corpus_chrf(PREDICTIONS, [[r[0] for r in REFERENCES]]).score
    assert got == pytest.approx(expected)
    assert expected > first_only + 10


def test_ragged_references_use_all_of_each_items_references():
    # The first item has one reference, the others two: every item's own references count.
    references = [[REFERENCES[0][1]], REFERENCES[1], REFERENCES[2]]
    padded = [references[0] * 2, REFERENCES[1], REFERENCES[2]]
    bleu = BLEU().compute(PREDICTIONS, references).scores["bleu"]
    chrf = CHRF().compute(PREDICTIONS, references).scores["chrf"]
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, _streams(padded)).score)
    assert chrf == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, _streams(padded)).score)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, _streams(REFERENCES)).score)


# --- load generator: percentiles and goodput ---------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [0.013, 0.002, 0.007, 0.031, 0.005, 0.019, 0.011],  # odd length, distinct
        [0.25, 0.1, 0.4, 0.05, 0.3, 0.2, 0.15, 0.35, 0.45, 0.5],  # even length
        [0.12, 0.09],
    ],
)
def test_percentiles_interpolate_like_numpy(values):
    out = _percentiles(values, "x")
    for p in PERCENTILES:
        expected = float(np.percentile(values, p, method="linear")) * 1000
        assert out[f"p{p}_x_ms"] == pytest.approx(expected, rel=1e-12), p
    assert out["median_x_ms"] == pytest.approx(float(np.median(values)) * 1000, rel=1e-12)
    assert out["mean_x_ms"] == pytest.approx(float(np.mean(values)) * 1000, rel=1e-12)
    assert out["std_x_ms"] == pytest.approx(float(np.std(values)) * 1000, rel=1e-12)


def _record(ttft: float, e2el: float, tokens: int) -> RequestRecord:
    return RequestRecord(
        success=True,
        prompt_tokens=8,
        output_tokens=tokens,
        requested_tokens=tokens,
        ttft=ttft,
        e2el=e2el,
    )


def test_goodput_counts_only_requests_within_both_the_ttft_and_tpot_slos():
    spec = LoadSpec(base_url="http://unused", slo_ttft_ms=100.0, slo_tpot_ms=20.0)
    records = [
        _record(ttft=0.050, e2el=0.050 + 9 * 0.010, tokens=10),  # TTFT 50 ms, TPOT 10 ms: good
        _record(ttft=0.050, e2el=0.050 + 9 * 0.050, tokens=10),  # TPOT 50 ms > 20: not good
        _record(ttft=0.090, e2el=0.090 + 4 * 0.030, tokens=5),  # TPOT 30 ms > 20: not good
        _record(ttft=0.150, e2el=0.150 + 9 * 0.010, tokens=10),  # TTFT 150 ms > 100: not good
        _record(ttft=0.080, e2el=0.080, tokens=1),  # one token: no TPOT, TTFT within: good
    ]
    summary = summarize(records, duration=2.0, spec=spec)
    assert summary["completed"] == 5
    assert summary["request_throughput"] == pytest.approx(2.5)
    assert summary["request_goodput"] == pytest.approx(2 / 2.0)
