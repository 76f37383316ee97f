"""Retrieval pipeline: named retriever -> optional named reranker, with plugin isolation.

What it does: builds retriever and reranker objects lazily from the plugin host's
factories (once per name, with the shared `RAGContext`), runs retrieve + rerank, and
wraps any exception a plugin raises in `PluginRuntimeError` naming the plugin, so the
server answers with a clear error and stays up. What a plugin returns is checked too (a list of well-formed `RetrievedChunk`),
and a malformed result is the returning plugin's `PluginRuntimeError`, not a crash later.
What it does not do: HTTP, prompting or ingestion.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from typing import Any

import msgspec

from ..plugins import PluginHost
from .errors import PluginRuntimeError, UnknownComponentError
from .types import Chunk, RAGContext, RetrievedChunk

__all__ = ["PluginRuntimeError", "RAGPipeline", "UnknownComponentError", "check_plugin_options"]


def check_plugin_options(host: PluginHost, options: dict[str, Any]) -> None:
    """Refuse `[rag.plugin_options.NAME]` tables whose NAME no installed plugin registered
    (a misspelt `mmmr` would leave the reranker on its defaults without a word)."""
    kinds = ("retrievers", "rerankers", "metrics", "vector_stores")
    known = {name for kind in kinds for name in getattr(host, kind)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"rag.plugin_options names {', '.join(map(repr, unknown))}, which no installed "
            f"plugin registered; installed: {', '.join(sorted(known))} (see `atlas plugins`)"
        )


class RAGPipeline:
    def __init__(
        self,
        host: PluginHost,
        ctx: RAGContext,
        plugin_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.host, self.ctx = host, ctx
        self.options = plugin_options or {}
        self._built: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()  # fusion factories build their parts re-entrantly

    def component(self, kind: str, name: str) -> Any:
        registry = getattr(self.host, kind)
        if name not in registry:
            failed = sorted(p.name for p in self.host.plugins.values() if p.error)
            hint = f" (failed to load: {', '.join(failed)}; see `atlas plugins`)" if failed else ""
            raise UnknownComponentError(
                f"no {kind[:-1]} named {name!r}; installed: {', '.join(sorted(registry))}{hint}",
                param=kind[:-1],
            )
        with self._lock:
            key = (kind, name)
            if key not in self._built:
                if kind == "retrievers":
                    # fusion retrievers get the plain ones, built on demand
                    self.ctx.retrievers = _LazyRetrievers(self)
                ctx = dataclasses.replace(self.ctx, options=dict(self.options.get(name, {})))
                try:
                    self._built[key] = registry[name](ctx)
                except (Exception, SystemExit) as e:
                    raise PluginRuntimeError(
                        self.host.owner(kind, name) or "?", kind[:-1], name, e
                    ) from e
            return self._built[key]

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
        candidates_k = top_k * 4 if reranker else top_k
        results = self._run(
            "retrievers", retriever, lambda: r.retrieve(collection, query, candidates_k, filters)
        )
        if reranker:
            rr = self.component("rerankers", reranker)
            results = self._run("rerankers", reranker, lambda: rr.rerank(query, results, top_k))
        return results[:top_k]

    def _run(self, kind: str, name: str, fn) -> list[RetrievedChunk]:
        """fn()'s results, checked; a plugin's exception or malformed result is blamed on it
        here, so neither a later stage nor the HTTP layer trips over it."""
        try:
            return checked_results(fn())
        except (UnknownComponentError, PluginRuntimeError):
            raise
        # SystemExit too: a plugin calling sys.exit() must not take a request (or, outside
        # a request, the server) down with it; KeyboardInterrupt still stops the process.
        except (Exception, SystemExit) as e:
            from .store import StoreError

            if isinstance(e, StoreError):
                raise
            raise PluginRuntimeError(self.host.owner(kind, name) or "?", kind[:-1], name, e) from e


class MalformedResults(TypeError):
    """A retriever or reranker returned something other than a list of RetrievedChunk."""


def checked_results(results: Any) -> list[RetrievedChunk]:
    """`results` as a list of well-formed RetrievedChunk in plain Python types, else raise.

    NumPy's scalars (FAISS scores, say) are numbers too, so they pass, converted: what goes
    on must serialise as JSON. A chunk returned twice keeps its first (best) place.
    """
    if not isinstance(results, list | tuple):
        raise MalformedResults(f"returned {type(results).__name__}, not a list of RetrievedChunk")
    checked, seen = [], set()
    for i, r in enumerate(results):
        if not isinstance(r, RetrievedChunk):
            raise MalformedResults(
                f"result {i} is {type(r).__name__} {r!r:.60}, not a RetrievedChunk"
            )
        if not isinstance(r.chunk, Chunk):
            raise MalformedResults(f"result {i}'s chunk is {type(r.chunk).__name__}, not a Chunk")
        if not isinstance(r.score, numbers.Real) or isinstance(r.score, bool):
            raise MalformedResults(f"result {i}'s score is {r.score!r}, not a number")
        if not math.isfinite(float(r.score)):
            raise MalformedResults(f"result {i}'s score is {r.score!r}, not a finite number")
        c = r.chunk
        if not (isinstance(c.id, str) and isinstance(c.text, str) and isinstance(c.source, str)):
            raise MalformedResults(f"result {i}'s chunk id, text and source must be strings")
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
        chunk = dataclasses.replace(c, start=int(c.start), end=int(c.end), metadata=metadata)
        checked.append(dataclasses.replace(r, chunk=chunk, score=float(r.score)))
    return checked


class _LazyRetrievers(dict):
    def __init__(self, pipeline: RAGPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def __getitem__(self, name: str):
        return self.pipeline.component("retrievers", name)

    def __contains__(self, name: object) -> bool:
        return name in self.pipeline.host.retrievers
