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

Special and added tokens are written into the vocabulary too, with their ids: `tokenizers`
ignores an added token's own id. `post_processor_ids` reads what a post-processor adds
around each text (Llama 3's BOS), which an Atlas tokenizer cannot hold; the export can
write it back. Both ways carry an NFC normalizer and non-special added tokens (matched in any text before
pre-tokenization), and GPT-2's split after isolated digits (`Digits` + `ByteLevel`, SmolLM).
What it does not do: SentencePiece/Unigram/WordPiece models (refused with a clear error),
normalizers other than NFC, or other pre-tokenizers (refused: Atlas would encode differently).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bpe import ENDOFTEXT, GPT2_SPLIT_PATTERN, IM_END, IM_START, Tokenizer, TokenizerError

__all__ = [
    "CHATML_TEMPLATE",
    "gpt2_bytes_to_unicode",
    "merges_by_rank",
    "post_processor_ids",
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


# GPT-2's split after digits are isolated one by one (a `Digits(individual_digits)`
# pre-tokenizer before `ByteLevel`, as in SmolLM's and StarCoder's tokenizers), as one
# pattern: a digit is a piece of its own, no other piece holds a digit, and a whitespace
# run that ends before a digit ends a segment there, as it would at the end of the text.
DIGITS_GPT2_SPLIT_PATTERN = (
    r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)


def _normalizer(spec: dict[str, Any] | None) -> str | None:
    if spec is None:
        return None
    if spec.get("type") == "Sequence" and len(spec.get("normalizers", [])) == 1:
        spec = spec["normalizers"][0]
    if spec.get("type") == "NFC":
        return "NFC"
    raise TokenizerError(
        f"tokenizer.json has a {spec.get('type')!r} normalizer; Atlas supports NFC only"
    )


def _split_pattern(pre: dict[str, Any] | None) -> str:
    if pre is None:
        raise TokenizerError("tokenizer.json has no pre-tokenizer; Atlas needs a byte-level one")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise TokenizerError("ByteLevel pre-tokenizers with add_prefix_space are not supported")
        if not pre.get("use_regex", True):  # no split at all: the whole text is one piece
            raise TokenizerError(
                "a ByteLevel pre-tokenizer with use_regex=false and no Split is not supported "
                "(Atlas needs a split pattern)"
            )
        return GPT2_SPLIT_PATTERN
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [part.get("type") for part in parts]
        if kinds == ["Digits", "ByteLevel"]:
            digits, byte_level = parts
            if (
                digits.get("individual_digits")
                and byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")
            ):
                return DIGITS_GPT2_SPLIT_PATTERN
            raise TokenizerError(
                "Digits + ByteLevel pre-tokenizers are supported with individual_digits, "
                "use_regex and no add_prefix_space only"
            )
        patterns = []
        for part in parts:
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
            "(SentencePiece tokenizers such as Llama 2's are not byte-level)"
        )
    normalizer = _normalizer(data.get("normalizer"))
    pattern = _split_pattern(data.get("pre_tokenizer"))
    added_list = data.get("added_tokens", [])
    added_ids = {int(a["id"]): a["content"] for a in added_list}
    to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in model.get("vocab", {}).items():
        try:
            raw = bytes(to_byte[ch] for ch in token)
        except KeyError:
            if added_ids.get(int(token_id)) == token:
                continue  # an added token (e.g. Pythia's raw "   "), handled below
            raise TokenizerError(
                f"vocabulary entry {token!r} is not in the byte-level alphabet"
            ) from None
        ranks[raw] = int(token_id)
    specials: dict[str, int] = {}
    added_tokens: dict[str, int] = {}
    for added in added_list:
        content, token_id = added["content"], int(added["id"])
        if ranks.get(content.encode()) == token_id:
            del ranks[content.encode()]  # GPT-2 lists <|endoftext|> in both places
        if added.get("special", True):
            specials[content] = token_id
            continue
        # Non-special added tokens are split out of any text, before pre-tokenization.
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise TokenizerError(
                f"added token {content!r} strips or matches single words; Atlas matches exactly"
            )
        added_tokens[content] = token_id
    merges = []
    id_of = {tok: i for tok, i in model.get("vocab", {}).items()}
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left not in id_of or right not in id_of:
            raise TokenizerError(f"merge {merge!r} names tokens missing from the vocabulary")
        merges.append((id_of[left], id_of[right]))
    return Tokenizer(ranks, specials, pattern, merges, name, normalizer, added_tokens)


def post_processor_ids(data: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The ids a tokenizer.json's post-processor adds around one text: (before, after).

    Llama 3's `TemplateProcessing` puts <|begin_of_text|> before every text. Atlas's
    tokenizer never adds tokens when encoding, so `import-hf` records these ids (and says
    so) for the exports to restore. GPT-2's `ByteLevel` post-processor adds nothing.
    """
    spec = data.get("post_processor")
    if spec is None:
        return [], []
    kind = spec.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        before: list[int] = []
        after: list[int] = []
        for part in spec.get("processors", []):
            b, a = post_processor_ids({"post_processor": part})
            before, after = b + before, after + a
        return before, after
    if kind != "TemplateProcessing":
        raise TokenizerError(f"tokenizer.json post-processor {kind!r} is not supported")
    try:
        table = {name: list(map(int, t["ids"])) for name, t in spec["special_tokens"].items()}
        before, after, seen = [], [], False
        for item in spec["single"]:
            if "Sequence" in item:
                seen = True
                continue
            (after if seen else before).extend(table[item["SpecialToken"]["id"]])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"tokenizer.json has a malformed TemplateProcessing: {e!r}") from None
    return before, after


def _template_processing(tokenizer: Tokenizer, before: list[int], after: list[int]) -> Any:
    """A `TemplateProcessing` post-processor adding `before` and `after` around each text."""
    names = {
        i: tokenizer.id_to_special.get(i) or tokenizer.id_to_added.get(i) for i in before + after
    }
    missing = [i for i, name in names.items() if name is None]
    if missing:
        raise TokenizerError(f"ids {missing} added around each text are not special tokens")

    def around(seq: str, type_id: int) -> list[dict[str, Any]]:
        def special(i: int) -> dict[str, Any]:
            return {"SpecialToken": {"id": names[i], "type_id": type_id}}

        return [*map(special, before), {"Sequence": {"id": seq, "type_id": type_id}}] + [
            *map(special, after)
        ]

    return {
        "type": "TemplateProcessing",
        "single": around("A", 0),
        "pair": around("A", 0) + around("B", 1),
        "special_tokens": {
            name: {"id": name, "ids": [i], "tokens": [name]} for i, name in names.items()
        },
    }


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


def tokenizer_to_hf_json(
    tokenizer: Tokenizer, before: Sequence[int] = (), after: Sequence[int] = ()
) -> dict[str, Any]:
    """The Hugging Face `tokenizers` JSON of an Atlas tokenizer (same ids, same encoding).

    `before`/`after`: special ids to add around every text (an imported Llama 3 BOS,
    `post_processor_ids`); by default none, as Atlas's own encode adds none.
    """
    to_char = gpt2_bytes_to_unicode()
    as_text = {i: "".join(to_char[b] for b in raw) for raw, i in tokenizer.ranks.items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if tokenizer.pattern == GPT2_SPLIT_PATTERN:
        pre_tokenizer: dict[str, Any] = {**byte_level, "use_regex": True}
    elif tokenizer.pattern == DIGITS_GPT2_SPLIT_PATTERN:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {**byte_level, "use_regex": True},
            ],
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
    added += [
        {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,  # matched in the normalized text, as Atlas does
            "special": False,
        }
        for text, token_id in sorted(tokenizer.added_tokens.items(), key=lambda kv: kv[1])
    ]
    added.sort(key=lambda a: a["id"])
    # `tokenizers` ignores an added token's "id": it takes the id of the same string in the
    # model's vocabulary, else appends it after the vocabulary. Listing every added token
    # in the vocabulary too (as GPT-2's file does with <|endoftext|>) keeps Atlas's ids,
    # wherever they are (SmolLM2 and Pythia have their specials at 0, 1, 2).
    vocab = {as_text[i]: i for i in sorted(as_text)}
    for a in added:
        if vocab.setdefault(a["content"], a["id"]) != a["id"]:
            raise TokenizerError(
                f"token {a['content']!r} (id {a['id']}) is spelled like ordinary token "
                f"{vocab[a['content']]} in the byte-level alphabet; tokenizers cannot hold both"
            )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": tokenizer.normalizer} if tokenizer.normalizer else None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": (
            _template_processing(tokenizer, list(before), list(after)) if before or after else None
        ),
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
            "vocab": vocab,
            "merges": merges_by_rank(tokenizer, as_text),
        },
    }


def tokenizer_config_json(
    tokenizer: Tokenizer,
    chat_template: str | None,
    model_max_length: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
) -> dict[str, Any]:
    """`tokenizer_config.json` for `transformers.AutoTokenizer`: specials and chat template.

    `chat_template` None gives the ChatML template Atlas serves by default, when the
    tokenizer has its tokens (else no template). `bos_id`/`eos_id` None (both) mean
    <|endoftext|> for both, as GPT-2 has it; `add_bos`/`add_eos` say that the
    tokenizer.json's post-processor adds them.
    """
    specials = tokenizer.special_tokens
    if chat_template is None and IM_START in specials and IM_END in specials:
        chat_template = CHATML_TEMPLATE
    if bos_id is None and eos_id is None:
        bos = eos = ENDOFTEXT if ENDOFTEXT in specials else None
    else:
        bos, eos = (
            None if i is None else tokenizer.id_to_special.get(i) or tokenizer.id_to_added.get(i)
            for i in (bos_id, eos_id)
        )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode gives the bytes back unchanged
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
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
    others = [t for t in sorted(specials, key=specials.get) if t not in (bos, eos)]
    if others:
        config["additional_special_tokens"] = others
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
