"""The example plugin answers like the dense retriever (both are exact cosine search)."""

from __future__ import annotations

import sys
from pathlib import Path

from atlas_server.plugins import PluginHost
from atlas_server.rag.ingest import Document, ingest
from atlas_server.rag.pipeline import RAGPipeline
from atlas_server.rag.store import VectorStore
from atlas_server.rag.types import RAGContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlas_faiss_retriever  # noqa: E402


def test_faiss_matches_dense(tmp_path):
    from atlas_server.rag.embedding import Embedder

    host = PluginHost()
    host.register(atlas_faiss_retriever, "faiss-example")
    store, embedder = VectorStore(tmp_path / "q"), Embedder()
    docs = [
        Document(f"Paragraph {i} is about {topic}.", f"doc{i}")
        for i, topic in enumerate(
            ["sorting lists", "reading files", "network sockets", "regular expressions"]
        )
    ]
    ingest(store, embedder, "c", docs, progress=False)
    pipeline = RAGPipeline(host, RAGContext(store, embedder))
    faiss_ids = [r.chunk.id for r in pipeline.retrieve("c", "how to open a file", 3, "faiss")]
    dense_ids = [r.chunk.id for r in pipeline.retrieve("c", "how to open a file", 3, "dense")]
    assert faiss_ids == dense_ids
    store.close()


def test_an_empty_collection_gives_no_results(tmp_path):
    from atlas_server.rag.embedding import Embedder

    store = VectorStore(tmp_path / "q")
    store.ensure_collection("empty", 384)
    retriever = atlas_faiss_retriever.FaissRetriever(RAGContext(store, Embedder()))
    assert retriever.retrieve("empty", "anything", 3) == []
    store.close()


def test_filters_are_refused_as_the_clients_400_not_a_plugin_failure():
    """The plugin QA pass: the example raised ValueError, a 502 `plugin_error`, where the
    contract (docs/plugins.md) asks for InvalidRAGRequest naming `filters`, a 400."""
    import pytest

    from atlas_server.rag.errors import InvalidRAGRequest

    host = PluginHost(discover=False)
    host.register(atlas_faiss_retriever, "faiss-example")
    pipeline = RAGPipeline(host, RAGContext())
    with pytest.raises(InvalidRAGRequest, match="does not support filters") as caught:
        pipeline.retrieve("c", "q", 3, "faiss", filters={"lang": "en"})
    assert caught.value.param == "filters"


def test_its_options_are_listed_so_a_misspelt_key_is_refused():
    import pytest

    from atlas_server.rag.pipeline import check_plugin_options

    host = PluginHost(discover=False)
    host.register(atlas_faiss_retriever, "faiss-example")
    assert atlas_faiss_retriever.FaissRetriever.options == ()
    with pytest.raises(ValueError, match="'faiss' does not read"):
        check_plugin_options(host, {"faiss": {"nprobe": 8}})
