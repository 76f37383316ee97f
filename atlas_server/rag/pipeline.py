"""Retrieval pipeline: named retriever -> optional named reranker, with plugin isolation.

What it does: builds retriever and reranker objects lazily from the plugin host's
factories (once per name, with the shared `RAGContext`), calls a built object's optional
`warm_up()` before its first use and its optional `close()` at `close()` (each once per
object; one that fails to warm up is closed and dropped, its failure the plugin's, as a
factory's is, and built again by the next request), runs retrieve + rerank (the
retriever is asked for `top_k * 4` candidates when a reranker follows), and wraps any
exception a plugin raises in `PluginRuntimeError` naming the plugin, so the server
answers with a clear error and stays up. The store's and the embedder's own failures
(`StoreError`, `VectorStoreUnavailable`) pass through a plugin's call unblamed. What a
plugin returns is checked too (a list of well-formed `RetrievedChunk`: non-empty id,
text and source, a finite score, a `vector` that is None or the embedder's, a reranker's
chunks among its candidates), and a malformed result is the returning plugin's
`PluginRuntimeError`, not a crash later. What it does not do: HTTP, prompting or
ingestion; nor does it check that results are sorted (the contract asks for best first).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from ..plugins import PluginHost
from .errors import (
    InvalidRAGRequest,
    PluginRuntimeError,
    UnknownComponentError,
    VectorStoreUnavailable,
)
from .store import StoreError, VectorStore, guarded, options_attribute_problem
from .types import Chunk, RAGContext, RetrievedChunk

__all__ = ["PluginRuntimeError", "RAGPipeline", "UnknownComponentError", "check_plugin_options"]
log = logging.getLogger("atlas.rag")

RERANK_CANDIDATES = 4  # a reranker gets top_k * this many candidates (400 at top_k 100)
VECTOR_NORM_TOLERANCE = 0.01  # |L2 norm - 1| a RetrievedChunk.vector may be off by


def check_plugin_options(
    host: PluginHost,
    options: dict[str, Any],
    retriever: str | None = None,
    reranker: str | None = None,
) -> None:
    """Refuse the RAG settings that would be ignored or fail on every request, before a
    server starts: `[rag.plugin_options.NAME]` tables whose NAME is no installed retriever
    or reranker (a misspelt `mmmr` would leave the reranker on its defaults without a word;
    metrics and vector stores take no such table), keys a component's factory does not
    list in its `options` attribute (when it has one: `lamda` for mmr's `lambda`), and a
    default `retriever` or `reranker` that no plugin registered."""
    components = {**host.retrievers, **host.rerankers}
    for kind, name in (("retriever", retriever), ("reranker", reranker)):
        registry = getattr(host, f"{kind}s")
        if name is not None and name not in registry:
            raise ValueError(
                f"rag.{kind} {name!r} is not registered by any installed plugin"
                f"{host.disabled_hint()}; installed {kind}s: "
                f"{', '.join(sorted(registry)) or 'none'} (see `atlas plugins`)"
            )
    for name in sorted(options):
        if name in components:
            continue
        if name in host.metrics or name in host.vector_stores:
            what = "a metric" if name in host.metrics else "a vector store (see rag.store_options)"
            raise ValueError(
                f"rag.plugin_options.{name}: {name!r} is {what}; these tables configure "
                "retrievers and rerankers"
            )
        raise ValueError(
            f"rag.plugin_options names {name!r}, which no installed plugin registered as a "
            f"retriever or reranker; installed: {', '.join(sorted(components))} "
            "(see `atlas plugins`)"
        )
    for name, table in options.items():
        reads = getattr(components[name], "options", None)
        problem = options_attribute_problem(reads) if reads is not None else None
        if problem:  # the plugin's slip, named, rather than keys "m", "o", ... accepted
            kind = "retrievers" if name in host.retrievers else "rerankers"
            raise ValueError(
                f"rag.plugin_options.{name}: {name!r} (plugin "
                f"{host.owner(kind, name) or '?'!r}) cannot be configured: {problem}"
            )
        unread = sorted(set(table) - set(reads)) if reads is not None else []
        if unread:
            listed = ", ".join(map(repr, reads)) if reads else "no options"
            raise ValueError(
                f"rag.plugin_options.{name} sets {', '.join(map(repr, unread))}, which "
                f"{name!r} does not read; it reads {listed}"
            )


class RAGPipeline:
    def __init__(
        self,
        host: PluginHost,
        ctx: RAGContext,
        plugin_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if isinstance(ctx.store, VectorStore):  # a raw store a caller built: guard it here
            # too, so a store's bug is the store's, as in the server and `atlas rag` (which
            # guard by the registered name; here only the class's `name` is known)
            name = ctx.store.name
            store = guarded(ctx.store, name, host.owner("vector_stores", name))
            ctx = dataclasses.replace(ctx, store=store)
        self.host, self.ctx = host, ctx
        self.options = plugin_options or {}
        self._built: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()  # fusion factories build their parts re-entrantly

    def component(self, kind: str, name: str) -> Any:
        registry = getattr(self.host, kind)
        if name not in registry:
            failed = sorted(p.name for p in self.host.plugins.values() if p.error)
            hint = (
                f" (failed to load or to register: {', '.join(failed)}; see `atlas plugins`)"
                if failed
                else ""
            )
            raise UnknownComponentError(
                f"no {kind[:-1]} named {name!r}; installed: {', '.join(sorted(registry))}{hint}"
                f"{self.host.disabled_hint()}",
                param=kind[:-1],
            )
        with self._lock:
            key = (kind, name)
            if key not in self._built:
                if kind == "retrievers":
                    # fusion retrievers get the plain ones, built on demand
                    self.ctx.retrievers = _LazyRetrievers(self)
                ctx = dataclasses.replace(self.ctx, options=dict(self.options.get(name, {})))
                built, method = None, None
                try:
                    built = registry[name](ctx)
                    # An object a factory hands out again (a shared client) is warmed once.
                    if not any(built is other for other in self._built.values()):
                        method = "warm_up"
                        _plain_call(built, "warm_up")
                except (Exception, SystemExit, KeyboardInterrupt) as e:
                    if method is not None:  # what its warm_up half opened, closed now
                        self._close(kind, name, built)
                    # The plugin says the request asked amiss (a 400); the store's or
                    # embedder's failure, from a factory that used them, is theirs.
                    if isinstance(e, InvalidRAGRequest | StoreError | VectorStoreUnavailable):
                        raise
                    if _a_real_ctrl_c(e):
                        raise
                    raise PluginRuntimeError(
                        self.host.owner(kind, name) or "?", kind[:-1], name, e, method
                    ) from e
                self._built[key] = built
            return self._built[key]

    def close(self) -> None:
        """Call `close()` on every object built, the last built first (a fusion retriever
        before the parts it holds), once each; one that raises is logged, naming its
        plugin, and the others are closed all the same."""
        with self._lock:
            built, self._built = list(self._built.items()), {}
        closed: list[Any] = []
        for (kind, name), component in reversed(built):
            if not any(component is other for other in closed):
                closed.append(component)
                self._close(kind, name, component)

    def _close(self, kind: str, name: str, component: Any) -> None:
        try:
            _plain_call(component, "close")
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            if _a_real_ctrl_c(e):
                raise
            log.error(
                "%s %r (plugin %r) failed in close(): %s: %s",
                kind[:-1], name, self.host.owner(kind, name) or "?", type(e).__name__, e,
                exc_info=e,
            )  # fmt: skip

    def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int,
        retriever: str,
        reranker: str | None = None,
        filters: dict | None = None,
    ) -> list[RetrievedChunk]:
        r = self.component("retrievers", retriever)
        candidates_k = top_k * RERANK_CANDIDATES if reranker else top_k
        results = self._run(
            "retrievers", retriever, lambda: r.retrieve(collection, query, candidates_k, filters)
        )
        if reranker:
            rr = self.component("rerankers", reranker)
            given = {c.chunk.id for c in results}
            results = self._run(
                "rerankers", reranker, lambda: rr.rerank(query, results, top_k), given
            )
        return results[:top_k]

    def _run(self, kind: str, name: str, fn, candidates: set[str] | None = None):
        """fn()'s results, checked; a plugin's exception or malformed result is blamed on it
        here, so neither a later stage nor the HTTP layer trips over it."""
        try:
            return checked_results(fn(), self._embedder_dim, candidates)
        # InvalidRAGRequest is how a plugin says the request asks what it cannot do (filters
        # it cannot apply): the client's 400, naming the field, not the plugin's failure.
        # The store's failures (StoreError; StorePluginError for its bugs) and a store or
        # embedder that cannot open (VectorStoreUnavailable) are theirs, not the caller's.
        except (
            UnknownComponentError,
            PluginRuntimeError,
            InvalidRAGRequest,
            StoreError,
            VectorStoreUnavailable,
        ):
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            if _a_real_ctrl_c(e):
                raise
            raise PluginRuntimeError(self.host.owner(kind, name) or "?", kind[:-1], name, e) from e

    def _embedder_dim(self) -> int | None:
        """The embedder's dimension, which a result's `vector` must have (None: unknown).
        Asked only when a result carries a vector: it loads the embedder."""
        dim = getattr(self.ctx.embedder, "dim", None)
        return int(dim) if isinstance(dim, numbers.Integral) else None


def _plain_call(component: Any, method: str) -> None:
    """Call `component.method()` if it has one. An `async def` one is not awaited (as
    `retrieve` is not): its coroutine is closed and refused, so the plugin hears why."""
    call = getattr(component, method, None)
    if call is None:
        return
    result = call()
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # no "never awaited" warning on top of this error
        raise TypeError(f"{method}() is async; Atlas calls it without awaiting: make it plain")


def _a_real_ctrl_c(e: BaseException) -> bool:
    """A KeyboardInterrupt on the main thread (the CLI's Ctrl-C) stops the process; raised
    on a server's worker thread it is plugin code's own doing (signals reach only the main
    thread), and, like sys.exit() there, must not take the request or the server down."""
    return (
        isinstance(e, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()
    )


class MalformedResults(TypeError):
    """A retriever or reranker returned something other than a list of RetrievedChunk."""


def checked_results(
    results: Any,
    dim: int | Callable[[], int | None] | None = None,
    candidates: set[str] | None = None,
) -> list[RetrievedChunk]:
    """`results` as a list of well-formed RetrievedChunk in plain Python types, else raise.

    NumPy's scalars (FAISS scores, say) are numbers too, so they pass, converted: what goes
    on must serialise as JSON. A chunk returned twice keeps its first (best) place. A
    `vector` is None or the embedder's output (`_checked_vector`; `dim`, or `dim()` asked
    on the first vector, is its dimension when known); it comes out as a float32 array.
    With `candidates` (a reranker's), every chunk id must be one of them.
    """
    if not isinstance(results, list | tuple):
        raise MalformedResults(f"returned {type(results).__name__}, not a list of RetrievedChunk")
    want: list[int | None] = []  # the dimension, once asked

    def dimension() -> int | None:
        if not want:
            want.append(dim() if callable(dim) else dim)
        return want[0]

    checked, seen = [], set()
    for i, r in enumerate(results):
        if not isinstance(r, RetrievedChunk):
            raise MalformedResults(
                f"result {i} is {type(r).__name__} {r!r:.60}, not a RetrievedChunk"
            )
        if not isinstance(r.chunk, Chunk):
            raise MalformedResults(f"result {i}'s chunk is {type(r.chunk).__name__}, not a Chunk")
        if not isinstance(r.score, numbers.Real) or isinstance(r.score, bool):
            raise MalformedResults(f"result {i}'s score is {r.score!r:.60}, not a number")
        try:
            score = float(r.score)
        except OverflowError:  # an int beyond float's range (10**400)
            score = math.inf
        if not math.isfinite(score):
            raise MalformedResults(f"result {i}'s score is {r.score!r:.60}, not a finite number")
        c = r.chunk
        if not all(isinstance(x, str) and x for x in (c.id, c.text, c.source)):
            # an empty one would be cited, shown or deduplicated as if it were a passage
            raise MalformedResults(
                f"result {i}'s chunk id, text and source must be non-empty strings"
            )
        if candidates is not None and c.id not in candidates:
            raise MalformedResults(
                f"result {i} (chunk {c.id!r:.60}) was not among the candidates it was given: "
                "a reranker returns some of its candidates, reordered"
            )
        if not (c.heading is None or isinstance(c.heading, str)):
            raise MalformedResults(f"result {i}'s chunk heading is {c.heading!r}, not a string")
        if (
            not all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool)
                for x in (c.start, c.end)
            )
            or not 0 <= c.start <= c.end
        ):
            raise MalformedResults(
                f"result {i}'s chunk span [{c.start!r}, {c.end!r}) must be integers with "
                "0 <= start <= end"
            )
        if not isinstance(c.metadata, dict):
            raise MalformedResults(f"result {i}'s chunk metadata is not a dict")
        try:
            metadata = msgspec.json.decode(msgspec.json.encode(c.metadata))
        except (TypeError, ValueError, msgspec.MsgspecError) as e:
            raise MalformedResults(f"result {i}'s chunk metadata is not JSON: {e}") from None
        if c.id in seen:
            continue
        seen.add(c.id)
        vector = None if r.vector is None else _checked_vector(i, r.vector, dimension())
        chunk = dataclasses.replace(c, start=int(c.start), end=int(c.end), metadata=metadata)
        checked.append(dataclasses.replace(r, chunk=chunk, score=score, vector=vector))
    return checked


def _checked_vector(i: int, vector: Any, dim: int | None) -> np.ndarray:
    """A result's `vector` as float32 [dim], else raise: what `mmr` and other rerankers
    compare with the query's embedding, so it must be Atlas's embedder output for the
    passage (L2-normalised; norm checked within VECTOR_NORM_TOLERANCE), not an embedding
    of the plugin's own model, which would fail or mislead there, blamed on the reranker."""
    try:
        v = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise MalformedResults(
            f"result {i}'s vector is {type(vector).__name__} {vector!r:.40}, not an array of "
            "floats; give the embedder's vector of the passage, or None"
        ) from None
    if v.ndim != 1 or (dim is not None and v.shape[0] != dim):
        shape = "x".join(map(str, v.shape)) or "a scalar"
        expected = f"the embedder's {dim}" if dim is not None else "a vector's"
        raise MalformedResults(
            f"result {i}'s vector has shape {shape}, not {expected} dimensions; give Atlas's "
            "embedder output for the passage, or None"
        )
    if not np.isfinite(v).all():
        raise MalformedResults(f"result {i}'s vector holds NaN or infinity")
    norm = float(np.linalg.norm(v))
    if abs(norm - 1.0) > VECTOR_NORM_TOLERANCE:
        raise MalformedResults(
            f"result {i}'s vector has L2 norm {norm:.4g}, not 1: give the embedder's "
            "(normalised) vector of the passage, or None"
        )
    return v


class _LazyRetrievers(dict):
    def __init__(self, pipeline: RAGPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def __getitem__(self, name: str):
        return self.pipeline.component("retrievers", name)

    def __contains__(self, name: object) -> bool:
        return name in self.pipeline.host.retrievers
