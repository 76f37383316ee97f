"""Today's ingest path, frozen: the chunker and ingest loop of commit 467e516, for baselines.

What it does: reproduces `atlas rag ingest` as it was before the ingest rewrite — the
chunker that re-counts every growing span with the tokenizer (`count_pieces` through the
Python tokenizer call), and the loop that embeds 64 chunks per call and upserts them
sequentially, with no resume check — so `bench_ingest.py` can measure the new path
against it in the same run, and tests can check the new chunker cuts the same chunks.
What it does not do: anything the product uses; do not import it outside bench/ and tests/.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from atlas_server.rag.chunking import ChunkSettings, chunk_id, sections, sentences
from atlas_server.rag.types import Chunk


def old_count_pieces(embedder) -> Callable[[str], int]:
    """The word-piece counter as it was: the tokenizer's Python call, per text."""
    tokenizer = embedder.model.tokenizer
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split_long(
    text: str, a: int, b: int, count: Callable[[str], int], limit: int
) -> list[tuple[int, int]]:
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[a:b])]
    pieces, first = [], 0
    while first < len(words):
        last = first + 1
        while last < len(words) and count(text[a + words[first][0] : a + words[last][1]]) <= limit:
            last += 1
        pieces.append((a + words[first][0], a + words[last - 1][1]))
        first = last
    return pieces


def chunk_text(
    text: str,
    source: str,
    count: Callable[[str], int],
    settings: ChunkSettings,
    title: str | None = None,
    metadata: dict | None = None,
) -> list[Chunk]:
    chunks: list[Chunk] = []
    for heading, s_start, s_end in sections(text):
        units: list[tuple[int, int]] = []
        for a, b in sentences(text, s_start, s_end):
            if count(text[a:b]) > settings.max_tokens:
                units += _split_long(text, a, b, count, settings.max_tokens)
            else:
                units.append((a, b))
        i = 0
        while i < len(units):
            j = i + 1
            while j < len(units) and count(text[units[i][0] : units[j][1]]) <= settings.max_tokens:
                j += 1
            a, b = units[i][0], units[j - 1][1]
            body = text[a:b]
            chunks.append(
                Chunk(
                    chunk_id(source, a, b, body),
                    body,
                    source,
                    heading or title,
                    a,
                    b,
                    dict(metadata or {}),
                )
            )
            if j >= len(units):
                break
            # Start the next chunk with as many trailing sentences as fit in the overlap.
            k = j
            while (
                k - 1 > i
                and count(text[units[k - 1][0] : units[j - 1][1]]) <= settings.overlap_tokens
            ):
                k -= 1
            i = k if k > i else j
    return chunks


def ingest(
    store, embedder, collection: str, docs, settings: ChunkSettings = ChunkSettings()
) -> int:
    """The old loop: 64 chunks per encode call, upserted in order; returns chunks stored."""
    store.ensure_collection(collection, embedder.dim)
    count = old_count_pieces(embedder)
    batch: list[Chunk] = []
    seen = 0

    def flush() -> None:
        if batch:
            vectors = embedder.model.encode(
                [c.text for c in batch],
                batch_size=64,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            store.upsert(collection, batch, vectors)
            batch.clear()

    for doc in docs:
        for chunk in chunk_text(doc.text, doc.source, count, settings, title=doc.title):
            batch.append(chunk)
            seen += 1
            if len(batch) >= 64:
                flush()
    flush()
    return seen
