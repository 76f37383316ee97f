"""Ingestion: files -> chunks -> embeddings -> the vector store, idempotently.

What it does: reads text, Markdown, reST (and .py/.txt as plain text) files and JSONL
records (`text` field, optional `source`/`title`), chunks them (see `chunking.py`), embeds
in batches and upserts by content-derived id, so re-ingesting the same files changes
nothing and an ingest interrupted midway, run again, ends in the same state as one clean
run (already stored chunks are simply overwritten with identical points).
What it does not do: delete chunks of files that changed (ids of old spans remain; delete
and re-create the collection to rebuild it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .chunking import ChunkSettings, chunk_text
from .types import Chunk

SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".jsonl")


@dataclass
class Document:
    text: str
    source: str
    title: str | None = None


class IngestError(ValueError):
    pass


def documents_from_paths(paths: list[str]) -> Iterator[Document]:
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise IngestError(f"no such file or folder: {item}")
    if not files:
        raise IngestError(f"no {', '.join(SUFFIXES)} files under {', '.join(paths)}")
    for f in files:
        if f.suffix.lower() == ".jsonl":
            with f.open(encoding="utf-8") as handle:
                for n, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise IngestError(
                            f"{f}:{n}: expected a JSON object with a `text` field"
                        ) from None
                    yield Document(
                        text, str(record.get("source") or f"{f}#{n}"), record.get("title")
                    )
        else:
            yield Document(f.read_text(encoding="utf-8", errors="replace"), str(f), f.stem)


def chunk_documents(docs, count, settings: ChunkSettings) -> Iterator[Chunk]:
    for doc in docs:
        yield from chunk_text(doc.text, doc.source, count, settings, title=doc.title)


def ingest(
    store,
    embedder,
    collection: str,
    docs,
    settings: ChunkSettings = ChunkSettings(),
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Store every chunk of `docs`; returns counts (chunks seen, collection size after)."""
    store.ensure_collection(collection, embedder.dim)
    bar = tqdm(desc=f"ingesting into {collection}", unit="chunk", disable=not progress)
    batch: list[Chunk] = []
    seen = 0

    def flush() -> None:
        if batch:
            store.upsert(collection, batch, embedder.encode([c.text for c in batch]))
            bar.update(len(batch))
            batch.clear()

    for chunk in chunk_documents(docs, embedder.count_pieces, settings):
        batch.append(chunk)
        seen += 1
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    return {"collection": collection, "chunks": seen, "total": store.count(collection)}
