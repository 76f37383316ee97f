"""RAG as a service: the collections, retrieval and grounding a server offers.

What it does: `RAGService` opens the vector store and the retrieval pipeline lazily, on
first use (a server that never sees a RAG request never locks a data directory or loads
the embedder), checks a request before any plugin sees it (collection name, query,
filters), retrieves and reranks through the plugins, ingests documents, lists and deletes
collections, lists a collection's documents (`documents_of`) and deletes them by source,
and grounds a prompt or a chat in retrieved sources, dropping the
lowest-ranked ones until the prompt fits the model's context. The store it uses and hands
to plugins is guarded (`store.GuardedStore`): the store's own StoreError is a 503 (404
for a missing collection), any other exception from its code a `StorePluginError` naming
the store and its plugin (a 502), never the retriever's; a factory that raises leaves the
store unavailable (503, logged once with its traceback, /health saying why). Plugins'
`ctx.store` and `ctx.embedder` open on their first use (`types.OnFirstUse`). A server
builds the configured retriever and reranker at start-up (`warm_up`: their factories and
`warm_up()` methods run then, a failure logged naming the plugin), and `close` closes
every retriever and reranker built, then the store. It raises
only the errors of `errors.py` (StorePluginError is one of its PluginRuntimeError).
Every method blocks: callers run them off their event loop (the HTTP layer does, on a
thread that ends with the call, see `compute_threads.py`).
What it does not do: HTTP (`atlas_server/api/retrieval.py` serves it), generation, or
chunking and embedding details (`chunking.py`, `embedding.py`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..plugins import PluginHost
from .chunking import ChunkSettings
from .errors import (
    CollectionNotFound,
    InvalidRAGRequest,
    PluginRuntimeError,
    RAGError,
    VectorStoreUnavailable,
)
from .grounding import grounded_messages, grounded_prompt
from .ingest import Document, ingest
from .pipeline import RAGPipeline
from .store import (
    StoreError,
    StoreFactoryError,
    StorePluginError,
    VectorStore,
    check_name,
    guarded,
    store_from_config,
    store_name,
)
from .store import check_filters as store_check_filters
from .types import OnFirstUse, RAGContext, RetrievedChunk, ScoreTexts

log = logging.getLogger("atlas.rag")


@dataclass(frozen=True)
class RetrievalDefaults:
    """What a request that names no retriever, reranker or top_k gets (`[rag]` config)."""

    retriever: str = "hybrid"
    reranker: str | None = None
    top_k: int = 4


@dataclass
class Grounded:
    """A prompt (completions) or messages (chat) with numbered sources, and the sources."""

    chunks: list[RetrievedChunk]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


def check_collection_name(name: str) -> None:
    """Refuse a name the store cannot hold (before any plugin sees it)."""
    try:
        check_name(name)  # the stores' own rule: ASCII letters, digits, - and _
    except StoreError as e:
        raise InvalidRAGRequest(str(e), "collection") from None


def check_filters(filters: dict[str, Any] | None) -> None:
    """Refuse filters outside the filter language (store.py) as the request's fault: a
    StoreError from the store's own check would otherwise read as the store failing."""
    try:
        store_check_filters(filters)
    except StoreError as e:
        raise InvalidRAGRequest(str(e), "filters") from None


@contextlib.contextmanager
def store_failures_as_unavailable() -> Iterator[None]:
    """A StoreError from the store (down, locked, a folder it cannot rename) becomes the
    503 VectorStoreUnavailable; a StorePluginError (the store's own code failed: a bug)
    passes as the 502 it is, naming the store, never turned into a 503 to retry."""
    try:
        yield
    except StorePluginError:
        raise
    except StoreError as e:
        raise VectorStoreUnavailable(str(e)) from None


MAX_DOCUMENTS_PAGE = 1000  # rows one listing of a collection's documents returns at most


@dataclass(frozen=True)
class DocumentInfo:
    """One document of a collection (its chunks sharing a source), as its chunks describe
    it: no store keeps a record of the document itself."""

    source: str
    # Its first chunk's heading: the title it was ingested with, unless its text opens
    # under a heading of its own (None when neither).
    title: str | None
    chunks: int
    characters: int  # where its last chunk's span ends: the text's length, bar trailing space


