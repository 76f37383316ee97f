"""Byte-level BPE tokenizer: encode, decode and the tokenizer.json file (pure Python).

What it does: splits text with a regex pre-tokenizer, then merges the bytes of each
piece by rank (the lowest-ranked adjacent pair first, the rule tiktoken uses, which
gives the same ids as applying the merge list in order); decodes any id sequence;
reads and writes Atlas's `tokenizer.json`. What it does not do: learn merges (see
`train.py`) or import other formats (see `hf_format.py`).

Ids: a token's id is its rank. A tokenizer trained by Atlas has ids 0..255 for the 256
single bytes and merges from 256 up; an imported one (GPT-2, Llama 3) keeps its own
ids. Special tokens sit above the ordinary vocabulary and are produced only from the
strings named in `allowed_special`; otherwise their text is encoded as plain text.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
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
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"  # chat template (ChatML): start of a message
IM_END = "<|im_end|>"  # chat template: end of a message
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

FORMAT_NAME = "atlas-bpe"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer file or argument that Atlas cannot use; the message says why."""


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Merge the bytes of one pre-token by rank; returns the token ids (= ranks)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


class Tokenizer:
    """A byte-level BPE tokenizer defined by its ranks, special tokens and split pattern."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT4_SPLIT_PATTERN,
        merges: Sequence[tuple[int, int]] | None = None,
        name: str = "atlas",
    ) -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"byte-level BPE needs all 256 single bytes; {len(missing)} missing")
        self.ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        self._split = regex.compile(pattern)
        self.id_to_bytes: dict[int, bytes] = {i: b for b, i in ranks.items()}
        clash = [s for s, i in self.special_tokens.items() if i in self.id_to_bytes]
        if clash:
            raise TokenizerError(f"special tokens {clash} reuse ids of ordinary tokens")
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}
        self.merges = list(merges) if merges is not None else None
        self._cache: dict[bytes, list[int]] = {}
        self._special_split: dict[frozenset[str], regex.Pattern] = {}

    # --- properties -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One past the largest id, ordinary or special (the model's embedding rows)."""
        return max([*self.id_to_bytes, *self.id_to_special]) + 1

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one id; a special token yields its UTF-8 text."""
        if token_id in self.id_to_bytes:
            return self.id_to_bytes[token_id]
        if token_id in self.id_to_special:
            return self.id_to_special[token_id].encode()
        return b""

    # --- encoding -------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special tokens (their text is encoded like any other)."""
        ids: list[int] = []
        cache, ranks = self._cache, self.ranks
        for piece in self._split.findall(text):
            raw = piece.encode("utf-8")
            cached = cache.get(raw)
            if cached is None:
                cached = [ranks[raw]] if raw in ranks else bpe_merge(raw, ranks)
                if len(cache) < 500_000:
                    cache[raw] = cached
            ids.extend(cached)
        return ids

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

    def encode_batch(self, texts: Sequence[str], allowed_special: Iterable[str] | str = ()) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    # --- decoding -------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode any ids; invalid UTF-8 becomes U+FFFD and unknown ids decode to nothing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- file format ----------------------------------------------------------------
    def to_dict(self) -> dict:
        ordered = sorted(self.id_to_bytes.items())
        return {
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (temp file + rename); returns the path."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        atomic_write_text(path, text)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        if data.get("format") != FORMAT_NAME:
            raise TokenizerError(
                f"not an Atlas tokenizer (format={data.get('format')!r}); "
                "Hugging Face tokenizer.json files are converted by `atlas checkpoint import-hf`"
            )
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TokenizerError(
                f"tokenizer.json has format version {version}; this Atlas reads up to {FORMAT_VERSION}"
            )
        try:
            ranks = {base64.b64decode(b64): int(i) for i, b64 in data["tokens"]}
            merges = data.get("merges")
            return cls(
                ranks,
                {str(k): int(v) for k, v in data.get("special_tokens", {}).items()},
                data.get("pattern", GPT4_SPLIT_PATTERN),
                [tuple(m) for m in merges] if merges is not None else None,
                data.get("name", "atlas"),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"malformed tokenizer.json: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer file at {path}") from None
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
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
