"""Ingestion: files -> chunks -> embeddings -> the vector store, resumably and idempotently.

What it does:
- `Corpus(paths)` lists the text, Markdown and reST files (and JSON Lines records with a
  `text` field, optional `source`/`title`) under the given paths and reads them lazily. A
  file that cannot be used (not UTF-8, binary, unreadable, a JSONL file with no usable
  record; a record's `metadata` object goes on every chunk of it) is skipped and recorded in `corpus.skipped` with the reason; the rest go on.
- `ingest(...)` chunks documents (see `chunking.py`), drops chunks the collection already
  holds (ids are content-derived, so this is what makes a killed ingest, run again,
  continue where it stopped instead of starting over), sorts the rest of each window of
  256 by length and embeds them 64 at a time (similar lengths in one call, so little
  padding is computed). A document's chunks are written once all of them are embedded,
  together (`_Documents`), so a crash mid-ingest leaves each document whole or absent,
  and the collection is made at the first write (no empty one after an early crash). With `pipeline=True` the embedding runs on its own thread while this
  thread reads, chunks and writes the windows before and after it; that thread is the
  only one that runs PyTorch, so one OpenMP team exists (docs/architecture.md, "One
  thread runs the model"), and it ends with the call.
Re-ingesting the same files changes nothing, and an ingest interrupted at any point,
run again, ends in the same state as one clean run.
What it does not do: delete chunks of files that changed (ids of old spans remain; delete
and re-create the collection to rebuild it).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import progress_bar
from .chunking import ChunkSettings, chunk_text
from .store import metadata_key_problem
from .types import Chunk

SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".jsonl")
WINDOW = 256  # chunks read, resume-checked and sorted by length together
BATCH = 64  # chunks per embedding call
STORE_BATCH = 1024  # chunks per store write of a finished document
PIPELINE_DEPTH = 2  # batches queued for or held by the embedding thread


@dataclass
class Document:
    text: str
    source: str
    title: str | None = None
    nbytes: int = 0  # bytes of input this document accounts for (progress only)
    # Every chunk of the document carries it; filters match its keys (docs/rag.md).
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


class IngestError(ValueError):
    pass


class Corpus:
    """The documents under `paths`, read lazily; files that cannot be used are skipped.

    Iterating yields `Document`s; afterwards `skipped` lists each file left out and why,
    `bad_lines` each JSONL file some of whose lines were left out, and `files_read`
    counts the files that gave at least one document.
    """

    def __init__(self, paths: Iterable[str], source_root: str | os.PathLike | None = None) -> None:
        """`source_root` (default: the working folder) is what sources are named relative to;
        a file outside it is named by its absolute path."""
        paths = list(paths)
        self.source_root = Path(os.path.abspath(source_root or "."))
        if not self.source_root.is_dir():  # a typo would name every file anew: stored twice
            raise IngestError(f"the source root {source_root} is not a folder")
        files: list[Path] = []
        for item in paths:
            p = Path(item)
            if p.is_dir():
                files += sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                )
            elif p.is_file():
                files.append(p)
            else:
                raise IngestError(f"no such file or folder: {item}")
        if not files:
            raise IngestError(f"no {', '.join(SUFFIXES)} files under {', '.join(paths)}")
        self.files = files
        self.total_bytes = sum(f.stat().st_size for f in files)
        self.skipped: list[Skipped] = []  # files left out entirely
        self.bad_lines: list[Skipped] = []  # JSONL files whose other records were used
        self.files_read = 0

    def __iter__(self) -> Iterator[Document]:
        for f in self.files:
            try:
                source = self.source_of(f)
                if f.suffix.lower() == ".jsonl":
                    docs, bad, first_bad = _read_jsonl(f, source)
                    if bad:
                        self.bad_lines.append(
                            Skipped(
                                f"{f}:{first_bad}",
                                f"{bad} line(s) without a JSON object with a string `text` "
                                "field (and a string `title` and an object `metadata` whose "
                                "keys a filter can name, if any) skipped (the file's other "
                                "records are ingested)",
                            )
                        )
                else:
                    docs = [_read_text(f, source)]
            except _Unusable as e:
                self.skipped.append(Skipped(str(f), str(e)))
                continue
            except OSError as e:
                self.skipped.append(Skipped(str(f), f"cannot be read: {e.strerror or e}"))
                continue
            self.files_read += 1
            yield from docs

    def source_of(self, path: Path) -> str:
        """A file's source: its path relative to `source_root`, normalised, so that
        `docs/x.md`, `./docs/x.md` and `$PWD/docs/x.md` are one source (chunk ids derive
        from it: another spelling would store the file again). Symlinks are not followed:
        a linked file keeps the name it was reached by."""
        absolute = Path(os.path.abspath(path))
        try:
            return absolute.relative_to(self.source_root).as_posix()
        except ValueError:
            return absolute.as_posix()


def documents_from_paths(paths: list[str], source_root: str | None = None) -> Corpus:
    """The documents under `paths` (see `Corpus`)."""
    return Corpus(paths, source_root)


class _Unusable(Exception):
    pass


def _read_text(path: Path, source: str) -> Document:
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        raise _Unusable("binary file (NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Unusable(f"not UTF-8 text (byte {e.start})") from None
    return Document(text, source, path.stem, len(raw))


def _read_jsonl(path: Path, source: str) -> tuple[list[Document], int, int | None]:
    """The records with a string `text` (and a string `title` or none), how many lines were
    not such a record, and the first of those lines."""
    docs, bad, first_bad = [], 0, None
    with path.open("rb") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, title = record["text"], record.get("title")
                metadata = record.get("metadata")
                # A title becomes the chunks' heading, which is a string or None.
                if not isinstance(text, str) or not (title is None or isinstance(title, str)):
                    raise TypeError
                if not (metadata is None or isinstance(metadata, dict)):
                    raise TypeError
                if metadata and metadata_key_problem(metadata):  # stored, never matched
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                bad += 1
                first_bad = first_bad or n
                continue
            name = record.get("source") or f"{source}#{n}"
            docs.append(Document(text, str(name), title, len(line), metadata))
    if not docs:
        where = f" (line {first_bad} is the first)" if first_bad else " (the file is empty)"
        raise _Unusable(
            f"no JSON object with a string `text` field (and a string `title`, if any){where}"
        )
    return docs, bad, first_bad


def chunk_documents(docs, count, settings: ChunkSettings) -> Iterator[Chunk]:
    for doc in docs:
        yield from chunk_text(
            doc.text, doc.source, count, settings, title=doc.title, metadata=doc.metadata
        )


@dataclass
class IngestStats:
    chunks: int = 0  # chunks the documents produced
    embedded: int = 0  # chunks embedded and written by this call
    already_stored: int = 0  # chunks the collection held already (skipped: resume / re-run)
    seconds: float = 0.0


def _windows(docs, count, settings: ChunkSettings, size: int):
    """Lists of up to `size` chunks, in order, each with the bytes of input it completes and
    the documents whose last chunk it holds (their ordinals; `doc_of` maps each chunk id
    to its document's)."""
    window: list[Chunk] = []
    done_bytes = 0
    ended: list[int] = []
    seen: set[str] = set()
    doc_of: dict[str, int] = {}
    for ordinal, doc in enumerate(docs):
        chunks = chunk_text(
            doc.text, doc.source, count, settings, title=doc.title, metadata=doc.metadata
        )
        for chunk in chunks:
            if chunk.id in seen:  # the same span of the same source twice in one call
                continue
            seen.add(chunk.id)
            doc_of[chunk.id] = ordinal
            window.append(chunk)
            if len(window) >= size:
                yield window, done_bytes, ended, doc_of
                window, done_bytes, ended = [], 0, []
        done_bytes += doc.nbytes
        ended.append(ordinal)
    if window or done_bytes or ended:
        yield window, done_bytes, ended, doc_of


class _Documents:
    """Embedded chunks held until their whole document is embedded, then written together:
    a crash or a drain mid-ingest leaves each document whole or absent, never a fragment
    that retrieval serves and RAG cites as the document (a QA pass found 64 of 462 chunks
    stored after a kill). The writes of one document follow each other within milliseconds
    (STORE_BATCH chunks per call, so a huge document does not become one oversized request).
    An interrupted ingest run again still skips every document written whole."""

    def __init__(self, write) -> None:
        self.write = write  # write(chunks, vectors): one store call
        self.held: dict[int, list[tuple[Chunk, Any]]] = {}  # ordinal -> (chunk, vector)s
        self.missing: dict[int, int] = {}  # ordinal -> fresh chunks not embedded yet
        self.ended: set[int] = set()  # documents whose every fresh chunk is counted

    def expect(self, chunks: list[Chunk], doc_of: dict[str, int], ended: list[int]) -> None:
        """A window's fresh chunks (to be embedded), and the documents it ends."""
        for chunk in chunks:
            ordinal = doc_of[chunk.id]
            self.missing[ordinal] = self.missing.get(ordinal, 0) + 1
        self.ended.update(ended)

    def embedded(self, chunks: list[Chunk], vectors, doc_of: dict[str, int]) -> int:
        """Hold a batch; write every document it completes. Returns chunks written."""
        for i, chunk in enumerate(chunks):
            ordinal = doc_of[chunk.id]
            self.held.setdefault(ordinal, []).append((chunk, vectors[i]))
            self.missing[ordinal] -= 1
        written = 0
        for ordinal in sorted(self.held):
            if ordinal in self.ended and self.missing.get(ordinal) == 0:
                pairs = self.held.pop(ordinal)
                del self.missing[ordinal]
                for lo in range(0, len(pairs), STORE_BATCH):
                    part = pairs[lo : lo + STORE_BATCH]
                    self.write([c for c, _ in part], _stack([v for _, v in part]))
                written += len(pairs)
        return written


def _stack(vectors: list) -> Any:
    """Rows of one embedding call or several, as the store takes them: one 2-D array."""
    return np.stack([np.asarray(v) for v in vectors])


class _EmbeddingThread:
    """Embeds windows handed to it, in order, on one thread that ends with `close()`."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="atlas-embed", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            try:
                texts = [c.text for c in item[0]]
                vectors = self.embedder.encode(texts) if texts else None
                self.done.put((item, vectors, None))
            except BaseException as e:  # handed to the caller's thread
                self.done.put((item, None, e))

    def submit(self, item) -> None:
        self.todo.put(item)

    def result(self):
        item, vectors, error = self.done.get()
        if error is not None:
            raise error
        return item, vectors

    def close(self, wait: bool = True) -> None:
        self.todo.put(None)
        if wait:  # not on an error or Ctrl-C: the daemon thread ends with the process
            self.thread.join()


def ingest(
    store,
    embedder,
    collection: str,
    docs: Iterable[Document],
    settings: ChunkSettings = ChunkSettings(),
    batch_size: int = BATCH,
    progress: bool = True,
    pipeline: bool = True,
    total_bytes: int | None = None,
    window: int = WINDOW,
) -> dict:
    """Store every chunk of `docs` that `collection` lacks; returns counts.

    Chunks are taken `window` at a time, those the collection holds are dropped, the rest
    sorted by length and embedded and written `batch_size` per call (similar lengths in
    one call: little padding); `pipeline` embeds on a separate thread (see the module
    docstring); `total_bytes` (e.g. `Corpus.total_bytes`) gives the progress bar a total. Result keys: collection, chunks (seen), embedded (written now),
    already_stored (skipped because the collection had them), total (collection size).
    """
    limit = getattr(embedder, "max_text_pieces", None)
    if limit is not None and settings.max_tokens > limit:
        raise IngestError(
            f"chunks of {settings.max_tokens} word pieces do not fit the embedder's window "
            f"({limit} pieces plus its special tokens): use at most {limit}"
        )
    created = not store.exists(collection)
    stats = IngestStats()
    # With the input's size the bar counts bytes (and shows an ETA); without it, chunks.
    by_bytes = total_bytes is not None
    bar = progress_bar(
        total=total_bytes,
        desc=f"ingesting into {collection}",
        unit="B" if by_bytes else " chunks",
        unit_scale=by_bytes,
        disable=not progress,
    )
    t0 = time.perf_counter()

    def new(window: list[Chunk]) -> list[Chunk]:
        """The chunks of `window` the collection does not hold yet."""
        stats.chunks += len(window)
        if not window or not store.exists(collection):
            return window
        stored = store.vectors(collection, [c.id for c in window])
        fresh = [c for c in window if c.id not in stored]
        stats.already_stored += len(window) - len(fresh)
        return fresh

    def store_write(chunks: list[Chunk], vectors) -> None:
        # The collection is made at the first write, so a crash before it (while the first
        # document is embedded) leaves no empty collection listed.
        store.ensure_collection(collection, embedder.dim)
        store.upsert(collection, chunks, vectors)

    documents = _Documents(store_write)

    def write(window: list[Chunk], done_bytes: int, doc_of, vectors) -> None:
        if window:
            stats.embedded += documents.embedded(window, vectors, doc_of)
        bar.update(done_bytes if by_bytes else len(window))
        rate = stats.embedded / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(
            f"{stats.embedded} chunks embedded ({rate:.0f}/s), {stats.already_stored} already stored"
        )

    def batches():
        """(chunks, input bytes they complete, doc_of) per embedding call, in length order."""
        for chunks, done_bytes, ended, doc_of in _windows(
            docs, embedder.count_pieces, settings, window
        ):
            fresh = sorted(new(chunks), key=lambda c: len(c.text))
            documents.expect(fresh, doc_of, ended)
            if not fresh:
                yield [], done_bytes, doc_of
            for i in range(0, len(fresh), batch_size):
                last = i + batch_size >= len(fresh)
                yield fresh[i : i + batch_size], done_bytes if last else 0, doc_of

    try:
        if pipeline:
            worker = _EmbeddingThread(embedder)
            in_flight, finished = 0, False
            try:
                for batch in batches():
                    worker.submit(batch)
                    in_flight += 1
                    # Write whatever is finished; wait only when the queue is full.
                    while in_flight >= PIPELINE_DEPTH or not worker.done.empty():
                        (chunks, nbytes, doc_of), vectors = worker.result()
                        write(chunks, nbytes, doc_of, vectors)
                        in_flight -= 1
                while in_flight:
                    (chunks, nbytes, doc_of), vectors = worker.result()
                    write(chunks, nbytes, doc_of, vectors)
                    in_flight -= 1
                finished = True
            finally:
                worker.close(wait=finished)
        else:
            for chunks, nbytes, doc_of in batches():
                vectors = embedder.encode([c.text for c in chunks]) if chunks else None
                write(chunks, nbytes, doc_of, vectors)
        assert not documents.held, "every document ended, so every one was written"
    finally:
        bar.close()
        # An ingest that stored nothing (every file skipped, or a failure before the first
        # write) leaves no empty collection behind, which would then be listed and searched.
        if created and store.exists(collection) and store.count(collection) == 0:
            store.delete_collection(collection)
    stats.seconds = time.perf_counter() - t0
    return {
        "collection": collection,
        "chunks": stats.chunks,
        "embedded": stats.embedded,
        "already_stored": stats.already_stored,
        "total": store.count(collection) if store.exists(collection) else 0,
        "seconds": stats.seconds,
    }
