"""Core tokenizer behaviour: round trips, decoding anything, the fast split paths against the
plain `regex` split, the long-piece merge against the short one, the cache, and the file."""

from __future__ import annotations

import json
import random

import pytest
import regex

from atlas_server.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    IM_START,
    Tokenizer,
    TokenizerError,
)
from atlas_server.tokenizer import bpe as bpe_module
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig, train_from_texts

PIECES = [
    "abc",
    "Hello",
    " world",
    "'s",
    "'LL",
    "123",
    "4567",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\n\n  ",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x00",
    "!",
    "?!",
    " ...",
    "_",
    "é",
    "ß",
    "ſ",
    "K",
    "中文",
    "😀",
    "👍🏽",
    "\u200d",
    "\u0301",
    "\xa0",
    "\x85",
    "\u2028",
    "\u3000",
    "١٢",
    "½",
    "\ufffd",
]


def random_text(rng: random.Random, pieces: int) -> str:
    """Random concatenations of pieces chosen to sit on the split pattern's edges."""
    out = [rng.choice(PIECES) for _ in range(pieces)]
    if rng.random() < 0.3:
        out.append(chr(rng.randrange(0x20, 0x10FFFF)).encode("utf-8", "replace").decode())
    return "".join(out)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_from_texts(
        stdlib_sample(300_000, docstring_share=0.5, stride=4), TrainConfig(vocab_size=1000)
    )


def test_round_trip_of_many_random_and_adversarial_strings(trained, byte_tokenizer):
    rng = random.Random(20240601)
    texts = [random_text(rng, rng.randrange(0, 60)) for _ in range(2000)]
    texts += ["".join(chr(rng.randrange(1, 0x800)) for _ in range(300)) for _ in range(20)]
    for tok in (trained, byte_tokenizer):
        for text in texts:
            assert tok.decode(tok.encode(text)) == text, repr(text)


@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN], ids=["gpt4", "gpt2"])
def test_fast_split_equals_plain_regex_split(pattern):
    tok = Tokenizer({bytes([b]): b for b in range(256)}, pattern=pattern)
    plain = regex.compile(pattern)
    rng = random.Random(5)
    texts = [random_text(rng, rng.randrange(0, 80)) for _ in range(3000)]
    # ASCII-only texts take the `re` path; mixed ones switch between the two engines.
    texts += ["".join(chr(rng.randrange(0, 128)) for _ in range(200)) for _ in range(300)]
    texts += ["x\nA\n é\nB\n\n é\n  Z\n" * 3, "é\n", "\né", "a\n\x1cé", "\n" * 5 + "é" + "\n"]
    texts += ["a\x0b\x0b\n\n!\né", "é\x0b\n\nx\ny", "é \nx\n\x0b\x0b\n\n!"]
    for text in texts:
        assert tok.split_pieces(text) == plain.findall(text), repr(text)


def test_custom_pattern_is_used_as_given():
    tok = Tokenizer({bytes([b]): b for b in range(256)}, pattern=r"\S+|\s+")
    assert tok.split_pieces("ab  cd\n") == ["ab", "  ", "cd", "\n"]


def test_long_pieces_merge_like_short_ones(trained, monkeypatch):
    rng = random.Random(3)
    words = [
        bytes(rng.choice(b"the and of to in") for _ in range(rng.randrange(2, 400)))
        for _ in range(200)
    ]
    words += [b"a" * 1000, b"ab" * 700, "é".encode() * 300]
    slow_path = [bpe_module._merge_long_piece(w, trained.ranks) for w in words]
    monkeypatch.setattr(bpe_module, "LONG_PIECE_BYTES", 10**9)
    assert slow_path == [bpe_module.bpe_merge(w, trained.ranks) for w in words]


def test_very_long_word_encodes_quickly_and_round_trips(trained):
    text = "abcdefghij" * 20_000  # one 200 kB pre-token: quadratic merging would take minutes
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert len(ids) < len(text)


