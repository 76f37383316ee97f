"""Built-in retrievers: dense (Qdrant cosine), BM25 (Qdrant sparse + IDF), and hybrid fusion.

Fusion, over `candidates` results from each side (default 4 * top_k):
- `hybrid` (the default): score-normalised fusion. Each retriever's scores are min-max
  normalised to [0, 1] over its own candidate list and summed with per-retriever weights.
- `hybrid-rrf`: reciprocal rank fusion, score = sum_r w_r / (k + rank_r) over the
  retrievers that returned the chunk, ranks 1-based, k = 60 (Cormack et al., 2009).
Default weights dense 1.0, bm25 0.25, chosen on the dev half of 310 labelled Python
documentation questions against all 4,106 documentation sections
(`python bench/bench_retrieval.py`; docs/rag.md has the tables): score fusion at BM25
weight 0.25 ranked best on dev (nDCG@10 0.576, against 0.574 at 0.5, 0.555 for dense
alone and 0.554 for the best RRF), and also on a smaller corpus at fp32; RRF and equal
weights ranked below dense alone there.
What it does not do: reranking (see rerankers.py).
"""

from __future__ import annotations

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.types import RAGContext, RetrievedChunk

RRF_K = 60
DEFAULT_WEIGHTS = {"dense": 1.0, "bm25": 0.25}


class DenseRetriever:
    def __init__(self, ctx: RAGContext) -> None:
        self.store, self.embedder = ctx.store, ctx.embedder

    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        vector = self.embedder.encode([query])[0]
        return [
            RetrievedChunk(c, s, "dense", v)
            for c, s, v in self.store.search_dense(collection, vector, top_k, filters)
        ]


class BM25Retriever:
    def __init__(self, ctx: RAGContext) -> None:
        self.store = ctx.store

    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        return [
            RetrievedChunk(c, s, "bm25", v)
            for c, s, v in self.store.search_bm25(collection, query, top_k, filters)
        ]


class HybridRetriever:
    def __init__(self, ctx: RAGContext, method: str) -> None:
        opts = ctx.options
        self.weights = dict(opts.get("weights") or DEFAULT_WEIGHTS)
        self.k = float(opts.get("rrf_k", RRF_K))
        self.candidates = opts.get("candidates")
        self.method = method
        self.parts = {name: ctx.retrievers[name] for name in self.weights}

    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        n = int(self.candidates or 4 * top_k)
        fused: dict[str, float] = {}
        chunks, vectors = {}, {}
        for name, retriever in self.parts.items():
            results = retriever.retrieve(collection, query, n, filters)
            if self.method == "rrf":
                contributions = [1.0 / (self.k + rank) for rank in range(1, len(results) + 1)]
            else:
                scores = [r.score for r in results]
                lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
                contributions = [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores]
            for r, value in zip(results, contributions, strict=True):
                fused[r.chunk.id] = fused.get(r.chunk.id, 0.0) + self.weights[name] * value
                chunks[r.chunk.id] = r.chunk
                vectors[r.chunk.id] = r.vector
        # Ties (same fused score) break by chunk id, so results are deterministic.
        order = sorted(fused, key=lambda cid: (-fused[cid], cid))[:top_k]
        label = "hybrid-rrf" if self.method == "rrf" else "hybrid"
        return [RetrievedChunk(chunks[cid], fused[cid], label, vectors[cid]) for cid in order]


def hybrid(ctx: RAGContext) -> HybridRetriever:
    return HybridRetriever(ctx, "score")


def hybrid_rrf(ctx: RAGContext) -> HybridRetriever:
    return HybridRetriever(ctx, "rrf")


# The [rag.plugin_options.NAME] keys each factory reads (`atlas serve` refuses others).
DenseRetriever.options = BM25Retriever.options = ()
hybrid.options = hybrid_rrf.options = ("weights", "rrf_k", "candidates")


@hookimpl
def atlas_register_retrievers(register) -> None:
    register("dense", DenseRetriever)
    register("bm25", BM25Retriever)
    register("hybrid", hybrid)
    register("hybrid-rrf", hybrid_rrf)
