"""Read a Hugging Face byte-level BPE `tokenizer.json` into an Atlas tokenizer.

What it does: maps the vocabulary (strings in GPT-2's bytes-to-unicode alphabet) back to
raw bytes with the same ids, keeps the merge list, carries added/special tokens over, and
picks the split pattern: GPT-2's for a `ByteLevel` pre-tokenizer that uses its own regex,
or the regex of a `Split` pre-tokenizer (Llama 3 style). Atlas encodes by rank (lowest id
first), which equals merge-order BPE when ids follow merge order, as in GPT-2 style
vocabularies; `tests/test_hf_import.py` checks the ids against `tokenizers` on real text.
What it does not do: SentencePiece/Unigram/WordPiece models (refused with a clear error)
or normalizers (a tokenizer.json with a normalizer is refused: Atlas would encode differently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .bpe import GPT2_SPLIT_PATTERN, Tokenizer, TokenizerError

__all__ = ["gpt2_bytes_to_unicode", "tokenizer_from_hf_json"]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order,
    to U+0100 and up. Byte-level BPE in `tokenizers` stores its vocabulary in this form.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _split_pattern(pre: dict[str, Any] | None) -> str:
    if pre is None:
        raise TokenizerError("tokenizer.json has no pre-tokenizer; Atlas needs a byte-level one")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise TokenizerError("ByteLevel pre-tokenizers with add_prefix_space are not supported")
        return GPT2_SPLIT_PATTERN
    if kind == "Sequence":
        patterns = []
        for part in pre.get("pretokenizers", []):
            if part.get("type") == "Split":
                regex = part.get("pattern", {}).get("Regex")
                if regex is None:
                    raise TokenizerError(
                        "Split pre-tokenizer with a plain string pattern is not supported"
                    )
                if part.get("behavior") != "Isolated" or part.get("invert"):
                    raise TokenizerError(
                        "only isolated, non-inverted Split pre-tokenizers are supported"
                    )
                patterns.append(regex)
            elif part.get("type") == "ByteLevel":
                if part.get("use_regex", True):
                    patterns.append(GPT2_SPLIT_PATTERN)
                if part.get("add_prefix_space"):
                    raise TokenizerError("ByteLevel with add_prefix_space is not supported")
            else:
                raise TokenizerError(f"pre-tokenizer {part.get('type')!r} is not supported")
        if len(patterns) != 1:
            raise TokenizerError(f"expected exactly one split regex, found {len(patterns)}")
        return patterns[0]
    raise TokenizerError(f"pre-tokenizer {kind!r} is not byte-level BPE")


def tokenizer_from_hf_json(
    source: str | os.PathLike | dict[str, Any], name: str = "hf"
) -> Tokenizer:
    """An Atlas tokenizer with the same ids as a Hugging Face byte-level BPE tokenizer.json."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer file at {path}") from None
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"tokenizer.json holds a {model.get('type')!r} model; Atlas imports byte-level BPE only "
            "(SentencePiece tokenizers such as Llama 2's are not byte-level): pass --tokenizer FILE"
        )
    if data.get("normalizer") is not None:
        raise TokenizerError("tokenizer.json has a normalizer; Atlas's byte-level BPE has none")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in model.get("vocab", {}).items():
        try:
            raw = bytes(to_byte[ch] for ch in token)
        except KeyError:
            raise TokenizerError(
                f"vocabulary entry {token!r} is not in the byte-level alphabet"
            ) from None
        ranks[raw] = int(token_id)
    specials = {}
    for added in data.get("added_tokens", []):
        content, token_id = added["content"], int(added["id"])
        if content.encode() in ranks and ranks[content.encode()] == token_id:
            del ranks[content.encode()]  # GPT-2 lists <|endoftext|> in both places
        specials[content] = token_id
    merges = []
    id_of = {tok: i for tok, i in model.get("vocab", {}).items()}
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left not in id_of or right not in id_of:
            raise TokenizerError(f"merge {merge!r} names tokens missing from the vocabulary")
        merges.append((id_of[left], id_of[right]))
    return Tokenizer(ranks, specials, pattern, merges, name=name)
