"""The `faiss` back end: a persisted FAISS index beside an SQLite table of chunks.

What it does: keeps each collection in `<data_dir>/collections/<name>/`:
- `chunks.sqlite`: the chunks (id, text, source, heading, span, metadata as JSON) and
  their vectors, the source of truth, written in one transaction per upsert or delete
  (SQLite's journal makes each atomic); an FTS5 table over the text gives BM25 (SQLite's
  `bm25()`, k1 = 1.2, b = 0.75) and SQL gives the filters;
- `index-<generation>.faiss` + `index.json`: the FAISS index, saved (write to a temporary
  file, fsync, rename) when the store closes or flushes and at most every `save_every_s`
  seconds (default 30) while writes continue. A collection reopened after a crash whose
  index is older than its table rebuilds the index from the stored vectors.
Below `exact_below` chunks (default 20,000) the index is exact (`IndexFlatIP`); above, an
inverted file (`IndexIVFFlat`, nlist ~ 4 sqrt(N), trained on the collection, retrained
when it has grown 4x) searched with `nprobe` lists (default nlist / 8, at least 16). Both
support deletion by id. Filters select ids in SQL first: few matches are scored exactly,
many through FAISS's id selector.
What it does not do: serve several processes (one per data directory, with a lock).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..store import (
    Filters,
    Hit,
    StoreError,
    StoreSettings,
    VectorStore,
    as_matrix,
    check_filters,
    check_name,
    default_data_dir,
    terms,
)
from ..types import Chunk
from .folder import FolderLock, atomic_write_bytes, remove_tree, sweep_trash

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL, source TEXT NOT NULL, heading TEXT,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    metadata TEXT NOT NULL, vector BLOB NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(text, content='chunks', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO fts(rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO fts(fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_au AFTER UPDATE ON chunks BEGIN
    INSERT INTO fts(fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO fts(rowid, text) VALUES (new.rowid, new.text);
END;
CREATE VIRTUAL TABLE IF NOT EXISTS fts_terms USING fts5vocab(fts, 'row');
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
"""
COLUMNS = 'rowid, chunk_id, text, source, heading, start, "end", metadata, vector'


def _chunk(row) -> tuple[int, Chunk, np.ndarray]:
    rowid, cid, text, source, heading, start, end, metadata, blob = row
    return (
        rowid,
        Chunk(cid, text, source, heading, start, end, json.loads(metadata)),
        np.frombuffer(blob, dtype=np.float32),
    )


def metadata_json(metadata: dict[str, Any]) -> str:
    """A chunk's metadata as stored: non-ASCII kept as is, so that SQLite's JSON paths,
    which compare key text unescaped, find a key such as "café" (stored as "caf\\u00e9",
    no path reached it)."""
    return json.dumps(metadata, ensure_ascii=False)


def sql_filter(filters: Filters | None) -> tuple[str, list[Any]]:
    """A WHERE fragment (over table alias c) and its parameters."""
    clauses, params = [], []
    for path, values in check_filters(filters):
        if path[0] != "metadata":
            clauses.append(f'c."{path[0]}" IN ({", ".join("?" * len(values))})')
            params += values
            continue
        # '$."a"."b"' reaches metadata["a"]["b"]; json_extract gives JSON true as 1, so
        # json_type keeps booleans and integers apart (the store contract: true is not 1).
        # SQLite matches a path label against the key's text as stored, escapes and all:
        # labels are written as metadata_json writes keys (no " in keys: check_filters).
        json_path = "$" + "".join(
            f'."{json.dumps(part, ensure_ascii=False)[1:-1]}"' for part in path[1:]
        )
        if isinstance(values[0], bool):
            clauses.append("json_type(c.metadata, ?) = ?")
            params += [json_path, "true" if values[0] else "false"]
            continue
        kind = "= 'integer'" if isinstance(values[0], int) else "= 'text'"
        marks = ", ".join("?" * len(values))
        clauses.append(
            f"(json_type(c.metadata, ?) {kind} AND json_extract(c.metadata, ?) IN ({marks}))"
        )
        params += [json_path, json_path, *values]
    return " AND ".join(clauses) or "1", params


