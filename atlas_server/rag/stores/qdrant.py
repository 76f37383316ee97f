"""The `qdrant` back end: a Qdrant server by URL (or qdrant-client's local mode in a folder).

What it does: creates collections with a dense vector (cosine, HNSW on a server) and a
sparse `bm25` vector whose IDF Qdrant computes (`Modifier.IDF`), upserts chunks by their
content-derived ids, searches either vector with payload filters. With a URL it talks to a
Qdrant server or cluster (the scale-out path; `ATLAS_VECTOR_STORE_API_KEY` is its key);
without one it runs qdrant-client's local mode in a folder, the embedded store of Atlas
before Qdrant Edge (exhaustive search in Python: fine at a few thousand chunks, 0.5 s a
query at 10,000; kept to open old folders and as the benchmark baseline).
What it does not do: start a server (see deploy/k8s/README.md for the Helm chart).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ..store import (
    DENSE,
    SPARSE,
    Filters,
    Hit,
    StoreError,
    StoreSettings,
    VectorStore,
    as_matrix,
    bm25_document_terms,
    bm25_query_terms,
    check_filters,
    check_name,
    chunk_from_payload,
    default_data_dir,
    json_path,
    payload_of,
)
from ..types import Chunk
from .folder import claim_folder, make_folder


def qdrant_filter(filters: Filters | None) -> models.Filter | None:
    conditions = []
    for path, values in check_filters(filters):
        key = json_path(path)
        match = (
            models.MatchValue(value=values[0]) if len(values) == 1 else models.MatchAny(any=values)
        )
        conditions.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=conditions) if conditions else None


def point_id(chunk_id: str) -> str:
    """Qdrant ids are UUIDs or integers; Atlas chunk ids are UUIDs already, others are mapped."""
    try:
        return str(uuid.UUID(chunk_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, chunk_id))


class _Reported:
    """The QdrantClient, with a server's failures (unreachable, an error answer) raised as
    StoreError, so that callers report the store failing (a 503), not a plugin or a bug."""

    def __init__(self, client: QdrantClient, location: str) -> None:
        self._client, self._location = client, location

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except (ResponseHandlingException, UnexpectedResponse) as e:
                raise StoreError(
                    f"the Qdrant server at {self._location} failed: {type(e).__name__}: {e}"
                ) from e

        return call


class QdrantStore(VectorStore):
    name = "qdrant"

    def __init__(self, settings: StoreSettings) -> None:
        self.location = settings.url or str(settings.data_dir or default_data_dir("qdrant"))
        timeout = int(settings.options.get("timeout", 30))
        try:
            if settings.url:
                client = QdrantClient(url=settings.url, api_key=settings.api_key, timeout=timeout)
            else:
                folder = Path(self.location)
                make_folder(folder)
                claim_folder(folder, self.name)  # not an embedded or faiss store's folder
                client = QdrantClient(path=self.location)
        except RuntimeError as e:
            if "already accessed" in str(e):
                raise StoreError(
                    f"the data dir {self.location} is in use by another process (a running `atlas serve`, or "
                    "`atlas rag ingest`?): "
                    "qdrant-client's local mode allows one process per data directory. Ingest through "
                    "POST /v1/collections/NAME/documents on that server, stop it, or use a Qdrant server "
                    "(--qdrant-url)"
                ) from None
            raise
        self.client = _Reported(client, self.location)
        self.remote = bool(settings.url)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def exists(self, name: str) -> bool:
        return self.client.collection_exists(name)

    def ensure_collection(self, name: str, dim: int) -> None:
        check_name(name)
        if self.exists(name):
            have = self.client.get_collection(name).config.params.vectors[DENSE].size
            if have != dim:
                raise StoreError(f"collection {name!r} holds {have}-d vectors, not {dim}-d")
            return
        self.client.create_collection(
            name,
            vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        if self.remote:  # a server plans filtered searches with these (local mode has none)
            for field in ("source", "heading"):
                self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)

    def delete_collection(self, name: str) -> bool:
        return self.exists(name) and bool(self.client.delete_collection(name))

    def count(self, name: str) -> int:
        self._require(name)
        return self.client.count(name, exact=True).count

    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        self._require(name)
        matrix = as_matrix(vectors)  # [N, D]
        points = []
        for c, v in zip(chunks, matrix, strict=True):
            indices, values = bm25_document_terms(c.text)
            points.append(
                models.PointStruct(
                    id=point_id(c.id),
                    vector={
                        DENSE: v.tolist(),
                        SPARSE: models.SparseVector(indices=indices, values=values),
                    },
                    payload={**payload_of(c), "chunk_id": c.id},
                )
            )
        if points:
            self.client.upsert(name, points=points, wait=True)

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        self._require(name)
        points = self.client.retrieve(
            name, ids=[point_id(i) for i in ids], with_payload=["chunk_id"]
        )
        return {self._chunk_id(p.id, p.payload) for p in points}

    def delete(self, name: str, ids: list[str]) -> int:
        present = self.existing_ids(name, ids)
        if present:
            self.client.delete(name, points_selector=[point_id(i) for i in present], wait=True)
        return len(present)

    def delete_sources(self, name: str, sources: list[str]) -> int:
        self._require(name)
        if not sources:
            return 0
        where = qdrant_filter({"source": sources})
        there = self.client.count(name, count_filter=where, exact=True).count
        if there:
            selector = models.FilterSelector(filter=where)
            self.client.delete(name, points_selector=selector, wait=True)
        return there

    @staticmethod
    def _chunk_id(pid: Any, payload: dict | None) -> str:
        return str((payload or {}).get("chunk_id") or pid)

    def search_dense(self, name, vector, top_k, filters=None) -> list[Hit]:
        self._require(name)
        query = as_matrix(vector)[0].tolist()
        return self._query(name, query, DENSE, top_k, filters)

    def search_bm25(self, name, query, top_k, filters=None) -> list[Hit]:
        self._require(name)
        indices, values = bm25_query_terms(query)
        if not indices:
            return []
        return self._query(
            name, models.SparseVector(indices=indices, values=values), SPARSE, top_k, filters
        )

    def _query(self, name: str, query, using: str, top_k: int, filters) -> list[Hit]:
        hits = self.client.query_points(
            name,
            query=query,
            using=using,
            limit=top_k,
            query_filter=qdrant_filter(filters),
            with_payload=True,
            with_vectors=[DENSE],
        ).points
        return [
            (
                chunk_from_payload(self._chunk_id(h.id, h.payload), h.payload),
                float(h.score),
                h.vector[DENSE],
            )
            for h in hits
        ]

    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        self._require(name)
        points = self.client.retrieve(
            name, ids=[point_id(i) for i in ids], with_payload=["chunk_id"], with_vectors=[DENSE]
        )
        return {self._chunk_id(p.id, p.payload): p.vector[DENSE] for p in points}

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        self._require(name)
        offset = None
        while True:
            points, offset = self.client.scroll(
                name, limit=batch_size, offset=offset, with_payload=True, with_vectors=[DENSE]
            )
            for p in points:
                yield (
                    chunk_from_payload(self._chunk_id(p.id, p.payload), p.payload),
                    p.vector[DENSE],
                )
            if offset is None:
                return
