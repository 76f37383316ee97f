"""The errors of the RAG service, for whoever calls it to present.

What it does: names each way a retrieval or collection request can fail, with the request
field it concerns (`param`: "collection", "query", "filters", "retriever", "reranker", or
None for the request as a whole) so a caller can point at it. The HTTP layer maps them to
statuses and OpenAI error bodies (`atlas_server/api/errors.py`), the CLI to one-line
messages. What it does not do: decide statuses or print anything.
"""

from __future__ import annotations


class RAGError(Exception):
    """Base class; `param` names the request field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRAGRequest(RAGError, ValueError):
    """The request cannot be served as asked (a bad collection name, an empty query, ...)."""


class CollectionNotFound(RAGError, LookupError):
    """The named collection does not exist."""


class UnknownComponentError(RAGError, LookupError):
    """No retriever or reranker is registered under the name asked for."""


class PluginRuntimeError(RAGError, RuntimeError):
    """A plugin failed while serving; `.plugin` names it, `__cause__` is its exception,
    `.method` the lifecycle method that raised ("warm_up"), if one did."""

    def __init__(
        self, plugin: str, kind: str, name: str, error: BaseException, method: str | None = None
    ) -> None:
        where = f" in {method}()" if method else ""
        super().__init__(
            f"{kind} {name!r} (plugin {plugin!r}) failed{where}: {type(error).__name__}: {error}"
        )
        self.plugin, self.kind, self.name, self.method = plugin, kind, name, method


class VectorStoreUnavailable(RAGError):
    """The vector store cannot be used now (its data directory is locked, a server is down)."""
