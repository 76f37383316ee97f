"""`atlas rag`: ingest documents into a collection and query it from the command line.

What it does: `atlas rag ingest PATH... --collection NAME [--store NAME] [--data-dir DIR |
--store-url URL]` chunks, embeds and stores files (progress bar; idempotent and resumable;
unusable files are skipped by name and counted), `atlas rag documents --collection NAME`
lists the documents a collection holds (one line per source), and `atlas rag query` shows
what a retriever returns. The default store folder is the one `atlas serve`
uses (one process at a time: while a server holds it, ingest through its HTTP route).
What it does not do: generation.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import fail, user_errors

app = typer.Typer(
    help="Retrieval-augmented generation: ingest and query collections.", no_args_is_help=True
)


def _store(data_dir: Path | None, qdrant_url: str | None, store: str | None, store_url: str | None):
    import os

    from ..plugins import get_plugin_host
    from ..rag.store import DEFAULT_STORE, guarded, open_store

    if data_dir and (qdrant_url or store_url):
        raise typer.BadParameter("give --data-dir or a server URL, not both")
    name = store or ("qdrant" if qdrant_url else DEFAULT_STORE)
    if store_url and name in ("embedded", "faiss"):  # in-process stores: a URL means nothing
        raise typer.BadParameter(
            f"--store-url is for a Qdrant or Milvus server; the {name} store keeps its data in "
            "--data-dir (give --store qdrant or --store milvus with the URL)"
        )
    key = os.environ.get("ATLAS_VECTOR_STORE_API_KEY") or None
    # Guarded: a store method's own exception is one line naming the store and its plugin.
    owner = get_plugin_host().owner("vector_stores", name)
    return guarded(open_store(name, data_dir, store_url or qdrant_url, key), name, owner)


STORE_HELP = "Vector store back end: embedded (default), qdrant, milvus, faiss (docs/rag.md)."
URL_HELP = "A Qdrant or Milvus server for --store qdrant / milvus."
BUILTIN_RETRIEVERS = "atlas-retrievers"  # the entry point of plugins/retrievers.py


def _errors():
    from ..rag.ingest import IngestError
    from ..rag.pipeline import PluginRuntimeError, UnknownComponentError
    from ..rag.store import StoreError

    return user_errors(
        IngestError, StoreError, PluginRuntimeError, UnknownComponentError, RuntimeError
    )


@app.command()
def ingest(
    paths: list[str] = typer.Argument(
        ..., help="Files or folders (.txt .md .markdown .rst .jsonl)."
    ),
    collection: str = typer.Option(..., help="Collection name."),
    data_dir: Path = typer.Option(
        None,
        help="The store's folder (default $ATLAS_HOME/rag/STORE or ~/.local/share/atlas/rag/STORE).",
    ),
    store: str = typer.Option(None, help=STORE_HELP),
    store_url: str = typer.Option(None, help=URL_HELP),
    qdrant_url: str = typer.Option(None, help="Shorthand for --store qdrant --store-url URL."),
    max_tokens: int = typer.Option(
        200, help="Chunk size in embedder word pieces (at most its window less [CLS]/[SEP]: 254)."
    ),
    overlap: int = typer.Option(40, help="Overlap between consecutive chunks, in word pieces."),
    batch_size: int = typer.Option(
        64,
        help="Chunks per embedding call and store write (each 256 read are sorted by length first).",
    ),
    backend: str = typer.Option(
        "auto",
        help="Embedder backend: auto (bf16 where the CPU has it, else fp32), fp32, bf16, int8.",
    ),
    pipeline: bool = typer.Option(
        True, help="Embed on a separate thread while reading, chunking and writing."
    ),
    strict: bool = typer.Option(
        False, help="Exit non-zero if any file had to be skipped (default: only if all were)."
    ),
    source_root: Path = typer.Option(
        None,
        help="Name sources relative to this folder (default: the working folder; a file "
        "outside it by its absolute path). Re-ingest with the same root to add nothing.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Chunk, embed and store documents; re-running adds nothing and resumes a killed run.

    Files that cannot be used (not UTF-8, binary, JSONL without a `text` field) are
    skipped with a message naming them, and counted at the end; the exit status is 1 only
    if no file could be read (or, with --strict, if any was skipped).

    Example: atlas rag ingest docs/ --collection manual --data-dir data/qdrant
    """
    from ..rag.chunking import ChunkSettings
    from ..rag.embedding import BACKENDS, Embedder
    from ..rag.ingest import Corpus
    from ..rag.ingest import ingest as run_ingest
    from ..rag.store import check_name

    if max_tokens < 1 or not 0 <= overlap < max_tokens or batch_size < 1:
        fail("--max-tokens must be >= 1, --overlap in 0..max-tokens-1, --batch-size >= 1")
    if backend not in BACKENDS:
        fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if source_root is not None and not source_root.is_dir():  # one line, not Click's box
        fail(f"--source-root {source_root} is not a folder")
    with _errors():
        check_name(collection)  # before the files are read and the embedder loads
        corpus = Corpus(paths, source_root)
        # The store first: a folder locked by a running server is refused before the
        # embedder spends seconds loading.
        vector_store = _store(data_dir, qdrant_url, store, store_url)
        try:
            embedder = Embedder(backend=backend)
            result = run_ingest(
                vector_store,
                embedder,
                collection,
                corpus,
                ChunkSettings(max_tokens, overlap),
                batch_size=batch_size,
                pipeline=pipeline,
                total_bytes=corpus.total_bytes,
                progress=not quiet,
            )
        finally:
            vector_store.close()
    for skipped in corpus.skipped + corpus.bad_lines:
        typer.echo(f"skipped {skipped.path}: {skipped.reason}", err=True)
    rate = result["embedded"] / max(result["seconds"], 1e-9)
    bad_lines = f", {len(corpus.bad_lines)} with bad lines" if corpus.bad_lines else ""
    typer.echo(
        f"{corpus.files_read} of {len(corpus.files)} files read ({len(corpus.skipped)} "
        f"skipped{bad_lines}); "
        f"{result['chunks']} chunks: {result['embedded']} embedded ({rate:.1f}/s), "
        f"{result['already_stored']} already stored; collection {collection!r} now holds "
        f"{result['total']}"
    )
    if corpus.files_read == 0:
        fail("no file could be ingested (see the skipped files above)")
    if strict and (corpus.skipped or corpus.bad_lines):
        fail(
            f"{len(corpus.skipped)} file(s) skipped, {len(corpus.bad_lines)} with bad lines "
            "(--strict)"
        )


