"""An Atlas-trained tokenizer encodes exactly like tiktoken and HF `tokenizers` given the same ranks.

The references are built from the Atlas tokenizer's ranks (tiktoken) and its vocabulary
and merge list (a byte-level `tokenizers` BPE model); neither library was written here.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from atlas_server.tokenizer import (
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    IM_END,
    IM_START,
    Tokenizer,
    TokenizerError,
)
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig, train_from_texts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from reference_tokenizers import to_hf_tokenizer, to_tiktoken  # noqa: E402

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")

ADVERSARIAL = [
    "",
    " ",
    "a",
    "Hello, world! It's 2024; we'll see — you're “quoted” and I've said 'no'.",
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 🧑🏿‍🚀 astronaut, 😀😀😀",
    "中文文本没有空格。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324 combining",
    "مرحبا بالعالم שלום עולם \u202eRTL override\u202c mixed",
    "control \x00 NUL \x01\x02\x1b[31m escape \x7f del \x1c\x1d\x1e\x1f seps",
    " " * 300 + "x" + "\t" * 50 + "\n" * 40 + "\r\n" * 30 + " \n \n\t\n",
    "1234567890" * 40 + " 3.14159 -42 1e10 0x1F ١٢٣ ४५६ ½ Ⅻ",
    "a" * 5000,
    "supercalifragilistic" * 200,
    "line one\r\nline two\rline three\nline four\r\n\r\n",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028line sep\u2029para\x85nel",
    "CamelCaseIdentifier snake_case_name kebab-case-name __dunder__ 'S 'LL 'Ve ſ K",
    "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@" * 20,
    "\ufeffBOM and \ufffd replacement and \U0010ffff max and \ue000 private use",
    "mixed\n\nascii then ünïcödé\nthen ascii again\n  indented\n\tnext é",
]


def _random_text(rng: random.Random, length: int) -> str:
    """Random strings biased towards characters the split pattern treats specially."""
    alphabets = [
        "abcXYZ ",
        " \t\n\r\x0b\x0c\x1c\x85\xa0\u2028",
        "0123456789١٢٣",
        "'sdmtlvre",
        "!?.,;:-_()[]{}\"'`",
        "éüñçßſK中文字😀👍🏽\u200d\u0301\u0300",
    ]
    out = []
    for _ in range(length):
        if rng.random() < 0.05:
            out.append(chr(rng.randrange(0x20, 0x30000)))
        else:
            out.append(rng.choice(rng.choice(alphabets)))
    return "".join(out).encode("utf-8", "replace").decode("utf-8")


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """About 3 MB of stdlib docstrings and sources: even documents train, odd ones test."""
    docs = stdlib_sample(3_000_000, docstring_share=0.2)
    return docs[::2], docs[1::2]


@pytest.fixture(scope="module")
def trained(corpus) -> Tokenizer:
    train, _ = corpus
    return train_from_texts(train, TrainConfig(vocab_size=2000))


@pytest.fixture(scope="module")
def trained_gpt2_pattern(corpus) -> Tokenizer:
    train, _ = corpus
    return train_from_texts(train[:200], TrainConfig(vocab_size=600, pattern=GPT2_SPLIT_PATTERN))


@pytest.fixture(scope="module")
def references(trained):
    return to_tiktoken(trained), to_hf_tokenizer(trained)


def test_trained_vocabulary_is_bytes_then_merges_then_specials(trained):
    assert [trained.ranks[bytes([b])] for b in range(256)] == list(range(256))
    assert len(trained.merges) == 2000 - 256 - 3
    for i, (left, right) in enumerate(trained.merges):
        assert trained.ranks[trained.id_to_bytes[left] + trained.id_to_bytes[right]] == 256 + i
    assert sorted(trained.special_tokens.values()) == [1997, 1998, 1999]


def test_held_out_stdlib_text_matches_tiktoken_and_hf(trained, references, corpus):
    enc, hf = references
    _, held_out = corpus
    assert sum(len(d) for d in held_out) > 1_000_000
    ours = trained.encode_batch(held_out)
    assert ours == enc.encode_ordinary_batch(held_out, num_threads=1)
    assert ours == [e.ids for e in hf.encode_batch(held_out, add_special_tokens=False)]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_text_matches_tiktoken_and_hf(trained, references, text):
    enc, hf = references
    ours = trained.encode_ordinary(text)
    assert ours == enc.encode_ordinary(text)
    assert ours == hf.encode(text, add_special_tokens=False).ids
    assert trained.decode(ours) == text


def test_random_strings_match_tiktoken(trained, references):
    enc, _ = references
    rng = random.Random(1234)
    for _ in range(300):
        text = _random_text(rng, rng.randrange(0, 200))
        assert trained.encode_ordinary(text) == enc.encode_ordinary(text), repr(text)


def test_gpt2_pattern_matches_tiktoken_and_hf(trained_gpt2_pattern, corpus):
    enc, hf = to_tiktoken(trained_gpt2_pattern), to_hf_tokenizer(trained_gpt2_pattern)
    texts = corpus[1][:100] + ADVERSARIAL
    ours = trained_gpt2_pattern.encode_batch(texts)
    assert ours == enc.encode_ordinary_batch(texts, num_threads=1)
    assert ours == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_lone_surrogates_become_replacement_characters_like_tiktoken(trained, references):
    enc, _ = references
    for text in ["a\ud800b", "\udfff", "x\ud83d\ude00y", "\ud83d", "ok \udc80\udc80 end"]:
        ours = trained.encode(text)
        assert ours == enc.encode(text)
        expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert trained.decode(ours) == expected


@pytest.mark.parametrize(
    "allowed",
    [set(), {ENDOFTEXT}, {IM_START, IM_END}, "all"],
    ids=["none", "eot", "chat", "all"],
)
def test_allowed_special_matches_tiktoken(trained, references, allowed):
    enc, _ = references
    text = f"{IM_START}user\nhi{IM_END}\n{ENDOFTEXT}tail <|im_start <|endoftext|>{IM_START}"
    expected = enc.encode(text, allowed_special=allowed, disallowed_special=())
    assert trained.encode(text, allowed_special=allowed) == expected


def test_special_tokens_match_hf_added_tokens(trained, references):
    _, hf = references
    text = f"{IM_START}assistant\nsure{IM_END}{ENDOFTEXT}"
    assert trained.encode(text, allowed_special="all") == hf.encode(text).ids
    assert hf.decode(trained.encode(text, allowed_special="all"), skip_special_tokens=False) == text


def test_unknown_allowed_special_is_an_error(trained):
    with pytest.raises(TokenizerError, match="not special tokens"):
        trained.encode("x", allowed_special={"<|nope|>"})


def test_decode_matches_hf_decoder(trained, references, corpus):
    _, hf = references
    ids = trained.encode(corpus[1][0][:5000])
    assert trained.decode(ids) == hf.decode(ids)


def test_hf_export_needs_a_merge_list():
    ranks_only = Tokenizer({bytes([b]): b for b in range(256)}, merges=None)
    with pytest.raises(TokenizerError, match="no merge list"):
        to_hf_tokenizer(ranks_only)


def test_the_tokenizer_package_imports_neither_tiktoken_nor_hugging_face():
    """The from-scratch core stays free of the libraries it is checked against."""
    import ast

    import atlas_server.tokenizer as package

    banned = {"tiktoken", "tokenizers", "transformers", "huggingface_hub"}
    for source in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & banned, f"{source.name} imports {names}"
