"""Byte-level BPE tokenizer: encode, decode and the atlas_tokenizer.json file (pure Python).

What it does: splits text with a regex pre-tokenizer, then merges the bytes of each
piece by rank (the lowest-ranked adjacent pair first, the rule tiktoken uses, which
gives the same ids as applying the merge list in order); decodes any id sequence;
reads and writes Atlas's `atlas_tokenizer.json` (and reads a Hugging Face `tokenizer.json`
through `hf_format.py`). Speed comes from caching the ids of each
distinct piece, keeping the per-piece work in C-level builtins, and splitting ASCII text
with `re` instead of `regex`. Lone surrogates in the input become U+FFFD (as in
tiktoken). Imported tokenizers may also bring an NFC normalizer (Qwen2, Pythia) and
"added tokens": ordinary ids matched in the text before pre-tokenization, longest first,
as Hugging Face `tokenizers` does for its non-special added tokens (Pythia's runs of
spaces). What it does not do: learn merges (see `train.py`), import other formats (see
`hf_format.py`), other normalizations, or use threads.

Ids: a token's id is its rank. A tokenizer trained by Atlas has ids 0..255 for the 256
single bytes and merges from 256 up; an imported one (GPT-2, Llama 3) keeps its own
ids. Special tokens sit above the ordinary vocabulary and are produced only from the
strings named in `allowed_special`; otherwise their text is encoded as plain text.
"""

from __future__ import annotations

import base64
import heapq
import json
import operator
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from itertools import chain, compress, repeat
from pathlib import Path

import regex

# The pre-tokenization pattern of OpenAI's cl100k_base (GPT-4): contractions, words with
# an optional leading non-letter, numbers of at most 3 digits, punctuation runs, newlines
# and other whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-2's pattern, for imported GPT-2 tokenizers.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same two patterns restricted to ASCII text, for Python's `re`, which splits ASCII
# about twice as fast as `regex`. Spelled out because `re`'s \s also matches \x1c-\x1f,
# which are not Unicode White_Space. The possessive quantifiers of the GPT-4 pattern can
# be plain ones here: what they forbid giving back could never lead to another match.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_EQUIVALENTS = {
    GPT4_SPLIT_PATTERN: (
        rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}"""
        rf"""| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
    ),
    GPT2_SPLIT_PATTERN: (
        rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"""
        rf"""|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
    ),
}
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"  # chat template (ChatML): start of a message
IM_END = "<|im_end|>"  # chat template: end of a message
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Distinct pre-tokens whose ids are kept per tokenizer (a few tens of MB at most).
CACHE_MAX_PIECES = 200_000

FORMAT_NAME = "atlas-bpe"
FORMAT_VERSION = 1
# Atlas's own file name. `tokenizer.json` is the Hugging Face `tokenizers` format's name;
# Atlas wrote its own format under that name before, so a folder holding only a
# `tokenizer.json` is still read (whichever of the two formats it is in).
TOKENIZER_FILE = "atlas_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file or argument that Atlas cannot use; the message says why."""


_SINGLE_BYTES = tuple(bytes([b]) for b in range(256))
# Above this many bytes a pre-token is merged with a heap (O(n log n)) instead of the
# rescanning loop (O(n^2) but with a small constant, faster for ordinary words).
LONG_PIECE_BYTES = 256
_NO_RANK = 1 << 62


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Merge the bytes of one pre-token by rank; returns the token ids (= ranks).

    At each step the adjacent pair whose concatenation has the lowest rank is merged,
    the leftmost one on ties: the rule tiktoken uses.
    """
    if len(piece) > LONG_PIECE_BYTES:
        return _merge_long_piece(piece, ranks)
    parts = list(map(_SINGLE_BYTES.__getitem__, piece))
    get = ranks.get
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]; updated locally after a merge.
    pair_ranks = list(map(get, map(operator.add, parts, parts[1:]), repeat(_NO_RANK)))
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_RANK:
            break
        i = pair_ranks.index(best)  # leftmost of equal ranks
        parts[i] += parts[i + 1]
        del parts[i + 1], pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _NO_RANK)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], _NO_RANK)
    return list(map(ranks.__getitem__, parts))


def _merge_long_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The same merge rule with a heap and a linked list, for very long pre-tokens."""
    n = len(piece)
    parts: list[bytes] = list(map(_SINGLE_BYTES.__getitem__, piece))  # by start index
    next_start = list(range(1, n + 1))  # n means "no next part"
    prev_start = list(range(-1, n - 1))
    alive = [True] * n
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get(parts[i] + parts[i + 1])) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = next_start[i] if alive[i] else n
        # Entries go stale when a neighbour merged; the current pair must still have this rank.
        if j >= n or ranks.get(parts[i] + parts[j]) != rank:
            continue
        parts[i] += parts[j]
        alive[j] = False
        next_start[i] = next_start[j]
        if next_start[i] < n:
            prev_start[next_start[i]] = i
        for left in (prev_start[i], i):
            right = next_start[left] if left >= 0 else n
            if left >= 0 and right < n:
                r = ranks.get(parts[left] + parts[right])
                if r is not None:
                    heapq.heappush(heap, (r, left))
    return [ranks[parts[i]] for i in range(n) if alive[i]]


