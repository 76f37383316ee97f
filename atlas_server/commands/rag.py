"""`atlas rag`: ingest documents into a collection and query it from the command line.

What it does: `atlas rag ingest PATH... --collection NAME [--data-dir DIR | --qdrant-url URL]`
chunks, embeds and stores files (progress bar; idempotent), and `atlas rag query` shows
what a retriever returns. The data dir is the same embedded Qdrant directory `atlas serve`
uses (one process at a time: while a server holds it, ingest through its HTTP route).
What it does not do: generation.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import user_errors

app = typer.Typer(
    help="Retrieval-augmented generation: ingest and query collections.", no_args_is_help=True
)


def _store(data_dir: Path | None, qdrant_url: str | None):
    from ..rag.store import VectorStore

    if data_dir and qdrant_url:
        raise typer.BadParameter("give --data-dir or --qdrant-url, not both")
    return VectorStore(data_dir, qdrant_url)


def _errors():
    from ..rag.ingest import IngestError
    from ..rag.pipeline import PluginRuntimeError, UnknownComponentError
    from ..rag.store import StoreError

    return user_errors(
        IngestError, StoreError, PluginRuntimeError, UnknownComponentError, RuntimeError
    )


@app.command()
def ingest(
    paths: list[str] = typer.Argument(..., help="Files or folders (.txt .md .rst .jsonl)."),
    collection: str = typer.Option(..., help="Collection name."),
    data_dir: Path = typer.Option(
        None, help="Embedded Qdrant data directory (default ~/.local/share/atlas/qdrant)."
    ),
    qdrant_url: str = typer.Option(None, help="A Qdrant server instead of the embedded store."),
    max_tokens: int = typer.Option(200, help="Chunk size in embedder word pieces (<= 256)."),
    overlap: int = typer.Option(40, help="Overlap between consecutive chunks, in word pieces."),
) -> None:
    """Chunk, embed and store documents; re-running on the same files adds nothing.

    Example: atlas rag ingest docs/ --collection manual --data-dir data/qdrant
    """
    from ..rag.chunking import ChunkSettings
    from ..rag.embedding import Embedder
    from ..rag.ingest import documents_from_paths
    from ..rag.ingest import ingest as run_ingest

    with _errors():
        if not 1 <= max_tokens <= 256 or not 0 <= overlap < max_tokens:
            raise ValueError("--max-tokens must be 1..256 and --overlap smaller than it")
        store = _store(data_dir, qdrant_url)
        result = run_ingest(
            store,
            Embedder(),
            collection,
            documents_from_paths(paths),
            ChunkSettings(max_tokens, overlap),
        )
        store.close()
    typer.echo(
        f"{result['chunks']} chunks processed; collection {collection!r} now holds {result['total']}"
    )


@app.command()
def query(
    text: str = typer.Argument(..., help="The question."),
    collection: str = typer.Option(..., help="Collection name."),
    top_k: int = typer.Option(4, help="Chunks to return."),
    retriever: str = typer.Option(
        "hybrid", help="Retriever plugin name (atlas plugins lists them)."
    ),
    reranker: str = typer.Option(None, help="Reranker plugin name."),
    data_dir: Path = typer.Option(None, help="Embedded Qdrant data directory."),
    qdrant_url: str = typer.Option(None, help="A Qdrant server instead of the embedded store."),
) -> None:
    """Show the chunks a retriever returns for a question.

    Example: atlas rag query "How do I open a file?" --collection manual
    """
    from ..plugins import get_plugin_host
    from ..rag.embedding import Embedder
    from ..rag.pipeline import RAGPipeline
    from ..rag.types import RAGContext

    with _errors():
        store = _store(data_dir, qdrant_url)
        pipeline = RAGPipeline(get_plugin_host(), RAGContext(store, Embedder()))
        results = pipeline.retrieve(collection, text, top_k, retriever, reranker)
        store.close()
    for i, r in enumerate(results, 1):
        heading = f" — {r.chunk.heading}" if r.chunk.heading else ""
        typer.echo(f"[{i}] {r.score:.4f} {r.chunk.source}{heading} [{r.chunk.start}:{r.chunk.end}]")
        typer.echo("    " + r.chunk.text[:200].replace("\n", " "))