def test_decode_never_raises_and_marks_bad_utf8(trained):
    rng = random.Random(11)
    for _ in range(500):
        ids = [rng.randrange(-5, trained.vocab_size + 5) for _ in range(rng.randrange(0, 40))]
        assert isinstance(trained.decode(ids), str)
    assert trained.decode([0xE4, 0xB8]) == "\ufffd"  # first two bytes of a 3-byte character
    assert trained.decode_bytes([0xE4, 0xB8, 0xAD]).decode() == "中"


def test_special_tokens_come_only_from_allowed_text(trained):
    text = f"{ENDOFTEXT} and {IM_START}"
    special_ids = set(trained.special_tokens.values())
    assert not special_ids & set(trained.encode(text))
    assert not special_ids & set(trained.encode_ordinary(text))
    assert trained.encode(text, allowed_special={ENDOFTEXT}).count(trained.eot_id) == 1
    assert trained.decode(trained.encode(text, allowed_special="all")) == text


def test_encode_batch_equals_encoding_each_text(trained):
    texts = ["one", f"two{ENDOFTEXT}", "", "three é"]
    assert trained.encode_batch(texts, allowed_special="all") == [
        trained.encode(t, allowed_special="all") for t in texts
    ]


def test_cache_stays_bounded_and_results_stay_right(trained, monkeypatch):
    monkeypatch.setattr(bpe_module, "CACHE_MAX_PIECES", 50)
    tok = Tokenizer.from_dict(trained.to_dict())
    texts = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(20)]
    reference = Tokenizer.from_dict(trained.to_dict())
    monkeypatch.setattr(bpe_module, "CACHE_MAX_PIECES", 10**6)
    expected = [reference.encode(t) for t in texts]
    monkeypatch.setattr(bpe_module, "CACHE_MAX_PIECES", 50)
    for _ in range(2):
        assert [tok.encode(t) for t in texts] == expected
        assert len(tok._cache) <= 50


def test_byte_level_tokenizer_is_bytes_then_specials(byte_tokenizer):
    assert byte_tokenizer.vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS)
    assert byte_tokenizer.encode("hé") == [104, 0xC3, 0xA9]


def test_save_is_deterministic_and_loads_back(trained, tmp_path):
    first = trained.save(tmp_path / "a.json")
    second = Tokenizer.from_file(first).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    data = json.loads(first.read_text())
    assert data["format"] == "atlas-bpe" and data["version"] == 1
    assert data["merges"][0] == list(trained.merges[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="huggingface"), "not an Atlas tokenizer"),
        (lambda d: d.update(version=99), "format version 99"),
        (lambda d: d.update(tokens=d["tokens"][1:]), "needs all 256 single bytes"),
        (lambda d: d.update(tokens=[[0, "%%%"]]), "malformed tokenizer file"),
        (lambda d: d["tokens"].append([9999, d["tokens"][0][1]]), "appears twice"),
        (lambda d: d["tokens"].append([0, "YWJj"]), "appears twice"),
        (lambda d: d.pop("tokens"), "malformed tokenizer file"),
        (lambda d: d.update(special_tokens=["<x>"]), "malformed tokenizer file"),
        (lambda d: d.update(merges=[[1, 2, 3]]), "malformed tokenizer file"),
        (lambda d: d.update(pattern="(?<"), "invalid split pattern"),
        (lambda d: d["special_tokens"].update({"<x>": 5}), "reuse ids of ordinary tokens"),
    ],
)
def test_broken_files_are_rejected_with_the_reason(trained, mutate, message):
    data = json.loads(json.dumps(trained.to_dict()))
    mutate(data)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dict(data)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"[1, 2]", "a JSON list, not an object"), (b"\xff\xfe{}", "is not valid JSON")],
)
def test_unreadable_files_are_rejected_with_the_reason(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(tmp_path)


def test_lone_surrogates_are_replaced_not_raised(trained):
    assert trained.decode(trained.encode("a\ud800b")) == "a\ufffdb"
