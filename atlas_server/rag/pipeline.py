"""Retrieval pipeline: named retriever -> optional named reranker, with plugin isolation.

What it does: builds retriever and reranker objects lazily from the plugin host's
factories (once per name, with the shared `RAGContext`), runs retrieve + rerank, and
wraps any exception a plugin raises in `PluginRuntimeError` naming the plugin, so the
server answers with a clear error and stays up.
What it does not do: HTTP, prompting or ingestion.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ..plugins import PluginHost
from .errors import PluginRuntimeError, UnknownComponentError
from .types import RAGContext, RetrievedChunk

__all__ = ["PluginRuntimeError", "RAGPipeline", "UnknownComponentError"]


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
            raise UnknownComponentError(
                f"no {kind[:-1]} named {name!r}; installed: {', '.join(sorted(registry))}",
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
                except Exception as e:
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
        return list(results)[:top_k]

    def _run(self, kind: str, name: str, fn):
        try:
            return fn()
        except (UnknownComponentError, PluginRuntimeError):
            raise
        except Exception as e:
            from .store import StoreError

            if isinstance(e, StoreError):
                raise
            raise PluginRuntimeError(self.host.owner(kind, name) or "?", kind[:-1], name, e) from e


class _LazyRetrievers(dict):
    def __init__(self, pipeline: RAGPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def __getitem__(self, name: str):
        return self.pipeline.component("retrievers", name)

    def __contains__(self, name: object) -> bool:
        return name in self.pipeline.host.retrievers
