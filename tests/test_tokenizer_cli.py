"""`atlas tokenizer ...`: train, encode, decode and info through Typer's test runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas_server.commands.tokenizer import app
from atlas_server.tokenizer import ENDOFTEXT, Tokenizer
from atlas_server.tokenizer.corpus import stdlib_sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from reference_tokenizers import to_tiktoken  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(stdlib_sample(120_000, docstring_share=1.0, stride=5)):
        (root / f"doc{i:04d}.md").write_text(doc, encoding="utf-8")
    (root / "records.jsonl").write_text(
        "\n".join(json.dumps({"body": f"record number {i} of the jsonl file"}) for i in range(50)),
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def trained_file(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    result = runner.invoke(
        app,
        [
            "train",
            str(corpus_dir),
            "--vocab-size",
            "700",
            "--output",
            str(out),
            "--quiet",
            "--jsonl-field",
            "body",
        ],
    )
    assert result.exit_code == 0, result.output
    return out / "atlas_tokenizer.json"


def test_train_writes_a_loadable_tokenizer_and_a_summary(trained_file, corpus_dir, tmp_path):
    tok = Tokenizer.from_file(trained_file)
    assert tok.vocab_size == 700
    assert tok.encode(" record number") == to_tiktoken(tok).encode(" record number")
    result = runner.invoke(
        app,
        [
            "train",
            str(corpus_dir),
            "--vocab-size",
            "700",
            "-o",
            str(tmp_path),
            "-q",
            "--jsonl-field",
            "body",
        ],
    )
    assert "vocab size 700" in result.output
    assert (tmp_path / "atlas_tokenizer.json").read_bytes() == trained_file.read_bytes()


def test_train_options_reach_the_tokenizer(corpus_dir, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            str(corpus_dir / "doc0000.md"),
            "--vocab-size",
            "300",
            "-o",
            str(tmp_path),
            "-q",
            "--special-token",
            "<s>",
            "--special-token",
            "</s>",
            "--pattern",
            "gpt2",
            "--min-frequency",
            "1000000",
            "--name",
            "mine",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "stopped early" in result.output
    tok = Tokenizer.from_file(tmp_path)
    assert tok.special_tokens == {"<s>": 256, "</s>": 257}
    assert tok.name == "mine"
    assert tok.merges == []


def test_encode_then_decode_round_trips(trained_file):
    text = "def encode(self, text):\n    return 'héllo' 👋"
    encoded = runner.invoke(app, ["encode", "-t", str(trained_file), text])
    assert encoded.exit_code == 0, encoded.output
    ids = encoded.output.split()
    assert list(map(int, ids)) == Tokenizer.from_file(trained_file).encode(text)
    decoded = runner.invoke(app, ["decode", "-t", str(trained_file), *ids])
    assert decoded.output == text + "\n"


def test_encode_reads_stdin_and_allows_special_tokens_only_when_asked(trained_file):
    tok = Tokenizer.from_file(trained_file)
    plain = runner.invoke(app, ["encode", "-t", str(trained_file), "--json"], input=ENDOFTEXT)
    assert tok.eot_id not in json.loads(plain.output)
    special = runner.invoke(
        app, ["encode", "-t", str(trained_file), "--json", "--allow-special"], input=ENDOFTEXT
    )
    assert json.loads(special.output) == [tok.eot_id]


def test_encode_replaces_stdin_bytes_that_are_not_utf8(trained_file):
    tok = Tokenizer.from_file(trained_file)
    result = runner.invoke(app, ["encode", "-t", str(trained_file), "--json"], input=b"ok\xff")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == tok.encode("ok\ufffd")


def test_encode_tokens_view_shows_bytes(trained_file):
    result = runner.invoke(app, ["encode", "-t", str(trained_file), "--tokens", "a\x00"])
    assert result.output.splitlines()[-1] == "0\tb'\\x00'"


def test_decode_accepts_a_json_list_on_stdin(trained_file):
    tok = Tokenizer.from_file(trained_file)
    result = runner.invoke(
        app, ["decode", "-t", str(trained_file)], input=json.dumps(tok.encode("hi there"))
    )
    assert result.output == "hi there\n"


def test_info_reports_sizes_and_special_tokens(trained_file):
    result = runner.invoke(app, ["info", str(trained_file), "--json"])
    summary = json.loads(result.output)
    assert summary["vocab_size"] == 700
    assert summary["merges"] == 700 - 256 - 3
    assert summary["special_tokens"][ENDOFTEXT] == 697
    assert summary["pattern"] == "gpt4"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{missing}", "--vocab-size", "500", "-o", "{out}"], "no such file or folder"),
        (["train", "{empty}", "--vocab-size", "500", "-o", "{out}"], "corpus is empty"),
        (
            ["train", "{corpus}", "--vocab-size", "200", "-o", "{out}"],
            "vocab size 200 is too small",
        ),
        (["train", "{corpus}", "--vocab-size", "500", "-o", "{file}"], "must be a folder"),
        (
            ["train", "{corpus}", "--vocab-size", "500", "-o", "{out}", "--pattern", "(x"],
            "invalid split pattern",
        ),
        # A pattern that skips text would drop it silently ("banana split" -> "aaa").
        (
            ["train", "{corpus}", "--vocab-size", "500", "-o", "{out}", "--pattern", "a"],
            "the split pattern must match every character",
        ),
        (
            ["train", "{corpus}", "--vocab-size", "500", "-o", "{out}", "--pattern", ""],
            "the split pattern must match every character",
        ),
        (
            ["train", "{corpus}", "--vocab-size", "500", "-o", "{out}", "--workers", "-1"],
            "--workers",
        ),
        (["decode", "-t", "{tok}", "1", "two"], "token ids must be integers, got 'two'"),
        (["decode", "-t", "{tok}", "99999"], "token id 99999 is outside this tokenizer"),
        (["encode", "-t", "{missing}", "x"], "no tokenizer file at"),
        (["info", "{file}"], "is not valid JSON"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_1(args, message, trained_file, corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("", encoding="utf-8")
    (tmp_path / "file").write_text("not json", encoding="utf-8")
    paths = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "corpus": corpus_dir / "doc0000.md",
        "out": tmp_path / "out",
        "file": tmp_path / "file",
        "tok": trained_file,
    }
    result = runner.invoke(
        app, [a.format(**paths) for a in args] + (["-q"] if args[0] == "train" else [])
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


@pytest.mark.parametrize("command", ["train", "encode", "decode", "info"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example: atlas tokenizer " + command in " ".join(result.output.split())


def test_train_refuses_to_replace_a_tokenizer_unless_asked(tmp_path):
    """Found by an audit: a second `train` into the same folder silently replaced the
    tokenizer that existing shards and checkpoints were made with."""
    (tmp_path / "text.md").write_text("the quick brown fox jumps over the lazy dog " * 50)
    args = [
        "train",
        str(tmp_path / "text.md"),
        "--vocab-size",
        "300",
        "-o",
        str(tmp_path / "t"),
        "-q",
    ]
    assert runner.invoke(app, args).exit_code == 0
    before = (tmp_path / "t" / "atlas_tokenizer.json").read_bytes()
    again = runner.invoke(app, [*args[:3], "280", *args[4:]])
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output
    assert (tmp_path / "t" / "atlas_tokenizer.json").read_bytes() == before
    replaced = runner.invoke(app, [*args[:3], "280", *args[4:], "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert Tokenizer.from_file(tmp_path / "t" / "atlas_tokenizer.json").vocab_size == 280


def test_tokenizer_commands_start_without_pytorch(trained_file):
    """`atlas --help` and `atlas tokenizer ...` never touch a model: with PyTorch imported
    at start (by the checkpoint command's module) each call took ~2.4 s on 2 cores, ~0.4 s
    without. A missing tokenizer file is still the one-line error."""
    script = (
        "import sys\n"
        "from atlas_server.cli import app\n"
        "for args in (['--help'], ['tokenizer', 'encode', '-t', sys.argv[1], 'x = 1'],\n"
        "             ['tokenizer', 'info', sys.argv[1] + '.missing']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(trained_file)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exit 0") == 2 and "exit 1" in done.stdout, done.stdout
    assert "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.rstrip().endswith("torch loaded: False"), done.stdout
