"""Built-in rerankers: MMR, query likelihood under the served model, and a cross-encoder.

- `mmr`: maximal marginal relevance over the embedder's vectors: repeatedly pick the
  candidate maximising lambda * sim(query, c) - (1 - lambda) * max sim(c, picked); lambda
  from options (default 0.7). It trades a little relevance for less redundancy; a chunk's
  score is that objective's value when it was picked.
- `query-likelihood`: scores each candidate by the mean log p(query | passage) under the
  model the server is serving (Atlas's own model judges which passage best "explains" the
  question), all of a query's candidates in one batched engine call
  (`ctx.score_texts`), so it works inside `atlas serve` only.
- `cross-encoder`: any sentence-transformers CrossEncoder from a local folder
  (`options.model_path`); nothing is downloaded.
What it does not do: retrieval.
"""

from __future__ import annotations

import numpy as np

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.errors import InvalidRAGRequest
from atlas_server.rag.types import RAGContext, RetrievedChunk


class MMRReranker:
    def __init__(self, ctx: RAGContext) -> None:
        self.embedder = ctx.embedder
        self.lam = float(ctx.options.get("lambda", 0.7))

    def rerank(self, query, candidates, top_k) -> list[RetrievedChunk]:
        if not candidates:
            return []
        q = self.embedder.encode([query])[0]  # [D]
        # Stored vectors come with the candidates; embed only those that lack one.
        missing = [i for i, c in enumerate(candidates) if c.vector is None]
        fresh = self.embedder.encode([candidates[i].chunk.text for i in missing]) if missing else []
        vectors = [c.vector for c in candidates]
        for i, v in zip(missing, fresh, strict=True):
            vectors[i] = v
        docs = np.asarray(vectors, dtype=np.float32)  # [N, D], normalised: dot = cosine
        relevance = docs @ q  # [N]
        similarity = docs @ docs.T  # [N, N]
        picked: list[int] = []
        picked_scores: list[float] = []
        remaining = list(range(len(candidates)))
        while remaining and len(picked) < top_k:
            redundancy = (
                similarity[remaining][:, picked].max(axis=1) if picked else np.zeros(len(remaining))
            )
            scores = self.lam * relevance[remaining] - (1 - self.lam) * redundancy
            at = int(np.argmax(scores))
            picked.append(remaining.pop(at))
            picked_scores.append(float(scores[at]))
        # Each chunk's score is the MMR value it was picked with, so scores fall with rank
        # (redundancy only grows as more are picked), as every ranked list's do.
        return [
            RetrievedChunk(candidates[i].chunk, score, "mmr", candidates[i].vector)
            for i, score in zip(picked, picked_scores, strict=True)
        ]


class QueryLikelihoodReranker:
    def __init__(self, ctx: RAGContext) -> None:
        if ctx.score_texts is None:
            raise RuntimeError(
                "query-likelihood reranking needs a served model (use it inside `atlas serve`)"
            )
        self.score_texts = ctx.score_texts

    def rerank(self, query, candidates, top_k) -> list[RetrievedChunk]:
        # All candidates in one call: the engine scores them together, one round trip.
        pairs = [(f"Passage: {c.chunk.text}\nQuestion:", f" {query}") for c in candidates]
        scored = list(zip(self.score_texts(pairs), candidates, strict=True))
        scored.sort(key=lambda sc: (-sc[0], sc[1].chunk.id))
        return [RetrievedChunk(c.chunk, s, "query-likelihood") for s, c in scored[:top_k]]


class CrossEncoderReranker:
    def __init__(self, ctx: RAGContext) -> None:
        path = ctx.options.get("model_path")
        if not path:
            # The client asked for a reranker this server offers but was not given a model
            # for: a 400 naming it (a 502 blaming the plugin, with a traceback, before).
            raise InvalidRAGRequest(
                "the cross-encoder reranker is not configured on this server (it needs "
                "[rag.plugin_options.cross-encoder] model_path, a local CrossEncoder folder); "
                "choose another reranker",
                "reranker",
            )
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(path), device="cpu")

    def rerank(self, query, candidates, top_k) -> list[RetrievedChunk]:
        if not candidates:
            return []
        scores = self.model.predict(
            [(query, c.chunk.text) for c in candidates], show_progress_bar=False
        )
        order = sorted(
            range(len(candidates)), key=lambda i: (-float(scores[i]), candidates[i].chunk.id)
        )
        return [
            RetrievedChunk(candidates[i].chunk, float(scores[i]), "cross-encoder")
            for i in order[:top_k]
        ]


# The [rag.plugin_options.NAME] keys each factory reads (`atlas serve` refuses others).
MMRReranker.options = ("lambda",)
QueryLikelihoodReranker.options = ()
CrossEncoderReranker.options = ("model_path",)


@hookimpl
def atlas_register_rerankers(register) -> None:
    register("mmr", MMRReranker)
    register("query-likelihood", QueryLikelihoodReranker)
    register("cross-encoder", CrossEncoderReranker)
