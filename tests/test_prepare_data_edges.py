"""`atlas-train prepare-data` at its edges: a corpus in one long text file is read and
tokenized in bounded pieces, each a document for the validation split, and its shards are
cut at --shard-tokens even inside a document (and resume there); a refusal after the
checks (no text at all) leaves no folder behind; binary and non-UTF-8 files are skipped,
each named, never tokenized as mojibake.

The size limits are made small here (WHOLE_FILE_CHARS, PIECE_CHARS) so that a few KB of
text shows what a file of gigabytes does, with the byte-level tokenizer (1 byte = 1 token).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import trainer.data as data
from trainer.cli import app
from trainer.data import DataError, is_validation, prepare_data, read_shard

WHOLE, PIECE = 2_000, 400  # the limits in these tests: files over 2,000 chars are cut


@pytest.fixture(scope="module")
def tok(tmp_path_factory, byte_tokenizer) -> Path:
    return byte_tokenizer.save(tmp_path_factory.mktemp("tok") / "atlas_tokenizer.json")


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(data, "WHOLE_FILE_CHARS", WHOLE)
    monkeypatch.setattr(data, "PIECE_CHARS", PIECE)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The refusal of a call: exit 1, and one `error:` line, the last (before it, the
    progress bar and the warnings may be on stderr)."""
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 1 and errors == lines[-1:], result.output
    return errors[0]


def corpus_text(lines: int, blank_every: int | None = 5) -> str:
    """Numbered lines (no two alike), with a blank line every `blank_every` lines."""
    out = []
    for i in range(lines):
        out.append(f"line {i:05d}: the quick brown fox jumps over the lazy dog\n")
        if blank_every and i % blank_every == blank_every - 1:
            out.append("\n")
    return "".join(out)


def documents_of(folder: Path, split: str) -> list[str]:
    """The texts of a split's documents, in order (byte tokens; 256 ends a document)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    tokens = np.concatenate([read_shard(folder / s["file"]) for s in manifest[split]] or [[]])
    ends = np.flatnonzero(tokens == 256)
    assert len(ends) == 0 or ends[-1] == len(tokens) - 1  # the last document is whole
    return [bytes(d[:-1].tolist()).decode() for d in np.split(tokens, ends + 1)[:-1]]


# --- D3: a corpus in one file -------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("paragraphs", corpus_text(600)),
        ("lines", corpus_text(600, blank_every=None)),
        ("words", " ".join(f"word{i}" for i in range(6_000))),  # no line end at all
    ],
)
def test_a_long_text_is_read_piece_by_piece_and_never_cut_inside_a_word(small_limits, kind, text):
    """The file is read as the pieces are needed (what is held stays bounded, whatever its
    size), and each piece ends at a blank line, else a line end, else before a space."""
    f = io.StringIO(text)
    pieces, held = [], []
    for piece in data._text_pieces(f):
        pieces.append(piece)
        held.append(f.tell() - sum(map(len, pieces)))  # read, not yet handed out
    assert "".join(pieces) == text and len(pieces) > len(text) // PIECE
    assert max(map(len, pieces)) <= PIECE
    assert max(held) <= 2 * WHOLE + 1, "the file was read ahead of its pieces"
    if kind == "paragraphs":
        assert all(p.endswith("\n\n") for p in pieces[:-1])
    elif kind == "lines":
        assert all(p.endswith("\n") for p in pieces[:-1])
    else:
        assert all(p.startswith(" ") for p in pieces[1:]), "a word was cut"


def test_a_long_file_becomes_pieces_with_a_validation_share(tmp_path, tok, small_limits):
    """One long file: documents of at most PIECE chars that are the file in order, some in
    validation, and shards of at most --shard-tokens. A short file is still one document,
    whole."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long = corpus_text(600)  # ~33 KB
    short = "A short file.\n\nIt has two paragraphs, and stays one document.\n"
    (corpus / "corpus.txt").write_text(long)
    (corpus / "short.txt").write_text(short)
    out = tmp_path / "tokens"
    manifest = prepare_data(
        [str(corpus)], tok, out, val_fraction=0.2, shard_tokens=1_000, workers=1,
        progress=False,
    )  # fmt: skip
    train, val = documents_of(out, "train"), documents_of(out, "val")
    assert train and val, "the validation split is drawn from the pieces"
    assert all(is_validation(d, 0.2) for d in val)
    assert not any(is_validation(d, 0.2) for d in train)
    assert manifest["documents"] == len(train) + len(val) > len(long) // PIECE
    assert short in train + val
    pieces = [d for d in train + val if d != short]
    assert max(map(len, pieces)) <= PIECE
    # In file order, the pieces are the file: merge the two splits back by where they fit.
    position, t, v = 0, [d for d in train if d != short], [d for d in val if d != short]
    while t or v:
        nxt = t if t and long.startswith(t[0], position) else v
        assert nxt and long.startswith(nxt[0], position), f"a gap at character {position}"
        position += len(nxt.pop(0))
    assert position == len(long)
    sizes = [s["tokens"] for s in manifest["train"] + manifest["val"]]
    assert len(manifest["train"]) > 2 and max(sizes) <= 1_000
    assert (
        manifest["train_tokens"] + manifest["val_tokens"]
        == len((long + short).encode()) + manifest["documents"]
    )


