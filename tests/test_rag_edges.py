"""RAG edges a mutation pass found unguarded: the chunk limit under a counter that is not
additive, 1-based citation numbers, and reciprocal rank fusion's documented formula.

References: the counters themselves (every chunk re-counted), the numbering of
`render_sources` ([1] is the first source), and docs/rag.md's "sum of w / (60 + rank),
ranks 1-based" for `hybrid-rrf` (min-max normalised weighted sum for `hybrid`).
"""

from __future__ import annotations

import pytest

from atlas_server.rag.chunking import ChunkSettings, chunk_text
from atlas_server.rag.grounding import extract_citations, render_sources
from atlas_server.rag.types import Chunk, RAGContext, RetrievedChunk
from plugins.retrievers import RRF_K, HybridRetriever

# --- H1: chunk_text re-counts packed chunks -----------------------------------------------
# Eight-character sentences: packed by summing their counts, four of them fill a chunk of
# 8, but joined (with the spaces between them) they count more than the sum.
TEXT = " ".join(f"Abc {w:>3}." for w in ["one", "two", "six", "ten", "red", "tan"] * 5)


def chars_over_4(s: str) -> int:
    """A character-based estimate (ceil(len / 4)): the spaces between sentences count."""
    return -(-len(s) // 4)


@pytest.mark.parametrize("overlap_share", [0, 0.5])
@pytest.mark.parametrize(
    ("counter", "max_tokens"),
    # Limits at which the sum of whole sentences' counts fits and the joined text does not.
    [("chars/4", 8), ("chars/4", 13), ("byte-level BPE", 16), ("byte-level BPE", 25)],
)
def test_chunks_respect_max_tokens_under_a_counter_that_is_not_additive(
    byte_tokenizer, counter, max_tokens, overlap_share
):
    count = chars_over_4 if counter == "chars/4" else lambda s: len(byte_tokenizer.encode(s))
    # The premise: summing sentence counts underestimates the joined text's count.
    assert count("Abc one. Abc two.") > 2 * count("Abc one.")
    overlap = int(max_tokens * overlap_share)
    settings = ChunkSettings(max_tokens=max_tokens, overlap_tokens=overlap)
    chunks = chunk_text(TEXT, "doc.md", count, settings)
    assert chunks
    for c in chunks:
        assert TEXT[c.start : c.end] == c.text
        assert count(c.text) <= max_tokens, (c.text, count(c.text))
    # Nothing is lost: every sentence is in some chunk, in order.
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(TEXT) if not ch.isspace())


# --- H3: extract_citations numbers sources from 1 -------------------------------------------
def _retrieved(i: int, score: float = 1.0, retriever: str = "stub") -> RetrievedChunk:
    chunk = Chunk(f"id-{i}", f"text {i}", f"src{i}.md", None, 0, 6)
    return RetrievedChunk(chunk, score, retriever)


@pytest.mark.parametrize(
    ("answer", "cited", "dropped"),
    [
        ("see [0] and [4]", [], 2),
        ("see [0]", [], 1),
        ("[1, 0] then [3][0]", [1, 3], 2),
        ("[3] and [1] and [3]", [3, 1], 0),
    ],
)
def test_citation_zero_cites_nothing_numbers_are_1_based(answer, cited, dropped):
    chunks = [_retrieved(i) for i in range(3)]
    assert render_sources(chunks).startswith("[1] ")  # what the model was shown
    sources, n_dropped = extract_citations(answer, chunks)
    assert [s["id"] for s in sources] == cited
    assert [s["chunk_id"] for s in sources] == [f"id-{n - 1}" for n in cited]
    assert n_dropped == dropped


# --- G1: HybridRetriever's fusions, as docs/rag.md gives them --------------------------------
class Stub:
    def __init__(self, name: str, ranking: list[tuple[int, float]]) -> None:
        self.name, self.ranking = name, ranking
        self.asked: list[int] = []

    def retrieve(self, collection, query, top_k, filters=None):
        self.asked.append(top_k)
        return [_retrieved(i, s, self.name) for i, s in self.ranking[:top_k]]


DENSE = [(0, 0.9), (1, 0.8), (2, 0.5), (3, 0.1)]
BM25 = [(2, 12.0), (4, 7.0), (0, 3.0)]


def _hybrid(method: str, weights: dict[str, float] | None = None) -> HybridRetriever:
    parts = {"dense": Stub("dense", DENSE), "bm25": Stub("bm25", BM25)}
    options = {"weights": weights} if weights else {}
    return HybridRetriever(RAGContext(retrievers=parts, options=options), method)


@pytest.mark.parametrize("weights", [None, {"dense": 1.0, "bm25": 1.0}, {"dense": 0.5, "bm25": 2}])
def test_rrf_scores_are_the_documented_sum_of_w_over_k_plus_1_based_rank(weights):
    w = weights or {"dense": 1.0, "bm25": 0.25}  # the documented defaults
    expected: dict[str, float] = {}
    for name, ranking in (("dense", DENSE), ("bm25", BM25)):
        for rank, (i, _) in enumerate(ranking, start=1):
            expected[f"id-{i}"] = expected.get(f"id-{i}", 0.0) + w[name] / (60 + rank)
    assert RRF_K == 60
    results = _hybrid("rrf", weights).retrieve("c", "q", top_k=5)
    assert {r.chunk.id: r.score for r in results} == pytest.approx(expected, rel=1e-12)
    assert [r.chunk.id for r in results] == sorted(expected, key=lambda c: (-expected[c], c))
    assert {r.retriever for r in results} == {"hybrid-rrf"}


def test_rrf_first_rank_of_one_retriever_scores_w_over_61():
    """One retriever alone: the top chunk's score is exactly w / 61, the second's w / 62."""
    h = HybridRetriever(
        RAGContext(retrievers={"dense": Stub("dense", DENSE)}, options={"weights": {"dense": 2}}),
        "rrf",
    )
    scores = [r.score for r in h.retrieve("c", "q", top_k=2)]
    assert scores == [2 / 61, 2 / 62]


def test_score_fusion_is_the_weighted_sum_of_min_max_normalised_scores():
    def normalised(ranking):
        lo, hi = min(s for _, s in ranking), max(s for _, s in ranking)
        return {f"id-{i}": (s - lo) / (hi - lo) for i, s in ranking}

    dense, bm25 = normalised(DENSE), normalised(BM25)
    expected = {c: dense.get(c, 0.0) + 0.25 * bm25.get(c, 0.0) for c in dense.keys() | bm25}
    h = _hybrid("score")
    results = h.retrieve("c", "q", top_k=5)
    assert {r.chunk.id: r.score for r in results} == pytest.approx(expected, rel=1e-12)
    assert h.parts["dense"].asked == [20]  # candidates default: 4 * top_k from each side
