"""The RAG routes and the prompt augmenter, over `atlas_server.rag.service.RAGService`.

What it does: `POST /v1/retrieve`, `GET /v1/collections`, `GET` (a page of its
documents, by source), `POST` (ingest) and `DELETE ?source=...` on
`/v1/collections/{name}/documents`, and `DELETE /v1/collections/{name}` (served when
`[rag] enabled`), and `RAGAugmenter`, the `state.PromptAugmenter` that grounds a completion or
chat request with a `rag` object in retrieved sources and cites them after generation.
Every call into the service runs on a thread that ends with it (`compute_threads.py`:
the embedder and rerankers run PyTorch); the service's errors become HTTP errors in
`errors.rag_error`, the request's `rag.` fields named in `param` (every route that reaches
the store may answer 502, a store plugin's bug, and 503, a store that is unavailable).
What it does not do: retrieval itself (`atlas_server/rag/`), or `/v1/embeddings` and
`/v1/plugins`, which every server has (embeddings.py, system.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post
from litestar.params import Parameter
from msgspec import Meta

from ..rag.errors import RAGError
from ..rag.grounding import extract_citations, given_sources, last_user_text
from ..rag.ingest import Document
from ..rag.service import MAX_DOCUMENTS_PAGE, RAGService
from ..rag.store import metadata_key_problem
from ..rag.types import RetrievedChunk
from .chat import prompt_ids
from .errors import RequestError, error_responses, rag_error
from .schemas import CollectionName, Filters, NullMeansDefault
from .state import Augmentation, ServerState

NonEmpty = Annotated[str, Meta(min_length=1)]


# Atlas's own bodies refuse unknown fields (unlike the OpenAI ones, which ignore client
# extras): a mistyped `filter` or `topk` would otherwise retrieve unfiltered, silently.
class RetrieveRequest(NullMeansDefault, kw_only=True, forbid_unknown_fields=True):
    collection: CollectionName
    query: NonEmpty
    top_k: Annotated[int, Meta(ge=1, le=100)] | None = 4
    retriever: str | None = None
    reranker: str | None = None
    filters: Filters | None = None


MAX_SOURCE = 2048  # characters of a document's source


class DocumentIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: NonEmpty
    # What citations show and filters match: never empty, and short enough for the URL
    # query its DELETE names it in (httpx refuses longer queries, nginx's default is 8 KB).
    source: Annotated[str, Meta(min_length=1, max_length=MAX_SOURCE)]
    title: str | None = None
    # On every chunk of the document; `filters` match its keys (docs/rag.md), so keys at
    # every depth are what a filter can name (`metadata_key_problem`).
    metadata: dict[str, Any] | None = None


class DocumentsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    documents: Annotated[list[DocumentIn], Meta(min_length=1)]


def _state(request: Request) -> ServerState:
    return request.app.state.atlas


def _service(request: Request) -> RAGService:
    return _state(request).rag


class RAGAugmenter:
    """Grounds prompts in retrieved sources (see state.PromptAugmenter)."""

    def __init__(self, state: ServerState, service: RAGService) -> None:
        self.state, self.service = state, service

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
        state, service = self.state, self.service

        def run():
            chunks = service.retrieve(
                rag.collection, query, rag.top_k, rag.retriever, rag.reranker, rag.filters
            )
            return service.ground(
                chunks,
                lambda text: len(state.tokenizer.encode(text)),
                prompt=prompt,
                messages=messages,
                max_prompt_tokens=max_prompt_tokens,
                context_tokens=state.max_model_len,
                # The ids the chat route will feed the model (chat.prompt_ids, with the
                # generation prompt): the contents alone miss the template's tokens.
                count_messages=lambda grounded: len(prompt_ids(state, grounded, True)),
            )

        try:
            grounded = await state.compute(run)
        except RAGError as e:
            raise rag_error(e, prefix="rag.") from None
        return Augmentation(grounded.prompt, grounded.messages, context=grounded.chunks)

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


@post(
    "/v1/retrieve",
    status_code=200,
    summary="Ranked chunks for a query (Atlas)",
    responses=error_responses(400, 401, 404, 413, 502, 503),
)
async def retrieve(request: Request, data: RetrieveRequest) -> dict[str, Any]:
    service = _service(request)
    args = (data.collection, data.query, data.top_k, data.retriever, data.reranker, data.filters)
    chunks = await _state(request).compute(service.retrieve, *args)
    return {
        "object": "list",
        "collection": data.collection,
        "data": [_chunk_json(r, i) for i, r in enumerate(chunks, 1)],
    }


@get(
    "/v1/collections",
    summary="List collections (Atlas)",
    responses=error_responses(401, 502, 503),
)
async def list_collections(request: Request) -> dict[str, Any]:
    rows = await _state(request).compute(_service(request).collections)
    return {"object": "list", "data": [{"name": n, "chunks": count} for n, count in rows]}


@post(
    "/v1/collections/{name:str}/documents",
    status_code=200,
    summary="Ingest documents into a collection (Atlas)",
    responses=error_responses(400, 401, 413, 502, 503),
)
async def add_documents(request: Request, name: str, data: DocumentsRequest) -> dict[str, Any]:
    for i, d in enumerate(data.documents):
        if not d.text.strip():  # it made no chunk, and the 200 said nothing of it
            raise RequestError(
                "the document's text is only whitespace: there is nothing to store",
                param=f"documents[{i}].text",
            )
        problem = metadata_key_problem(d.metadata or {})
        if problem:
            raise RequestError(problem, param=f"documents[{i}].metadata")
    docs = [Document(d.text, d.source, d.title, metadata=d.metadata) for d in data.documents]
    try:
        return await _state(request).compute(_service(request).add_documents, name, docs)
    except RAGError as e:
        raise _named(e) from None


@get(
    "/v1/collections/{name:str}/documents",
    summary="List a collection's documents, by source (Atlas)",
    responses=error_responses(400, 401, 404, 502, 503),
)
async def list_documents(
    request: Request,
    name: str,
    limit: Annotated[
        int,
        Parameter(ge=1, le=MAX_DOCUMENTS_PAGE, description="Documents in the page (1-1000)."),
    ] = 100,
    after: Annotated[
        str | None,
        Parameter(description="The previous page's `last_id`: list the sources after it."),
    ] = None,
    prefix: Annotated[
        str | None, Parameter(description="Only sources that start with this.")
    ] = None,
) -> dict[str, Any]:
    """One row per source, sorted by source, paged as OpenAI's lists are (`after` =
    `last_id`, `has_more`). Every page reads the whole collection (docs/rag.md)."""
    service = _service(request)
    try:
        rows, more = await _state(request).compute(
            service.documents, name, limit, after, prefix or ""
        )
    except RAGError as e:
        raise _named(e) from None
    return {
        "object": "list",
        "collection": name,
        "data": [
            {"source": d.source, "title": d.title, "chunks": d.chunks, "characters": d.characters}
            for d in rows
        ],
        "first_id": rows[0].source if rows else None,
        "last_id": rows[-1].source if rows else None,
        "has_more": more,
    }


@delete(
    "/v1/collections/{name:str}/documents",
    status_code=200,
    summary="Delete documents from a collection by source (Atlas)",
    responses=error_responses(400, 401, 404, 502, 503),
)
async def delete_documents(
    request: Request,
    name: str,
    source: Annotated[list[str] | None, Parameter(query="source")] = None,
) -> dict[str, Any]:
    """Every chunk of each `?source=` given (repeat it for several); `deleted` counts them."""
    if not source or not all(source):
        raise RequestError("give the documents to delete as ?source=NAME (repeatable)", "source")
    try:
        return await _state(request).compute(_service(request).delete_documents, name, source)
    except RAGError as e:
        raise _named(e) from None


@delete(
    "/v1/collections/{name:str}",
    status_code=200,
    summary="Delete a collection (Atlas)",
    responses=error_responses(400, 401, 404, 502, 503),
)
async def delete_collection(request: Request, name: str) -> dict[str, Any]:
    try:
        await _state(request).compute(_service(request).delete_collection, name)
    except RAGError as e:
        raise _named(e) from None
    return {"deleted": name}


def _named(e: RAGError):
    """The collection is the path's `name` on the collection routes."""
    error = rag_error(e)
    if error.param == "collection":
        error.param = "name"
    return error


RAG_ROUTES = [
    retrieve,
    list_collections,
    list_documents,
    add_documents,
    delete_documents,
    delete_collection,
]