def test_jsonl_records_stay_one_document_each_however_long(tmp_path, tok, small_limits):
    records = [{"text": corpus_text(n)} for n in (10, 200, 5)]  # the second is ~11 KB
    assert len(records[1]["text"]) > WHOLE
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "tokens"
    manifest = prepare_data([str(source)], tok, out, 0.0, shard_tokens=3_000, workers=1,
                            progress=False)  # fmt: skip
    assert manifest["documents"] == 3
    assert documents_of(out, "train") == [r["text"] for r in records]


def test_shards_are_cut_at_shard_tokens_inside_a_document(tmp_path, tok):
    """One document of 5,001 tokens (its <|endoftext|> included) and --shard-tokens 1000:
    five shards of 1,000 and one of 1 (it was one shard of 5,001)."""
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"text": "x" * 5_000}) + "\n")
    out = tmp_path / "tokens"
    manifest = prepare_data([str(source)], tok, out, 0.0, shard_tokens=1_000, workers=1,
                            progress=False)  # fmt: skip
    assert [s["tokens"] for s in manifest["train"]] == [1_000] * 5 + [1]
    assert documents_of(out, "train") == ["x" * 5_000]


class Killed(BaseException):
    """What the test hook's SIGKILL becomes here: the run stops right after a checkpoint."""


