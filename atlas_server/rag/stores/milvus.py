"""The `milvus` back end: Milvus through pymilvus, a cluster by URI or Milvus Lite in a file.

What it does: one Milvus collection per Atlas collection, with the chunk id as primary
key (so an upsert of the same id replaces it), a dense FLOAT_VECTOR searched by cosine
(index `AUTOINDEX` unless `options.index_type` says otherwise: HNSW-class on a cluster),
and Milvus's own full-text search for BM25: the text field is analysed and a BM25 function
fills a sparse vector Milvus indexes and scores (`SPARSE_INVERTED_INDEX`, metric BM25).
Filters become Milvus boolean expressions. `url` (`[rag] store_url`) names a Milvus
server or cluster (`http://milvus:19530`; `ATLAS_VECTOR_STORE_API_KEY` is its token);
without one, Milvus Lite (the `milvus-lite` package) runs the same engine locally on
`<data_dir>/milvus.db`. Collections are created with Strong consistency, so a search sees
every upsert that returned before it.
What it does not do: run a Milvus cluster (deploy/k8s/README.md names the Helm chart).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..store import (
    Filters,
    Hit,
    StoreError,
    StoreSettings,
    VectorStore,
    as_matrix,
    check_filters,
    check_name,
    default_data_dir,
    terms,
)
from ..types import Chunk

FIELDS = ["id", "text", "source", "heading", "start", "end", "metadata", "dense"]
MAX_TEXT = 65_535  # Milvus VARCHAR limit, bytes


def milvus_filter(filters: Filters | None) -> str:
    clauses = []
    for path, values in check_filters(filters):
        field = path[0] if len(path) == 1 else f"metadata[{json.dumps(path[1])}]"
        # `in [...]` takes only plain fields (Milvus Lite), so JSON keys get an or-chain;
        # json.dumps writes the literals Milvus reads: true/false, numbers, "strings".
        either = " or ".join(f"{field} == {json.dumps(v)}" for v in values)
        clauses.append(f"({either})")
    return " and ".join(clauses)


def _chunk(entity: dict[str, Any]) -> Chunk:
    return Chunk(
        str(entity["id"]),
        entity["text"],
        entity["source"],
        entity.get("heading"),
        int(entity["start"]),
        int(entity["end"]),
        entity.get("metadata") or {},
    )


class MilvusStore(VectorStore):
    name = "milvus"

    def __init__(self, settings: StoreSettings) -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StoreError(
                "the milvus store needs pymilvus (pip install 'atlas-llm[milvus]')"
            ) from None
        if settings.url:
            uri = settings.url
        else:
            folder = settings.data_dir or default_data_dir(self.name)
            folder.mkdir(parents=True, exist_ok=True)
            uri = str(folder / "milvus.db")
        self.location = uri
        self.index_type = str(settings.options.get("index_type", "AUTOINDEX"))
        self.index_params = dict(settings.options.get("index_params", {}))
        try:
            self.client = MilvusClient(uri=uri, token=settings.api_key or "")
        except Exception as e:
            raise StoreError(f"cannot open Milvus at {uri}: {type(e).__name__}: {e}") from None
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    def collections(self) -> list[str]:
        return sorted(self.client.list_collections())

    def exists(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    def _dim(self, name: str) -> int:
        for f in self.client.describe_collection(name)["fields"]:
            if f["name"] == "dense":
                return int(f["params"]["dim"])
        raise StoreError(f"collection {name!r} was not created by Atlas (no dense field)")

    def ensure_collection(self, name: str, dim: int) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        check_name(name)
        if self.exists(name):
            if self._dim(name) != dim:
                raise StoreError(
                    f"collection {name!r} holds {self._dim(name)}-d vectors, not {dim}-d"
                )
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("heading", DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
        schema.add_field("start", DataType.INT64)
        schema.add_field("end", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_function(
            Function(
                name="bm25",
                function_type=FunctionType.BM25,
                input_field_names=["text"],
                output_field_names=["sparse"],
            )
        )
        index = self.client.prepare_index_params()
        index.add_index(
            "dense", index_type=self.index_type, metric_type="COSINE", params=self.index_params
        )
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.client.create_collection(
            name, schema=schema, index_params=index, consistency_level="Strong"
        )

    def delete_collection(self, name: str) -> bool:
        if not self.exists(name):
            return False
        self.client.drop_collection(name)
        return True

    def count(self, name: str) -> int:
        self._require(name)
        rows = self.client.query(name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        self._require(name)
        matrix = as_matrix(vectors)  # [N, D]
        rows = []
        for c, v in zip(chunks, matrix, strict=True):
            if len(c.text.encode()) > MAX_TEXT:
                raise StoreError(
                    f"chunk {c.id} of {c.source} is over Milvus's {MAX_TEXT}-byte text limit"
                )
            rows.append(
                {
                    "id": c.id,
                    "dense": v.tolist(),
                    "text": c.text,
                    "source": c.source,
                    "heading": c.heading,
                    "start": c.start,
                    "end": c.end,
                    "metadata": c.metadata,
                }
            )
        # Milvus refuses two rows with one primary key in one request: the last one wins.
        unique = list({r["id"]: r for r in rows}.values())
        if unique:
            self.client.upsert(name, unique)

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        self._require(name)
        if not ids:
            return set()
        return {str(r["id"]) for r in self.client.get(name, ids=list(ids), output_fields=["id"])}

    def delete(self, name: str, ids: list[str]) -> int:
        present = self.existing_ids(name, ids)
        if present:
            self.client.delete(name, ids=sorted(present))
        return len(present)

    def _hits(self, results, bm25: bool = False) -> list[Hit]:
        # BM25 scores are never negative; Milvus Lite reports them negated (as distances).
        score = abs if bm25 else float
        return [
            (
                _chunk(h["entity"] | {"id": h["id"]}),
                float(score(h["distance"])),
                h["entity"]["dense"],
            )
            for h in results[0]
        ]

    def search_dense(self, name, vector, top_k, filters=None) -> list[Hit]:
        self._require(name)
        results = self.client.search(
            name,
            data=[as_matrix(vector)[0].tolist()],
            anns_field="dense",
            limit=top_k,
            filter=milvus_filter(filters),
            output_fields=FIELDS,
            search_params={"metric_type": "COSINE"},
        )
        return self._hits(results)

    def search_bm25(self, name, query, top_k, filters=None) -> list[Hit]:
        self._require(name)
        if not terms(query):
            return []
        results = self.client.search(
            name,
            data=[query],
            anns_field="sparse",
            limit=top_k,
            filter=milvus_filter(filters),
            output_fields=FIELDS,
            search_params={"metric_type": "BM25"},
        )
        return self._hits(results, bm25=True)

    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        self._require(name)
        if not ids:
            return {}
        rows = self.client.get(name, ids=list(ids), output_fields=["id", "dense"])
        return {str(r["id"]): r["dense"] for r in rows}

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        self._require(name)
        iterator = self.client.query_iterator(
            name, batch_size=batch_size, filter="", output_fields=FIELDS
        )
        try:
            while batch := iterator.next():
                for row in batch:
                    yield _chunk(row), row["dense"]
        finally:
            iterator.close()