@app.command()
def query(
    text: str = typer.Argument(..., help="The question."),
    collection: str = typer.Option(..., help="Collection name."),
    top_k: int = typer.Option(4, help="Chunks to return (1-100, as over HTTP)."),
    retriever: str = typer.Option(
        None,
        help="Retriever plugin name (atlas plugins lists them; default: --config's [rag] "
        "retriever, else hybrid).",
    ),
    reranker: str = typer.Option(
        None, help="Reranker plugin name (default: --config's [rag] reranker, else none)."
    ),
    data_dir: Path = typer.Option(None, help="The store's folder."),
    store: str = typer.Option(None, help=STORE_HELP),
    store_url: str = typer.Option(None, help=URL_HELP),
    qdrant_url: str = typer.Option(None, help="Shorthand for --store qdrant --store-url URL."),
    config: Path = typer.Option(
        None,
        "--config",
        help="Server config TOML: its \\[rag] store (unless a store flag is given), "
        "store_options, plugin_options, retriever and reranker, as `atlas serve` uses them.",
    ),
) -> None:
    """Show the chunks a retriever returns for a question.

    Example: atlas rag query "How do I open a file?" --collection manual
    """
    from ..config import ConfigFileError, load_config
    from ..plugins import get_plugin_host
    from ..rag.embedding import Embedder
    from ..rag.pipeline import RAGPipeline, check_plugin_options
    from ..rag.store import StoreError, check_name, guarded, store_from_config, store_name
    from ..rag.types import RAGContext

    if not 1 <= top_k <= 100:  # the bounds /v1/retrieve has
        fail(f"--top-k must be in 1..100, got {top_k}")
    if not text.strip():
        fail("the question is empty")
    with user_errors(ConfigFileError, ValueError):
        rag = load_config(config, []).rag if config else None
        options = rag.plugin_options if rag else {}
        retriever = retriever or (rag.retriever if rag else "hybrid")
        reranker = reranker or (rag.reranker if rag else None)
        check_plugin_options(get_plugin_host(), options, retriever, reranker)
    with _errors():
        host = get_plugin_host()
        if rag is not None and not (data_dir or store or store_url or qdrant_url):
            # The server's store, as it opens it, guarded by the name it is registered under.
            name = store_name(rag)[0]
            owner = host.owner("vector_stores", name)
            vector_store = guarded(store_from_config(rag), name, owner)
        else:
            vector_store = _store(data_dir, qdrant_url, store, store_url)
        check_name(collection)
        # Atlas's own retrievers search the store: a collection it lacks is said before the
        # embedder loads. A plugin's retriever may serve collections of its own (plugins.md).
        own = host.owner("retrievers", retriever) == BUILTIN_RETRIEVERS
        if own and not vector_store.exists(collection):
            there = ", ".join(vector_store.collections()) or "none"
            raise StoreError(f"collection {collection!r} does not exist (collections: {there})")
        context = RAGContext(vector_store, Embedder())
        pipeline = RAGPipeline(host, context, options)
        results = pipeline.retrieve(collection, text, top_k, retriever, reranker)
        pipeline.close()  # the retriever's and reranker's close(), as a server's shutdown
        vector_store.close()
    for i, r in enumerate(results, 1):
        heading = f" — {r.chunk.heading}" if r.chunk.heading else ""
        typer.echo(f"[{i}] {r.score:.4f} {r.chunk.source}{heading} [{r.chunk.start}:{r.chunk.end}]")
        typer.echo("    " + r.chunk.text[:200].replace("\n", " "))


