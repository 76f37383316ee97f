"""Helpers for back ends that keep collections in a local folder (embedded, faiss, qdrant's
local mode).

What it does: `FolderLock` holds an exclusive lock on `<root>/.lock` for the life of a
store (one process per data directory, as with any embedded database; the lock goes with
the process, so a killed server never leaves a stale one); `claim_folder` marks a folder
as one back end's (`<root>/.atlas-store`) and refuses a folder another back end's data is
in, because the embedded and faiss stores both keep `collections/NAME/` and deleting one's
collection would delete the other's; `remove_tree` deletes a collection's folder by first
renaming it (atomic) so a crash leaves the collection whole or gone, never half deleted,
and `sweep_trash` removes what such a crash left behind when a store opens.
What it does not do: store anything.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path

from ..store import StoreError

MARKER = ".atlas-store"


def _found_layout(root: Path) -> str | None:
    """Which back end's data an unmarked folder holds (folders from before the marker)."""
    if (root / "meta.json").is_file() and (root / "collection").is_dir():
        return "qdrant"
    collections = root / "collections"
    if collections.is_dir():
        for folder in collections.iterdir():
            if (folder / "edge_config.json").is_file():
                return "embedded"
            if (folder / "chunks.sqlite").is_file():
                return "faiss"
    return None


def claim_folder(root: Path, store: str) -> None:
    """Mark `root` as `store`'s, or raise StoreError if another back end's data is there."""
    marker = root / MARKER
    try:
        owner = marker.read_text().strip() if marker.is_file() else _found_layout(root)
        if owner is None or owner == store:
            if not marker.is_file():
                atomic_write_bytes(marker, f"{store}\n".encode())
            return
    except OSError as e:
        raise StoreError(f"cannot use the data dir {root}: {e}") from None
    legacy = " (the embedded store before Atlas used Qdrant Edge)" if owner == "qdrant" else ""
    raise StoreError(
        f"the data dir {root} holds the {owner} store's data{legacy}; open it with "
        f'`[rag] store = "{owner}"` (or `--store {owner}`), or give the {store} store '
        "another data_dir: two back ends in one folder would overwrite each other"
    )


def make_folder(root: Path) -> None:
    """Create a store's folder, or a StoreError saying why it cannot be one (a file there,
    no permission)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot use the data dir {root}: {e}") from None


class FolderLock:
    def __init__(self, root: Path, store: str) -> None:
        make_folder(root)
        try:
            self._file = open(root / ".lock", "a+")  # noqa: SIM115 (held until release)
        except OSError as e:  # no permission, ...
            raise StoreError(f"cannot use the data dir {root}: {e}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise StoreError(
                f"the data dir {root} is in use by another process (a running `atlas serve`, or "
                "`atlas rag ingest`?): "
                f"the {store} store allows one process per data directory. Ingest through "
                "POST /v1/collections/NAME/documents on that server, stop it, or use a "
                "Qdrant or Milvus server (docs/rag.md)"
            ) from None
        try:
            claim_folder(root, store)
        except StoreError:
            self.release()
            raise

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


TRASH = ".deleted-"  # no collection name starts with "." (store.check_name)


def remove_tree(path: Path) -> None:
    """Delete a collection's folder: renamed away first, so a crash leaves it whole or gone."""
    # The trash name leaves the collection's name out: `.deleted-NAME-UUID` outgrew the
    # 255-byte file name limit for names over 213 characters (valid names go to 255).
    trash = path.parent / f"{TRASH}{uuid.uuid4().hex}"
    try:
        os.replace(path, trash)
    except OSError as e:
        raise StoreError(f"cannot delete the collection folder {path}: {e}") from None
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(folder: Path) -> None:
    """Remove the trash folders of deletes that a crash interrupted (see remove_tree)."""
    # Safe to remove: a trash folder was renamed away from its collection's name before
    # anything in it was deleted, so no collection is read from it; and the caller holds
    # the data dir's lock (FolderLock), so no delete of another process is still using it.
    for p in folder.iterdir():
        if p.name.startswith(TRASH) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
