"""Built-in vector store back ends, registered like any third party's (`atlas` entry points).

- `embedded` (the default): Qdrant Edge in this process, HNSW-indexed, in a folder.
- `qdrant`: a Qdrant server or cluster by URL; without one, qdrant-client's local mode.
- `milvus`: a Milvus server or cluster by URI; without one, Milvus Lite in a local file
  (needs the `milvus` extra: pymilvus + milvus-lite).
- `faiss`: a persisted FAISS index with chunks, BM25 and filters in SQLite (needs the
  `faiss` extra: faiss-cpu).
Each module imports its client library only when the store is opened.
What it does not do: choose among them (`[rag] store` does; see docs/rag.md).
"""

from __future__ import annotations

from atlas_server.hookspecs import hookimpl
from atlas_server.rag.store import StoreSettings


def embedded(settings: StoreSettings):
    from atlas_server.rag.stores.edge import EdgeStore

    return EdgeStore(settings)


def qdrant(settings: StoreSettings):
    from atlas_server.rag.stores.qdrant import QdrantStore

    return QdrantStore(settings)


def milvus(settings: StoreSettings):
    from atlas_server.rag.stores.milvus import MilvusStore

    return MilvusStore(settings)


def faiss(settings: StoreSettings):
    try:
        from atlas_server.rag.stores.faiss import FaissStore
    except ImportError as e:
        from atlas_server.rag.store import StoreError

        raise StoreError(
            f"the faiss store needs faiss-cpu (pip install 'atlas-llm[faiss]'): {e}"
        ) from None
    return FaissStore(settings)


# The `store_options` keys each back end reads (open_store refuses others, and `atlas
# serve` checks them at start, before any store opens): kept beside the factories so a
# check needs no client library. Each store's module reads exactly these.
embedded.options = (
    "hnsw_m", "ef_construct", "hnsw_ef", "optimize_every", "search_threads",
    "indexing_threshold_kb", "full_scan_threshold_kb", "segments",
)  # fmt: skip
qdrant.options = ("timeout",)
milvus.options = ("index_type", "index_params")
faiss.options = ("exact_below", "nprobe", "save_every_s")


@hookimpl
def atlas_register_vector_stores(register) -> None:
    register("embedded", embedded)
    register("qdrant", qdrant)
    register("milvus", milvus)
    register("faiss", faiss)