@app.command()
def documents(
    collection: str = typer.Option(..., help="Collection name."),
    data_dir: Path = typer.Option(None, help="The store's folder."),
    store: str = typer.Option(None, help=STORE_HELP),
    store_url: str = typer.Option(None, help=URL_HELP),
    qdrant_url: str = typer.Option(None, help="Shorthand for --store qdrant --store-url URL."),
    prefix: str = typer.Option("", help="Only the sources that start with this."),
) -> None:
    """List a collection's documents, one line per source.

    Each line gives the document's chunks, its length in characters and its title, sorted
    by source: what GET /v1/collections/NAME/documents pages through. Reads every chunk of
    the collection once.

    Example: atlas rag documents --collection manual --data-dir data/qdrant
    """
    from ..rag.service import documents_of

    with _errors():
        vector_store = _store(data_dir, qdrant_url, store, store_url)
        try:
            rows = documents_of(vector_store, collection, prefix=prefix)
        finally:
            vector_store.close()
    typer.echo(f"{'chunks':>8} {'characters':>11}  source — title")
    for d in rows:
        title = f" — {d.title}" if d.title else ""
        typer.echo(f"{d.chunks:>8} {d.characters:>11}  {d.source}{title}")
    chunks = sum(d.chunks for d in rows)
    matching = f" under {prefix!r}" if prefix else ""
    typer.echo(
        f"{len(rows)} document{'s' * (len(rows) != 1)}{matching}, {chunks} chunk"
        f"{'s' * (chunks != 1)} (collection {collection!r})"
    )
