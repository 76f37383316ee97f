"""Atlas's byte-level BPE tokenizer (pure Python + regex; imports nothing else of Atlas)."""

from .bpe import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    IM_END,
    IM_START,
    Tokenizer,
    TokenizerError,
    byte_level_tokenizer,
)

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "ENDOFTEXT",
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "IM_END",
    "IM_START",
    "Tokenizer",
    "TokenizerError",
    "byte_level_tokenizer",
]