def documents_of(
    store: VectorStore, collection: str, after: str | None = None, prefix: str = ""
) -> list[DocumentInfo]:
    """The documents of `collection` whose source starts with `prefix` and sorts after
    `after`, sorted by source (code point order). One pass over every chunk of the
    collection (`iter_chunks`), whatever is asked: O(collection), the price of a store
    contract that has no per-source index (docs/rag.md). The back ends' iter_chunks hand
    each chunk's vector too, read and dropped here. Raises StoreError for a collection
    the store does not hold."""
    check_name(collection)  # a name no store can hold says so, not "does not exist"
    if not store.exists(collection):
        there = ", ".join(store.collections()) or "none"
        raise StoreError(f"collection {collection!r} does not exist (collections: {there})")
    found: dict[str, list[Any]] = {}  # source -> [chunks, first start, title, last end]
    for chunk, _ in store.iter_chunks(collection):
        source = chunk.source
        if (after is not None and source <= after) or not source.startswith(prefix):
            continue
        row = found.get(source)
        if row is None:
            found[source] = [1, chunk.start, chunk.heading, chunk.end]
            continue
        row[0] += 1
        if chunk.start < row[1]:
            row[1], row[2] = chunk.start, chunk.heading
        row[3] = max(row[3], chunk.end)
    return [
        DocumentInfo(source, title, chunks, end)
        for source, (chunks, _, title, end) in sorted(found.items())
    ]