def _is_safe_cut(text: str, i: int) -> bool:
    """Whether text may be cut before index i: visible ASCII, a line break, visible ASCII.

    The pre-token before the cut then ends in a whitespace run that is just the break, so
    it is the same whether or not the split sees what follows (the `(?!\\S)` lookahead).
    """
    return (
        i >= 2
        and text[i - 1] == "\n"
        and _is_visible_ascii(text[i])
        and _is_visible_ascii(text[i - 2])
    )


def _is_visible_ascii(ch: str) -> bool:
    return ch.isascii() and not ch.isspace()


def _safe_cut_before(text: str, lo: int, hi: int) -> int:
    """The last safe cut in (lo, hi], or lo."""
    i = text.rfind("\n", lo, hi)
    while i >= lo and not _is_safe_cut(text, i + 1):
        i = text.rfind("\n", lo, i)
    return i + 1 if i >= lo else lo


def _safe_cut_after(text: str, lo: int) -> int:
    """The first safe cut at or after lo, or len(text)."""
    i = text.find("\n", max(lo - 1, 0))
    while i != -1 and (i + 1 >= len(text) or not _is_safe_cut(text, i + 1)):
        i = text.find("\n", i + 1)
    return i + 1 if i != -1 else len(text)


def replace_lone_surrogates(text: str) -> str:
    """Pair up surrogate halves and replace lone ones with U+FFFD (what tiktoken does).

    Python strings may hold lone surrogates (e.g. from JSON "\\ud800"), which have no
    UTF-8 encoding; Atlas encodes them as U+FFFD rather than failing.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A byte-level BPE tokenizer defined by its ranks, special tokens and split pattern."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT4_SPLIT_PATTERN,
        merges: Sequence[tuple[int, int]] | None = None,
        name: str = "atlas",
        normalizer: str | None = None,
        added_tokens: dict[str, int] | None = None,
    ) -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(
                f"byte-level BPE needs all 256 single bytes; {len(missing)} missing"
            )
        self.ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        try:
            self._split = regex.compile(pattern)
        except regex.error as e:
            raise TokenizerError(f"invalid split pattern {pattern!r}: {e}") from None
        ascii_pattern = _ASCII_EQUIVALENTS.get(pattern)
        self._ascii_split = re.compile(ascii_pattern) if ascii_pattern else None
        self.id_to_bytes: dict[int, bytes] = {i: b for b, i in ranks.items()}
        clash = [s for s, i in self.special_tokens.items() if i in self.id_to_bytes]
        if clash:
            raise TokenizerError(f"special tokens {clash} reuse ids of ordinary tokens")
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}
        if normalizer not in (None, "NFC"):
            raise TokenizerError(f"normalizer {normalizer!r} is not supported (only NFC)")
        self.normalizer = normalizer
        self.added_tokens = dict(added_tokens or {})
        self.id_to_added = {i: t for t, i in self.added_tokens.items()}
        taken = set(self.id_to_bytes) | set(self.id_to_special)
        clash = [t for t, i in self.added_tokens.items() if i in taken or not t]
        if clash:
            raise TokenizerError(f"added tokens {clash} are empty or reuse ids of other tokens")
        # Longest first, so that at any position the longest added token wins.
        self._added_split = (
            regex.compile(
                "("
                + "|".join(map(regex.escape, sorted(self.added_tokens, key=len, reverse=True)))
                + ")"
            )
            if self.added_tokens
            else None
        )
        # Everything decode needs in one dict; the tokenizer is not changed after this.
        self._bytes_of = {**self.id_to_bytes}
        self._bytes_of.update((i, s.encode()) for i, s in self.id_to_special.items())
        self._bytes_of.update((i, t.encode()) for i, t in self.id_to_added.items())
        self._vocab_size = max(self._bytes_of) + 1
        self.merges = list(merges) if merges is not None else None
        self._cache: dict[str, list[int]] = {}
        self._special_split: dict[frozenset[str], regex.Pattern] = {}

    # --- properties -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One past the largest id, ordinary or special (the model's embedding rows)."""
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        """The id of <|endoftext|>, or None if this tokenizer has no such token."""
        return self.special_tokens.get(ENDOFTEXT)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one id; a special token yields its UTF-8 text."""
        if token_id in self.id_to_bytes:
            return self.id_to_bytes[token_id]
        if token_id in self.id_to_special:
            return self.id_to_special[token_id].encode()
        if token_id in self.id_to_added:
            return self.id_to_added[token_id].encode()
        return b""

    # --- encoding -------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special tokens (their text is encoded like any other)."""
        if self.normalizer is not None:
            text = unicodedata.normalize(self.normalizer, replace_lone_surrogates(text))
        if self._added_split is not None:
            ids: list[int] = []
            for i, part in enumerate(self._added_split.split(text)):
                if i % 2:  # odd parts are the captured added tokens
                    ids.append(self.added_tokens[part])
                elif part:
                    ids.extend(self._encode_plain(part))
            return ids
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return self._encode_pieces(self.split_pieces(text))
        except UnicodeEncodeError:
            return self._encode_pieces(self.split_pieces(replace_lone_surrogates(text)))

    def split_pieces(self, text: str) -> list[str]:
        """Pre-tokenize: the pieces the split pattern cuts `text` into."""
        if self._ascii_split is None:
            return self._split.findall(text)
        if text.isascii():
            return self._ascii_split.findall(text)
        return self._split_mixed(text)

    def _split_mixed(self, text: str) -> list[str]:
        """Split ASCII stretches with `re` and the stretches around non-ASCII with `regex`.

        Stretches are cut only at a line break between two visible ASCII characters:
        no pre-token of the GPT-2/GPT-4 patterns spans such a place, so the pieces are
        exactly those of splitting the whole text at once.
        """
        pieces: list[str] = []
        pos = 0
        for run in _NON_ASCII_RUN.finditer(text):
            if run.start() < pos:
                continue  # inside the stretch already handed to `regex`
            start = _safe_cut_before(text, pos, run.start())
            end = _safe_cut_after(text, run.end())
            pieces += self._ascii_split.findall(text, pos, start)
            pieces += self._split.findall(text, start, end)
            pos = end
        pieces += self._ascii_split.findall(text, pos)
        return pieces

    def _encode_pieces(self, pieces: list[str]) -> list[int]:
        # Most pre-tokens repeat, so the ids of each distinct piece are cached by its
        # text; the lookups, the miss check and the flattening all run in C.
        cache = self._cache
        if not cache:  # cold: every distinct piece is new, skip the lookups
            fresh = self._encode_distinct(set(pieces))
            return list(chain.from_iterable(map(fresh.__getitem__, pieces)))
        parts = list(map(cache.get, pieces))
        if None in parts:
            missing = set(compress(pieces, map(operator.is_, parts, repeat(None))))
            fresh = self._encode_distinct(missing)
            parts = list(map(fresh.get, pieces, parts))  # a miss takes its fresh ids
        return list(chain.from_iterable(parts))

    def _encode_distinct(self, pieces: set[str]) -> dict[str, list[int]]:
        """Merge each piece and remember the result (the cache is bounded)."""
        cache, ranks = self._cache, self.ranks
        fresh: dict[str, list[int]] = {}
        for piece in pieces:
            raw = piece.encode("utf-8")
            rank = ranks.get(raw)
            fresh[piece] = [rank] if rank is not None else bpe_merge(raw, ranks)
        if len(cache) + len(fresh) > CACHE_MAX_PIECES:
            cache.clear()  # crude but bounded; the next texts refill it with what repeats
        if len(fresh) <= CACHE_MAX_PIECES:
            cache.update(fresh)
        return fresh

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Encode text; special-token strings become special ids only if allowed.

        `allowed_special` is a set of special-token strings, or "all".
        """
        allowed = (
            frozenset(self.special_tokens)
            if allowed_special == "all"
            else frozenset(allowed_special)
        )
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = self._special_split.get(allowed)
        if splitter is None:
            alternatives = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
            splitter = self._special_split[allowed] = regex.compile(f"({alternatives})")
        ids: list[int] = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Sequence[str], allowed_special: Iterable[str] | str = ()
    ) -> list[list[int]]:
        """Encode each text (one thread; the piece cache is shared across the batch)."""
        return [self.encode(t, allowed_special) for t in texts]

    # --- decoding -------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of the ids joined; unknown ids contribute nothing."""
        return b"".join(map(self._bytes_of.get, map(int, ids), repeat(b"")))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode any ids; invalid UTF-8 becomes U+FFFD and unknown ids decode to nothing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- file format ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-ready content of atlas_tokenizer.json (see docs/tokenizer.md)."""
        ordered = sorted(self.id_to_bytes.items())
        data = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            # Token bytes are arbitrary (not always UTF-8), so they are stored as base64,
            # listed with their ids (ids of imported tokenizers need not start at 0 or be dense).
            "tokens": [[i, base64.b64encode(b).decode("ascii")] for i, b in ordered],
            "merges": [list(m) for m in self.merges] if self.merges is not None else None,
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
        }
        # Only imported tokenizers have these; leaving them out keeps other files unchanged.
        if self.normalizer is not None:
            data["normalizer"] = self.normalizer
        if self.added_tokens:
            data["added_tokens"] = dict(sorted(self.added_tokens.items(), key=lambda kv: kv[1]))
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer atomically (temp file + rename); returns the path.

        A folder gets `atlas_tokenizer.json` inside it.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        _atomic_write_text(path, text)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        """Build a tokenizer from a parsed Atlas tokenizer file; TokenizerError says what is wrong."""
        if not isinstance(data, dict):
            raise TokenizerError(
                f"not an Atlas tokenizer: a JSON {type(data).__name__}, not an object"
            )
        if data.get("format") != FORMAT_NAME:
            raise TokenizerError(
                f"not an Atlas tokenizer (format={data.get('format')!r}); "
                "Hugging Face tokenizer.json files are read by Tokenizer.from_file"
            )
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TokenizerError(
                f"tokenizer file has format version {version}; this Atlas reads up to {FORMAT_VERSION}"
            )
        try:
            ranks = {base64.b64decode(b64, validate=True): int(i) for i, b64 in data["tokens"]}
            if len(ranks) != len(data["tokens"]) or len(set(ranks.values())) != len(ranks):
                raise TokenizerError("malformed tokenizer file: a token or an id appears twice")
            merges = data.get("merges")
            return cls(
                ranks,
                {str(k): int(v) for k, v in data.get("special_tokens", {}).items()},
                data.get("pattern", GPT4_SPLIT_PATTERN),
                [(int(a), int(b)) for a, b in merges] if merges is not None else None,
                data.get("name", "atlas"),
                data.get("normalizer"),
                {str(k): int(v) for k, v in data.get("added_tokens", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"malformed tokenizer file: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer file, or the one inside a folder (a checkpoint, an HF model folder).

        A folder's `atlas_tokenizer.json` wins over its `tokenizer.json`. A file in the
        Hugging Face `tokenizers` format (byte-level BPE) is converted (see hf_format.py).
        """
        path = Path(path)
        if path.is_dir():
            legacy = path / HF_TOKENIZER_FILE
            own = path / TOKENIZER_FILE
            path = legacy if legacy.is_file() and not own.is_file() else own
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer file at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, dict) and "format" not in data and isinstance(data.get("model"), dict):
            from .hf_format import tokenizer_from_hf_json  # the HF `tokenizers` format

            return tokenizer_from_hf_json(data, name=path.parent.name or "hf")
        return cls.from_dict(data)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    A private copy of `atlas_server.io.atomic_write_text`: the tokenizer imports nothing
    else of Atlas (docs/architecture.md), so that it can be lifted out whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain exclusive open, not mkstemp: the file gets the umask's mode (0644 as a rule),
    # not 0600, so a server running as another user can read the tokenizer.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def byte_level_tokenizer(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """The untrained tokenizer: 256 byte tokens and the special tokens after them."""
    ranks = {bytes([b]): b for b in range(256)}
    return Tokenizer(ranks, {s: 256 + i for i, s in enumerate(special_tokens)}, merges=[])
