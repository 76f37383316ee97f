"""Atomic file writes: a file is either its old self or its whole new self, never half.

What it does: writes text, bytes, JSON or a safetensors file to a temporary sibling in
the same folder, flushes it to disk (fsync), then renames it over the target (`os.replace`
is atomic on POSIX and Windows), so a crash or a SIGKILL mid-write leaves the previous
file intact and at worst a `.NAME.*.tmp` sibling that the next write of the same name
does not trip over. Folders are created as needed.
`atomic_directory` does the same for a folder of several files (a checkpoint, an
adapter, an export): they are written into a temporary sibling folder, flushed, and the
folder is swapped in whole. What it does not do: locking, or reading. (The trainer's
run checkpoints keep their own swap in `trainer/state.py`: a step's folder is renamed
into a run folder that keeps several of them.)

A leaf: it imports nothing of Atlas, so any room may use it except the tokenizer, which
keeps its own few lines so that it stays free of every other Atlas module (see
docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "save_safetensors",
]


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask sets it,
    for every thread, while it reads it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain open() or mkdir()
    would: what we publish must be readable by whoever the umask allows (a server or
    llama.cpp running as another user)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def _write_atomically(path: str | os.PathLike, mode: str, write: Callable[[IO], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    as_created(tmp)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; returns the path."""
    return _write_atomically(path, "w", lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    return _write_atomically(path, "wb", lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """`json.dumps(obj)` written atomically (NaN and infinity refused: not JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """torch tensors to a safetensors file, atomically (contiguous CPU copies are written)."""
    from safetensors.torch import save

    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write_bytes(path, save(plain, metadata=metadata))


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `directory`; when the block ends without an
    exception its files are flushed to disk and it replaces `directory` whole.

    The old folder, if any, is renamed aside before the new one is renamed in, so a crash
    leaves the old folder or the new one complete (at worst beside a `.NAME.*` sibling),
    never a mix. On an exception the temporary folder is removed and `directory` is
    untouched.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        # Replacing folders is this function's job; a file there is someone's data.
        raise FileExistsError(f"{directory} exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    as_created(tmp, folder=True)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            # Writers that make private files (safetensors writes 0600) publish readable ones.
            as_created(child, folder=child.is_dir())
            if child.is_file():
                with child.open("rb") as f:
                    os.fsync(f.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
