"""The small public types that plugins build on (plugins import only these and hookspecs).

What it does: defines a `Chunk` of a source document, a `RetrievedChunk` with its score,
the `Retriever`, `Reranker` and `Metric` protocols, `MetricResult`, and the `RAGContext`
handed to plugin factories (the vector store, the embedder, and — for rerankers that use
the served model — scoring functions). What it does not do: any retrieval.
"""

from __future__ import annotations

import threading
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


class OnFirstUse:
    """Stands in for an object that is made on first use: the first attribute read on it
    (a method call: `ctx.store.count(name)`) calls `make()`, and every read after goes to
    what it made. Thread-safe: threads racing for the first use make it once, and one
    that fails is made again on the next use (the failure raises to that caller).
    What it does not do: pass `isinstance` checks, or stand in for operators (`len`, `==`)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._first_use_make = make
        self._first_use_made: Any = None
        self._first_use_lock = threading.Lock()

    def _first_use(self) -> Any:
        made = self._first_use_made
        if made is None:
            with self._first_use_lock:
                if self._first_use_made is None:
                    self._first_use_made = self._first_use_make()
                made = self._first_use_made
        return made

    def __getattr__(self, attr: str) -> Any:  # only what this class does not define
        if attr.startswith("_first_use"):  # not set yet (a copy being made): no recursion
            raise AttributeError(attr)
        return getattr(self._first_use(), attr)

    def __repr__(self) -> str:
        made = self._first_use_made
        return repr(made) if made is not None else f"<{self._first_use_make!r}, on first use>"


# (prefix, text) pairs -> the mean log p(text | prefix) of each under the served model.
ScoreTexts = Callable[[Sequence[tuple[str, str]]], list[float]]


@dataclass
class RAGContext:
    """What a retriever or reranker factory may use. Fields are None when unavailable.

    In `atlas serve`, `store` and `embedder` are `OnFirstUse` stand-ins: the store opens,
    and the embedder loads, when a plugin first uses one (`ctx.store.search_dense(...)`),
    so a retriever that never does is served while the store is down and loads no
    embedder. One that cannot open raises, on that use, the service's 503 error, which
    passes through the plugin's call as the store's or the embedder's failure, not the
    plugin's.

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
