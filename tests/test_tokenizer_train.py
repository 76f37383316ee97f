"""Training: the incremental trainer against a recount-everything twin and HF's BpeTrainer,
determinism, streaming from files, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from atlas_server.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    Tokenizer,
    TokenizerError,
)
from atlas_server.tokenizer import corpus as corpus_module
from atlas_server.tokenizer import train as train_module
from atlas_server.tokenizer.corpus import iter_chunks, resolve_corpus_files, stdlib_sample
from atlas_server.tokenizer.hf_format import gpt2_bytes_to_unicode
from atlas_server.tokenizer.train import (
    TrainConfig,
    TrainStats,
    count_pretokens,
    learn_merges,
    train_from_files,
    train_from_texts,
)


def naive_merges(word_counts: dict[bytes, int], num_merges: int, min_frequency: int = 2):
    """The plain twin: recount every pair before every merge, same tie-break rule."""
    words = {w: [bytes([b]) for b in w] for w in word_counts}
    merges, known = [], {bytes([b]) for b in range(256)}
    for _ in range(num_merges):
        counts: Counter = Counter()
        for w, parts in words.items():
            for pair in pairwise(parts):
                counts[pair] += word_counts[w]
        candidates = [(-c, p) for p, c in counts.items() if p[0] + p[1] not in known]
        if not candidates:
            break
        neg_count, (left, right) = min(candidates)
        if -neg_count < min_frequency:
            break
        merges.append((left, right))
        known.add(left + right)
        for w, parts in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            words[w] = out
    return merges


def merges_as_bytes(merges, token_bytes):
    return [(token_bytes[a], token_bytes[b]) for a, b in merges]


@pytest.fixture(scope="module")
def docstrings() -> list[str]:
    return stdlib_sample(150_000, docstring_share=1.0, stride=3)


def test_incremental_trainer_equals_recounting_twin_on_real_text(docstrings):
    counts = count_pretokens(docstrings[:150])
    word_counts = {w.encode(): c for w, c in counts.items()}
    merges, token_bytes = learn_merges(word_counts, 300)
    assert merges_as_bytes(merges, token_bytes) == naive_merges(word_counts, 300)


def test_incremental_trainer_equals_twin_on_tie_heavy_random_words():
    # Few letters, small counts: ties at every step, overlapping pairs like "aaaa".
    rng = random.Random(7)
    word_counts: dict[bytes, int] = {}
    for _ in range(400):
        word = bytes(rng.choice(b"aabbc") for _ in range(rng.randrange(1, 9)))
        word_counts[word] = word_counts.get(word, 0) + rng.randrange(1, 4)
    merges, token_bytes = learn_merges(word_counts, 120, min_frequency=1)
    assert merges_as_bytes(merges, token_bytes) == naive_merges(word_counts, 120, 1)


def test_tie_break_prefers_lexicographically_smallest_pair():
    merges, token_bytes = learn_merges({b"zy": 5, b"ab": 5, b"ac": 5}, 1)
    assert merges_as_bytes(merges, token_bytes) == [(b"a", b"b")]


def test_first_merges_agree_with_hf_bpe_trainer(docstrings):
    """Until two pairs tie (HF breaks ties by its own ids), HF's trainer picks the same pairs."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    texts = docstrings[:300]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 200, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    hf.train_from_iterator(texts, trainer)
    to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    hf_merges = [
        tuple(bytes(to_byte[ch] for ch in part) for part in merge)
        for merge in json.loads(hf.to_str())["model"]["merges"]
    ]

    word_counts = {w.encode(): c for w, c in count_pretokens(texts).items()}
    merges, token_bytes = learn_merges(word_counts, 200)
    ours = merges_as_bytes(merges, token_bytes)
    diverge = next(
        (i for i, (a, b) in enumerate(zip(ours, hf_merges, strict=False)) if a != b), len(ours)
    )
    assert diverge >= 30
    if diverge < len(ours):
        # Where they part, the two choices must have had the same count: a tie.
        counts = pair_counts_after(word_counts, ours[:diverge])
        assert counts[ours[diverge]] == counts[hf_merges[diverge]]


