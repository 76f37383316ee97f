"""Split documents into chunks that fit the embedder, at sentence and heading boundaries.

What it does: finds headings (Markdown `#` lines; reST titles underlined with `= - ~ ^ "
' * + #` characters), cuts each section into sentences (or paragraph lines), and packs
whole sentences into chunks of at most `max_tokens` (counted by the caller's function,
normally the embedder's word-piece count), repeating the last sentences of a chunk at the
start of the next up to `overlap_tokens`. A sentence too long for a chunk is packed word
by word instead, with the sentences around it; a run of more than `MAX_RUN` characters
without a space or punctuation (a hash, an emoji run) is cut into slices first, because
the tokenizer counts it as one piece whatever its length. Every chunk keeps its source,
nearest heading and character span, and gets a content-derived id, so re-ingesting the
same file produces the same ids.
What it does not do: read files (see `ingest.py`) or embed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .types import Chunk

NAMESPACE = uuid.UUID("6f1c7a52-6c7b-4f0e-9a7e-0a71a5c0ffee")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'*+#`])\1{2,}\s*$")
# A sentence ends at . ! ? (optionally followed by quotes/brackets) before whitespace,
# or at a blank line; lists and code lines end at their newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n|\n(?=\s*(?:[-*+]|\d+\.)\s)")
# WordPiece (MiniLM's tokenizer) reads a run of more than 100 characters (its
# max_input_chars_per_word) between spaces, punctuation and CJK ideographs as one [UNK], so
# counted whole a 50,000-character hash or emoji run is "1 piece" and was never cut.
MAX_RUN = 100
_RUN = re.compile(  # such a run; _long_runs also cuts it at non-ASCII punctuation
    r"[^\s!-/:-@\[-`{-~\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    rf"\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f]{{{MAX_RUN + 1},}}"
)


@dataclass(frozen=True)
class ChunkSettings:
    max_tokens: int = 200  # below MiniLM's 256-piece window, leaving room for special tokens
    overlap_tokens: int = 40


def chunk_id(source: str, start: int, end: int, text: str) -> str:
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(NAMESPACE, f"{source}\0{start}\0{end}\0{digest}"))


def sections(text: str) -> Iterator[tuple[str | None, int, int]]:
    """(heading, start, end) of each section; the heading line itself is not in the span."""
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    heading, start = None, 0
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\n")
        title, consumed = None, 0
        md = _MD_HEADING.match(line)
        if md:
            title, consumed = md.group(2), 1
        elif (
            i + 1 < len(lines)
            and line.strip()
            and _RST_UNDERLINE.match(lines[i + 1].rstrip("\n"))
            and len(lines[i + 1].strip()) >= len(line.strip())
        ):
            title, consumed = line.strip(), 2
        if title is not None:
            if offsets[i] > start:
                yield heading, start, offsets[i]
            heading = title
            start = offsets[i + consumed] if i + consumed < len(lines) else len(text)
            i += consumed
            continue
        i += 1
    if len(text) > start:
        yield heading, start, len(text)


def sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of sentences inside text[start:end], whitespace trimmed."""
    spans, cursor = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        spans.append((cursor, m.start()))
        cursor = m.end()
    spans.append((cursor, end))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def _long_runs(text: str, a: int, b: int) -> list[tuple[int, int]]:
    """Spans of the runs of more than MAX_RUN characters in text[a:b] (see _RUN)."""
    runs = []
    for m in _RUN.finditer(text, a, b):
        s = m.start()
        for i in range(s, m.end() + 1):
            if i == m.end() or unicodedata.category(text[i]).startswith("P"):
                if i - s > MAX_RUN:
                    runs.append((s, i))
                s = i + 1
    return runs


def _words(
    text: str, a: int, b: int, count: Callable[[str], int], limit: int
) -> list[tuple[int, int, int]]:
    """(start, end, pieces) of each word of text[a:b], for a sentence too long for a chunk.

    The words then pack into chunks like sentences do, so the short sentences around a long
    one share its chunks: cut into chunk-sized runs on its own, it left a heading-like
    remnant before it (a table row's `|`) as a chunk of one character, which outranked
    whole passages for short queries. A single word longer than `limit` (a URL, a base64
    blob) is cut between characters, so no part of the text is ever left for the
    embedder to truncate; so is a long run inside a word (_cut_run).
    """
    words: list[tuple[int, int, int]] = []
    for m in re.finditer(r"\S+", text[a:b]):
        s, e = a + m.start(), a + m.end()
        for r_start, r_end in [*_long_runs(text, s, e), (e, e)]:
            if r_start > s:  # the part of the word before the run (all of an ordinary word)
                n = count(text[s:r_start])
                words += (
                    _cut_word(text, s, r_start, count, limit) if n > limit else [(s, r_start, n)]
                )
            words += _cut_run(text, r_start, r_end, count, limit)
            s = r_end
    return words


def _cut_run(
    text: str, a: int, b: int, count: Callable[[str], int], limit: int
) -> list[tuple[int, int, int]]:
    """Slices of a long run, each of at least one piece per character: WordPiece makes at
    most one of a character, and one it has no piece for (an emoji) turns a whole word into
    one [UNK], which would let a run of them fill a chunk however long it is."""
    step = min(MAX_RUN, limit)
    slices = []
    for s in range(a, b, step):
        e = min(s + step, b)
        n = max(count(text[s:e]), e - s)
        slices += _cut_word(text, s, e, count, limit) if n > limit else [(s, e, n)]
    return slices


def _cut_word(
    text: str, a: int, b: int, count: Callable[[str], int], limit: int
) -> list[tuple[int, int, int]]:
    pieces = []
    while a < b:
        lo, hi = a + 1, b  # the longest prefix text[a:end] within the limit, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[a:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        pieces.append((a, lo, count(text[a:lo])))
        a = lo
    return pieces


def chunk_text(
    text: str,
    source: str,
    count: Callable[[str], int],
    settings: ChunkSettings,
    title: str | None = None,
    metadata: dict | None = None,
) -> list[Chunk]:
    """Chunks of `text` of at most `settings.max_tokens` pieces each, as `count` measures them.

    Each sentence is counted once and chunks are packed by summing counts (exact for
    word-piece tokenizers, whose pieces never span the whitespace between sentences);
    a packed chunk is re-counted before it is kept, so the limit holds for any counter.
    """
    chunks: list[Chunk] = []
    limit, overlap = settings.max_tokens, settings.overlap_tokens
    for heading, s_start, s_end in sections(text):
        units: list[tuple[int, int, int]] = []  # (start, end, pieces) of each sentence
        for a, b in sentences(text, s_start, s_end):
            n = count(text[a:b])
            long = n > limit or _long_runs(text, a, b)
            units += _words(text, a, b, count, limit) if long else [(a, b, n)]
        i = 0
        while i < len(units):
            j, total = i + 1, units[i][2]
            while j < len(units) and total + units[j][2] <= limit:
                total += units[j][2]
                j += 1
            while j > i + 1 and count(text[units[i][0] : units[j - 1][1]]) > limit:
                j -= 1  # a counter that is not additive (see the docstring)
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
            k, tail = j, 0
            while k - 1 > i and tail + units[k - 1][2] <= overlap:
                tail += units[k - 1][2]
                k -= 1
            i = k if k > i else j
    return chunks
