"""A persistent response cache: SQLite, one row per (server, model, endpoint, request body).

Why: an evaluation is hundreds to thousands of deterministic requests; when a run is
interrupted (Ctrl-C, a crash, a server restart) rerunning the same command must continue
where it stopped and give exactly the numbers an uninterrupted run gives. Every answered
request is committed at once, so everything finished before an interruption is reused.

The key is the SHA-256 of the canonical JSON (sorted keys, no whitespace) of
{server, model, path, body}. `server` is the base URL, or for `--checkpoint` runs a
stable identity of the checkpoint (path + weights hash), because the port changes every
run. What it does not do: expire entries or notice that a server at the same URL now runs
different weights under the same model name (use `--no-cache` or a fresh cache file then).
A cache path that cannot be opened (a folder, a file that is not SQLite, no permission) is
a one-line `CacheError`, raised before the run starts.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .errors import CacheError

__all__ = ["ResponseCache", "request_key"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(server: str, model: str, path: str, body: dict[str, Any]) -> str:
    payload = {"server": server, "model": model, "path": path, "body": body}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class ResponseCache:
    """Get/put JSON responses by request key; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = self._open()
        self.hits = 0
        self.misses = 0
        self.stored = 0  # answers put this run (a failed run's errors say they are kept)

    def _open(self) -> sqlite3.Connection:
        """Open (or create) the file; what a user can fix is a one-line CacheError, since
        sqlite3's own "unable to open database file" does not say which file or why."""
        if self.path.is_dir():
            raise CacheError(
                f"the response cache {self.path} is a folder, not a file; give a file with"
                f" --cache FILE (e.g. {self.path / 'eval-cache.sqlite'}) or pass --no-cache"
            )
        if file := next((p for p in self.path.parents if p.is_file()), None):
            raise CacheError(
                f"cannot create the response cache {self.path}: {file} is a file, not a folder;"
                " give another --cache FILE or pass --no-cache"
            )
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            # WAL: readers never block the writer, and a killed process loses nothing committed.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            if db is not None:
                db.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CacheError(
                f"cannot open the response cache {self.path}: {reason}; give another"
                " --cache FILE or pass --no-cache"
            ) from None
        return db

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, path: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, path, request, response, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, path, canonical_json(request), canonical_json(response), time.time()),
            )
            self.stored += 1

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
