"""The vector store: Qdrant through qdrant-client, embedded or remote, unchanged either way.

What it does: opens Qdrant in local mode on a data directory (the default: one process
per directory, which Qdrant enforces with a lock) or a Qdrant server by URL (the
scale-out path), creates collections with a dense vector (cosine) and a sparse `bm25`
vector whose IDF Qdrant computes (`Modifier.IDF`), upserts chunks by their content-derived
ids, and searches either vector with optional payload filters.

Sparse BM25 vectors: the document side carries the BM25 term-frequency part,
tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)), with k1 = 1.2, b = 0.75 and
avg_len fixed at the chunker's typical chunk length (documents are chunked to similar
sizes, so a fixed average costs little); the query side carries 1 per term and Qdrant
multiplies by IDF. Terms are lower-cased word tokens hashed to 31-bit ids.
What it does not do: chunking or embedding.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from .types import Chunk

DENSE, SPARSE = "dense", "bm25"
K1, B, AVG_LEN = 1.2, 0.75, 120.0
_WORD = re.compile(r"\w+", re.UNICODE)


class StoreError(RuntimeError):
    """A vector-store problem the user can act on (lock held, unknown collection, ...)."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "atlas" / "qdrant"


def terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def term_id(term: str) -> int:
    return (
        int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")
        & 0x7FFFFFFF
    )


def bm25_document_vector(text: str) -> models.SparseVector:
    words = terms(text)
    counts = Counter(term_id(w) for w in words)
    norm = K1 * (1 - B + B * len(words) / AVG_LEN)
    indices = sorted(counts)
    return models.SparseVector(
        indices=indices, values=[counts[i] * (K1 + 1) / (counts[i] + norm) for i in indices]
    )


def bm25_query_vector(text: str) -> models.SparseVector:
    indices = sorted({term_id(w) for w in terms(text)})
    return models.SparseVector(indices=indices, values=[1.0] * len(indices))


def _filter(filters: dict[str, Any] | None) -> models.Filter | None:
    if not filters:
        return None
    conditions = []
    for key, value in filters.items():
        if isinstance(value, list):
            conditions.append(models.FieldCondition(key=key, match=models.MatchAny(any=value)))
        else:
            conditions.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    return models.Filter(must=conditions)


def chunk_from_payload(point_id: Any, payload: dict[str, Any]) -> Chunk:
    return Chunk(
        str(point_id),
        payload["text"],
        payload["source"],
        payload.get("heading"),
        int(payload["start"]),
        int(payload["end"]),
        payload.get("metadata") or {},
    )


class VectorStore:
    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.location = url or str(Path(data_dir) if data_dir else default_data_dir())
        try:
            if url:
                self.client = QdrantClient(url=url, api_key=api_key, timeout=30)
            else:
                Path(self.location).mkdir(parents=True, exist_ok=True)
                self.client = QdrantClient(path=self.location)
        except RuntimeError as e:
            if "already accessed" in str(e):
                raise StoreError(
                    f"the data dir {self.location} is in use by another process (a running `atlas serve`?): "
                    "embedded Qdrant allows one process per data directory. Ingest through "
                    "POST /v1/collections/NAME/documents on that server, stop it, or use a Qdrant server "
                    "(--qdrant-url)"
                ) from None
            raise

    def close(self) -> None:
        self.client.close()

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def exists(self, name: str) -> bool:
        return self.client.collection_exists(name)

    def ensure_collection(self, name: str, dim: int) -> None:
        if self.exists(name):
            return
        self.client.create_collection(
            name,
            vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )

    def delete_collection(self, name: str) -> bool:
        return bool(self.client.delete_collection(name))

    def count(self, name: str) -> int:
        return self.client.count(name, exact=True).count

    def upsert(self, name: str, chunks: list[Chunk], vectors) -> None:
        points = [
            models.PointStruct(
                id=c.id,
                vector={DENSE: v.tolist(), SPARSE: bm25_document_vector(c.text)},
                payload={
                    "text": c.text,
                    "source": c.source,
                    "heading": c.heading,
                    "start": c.start,
                    "end": c.end,
                    "metadata": c.metadata,
                },
            )
            for c, v in zip(chunks, vectors, strict=True)
        ]
        self.client.upsert(name, points=points, wait=True)

    def _require(self, name: str) -> None:
        if not self.exists(name):
            raise StoreError(
                f"collection {name!r} does not exist; ingest documents into it first "
                f"(collections: {', '.join(self.collections()) or 'none'})"
            )

    def search_dense(
        self, name: str, vector, top_k: int, filters=None
    ) -> list[tuple[Chunk, float, Any]]:
        """(chunk, score, stored dense vector) best first."""
        self._require(name)
        return self._query(name, list(map(float, vector)), DENSE, top_k, filters)

    def search_bm25(
        self, name: str, query: str, top_k: int, filters=None
    ) -> list[tuple[Chunk, float, Any]]:
        """(chunk, score, stored dense vector) best first."""
        self._require(name)
        vector = bm25_query_vector(query)
        if not vector.indices:
            return []
        return self._query(name, vector, SPARSE, top_k, filters)

    def _query(self, name: str, query, using: str, top_k: int, filters):
        """Points nearest `query` in the `using` vector space, with their dense vectors."""
        hits = self.client.query_points(
            name,
            query=query,
            using=using,
            limit=top_k,
            query_filter=_filter(filters),
            with_payload=True,
            with_vectors=[DENSE],
        ).points
        return [
            (chunk_from_payload(h.id, h.payload), float(h.score), h.vector[DENSE]) for h in hits
        ]

    def vectors(self, name: str, ids: list[str]):
        points = self.client.retrieve(name, ids=ids, with_vectors=[DENSE])
        return {str(p.id): p.vector[DENSE] for p in points}
