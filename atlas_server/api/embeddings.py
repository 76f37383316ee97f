"""`POST /v1/embeddings`: sentence embeddings in the OpenAI shape, whatever `[rag]` says.

What it does: embeds a string or a list of strings with the server's sentence embedder
(all-MiniLM-L6-v2 by default; the same object RAG retrieval uses) and answers with float
lists or base64 little-endian float32, and `usage` in the embedder's word pieces. The
embedder loads lazily, on the first request that needs it, and it loads and encodes on a
thread that ends with the call (`compute_threads.py`), never on the event loop or a pool
thread: docs/architecture.md, "One thread runs the model".
What it does not do: store vectors (the RAG routes, retrieval.py).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from litestar import Request, post
from msgspec import Meta

from .errors import APIError, error_responses
from .schemas import NullMeansDefault
from .state import ServerState

NonEmpty = Annotated[str, Meta(min_length=1)]
SLICE = 128  # texts per encode call (sentence-transformers sorts each call's by length)


class EmbeddingsRequest(NullMeansDefault, kw_only=True):
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1, max_length=2048)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None


def default_embedder() -> Any:
    from ..rag.embedding import Embedder

    return Embedder()


class SharedEmbedder:
    """One embedder per server, built on first use by whichever thread needs it first."""

    def __init__(self, factory: Callable[[], Any] = default_embedder) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._embedder: Any = None

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def get(self) -> Any:
        """The embedder, loading it now if needed (blocks: call it off the event loop)."""
        with self._lock:
            if self._embedder is None:
                self._embedder = self._factory()
            return self._embedder


def check_embedding_model(embedder: Any, model: str | None) -> None:
    """A 404, as the generation routes give, unless `model` names the served embedder
    (with or without its organisation: `sentence-transformers/all-MiniLM-L6-v2`)."""
    if model is None or model == embedder.name or model.endswith("/" + embedder.name):
        return
    raise APIError(
        404,
        f"the embedding model {model!r} does not exist; this server embeds with {embedder.name!r}",
        param="model",
        code="model_not_found",
    )


def check_embedding_request(embedder: Any, data: EmbeddingsRequest) -> None:
    """The model and dimensions asked for, checked before any text is embedded."""
    check_embedding_model(embedder, data.model)
    if data.dimensions is not None and data.dimensions != embedder.dim:
        # OpenAI's text-embedding-3 models are trained to be cut short; MiniLM is not, so
        # a shorter vector would be a worse one, not a smaller one of the same quality.
        raise APIError(
            400,
            f"{embedder.name} gives {embedder.dim}-dimensional vectors and cannot shorten "
            f"them; leave dimensions out or send {embedder.dim}",
            param="dimensions",
        )


def check_lengths(embedder: Any, counts: list[int]) -> None:
    """A 400 for a text longer than the embedder reads, as OpenAI answers ("maximum context
    length"): the model would silently embed only its start (two texts differing after it
    got one vector) while usage counted the whole."""
    limit = getattr(embedder, "max_text_pieces", None)
    if limit is None:
        return
    for i, n in enumerate(counts):
        if n > limit:
            raise APIError(
                400,
                f"input[{i}] is {n} word pieces; {embedder.name} reads at most {limit}: "
                "split it (e.g. into the chunks RAG ingest makes) and embed the parts",
                param="input",
            )


@post(
    "/v1/embeddings",
    status_code=200,
    summary="Embed text (OpenAI-compatible)",
    responses=error_responses(400, 401, 404, 413, 503),
)
async def create_embeddings(request: Request, data: EmbeddingsRequest) -> dict[str, Any]:
    state: ServerState = request.app.state.atlas
    texts = [data.input] if isinstance(data.input, str) else data.input

    def embed():  # one fresh thread: loading the embedder (first call) and encoding
        embedder = state.embedder.get()
        check_embedding_request(embedder, data)  # before the work, not after it
        counts = [embedder.count_pieces(t) for t in texts]
        check_lengths(embedder, counts)
        # In slices, each its own call and its own hold of the embedder's lock: a query of
        # a RAG request waits for one slice, not for all 2,048 texts of a big request (it
        # waited 96 s behind one, in the API QA pass).
        parts = [embedder.encode(texts[i : i + SLICE]) for i in range(0, len(texts), SLICE)]
        return embedder, np.concatenate(parts), sum(counts)

    try:
        embedder, vectors, pieces = await state.compute(embed)
    except (ImportError, RuntimeError, OSError) as e:  # no embedder package or model folder
        raise APIError(503, f"the embedder is unavailable: {e}") from None
    if data.encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        rows = [v.tolist() for v in vectors]
    return {
        "object": "list",
        "model": embedder.name,
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "usage": {"prompt_tokens": pieces, "total_tokens": pieces},
    }
