"""tiktoken and Hugging Face `tokenizers` objects that encode exactly like an Atlas tokenizer.

What it does: hands an Atlas tokenizer's ranks, pattern and special tokens to
`tiktoken.Encoding`, and its vocabulary and merges to a byte-level `tokenizers` BPE model
(bytes mapped through GPT-2's byte-to-unicode table, the split pattern as an isolated
`Split` pre-tokenizer). The tests use them as independent references and
`bench/bench_tokenizer.py` as its baseline; they also let an Atlas tokenizer run inside
tools that expect either library. They live here, not in `atlas_server/tokenizer/`, so the
from-scratch tokenizer never imports either library. What it does not do: read Hugging
Face files into Atlas (that is `atlas_server/tokenizer/hf_format.py`).
"""

from __future__ import annotations

from typing import Any

from atlas_server.tokenizer import Tokenizer, TokenizerError
from atlas_server.tokenizer.hf_format import gpt2_bytes_to_unicode

__all__ = ["to_hf_tokenizer", "to_tiktoken"]


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
