"""Stream training text from disk: folders, globs and file lists of text or JSON Lines.

What it does: expands the paths a user gives into a sorted, de-duplicated file list and
yields the text of each file in bounded chunks, cut only where a pre-token cannot span
(a line break between two non-space characters), so counting pre-tokens chunk by
chunk gives the same counts as counting whole files. `.jsonl` files yield one document
per record (the string under a configurable field). What it does not do: hold a corpus
in memory, guess encodings (files are read as UTF-8; undecodable bytes become U+FFFD),
or deduplicate documents.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex

from .bpe import TokenizerError

__all__ = [
    "TEXT_SUFFIXES",
    "CorpusFile",
    "iter_chunks",
    "resolve_corpus_files",
    "stdlib_sample",
]

# Suffixes picked up when a folder is given; files named explicitly are read whatever
# their suffix (anything not .jsonl is read as plain text).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
CHUNK_CHARS = 1 << 20
# A line break between two non-space characters is a pre-token boundary for the GPT-2
# and GPT-4 patterns (no alternative consumes "\n" and then a visible character, and the
# whitespace run before the cut is just "\n", so the `(?!\S)` lookahead cannot change
# it): text may be cut there without changing the pre-tokens. Custom patterns that can
# span such a place would see a file split at most every CHUNK_CHARS characters.
_SAFE_CUT = regex.compile(r"(?<=\S)\n(?=\S)")
# If a file has no safe cut for this long (one enormous line), cut anyway to bound memory.
MAX_CARRY_CHARS = 16 * CHUNK_CHARS
_DOCUMENTED_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int  # bytes on disk, for progress reporting


def resolve_corpus_files(
    paths: Sequence[str | os.PathLike], suffixes: Sequence[str] = TEXT_SUFFIXES
) -> list[CorpusFile]:
    """Expand folders (recursively, by suffix, skipping hidden entries), globs and files
    into a sorted file list.

    Sorting by path makes the list independent of the file system's listing order.
    Raises TokenizerError if a path matches nothing or the result is empty.
    """
    found: set[Path] = set()
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found.update(_files_under(path, suffixes))
        elif path.is_file():
            found.add(path)
        elif glob.has_magic(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            files = [m for m in matches if m.is_file()]
            for d in (m for m in matches if m.is_dir()):
                files.extend(_files_under(d, suffixes))
            if not files:
                raise TokenizerError(f"no files match {text!r}")
            found.update(files)
        else:
            raise TokenizerError(f"no such file or folder: {text}")
    if not found:
        raise TokenizerError(
            f"no training files (looked for {', '.join(suffixes)}) in {list(map(str, paths))}"
        )
    return [CorpusFile(p, p.stat().st_size) for p in sorted(found, key=lambda p: p.as_posix())]


def _files_under(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files with a wanted suffix below `folder`, skipping hidden files and folders
    (.git, .venv, ...), which hold tooling rather than corpus text."""
    return [
        p
        for p in folder.rglob("*")
        if p.suffix in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]


def iter_chunks(file: Path, jsonl_field: str = "text") -> Iterator[str]:
    """Yield the text of one file in pieces that never split a pre-token.

    Each `.jsonl` record is its own document (pre-tokens never join two records).
    """
    if file.suffix == ".jsonl":
        yield from _iter_jsonl_documents(file, jsonl_field)
    else:
        yield from _iter_text_chunks(file)


def _iter_text_chunks(file: Path) -> Iterator[str]:
    carry = ""
    with open(file, encoding="utf-8", errors="replace", newline="") as f:
        while block := f.read(CHUNK_CHARS):
            buffer = carry + block
            cut = _last_safe_cut(buffer)
            if cut == 0 and len(buffer) < MAX_CARRY_CHARS:
                carry = buffer
                continue
            if cut == 0:
                cut = len(buffer)
            yield buffer[:cut]
            carry = buffer[cut:]
    if carry:
        yield carry


def _last_safe_cut(buffer: str) -> int:
    """Index just after the last "\\n" between two non-space characters, or 0."""
    start = len(buffer)
    while start > 0:
        # Search backwards in windows so a long buffer is not scanned from the front.
        window_start = max(0, start - 65536)
        matches = list(_SAFE_CUT.finditer(buffer, window_start, min(len(buffer), start + 1)))
        if matches:
            return matches[-1].start() + 1
        start = window_start
    return 0


def _iter_jsonl_documents(file: Path, field: str) -> Iterator[str]:
    with open(file, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{file}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise TokenizerError(f"{file}:{line_no}: record has no {field!r} field")
            value = record[field]
            if not isinstance(value, str):
                raise TokenizerError(f"{file}:{line_no}: field {field!r} is not a string")
            yield value


def stdlib_sample(max_bytes: int, docstring_share: float = 0.3, stride: int = 1) -> list[str]:
    """A deterministic sample of real text that exists wherever Python does.

    Returns documents from the running interpreter's standard library: the docstrings of
    its modules (English prose, up to `docstring_share` of the bytes) and then whole
    source files, taken in sorted path order (every `stride`-th file), until `max_bytes`
    of UTF-8 are collected. For tests, benchmarks and demos; not a training corpus.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [
        p
        for p in sorted(root.rglob("*.py"), key=lambda p: p.as_posix())
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    ][::stride]
    docs: list[str] = []
    budget_docs = int(max_bytes * docstring_share)
    used = 0
    for path in sources:
        if used >= budget_docs:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED_NODES))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
                used += len(doc.encode("utf-8"))
    for path in sources:
        if used >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        used += len(text.encode("utf-8"))
    return docs
