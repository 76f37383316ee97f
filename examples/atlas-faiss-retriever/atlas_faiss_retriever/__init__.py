"""A FAISS retriever for Atlas, registered as "faiss": an example of a retriever plugin.

It reads a collection's chunks and dense vectors once through the public vector store
interface (`ctx.store.iter_chunks`, which every back end implements), builds an exact
inner-product index (`IndexFlatIP`; the vectors are normalised, so scores are cosine
similarities), and rebuilds it when the collection's size changes. It shows everything a
retriever plugin needs: a factory taking the `RAGContext` (with the `options` it reads
listed, here none, so a `[rag.plugin_options.faiss]` key is refused, not ignored), and
`retrieve()` returning `RetrievedChunk`s best first, refusing what it cannot do (filters)
as the client's error, a 400. One instance serves concurrent requests from many threads,
so the index cache is guarded by a lock.

It is a teaching example, not the way to run FAISS in production: Atlas's built-in
`faiss` vector store (`[rag] store = "faiss"`) keeps a persisted FAISS index (exact, then
IVF) with filters and BM25, and every retriever works on it unchanged.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.errors import InvalidRAGRequest
from atlas_server.rag.types import RAGContext, RetrievedChunk

__version__ = "0.2.0"


class FaissRetriever:
    options = ()  # the [rag.plugin_options.faiss] keys it reads: none, so any is refused

    def __init__(self, ctx: RAGContext) -> None:
        self.store, self.embedder = ctx.store, ctx.embedder
        self._indexes: dict[str, tuple[int, faiss.Index | None, list]] = {}
        self._lock = threading.Lock()  # requests call retrieve() on many threads at once

    def _index(self, collection: str):
        size = self.store.count(collection)
        with self._lock:
            cached = self._indexes.get(collection)
            if cached is None or cached[0] != size:
                chunks, vectors = [], []
                for chunk, vector in self.store.iter_chunks(collection):
                    chunks.append(chunk)
                    vectors.append(vector)
                index = None
                if chunks:
                    matrix = np.asarray(vectors, dtype=np.float32)  # [N, D]
                    index = faiss.IndexFlatIP(matrix.shape[1])
                    index.add(matrix)
                cached = self._indexes[collection] = (size, index, chunks)
            return cached

    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        if filters:  # the client asked what this retriever cannot do: its 400, not a 502
            raise InvalidRAGRequest(
                "the faiss example retriever does not support filters "
                '(the built-in `faiss` vector store does: [rag] store = "faiss")',
                "filters",
            )
        _, index, chunks = self._index(collection)
        if not chunks:  # an empty collection: nothing to search (FAISS needs a dimension)
            return []
        query_vector = self.embedder.encode([query])  # [1, D]
        scores, ids = index.search(query_vector, min(top_k, len(chunks)))
        return [
            RetrievedChunk(chunks[i], float(s), "faiss")
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0
        ]


@hookimpl
def atlas_register_retrievers(register) -> None:
    register("faiss", FaissRetriever)