def pair_counts_after(word_counts: dict[bytes, int], merges) -> Counter:
    counts: Counter = Counter()
    for word, count in word_counts.items():
        parts = [bytes([b]) for b in word]
        for left, right in merges:
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        for pair in pairwise(parts):
            counts[pair] += count
    return counts


def _write_corpus(root: Path, docs: list[str]) -> None:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")


def test_training_from_files_is_byte_identical_across_runs_and_hash_seeds(tmp_path, docstrings):
    _write_corpus(tmp_path / "corpus", docstrings[:120])
    config = TrainConfig(vocab_size=400)
    first = train_from_files([tmp_path / "corpus"], config, progress=False).save(
        tmp_path / "a.json"
    )
    # Listing order must not matter: name the same files one by one, in reverse order.
    files = sorted((tmp_path / "corpus").rglob("*.txt"), reverse=True)
    second = train_from_files(files, config, progress=False).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    script = (
        "import sys; from atlas_server.tokenizer.train import TrainConfig, train_from_files;"
        "train_from_files([sys.argv[1]], TrainConfig(vocab_size=400), progress=False).save(sys.argv[2])"
    )
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "corpus"), str(out)], check=True, env=env
        )
        assert out.read_bytes() == first.read_bytes()


def test_counting_in_worker_processes_gives_the_same_tokenizer(tmp_path, docstrings, monkeypatch):
    _write_corpus(tmp_path, docstrings[:200])
    monkeypatch.setattr(train_module, "WORKER_BATCH_BYTES", 20_000)  # several batches
    config = TrainConfig(vocab_size=400)
    one, two = TrainStats(), TrainStats()
    single = train_from_files([tmp_path], config, progress=False, stats=one)
    parallel = train_from_files([tmp_path], config, progress=False, stats=two, workers=2)
    assert parallel.to_dict() == single.to_dict()
    assert (two.files, two.bytes_read) == (one.files, one.bytes_read) == (200, two.bytes_read)


@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN], ids=["gpt4", "gpt2"])
def test_streamed_chunks_count_like_whole_files(tmp_path, monkeypatch, docstrings, pattern):
    text = "\n".join(docstrings[:80]) + "\n  tail with trailing space \n\n"
    text += "x\x0b\x0b\n\n!\nnext\n\n\nA" * 50
    path = tmp_path / "one.md"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 257)
    chunks = list(iter_chunks(path))
    assert len(chunks) > 20
    assert "".join(chunks) == text
    assert count_pretokens(chunks, pattern) == count_pretokens([text], pattern)


def test_line_without_safe_cut_is_cut_at_the_memory_bound(tmp_path, monkeypatch):
    path = tmp_path / "long.txt"
    path.write_text("word " * 1000, encoding="utf-8")
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 100)
    monkeypatch.setattr(corpus_module, "MAX_CARRY_CHARS", 1000)
    chunks = list(iter_chunks(path))
    assert "".join(chunks) == "word " * 1000
    assert max(map(len, chunks)) <= 1100


def test_jsonl_records_are_documents_under_the_chosen_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": "alpha beta", "id": 1}, {"body": "gamma\ndelta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_chunks(path, jsonl_field="body")) == ["alpha beta", "gamma\ndelta"]
    with pytest.raises(TokenizerError, match=r"data.jsonl:1: record has no 'text' field"):
        list(iter_chunks(path))


def test_jsonl_with_bad_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_chunks(path))


def test_folder_glob_and_file_list_resolve_to_sorted_unique_files(tmp_path):
    _write_corpus(tmp_path, ["a", "b", "c"])
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "tool.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    by_folder = resolve_corpus_files([tmp_path])
    by_glob = resolve_corpus_files([str(tmp_path / "**" / "*.txt"), tmp_path / "doc000.txt"])
    assert [f.path for f in by_folder] == [f.path for f in by_glob]
    assert [f.path.name for f in by_folder] == ["doc000.txt", "doc002.txt", "doc001.txt"]


