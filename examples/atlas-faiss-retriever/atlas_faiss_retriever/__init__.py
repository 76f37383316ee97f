"""A FAISS retriever for Atlas, registered as "faiss".

It reads a collection's dense vectors from Atlas's vector store once, builds an exact
inner-product index (`IndexFlatIP`; the vectors are normalised, so scores are cosine
similarities), and rebuilds it when the collection's size changes. It shows everything a
retriever plugin needs: a factory taking the `RAGContext`, and `retrieve()` returning
`RetrievedChunk`s best first.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.store import chunk_from_payload
from atlas_server.rag.types import RAGContext, RetrievedChunk

__version__ = "0.1.0"


class FaissRetriever:
    def __init__(self, ctx: RAGContext) -> None:
        self.store, self.embedder = ctx.store, ctx.embedder
        self._indexes: dict[str, tuple[int, faiss.Index, list]] = {}
        self._lock = threading.Lock()

    def _index(self, collection: str):
        size = self.store.count(collection)
        with self._lock:
            cached = self._indexes.get(collection)
            if cached is None or cached[0] != size:
                points, chunks, vectors, offset = [], [], [], None
                while True:
                    batch, offset = self.store.client.scroll(
                        collection,
                        limit=1024,
                        offset=offset,
                        with_payload=True,
                        with_vectors=["dense"],
                    )
                    points += batch
                    if offset is None:
                        break
                for p in points:
                    chunks.append(chunk_from_payload(p.id, p.payload))
                    vectors.append(p.vector["dense"])
                matrix = np.asarray(vectors, dtype=np.float32)  # [N, D]
                index = faiss.IndexFlatIP(matrix.shape[1])
                index.add(matrix)
                cached = self._indexes[collection] = (size, index, chunks)
            return cached

    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        if filters:
            raise ValueError("the faiss example retriever does not support filters")
        _, index, chunks = self._index(collection)
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