class RAGService:
    """Lazily opened store + pipeline over a plugin host (see the module docstring)."""

    def __init__(
        self,
        host: PluginHost,
        embedder: Callable[[], Any],
        store_config: Any = None,
        defaults: RetrievalDefaults = RetrievalDefaults(),
        score_texts: ScoreTexts | None = None,
    ) -> None:
        """`embedder()` returns the (shared, lazily loaded) embedder; `score_texts` scores
        text under the served model, for likelihood rerankers (RAGContext.score_texts)."""
        self.host, self.defaults = host, defaults
        self._embedder, self._score_texts = embedder, score_texts
        self._store_config = store_config  # the server's [rag] section: which back end, where
        self._lock = threading.Lock()
        # A collection's adds and deletes run one at a time: a DELETE of a source while a
        # POST of it is half written would leave part of the document behind. Document
        # listings take the lock too (see `documents`). One lock per collection, so a
        # long ingest holds up only its own collection's writes and listings (the stores
        # guard their own structures across collections).
        self._write_locks: dict[str, threading.Lock] = {}
        self._store: Any = None
        self._store_problem: str | None = None  # why the last try to open it failed
        self._store_logged: str | None = None  # the open failure last logged with a traceback
        self._embedder_logged: str | None = None  # likewise for the embedder
        self._pipeline: RAGPipeline | None = None

    # --- lazily opened parts ------------------------------------------------------------
    @property
    def store(self) -> VectorStore:
        """The store, opened now if it is not yet (and guarded: `GuardedStore`)."""
        with self._lock:
            if self._store is None:
                try:
                    opened = store_from_config(self._store_config, self.host)
                except StoreError as e:  # open_store words every failure as one
                    raise self._unavailable(e) from None
                name = store_name(self._store_config)[0]
                self._store = guarded(opened, name, self.host.owner("vector_stores", name))
                self._store_problem = None
            return self._store

    def _unavailable(self, e: StoreError) -> VectorStoreUnavailable:
        """The 503 of a store that did not open, remembered for /health. A factory's own
        exception (StoreFactoryError's cause: a bug, or a client's ConnectionRefusedError)
        is logged with its traceback, once while the same problem lasts: every RAG
        request tries to open the store again and would repeat it."""
        problem = str(e)
        if isinstance(e, StoreFactoryError) and problem != self._store_logged:
            log.error("%s (RAG requests answer 503 until it opens)", problem, exc_info=e.__cause__)
            self._store_logged = problem
        self._store_problem = problem
        return VectorStoreUnavailable(problem)

    def store_status(self) -> str:
        """For /health, without trying to open anything: "ok" (open), "not opened yet", or
        "unavailable: WHY" (the last try failed; RAG requests answer 503 and try again)."""
        if self._store is not None:
            return "ok"
        if self._store_problem is not None:
            return f"unavailable: {self._store_problem}"
        return "not opened yet"

    def open_store(self) -> None:
        """Open the store now (a server at start-up): an embedded store's folder is then
        held from the start, so `atlas rag ingest` on it is refused at once, not until the
        server's first RAG request. A store that cannot be opened yet (a Qdrant server not
        up, a folder another process holds, a factory that raised) is logged; the
        requests that need it answer 503 and try again."""
        try:
            _ = self.store  # the property opens it
        except VectorStoreUnavailable as e:
            if str(e) != self._store_logged:  # not said already, with its traceback
                log.warning("vector store not opened at start-up (RAG requests will retry): %s", e)

    def _open_embedder(self) -> Any:
        """The embedder, for a plugin's first use of `ctx.embedder`. One that cannot load
        (its package or model folder missing) makes RAG unavailable, a 503 as for the
        store, not the failure of the retriever that happened to need it first."""
        try:
            return self._embedder()
        except Exception as e:
            problem = f"the embedder cannot be loaded: {type(e).__name__}: {e}"
            if problem != self._embedder_logged:
                log.error("%s", problem, exc_info=e)
                self._embedder_logged = problem
            raise VectorStoreUnavailable(problem) from e

    @property
    def pipeline(self) -> RAGPipeline:
        """The pipeline, made on first use. Its plugins' `ctx.store` and `ctx.embedder`
        open when a plugin first uses them (`OnFirstUse`), not here: a retriever with an
        index of its own is served while the store is down, and never loads the
        embedder."""
        with self._lock:
            if self._pipeline is None:
                ctx = RAGContext(
                    OnFirstUse(lambda: self.store),
                    OnFirstUse(self._open_embedder),
                    score_texts=self._score_texts,
                )
                options = getattr(self._store_config, "plugin_options", None) or {}
                self._pipeline = RAGPipeline(self.host, ctx, options)
            return self._pipeline

    def warm_up(self) -> None:
        """Build the configured retriever and reranker now, their `warm_up()` included (a
        server at start-up), so the first request does not pay for loading them. One that
        fails is logged, naming its plugin; requests that use it get the error a factory
        that raised gives (502 `plugin_error`) and build it again."""
        for kind, name in (
            ("retrievers", self.defaults.retriever),
            ("rerankers", self.defaults.reranker),
        ):
            if name is None:
                continue
            try:
                self.pipeline.component(kind, name)
            except PluginRuntimeError as e:
                log.error(
                    "%s (RAG requests that use it answer 502 and try it again)",
                    e, exc_info=e.__cause__,
                )  # fmt: skip
            except (RAGError, StoreError) as e:  # the store or embedder not there yet, say
                log.warning(
                    "%s %r not built at start-up (requests will retry): %s", kind[:-1], name, e
                )

    def close(self) -> None:
        """Close the retrievers and rerankers built (each plugin's `close()`; one that
        fails is logged) and then the store's clients (only if it was opened), before the
        interpreter ends."""
        with self._lock:
            store, self._store = self._store, None
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()
        close = getattr(store, "close", None)
        if close is not None:
            close()

    # --- requests -----------------------------------------------------------------------
    def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int | None = None,
        retriever: str | None = None,
        reranker: str | None = None,
        filters: dict[str, Any] | None = None,
    ) -> list[RetrievedChunk]:
        """Ranked chunks of `collection` for `query`, best first (config defaults fill in)."""
        check_collection_name(collection)
        if not query.strip():
            raise InvalidRAGRequest("the query must not be empty", "query")
        check_filters(filters)
        # No existence check here: a retriever may serve a collection the store does not
        # hold (its own index, a remote service). Built-in retrievers raise StoreError for
        # a missing one, which becomes CollectionNotFound below (docs/plugins.md).
        pipeline = self.pipeline
        try:
            return pipeline.retrieve(
                collection,
                query,
                top_k or self.defaults.top_k,
                retriever or self.defaults.retriever,
                reranker if reranker is not None else self.defaults.reranker,
                filters,
            )
        except StorePluginError:  # the store's code failed, not the retriever's: a 502
            raise
        except StoreError as e:
            self._require(collection)  # missing, or deleted while we searched?
            raise VectorStoreUnavailable(str(e)) from None

    def collections(self) -> list[tuple[str, int]]:
        """(name, number of chunks) of every collection."""
        store = self.store
        listed = []
        with store_failures_as_unavailable():
            for name in store.collections():
                try:
                    listed.append((name, store.count(name)))
                except StorePluginError:
                    raise
                except StoreError:
                    if store.exists(name):
                        raise
                    # Deleted between the listing and its count: it is not there any more,
                    # and a concurrent delete must not fail the whole listing.
        return listed

    def add_documents(self, collection: str, documents: list[Document]) -> dict[str, Any]:
        """Chunk, embed and store documents (idempotent: chunk ids come from content)."""
        check_collection_name(collection)
        store = self.store
        with store_failures_as_unavailable(), self._writing(collection):
            return ingest(
                store, self._embedder(), collection, documents, self._chunking(), progress=False
            )

    def _writing(self, collection: str) -> threading.Lock:
        """The lock of `collection`'s writes (made on first use; a name is checked first)."""
        with self._lock:
            return self._write_locks.setdefault(collection, threading.Lock())

    def _chunking(self) -> ChunkSettings:
        """[rag] chunk_max_tokens / chunk_overlap (checked when the config is read)."""
        cfg = self._store_config
        default = ChunkSettings()
        return ChunkSettings(
            getattr(cfg, "chunk_max_tokens", default.max_tokens),
            getattr(cfg, "chunk_overlap", default.overlap_tokens),
        )

    def delete_documents(self, collection: str, sources: list[str]) -> dict[str, Any]:
        """Remove every chunk of the documents named by `sources`: with a new POST of the
        same source, how a changed document replaces its old chunks (the store's filtered
        delete: nothing else in the collection is read)."""
        self._require(collection)
        store = self.store
        with store_failures_as_unavailable(), self._writing(collection):
            # Again once writes are ours: a collection deleted while this waited is a
            # 404, as it is without the wait, not a store failure to retry.
            self._require(collection)
            deleted = store.delete_sources(collection, sorted(set(sources)))
            total = store.count(collection)
        return {"collection": collection, "deleted": deleted, "total": total}

    def documents(
        self, collection: str, limit: int = 100, after: str | None = None, prefix: str = ""
    ) -> tuple[list[DocumentInfo], bool]:
        """A page of `collection`'s documents, sorted by source: the first `limit` after the
        source `after` (the previous page's last), and whether more follow."""
        if not 1 <= limit <= MAX_DOCUMENTS_PAGE:
            raise InvalidRAGRequest(f"limit must be in 1..{MAX_DOCUMENTS_PAGE}", "limit")
        self._require(collection)
        store = self.store
        # Under the collection's write lock, as its adds and deletes are: a listing waits
        # for an ingest under way and then counts each document whole (one too big for a
        # single store write is otherwise seen half written, miscounted), and the
        # collection's delete cannot close its shard under the scan. The cost is that its
        # writes wait for one scan of it; retrieval never waits.
        with store_failures_as_unavailable(), self._writing(collection):
            self._require(collection)  # deleted while this waited: a 404, as above
            rows = documents_of(store, collection, after, prefix)
        return rows[:limit], len(rows) > limit

    def delete_collection(self, collection: str) -> None:
        self._require(collection)
        with store_failures_as_unavailable(), self._writing(collection):
            self.store.delete_collection(collection)

    def _require(self, collection: str) -> None:
        check_collection_name(collection)  # a name no store can hold is a 400, not a 404
        with store_failures_as_unavailable():
            present = self.store.exists(collection)
        if not present:
            raise CollectionNotFound(f"collection {collection!r} does not exist", "collection")

    # --- grounding ----------------------------------------------------------------------
    def ground(
        self,
        chunks: list[RetrievedChunk],
        count_tokens: Callable[[str], int],
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        max_prompt_tokens: int | None = None,
        context_tokens: int | None = None,
        count_messages: Callable[[list[dict[str, Any]]], int] | None = None,
    ) -> Grounded:
        """The prompt (or messages) with sources, the lowest-ranked dropped until it fits
        `max_prompt_tokens`: a prompt as `count_tokens` counts it, messages as
        `count_messages` does (needed for chat: the ids the chat template renders, its
        headers, special tokens and generation prompt included, which the contents alone
        miss). `context_tokens`, the model's context, is named in the error when not even
        one source fits."""
        if not chunks:
            raise InvalidRAGRequest("retrieval found no source for this question")

        def size(grounded: Grounded) -> int:  # in tokens, as the model will be fed it
            if grounded.prompt is not None:
                return count_tokens(grounded.prompt)
            if count_messages is None:  # a caller's bug: contents alone undercount
                raise TypeError("grounding messages needs count_messages")
            return count_messages(grounded.messages or [])

        while True:
            if prompt is not None:
                grounded = Grounded(chunks, prompt=grounded_prompt(prompt, chunks))
            else:
                grounded = Grounded(chunks, messages=grounded_messages(messages or [], chunks))
            if max_prompt_tokens is None or size(grounded) <= max_prompt_tokens:
                return grounded
            chunks = chunks[:-1]
            if not chunks:
                context = f"the model's {context_tokens}-token" if context_tokens else "the"
                bare = Grounded([], prompt=prompt, messages=messages)
                if size(bare) > max_prompt_tokens:  # the sources were not the problem
                    raise InvalidRAGRequest(
                        f"the question alone does not fit {context} context with the "
                        "max_tokens asked for; shorten it or lower max_tokens"
                    )
                raise InvalidRAGRequest(
                    f"no retrieved source fits {context} context next to the question; "
                    "lower max_tokens, ingest shorter chunks ([rag] chunk_max_tokens, "
                    "--max-tokens) or use a longer-context model"
                )
