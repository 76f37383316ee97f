"""The small public types that plugins build on (plugins import only these and hookspecs).

What it does: defines a `Chunk` of a source document, a `RetrievedChunk` with its score,
the `Retriever`, `Reranker` and `Metric` protocols, `MetricResult`, and the `RAGContext`
handed to plugin factories (the vector store, the embedder, and — for rerankers that use
the served model — scoring functions). What it does not do: any retrieval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Chunk:
    """A piece of a source document, small enough for the embedder's window."""

    id: str  # content-derived (uuid5 of source, span and text): re-ingesting creates no duplicates
    text: str
    source: str  # file path (or caller-given name) the chunk came from
    heading: str | None  # the nearest heading above the chunk (Markdown / reST), or the title
    start: int  # character span [start, end) in the source text
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievedChunk:
    chunk: Chunk
    score: float  # higher is better; comparable only within one retriever's results
    retriever: str
    vector: Any = None  # the stored dense embedding when the store returned it (saves re-embedding)


@runtime_checkable
class Retriever(Protocol):
    """Returns up to `top_k` chunks of `collection` for `query`, best first."""

    def retrieve(
        self, collection: str, query: str, top_k: int, filters: dict[str, Any] | None = None
    ) -> list[RetrievedChunk]: ...


@runtime_checkable
class Reranker(Protocol):
    """Reorders candidates for `query`; returns at most `top_k`, best first."""

    def rerank(
        self, query: str, candidates: Sequence[RetrievedChunk], top_k: int
    ) -> list[RetrievedChunk]: ...


@dataclass(frozen=True)
class MetricResult:
    scores: dict[str, float]
    higher_is_better: dict[str, bool]
    signature: str | None = None  # e.g. sacrebleu's signature, so numbers can be compared


@runtime_checkable
class Metric(Protocol):
    """Scores predictions against references (one list of acceptable references each).

    Ranking metrics (recall@k, MRR, nDCG) implement `compute_ranking(ranked, relevant)`
    instead: `ranked` holds each query's ranked ids, `relevant` each query's relevant ids.
    """

    name: str

    def compute(self, predictions: list[str], references: list[list[str]]) -> MetricResult: ...


# (prefix, text) pairs -> the mean log p(text | prefix) of each under the served model.
ScoreTexts = Callable[[Sequence[tuple[str, str]]], list[float]]


@dataclass
class RAGContext:
    """What a retriever or reranker factory may use. Fields are None when unavailable.

    `score_texts(pairs)` scores many (prefix, text) pairs under the served model in one
    engine round trip (the engine batches them), for likelihood-based rerankers; call it
    from `rerank` (a worker thread), never from an event loop. `score_text(prefix, text)`
    is the one-pair form, kept for existing plugins: scoring candidates one at a time with
    it costs one round trip each, so new rerankers should use `score_texts`.
    """

    store: Any = None  # atlas_server.rag.store.VectorStore
    embedder: Any = None  # atlas_server.rag.embedding.Embedder
    # mean log p(text | prefix) under the served model (one pair; see score_texts)
    score_text: Callable[[str, str], float] | None = None
    retrievers: dict[str, Retriever] = field(default_factory=dict)  # for fusion retrievers
    options: dict[str, Any] = field(default_factory=dict)  # per-plugin options from config
    score_texts: ScoreTexts | None = None  # many pairs, one engine round trip

    def __post_init__(self) -> None:
        if self.score_text is None and self.score_texts is not None:
            score_texts = self.score_texts
            self.score_text = lambda prefix, text: score_texts([(prefix, text)])[0]
