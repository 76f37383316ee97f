"""The `embedded` back end (the default): Qdrant Edge, Qdrant's engine inside this process.

What it does: keeps each collection as one Qdrant Edge shard in `<data_dir>/collections/
<name>/` (segments + a write-ahead log: every upsert is durable when it returns, and a
killed process loses nothing it was told was stored), with a dense cosine vector indexed
by HNSW and the same sparse `bm25` vector with IDF as the `qdrant` back end, so both rank
alike. Below Qdrant's full-scan threshold (~10 MB of vectors per segment, ~6,500 MiniLM
chunks) a segment is searched exactly; above it the optimizer builds HNSW (m 16, ef 100),
run in-process after an upsert leaves enough unindexed points (`optimize_every`, default
10,000; fewer are searched exactly, which is fast). One process per data directory, enforced with a lock
file, as with any embedded database.
What it does not do: serve several processes (use a Qdrant server, the `qdrant` back end).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import qdrant_edge as qe

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
    bool_copies,
    check_filters,
    check_name,
    chunk_from_payload,
    default_data_dir,
    json_path,
    payload_of,
)
from ..types import Chunk
from .folder import FolderLock, remove_tree, sweep_trash

INDEXED_FIELDS = ("source", "heading")
BOOLS = "_bools"  # 0/1 copies of boolean metadata, for filters (see edge_filter)


def edge_filter(filters: Filters | None) -> qe.Filter | None:
    conditions = []
    for path, values in check_filters(filters):
        key = json_path(path)
        if isinstance(values[0], bool):
            # qdrant-edge 0.9 turns a Python bool in MatchValue into an integer, which no
            # stored boolean equals; booleans are matched on their 0/1 copies instead
            # (path[0] is "metadata": chunk fields hold no booleans, check_filters says).
            key, values = json_path((BOOLS, *path[1:])), [int(v) for v in values]
        match = qe.MatchValue(values[0]) if len(values) == 1 else qe.MatchAny(values)
        conditions.append(qe.FieldCondition(key=key, match=match))
    return qe.Filter(must=conditions) if conditions else None


def edge_payload(chunk: Chunk) -> dict[str, Any]:
    bools = bool_copies(chunk.metadata)
    return {**payload_of(chunk), "chunk_id": chunk.id, BOOLS: bools}


def point_id(chunk_id: str) -> str:
    try:
        return str(uuid.UUID(chunk_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, chunk_id))


class EdgeStore(VectorStore):
    name = "embedded"

    def __init__(self, settings: StoreSettings) -> None:
        self.root = settings.data_dir or default_data_dir(self.name)
        self.location = str(self.root)
        opts = settings.options
        self.hnsw_m = int(opts.get("hnsw_m", 16))
        self.ef_construct = int(opts.get("ef_construct", 100))
        # Search width: Qdrant's default (ef_construct, 100) kept recall@10 at 0.98-0.99 at
        # 100,000 chunks but 0.78-0.92 at 1M; 512 gave 0.996 / 0.989 for 2.3 / 4.2 ms a
        # search on 2 cores (bench/bench_rag.py --ef-sweep, docs/benchmarks.md).
        self.hnsw_ef = opts.get("hnsw_ef", 512)
        self.optimize_every = int(opts.get("optimize_every", 10_000))
        # One query runs fastest on one thread here (waking a pool costs more than the
        # search; bench/bench_rag.py); concurrent requests still search in parallel.
        self.search_threads = int(opts.get("search_threads", 1))
        # Qdrant's thresholds, in KB of vectors: a segment above `indexing_threshold_kb`
        # gets an HNSW index; a search over fewer than `full_scan_threshold_kb` is exact.
        self.indexing_threshold_kb = opts.get("indexing_threshold_kb")
        self.full_scan_threshold_kb = int(opts.get("full_scan_threshold_kb", 10_000))
        # Every segment is searched on its own: as many as CPUs (Qdrant's rule; Qdrant Edge
        # counts the host's CPUs, not this process's).
        self.segments = int(opts.get("segments", len(os.sched_getaffinity(0))))
        # The lock also refuses a folder another back end's data is in (folder.claim_folder).
        self._folder_lock = FolderLock(self.root, self.name)
        (self.root / "collections").mkdir(exist_ok=True)
        sweep_trash(self.root / "collections")  # deletes a crash interrupted
        self._shards: dict[str, qe.EdgeShard] = {}
        self._unindexed: dict[str, int] = {}
        self._lock = threading.RLock()  # opening, creating, deleting and optimising shards
        self._closed = False

    # --- collections ------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.root / "collections" / check_name(name)

    def collections(self) -> list[str]:
        folder = self.root / "collections"
        return sorted(
            p.name
            for p in folder.iterdir()
            if not p.name.startswith(".") and (p / "edge_config.json").is_file()
        )

    def exists(self, name: str) -> bool:
        try:
            return (self._path(name) / "edge_config.json").is_file()
        except StoreError:
            return False

    def _shard(self, name: str) -> qe.EdgeShard:
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        with self._lock:
            if self._closed:
                raise StoreError("the vector store is closed")
            if name not in self._shards:
                self._require(name)
                runtime = self._config(self._dim(name), search_only=True)
                self._shards[name] = qe.EdgeShard.load(str(self._path(name)), runtime)
            return self._shards[name]

    def _dim(self, name: str) -> int:
        config = json.loads((self._path(name) / "edge_config.json").read_text())
        return int(config["vectors"][DENSE]["size"])

    def _config(self, dim: int, search_only: bool = False) -> qe.EdgeConfig:
        """A new shard's configuration; `search_only`: what reopening one may override."""
        common = {
            "vectors": {DENSE: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
            "sparse_vectors": {SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            "max_search_threads": self.search_threads,
        }
        if search_only:
            return qe.EdgeConfig(**common)
        threshold = self.indexing_threshold_kb
        return qe.EdgeConfig(
            **common,
            hnsw_config=qe.HnswIndexConfig(
                m=self.hnsw_m,
                ef_construct=self.ef_construct,
                full_scan_threshold=self.full_scan_threshold_kb,
            ),
            optimizers=qe.EdgeOptimizersConfig(
                indexing_threshold=threshold and int(threshold),
                default_segment_number=self.segments,
            ),
        )

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            if self.exists(name):
                if self._dim(name) != dim:
                    raise StoreError(
                        f"collection {name!r} holds {self._dim(name)}-d vectors, not {dim}-d"
                    )
                return
            path = self._path(name)
            if path.exists():  # a creation that died before writing its config
                shutil.rmtree(path)
            shard = qe.EdgeShard.create(str(path), self._config(dim))
            # Indexed payload fields let Qdrant's planner count a filter's matches and scan
            # a small filtered set exactly instead of walking the graph past most of it.
            for field in INDEXED_FIELDS:
                shard.update(
                    qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword)
                )
            self._shards[name] = shard

    def delete_collection(self, name: str) -> bool:
        with self._lock:
            if not self.exists(name):
                return False
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            remove_tree(self._path(name))
            return True

    def count(self, name: str) -> int:
        return self._shard(name).count(qe.CountRequest(exact=True))

    # --- writes -------------------------------------------------------------------------------
    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        shard = self._shard(name)
        matrix = as_matrix(vectors, self._dim(name))  # [N, D]
        points = []
        for c, v in zip(chunks, matrix, strict=True):
            indices, values = bm25_document_terms(c.text)
            points.append(
                qe.Point(
                    point_id(c.id),
                    {DENSE: v.tolist(), SPARSE: qe.SparseVector(indices, values)},
                    edge_payload(c),
                )
            )
        if not points:
            return
        shard.update(qe.UpdateOperation.upsert_points(points))
        self._unindexed[name] = self._unindexed.get(name, 0) + len(points)
        if self._unindexed[name] >= self.optimize_every:
            self.optimize(name)

    def optimize(self, name: str) -> None:
        """Merge segments and build their HNSW indexes now (blocks; queries keep working)."""
        with self._lock:
            self._shard(name).optimize()
            self._unindexed[name] = 0

    def delete(self, name: str, ids: list[str]) -> int:
        present = self.existing_ids(name, ids)
        if present:
            self._shard(name).update(
                qe.UpdateOperation.delete_points([point_id(i) for i in present])
            )
        return len(present)

    def delete_sources(self, name: str, sources: list[str]) -> int:
        if not sources:
            return 0
        shard, where = self._shard(name), edge_filter({"source": sources})
        there = shard.count(qe.CountRequest(exact=True, filter=where))
        if there:
            shard.update(qe.UpdateOperation.delete_points_by_filter(where))
        return there

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        records = self._shard(name).retrieve(
            [point_id(i) for i in ids], with_payload=["chunk_id"], with_vector=False
        )
        return {self._chunk_id(r.id, r.payload) for r in records}

    # --- reads --------------------------------------------------------------------------------
    @staticmethod
    def _chunk_id(pid: Any, payload: dict | None) -> str:
        return str((payload or {}).get("chunk_id") or pid)

    def _hits(self, points) -> list[Hit]:
        return [
            (
                chunk_from_payload(self._chunk_id(p.id, p.payload), p.payload),
                float(p.score),
                p.vector[DENSE],
            )
            for p in points
        ]

    def _search(self, name: str, query, using: str, top_k: int, filters) -> list[Hit]:
        params = qe.SearchParams(hnsw_ef=int(self.hnsw_ef)) if self.hnsw_ef else None
        request = qe.QueryRequest(
            limit=top_k,
            query=qe.Query.Nearest(query, using=using),
            filter=edge_filter(filters),
            with_payload=True,
            with_vector=[DENSE],
            params=params,
        )
        return self._hits(self._shard(name).query(request))

    def search_dense(self, name, vector, top_k, filters=None) -> list[Hit]:
        query = as_matrix(vector)[0].tolist()
        return self._search(name, query, DENSE, top_k, filters)

    def search_bm25(self, name, query, top_k, filters=None) -> list[Hit]:
        self._require(name)
        indices, values = bm25_query_terms(query)
        if not indices:
            return []
        return self._search(name, qe.SparseVector(indices, values), SPARSE, top_k, filters)

    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        records = self._shard(name).retrieve(
            [point_id(i) for i in ids], with_payload=["chunk_id"], with_vector=[DENSE]
        )
        return {self._chunk_id(r.id, r.payload): r.vector[DENSE] for r in records}

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        shard, offset = self._shard(name), None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=batch_size, with_payload=True, with_vector=[DENSE]
                )
            )
            for r in records:
                yield (
                    chunk_from_payload(self._chunk_id(r.id, r.payload), r.payload),
                    r.vector[DENSE],
                )
            if offset is None:
                return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
            self._folder_lock.release()
