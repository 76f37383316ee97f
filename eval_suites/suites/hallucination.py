"""The `hallucination` suite: a RAG stress test with seeded items over a small committed corpus.

Items (built by `build_items`, deterministic for a seed) come from
`data/hallucination/facts.jsonl`: 24 short factual passages written for Atlas, each with
its answer slot, a counterfactual value, two question phrasings and one question the
passage does not answer. Every fact yields an `answerable` item (gold passage plus 0, 2 or
4 distractor passages from other facts, the gold passage first, in the middle or last) and
alternately a `counterfactual` item (the passage states a different value than the
world; the context's value is the gold answer) or an `unanswerable` item (the entity's own
passage and distractors, none of which answers; gold "unanswerable").

Context is given inline as numbered sources ([1] Title: text) in a plain completion
prompt that asks for an answer citing sources as [n] or "unanswerable". Inline is the
only mode on purpose: any OpenAI-compatible server can run it, and each item fixes
exactly which passages are seen and in what order, which the distractor and position
measurements need (retrieval through a server's `rag` field would change both). Every
item is also asked closed-book (no sources) to show what the context changes.

Metrics (definitions in docs/evaluation.md): accuracy, closed-book accuracy and the gain;
accuracy by distractor count and noise sensitivity; accuracy by gold position;
abstention on unanswerable items and false abstention; counterfactual adherence vs
parametric override; ALCE citation recall / precision (citations to sources not given
count against both) and validity; supported-sentence ratio and unsupported-number rate,
judged by the offline proxies of `support.py`, whose accuracy on the hand-labelled fixture
is reported with the run. What it does not do: judge with an LLM, or test retrieval.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import first_choice, gather_with_progress
from ..errors import SuiteConfigError
from ..metrics import compute_metric
from ..support import (
    EmbeddingJudge,
    LexicalJudge,
    NLIJudge,
    SupportJudge,
    calibrate,
    load_pairs,
    numbers_in,
)
from .base import RunContext, Suite, SuiteResult, data_path, file_sha256, metric, stable_order

__all__ = ["HallucinationConfig", "HallucinationSuite", "build_items", "score_answer"]

POSITIONS = ("first", "middle", "last")
ABSTAIN = re.compile(
    r"unanswerable|cannot be answered|can't be answered|not (?:be )?(?:mentioned|stated|provided|given|"
    r"contained|specified|found)|no information|(?:do not|don't) know|not enough information|unknown",
    re.IGNORECASE,
)
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
OPEN_INSTRUCTION = (
    "Answer the question using only the numbered sources below. Cite the sources you use"
    ' like [1]. If the sources do not contain the answer, reply "unanswerable".'
)
CLOSED_INSTRUCTION = 'Answer the question. If you do not know the answer, reply "unanswerable".'


@dataclass(frozen=True)
class HallucinationConfig:
    corpus: str
    calibration: str
    distractor_counts: tuple[int, ...]
    api: str  # "completions" | "chat"
    max_tokens: int
    temperature: float
    closed_book: bool
    support_judge: str  # "lexical" | "embedding" | "nli"
    lexical_threshold: float
    embedding_threshold: float
    nli_model: str  # local CrossEncoder directory; empty: the nli judge is off
    nli_threshold: float
    max_passage_chars: int  # 0 = whole passages; smaller values fit tiny context windows
    metrics: tuple[str, ...]  # metric plugins applied to answerable answers vs gold

    def validate(self) -> None:
        if not self.distractor_counts or any(n < 0 for n in self.distractor_counts):
            raise SuiteConfigError("hallucination: distractor_counts must be non-negative integers")
        if self.support_judge not in ("lexical", "embedding", "nli"):
            raise SuiteConfigError("hallucination: support_judge must be lexical, embedding or nli")
        if self.support_judge == "nli" and not self.nli_model:
            raise SuiteConfigError("hallucination: support_judge = 'nli' needs nli_model = DIR")
        if self.nli_model and not Path(self.nli_model).is_dir():
            # A name that is not a local directory would be fetched from a model hub.
            raise SuiteConfigError(
                f"hallucination: nli_model {self.nli_model!r} is not a local directory"
            )
        if self.api not in ("completions", "chat"):
            raise SuiteConfigError("hallucination: api must be 'completions' or 'chat'")


@dataclass(frozen=True)
class Source:
    fact_id: str
    title: str
    text: str


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # answerable | counterfactual | unanswerable
    question: str
    gold: str  # the answer the context supports, or "unanswerable"
    world: str | None  # the real-world answer (counterfactual items: differs from gold)
    sources: tuple[Source, ...]
    gold_indices: tuple[int, ...]  # 1-based numbers of the supporting sources
    distractors: int
    position: str | None  # where the gold source sits among >= 2 distractors


def passage_text(fact: dict[str, Any], value: str, max_chars: int) -> str:
    text = fact["passage"].format(answer=value)
    return text if not max_chars or len(text) <= max_chars else clip_around(text, value, max_chars)


def clip_around(text: str, value: str, max_chars: int) -> str:
    """Cut a passage to max_chars keeping the answer inside (tiny test models only)."""
    at = max(0, text.find(value) - max_chars // 2)
    return text[at : at + max_chars].strip()


def place(gold: Source, distractors: list[Source], position: str) -> tuple[list[Source], int]:
    index = {"first": 0, "middle": len(distractors) // 2, "last": len(distractors)}[position]
    return distractors[:index] + [gold] + distractors[index:], index + 1


def position_for(k: int, distractors: int, n_counts: int) -> str:
    """Cycle the gold source through first/middle/last across items with the same noise."""
    if distractors == 0:
        return "first"
    if distractors == 1:  # two sources have no middle
        return ("first", "last")[(k // n_counts) % 2]
    return POSITIONS[(k // n_counts) % 3]


def build_items(facts: list[dict[str, Any]], cfg: HallucinationConfig, seed: int) -> list[Item]:
    """Deterministic items for a seed: one answerable + one counterfactual/unanswerable per fact."""
    by_id = {f["id"]: f for f in facts}
    order = stable_order(list(by_id), seed)
    rng = random.Random(seed)
    items: list[Item] = []

    def source(fid: str, value: str | None = None) -> Source:
        f = by_id[fid]
        return Source(fid, f["title"], passage_text(f, value or f["answer"], cfg.max_passage_chars))

    for k, fid in enumerate(order):
        fact = by_id[fid]
        # Distractors never mention this fact's answer or counterfactual value, so only the
        # gold source can support (or contradict) the answer.
        others = [
            o
            for o in order
            if o != fid
            and not any(
                contains_answer(source(o).text, v) for v in (fact["answer"], fact["counterfactual"])
            )
        ]
        n = cfg.distractor_counts[k % len(cfg.distractor_counts)]
        position = position_for(k, n, len(cfg.distractor_counts))
        distractors = [source(o) for o in rng.sample(others, n)]
        sources, gold_at = place(source(fid), distractors, position)
        items.append(
            Item(
                f"{fid}/answerable",
                "answerable",
                rng.choice(fact["questions"]),
                fact["answer"],
                fact["answer"],
                tuple(sources),
                (gold_at,),
                n,
                position if n >= 2 else None,
            )
        )
        # The counterfactual/unanswerable item of a fact: half the largest noise level.
        side_noise = max(cfg.distractor_counts) // 2 if max(cfg.distractor_counts) >= 2 else 0
        distractors = [source(o) for o in rng.sample(others, side_noise)]
        side_position = POSITIONS[k % 3] if side_noise >= 2 else "first"
        if k % 2 == 0:
            cf = source(fid, fact["counterfactual"])
            sources, gold_at = place(cf, distractors, side_position)
            items.append(
                Item(
                    f"{fid}/counterfactual",
                    "counterfactual",
                    rng.choice(fact["questions"]),
                    fact["counterfactual"],
                    fact["answer"],
                    tuple(sources),
                    (gold_at,),
                    side_noise,
                    None,
                )
            )
        else:
            sources, _ = place(source(fid), distractors, side_position)
            items.append(
                Item(
                    f"{fid}/unanswerable",
                    "unanswerable",
                    fact["unanswerable"],
                    "unanswerable",
                    None,
                    tuple(sources),
                    (),
                    side_noise,
                    None,
                )
            )
    return items


def open_prompt(item: Item) -> str:
    numbered = "\n".join(f"[{i}] {s.title}: {s.text}" for i, s in enumerate(item.sources, 1))
    return f"{OPEN_INSTRUCTION}\n\n{numbered}\n\nQuestion: {item.question}\nAnswer:"


def closed_prompt(item: Item) -> str:
    return f"{CLOSED_INSTRUCTION}\n\nQuestion: {item.question}\nAnswer:"


# --- scoring one answer -------------------------------------------------------------------------
def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains_answer(answer: str, gold: str) -> bool:
    target = normalize(gold)
    return bool(target) and f" {target} " in f" {normalize(answer)} "


def citations_of(sentence: str) -> list[int]:
    return [int(n) for group in CITATION.findall(sentence) for n in group.split(",")]


def sentences_of(answer: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(answer.strip()) if s.strip()]


def strip_citations(sentence: str) -> str:
    return " ".join(CITATION.sub(" ", sentence).split())


@dataclass
class Judgements:
    """Support scores for (claim, passage) pairs, computed in one batch per judge."""

    judge: SupportJudge
    scores: dict[tuple[str, str], float] = field(default_factory=dict)

    def fill(self, pairs: set[tuple[str, str]]) -> None:
        todo = sorted(pairs - set(self.scores))
        values = self.judge.scores([c for c, _ in todo], [p for _, p in todo])
        self.scores.update(zip(todo, values, strict=True))

    def supports(self, claim: str, passage: str) -> bool:
        return bool(passage) and self.scores[(claim, passage)] >= self.judge.threshold


def needed_pairs(item: Item, answer: str) -> set[tuple[str, str]]:
    pairs = set()
    texts = [s.text for s in item.sources]
    for sentence in sentences_of(answer):
        claim = strip_citations(sentence)
        valid = [c for c in dict.fromkeys(citations_of(sentence)) if 1 <= c <= len(texts)]
        pairs |= {(claim, t) for t in texts}
        if valid:
            pairs.add((claim, joined(texts, valid)))
            for c in valid:
                rest = [v for v in valid if v != c]
                if rest:
                    pairs.add((claim, joined(texts, rest)))
    return pairs


def joined(texts: list[str], numbers: list[int]) -> str:
    return " ".join(texts[n - 1] for n in numbers)


def score_answer(item: Item, answer: str, judgements: Judgements | None) -> dict[str, Any]:
    """Per-item record: correctness, abstention, citation and support counts."""
    abstained = bool(ABSTAIN.search(answer))
    record: dict[str, Any] = {
        "abstained": abstained,
        "correct": (
            abstained if item.kind == "unanswerable" else contains_answer(answer, item.gold)
        ),
    }
    if item.kind == "counterfactual" and item.world:
        record["adherent"] = contains_answer(answer, item.gold)
        record["override"] = contains_answer(answer, item.world) and not record["adherent"]
    if judgements is None:  # closed book: no sources to cite or check against
        return record
    texts = [s.text for s in item.sources]
    sentences = sentences_of(answer) if not abstained else []
    record.update(citation_counts(item, sentences, texts, judgements))
    known_numbers = numbers_in(" ".join(texts) + " " + item.question)
    answer_numbers = numbers_in(strip_citations(answer))
    record["numbers"] = len(answer_numbers)
    record["unsupported_numbers"] = len(answer_numbers - known_numbers)
    return record


def citation_counts(
    item: Item, sentences: list[str], texts: list[str], j: Judgements
) -> dict[str, Any]:
    counts = {
        "sentences": 0,
        "supported_sentences": 0,
        "cited_sentences_supported": 0,
        "citations": 0,
        "valid_citations": 0,
        "precise_citations": 0,
        "cites_gold": False,
    }
    for sentence in sentences:
        claim = strip_citations(sentence)
        cited = list(dict.fromkeys(citations_of(sentence)))
        valid = [c for c in cited if 1 <= c <= len(texts)]
        counts["sentences"] += 1
        counts["supported_sentences"] += any(j.supports(claim, t) for t in texts)
        counts["citations"] += len(cited)
        counts["valid_citations"] += len(valid)
        counts["cites_gold"] |= any(c in item.gold_indices for c in valid)
        # ALCE recall: all citations of the sentence together support it; an invalid
        # citation (a source not given) makes the sentence's citation set unsupported.
        recall_ok = (
            bool(valid) and len(valid) == len(cited) and j.supports(claim, joined(texts, valid))
        )
        counts["cited_sentences_supported"] += recall_ok
        for c in valid:
            # ALCE precision: with the sentence supported by its citations, a citation is
            # irrelevant when it alone does not support the sentence and the others still do.
            # Citations of a sentence its citations do not support are all imprecise.
            alone = j.supports(claim, texts[c - 1])
            rest = [v for v in valid if v != c]
            needed = not rest or not j.supports(claim, joined(texts, rest))
            counts["precise_citations"] += recall_ok and (alone or needed)
    return counts


# --- the suite ------------------------------------------------------------------------------------
class HallucinationSuite(Suite):
    name = "hallucination"
    description = "RAG stress test: abstention, counterfactual adherence, noise, citations, support"
    metrics = (
        "accuracy",
        "closed_book_accuracy",
        "abstention_unanswerable",
        "counterfactual_adherence",
        "noise_sensitivity",
        "citation_recall",
        "citation_precision",
        "supported_sentence_ratio",
    )
    config_cls = HallucinationConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: HallucinationConfig = ctx.config
        corpus_path, pairs_path = data_path(cfg.corpus), data_path(cfg.calibration)
        facts = [
            json.loads(line)
            for line in corpus_path.read_text(encoding="utf-8").splitlines()
            if line
        ]
        items = build_items(facts, cfg, ctx.seed)[: ctx.limit or None]
        open_answers = await gather_with_progress(
            (self.ask(ctx, cfg, open_prompt(it)) for it in items), desc="hallucination (sources)"
        )
        closed_answers = (
            await gather_with_progress(
                (self.ask(ctx, cfg, closed_prompt(it)) for it in items),
                desc="hallucination (closed book)",
            )
            if cfg.closed_book
            else [None] * len(items)
        )
        judges = make_judges(cfg)
        judgements = Judgements(judges[cfg.support_judge])
        judgements.fill(
            set().union(*(needed_pairs(it, a) for it, a in zip(items, open_answers, strict=True)))
        )
        samples = []
        for it, answer, closed in zip(items, open_answers, closed_answers, strict=True):
            sample = {
                "id": it.id,
                "kind": it.kind,
                "question": it.question,
                "gold": it.gold,
                "distractors": it.distractors,
                "position": it.position,
                "gold_sources": list(it.gold_indices),
                "sources": [s.fact_id for s in it.sources],
                "answer": answer,
                "scores": score_answer(it, answer, judgements),
            }
            if closed is not None:
                sample["closed_book_answer"] = closed
                sample["closed_book_scores"] = score_answer(it, closed, None)
            samples.append(sample)
        passages = {f["id"]: f["passage"].format(answer=f["answer"]) for f in facts}
        claims, texts, labels = load_pairs(pairs_path, passages)
        calibration = {
            name: vars(calibrate(j, claims, texts, labels)) for name, j in judges.items()
        }
        metrics = summarise(samples, cfg)
        metrics.update(plugin_scores(cfg, samples))
        return SuiteResult(
            metrics=metrics,
            samples=samples,
            data_files={
                cfg.corpus: file_sha256(corpus_path),
                cfg.calibration: file_sha256(pairs_path),
            },
            details={
                "items": {
                    k: sum(s["kind"] == k for s in samples)
                    for k in ("answerable", "counterfactual", "unanswerable")
                },
                "support_judge": cfg.support_judge,
                "support_calibration": calibration,
                "context_mode": "inline numbered sources",
            },
        )

    async def ask(self, ctx: RunContext, cfg: HallucinationConfig, prompt: str) -> str:
        params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": ctx.seed}
        if cfg.api == "chat":
            response = await ctx.client.chat(
                {"messages": [{"role": "user", "content": prompt}], **params}
            )
            text = (first_choice(response, "/v1/chat/completions").get("message") or {}).get(
                "content"
            ) or ""
        else:
            response = await ctx.client.completion(
                {"prompt": prompt, "stop": ["\n\n", "\nQuestion:"], **params}
            )
            text = first_choice(response, "/v1/completions").get("text") or ""
        return text.strip()


def make_judges(cfg: HallucinationConfig) -> dict[str, SupportJudge]:
    judges: dict[str, SupportJudge] = {
        "lexical": LexicalJudge(cfg.lexical_threshold),
        "embedding": EmbeddingJudge(cfg.embedding_threshold),
    }
    if cfg.nli_model:
        judges["nli"] = NLIJudge(cfg.nli_threshold, cfg.nli_model)
    return judges


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarise(samples: list[dict[str, Any]], cfg: HallucinationConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, better: bool | None, description: str) -> None:
        if value is not None:  # a metric with nothing to measure (e.g. --limit) is left out
            out[name] = metric(value, better, description)

    answerable = [s for s in samples if s["kind"] == "answerable"]
    unanswerable = [s for s in samples if s["kind"] == "unanswerable"]
    counterfactual = [s for s in samples if s["kind"] == "counterfactual"]
    acc = ratio(sum(s["scores"]["correct"] for s in answerable), len(answerable))
    add("accuracy", acc, True, "answerable items whose answer contains the gold answer")
    closed = [s for s in answerable if "closed_book_scores" in s]
    closed_acc = ratio(sum(s["closed_book_scores"]["correct"] for s in closed), len(closed))
    add("closed_book_accuracy", closed_acc, True, "the same answerable questions without sources")
    if acc is not None and closed_acc is not None:
        add(
            "context_gain",
            acc - closed_acc,
            True,
            "accuracy with sources minus closed-book accuracy",
        )
    by_noise = {}
    for n in cfg.distractor_counts:
        group = [s for s in answerable if s["distractors"] == n]
        by_noise[n] = ratio(sum(s["scores"]["correct"] for s in group), len(group))
        add(
            f"accuracy_distractors_{n}",
            by_noise[n],
            True,
            f"answerable items with {n} distractor sources",
        )
    lo, hi = by_noise.get(min(cfg.distractor_counts)), by_noise.get(max(cfg.distractor_counts))
    if lo is not None and hi is not None and len(by_noise) > 1:
        add("noise_sensitivity", lo - hi, False, "accuracy drop from fewest to most distractors")
    for pos in POSITIONS:
        group = [s for s in answerable if s["position"] == pos]
        add(
            f"accuracy_position_{pos}",
            ratio(sum(s["scores"]["correct"] for s in group), len(group)),
            True,
            f"answerable items (>= 2 distractors) with the gold source {pos}",
        )
    add(
        "abstention_unanswerable",
        ratio(sum(s["scores"]["abstained"] for s in unanswerable), len(unanswerable)),
        True,
        "unanswerable items where the model abstains",
    )
    add(
        "false_abstention",
        ratio(sum(s["scores"]["abstained"] for s in answerable), len(answerable)),
        False,
        "answerable items where the model abstains",
    )
    add(
        "counterfactual_adherence",
        ratio(sum(s["scores"]["adherent"] for s in counterfactual), len(counterfactual)),
        True,
        "counterfactual items answered with the context's value",
    )
    add(
        "parametric_override",
        ratio(sum(s["scores"]["override"] for s in counterfactual), len(counterfactual)),
        False,
        "counterfactual items answered with the real-world value instead",
    )
    with_context = [s["scores"] for s in samples if "sentences" in s["scores"]]
    total = {
        k: sum(r[k] for r in with_context)
        for k in (
            "sentences",
            "supported_sentences",
            "cited_sentences_supported",
            "citations",
            "valid_citations",
            "precise_citations",
            "numbers",
            "unsupported_numbers",
        )
    }
    add(
        "citation_recall",
        ratio(total["cited_sentences_supported"], total["sentences"]),
        True,
        "ALCE: answer sentences fully supported by their citations",
    )
    add(
        "citation_precision",
        ratio(total["precise_citations"], total["citations"]),
        True,
        "ALCE: citations that are relevant (invalid ones count as imprecise)",
    )
    add(
        "citation_validity",
        ratio(total["valid_citations"], total["citations"]),
        True,
        "citations that name a source that was given",
    )
    cited_gold = [s for s in answerable if "cites_gold" in s["scores"]]
    add(
        "gold_citation_rate",
        ratio(sum(s["scores"]["cites_gold"] for s in cited_gold), len(cited_gold)),
        True,
        "answerable items whose answer cites the gold source",
    )
    add(
        "supported_sentence_ratio",
        ratio(total["supported_sentences"], total["sentences"]),
        True,
        "answer sentences supported by at least one given source",
    )
    add(
        "unsupported_number_rate",
        ratio(total["unsupported_numbers"], total["numbers"]),
        False,
        "numbers in answers that appear in no given source nor the question",
    )
    return out


def plugin_scores(
    cfg: HallucinationConfig, samples: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    answerable = [s for s in samples if s["kind"] == "answerable"]
    if not answerable:
        return {}
    out = {}
    for name in cfg.metrics:
        scores, flags, _ = compute_metric(
            name, [s["answer"] for s in answerable], [[s["gold"]] for s in answerable]
        )
        for key, value in scores.items():
            out[f"answerable/{key}"] = metric(
                value, flags[key], f"{name} plugin on answerable items"
            )
    return out
