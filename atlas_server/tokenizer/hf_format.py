"""Hugging Face byte-level BPE `tokenizer.json`: read it into an Atlas tokenizer, write one.

Reading: maps the vocabulary (strings in GPT-2's bytes-to-unicode alphabet) back to
raw bytes with the same ids, keeps the merge list, carries added/special tokens over, and
picks the split pattern: GPT-2's for a `ByteLevel` pre-tokenizer that uses its own regex,
or the regex of a `Split` pre-tokenizer (Llama 3 style). Atlas encodes by rank (lowest id
first), which equals merge-order BPE when ids follow merge order, as in GPT-2 style
vocabularies; `tests/test_hf_import.py` checks the ids against `tokenizers` on real text.

Writing (`tokenizer_to_hf_json`): the same vocabulary in the byte-level alphabet, the split
pattern as an isolated `Split` pre-tokenizer (GPT-2's pattern as the plain `ByteLevel` one),
special tokens as added tokens with their ids, and a merge list that makes the `tokenizers`
BPE model encode by Atlas's rule: every split of a token into two vocabulary tokens is a
merge, ranked by the merged token's id, and `ignore_merges` looks a whole pre-token up
first, as Atlas does. `tokenizer_config_json` adds what `transformers.AutoTokenizer` reads
(specials, chat template). `tests/test_hf_export.py` checks the ids against `tokenizers` and
`AutoTokenizer` on held-out text.

What it does not do: SentencePiece/Unigram/WordPiece models (refused with a clear error)
or normalizers (a tokenizer.json with a normalizer is refused: Atlas would encode differently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .bpe import ENDOFTEXT, GPT2_SPLIT_PATTERN, IM_END, IM_START, Tokenizer, TokenizerError

__all__ = [
    "CHATML_TEMPLATE",
    "gpt2_bytes_to_unicode",
    "merges_by_rank",
    "tokenizer_config_json",
    "tokenizer_from_hf_json",
    "tokenizer_to_hf_json",
]


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


# The chat format Atlas's server renders when a checkpoint brings no template of its own
# (atlas_server/api/chat.py): `<|im_start|>role\ncontent<|im_end|>\n` per message, then
# `<|im_start|>assistant\n` when a reply is asked for. No BOS token, no system default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def merges_by_rank(tokenizer: Tokenizer, as_text: dict[int, str]) -> list[list[str]]:
    """Every (left, right) split of every token into two vocabulary tokens, ordered by the
    merged token's id (then the halves'): BPE over this list merges, at each step, the
    adjacent pair whose concatenation has the lowest id, which is Atlas's rule."""
    ranks = tokenizer.ranks
    found: list[tuple[int, int, int]] = []
    for raw, rank in ranks.items():
        for cut in range(1, len(raw)):
            left, right = ranks.get(raw[:cut]), ranks.get(raw[cut:])
            if left is not None and right is not None:
                found.append((rank, left, right))
    found.sort()
    return [[as_text[left], as_text[right]] for _, left, right in found]


def tokenizer_to_hf_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The Hugging Face `tokenizers` JSON of an Atlas tokenizer (same ids, same encoding)."""
    to_char = gpt2_bytes_to_unicode()
    as_text = {i: "".join(to_char[b] for b in raw) for raw, i in tokenizer.ranks.items()}
    if tokenizer.pattern == GPT2_SPLIT_PATTERN:
        pre_tokenizer: dict[str, Any] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        }
    else:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tokenizer.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        }
    added = [
        {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, token_id in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,  # Atlas adds no BOS/EOS when encoding
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {as_text[i]: i for i in sorted(as_text)},
            "merges": merges_by_rank(tokenizer, as_text),
        },
    }


def tokenizer_config_json(
    tokenizer: Tokenizer, chat_template: str | None, model_max_length: int
) -> dict[str, Any]:
    """`tokenizer_config.json` for `transformers.AutoTokenizer`: specials and chat template.

    `chat_template` None gives the ChatML template Atlas serves by default, when the
    tokenizer has its tokens (else no template).
    """
    specials = tokenizer.special_tokens
    if chat_template is None and IM_START in specials and IM_END in specials:
        chat_template = CHATML_TEMPLATE
    eos = ENDOFTEXT if ENDOFTEXT in specials else None
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode gives the bytes back unchanged
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": None,
        "pad_token": None,
        "added_tokens_decoder": {
            str(token_id): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for text, token_id in sorted(specials.items(), key=lambda kv: kv[1])
        },
    }
    others = [t for t in sorted(specials, key=specials.get) if t != eos]
    if others:
        config["additional_special_tokens"] = others
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
