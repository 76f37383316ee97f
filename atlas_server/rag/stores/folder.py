"""Helpers for back ends that keep collections in a local folder (embedded, faiss).

What it does: `FolderLock` holds an exclusive lock on `<root>/.lock` for the life of a
store (one process per data directory, as with any embedded database; the lock goes with
the process, so a killed server never leaves a stale one), and `remove_tree` deletes a
collection's folder by first renaming it (atomic) so a crash leaves the collection whole
or gone, never half deleted.
What it does not do: store anything.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path

from ..store import StoreError


class FolderLock:
    def __init__(self, root: Path, store: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._file = open(root / ".lock", "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise StoreError(
                f"the data dir {root} is in use by another process (a running `atlas serve`?): "
                f"the {store} store allows one process per data directory. Ingest through "
                "POST /v1/collections/NAME/documents on that server, stop it, or use a "
                "Qdrant or Milvus server (docs/rag.md)"
            ) from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def remove_tree(path: Path) -> None:
    trash = path.parent / f".deleted-{path.name}-{uuid.uuid4().hex}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
