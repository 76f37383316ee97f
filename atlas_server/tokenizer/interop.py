"""Build tiktoken and Hugging Face `tokenizers` objects that encode exactly like an Atlas tokenizer.

What it does: hands an Atlas tokenizer's ranks, pattern and special tokens to
`tiktoken.Encoding`, and its vocabulary and merges to a byte-level `tokenizers` BPE model
(bytes mapped through GPT-2's byte-to-unicode table, the split pattern as an isolated
`Split` pre-tokenizer). Tests use these as independent references; users can use them to
run an Atlas tokenizer inside tools that expect either library. What it does not do:
read Hugging Face files into Atlas (that is `hf_format.py`) or add either library as a
dependency of the core (both are imported only when these functions are called).
"""

from __future__ import annotations

from typing import Any

from .bpe import Tokenizer, TokenizerError

__all__ = ["gpt2_bytes_to_unicode", "to_hf_tokenizer", "to_tiktoken"]


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


def to_tiktoken(tokenizer: Tokenizer, name: str | None = None) -> Any:
    """A `tiktoken.Encoding` with the same ranks, pattern and special tokens."""
    import tiktoken

    return tiktoken.Encoding(
        name or tokenizer.name,
        pat_str=tokenizer.pattern,
        mergeable_ranks=tokenizer.ranks,
        special_tokens=tokenizer.special_tokens,
    )


def to_hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A byte-level `tokenizers.Tokenizer` built from the same vocabulary and merges.

    Needs the merge list, which Atlas-trained tokenizers carry; special tokens are added
    as special tokens (matched before pre-tokenization, like `allowed_special="all"`).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tokenizer.merges is None:
        raise TokenizerError("this tokenizer has no merge list; a BPE model needs one")
    to_text = gpt2_bytes_to_unicode()

    def as_text(raw: bytes) -> str:
        return "".join(to_text[b] for b in raw)

    vocab = {as_text(raw): i for raw, i in tokenizer.ranks.items()}
    merges = [
        (as_text(tokenizer.id_to_bytes[left]), as_text(tokenizer.id_to_bytes[right]))
        for left, right in tokenizer.merges
    ]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    if tokenizer.special_tokens:
        from tokenizers import AddedToken

        # add_special_tokens assigns ids in order after the vocabulary, so add them by id.
        ordered = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in ordered])
        for text, token_id in ordered:
            if hf.token_to_id(text) != token_id:
                raise TokenizerError(
                    f"special token {text!r} got id {hf.token_to_id(text)} in tokenizers, "
                    f"not {token_id}: Atlas ids must follow the vocabulary without gaps"
                )
    return hf
