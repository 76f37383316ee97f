"""The docstring instruction set: deterministic for a seed, held-out functions never in
training, plausible wrong answers, and records the post-training readers accept."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.chat_data import read_conversations, read_preferences
from trainer.instruct_data import build, first_sentence, write

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("instruct")
    return out, write(out, seed=0)


def test_first_sentence_skips_signatures_and_stops_at_the_first_period():
    assert first_sentence("dumps(obj, *, skipkeys=False)\n\nSerialize obj. More text.") == (
        "Serialize obj."
    )
    assert first_sentence("Return the floor of x.\nAs an Integral. Then more.") == (
        "Return the floor of x."
    )
    assert first_sentence("f(x)") is None


def test_the_same_seed_writes_the_same_bytes_in_another_process(written, tmp_path):
    out, manifest = written
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.instruct_data", str(tmp_path / "again"), "--seed", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again == manifest
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["functions"]["heldout"] >= 50 and manifest["functions"]["train"] >= 500
    other = build(seed=1)
    assert [r["id"] for r in other["prefs_heldout"]] != [
        json.loads(line)["id"] for line in (out / "prefs_heldout.jsonl").read_text().splitlines()
    ]


def test_held_out_functions_questions_and_answers_never_appear_in_training(written):
    out, _ = written
    train = read_conversations([str(out / "sft_train.jsonl")])
    held = read_conversations([str(out / "sft_heldout.jsonl")])
    prefs_train = read_preferences([str(out / "prefs_train.jsonl")])
    prefs_held = read_preferences([str(out / "prefs_heldout.jsonl")])
    ids = lambda name: {json.loads(x)["id"] for x in (out / name).read_text().splitlines()}  # noqa: E731
    assert not ids("sft_train.jsonl") & ids("sft_heldout.jsonl")
    assert ids("sft_heldout.jsonl") == ids("prefs_heldout.jsonl")
    train_text = {m["content"] for c in train for m in c.messages}
    train_text |= {t for p in prefs_train for t in (p.chosen, p.rejected, p.prompt[0]["content"])}
    held_text = {m["content"] for c in held for m in c.messages}
    held_text |= {t for p in prefs_held for t in (p.chosen, p.rejected, p.prompt[0]["content"])}
    assert not train_text & held_text
    assert len(train) == 2 * len(prefs_train) and len(held) == len(prefs_held)


def test_rejected_answers_are_another_functions_sentence_from_the_same_module(written):
    out, _ = written
    records = [json.loads(x) for x in (out / "prefs_train.jsonl").read_text().splitlines()]
    answer_of = {r["id"]: r["chosen"] for r in records}
    owners = {}
    for name, answer in answer_of.items():
        owners.setdefault(answer, name)
    same_group = 0
    for r in records:
        assert r["rejected"] != r["chosen"] and r["rejected"] in owners
        group = lambda name: name.rsplit(".", 1)[0] if "." in name else "builtins"  # noqa: E731
        same_group += group(owners[r["rejected"]]) == group(r["id"])
    assert same_group / len(records) > 0.9


def test_the_committed_eval_data_is_held_out_from_a_fresh_build(written):
    """eval_suites/data/instruct holds the held-out files of seed 0 (built on Python 3.11.7);
    the split is by function name, so on any Python no training function is among them."""
    out, _ = written
    committed = ROOT / "eval_suites" / "data" / "instruct"
    names = lambda path: {json.loads(x)["id"] for x in path.read_text().splitlines()}  # noqa: E731
    held = names(committed / "sft_heldout.jsonl")
    assert held == names(committed / "prefs_heldout.jsonl") and len(held) >= 50
    assert not held & names(out / "sft_train.jsonl")
    if platform.python_version() == "3.11.7" and sys.platform == "linux":
        assert held == names(out / "sft_heldout.jsonl")
