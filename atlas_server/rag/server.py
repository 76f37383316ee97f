"""RAG inside `atlas serve`: the prompt augmenter and the RAG/plugin routes.

What it does: `rag_extensions(state)` returns what `create_app` plugs in — the routes
`POST /v1/embeddings` (OpenAI shape), `POST /v1/retrieve`, `GET /v1/collections`,
`POST /v1/collections/{name}/documents`, `DELETE /v1/collections/{name}`,
`GET /v1/plugins` — and a `PromptAugmenter` that retrieves for a request's `rag` object,
adds numbered sources to the prompt (or a system message for chat) and, after generation,
returns `citations` (the sources the answer cites) and `sources` (every source given). The embedder and the vector store open lazily on first use, so a
server that never sees a RAG request never locks a Qdrant data directory or loads MiniLM.
Retrieval runs in a worker thread, off the event loop.
What it does not do: generation (the engine) or chunking details (see `chunking.py`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, delete, get, post
from msgspec import Meta

from ..api.errors import APIError, RequestError, error_responses
from ..api.schemas import CollectionName, Filters
from ..api.state import Augmentation, ServerState
from ..compute_threads import run_in_fresh_thread
from ..engine.types import SamplingParams
from ..plugins import PluginHost, get_plugin_host
from .chunking import ChunkSettings
from .grounding import (
    extract_citations,
    given_sources,
    grounded_messages,
    grounded_prompt,
    last_user_text,
)
from .ingest import Document, ingest
from .pipeline import PluginRuntimeError, RAGPipeline, UnknownComponentError
from .store import StoreError, VectorStore, store_from_config
from .types import RAGContext, RetrievedChunk

NonEmpty = Annotated[str, Meta(min_length=1)]


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1, max_length=2048)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class RetrieveRequest(msgspec.Struct, kw_only=True):
    collection: CollectionName
    query: NonEmpty
    top_k: Annotated[int, Meta(ge=1, le=100)] = 4
    retriever: str | None = None
    reranker: str | None = None
    filters: Filters | None = None


class DocumentIn(msgspec.Struct, kw_only=True):
    text: str
    source: str
    title: str | None = None


class DocumentsRequest(msgspec.Struct, kw_only=True):
    documents: Annotated[list[DocumentIn], Meta(min_length=1)]


def check_collection_name(name: str, param: str) -> None:
    """Refuse, as a 400, a name the store cannot hold (before any plugin sees it)."""
    if not 0 < len(name) <= 255 or not name.replace("-", "").replace("_", "").isalnum():
        raise RequestError(
            f"collection names are 1-255 letters, digits, - and _; got {name[:80]!r}", param=param
        )


class RAGService:
    """Lazily opened store + embedder + pipeline, shared by the routes and the augmenter."""

    def __init__(self, state: ServerState, host: PluginHost) -> None:
        self.state, self.host = state, host
        self._lock = threading.Lock()
        self._store = self._embedder = self._pipeline = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _open(self) -> RAGPipeline:
        with self._lock:
            if self._pipeline is None:
                from .embedding import Embedder

                cfg = self.state.config.rag
                self._store = store_from_config(cfg)
                self._embedder = Embedder()
                ctx = RAGContext(self._store, self._embedder, self._score_text)
                self._pipeline = RAGPipeline(self.host, ctx)
            return self._pipeline

    @property
    def store(self) -> VectorStore:
        self._open()
        return self._store

    @property
    def embedder(self):
        self._open()
        return self._embedder

    def _score_text(self, prefix: str, text: str) -> float:
        """Mean log p(text | prefix) under the served model (runs the engine from a worker thread)."""
        state = self.state
        tok = state.tokenizer
        prefix_ids, text_ids = tok.encode(prefix), tok.encode(text)
        room = state.max_model_len - 1 - len(text_ids)
        ids = prefix_ids[-room:] + text_ids

        async def score() -> float:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            logprobs = None
            async for event in state.engine.submit(ids, params):
                if event.prompt_logprobs is not None:
                    logprobs = event.prompt_logprobs
            tail = [e.logprob for e in logprobs[-len(text_ids) :] if e is not None]
            return sum(tail) / max(1, len(tail))

        return asyncio.run_coroutine_threadsafe(score(), self.loop).result(timeout=120)

    def retrieve(
        self, collection, query, top_k, retriever, reranker, filters
    ) -> list[RetrievedChunk]:
        cfg = self.state.config.rag
        return self._open().retrieve(
            collection,
            query,
            top_k or cfg.top_k,
            retriever or cfg.retriever,
            reranker if reranker is not None else cfg.reranker,
            filters,
        )

    async def retrieve_async(
        self, collection, query, top_k, retriever, reranker, filters, field="collection"
    ) -> list[RetrievedChunk]:
        """retrieve() off the event loop; bad input and failures become API errors, the
        collection's named as `field` (the request's own name for it)."""
        check_collection_name(collection, field)
        if not query.strip():
            raise RequestError("the query must not be empty", param="query")
        for key, value in (filters or {}).items():
            if isinstance(value, list) and len({type(v) for v in value}) > 1:
                raise RequestError(
                    f"filter {key!r}: a list of values holds strings or integers, not both",
                    param=field.replace("collection", "filters"),
                )
        self.loop = asyncio.get_running_loop()
        args = (collection, query, top_k, retriever, reranker, filters)
        try:
            return await run_in_fresh_thread(self.retrieve, *args)
        except UnknownComponentError as e:
            raise RequestError(str(e), param="rag") from None
        except StoreError as e:
            raise RequestError(str(e), param=field, code="collection_error") from None
        except PluginRuntimeError as e:
            raise APIError(502, str(e), code="plugin_error") from None


class RAGAugmenter:
    def __init__(self, service: RAGService) -> None:
        self.service = service

    async def augment(
        self,
        rag,
        prompt: str | None,
        messages: list[dict] | None,
        max_prompt_tokens: int | None = None,
    ) -> Augmentation:
        query = prompt if prompt is not None else last_user_text(messages or [])
        if not query.strip():
            raise RequestError(
                "rag needs a non-empty question (the prompt or the last user message)", param="rag"
            )
        chunks = await self.service.retrieve_async(
            rag.collection,
            query,
            rag.top_k,
            rag.retriever,
            rag.reranker,
            rag.filters,
            field="rag.collection",
        )
        tokenizer = self.service.state.tokenizer
        # Drop the lowest-ranked sources until the grounded prompt fits the context.
        while True:
            if prompt is not None:
                augmented = Augmentation(prompt=grounded_prompt(prompt, chunks), context=chunks)
                text = augmented.prompt
            else:
                augmented = Augmentation(
                    messages=grounded_messages(messages or [], chunks), context=chunks
                )
                text = " ".join(str(m.get("content") or "") for m in augmented.messages)
            if (
                max_prompt_tokens is None
                or not chunks
                or len(tokenizer.encode(text)) <= max_prompt_tokens
            ):
                break
            chunks = chunks[:-1]
        if not chunks:
            raise RequestError(
                f"no retrieved source fits the model's {self.service.state.max_model_len}-token "
                "context next to the question; lower max_tokens or use a longer-context model",
                param="rag",
            )
        return augmented

    def citations(self, augmentation: Augmentation, text: str) -> tuple[list[dict[str, Any]], int]:
        return extract_citations(text, augmentation.context)

    def sources(self, augmentation: Augmentation) -> list[dict[str, Any]]:
        return given_sources(augmentation.context)


def _chunk_json(r: RetrievedChunk, rank: int) -> dict[str, Any]:
    c = r.chunk
    return {
        "rank": rank,
        "id": c.id,
        "score": r.score,
        "retriever": r.retriever,
        "text": c.text,
        "source": c.source,
        "heading": c.heading,
        "span": [c.start, c.end],
        "metadata": c.metadata,
    }


def rag_extensions(state: ServerState, host: PluginHost | None = None) -> dict[str, Any]:
    host = host or get_plugin_host()
    service = RAGService(state, host)

    @post(
        "/v1/embeddings",
        status_code=200,
        summary="Embed text (OpenAI-compatible)",
        responses=error_responses(400, 401, 413),
    )
    async def embeddings(data: EmbeddingsRequest) -> dict[str, Any]:
        texts = [data.input] if isinstance(data.input, str) else data.input

        def embed():  # one thread: opening the embedder (first call) and encoding
            return service.embedder, service.embedder.encode(texts)

        embedder, vectors = await run_in_fresh_thread(embed)
        if data.encoding_format == "base64":
            import base64

            rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            rows = [v.tolist() for v in vectors]
        pieces = sum(embedder.count_pieces(t) for t in texts)
        return {
            "object": "list",
            "model": embedder.name,
            "data": [
                {"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)
            ],
            "usage": {"prompt_tokens": pieces, "total_tokens": pieces},
        }

    @post(
        "/v1/retrieve",
        status_code=200,
        summary="Ranked chunks for a query (Atlas)",
        responses=error_responses(400, 401, 413, 502),
    )
    async def retrieve(data: RetrieveRequest) -> dict[str, Any]:
        chunks = await service.retrieve_async(
            data.collection, data.query, data.top_k, data.retriever, data.reranker, data.filters
        )
        return {
            "object": "list",
            "collection": data.collection,
            "data": [_chunk_json(r, i) for i, r in enumerate(chunks, 1)],
        }

    @get("/v1/collections", summary="List collections (Atlas)", responses=error_responses(401))
    async def list_collections() -> dict[str, Any]:
        store = await run_in_fresh_thread(lambda: service.store)
        names = store.collections()
        return {"object": "list", "data": [{"name": n, "chunks": store.count(n)} for n in names]}

    @post(
        "/v1/collections/{name:str}/documents",
        status_code=200,
        summary="Ingest documents into a collection (Atlas)",
        responses=error_responses(400, 401, 413),
    )
    async def add_documents(name: str, data: DocumentsRequest) -> dict[str, Any]:
        check_collection_name(name, "name")
        docs = [Document(d.text, d.source, d.title) for d in data.documents]

        def run() -> dict:
            return ingest(
                service.store, service.embedder, name, docs, ChunkSettings(), progress=False
            )

        return await run_in_fresh_thread(run)

    @delete(
        "/v1/collections/{name:str}",
        status_code=200,
        summary="Delete a collection (Atlas)",
        responses=error_responses(401, 404),
    )
    async def delete_collection(name: str) -> dict[str, Any]:
        store = await run_in_fresh_thread(lambda: service.store)
        if not store.exists(name):
            raise APIError(404, f"collection {name!r} does not exist", param="name")
        store.delete_collection(name)
        return {"deleted": name}

    @get(
        "/v1/plugins",
        summary="Installed plugins and what they registered (Atlas)",
        responses=error_responses(401),
    )
    async def plugins(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": host.describe()}

    handlers = [embeddings, retrieve, list_collections, add_documents, delete_collection, plugins]
    return {"extra_handlers": handlers, "augmenter": RAGAugmenter(service), "plugin_host": host}
