"""Atomic writes and tokenizer edges a mutation pass found unguarded: the mode of files
written atomically, no temporary left behind by a failed write, every file of an atomic
folder flushed before the swap, the bounded piece cache, and the longest special token
winning when one is a prefix of another.

References: what a plain open() under the umask gives, the /proc view of the fds that
os.fsync is called on, tiktoken (same ranks, no special tokens) for the ids, and Hugging
Face `tokenizers` for special-token matching (longest first at a position).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import tiktoken
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import atlas_server.tokenizer.bpe as bpe
from atlas_server import io
from atlas_server.tokenizer import Tokenizer
from atlas_server.tokenizer.bpe import GPT4_SPLIT_PATTERN


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- C7: atomically written files get the umask's mode, not mkstemp's 0600 -------------------
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_atomically_written_files_have_the_mode_a_plain_open_gives(tmp_path, mask):
    previous = os.umask(mask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        written = [
            io.atomic_write_text(tmp_path / "a.txt", "text"),
            io.atomic_write_bytes(tmp_path / "b.bin", b"\0\1"),
            io.atomic_write_json(tmp_path / "c.json", {"k": 1}),
            io.save_safetensors(tmp_path / "d.safetensors", {"w": torch.zeros(2)}),
            io.atomic_write_text(tmp_path / "a.txt", "replaced"),  # over an existing file
        ]
    finally:
        os.umask(previous)
    assert _mode(plain) == 0o666 & ~mask
    for path in written:
        assert _mode(path) == 0o666 & ~mask, path.name
    assert (tmp_path / "a.txt").read_text() == "replaced"


def test_an_atomic_folder_and_its_files_follow_the_umask(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    with io.atomic_directory(target) as tmp:
        (tmp / "private.bin").write_bytes(b"x")
        os.chmod(tmp / "private.bin", 0o600)  # as safetensors' own writer leaves it
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.txt").write_text("y")
    assert _mode(target) == 0o755
    assert _mode(target / "sub") == 0o755
    assert _mode(target / "private.bin") == 0o644
    assert _mode(target / "sub" / "f.txt") == 0o644


# --- C3: a failed write leaves no .NAME.*.tmp sibling ---------------------------------------
def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    io.atomic_write_json(target, {"old": True})

    def boom(f):
        f.write("half of the new conte")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        io._write_atomically(target, "w", boom)
    assert _siblings(tmp_path) == ["data.json"]
    assert json.loads(target.read_text()) == {"old": True}

    with pytest.raises(TypeError):  # the failure inside a public writer
        io.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert _siblings(tmp_path) == ["data.json"]


def test_a_rename_that_fails_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "new.txt"

    def refuse(src, dst):
        raise PermissionError("rename refused")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(PermissionError):
        io.atomic_write_text(target, "text")
    assert _siblings(tmp_path) == []


# --- C2: every file of an atomic folder is fsynced before the folder is swapped in ----------
def test_every_file_is_fsynced_before_the_folder_is_swapped_in(tmp_path, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("the previous folder")
    names = ["config.json", "weights.bin", "nested/more.txt", "nested/deeper/last.bin"]
    with io.atomic_directory(target) as tmp:
        tmp_real = os.path.realpath(tmp)
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(name.encode())  # plain writes: nothing flushed yet
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(
        names
    )
    swap = events.index(("replace", tmp_real, os.path.realpath(target)))
    synced = {e[1] for e in events[:swap] if e[0] == "fsync"}
    for name in names:
        assert os.path.join(tmp_real, name) in synced, name


# --- K2: the piece cache is bounded ----------------------------------------------------------
RANKS = {bytes([b]): b for b in range(256)} | {
    b"th": 256,
    b"he": 257,
    b"the": 258,
    b" the": 259,
    b"in": 260,
    b"ing": 261,
}


def _distinct_words(n: int) -> list[str]:
    return [f"the{chr(97 + i % 26)}{i}ing" for i in range(n)]


def test_the_piece_cache_stays_within_its_bound(monkeypatch):
    monkeypatch.setattr(bpe, "CACHE_MAX_PIECES", 8)
    tok = Tokenizer(dict(RANKS))
    reference = tiktoken.Encoding(
        "edges", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=dict(RANKS), special_tokens={}
    )
    words = _distinct_words(100)
    for word in words:  # one at a time: each call adds new pieces
        text = f"{word} the {word}"
        assert tok.encode(text) == reference.encode_ordinary(text)
        assert len(tok._cache) <= 8
    text = " ".join(words)  # one call with more new pieces than the bound
    assert tok.encode(text) == reference.encode_ordinary(text)
    assert len(tok._cache) <= 8
    assert tok.encode("the the the") == reference.encode_ordinary("the the the")
    assert 0 < len(tok._cache) <= 8  # the cache still serves what fits


# --- K4: a special token that is a prefix of another: the longer one wins ------------------
SPECIALS = ["<|a|>", "<|a|>b", "<s>", "<s>x", "<|e|>ff", "<|e|>"]


def _atlas_segments(tok: Tokenizer, ids: list[int]) -> list[tuple[str, str]]:
    """[("special", token) or ("text", decoded run)], runs of ordinary ids joined."""
    out: list[tuple[str, str]] = []
    run: list[int] = []
    for i in [*ids, None]:
        if i is None or i in tok.id_to_special:
            if run:
                out.append(("text", tok.decode(run)))
                run = []
            if i is not None:
                out.append(("special", tok.id_to_special[i]))
        else:
            run.append(i)
    return out


def _hf_segments(text: str) -> list[tuple[str, str]]:
    """The same segmentation by Hugging Face tokenizers (added specials, longest first)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.add_special_tokens(SPECIALS)
    enc = hf.encode(text)
    spans: list[list] = []  # [kind, start, end]
    for token, (a, b) in zip(enc.tokens, enc.offsets, strict=True):
        if token in SPECIALS:
            spans.append(["special", a, b])
        elif spans and spans[-1][0] == "text":
            spans[-1][2] = max(spans[-1][2], b)
        else:
            spans.append(["text", a, b])
    return [(kind, text[a:b]) for kind, a, b in spans]


TEXTS = [
    "<|a|>b",
    "x<|a|>bc<|a|>",
    "<s>x<|e|>ff <|a|>c",
    "<|e|>f<s><|e|>fff",
    "plain <|a|> then <|a|>bb and <s>xx",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_longest_special_token_at_a_position_wins(text):
    tok = Tokenizer(dict(RANKS), {s: 300 + i for i, s in enumerate(SPECIALS)})
    ids = tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert _atlas_segments(tok, ids) == _hf_segments(text)


def test_longest_special_token_by_hand_and_only_among_the_allowed():
    tok = Tokenizer(dict(RANKS), {s: 300 + i for i, s in enumerate(SPECIALS)})
    ids = tok.encode("x<|a|>bc<|a|>", allowed_special="all")
    assert _atlas_segments(tok, ids) == [
        ("text", "x"),
        ("special", "<|a|>b"),
        ("text", "c"),
        ("special", "<|a|>"),
    ]
    # Only the shorter one allowed: the longer one's text is the short special + text.
    ids = tok.encode("x<|a|>bc", allowed_special={"<|a|>"})
    assert _atlas_segments(tok, ids) == [("text", "x"), ("special", "<|a|>"), ("text", "bc")]