def test_min_frequency_stops_training_early():
    # Pre-tokens: "hello" once, " hello" twice, " world" once: only the pairs inside
    # "hello" occur three times, and ties go to the smallest pair: "el" < "he".
    tok = train_from_texts(
        ["hello hello hello world"], TrainConfig(vocab_size=1000, min_frequency=3)
    )
    learned = [tok.id_to_bytes[i] for i in range(256, len(tok.ranks))]
    assert learned == [b"el", b"ell", b"ello", b"hello"]
    assert tok.special_tokens["<|endoftext|>"] == len(tok.ranks)


def test_stats_report_what_was_read(tmp_path):
    _write_corpus(tmp_path, ["one two three", "two three", "three"])
    stats = TrainStats()
    tok = train_from_files([tmp_path], TrainConfig(vocab_size=300), progress=False, stats=stats)
    assert stats.files == 3
    assert stats.bytes_read == sum(len(t) for t in ["one two three", "two three", "three"])
    assert stats.distinct_pretokens == 5  # one, " two", " three", two, three
    assert stats.merges == len(tok.merges)
    assert stats.stopped_early


def test_lone_surrogates_in_training_text_are_learned_as_replacement_characters():
    texts = ["x\ud800y " * 5, "x\udfffy " * 5, "\ud83d\ude00 " * 3]
    tok = train_from_texts(texts, TrainConfig(vocab_size=300))
    learned = {tok.id_to_bytes[i] for i in range(256, len(tok.ranks))}
    assert {"\ufffdy".encode(), "😀".encode()} <= learned  # the halves of a pair are joined
    assert tok.encode("x\ud800y") == tok.encode("x\ufffdy")
    assert tok.encode("\ud83d\ude00") == [tok.ranks["😀".encode()]]


def test_custom_special_tokens_follow_the_merges():
    tok = train_from_texts(["abc abc abc"], TrainConfig(vocab_size=262, special_tokens=("<s>",)))
    assert tok.special_tokens == {"<s>": len(tok.ranks)}
    assert tok.encode("<s>abc", allowed_special={"<s>"})[0] == tok.special_tokens["<s>"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(vocab_size=258), "vocab size 258 is too small"),
        (TrainConfig(vocab_size=300, special_tokens=("<a>", "<a>")), "special tokens repeat"),
        (TrainConfig(vocab_size=300, special_tokens=("",)), "empty string"),
        (TrainConfig(vocab_size=300, min_frequency=0), "min frequency"),
        (TrainConfig(vocab_size=300, pattern="(unclosed"), "invalid split pattern"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(config, message):
    with pytest.raises(TokenizerError, match=message):
        train_from_texts(["some text"], config)


def test_missing_paths_and_empty_corpora_are_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file or folder"):
        train_from_files([tmp_path / "nope"], TrainConfig(vocab_size=300), progress=False)
    with pytest.raises(TokenizerError, match="no files match"):
        train_from_files([str(tmp_path / "*.txt")], TrainConfig(vocab_size=300), progress=False)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(TokenizerError, match="corpus is empty"):
        train_from_files([tmp_path], TrainConfig(vocab_size=300), progress=False)
    with pytest.raises(TokenizerError, match="no training files"):
        (tmp_path / "nothing").mkdir()
        train_from_files([tmp_path / "nothing"], TrainConfig(vocab_size=300), progress=False)


def test_trained_tokenizer_survives_save_and_load(tmp_path, docstrings):
    tok = train_from_texts(docstrings[:50], TrainConfig(vocab_size=500))
    loaded = Tokenizer.from_file(tok.save(tmp_path))
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.encode(docstrings[60]) == tok.encode(docstrings[60])
