"""The `hallucination` suite: a RAG stress test with seeded items over a small committed corpus.

Items (built by `build_items`, deterministic for a seed) come from
`data/hallucination/facts.jsonl`: 24 short factual passages written for Atlas, each with
its answer slot, a counterfactual value, two question phrasings and one question the
passage does not answer. Every fact yields an `answerable` item (gold passage plus 0, 2 or
4 distractor passages from other facts, the gold passage first, in the middle or last) and
alternately a `counterfactual` item (the passage states a different value than the
world; the context's value is the gold answer) or an `unanswerable` item (the entity's own
passage and distractors, none of which answers; gold "unanswerable").

Two context modes (`context` in the config):
  - `inline` (default): the suite writes the item's passages into a plain completion prompt
    as numbered sources ([1] Title: text) and asks for an answer citing them as [n] or
    "unanswerable". Each item fixes exactly which passages are seen and in what order,
    which the distractor and position measurements need, and any OpenAI-compatible server
    can run it; that is why it stays the default.
  - `rag` (Atlas only): the suite ingests the corpus into two collections on the server
    (`POST /v1/collections/NAME/documents`): every passage with its real value, and every
    passage with its counterfactual value, so the two versions of a passage never compete.
    Each run fills collections of its own, `hallucination-{facts|counterfactual}-<hash of
    the documents>-<run token>`, so two runs on one server never delete or change each
    other's; the response cache keys on the name without the token, so reruns and resumed
    runs still hit it (chunk ids are content-derived, the same in every collection). The
    collections are deleted at the end unless `rag_keep_collections` (a run killed
    outright leaves its pair behind: `DELETE /v1/collections/NAME`). Each bare question
    goes out with the request's `rag` object (counterfactual items: the counterfactual
    collection), the server retrieves and writes its own grounded prompt, and the answer
    is scored against the `sources` the response says were given (in prompt order, so
    [n] means the n-th). This adds retrieval recall@k of the gold passage and mixes
    retrieval quality into every other number; distractor-count and gold-position metrics
    are left out, since the retriever, not the item, then picks the context. A server
    without `/v1/collections` stops the run with a one-line CapabilityError.
Every item is also asked closed-book (no sources, no `rag`) to show what the context changes.

Fitting the server's context (`fit.py`): in inline mode, an item whose prompt plus
`max_tokens` does not fit has every passage cut to the longest common length that fits
(the gold passage around its answer, so the answer stays in it; others from the start),
never below `MIN_PASSAGE_CHARS`; the distractors stay, since they are what the noise
metrics measure. An item that cannot fit so, whose closed-book or rag-mode question does
not fit, or that the server refuses as too long, is skipped: left out of every metric and
listed in results.json `context_fit`. Samples record `passage_chars`, the cut (null: whole).

Both data files (the corpus and the judges' calibration pairs) are checked when the run
starts, before any request: a record with a missing or mistyped key is one line naming
FILE:LINE (`load_facts`, `support.load_pairs`).

Metrics (definitions in docs/evaluation.md): accuracy, closed-book accuracy and the gain;
accuracy by distractor count and noise sensitivity, accuracy by gold position (inline only);
each accuracy with the mean answer length in words of the answers it counts (containment
rewards verbosity: a model that pastes its sources contains every gold answer); abstention
on unanswerable items and false abstention; counterfactual adherence vs parametric
override; ALCE citation recall / precision (citations to sources not given count against
both) and validity; supported-sentence ratio and unsupported-number rate, judged by the
offline proxies of `support.py` (a short answer sentence, "Athens [1].", is judged with its
question), whose accuracy on the hand-labelled fixture is reported with the run; in rag
mode, retrieval recall@k; metric plugins (token F1) on answerable answers without their
citation markers. What it does not do: judge with an LLM, or measure retrieval beyond
whether the gold passage was among the sources given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import OpenAIClient, first_choice, gather_with_progress
from ..errors import CapabilityError, EvalError, ServerRequestError, SuiteConfigError
from ..metrics import check_metrics, compute_metric
from ..support import (
    Claim,
    EmbeddingJudge,
    LexicalJudge,
    NLIJudge,
    SupportJudge,
    calibrate,
    line_numbers,
    load_pairs,
    make_claim,
    numbers_in,
)
from .base import (
    RunContext,
    Suite,
    SuiteResult,
    data_path,
    file_sha256,
    metric,
    nothing_fits,
    read_jsonl,
    stable_order,
)

__all__ = [
    "HallucinationConfig",
    "HallucinationSuite",
    "build_items",
    "calibration_passages",
    "collection_name",
    "load_facts",
    "rag_documents",
    "score_answer",
]

POSITIONS = ("first", "middle", "last")
ABSTAIN = re.compile(
    r"unanswerable|cannot be answered|can't be answered|not (?:be )?(?:mentioned|stated|provided|given|"
    r"contained|specified|found)|no information|(?:do not|don't) know|not enough information|unknown",
    re.IGNORECASE,
)
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")
OPEN_INSTRUCTION = (
    "Answer the question using only the numbered sources below. Cite the sources you use"
    ' like [1]. If the sources do not contain the answer, reply "unanswerable".'
)
CLOSED_INSTRUCTION = 'Answer the question. If you do not know the answer, reply "unanswerable".'
# A passage cut shorter than this holds too little of its fact: the item is skipped instead.
MIN_PASSAGE_CHARS = 48
# Metrics that need the item to fix which passages the model sees and where: meaningless
# when the server's retriever chooses the context, so rag mode leaves them out.
INLINE_ONLY = (
    "accuracy_distractors_*, noise_sensitivity, accuracy_position_*, answer_words_distractors_*,"
    " answer_words_position_*"
)


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
    max_passage_chars: int  # 0 = whole passages (cut further only where a prompt must fit)
    metrics: tuple[str, ...]  # metric plugins applied to answerable answers vs gold
    context: str  # "inline" (numbered sources in the prompt) | "rag" (the server retrieves)
    rag_top_k: int  # rag mode: sources the server retrieves per question
    rag_retriever: str  # rag mode: "" = the server's default retriever
    rag_reranker: str  # rag mode: "" = the server's default reranker
    rag_keep_collections: bool  # rag mode: leave the suite's collections on the server
    max_context_tokens: int  # 0 = the server's max_model_len; set it for servers without one

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
        if self.context not in ("inline", "rag"):
            raise SuiteConfigError("hallucination: context must be 'inline' or 'rag'")
        if not 1 <= self.rag_top_k <= 100:
            raise SuiteConfigError("hallucination: rag_top_k must be between 1 and 100")
        if self.max_context_tokens < 0 or self.max_passage_chars < 0 or self.max_tokens < 1:
            raise SuiteConfigError(
                "hallucination: max_context_tokens and max_passage_chars must be >= 0,"
                " max_tokens >= 1"
            )
        check_metrics(self.metrics)


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


FACT_KEYS = ("id", "title", "passage", "answer", "counterfactual", "questions", "unanswerable")


def load_facts(path: Path) -> list[dict[str, Any]]:
    """The corpus, each record checked as it is read (before any request): a JSON object
    with a distinct string `id`, string `title`, `passage` (with an `{answer}` slot and no
    other braces), `answer`, `counterfactual` (another value) and `unanswerable`, and
    `questions`, a non-empty list of strings; the first that is not stops the run with one
    line naming FILE:LINE and the key."""
    facts = read_jsonl(
        path,
        "hallucination",
        "corpus",
        required=FACT_KEYS,
        kinds={k: (list,) if k == "questions" else (str,) for k in FACT_KEYS},
        unique="id",
    )
    for number, fact in zip(line_numbers(path), facts, strict=True):
        where = f"hallucination: corpus {path}:{number}"
        empty = [k for k in FACT_KEYS if not fact[k] or (k != "questions" and not fact[k].strip())]
        if empty:
            raise SuiteConfigError(f"{where}: empty {', '.join(empty)}")
        if not all(isinstance(q, str) and q.strip() for q in fact["questions"]):
            raise SuiteConfigError(f"{where}: questions is not a list of non-empty strings")
        try:
            slots = fact["passage"].format(answer="\x00").count("\x00")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # {x}, {0}, {
            slots = -1
        if slots < 1:
            raise SuiteConfigError(
                f"{where}: passage needs its {{answer}} slot and no other braces (write a"
                " literal brace as {{ or }})"
            )
        if normalize(fact["answer"]) == normalize(fact["counterfactual"]):
            raise SuiteConfigError(f"{where}: counterfactual must differ from answer")
    return facts


def calibration_passages(facts: list[dict[str, Any]]) -> dict[str, str]:
    """Fact id -> passage with its real answer: what the calibration pairs refer to."""
    return {f["id"]: f["passage"].format(answer=f["answer"]) for f in facts}


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
        side_noise = max(cfg.distractor_counts) // 2 if max(cfg.distractor_counts) >= 2 else 0
        if len(others) < max(n, side_noise):
            raise SuiteConfigError(
                f"hallucination: fact {fid!r} has {len(others)} other passages that can be its"
                f" distractors (they must not contain its answer or counterfactual), fewer"
                f" than the {max(n, side_noise)} its items need; add facts to the corpus or"
                " lower distractor_counts"
            )
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


def as_request(cfg: HallucinationConfig, prompt: str) -> str | list[dict[str, str]]:
    """What the prompt is sent as: a completion prompt, or one user message (api = chat)."""
    return [{"role": "user", "content": prompt}] if cfg.api == "chat" else prompt


def with_passages_cut(item: Item, max_chars: int) -> Item:
    """Every passage at most `max_chars` long, the gold one cut around its answer."""
    sources = tuple(
        s
        if len(s.text) <= max_chars
        else Source(s.fact_id, s.title, clip_around(s.text, item.gold, max_chars))
        for s in item.sources
    )
    return dataclasses.replace(item, sources=sources)


async def fit_inline(
    ctx: RunContext, cfg: HallucinationConfig, item: Item
) -> tuple[Item, int | None] | None:
    """The item with passages cut to fit (and the cut, None when whole), or None: skipped."""
    fit = ctx.fit
    if await fit.fits(as_request(cfg, open_prompt(item)), cfg.max_tokens):
        fit.keep(item.id, trimmed=False)
        return item, None
    longest = max(len(s.text) for s in item.sources)
    cut = await fit.largest_fitting(
        lambda n: as_request(cfg, open_prompt(with_passages_cut(item, n))),
        MIN_PASSAGE_CHARS,
        longest - 1,
        cfg.max_tokens,
    )
    if cut is None:
        what = f"the prompt with its {len(item.sources)} passages cut to {MIN_PASSAGE_CHARS} characters"
        fit.skip(item.id, fit.too_long_reason(what, cfg.max_tokens))
        return None
    fit.keep(item.id, trimmed=True)
    return with_passages_cut(item, cut), cut


# --- rag mode: the server retrieves from collections the suite fills ---------------------------
def rag_documents(
    facts: list[dict[str, Any]], cfg: HallucinationConfig, counterfactual: bool
) -> list[dict[str, str]]:
    """The corpus as documents for `POST /v1/collections/NAME/documents`, one per fact.

    The counterfactual collection holds every passage with its counterfactual value, so a
    collection never holds both versions of a passage; `source` is the fact id in both.
    """
    return [
        {
            "text": passage_text(
                f, f["counterfactual"] if counterfactual else f["answer"], cfg.max_passage_chars
            ),
            "source": f["id"],
            "title": f["title"],
        }
        for f in facts
    ]


def collection_name(role: str, documents: list[dict[str, str]]) -> str:
    """Deterministic per role and content: the name samples record and the cache keys on
    (a run's collections add a token of its own to it)."""
    canonical = json.dumps(documents, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"hallucination-{role}-{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:16]}"


def collection_role(item: Item) -> str:
    return "counterfactual" if item.kind == "counterfactual" else "facts"


def gold_passage(item: Item) -> str | None:
    """The fact id of the passage that answers the item (None for unanswerable items)."""
    return item.sources[item.gold_indices[0] - 1].fact_id if item.gold_indices else None


def with_given_sources(item: Item, given: list[dict[str, Any]]) -> Item:
    """The item as the server posed it: the sources it retrieved, numbered as in its prompt."""
    gold = gold_passage(item)
    sources = tuple(
        Source(str(s["source"]), str(s.get("heading") or ""), str(s["text"])) for s in given
    )
    gold_indices = tuple(
        n for n, s in enumerate(sources, 1) if gold is not None and s.fact_id == gold
    )
    return dataclasses.replace(
        item, sources=sources, gold_indices=gold_indices, distractors=0, position=None
    )


def rag_routes_error(client: OpenAIClient, status: int | None) -> CapabilityError:
    return CapabilityError(
        f"the hallucination suite's rag mode (context = 'rag') needs Atlas's RAG routes, but"
        f" {client.base_url} answered GET /v1/collections with HTTP {status}; run it against"
        " `atlas serve` with [rag] enabled, or use the default --set context=inline"
    )


async def probe_rag_routes(client: OpenAIClient) -> None:
    """Fail in one line before anything is sent when the server has no collections routes."""
    try:
        await client.request("GET", "/v1/collections")
    except ServerRequestError as e:
        if e.status in (404, 405):
            raise rag_routes_error(client, e.status) from None
        raise


async def fill_collections(
    client: OpenAIClient, documents: dict[str, list[dict[str, str]]], names: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Ingest each role's documents into its collection (`names[role]`)."""
    out = {}
    for role, docs in documents.items():
        name = names[role]
        path = f"/v1/collections/{name}/documents"
        answer = await client.request("POST", path, {"documents": docs})
        chunks = answer.get("chunks") if isinstance(answer, dict) else None
        total = answer.get("total") if isinstance(answer, dict) else None
        if not isinstance(chunks, int) or not isinstance(total, int):
            raise ServerRequestError(
                f"POST {path} did not answer with chunk counts: {answer!r:.120}"
            )
        if total != chunks:
            # Same name, other content: someone else's points would compete in retrieval.
            raise ServerRequestError(
                f"collection {name} holds {total} chunks after ingesting {chunks}; it has other"
                f" content: delete it (DELETE /v1/collections/{name}) and run again"
            )
        out[role] = {"collection": name, "documents": len(docs), "chunks": chunks}
    return out


async def drop_collections(client: OpenAIClient, names: list[str]) -> bool:
    """Delete the suite's collections (best effort: a failure never hides the run's result)."""
    ok = True
    for name in names:
        try:
            await client.request("DELETE", f"/v1/collections/{name}")
        except ServerRequestError as e:
            ok = ok and e.status == 404  # never created: nothing to delete
        except EvalError:
            ok = False
    return ok


def given_sources(response: Any, path: str) -> list[dict[str, Any]]:
    """The `sources` an Atlas RAG response lists: every source its prompt numbered."""
    sources = response.get("sources") if isinstance(response, dict) else None
    if not isinstance(sources, list) or not all(
        isinstance(s, dict) and isinstance(s.get("source"), str) and isinstance(s.get("text"), str)
        for s in sources
    ):
        raise CapabilityError(
            f"{path} answered a request with a `rag` field without the list of `sources` it"
            " gave the model; the hallucination suite's rag mode needs an Atlas server that"
            " reports them (or use the default --set context=inline)"
        )
    return sources


# --- scoring one answer -------------------------------------------------------------------------
def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains_answer(answer: str, gold: str) -> bool:
    target = normalize(gold)
    return bool(target) and f" {target} " in f" {normalize(answer)} "


def answer_words(answer: str) -> int:
    """The answer's length in words: whitespace-separated pieces with a letter or digit,
    citation markers removed ("Athens [1]." -> 1)."""
    return sum(any(ch.isalnum() for ch in w) for w in strip_citations(answer).split())


def citations_of(sentence: str) -> list[int]:
    return [int(n) for group in CITATION.findall(sentence) for n in group.split(",")]


def sentences_of(answer: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(answer.strip()) if s.strip()]


def strip_citations(sentence: str) -> str:
    """The text without citation markers: "Athens [1]." -> "Athens."."""
    return SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(CITATION.sub(" ", sentence).split()))


@dataclass
class Judgements:
    """Support scores for (claim, passage) pairs, computed in one batch per judge."""

    judge: SupportJudge
    scores: dict[tuple[Claim, str], float] = field(default_factory=dict)

    def fill(self, pairs: set[tuple[Claim, str]]) -> None:
        todo = sorted(pairs - set(self.scores))
        values = self.judge.scores([c for c, _ in todo], [p for _, p in todo])
        self.scores.update(zip(todo, values, strict=True))

    def supports(self, claim: Claim, passage: str) -> bool:
        return bool(passage) and self.scores[(claim, passage)] >= self.judge.threshold


def claim_of(item: Item, sentence: str) -> Claim:
    """What an answer sentence claims: itself without citation markers, judged with the
    item's question when it is short ("Athens [1]." -> "Which city ...? Athens.")."""
    return make_claim(strip_citations(sentence), item.question)


def needed_pairs(item: Item, answer: str) -> set[tuple[Claim, str]]:
    pairs = set()
    texts = [s.text for s in item.sources]
    for sentence in sentences_of(answer):
        claim = claim_of(item, sentence)
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
        "answer_words": answer_words(answer),
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
        claim = claim_of(item, sentence)
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
        "answer_words",
        "closed_book_accuracy",
        "abstention_unanswerable",
        "counterfactual_adherence",
        "noise_sensitivity",
        "citation_recall",
        "citation_precision",
        "supported_sentence_ratio",
        "retrieval_recall_at_k (context = rag)",
    )
    config_cls = HallucinationConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: HallucinationConfig = ctx.config
        corpus_path, pairs_path = data_path(cfg.corpus), data_path(cfg.calibration)
        # Both data files are checked here, before any request (a bad record is one line).
        facts = load_facts(corpus_path)
        claims, texts, labels = load_pairs(pairs_path, calibration_passages(facts))
        items = build_items(facts, cfg, ctx.seed)[: ctx.limit or None]
        rag_details: dict[str, Any] = {}
        if cfg.context == "rag":
            fits = await gather_with_progress(
                (self.question_fits(ctx, cfg, it) for it in items), desc="fitting prompts"
            )
            posed, open_answers, extra = await self.ask_with_retrieval(
                ctx, cfg, facts, [it for it, ok in zip(items, fits, strict=True) if ok], rag_details
            )
        else:
            fitted = await gather_with_progress(
                (fit_inline(ctx, cfg, it) for it in items), desc="fitting prompts"
            )
            kept = [f for f in fitted if f is not None]
            posed = [it for it, _ in kept]
            extra = [{"passage_chars": cut} for _, cut in kept]
            open_answers = await gather_with_progress(
                (self.ask(ctx, cfg, it.id, open_prompt(it)) for it in posed),
                desc="hallucination (sources)",
            )
        closed_answers = (
            await gather_with_progress(
                (self.ask(ctx, cfg, it.id, closed_prompt(it), check_fit=True) for it in posed),
                desc="hallucination (closed book)",
            )
            if cfg.closed_book
            else [None] * len(posed)
        )
        # Items skipped at any step (a refused request included) leave every metric.
        rows = [
            row
            for row in zip(posed, open_answers, closed_answers, extra, strict=True)
            if not ctx.fit.is_skipped(row[0].id)
        ]
        if not rows:
            raise nothing_fits(self.name, ctx.fit, "items")
        posed, open_answers, closed_answers, extra = (list(c) for c in zip(*rows, strict=True))
        judges = make_judges(cfg)
        judgements = Judgements(judges[cfg.support_judge])
        judgements.fill(
            set().union(*(needed_pairs(it, a) for it, a in zip(posed, open_answers, strict=True)))
        )
        samples = []
        for it, answer, closed, more in zip(
            posed, open_answers, closed_answers, extra, strict=True
        ):
            sample: dict[str, Any] = {
                "id": it.id,
                "kind": it.kind,
                "question": it.question,
                "gold": it.gold,
            }
            if cfg.context == "inline":
                sample.update(distractors=it.distractors, position=it.position)
            sample.update(
                gold_sources=list(it.gold_indices),
                sources=[s.fact_id for s in it.sources],
                **more,
                answer=answer,
                scores=score_answer(it, answer, judgements),
            )
            if "gold_passage" in more and more["gold_passage"] is not None:
                sample["scores"]["gold_retrieved"] = bool(it.gold_indices)
            if closed is not None:
                sample["closed_book_answer"] = closed
                sample["closed_book_scores"] = score_answer(it, closed, None)
            samples.append(sample)
        calibration = {
            name: vars(calibrate(j, claims, texts, labels)) for name, j in judges.items()
        }
        metrics = summarise(samples, cfg)
        metrics.update(plugin_scores(cfg, samples))
        details: dict[str, Any] = {
            "items": {
                k: sum(s["kind"] == k for s in samples)
                for k in ("answerable", "counterfactual", "unanswerable")
            },
            "support_judge": cfg.support_judge,
            "support_calibration": calibration,
            "context_mode": (
                "inline numbered sources"
                if cfg.context == "inline"
                else "rag: the server retrieves sources for the request's `rag` field"
            ),
        }
        if rag_details:
            given = [len(s["retrieved"]) for s in samples]
            rag_details.update(
                sources_given_mean=sum(given) / len(given) if given else None,
                items_given_fewer_than_top_k=sum(n < cfg.rag_top_k for n in given),
                omitted_metrics=INLINE_ONLY,
                omitted_because=(
                    "the retriever, not the item, chooses which passages the model sees, how"
                    " many and in what order, so accuracy by distractor count and by gold"
                    " position would not measure what their names say"
                ),
            )
            details["rag"] = rag_details
        return SuiteResult(
            metrics=metrics,
            samples=samples,
            data_files={
                cfg.corpus: file_sha256(corpus_path),
                cfg.calibration: file_sha256(pairs_path),
            },
            details=details,
        )

    async def ask_with_retrieval(
        self,
        ctx: RunContext,
        cfg: HallucinationConfig,
        facts: list[dict[str, Any]],
        items: list[Item],
        details: dict[str, Any],
    ) -> tuple[list[Item], list[str], list[dict[str, Any]]]:
        """Rag mode: fill the collections, ask each question with `rag`, drop the collections.

        Returns each item as the server posed it (its sources are those the server says it
        gave), the answers, and the per-sample retrieval record.
        """
        documents = {
            "facts": rag_documents(facts, cfg, counterfactual=False),
            "counterfactual": rag_documents(facts, cfg, counterfactual=True),
        }
        stable = {role: collection_name(role, docs) for role, docs in documents.items()}
        token = uuid.uuid4().hex[:8]  # this run's own collections (see the module docstring)
        names = {role: f"{name}-{token}" for role, name in stable.items()}
        options = {"top_k": cfg.rag_top_k}
        if cfg.rag_retriever:
            options["retriever"] = cfg.rag_retriever
        if cfg.rag_reranker:
            options["reranker"] = cfg.rag_reranker
        details.update(
            top_k=cfg.rag_top_k,
            retriever=cfg.rag_retriever or "server default",
            reranker=cfg.rag_reranker or "server default",
        )
        await probe_rag_routes(ctx.client)
        try:
            details["collections"] = await fill_collections(ctx.client, documents, names)
            responses = await gather_with_progress(
                (
                    ctx.fit.refused_as_too_long(
                        it.id,
                        self.ask_full(
                            ctx,
                            cfg,
                            it.question,
                            {"collection": names[collection_role(it)], **options},
                            {"collection": stable[collection_role(it)], **options},
                        ),
                    )
                    for it in items
                ),
                desc="hallucination (rag)",
            )
        finally:
            details["collections_deleted"] = not cfg.rag_keep_collections and (
                await drop_collections(ctx.client, list(names.values()))
            )
        posed, answers, extra = [], [], []
        for it, answered in zip(items, responses, strict=True):
            if answered is None:  # refused as too long: skipped (the caller drops it)
                posed.append(it)
                answers.append("")
                extra.append({})
                continue
            answer, response, choice = answered
            given = given_sources(response, self.path(cfg))
            posed.append(with_given_sources(it, given))
            answers.append(answer)
            extra.append(
                {
                    "collection": stable[collection_role(it)],
                    "gold_passage": gold_passage(it),
                    "retrieved": [
                        {k: s.get(k) for k in ("id", "chunk_id", "source", "score", "text")}
                        for s in given
                    ],
                    "server_citations": [
                        c.get("id") for c in choice.get("citations") or [] if isinstance(c, dict)
                    ],
                    "server_dropped_citations": choice.get("dropped_citations"),
                }
            )
        return posed, answers, extra

    @staticmethod
    def path(cfg: HallucinationConfig) -> str:
        return "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"

    async def question_fits(self, ctx: RunContext, cfg: HallucinationConfig, item: Item) -> bool:
        """Rag mode: the bare question must fit (the server fits its sources around it)."""
        if await ctx.fit.fits(as_request(cfg, item.question), cfg.max_tokens):
            ctx.fit.keep(item.id, trimmed=False)
            return True
        ctx.fit.skip(item.id, ctx.fit.too_long_reason("the question alone", cfg.max_tokens))
        return False

    async def ask(
        self,
        ctx: RunContext,
        cfg: HallucinationConfig,
        item_id: str,
        prompt: str,
        check_fit: bool = False,
    ) -> str | None:
        """The answer text, or None when the item is skipped: the prompt does not fit
        (checked when `check_fit`) or the server refused it as too long."""
        if check_fit and not await ctx.fit.fits(as_request(cfg, prompt), cfg.max_tokens):
            ctx.fit.skip(item_id, ctx.fit.too_long_reason("the closed-book prompt", cfg.max_tokens))
            return None
        answer = await ctx.fit.refused_as_too_long(item_id, self.ask_full(ctx, cfg, prompt))
        return None if answer is None else answer[0]

    async def ask_full(
        self,
        ctx: RunContext,
        cfg: HallucinationConfig,
        prompt: str,
        rag: dict[str, Any] | None = None,
        rag_key: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(answer text, whole response, its first choice); `rag` adds the server's retrieval,
        and the response cache keys on `rag_key` in its place (the run-independent names)."""
        params: dict[str, Any] = {
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "seed": ctx.seed,
        }
        key_params = dict(params)
        if rag is not None:
            params["rag"], key_params["rag"] = rag, rag_key or rag
        if cfg.api == "chat":
            messages = [{"role": "user", "content": prompt}]
            response = await ctx.client.chat(
                {"messages": messages, **params}, {"messages": messages, **key_params}
            )
            choice = first_choice(response, "/v1/chat/completions")
            text = (choice.get("message") or {}).get("content") or ""
        else:
            stop = ["\n\n", "\nQuestion:"]
            response = await ctx.client.completion(
                {"prompt": prompt, "stop": stop, **params},
                {"prompt": prompt, "stop": stop, **key_params},
            )
            choice = first_choice(response, "/v1/completions")
            text = choice.get("text") or ""
        return text.strip(), response, choice


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


def mean_words(scores: list[dict[str, Any]]) -> float | None:
    """Mean answer length in words over score records that have it (None: none has)."""
    words = [r["answer_words"] for r in scores if "answer_words" in r]
    return ratio(sum(words), len(words))


# Containment accuracy rewards verbosity (an answer that pastes every source contains the
# gold answer), so every accuracy comes with the mean length of the answers it counts.
WORDS_NOTE = "mean answer length in words (citation markers removed)"


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
    add(
        "answer_words",
        mean_words([s["scores"] for s in samples]),
        None,
        f"{WORDS_NOTE}, every item asked with sources",
    )
    add(
        "answer_words_answerable",
        mean_words([s["scores"] for s in answerable]),
        None,
        f"{WORDS_NOTE}, answerable items (those of accuracy)",
    )
    closed = [s for s in answerable if "closed_book_scores" in s]
    closed_acc = ratio(sum(s["closed_book_scores"]["correct"] for s in closed), len(closed))
    add("closed_book_accuracy", closed_acc, True, "the same answerable questions without sources")
    add(
        "closed_book_answer_words",
        mean_words([s["closed_book_scores"] for s in closed]),
        None,
        f"{WORDS_NOTE}, answerable items asked closed-book",
    )
    if acc is not None and closed_acc is not None:
        add(
            "context_gain",
            acc - closed_acc,
            True,
            "accuracy with sources minus closed-book accuracy",
        )
    if cfg.context == "inline":
        add_noise_and_position(add, answerable, cfg)
    else:
        with_gold = [s for s in samples if "gold_retrieved" in s["scores"]]
        add(
            "retrieval_recall_at_k",
            ratio(sum(s["scores"]["gold_retrieved"] for s in with_gold), len(with_gold)),
            True,
            "answerable and counterfactual items whose gold passage is among the sources"
            " the server gave",
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
        "answer_words_counterfactual",
        mean_words([s["scores"] for s in counterfactual]),
        None,
        f"{WORDS_NOTE}, counterfactual items",
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


def add_noise_and_position(add, answerable: list[dict[str, Any]], cfg: HallucinationConfig) -> None:
    """Inline mode only: accuracy by distractor count and by where the gold source sits."""
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
        add(
            f"answer_words_distractors_{n}",
            mean_words([s["scores"] for s in group]),
            None,
            f"{WORDS_NOTE}, answerable items with {n} distractor sources",
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
            f"answer_words_position_{pos}",
            mean_words([s["scores"] for s in group]),
            None,
            f"{WORDS_NOTE}, answerable items with the gold source {pos}",
        )


def plugin_scores(
    cfg: HallucinationConfig, samples: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    answerable = [s for s in samples if s["kind"] == "answerable"]
    if not answerable:
        return {}
    out = {}
    for name in cfg.metrics:
        # Citation markers are what the prompt asks for, not part of the answer: a plugin
        # scores the answer without them ("Athens [1]." -> "Athens .").
        scores, flags, _ = compute_metric(
            name,
            [strip_citations(s["answer"]) for s in answerable],
            [[s["gold"]] for s in answerable],
        )
        for key, value in scores.items():
            out[f"answerable/{key}"] = metric(
                value, flags[key], f"{name} plugin on answerable items"
            )
    return out
