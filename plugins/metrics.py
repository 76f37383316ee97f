"""Built-in metric plugins: BLEU, chrF, ROUGE, exact match, token F1, ranking metrics.

What it does: wraps sacrebleu (BLEU and chrF at corpus level, with their signatures so
numbers can be compared across papers), rouge-score (ROUGE-1/2/L/Lsum F-measure with
stemming, best reference per prediction, averaged), SQuAD-style exact match and token F1
(lower-cased, punctuation and articles removed, best reference), and ranking metrics
(recall@k, MRR, nDCG@k with binary relevance) behind the `Metric` protocol. Scores are on
a 0-100 scale for BLEU/chrF (as sacrebleu reports them) and 0-1 for everything else.
What it does not do: tokenization choices of its own: each library's defaults apply.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.types import MetricResult

RANK_CUTOFFS = (1, 3, 5, 10)


def _transpose(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference position; pad ragged lists with the first ref."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]


class BLEU:
    name = "bleu"

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        from sacrebleu.metrics import BLEU as SacreBLEU

        metric = SacreBLEU()
        score = metric.corpus_score(predictions, _transpose(references))
        return MetricResult({"bleu": score.score}, {"bleu": True}, str(metric.get_signature()))


class CHRF:
    name = "chrf"

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        from sacrebleu.metrics import CHRF as SacreCHRF

        metric = SacreCHRF()
        score = metric.corpus_score(predictions, _transpose(references))
        return MetricResult({"chrf": score.score}, {"chrf": True}, str(metric.get_signature()))


class ROUGE:
    name = "rouge"
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(self.kinds), use_stemmer=True)
        totals = dict.fromkeys(self.kinds, 0.0)
        for prediction, refs in zip(predictions, references, strict=True):
            # rougeLsum splits summaries on newlines, as rouge-score documents.
            best = scorer.score_multi(refs, prediction)
            for kind in self.kinds:
                totals[kind] += best[kind].fmeasure
        n = max(1, len(predictions))
        scores = {k: v / n for k, v in totals.items()}
        return MetricResult(
            scores, dict.fromkeys(scores, True), "rouge-score F1, use_stemmer=True, best reference"
        )


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class ExactMatch:
    name = "exact_match"

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        hits = [
            max(normalize_answer(p) == normalize_answer(r) for r in refs)
            for p, refs in zip(predictions, references, strict=True)
        ]
        return MetricResult(
            {"exact_match": sum(hits) / max(1, len(hits))},
            {"exact_match": True},
            "SQuAD v1.1 normalisation, best reference",
        )


class TokenF1:
    name = "token_f1"

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        scores = [
            max(token_f1(p, r) for r in refs)
            for p, refs in zip(predictions, references, strict=True)
        ]
        return MetricResult(
            {"token_f1": sum(scores) / max(1, len(scores))},
            {"token_f1": True},
            "SQuAD v1.1 normalisation, best reference",
        )


class Ranking:
    """recall@k, MRR and nDCG@k over ranked ids with binary relevance."""

    def __init__(self, name: str) -> None:
        self.name = name

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult:
        # Text form: each prediction is a space-separated ranked id list.
        return self.compute_ranking([p.split() for p in predictions], [set(r) for r in references])

    def compute_ranking(self, ranked: list[list[str]], relevant: list[set[str]]) -> MetricResult:
        n = max(1, len(ranked))
        scores: dict[str, float] = {}
        if self.name == "mrr":
            total = 0.0
            for ids, rel in zip(ranked, relevant, strict=True):
                total += next((1.0 / (i + 1) for i, x in enumerate(ids) if x in rel), 0.0)
            scores["mrr"] = total / n
        for k in RANK_CUTOFFS:
            if self.name == "recall_at_k":
                scores[f"recall@{k}"] = (
                    sum(
                        len(set(ids[:k]) & rel) / max(1, len(rel))
                        for ids, rel in zip(ranked, relevant, strict=True)
                    )
                    / n
                )
            elif self.name == "ndcg":
                total = 0.0
                for ids, rel in zip(ranked, relevant, strict=True):
                    dcg = sum(1.0 / math.log2(i + 2) for i, x in enumerate(ids[:k]) if x in rel)
                    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
                    total += dcg / ideal if ideal else 0.0
                scores[f"ndcg@{k}"] = total / n
        return MetricResult(scores, dict.fromkeys(scores, True), "binary relevance; 1-based ranks")


@hookimpl
def atlas_register_metrics(register) -> None:
    register("bleu", BLEU)
    register("chrf", CHRF)
    register("rouge", ROUGE)
    register("exact_match", ExactMatch)
    register("token_f1", TokenF1)
    register("recall_at_k", lambda: Ranking("recall_at_k"))
    register("mrr", lambda: Ranking("mrr"))
    register("ndcg", lambda: Ranking("ndcg"))
