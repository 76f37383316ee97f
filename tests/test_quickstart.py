"""`atlas-train quickstart`, end to end at a tiny size: corpus -> tokenizer -> shards ->
training -> the checkpoint `atlas serve` uses by default; and where it puts it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import trainer.quickstart
from atlas_server.checkpoint import load_checkpoint
from trainer.cli import app

TINY = [
    "data.seq_len=64",
    "data.micro_batch=4",
    "run.eval_batches=2",
    "run.eval_every=6",
    "run.checkpoint_every=3",
    "run.log_every=2",
    "run.sample_tokens=4",
    "run.threads=1",
    "run.tensorboard=false",
]


@pytest.fixture(scope="module")
def tiny_quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    result = trainer.quickstart.quickstart(
        out, steps=6, corpus_bytes=300_000, vocab_size=384, progress=False, overrides=TINY
    )
    return out, result


def test_quickstart_leaves_a_servable_checkpoint_and_its_metrics(tiny_quickstart):
    out, result = tiny_quickstart
    assert json.loads((out / "quickstart.json").read_text()) == result
    ckpt = load_checkpoint(result["checkpoint"])
    assert Path(result["checkpoint"]) == out / "checkpoint"
    assert ckpt.provenance["step"] == 6 and ckpt.provenance["precision"] in ("bf16", "fp32")
    assert ckpt.tokenizer.vocab_size == 384
    assert not list((out / "checkpoint").glob("trainer_state.*"))  # a serving checkpoint
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["val_tokens"] > 0
    # held-out bits per byte, against a unigram model of the same tokens
    assert 0 < result["val_bits_per_byte"] < 2 * result["unigram_bits_per_byte"]


def test_a_rerun_resumes_and_reuses_the_tokenizer(tiny_quickstart, monkeypatch):
    out, first = tiny_quickstart

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(trainer.quickstart, "train_from_files", no_training)
    again = trainer.quickstart.quickstart(
        out, steps=6, corpus_bytes=300_000, vocab_size=384, progress=False, overrides=TINY
    )
    assert again == first  # resumed at step 6 of 6: nothing left to train, same metrics


def test_the_default_folder_is_under_atlas_home(tmp_path, monkeypatch):
    seen = {}

    def fake(target, steps, threads):
        seen["target"] = target
        return {"steps": steps}

    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    monkeypatch.setattr(trainer.quickstart, "quickstart", fake)
    result = CliRunner().invoke(app, ["quickstart", "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert seen["target"] == tmp_path / "quickstart"


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["--threads", "0"], "error: --threads must be >= 1, got 0"),
])  # fmt: skip
def test_bad_counts_are_refused_before_any_work(tmp_path, flags, message):
    """Not after ~10 s of corpus, tokenizer and shards that the run never uses."""
    r = CliRunner().invoke(app, ["quickstart", "--output", str(tmp_path / "qs"), *flags])
    assert r.exit_code == 1 and message in r.output
    assert not (tmp_path / "qs").exists()


def test_into_a_log_the_tokenizer_says_two_lines_not_a_bar(tmp_path, monkeypatch, capsys):
    """scripts/serve.sh's log held the tokenizer's tqdm bars as carriage-return frames (the
    tokenizer room may not use atlas_server.progress): a line before and after instead."""
    seen = {}

    class Stop(Exception):
        pass

    def record(files, config, progress):
        seen["progress"] = progress
        raise Stop

    monkeypatch.setattr(trainer.quickstart, "train_from_files", record)
    with pytest.raises(Stop):
        trainer.quickstart.quickstart(
            tmp_path, steps=1, corpus_bytes=50_000, vocab_size=384, progress=True
        )
    assert seen["progress"] is False  # stderr is captured here: no terminal
    assert "training the tokenizer (vocabulary 384)" in capsys.readouterr().err
