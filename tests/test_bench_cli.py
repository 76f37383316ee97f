"""The benchmarks' command lines: counts that would measure nothing, devices and presets
that do not exist are refused in one line, and a long run says which phase it is in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas_server.model import native

BENCH = Path(__file__).resolve().parent.parent / "bench"
DEVICE_SCRIPTS = ["bench_cuda_decode.py", "bench_prefill_attention.py", "bench_serving.py"]
DEVICE_SCRIPTS += ["bench_train.py", "bench_overlap.py"]
PRESET_SCRIPTS = ["bench_engine.py", "bench_train.py", "bench_cuda_decode.py", "step_times.py"]
PRESET_SCRIPTS += ["bench_prefill_attention.py", "bench_overlap.py", "bench_llamacpp.py"]
PRESET_SCRIPTS += ["step_overhead.py"]
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is a valid device here")


REFUSED = [
    ("omp_teams.py", ["--rounds", "0"]),
    ("omp_teams.py", ["--steps", "-3"]),
    ("omp_teams.py", ["--rounds", "many"]),
    ("bench_matmul.py", ["--rows", "16", "0"]),
    ("bench_decode_attention.py", ["--lengths", "64", "0"]),
    ("bench_decode_attention.py", ["--heads", "12", "--kv-heads", "5"]),
    ("bench_decode_attention.py", ["--head-dim", "512"]),
    ("step_overhead.py", ["--batch", "0"]),
    ("step_overhead.py", ["--preset", "gpt2-tiny", "--steps", "1000"]),  # past max_seq_len
    ("step_overhead.py", ["--batch", "100000000"]),  # a KV cache past the memory
    ("bench_decode_attention.py", ["--rows", "4096", "--lengths", "100000000"]),
    ("omp_wait_policy.py", ["--busy", "-1"]),
    ("omp_wait_policy.py", ["--spin", "100", "-5"]),
    ("step_overhead.py", ["--steps", "some"]),
    ("profile_step.py", ["--steps", "0"]),
    ("bench_serving.py", ["--prompt-tokens", "0"]),
    ("bench_serving.py", ["--output-tokens", "1"]),
    ("bench_serving.py", ["--out", "/no/such/folder/out.json"]),
    ("bench_step_budget.py", ["--budgets", "512", "16"]),
    ("bench_step_budget.py", ["--rounds", "0"]),
    ("bench_step_budget.py", ["--out", __file__]),  # a file, not a folder
    ("ab_serving.py", ["HEAD", "HEAD", "--output-tokens", "1"]),
    ("ab_serving.py", ["HEAD", "HEAD", "--concurrency", "0"]),
    ("bench_serving.py", ["--streams", "64", "0"]),
    ("bench_cuda_decode.py", ["--steps", "0"]),
    ("bench_cuda_decode.py", ["--batch", "16", "0"]),
    ("ab_sampling.py", ["HEAD", "HEAD", "--rounds", "0"]),
    ("step_times.py", ["--tokens", "0"]),
    ("bench_ingest.py", ["--chunks", "0"]),
    ("bench_ingest.py", ["--variants", "fp32,turbo"]),
    ("bench_prefill_attention.py", ["--lengths", "128,0"]),
    ("bench_prefill_attention.py", ["--lengths", "long"]),
    ("bench_prefill_attention.py", ["--repeats", "0"]),
    ("bench_overlap.py", ["--streams", "16", "0"]),
    ("bench_overlap.py", ["--tokens", "1"]),
    ("bench_overlap.py", ["--rounds", "0"]),
    ("bench_overlap.py", ["--out", "/no/such/folder/overlap.json"]),
    ("step_times.py", ["--streams", "0"]),
    # A device PyTorch cannot parse, and CUDA where there is none (a valid device, so
    # not refused, where there is one): before any model is built.
    *[(s, ["--device", "nope"]) for s in DEVICE_SCRIPTS],
    *[pytest.param(s, ["--device", "cuda"], marks=NEEDS_NO_CUDA) for s in DEVICE_SCRIPTS],
    pytest.param("bench_cuda_decode.py", [], marks=NEEDS_NO_CUDA),  # its default is cuda
    *[(s, ["--preset", "nope"]) for s in PRESET_SCRIPTS],
    ("bench_prefix_cache.py", ["--bogus"]),
    ("ab_sampling.py", ["HEAD", "HEAD", "--device", "nope"]),
    pytest.param("ab_sampling.py", ["HEAD", "HEAD", "--device", "cuda"], marks=NEEDS_NO_CUDA),
    ("ab_norm_rope.py", ["--presets", "gpt2-tiny"]),  # no RMSNorm or RoPE to compare
    ("ab_norm_rope.py", ["--presets", "nope"]),
    ("ab_norm_rope.py", ["--steps", "3"]),
]

# Each case as its script run as __main__ in one child process (one PyTorch import for all,
# not one per case): exit status and stderr per case, keyed by (script, *args).
_RUN_ALL = """
import contextlib, io, json, runpy, sys
bench, results = sys.argv[1], []
for script, args in json.loads(sys.argv[2]):
    sys.argv, err, code = [script, *args], io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(f"{bench}/{script}", run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # what a process of its own would end in a traceback
            code = 1
            print("Traceback:", repr(e), file=sys.stderr)
    results.append([script, args, code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def refusals() -> dict:
    cases = [list(case.values if hasattr(case, "values") else case) for case in REFUSED]
    r = subprocess.run([sys.executable, "-c", _RUN_ALL, str(BENCH), json.dumps(cases)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {(name, *args): (code, err) for name, args, code, err in json.loads(r.stdout)}


@pytest.mark.parametrize(
    ("script", "args"),
    REFUSED,
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_bad_arguments_are_refused_in_one_line(refusals, script, args):
    returncode, stderr = refusals[(script, *args)]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"{script}: error:")


def test_bench_prefix_cache_help_starts_nothing():
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_prefix_cache.py"), "--help"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ATLAS_BENCH_QUIET": "0"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bench_prefix_cache.py")
    assert "prefix caching" in r.stdout and "[bench_prefix_cache" not in r.stderr


def test_a_long_benchmark_reports_each_phase_on_stderr_and_keeps_stdout_clean():
    """bench_tokenizer at a toy size: progress lines on stderr, flushed as each phase starts
    (bench_serving.py and the other long benchmarks print through the same bench/progress.py)."""
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_tokenizer.py"), "--corpus-mb", "0.05",
         "--vocab-size", "300", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("[bench_tokenizer ")]
    phases = [x.split("] ", 1)[1] for x in lines]
    assert [x.split("] ")[0].split()[-1] for x in lines[:-1]] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert phases[0].startswith("writing a 0.05 MB corpus") and "tiktoken" in phases[4]
    assert phases[-1].startswith("done in ")
    assert "[bench_" not in r.stdout
    result, _ = json.JSONDecoder().raw_decode(r.stdout)
    assert result["vocab_size"] == 300


def test_progress_lines_are_flushed_at_once_and_can_be_silenced(tmp_path):
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from progress import Progress;"
        " p = Progress('bench_x.py', phases=2); p.phase('first'); time.sleep(60)"
    )
    # The line must be readable while the benchmark still runs: nothing buffered.
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(BENCH)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr.readline().startswith("[bench_x  0:00:00  1/2] first")
    finally:
        proc.kill()
        proc.wait()
    quiet = subprocess.run(
        [sys.executable, "-c", script.replace("time.sleep(60)", "p.done()"), str(BENCH)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ATLAS_BENCH_QUIET": "1"},
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_bench_overlap_measures_both_modes_and_they_give_the_same_tokens(tmp_path):
    """The GPU check's overlap step, at a toy size on the CPU: both modes run, alternated,
    and the seeded streams come out the same in each."""
    out = tmp_path / "overlap.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_overlap.py"), "--preset", "gpt2-tiny",
         "--streams", "1", "3", "--tokens", "6", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [row["streams"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["same_tokens"] is True
        assert len(row["off_tok_s"]) == len(row["on_tok_s"]) == 1
        assert min(row["off_tok_s"] + row["on_tok_s"]) > 0
    assert report["dtype"] == "float32"  # the CPU's serving dtype


def _run_gpu_check(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess, str]:
    """bench/gpu_check.sh from a copy with no wheels beside it, with `python3` replaced by
    a stand-in that records its arguments and creates the files it is told to write
    (`--out PATH`, `--junitxml=PATH`): the script's own time keeping, no GPU."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu_check.sh").write_text((BENCH / "gpu_check.sh").read_text())
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(
        '#!/bin/sh\necho "$@" >> "$CALLS"\n'
        "while [ $# -gt 0 ]; do\n"
        '  case "$1" in --out) echo "{}" > "$2";; --junitxml=*) echo "<x/>" > "${1#*=}";; esac\n'
        "  shift\n"
        "done\n"
    )
    (fake_bin / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "CALLS": str(tmp_path / "calls.txt"), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_SECONDS": str(budget)}  # fmt: skip
    r = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    return r, (tmp_path / "out" / "gpu_check.log").read_text()


STEPS = ["test_cuda", "serving_fp32", "serving_bf16", "train", "api_cuda", "overlap",
         "decode", "prefill"]  # fmt: skip


def test_the_gpu_check_runs_its_steps_in_order_within_its_budget(tmp_path):
    """Issue 16's one GPU script stays under 8 minutes: a step's limit is cut to what is
    left of the whole run's budget (less the 10 s a stuck step gets to die)."""
    r, log = _run_gpu_check(tmp_path, budget=100)
    assert r.returncode == 0, log
    started = [line.split()[1] for line in log.splitlines() if "(limit" in line]
    assert started == STEPS
    # Its own limit is 180 s, cut to what is left: 90 s, or 89 when bash's whole-second
    # clock ticks over during the preamble (a loaded machine).
    assert re.search(r"=== test_cuda \(limit (89|90)s\)", log), log
    assert "=== prefill (limit 20s)" in log  # under what is left: its own
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert sum("bench/bench_" in c or "pytest" in c for c in calls) == len(STEPS)


def test_the_gpu_check_writes_no_more_files_than_the_device_tool_brings_back(tmp_path):
    """The device tool returns at most 8 files from $OUT, each named in letters, digits,
    '.', '_' and '-': a ninth would be left on the GPU machine, lost with it."""
    r, log = _run_gpu_check(tmp_path, budget=100)
    assert r.returncode == 0, log
    written = sorted(path.name for path in (tmp_path / "out").rglob("*") if path.is_file())
    assert "serving_bf16.json" in written and "pytest.xml" in written  # the fake wrote them
    assert len(written) <= 8, written
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in written), written
    assert "nvidia-smi" in log  # its report went into the log, not a file of its own


def test_a_gpu_check_step_that_finds_the_budget_spent_is_skipped_and_counted(tmp_path):
    r, log = _run_gpu_check(tmp_path, budget=0)
    assert r.returncode == len(STEPS)  # the exit status counts failed and skipped steps
    assert [line.split()[1].rstrip(":") for line in log.splitlines() if "skipped" in line] == STEPS
    calls = tmp_path / "calls.txt"
    assert not calls.exists() or "pytest" not in calls.read_text()


def test_bench_train_saves_each_setting_as_it_is_measured(tmp_path, monkeypatch):
    """The GPU check cuts bench_train.py off at its time limit (SIGINT, a KeyboardInterrupt):
    the rows measured by then are already in --out, marked incomplete."""
    monkeypatch.syspath_prepend(str(BENCH))
    import argparse

    import bench_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_train, "optimizer_step_ms", interrupted)
    monkeypatch.setattr(bench_train, "matmul_peak_flops", lambda device: 1e11)  # not measured
    out = tmp_path / "train.json"
    args = argparse.Namespace(quick=True, preset="gpt2-tiny", device="cpu", batch=2, seq=32,
                              precision="fp32", out=str(out), steps=1, repeats=1)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        bench_train.main_step(args)
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [row["attention"] for row in report["settings"]] == ["sdpa", "reference", "sdpa", "sdpa"]
    assert all(row["tokens_per_s"] > 0 for row in report["settings"])


def test_bench_serving_saves_what_it_measured_when_cut_off(tmp_path, monkeypatch):
    """Like bench_train.py: the GPU check's time limit stops bench_serving.py with SIGINT;
    the Atlas rows measured by then are in --out (here the run stops at its Poisson phase).
    The server, ceilings and load generator are stand-ins: only the bookkeeping runs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_serving

    from atlas_server.model import Transformer, load_preset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    class Server:
        def terminate(self):
            pass

        def wait(self, timeout):
            pass

    fake_row = {"output_throughput": 100.0, "mean_tpot_ms": 10.0}
    monkeypatch.setattr(bench_serving, "dram_read_bandwidth", lambda: 1e10)
    monkeypatch.setattr(bench_serving, "matmul_peak_flops", lambda: 1e11)
    monkeypatch.setattr(bench_serving, "build_checkpoint",
                        lambda folder: (folder, Transformer(load_preset("gpt2-tiny"))))  # fmt: skip
    monkeypatch.setattr(bench_serving, "serve", lambda *a, **kw: Server())
    monkeypatch.setattr(bench_serving, "warm_up", lambda base: None)
    monkeypatch.setattr(bench_serving, "closed_loop", lambda *a, **kw: dict(fake_row))
    monkeypatch.setattr(bench_serving, "poisson_arrivals", interrupted)
    out = tmp_path / "serving.json"
    monkeypatch.setattr(sys, "argv", ["bench_serving.py", "--quick", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench_serving.main()
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert sorted(report["atlas_sweep"]) == ["1", "16"]  # both concurrencies of --quick
    assert report["atlas_sweep"]["16"] == fake_row


@pytest.mark.skipif(not native.available(), reason="no C compiler here")
def test_ab_norm_rope_times_both_paths_at_a_toy_size(tmp_path):
    out = tmp_path / "ab.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "ab_norm_rope.py"), "--presets", "llama-tiny", "--steps",
         "12", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["preset"] == "llama-tiny" and row["batch"] == 2
    assert row["c_ms"] > 0 and row["pytorch_ms"] > 0
    assert "| llama-tiny | 2 |" in r.stdout
