"""The benchmarks' command lines refuse counts that would measure nothing, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("omp_teams.py", ["--rounds", "0"]),
        ("omp_teams.py", ["--steps", "-3"]),
        ("omp_teams.py", ["--rounds", "many"]),
        ("bench_matmul.py", ["--rows", "16", "0"]),
        ("profile_step.py", ["--steps", "0"]),
        ("bench_serving.py", ["--prompt-tokens", "0"]),
        ("bench_serving.py", ["--output-tokens", "1"]),
        ("bench_serving.py", ["--out", "/no/such/folder/out.json"]),
        ("bench_step_budget.py", ["--budgets", "512", "16"]),
        ("bench_step_budget.py", ["--rounds", "0"]),
        ("bench_step_budget.py", ["--out", __file__]),  # a file, not a folder
        ("ab_serving.py", ["HEAD", "HEAD", "--output-tokens", "1"]),
        ("ab_serving.py", ["HEAD", "HEAD", "--concurrency", "0"]),
    ],
)
def test_non_positive_counts_are_refused(script, args):
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"{script}: error:")
