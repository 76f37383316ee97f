"""Who is blamed when retrieval fails: the request (400), the store (503) or a plugin (502).

RAGService is driven directly, with a tiny fake embedder, so each rule is checked in
milliseconds; tests/test_rag_server.py checks the same errors through HTTP.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginError, PluginHost
from atlas_server.rag.errors import (
    CollectionNotFound,
    InvalidRAGRequest,
    PluginRuntimeError,
    UnknownComponentError,
    VectorStoreUnavailable,
)
from atlas_server.rag.pipeline import RAGPipeline
from atlas_server.rag.service import RAGService
from atlas_server.rag.types import Chunk, RAGContext, RetrievedChunk

DIM = 8


class FakeEmbedder:
    """Bag of hashed words, L2-normalised: enough for dense search to rank."""

    def encode(self, texts, **_):
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in zip(out, texts, strict=True):
            for word in text.lower().split():
                row[hash(word) % DIM] += 1
            row /= max(float(np.linalg.norm(row)), 1e-6)
        return out


def chunk(source: str, text: str) -> Chunk:
    return Chunk(f"id-{source}", text, source, None, 0, len(text))


class Returns:
    def __init__(self, value):
        self.value = value

    def retrieve(self, collection, query, top_k, filters=None):
        return self.value

    def rerank(self, query, candidates, top_k):
        return self.value


GOOD = [RetrievedChunk(chunk("a.md", "alpha"), 1.0, "own")]


class Raises:
    def __init__(self, error):
        self.error = error

    def retrieve(self, collection, query, top_k, filters=None):
        raise self.error


class OddPlugin:
    @hookimpl
    def atlas_register_retrievers(self, register):
        register("returns-none", lambda ctx: Returns(None))
        register("returns-ints", lambda ctx: Returns([1, 2, 3]))
        register("returns-bad-chunk", lambda ctx: Returns([RetrievedChunk("x", 1.0, "r")]))
        register(
            "returns-bad-score", lambda ctx: Returns([RetrievedChunk(GOOD[0].chunk, "hi", "r")])
        )
        register("own-passages", lambda ctx: Returns(GOOD))
        register(
            "refuses-filters",
            lambda ctx: Raises(InvalidRAGRequest("this retriever applies no filters", "filters")),
        )
        register("interrupts", lambda ctx: Raises(KeyboardInterrupt()))

    @hookimpl
    def atlas_register_rerankers(self, register):
        register("rerank-none", lambda ctx: Returns(None))


def service(tmp_path, store="embedded", plugin_options=None) -> RAGService:
    host = PluginHost()
    host.register(OddPlugin(), "odd-plugin")
    rag = SimpleNamespace(
        store=store,
        store_url=None,
        qdrant_url=None,
        data_dir=str(tmp_path / "store"),
        store_options={},
        plugin_options=plugin_options or {},
    )
    svc = RAGService(host, FakeEmbedder, store_config=rag)
    svc.store.ensure_collection("c", DIM)
    chunks = [chunk("a.md", "alpha heap"), chunk("b.md", "beta queue")]
    svc.store.upsert("c", chunks, FakeEmbedder().encode([c.text for c in chunks]))
    return svc


@pytest.fixture()
def svc(tmp_path):
    s = service(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize(
    "filters", [{"": "x"}, {"metadata.": "x"}, {"a..b": 1}, {"start": True}, {"n": [1, "x"]}]
)
def test_a_bad_filter_is_the_requests_fault_not_the_stores(svc, filters):
    """Found by an audit: a bad key came back 503 store_unavailable."""
    with pytest.raises(InvalidRAGRequest) as caught:
        svc.retrieve("c", "alpha", filters=filters)
    assert caught.value.param == "filters"


@pytest.mark.parametrize(
    ("retriever", "reranker", "blamed", "says"),
    [
        ("returns-none", None, "retriever 'returns-none'", "returned NoneType"),
        ("returns-ints", None, "retriever 'returns-ints'", "result 0 is int"),
        ("returns-bad-chunk", None, "retriever 'returns-bad-chunk'", "chunk is str"),
        ("returns-bad-score", None, "retriever 'returns-bad-score'", "score is 'hi'"),
        ("dense", "rerank-none", "reranker 'rerank-none'", "returned NoneType"),
        ("returns-ints", "mmr", "retriever 'returns-ints'", "result 0 is int"),
    ],
)
def test_a_malformed_result_is_blamed_on_the_plugin_that_returned_it(
    svc, retriever, reranker, blamed, says
):
    """Found by an audit: None or [1, 2, 3] gave a 500, or blamed the next stage."""
    with pytest.raises(PluginRuntimeError) as caught:
        svc.retrieve("c", "alpha", retriever=retriever, reranker=reranker)
    message = str(caught.value)
    assert message.startswith(blamed) and "odd-plugin" in message and says in message


def test_a_retriever_may_serve_a_collection_the_store_does_not_hold(svc):
    """The retriever, not the store, decides which collections exist for it."""
    assert svc.retrieve("elsewhere", "alpha", retriever="own-passages") == GOOD
    with pytest.raises(CollectionNotFound):  # the built-ins still answer 404
        svc.retrieve("elsewhere", "alpha", retriever="dense")


def test_plugin_options_from_config_reach_the_component(tmp_path):
    seen = {}

    class Recorder:
        @hookimpl
        def atlas_register_retrievers(self, register):
            register("recorder", lambda ctx: seen.update(ctx.options) or Returns(GOOD))

    s = service(tmp_path, plugin_options={"recorder": {"k": 3}, "other": {"x": 1}})
    s.host.register(Recorder(), "recorder-plugin")
    try:
        assert s.retrieve("c", "alpha", retriever="recorder") == GOOD
        assert seen == {"k": 3}
    finally:
        s.close()


def test_a_milvus_failure_is_a_store_failure_not_the_retrievers(tmp_path):
    """Found by an audit: MilvusException surfaced as a 502 blaming retriever 'hybrid'."""
    pytest.importorskip("milvus_lite")
    from pymilvus.exceptions import MilvusException

    s = service(tmp_path, store="milvus")
    try:
        assert [r.chunk.source for r in s.retrieve("c", "alpha heap", 1)] == ["a.md"]

        def down(*args, **kwargs):
            raise MilvusException(code=2, message="the query node is gone")

        s.store.client.search = down
        with pytest.raises(VectorStoreUnavailable, match="Milvus at .* the query node is gone"):
            s.retrieve("c", "alpha heap", 1)
    finally:
        s.close()


def test_milvus_filters_quote_unicode_and_refuse_bad_types(tmp_path):
    """Found by an audit: json.dumps wrote é as \\u00e9, which Milvus refuses."""
    pytest.importorskip("milvus_lite")
    s = service(tmp_path, store="milvus")
    try:
        s.store.upsert("c", [Chunk("id-u", "café", "é.md", "Straße", 0, 4)], np.eye(1, DIM))
        hits = s.retrieve("c", "café", 4, retriever="dense", filters={"heading": "Straße"})
        assert [r.chunk.source for r in hits] == ["é.md"]
        with pytest.raises(InvalidRAGRequest, match="start is an integer"):
            s.retrieve("c", "café", filters={"start": True})
    finally:
        s.close()


class RaisesOnRegister:
    @hookimpl
    def atlas_register_retrievers(self, register):
        register("half-registered", lambda ctx: Returns(GOOD))
        raise RuntimeError("register hook exploded")


def test_a_register_hook_that_raises_is_reported_and_skipped(caplog):
    """Found by an audit: it took down `atlas plugins`, `atlas serve` and `atlas rag`."""
    host = PluginHost()
    with caplog.at_level(logging.ERROR):
        host.register(RaisesOnRegister(), "exploding-register")
    assert "plugin 'exploding-register' failed to register" in caplog.text
    assert "half-registered" not in host.retrievers and "dense" in host.retrievers
    row = next(p for p in host.describe() if p["name"] == "exploding-register")
    assert "register hook exploded" in row["error"]
    with pytest.raises(
        UnknownComponentError, match="failed to load or to register: exploding-register"
    ):
        RAGPipeline(host, RAGContext()).component("retrievers", "half-registered")
    strict = PluginHost(strict=True)
    with pytest.raises(PluginError, match="'exploding-register'.*register hook exploded"):
        strict.register(RaisesOnRegister(), "exploding-register")


def test_numpy_scores_and_spans_are_well_formed_results():
    """A plugin scoring with NumPy (FAISS returns float32) is not a malformed result."""
    import numpy as np

    from atlas_server.rag.pipeline import checked_results
    from atlas_server.rag.types import Chunk, RetrievedChunk

    chunk = Chunk("id", "text", "src.md", None, np.int64(0), np.int64(4))
    assert len(checked_results([RetrievedChunk(chunk, np.float32(0.5), "mine")])) == 1


class Exits:
    def retrieve(self, collection, query, top_k, filters=None):
        raise SystemExit(3)


def _results(*retrieved):
    return lambda ctx: Returns(list(retrieved))


def test_numpy_results_come_out_as_plain_json_types(svc):
    """Found by an audit: NumPy scalars passed the check, then failed the JSON encoder (a
    500 after the model had generated)."""
    import msgspec

    c = Chunk("id-n", "text", "n.md", None, np.int64(0), np.int64(4), {"rank": 1})
    svc.host.retrievers["numpy"] = _results(RetrievedChunk(c, np.float32(0.5), "mine"))
    [r] = svc.retrieve("c", "alpha", retriever="numpy")
    assert type(r.score) is float and type(r.chunk.start) is int and type(r.chunk.end) is int
    msgspec.json.encode({"score": r.score, "span": [r.chunk.start, r.chunk.end]})


@pytest.mark.parametrize(
    ("returned", "says"),
    [
        (RetrievedChunk(chunk("a.md", "x"), float("nan"), "r"), "not a finite number"),
        (RetrievedChunk(Chunk("i", "x", "a.md", None, 5, 2), 1.0, "r"), "0 <= start <= end"),
        (RetrievedChunk(Chunk("i", "x", "a.md", None, True, 2), 1.0, "r"), "must be integers"),
        (RetrievedChunk(Chunk("i", "x", "a.md", None, 0, 1, {"o": object()}), 1.0, "r"),
         "metadata is not JSON"),
    ],
)  # fmt: skip
def test_results_the_api_could_not_send_are_the_plugins_fault(svc, returned, says):
    svc.host.retrievers["odd"] = _results(returned)
    with pytest.raises(PluginRuntimeError, match=says):
        svc.retrieve("c", "alpha", retriever="odd")


def test_a_chunk_returned_twice_is_kept_once_in_its_first_place(svc):
    first, other = GOOD[0], RetrievedChunk(chunk("b.md", "beta"), 0.9, "own")
    svc.host.retrievers["twice"] = _results(first, other, first)
    assert svc.retrieve("c", "alpha", 5, retriever="twice") == [first, other]


def test_a_plugin_calling_sys_exit_is_a_plugin_error(svc):
    svc.host.retrievers["exits"] = lambda ctx: Exits()
    with pytest.raises(PluginRuntimeError, match="SystemExit"):
        svc.retrieve("c", "alpha", retriever="exits")


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")  # nothing listens there
def test_an_unreachable_qdrant_server_is_a_store_failure(tmp_path):
    """Found by an audit: a 500 on the collection routes and a 502 blaming 'hybrid'."""
    rag = SimpleNamespace(store="qdrant", store_url="http://127.0.0.1:9", qdrant_url=None,
                          data_dir=None, store_options={}, plugin_options={})  # fmt: skip
    svc = RAGService(PluginHost(), FakeEmbedder, store_config=rag)
    try:
        for call in (svc.collections, lambda: svc.retrieve("c", "alpha")):
            with pytest.raises(VectorStoreUnavailable, match="Qdrant server at .*127.0.0.1:9"):
                call()
    finally:
        svc.close()


class GatedEmbedder(FakeEmbedder):
    """Embeds only once `gate` is set, so a test can hold an ingest half way."""

    dim = DIM

    def __init__(self, gate, started):
        self.gate, self.started = gate, started

    def count_pieces(self, text):
        return len(text.split())

    def encode(self, texts, **kwargs):
        self.started.set()
        assert self.gate.wait(10)
        return super().encode(texts, **kwargs)


def test_a_source_delete_waits_for_an_ingest_of_the_collection(tmp_path):
    """Found by an audit: a DELETE of a source while it was being posted removed the chunks
    written so far, and the rest of the document stayed."""
    import threading

    from atlas_server.rag.ingest import Document

    gate, started = threading.Event(), threading.Event()
    s = service(tmp_path)
    s._embedder = lambda: GatedEmbedder(gate, started)
    try:
        docs = [Document(f"part {i} of the big document.", "big.md") for i in range(3)]
        adding = threading.Thread(target=s.add_documents, args=("c", docs))
        adding.start()
        assert started.wait(10)  # the ingest is under way, holding its embedding
        result = {}
        deleting = threading.Thread(
            target=lambda: result.update(s.delete_documents("c", ["big.md"]))
        )
        deleting.start()
        deleting.join(0.5)
        assert deleting.is_alive()  # it waits for the ingest, not cuts into it
        gate.set()
        adding.join(10)
        deleting.join(10)
        assert result["deleted"] == 3 and result["total"] == 2  # all of big.md, nothing else
    finally:
        gate.set()
        s.close()


def test_a_plugin_can_refuse_what_the_request_asks_as_the_clients_error(svc):
    """A retriever that cannot apply `filters` raises InvalidRAGRequest naming the field:
    that is the client's 400, not a 502 blaming the plugin (it used to be wrapped)."""
    with pytest.raises(InvalidRAGRequest) as caught:
        svc.retrieve("c", "alpha", retriever="refuses-filters", filters={"lang": "en"})
    assert caught.value.param == "filters" and "applies no filters" in str(caught.value)


