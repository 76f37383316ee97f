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

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from ..store import (
    Filters,
    Hit,
    StoreError,
    StoreSettings,
    VectorStore,
    as_matrix,
    bool_copies,
    check_filters,
    check_name,
    default_data_dir,
    terms,
)
from ..types import Chunk

FIELDS = ["id", "text", "source", "heading", "start", "end", "metadata", "dense"]
MAX_TEXT = 65_535  # Milvus VARCHAR limit, bytes


BOOLS = "__atlas_bools"  # in `metadata`: 0/1 copies of its booleans (see milvus_filter)


ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(text: str) -> str:
    """A string literal of Milvus's expression language: backslash, double quote, newline,
    return and tab escaped, every other character as it is (Milvus refuses JSON's \\uXXXX
    escapes, which json.dumps writes for any non-ASCII character)."""
    return '"' + "".join(ESCAPES.get(c, c) for c in text) + '"'


def literal(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else quote(value)


def milvus_filter(filters: Filters | None) -> str:
    clauses = []
    for path, values in check_filters(filters):
        keys = "".join(f"[{quote(k)}]" for k in path[1:])
        field = path[0] + keys
        # `in [...]` takes only plain fields (Milvus Lite), so JSON keys get an or-chain.
        either = " or ".join(f"{field} == {literal(v)}" for v in values)
        if path[0] == "metadata" and not isinstance(values[0], str):
            # Milvus equates JSON true with 1: rows carry 0/1 copies of their booleans
            # under BOOLS, so a boolean must have one and an integer must not. Rows
            # written before BOOLS existed have none and match as Milvus compares.
            copy = f"metadata[{quote(BOOLS)}]{keys}"
            if isinstance(values[0], bool):
                either += f") and (exists {copy} or not exists metadata[{quote(BOOLS)}]"
            else:
                either += f") and (not exists {copy}"
        clauses.append(f"({either})")
    return " and ".join(clauses)


def _chunk(entity: dict[str, Any]) -> Chunk:
    metadata = dict(entity.get("metadata") or {})
    metadata.pop(BOOLS, None)
    return Chunk(
        str(entity["id"]),
        entity["text"],
        entity["source"],
        entity.get("heading"),
        int(entity["start"]),
        int(entity["end"]),
        metadata,
    )


def _store_errors(method: Callable) -> Callable:
    """Milvus's own exceptions as StoreError, so callers report a store failure (503)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.errors():
            return method(self, *args, **kwargs)

    return wrapper


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
        # Collections this client has loaded: Milvus searches and reads only loaded
        # (in-memory) collections, and one written by another process starts released.
        self._loaded: set[str] = set()

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as e:
            message = getattr(e, "message", None) or str(e)
            raise StoreError(f"Milvus at {self.location} failed: {message}") from e

    def _use(self, name: str) -> None:
        """Refuse an unknown collection; load a known one the first time it is used."""
        self._require(name)
        if name not in self._loaded:
            self.client.load_collection(name)
            self._loaded.add(name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    @_store_errors
    def collections(self) -> list[str]:
        return sorted(self.client.list_collections())

    @_store_errors
    def exists(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    @_store_errors
    def _dim(self, name: str) -> int:
        for f in self.client.describe_collection(name)["fields"]:
            if f["name"] == "dense":
                return int(f["params"]["dim"])
        raise StoreError(f"collection {name!r} was not created by Atlas (no dense field)")

    @_store_errors
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
        self._loaded.add(name)  # create_collection with indexes loads it

    @_store_errors
    def delete_collection(self, name: str) -> bool:
        if not self.exists(name):
            return False
        self.client.drop_collection(name)
        self._loaded.discard(name)
        return True

    @_store_errors
    def count(self, name: str) -> int:
        self._require(name)
        rows = self.client.query(name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @_store_errors
    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        self._use(name)
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
                    "metadata": {**c.metadata, BOOLS: bool_copies(c.metadata)},
                }
            )
        # Milvus refuses two rows with one primary key in one request: the last one wins.
        unique = list({r["id"]: r for r in rows}.values())
        if unique:
            self.client.upsert(name, unique)

    @_store_errors
    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        self._use(name)
        if not ids:
            return set()
        return {str(r["id"]) for r in self.client.get(name, ids=list(ids), output_fields=["id"])}

    @_store_errors
    def delete(self, name: str, ids: list[str]) -> int:
        present = self.existing_ids(name, ids)
        if present:
            self.client.delete(name, ids=sorted(present))
        return len(present)

    @_store_errors
    def delete_sources(self, name: str, sources: list[str]) -> int:
        self._use(name)
        if not sources:
            return 0
        where = milvus_filter({"source": sources})
        rows = self.client.query(name, filter=where, output_fields=["count(*)"])
        there = int(rows[0]["count(*)"])
        if there:
            self.client.delete(name, filter=where)
        return there

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

    @_store_errors
    def search_dense(self, name, vector, top_k, filters=None) -> list[Hit]:
        self._use(name)
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

    @_store_errors
    def search_bm25(self, name, query, top_k, filters=None) -> list[Hit]:
        self._use(name)
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

    @_store_errors
    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        self._use(name)
        if not ids:
            return {}
        rows = self.client.get(name, ids=list(ids), output_fields=["id", "dense"])
        return {str(r["id"]): r["dense"] for r in rows}

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        with self.errors():
            self._use(name)
            iterator = self.client.query_iterator(
                name, batch_size=batch_size, filter="", output_fields=FIELDS
            )
        try:
            while True:
                with self.errors():
                    batch = iterator.next()
                if not batch:
                    return
                for row in batch:
                    yield _chunk(row), row["dense"]
        finally:
            iterator.close()
