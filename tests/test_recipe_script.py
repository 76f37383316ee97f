"""scripts/posttrain_recipe.sh reruns: which stages it reuses, which it redoes, and that
another SEED is refused. The training and evaluation commands are stand-ins (PYTHON is a
stub that records each call and writes what the script reads back); the instruction data
is the real `trainer.instruct_data`, so its manifest is the one the script checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "posttrain_recipe.sh"

# Each training call logs "STAGE fresh" and saves a one-step "checkpoint" of its own, or,
# when its run folder is there, "STAGE resume" and changes nothing (as a finished run's
# --resume); the instruction data is made by the real module.
STUB = """#!/usr/bin/env bash
set -e
case "$1 $2" in
"-m trainer.instruct_data") echo data >>"$LOG"; exec "$REAL_PYTHON" "$@" ;;
"-m trainer.cli")
    stage=$3
    for a in "$@"; do case $a in run.out_dir=*) out=${a#run.out_dir=}; out=${out//\\"/} ;; esac; done
    if [ -d "$out" ]; then echo "$stage resume" >>"$LOG"; exit 0; fi  # a finished run
    echo "$stage fresh" >>"$LOG"
    mkdir -p "$out/checkpoints/step_000001"
    echo "{\\"run\\": \\"$RANDOM$RANDOM\\"}" >"$out/checkpoints/step_000001/config.json"
    echo '{}' >"$out/checkpoints/step_000001/trainer_state.json" ;;
"-m eval_suites.cli") echo "eval $3" >>"$LOG" ;;
*) cat >/dev/null || true ;;  # checkpoint inspect, the closing summary (a heredoc)
esac
"""


@pytest.fixture
def recipe(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    base = tmp_path / "base"
    base.mkdir()
    work = tmp_path / "work"

    def run(seed: int = 0, base: Path = base) -> tuple[subprocess.CompletedProcess, list[str]]:
        log.write_text("")
        env = {
            **os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "LOG": str(log),
            "BASE": str(base), "SEED": str(seed),
        }  # fmt: skip
        result = subprocess.run(
            ["bash", str(SCRIPT), str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        calls = [line for line in log.read_text().splitlines() if not line.startswith("eval")]
        return result, calls

    return run, work


def test_a_rerun_reuses_every_finished_stage(recipe):
    run, work = recipe
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert calls == ["data", "sft fresh", "dpo fresh"]
    data = {p.name: p.read_bytes() for p in (work / "instruct").iterdir()}
    models = {n: (work / f"{n}-final" / "config.json").read_text() for n in ("sft", "dpo")}
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert calls == [] and "data: reusing" in result.stderr
    assert {p.name: p.read_bytes() for p in (work / "instruct").iterdir()} == data
    assert {n: (work / f"{n}-final" / "config.json").read_text() for n in models} == models


def test_another_seed_is_refused_and_rewrites_nothing(recipe):
    """QA: SEED=1 rewrote instruct/*.jsonl while the SEED=0 models were reused, so they
    were scored on a held-out split that overlapped their training data (96 of 116)."""
    run, work = recipe
    assert run()[0].returncode == 0
    data = {p.name: p.read_bytes() for p in (work / "instruct").iterdir()}
    result, calls = run(seed=1)
    assert result.returncode == 1 and calls == []
    assert f"{work}/instruct was made with SEED=0, not SEED=1" in result.stderr
    assert {p.name: p.read_bytes() for p in (work / "instruct").iterdir()} == data


@pytest.mark.parametrize(
    ("deleted", "seed", "expected"),
    [
        ("dpo", 0, ["dpo fresh"]),
        ("sft", 0, ["sft fresh", "dpo fresh"]),  # DPO starts from the SFT model: redone too
        ("instruct", 1, ["data", "sft fresh", "dpo fresh"]),  # the way to another seed
        ("dpo-final", 0, ["dpo resume"]),  # an interrupted DPO: its run continues
    ],
)
def test_deleting_a_stage_folder_redoes_it_and_the_stages_after(recipe, deleted, seed, expected):
    """QA: the header said "delete WORK/<stage> to redo one", but only WORK/sft-final was
    looked at, and deleting that alone resumed the finished run: nothing was retrained."""
    run, work = recipe
    assert run()[0].returncode == 0
    models = {n: (work / f"{n}-final" / "config.json").read_text() for n in ("sft", "dpo")}
    shutil.rmtree(work / deleted)
    result, calls = run(seed=seed)
    assert result.returncode == 0, result.stderr
    assert calls == expected
    trained = {call.split()[0] for call in calls if call.endswith(" fresh")}
    for name, before in models.items():
        now = (work / f"{name}-final" / "config.json").read_text()
        assert (now != before) == (name in trained), name
    if deleted == "instruct":
        assert '"seed": 1' in (work / "instruct" / "manifest.json").read_text()


def test_another_base_is_refused_until_sft_is_redone(recipe, tmp_path):
    """The reused SFT and DPO models were trained from the first BASE: scoring them as the
    new base's fine-tunes would be wrong."""
    run, work = recipe
    assert run()[0].returncode == 0
    other = tmp_path / "other-base"
    other.mkdir()
    result, calls = run(base=other)
    assert result.returncode == 1 and calls == []
    assert f"{work}/sft was trained from BASE={tmp_path}/base, not BASE={other}" in result.stderr
    assert run(base=tmp_path / "base" / ".." / "base")[0].returncode == 0  # the same folder
    shutil.rmtree(work / "sft")
    result, calls = run(base=other)
    assert result.returncode == 0, result.stderr
    assert calls == ["sft fresh", "dpo fresh"]


def test_a_base_that_is_not_a_folder_is_one_line(recipe, tmp_path):
    run, work = recipe
    result, calls = run(base=tmp_path / "no such base")
    assert result.returncode == 1 and calls == []
    assert (
        result.stderr.strip() == f"error: BASE={tmp_path}/no such base is not a checkpoint folder"
    )