def test_a_keyboard_interrupt_from_plugin_code_is_its_failure_off_the_main_thread(svc):
    """Raised on a server's worker thread it is no Ctrl-C (signals reach the main thread
    only): the plugin's failure, not a plain-text 500. On the main thread (the CLI) a
    Ctrl-C still stops the command."""
    from atlas_server.compute_threads import call_in_fresh_thread

    with pytest.raises(PluginRuntimeError, match="KeyboardInterrupt"):
        call_in_fresh_thread(svc.retrieve, "c", "alpha", 4, "interrupts")
    with pytest.raises(KeyboardInterrupt):
        svc.retrieve("c", "alpha", retriever="interrupts")


def test_a_store_whose_package_is_missing_is_a_store_failure(tmp_path, monkeypatch, caplog):
    """Found by the GPU-readiness review: on an image without qdrant-edge-py, the server's
    start-up store opening raised ImportError and the whole server exited, so not even
    completions were served. Now the store is unavailable (RAG's 503) and says why."""
    import sys

    for name in [m for m in sys.modules if m.startswith(("plugins", "atlas_server.rag.stores"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "qdrant_edge", None)  # import qdrant_edge: ImportError
    rag = SimpleNamespace(store="embedded", store_url=None, qdrant_url=None,
                          data_dir=str(tmp_path / "store"), store_options={}, plugin_options={})  # fmt: skip
    svc = RAGService(PluginHost(), FakeEmbedder, store_config=rag)
    try:
        assert svc.store_status() == "not opened yet"
        with caplog.at_level(logging.WARNING):
            svc.open_store()  # the server's start-up: logged, not raised
        assert "its package is not installed" in caplog.text
        # /health says so (its status stays 200: generation is served).
        assert svc.store_status().startswith("unavailable: the 'embedded' vector store")
        with pytest.raises(VectorStoreUnavailable, match="'embedded' vector store .* qdrant_edge"):
            svc.retrieve("c", "alpha")
    finally:
        svc.close()


def test_a_collection_deleted_meanwhile_is_not_a_store_failure(svc, monkeypatch):
    """Found by the API QA pass under concurrent deletes: a listing whose collection went
    away between the names and their counts failed whole with 503 "retry in 5 s", and a
    document delete that waited for the collection's delete answered the same 503 for a
    collection that can never come back (a 404 without the wait)."""
    store = svc.store
    assert svc.store_status() == "ok"
    names = store.collections
    monkeypatch.setattr(store, "collections", lambda: [*names(), "gone"])  # deleted meanwhile
    assert [name for name, _ in svc.collections()] == ["c"]
    monkeypatch.setattr(store, "collections", names)
    # A document delete that waited while the collection was deleted under it.
    real_require = svc._require

    def deleted_while_waiting(collection):
        real_require(collection)
        if not svc._writing(collection).locked():  # the first check passes; then the delete wins
            store.delete_collection(collection)

    monkeypatch.setattr(svc, "_require", deleted_while_waiting)
    with pytest.raises(CollectionNotFound):
        svc.delete_documents("c", ["a.md"])


def test_an_unconfigured_cross_encoder_is_the_requests_400_not_a_plugin_failure(svc):
    """`cross-encoder` is offered by /v1/plugins but needs a model folder in the server's
    config; without one every request naming it was a 502 blaming the plugin, with a
    traceback logged each time (API QA pass). It is a 400 naming the reranker."""
    with pytest.raises(InvalidRAGRequest, match="not configured on this server") as caught:
        svc.retrieve("c", "alpha", reranker="cross-encoder")
    assert caught.value.param == "reranker"


def test_a_long_ingest_holds_up_only_its_own_collection(tmp_path):
    """A large ingest held one server-wide write lock: a delete or a document listing in
    any other collection waited behind it for its whole run."""
    import threading

    from atlas_server.rag.ingest import Document

    gate, started = threading.Event(), threading.Event()
    s = service(tmp_path)
    s._embedder = lambda: GatedEmbedder(gate, started)
    try:
        docs = [Document(f"part {i} of the big document.", "big.md") for i in range(3)]
        adding = threading.Thread(target=s.add_documents, args=("other", docs))
        adding.start()
        assert started.wait(10)  # the ingest into "other" is under way, holding its lock
        # Collection "c" is served meanwhile (the gate stays shut until after).
        assert [d.source for d in s.documents("c")[0]] == ["a.md", "b.md"]
        assert s.delete_documents("c", ["a.md"]) == {"collection": "c", "deleted": 1, "total": 1}
        assert adding.is_alive()
        gate.set()
        adding.join(10)
        assert [d.source for d in s.documents("other")[0]] == ["big.md"]
    finally:
        gate.set()
        s.close()