def test_killed_inside_a_document_resumes_to_identical_shards(
    tmp_path, tok, small_limits, monkeypatch
):
    """Documents of ~400 tokens, shards of 150: every checkpoint falls inside a document,
    and progress.json says how many of its tokens are written; the resumed run ends
    byte-identical to an uninterrupted one (no token lost, none written twice)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "corpus.txt").write_text(corpus_text(300))
    args = dict(val_fraction=0.2, shard_tokens=150, workers=1, progress=False)
    whole = prepare_data([str(corpus)], tok, tmp_path / "whole", **args)

    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(data.os, "kill", kill)
    monkeypatch.setenv("ATLAS_TEST_SIGKILL_AFTER_SHARDS", "7")
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        prepare_data([str(corpus)], tok, out, **args)
    stopped = json.loads((out / "progress.json").read_text())
    assert stopped["next_doc_offset"] > 0 and not stopped["done"]
    monkeypatch.delenv("ATLAS_TEST_SIGKILL_AFTER_SHARDS")
    resumed = prepare_data([str(corpus)], tok, out, **args)
    for split in ("train", "val"):
        assert [s["sha256"] for s in resumed[split]] == [s["sha256"] for s in whole[split]]
    assert documents_of(out, "train") == documents_of(tmp_path / "whole", "train")


# --- D4: a refusal after the checks leaves nothing behind ---------------------------------
def test_input_with_no_text_is_refused_and_leaves_no_folder(tmp_path, tok):
    """It left atlas_tokenizer.json and progress.json, and the corrected command was then
    refused as "a preparation with other settings"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n\n")
    out = tmp_path / "new" / "deeper" / "tokens"
    result = invoke("prepare-data", empty, "--tokenizer", tok, "--output", out, "--workers", "1")
    assert "no training tokens were produced" in error_line(result)
    assert not (tmp_path / "new").exists()
    (empty / "a.txt").write_text("Now there is some text.\n")
    result = invoke(
        "prepare-data", empty, "--tokenizer", tok, "--output", out, "--workers", "1",
        "--val-fraction", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["train_tokens"] > 0


def test_a_bad_record_is_refused_and_leaves_no_folder(tmp_path, tok):
    source = tmp_path / "records.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "cut short\n')
    out = tmp_path / "tokens"
    result = invoke("prepare-data", source, "--tokenizer", tok, "--output", out, "--workers", "1")
    assert f"{source}:2 is not valid JSON" in error_line(result)
    assert not out.exists()


def test_a_refusal_leaves_an_existing_folder_as_it_was(tmp_path, tok):
    """Everything went to validation, after validation shards were written: they go, and
    the files that were there (a tokenizer file included) are as they were."""
    texts = [t for t in (f"document {i}\n" * 20 for i in range(50)) if is_validation(t, 0.9)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts[:6]):
        (corpus / f"d{i}.txt").write_text(text)
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "notes.md").write_text("mine\n")
    (out / "atlas_tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="everything went to validation"):
        prepare_data([str(corpus)], tok, out, 0.9, shard_tokens=100, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- D5: files that are not text ----------------------------------------------------------
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4
LATIN1 = "Café, naïve, garçon: Latin-1 text.\n".encode("latin-1")


def test_binary_and_non_utf8_files_are_skipped_each_named(tmp_path, tok, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = ["Plain text.\n", "Texte en UTF-8 : café, naïve.\n"]
    for i, text in enumerate(good):
        (corpus / f"good{i}.txt").write_text(text, encoding="utf-8")
    (corpus / "latin1.txt").write_bytes(LATIN1)
    program = tmp_path / "prog"  # an explicit file is taken whatever its name
    program.write_bytes(ELF)
    out = tmp_path / "tokens"
    with caplog.at_level("WARNING", logger="trainer.data"):
        manifest = prepare_data([str(corpus), str(program)], tok, out, 0.0, workers=1,
                                progress=False)  # fmt: skip
    assert sorted(documents_of(out, "train")) == sorted(good)
    assert manifest["documents"] == 2
    assert manifest["skipped"] == [
        {"file": str(corpus / "latin1.txt"), "reason": "not UTF-8 (byte 0xe9 at offset 3)"},
        {"file": str(program), "reason": "not text (a NUL byte at offset 7)"},
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert f"warning: skipped {program}: not text (a NUL byte at offset 7)" in warnings
    assert any(str(corpus / "latin1.txt") in w and "not UTF-8" in w for w in warnings)
    assert "warning: skipped 2 of 4 input files as not UTF-8 text (each named above)" in warnings
    # The command's summary line says it too.
    from typer.testing import CliRunner

    from trainer.cli import app

    result = CliRunner().invoke(app, ["prepare-data", str(corpus), str(program), "--tokenizer",
                                      str(tok), "--output", str(tmp_path / "cli"), "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "documents in " in result.output
        and "(2 input files skipped: not UTF-8 text)" in result.output
    )


def test_only_files_that_are_not_text_is_a_one_line_refusal(tmp_path, tok):
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "prog").write_bytes(ELF)
    out = tmp_path / "tokens"
    result = invoke(
        "prepare-data", tmp_path / "latin1.txt", tmp_path / "prog", "--tokenizer", tok,
        "--output", out, "--workers", "1",
    )  # fmt: skip
    error = error_line(result)
    assert "no training tokens were produced: none of the 2 input files is UTF-8 text" in error
    assert "latin1.txt: not UTF-8 (byte 0xe9 at offset 3)" in error
    assert not out.exists()


def test_utf8_check_reads_characters_across_its_blocks(tmp_path):
    """The file is checked in 1 MiB blocks: a character split between two is fine, and a
    bad byte is reported at its offset in the file."""
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"more text\n")
    assert data.not_text(path) is None
    path.write_bytes(b"a" * ((1 << 20) + 5) + b"\xff")
    assert data.not_text(path) == f"not UTF-8 (byte 0xff at offset {(1 << 20) + 5})"
    path.write_bytes(b"a" * 10 + "é".encode()[:1])
    assert data.not_text(path) == "not UTF-8 (it ends inside a character)"


# --- records whose text field is named otherwise ---------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_records_without_the_text_field_are_a_one_line_error_naming_the_fields(
    tmp_path, tok, suffix
):
    """Found by a QA pass: a .parquet without a `text` column gave a 54-line traceback, and a
    .jsonl whose records name it `content` dropped every record ("empty input")."""
    records = [{"content": f"Document {i} of a corpus." * 3, "id": i} for i in range(6)]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    refused = invoke("prepare-data", path, "--tokenizer", tok, "--output", tmp_path / "out",
                     "--workers", "1")  # fmt: skip
    line = error_line(refused)
    assert "'text'" in line and "'content'" in line and "--text-field" in line, line
    assert not (tmp_path / "out").exists()
    named = invoke("prepare-data", path, "--tokenizer", tok, "--output", tmp_path / "out",
                   "--workers", "1", "--val-fraction", "0", "--text-field", "content")  # fmt: skip
    assert named.exit_code == 0, named.output
    assert "from 6 documents" in named.output
