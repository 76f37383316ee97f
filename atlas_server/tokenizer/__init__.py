"""Atlas's byte-level BPE tokenizer (pure Python + regex; imports nothing else of Atlas).

`bpe` encodes and decodes, `train` learns merges from files, `corpus` streams training
text, `hf_format` reads and writes a Hugging Face byte-level `tokenizer.json` (Atlas's own
file is `atlas_tokenizer.json`). Neither tiktoken nor HF
`tokenizers` is imported here: the equivalent objects the tests compare against are built
in `bench/reference_tokenizers.py`. See docs/tokenizer.md.
"""

from .bpe import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    IM_END,
    IM_START,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    byte_level_tokenizer,
)
from .train import TrainConfig, TrainStats, train_from_files, train_from_texts

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "ENDOFTEXT",
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "IM_END",
    "IM_START",
    "TOKENIZER_FILE",
    "Tokenizer",
    "TokenizerError",
    "TrainConfig",
    "TrainStats",
    "byte_level_tokenizer",
    "train_from_files",
    "train_from_texts",
]