class _Collection:
    """One collection: its SQLite table and its FAISS index."""

    def __init__(self, path: Path, dim: int | None, opts: dict[str, Any]) -> None:
        self.path = path
        self.exact_below = int(opts.get("exact_below", 20_000))
        self.nprobe_opt = opts.get("nprobe")
        self.save_every_s = float(opts.get("save_every_s", 30.0))
        path.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path / "chunks.sqlite", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.executescript(SCHEMA)
            if dim is not None:
                self.db.execute("INSERT OR IGNORE INTO state VALUES ('dim', ?)", (dim,))
                self.db.execute("INSERT OR IGNORE INTO state VALUES ('generation', 0)")
        self.dim = self._state("dim")
        self.dirty = False
        self.index, self.trained_n = self._load_index()
        self.saved_at = time.monotonic()

    # --- state ------------------------------------------------------------------------------
    def _state(self, key: str) -> int:
        return int(self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    # --- the index --------------------------------------------------------------------------
    def _load_index(self):
        meta_path = self.path / "index.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["generation"] == self._state("generation"):
                index = faiss.read_index(str(self.path / meta["file"]))
                return index, meta["trained_n"]
        return self._build()  # no index yet, or the table moved on after the last save

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute("SELECT rowid, vector FROM chunks ORDER BY rowid").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))  # [N]
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return ids, matrix.reshape(len(rows), self.dim)  # [N, D]

    def _build(self):
        ids, matrix = self._all_vectors()
        n = len(ids)
        if n < self.exact_below:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        else:
            nlist = int(4 * math.sqrt(n))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = matrix
            if n > 64 * nlist:  # k-means needs tens of points per list, not all of them
                pick = np.random.default_rng(0).choice(n, 64 * nlist, replace=False)
                sample = matrix[np.sort(pick)]
            index.train(sample)
        if n:
            index.add_with_ids(matrix, ids)
        self.dirty = True
        return index, n

    def _maybe_rebuild(self) -> None:
        n = self.index.ntotal
        flat = not isinstance(self.index, faiss.IndexIVF)
        if (flat and n >= self.exact_below) or (not flat and n >= 4 * max(self.trained_n, 1)):
            self.index, self.trained_n = self._build()

    def nprobe(self) -> int:
        nlist = self.index.nlist
        return min(nlist, int(self.nprobe_opt or max(16, nlist // 8)))

    def save(self, force: bool = False) -> None:
        if not self.dirty or (not force and time.monotonic() - self.saved_at < self.save_every_s):
            return
        generation = self._state("generation")
        name = f"index-{generation}.faiss"
        data = faiss.serialize_index(self.index).tobytes()
        atomic_write_bytes(self.path / name, data)
        meta = {"file": name, "generation": generation, "trained_n": self.trained_n}
        atomic_write_bytes(self.path / "index.json", json.dumps(meta).encode())
        for old in self.path.glob("index-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.dirty, self.saved_at = False, time.monotonic()

    # --- writes -----------------------------------------------------------------------------
    def upsert(self, chunks: list[Chunk], matrix: np.ndarray) -> None:
        rows = [
            (
                c.id,
                c.text,
                c.source,
                c.heading,
                c.start,
                c.end,
                metadata_json(c.metadata),
                v.tobytes(),
            )
            for c, v in zip(chunks, matrix, strict=True)
        ]
        with self.db:
            self.db.executemany(
                'INSERT INTO chunks (chunk_id, text, source, heading, start, "end", metadata, '
                "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(chunk_id) DO UPDATE SET "
                "text = excluded.text, source = excluded.source, heading = excluded.heading, "
                'start = excluded.start, "end" = excluded."end", metadata = excluded.metadata, '
                "vector = excluded.vector",
                rows,
            )
            marks = ", ".join("?" * len(chunks))
            found = dict(
                self.db.execute(
                    f"SELECT chunk_id, rowid FROM chunks WHERE chunk_id IN ({marks})",
                    [c.id for c in chunks],
                ).fetchall()
            )
            self.db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
        ids = np.asarray([found[c.id] for c in chunks], dtype=np.int64)  # [N]
        ids, first = np.unique(ids[::-1], return_index=True)  # the last copy of a repeated id
        rows_of = len(chunks) - 1 - first
        self.index.remove_ids(ids)  # re-upserted chunks replace their old vectors
        self.index.add_with_ids(np.ascontiguousarray(matrix[rows_of]), ids)
        self.dirty = True
        self._maybe_rebuild()
        self.save()

    def delete(self, ids: list[str]) -> int:
        marks = ", ".join("?" * len(ids))
        with self.db:
            rowids = [
                r[0]
                for r in self.db.execute(
                    f"SELECT rowid FROM chunks WHERE chunk_id IN ({marks})", ids
                ).fetchall()
            ]
            self.db.execute(f"DELETE FROM chunks WHERE chunk_id IN ({marks})", ids)
            self.db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
        if rowids:
            self.index.remove_ids(np.asarray(rowids, dtype=np.int64))
            self.dirty = True
            self.save()
        return len(rowids)

    # --- reads ------------------------------------------------------------------------------
    def rows(self, rowids: list[int]) -> dict[int, tuple[Chunk, np.ndarray]]:
        marks = ", ".join("?" * len(rowids))
        found = self.db.execute(f"SELECT {COLUMNS} FROM chunks WHERE rowid IN ({marks})", rowids)
        return {rid: (chunk, vec) for rid, chunk, vec in map(_chunk, found)}

    def search(self, query: np.ndarray, top_k: int, filters: Filters | None) -> list[Hit]:
        n = self.index.ntotal
        if n == 0:
            return []
        k = min(top_k, n)
        params = None
        if filters:
            where, args = sql_filter(filters)
            allowed = [
                r[0] for r in self.db.execute(f"SELECT c.rowid FROM chunks c WHERE {where}", args)
            ]
            if not allowed:
                return []
            if len(allowed) <= 4096:  # few matches: score them all, exactly
                rows = self.rows(allowed)
                order = sorted(rows, key=lambda r: (-float(rows[r][1] @ query[0]), r))[:k]
                return [(rows[r][0], float(rows[r][1] @ query[0]), rows[r][1]) for r in order]
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            if isinstance(self.index, faiss.IndexIVF):
                # fewer matches per list: probe proportionally more lists
                probe = min(self.index.nlist, self.nprobe() * max(1, n // len(allowed)))
                params = faiss.SearchParametersIVF(sel=selector, nprobe=probe)
            else:
                params = faiss.SearchParameters(sel=selector)
        elif isinstance(self.index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=self.nprobe())
        # One query gains nothing from FAISS's OpenMP team, and waking it costs
        # milliseconds on a busy machine: search on this thread.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, ids = self.index.search(query, k, params=params)  # [1, k] each
        finally:
            faiss.omp_set_num_threads(threads)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        rows = self.rows([i for i, _ in hits]) if hits else {}
        return [(rows[i][0], s, rows[i][1]) for i, s in hits if i in rows]

    def search_bm25(self, query: str, top_k: int, filters: Filters | None) -> list[Hit]:
        words = sorted(set(terms(query)))
        if not words:
            return []
        # A term in more than half the chunks has a BM25 IDF of about 0 (FTS5 floors it at
        # 1e-6) yet makes FTS5 score every chunk holding it: leave such terms out unless
        # the query has nothing else.
        marks = ", ".join("?" * len(words))
        df = dict(
            self.db.execute(f"SELECT term, doc FROM fts_terms WHERE term IN ({marks})", words)
        )
        half = self.count() / 2
        rare = [w for w in words if df.get(w, 0) <= half]
        words = rare or words
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        where, args = sql_filter(filters)
        found = self.db.execute(
            f"SELECT {', '.join('c.' + col.strip() for col in COLUMNS.split(','))}, "
            f"-bm25(fts) AS score FROM fts JOIN chunks c ON c.rowid = fts.rowid "
            f"WHERE fts MATCH ? AND {where} ORDER BY bm25(fts), c.rowid LIMIT ?",
            [match, *args, top_k],
        ).fetchall()
        out = []
        for row in found:
            _, chunk, vec = _chunk(row[:-1])
            out.append((chunk, float(row[-1]), vec))
        return out

    def close(self) -> None:
        self.save(force=True)
        self.db.close()


class FaissStore(VectorStore):
    name = "faiss"

    def __init__(self, settings: StoreSettings) -> None:
        self.root = settings.data_dir or default_data_dir(self.name)
        self.location = str(self.root)
        self.opts = dict(settings.options)
        self._folder_lock = FolderLock(self.root, self.name)
        (self.root / "collections").mkdir(exist_ok=True)
        sweep_trash(self.root / "collections")  # deletes a crash interrupted
        self._open: dict[str, _Collection] = {}
        self._lock = threading.RLock()  # FAISS indexes and the SQLite connections
        self._closed = False

    def _path(self, name: str) -> Path:
        return self.root / "collections" / check_name(name)

    def _c(self, name: str) -> _Collection:
        with self._lock:
            if self._closed:
                raise StoreError("the vector store is closed")
            if name not in self._open:
                self._require(name)
                self._open[name] = _Collection(self._path(name), None, self.opts)
            return self._open[name]

    def collections(self) -> list[str]:
        folder = self.root / "collections"
        return sorted(
            p.name
            for p in folder.iterdir()
            if not p.name.startswith(".") and (p / "chunks.sqlite").is_file()
        )

    def exists(self, name: str) -> bool:
        try:
            return (self._path(name) / "chunks.sqlite").is_file()
        except StoreError:
            return False

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            if self.exists(name):
                have = self._c(name).dim
                if have != dim:
                    raise StoreError(f"collection {name!r} holds {have}-d vectors, not {dim}-d")
                return
            self._open[name] = _Collection(self._path(name), dim, self.opts)

    def delete_collection(self, name: str) -> bool:
        with self._lock:
            if not self.exists(name):
                return False
            c = self._open.pop(name, None)
            if c is not None:
                c.db.close()
            remove_tree(self._path(name))
            return True

    def count(self, name: str) -> int:
        with self._lock:
            return self._c(name).count()

    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        with self._lock:
            c = self._c(name)
            matrix = as_matrix(vectors, c.dim)  # [N, D]
            if len(chunks) != len(matrix):
                raise StoreError(f"{len(chunks)} chunks but {len(matrix)} vectors")
            if chunks:
                c.upsert(chunks, matrix)

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        with self._lock:
            marks = ", ".join("?" * len(ids))
            rows = self._c(name).db.execute(
                f"SELECT chunk_id FROM chunks WHERE chunk_id IN ({marks})", ids
            )
            return {r[0] for r in rows}

    def delete(self, name: str, ids: list[str]) -> int:
        with self._lock:
            return self._c(name).delete(ids) if ids else 0

    def delete_sources(self, name: str, sources: list[str]) -> int:
        if not sources:
            return 0
        with self._lock:
            c = self._c(name)
            marks = ", ".join("?" * len(sources))
            # chunks_source indexes this lookup
            found = c.db.execute(f"SELECT chunk_id FROM chunks WHERE source IN ({marks})", sources)
            ids = [r[0] for r in found]
            return c.delete(ids) if ids else 0

    def search_dense(self, name, vector, top_k, filters=None) -> list[Hit]:
        with self._lock:
            c = self._c(name)
            return c.search(as_matrix(vector, c.dim), top_k, filters)

    def search_bm25(self, name, query, top_k, filters=None) -> list[Hit]:
        with self._lock:
            return self._c(name).search_bm25(query, top_k, filters)

    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        if not ids:
            return {}
        with self._lock:
            marks = ", ".join("?" * len(ids))
            rows = self._c(name).db.execute(
                f"SELECT chunk_id, vector FROM chunks WHERE chunk_id IN ({marks})", ids
            )
            return {cid: np.frombuffer(blob, dtype=np.float32) for cid, blob in rows}

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        last = -1
        while True:
            with self._lock:
                rows = (
                    self._c(name)
                    .db.execute(
                        f"SELECT {COLUMNS} FROM chunks WHERE rowid > ? ORDER BY rowid LIMIT ?",
                        (last, batch_size),
                    )
                    .fetchall()
                )
            if not rows:
                return
            for rowid, chunk, vec in map(_chunk, rows):
                last = rowid
                yield chunk, vec

    def flush(self) -> None:
        """Save every changed index now."""
        with self._lock:
            for c in self._open.values():
                c.save(force=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in self._open.values():
                c.close()
            self._open.clear()
            self._folder_lock.release()
