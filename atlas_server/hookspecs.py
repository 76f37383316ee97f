"""The Atlas plugin API: pluggy hook specifications under the project name "atlas".

This module is the documentation of every extension point. A plugin is a module (or
object) with functions marked `@hookimpl` whose names match the specs below, exposed
through the `atlas` entry-point group of its package:

    # pyproject.toml of your plugin package
    [project.entry-points.atlas]
    my_retriever = "my_package.plugin"

    # my_package/plugin.py
    from atlas_server.hookspecs import hookimpl

    class MyRetriever:
        options = ("depth",)  # the keys of [rag.plugin_options.my-retriever] it reads

        def __init__(self, ctx):  # the factory: the class itself, called with a RAGContext
            self.store, self.depth = ctx.store, ctx.options.get("depth", 1)

        def retrieve(self, collection, query, top_k, filters=None): ...

    @hookimpl
    def atlas_register_retrievers(register):
        register("my-retriever", MyRetriever)

Every hook follows the register-callback style: the host calls the hook with a
`register(name, factory)` function; the plugin calls it once per thing it provides. A
factory takes a `atlas_server.rag.types.RAGContext` (metrics: no argument; vector stores:
a `atlas_server.rag.store.StoreSettings`) and returns the object. Names are global per kind: registering a name another plugin already took is
an error that names both plugins. A hook that raises is reported with the plugin's name
and the plugin is left out (everything it registered too), as one that fails to import
is. Objects are built lazily, the first time a request names them (`atlas serve` builds
its configured retriever and reranker at start-up), once per process. A retriever or
reranker may define `warm_up()`, called once after its factory, before its first use,
and `close()`, called once at shutdown; both optional and plain (an `async def` one is
not awaited); a failing `warm_up` is the plugin's failure, as a failing factory's is,
and a failing `close` is logged. Plugins can be disabled by name (`[plugins] disable`,
`ATLAS_DISABLE_PLUGINS`), freeing their names for another plugin (docs/plugins.md).
One retriever or reranker object serves every request, concurrently, from
many threads at once (the server runs each request's retrieval on a thread of its own,
without a lock), so `retrieve` and `rerank` must be thread-safe: guard shared mutable
state (a cache, a client that is not thread-safe, a sqlite3 connection) with a lock, or
keep it per call. They are plain functions: an `async def retrieve` is not awaited (its
coroutine is a malformed result, a 502). The built-in retrievers, rerankers and metrics
in `plugins/` are registered exactly this way.

Plugins import only this module, `atlas_server.rag.types`, `atlas_server.rag.store` (its
StoreError; the VectorStore base of a store back end), `atlas_server.rag.chunking.chunk_id`
and `atlas_server.rag.errors.InvalidRAGRequest` (docs/plugins.md); a store back end's
tests, `atlas_server.testing.store_contract`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "atlas"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def atlas_register_retrievers(register: Register) -> None:
    """Register retrievers: `register(name, factory)`.

    `factory(ctx: RAGContext) -> Retriever`, where the retriever has
    `retrieve(collection, query, top_k, filters=None) -> list[RetrievedChunk]`, best first.
    `ctx.store` is the vector store (`atlas_server.rag.store.VectorStore`, whichever back
    end `[rag] store` names), `ctx.embedder` the sentence embedder, and
    `ctx.retrievers` the other retrievers (for fusion), `ctx.options` the config's
    `[rag.plugin_options.NAME]` table. In the server, the store opens and the embedder
    loads when a plugin first calls them, so a retriever that uses neither is served
    while the store is down. Config (`[rag] retriever = NAME`) and requests
    (`"rag": {"retriever": NAME}`) choose among them by name. `top_k` is the request's
    (1-100), times 4 when a reranker follows (the reranker's candidates: up to 400). The
    server does not check that the store holds the collection first: raise
    `atlas_server.rag.store.StoreError` for one you do not serve (404 when the store
    lacks it too). A result that is not a list of well-formed `RetrievedChunk` (its
    `vector` None or the embedder's own output for the passage) is reported as this
    plugin's error (502), as an exception is. Called concurrently from many threads.
    """


@hookspec
def atlas_register_rerankers(register: Register) -> None:
    """Register rerankers: `register(name, factory)`.

    `factory(ctx: RAGContext) -> Reranker`, where the reranker has
    `rerank(query, candidates, top_k) -> list[RetrievedChunk]`, at most `top_k` of the
    candidates (the retriever's `top_k * 4`), reordered best first: a chunk that was not
    among them is a malformed result (502). Called concurrently from many threads. For
    rerankers that score
    with the served model itself, `ctx.score_texts(pairs)` gives the mean log p(text |
    prefix) of each (prefix, text) pair, all pairs in one engine round trip (None when no
    model is served). `ctx.score_text(prefix, text)`, the one-pair form, still works but
    costs a round trip per call: score all candidates with one `score_texts` call. Both
    block; call them from `rerank` (a worker thread). Chosen by `[rag] reranker = NAME` or
    `"rag": {"reranker": NAME}`; `ctx.options` is the config's `[rag.plugin_options.NAME]`.
    """


@hookspec
def atlas_register_metrics(register: Register) -> None:
    """Register metrics: `register(name, factory)` with `factory() -> Metric`.

    A metric has `name` and `compute(predictions: list[str], references: list[list[str]])
    -> MetricResult(scores, higher_is_better, signature)`; ranking metrics implement
    `compute_ranking(ranked: list[list[str]], relevant: list[set[str]]) -> MetricResult`.
    Evaluation suites (`atlas-eval`) look metrics up by name, so a third-party metric can
    be used in a suite's TOML without code changes.
    """


@hookspec
def atlas_register_vector_stores(register: Register) -> None:
    """Register vector store back ends: `register(name, factory)`.

    `factory(settings: StoreSettings) -> VectorStore`, where `VectorStore` is the abstract
    class in `atlas_server.rag.store` (its module docstring lists every method: collections,
    upsert by chunk id, dense and BM25 search with filters, deletion, close) and
    `StoreSettings` carries `data_dir` (a folder for in-process stores; None means the
    store's default under `$ATLAS_HOME/rag/NAME`), `url` (a server or cluster), `api_key`
    (from the command line or `ATLAS_VECTOR_STORE_API_KEY`, never the config file) and
    `options` (the `[rag] store_options` table, for tuning; a factory that lists the keys
    it reads as its own `options` attribute gets any other key refused, at `atlas serve`
    start and on open). `atlas serve` opens the one named by `[rag] store = NAME` once,
    at start-up (a store that does not open then is tried again by each RAG request), and
    closes it at shutdown; `atlas rag` opens it (or `--store NAME`) for the command;
    retrievers reach it as `ctx.store`. The factory should import its client library
    itself, so Atlas starts without it, and raise `atlas_server.rag.store.StoreError`
    with a message the user can act on (missing package, folder locked, server
    unreachable). Whatever else it raises is reported as the store failing to open,
    naming it and its plugin, its traceback logged: the server still starts, RAG answers
    503 `store_unavailable` and `/health` says why. Its methods should raise `StoreError`
    too, for everything the store cannot do (a collection that does not exist, a server
    gone): the API's 404 or 503. Any other exception from a method is the store's bug: a
    502 `plugin_error` naming the store and its plugin (not the retriever that called
    it), its traceback logged. The same object is called from many threads at once.
    Built-ins, in `plugins/stores.py`: `embedded` (the default), `qdrant`, `milvus`,
    `faiss`. The contract a back end should pass ships as a pytest suite,
    `atlas_server.testing.store_contract.StoreContract` (docs/plugins.md shows how to
    run it against yours).
    """
