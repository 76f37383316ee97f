"""The trainer: data shards, deterministic loader, exact resume (also after SIGKILL), DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import trainer.loop
import trainer.state
from atlas_server.checkpoint import load_checkpoint
from atlas_server.model import Transformer, load_preset, preset_names
from atlas_server.tokenizer import train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig as TokenizerConfig
from trainer.cli import app
from trainer.config import TrainConfigError, load_train_config
from trainer.data import DataError, prepare_data, read_shard
from trainer.loader import TokenLoader
from trainer.loop import lr_at, train
from trainer.loss import IGNORE_INDEX, NextTokenLoss, chunked_cross_entropy
from trainer.state import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(stdlib_sample(400_000, docstring_share=0.5)):
        (folder / f"doc_{i:04d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, corpus) -> Path:
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tok = train_from_texts(texts, TokenizerConfig(vocab_size=512), progress=False)
    return tok.save(tmp_path_factory.mktemp("tok") / "atlas_tokenizer.json")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus, tokenizer_file) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(
        [str(corpus)],
        tokenizer_file,
        out,
        val_fraction=0.05,
        shard_tokens=40_000,
        workers=2,
        progress=False,
    )
    return out


def config(data_dir: Path, out: Path, *extra: str):
    return load_train_config(
        None,
        [
            f'data.path="{data_dir}"',
            f'run.out_dir="{out}"',
            'model.preset="gpt2-tiny"',
            "data.seq_len=32",
            "data.micro_batch=4",
            "data.grad_accum=2",
            "schedule.max_steps=12",
            "schedule.warmup_steps=3",
            "run.eval_every=6",
            "run.eval_batches=2",
            "run.checkpoint_every=4",
            "run.keep_last=2",
            "run.log_every=2",
            "run.sample_tokens=4",
            "run.tensorboard=true",
            "run.threads=1",
            "model.overrides={dropout = 0.1}",
            *extra,
        ],
    )


def test_shards_have_header_manifest_and_every_document(data_dir, corpus, tokenizer_file):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["documents"] == len(list(corpus.iterdir()))
    assert len(manifest["train"]) > 1 and manifest["val"]
    from atlas_server.tokenizer import Tokenizer

    eot = Tokenizer.from_file(tokenizer_file).eot_id
    total_eot = sum(
        int((np.asarray(read_shard(data_dir / s["file"])) == eot).sum())
        for s in manifest["train"] + manifest["val"]
    )
    assert total_eot == manifest["documents"]
    assert read_shard(data_dir / manifest["train"][0]["file"]).dtype == np.uint16


def test_prepare_data_killed_midway_resumes_to_identical_output(
    tmp_path, corpus, tokenizer_file, data_dir
):
    out = tmp_path / "resumed"
    script = (
        "import sys; from trainer.data import prepare_data; "
        "prepare_data([sys.argv[1]], sys.argv[2], sys.argv[3], val_fraction=0.05, "
        "shard_tokens=40_000, workers=1, progress=False)"
    )
    env = {**os.environ, "ATLAS_TEST_SIGKILL_AFTER_SHARDS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(corpus), str(tokenizer_file), str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "progress.json").read_text())["next_doc"] > 0
    prepare_data(
        [str(corpus)],
        tokenizer_file,
        out,
        val_fraction=0.05,
        shard_tokens=40_000,
        workers=1,
        progress=False,
    )
    ours = json.loads((out / "manifest.json").read_text())
    ref = json.loads((data_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        assert [s["sha256"] for s in ours[split]] == [s["sha256"] for s in ref[split]]


def test_prepare_data_from_a_script_on_stdin_tokenizes_in_process(
    tmp_path, corpus, tokenizer_file, data_dir
):
    # Spawned workers re-import the calling script by path; one read from stdin has none,
    # so its workers would die at start and the pool restart them forever.
    out = tmp_path / "stdin"
    script = (
        "from trainer.data import prepare_data\n"
        f"prepare_data([{str(corpus)!r}], {str(tokenizer_file)!r}, {str(out)!r},"
        " val_fraction=0.05, shard_tokens=40_000, workers=2, progress=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-"], input=script, text=True, cwd=ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokenizing in this process" in proc.stderr
    ours = json.loads((out / "manifest.json").read_text())
    ref = json.loads((data_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        assert [s["sha256"] for s in ours[split]] == [s["sha256"] for s in ref[split]]


def test_truncated_shard_is_refused(tmp_path, data_dir):
    name = json.loads((data_dir / "manifest.json").read_text())["train"][0]["file"]
    broken = tmp_path / name
    broken.write_bytes((data_dir / name).read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_shard(broken)


def test_loader_is_deterministic_and_ranks_split_the_global_batch(data_dir):
    single = TokenLoader(data_dir, "train", 16, seed=5)
    ranks = [TokenLoader(data_dir, "train", 16, seed=5, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch(6)
        parts = [r.next_batch(3) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y[:, :-1], x[:, 1:])
    again = TokenLoader(data_dir, "train", 16, seed=5)
    again.load_state_dict(single.state_dict())
    assert torch.equal(again.next_batch(6)[0], single.next_batch(6)[0])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> dict:
    """One uninterrupted run of `config`'s 12 steps: the run that resumed, killed and served
    runs are compared with (tests only read it; each made it again before, ~6 s apiece)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return {**train(config(data_dir, out), progress=False), "out": out}


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, data_dir) -> tuple[list[float], Path]:
    """The DDP/FSDP tests' reference: one process, micro-batch 4, no dropout; (losses, the
    step-12 checkpoint)."""
    out = tmp_path_factory.mktemp("single") / "one"
    cfg = config(data_dir, out, "data.micro_batch=4", "model.overrides={dropout = 0.0}")
    losses = train(cfg, progress=False)["losses"]
    return losses, out / "checkpoints" / "step_000012"


def test_same_seed_same_losses(tmp_path, data_dir, reference_run):
    a = reference_run["losses"]
    b = train(config(data_dir, tmp_path / "b"), progress=False)["losses"]
    assert a == b
    assert a[-1] < a[0]


def test_resume_is_bit_exact_keeps_last_n_and_reads_each_file_once(
    tmp_path, data_dir, monkeypatch, capsys, reference_run
):
    full = reference_run["losses"]
    # an interrupted run: drop its last checkpoint so the newest one is at step 8
    part = train(config(data_dir, tmp_path / "part", "run.checkpoint_every=4"), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step_000008", "step_000012"]
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_000012")
    reads: list[str] = []
    real_load_file = trainer.state.load_file

    def counting_load_file(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_load_file(path, *args, **kwargs)

    def no_second_load(*args, **kwargs):
        raise AssertionError("resume loaded the checkpoint a second time (load_checkpoint)")

    monkeypatch.setattr(trainer.state, "load_file", counting_load_file)
    monkeypatch.setattr(trainer.loop, "load_checkpoint", no_second_load)
    capsys.readouterr()
    resumed = train(config(data_dir, tmp_path / "part"), resume=True, progress=False)
    assert sorted(reads) == ["model.safetensors", "trainer_state.safetensors"]
    step_8 = tmp_path / "part" / "checkpoints" / "step_000008"
    assert f"resuming from step 8 ({step_8})" in capsys.readouterr().err
    assert resumed["start_step"] == 8
    assert resumed["losses"] == full[8:]
    assert part["losses"] == full


def test_resume_without_a_checkpoint_says_so_and_starts_at_zero(tmp_path, data_dir, capsys):
    cfg = config(data_dir, tmp_path / "fresh", "schedule.max_steps=2", "schedule.warmup_steps=1")
    summary = train(cfg, resume=True, progress=False)
    assert summary["start_step"] == 0 and len(summary["losses"]) == 2
    assert "no checkpoint to resume from in" in capsys.readouterr().err


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_resume_is_exact(
    tmp_path, data_dir, sig, status
):
    """SIGINT to `atlas-train train`: the step finishes, a checkpoint of it is saved, the
    command says where and exits 130; --resume then continues bit for bit. SIGTERM, what a
    scheduler sends to preempt a job, does the same and exits 143 (it killed the run with
    no checkpoint)."""
    out = tmp_path / "interrupted"
    constant = ["schedule.kind=constant", "run.checkpoint_every=3", "run.sample_tokens=0"]
    sets = [
        f'data.path="{data_dir}"', f'run.out_dir="{out}"', 'model.preset="gpt2-tiny"',
        "data.seq_len=32", "data.micro_batch=4", "data.grad_accum=2", "schedule.max_steps=100000",
        "schedule.warmup_steps=3", "run.eval_every=100000", "run.eval_batches=2",
        "run.log_every=2", "run.threads=1", "run.tensorboard=false",
        "model.overrides={dropout = 0.1}", *constant,
    ]  # fmt: skip
    args = [word for item in sets for word in ("--set", item)]
    # Output to a file, not a pipe: nothing the trainer prints can block it, and a failure
    # here can show what it printed.
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        deadline = time.monotonic() + 240
        # Any checkpoint, not step 3's: on a quiet machine the run saves every few
        # milliseconds and keeps the last 3, so step 3's may be gone before a poll sees it.
        while not list_checkpoints(out):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                "no checkpoint after 240 s: " + log.read_text()[-3000:]
            )
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=240)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err
    match = re.search(
        r"stopped at step (\d+); last checkpoint (\S+) \(step (\d+)\); resume with --resume", err
    )
    assert match, err[-3000:]
    stopped = int(match.group(1))
    assert (
        stopped == int(match.group(3))
        and Path(match.group(2)) == out / "checkpoints" / f"step_{stopped:06d}"
    )
    assert Path(match.group(2), "trainer_state.json").is_file()

    steps = f"schedule.max_steps={stopped + 3}"
    full = train(config(data_dir, tmp_path / "full", *constant, steps), progress=False)["losses"]
    resumed = train(config(data_dir, out, *constant, steps), resume=True, progress=False)
    assert resumed["start_step"] == stopped
    assert resumed["losses"] == full[stopped:]


def test_a_step_saved_twice_keeps_its_first_save_until_the_second_is_in(tmp_path):
    """A second save of one step removed the first before renaming the new one in: killed
    between the two, with keep_last = 1, the run had no checkpoint at all."""
    from trainer.state import clean_partial

    root = tmp_path / "checkpoints"
    first = root / ".old-step_000004"  # killed after moving the first save aside
    first.mkdir(parents=True)
    (first / "trainer_state.json").write_text("{}")
    (root / ".tmp-step_000004").mkdir()  # the second save, never renamed in
    clean_partial(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    # Killed after the second save was in: the first is only removed.
    (root / ".old-step_000004").mkdir()
    clean_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]


def test_sigkill_mid_save_then_resume_matches_uninterrupted(tmp_path, data_dir, reference_run):
    full = reference_run["losses"]
    out = tmp_path / "killed"
    script = (
        "import sys; from trainer.config import load_train_config; from trainer.loop import train; "
        "train(load_train_config(None, sys.argv[1:]), progress=False)"
    )
    args = [
        f'data.path="{data_dir}"',
        f'run.out_dir="{out}"',
        'model.preset="gpt2-tiny"',
        "data.seq_len=32",
        "data.micro_batch=4",
        "data.grad_accum=2",
        "schedule.max_steps=12",
        "schedule.warmup_steps=3",
        "run.eval_every=6",
        "run.eval_batches=2",
        "run.checkpoint_every=4",
        "run.keep_last=2",
        "run.log_every=2",
        "run.sample_tokens=4",
        "run.threads=1",
        "model.overrides={dropout = 0.1}",
    ]
    env = {**os.environ, "ATLAS_TEST_SIGKILL_DURING_SAVE_AT_STEP": "8"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=ROOT, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (out / "checkpoints" / ".tmp-step_000008").exists()  # the half-written save
    resumed = train(config(data_dir, out), resume=True, progress=False)
    assert resumed["start_step"] == 4
    assert resumed["losses"] == full[4:]
    assert not (out / "checkpoints" / ".tmp-step_000008").exists()


def test_checkpoint_is_served_unchanged_and_logs_exist(reference_run):
    ckpt = load_checkpoint(reference_run["checkpoint"])
    assert ckpt.provenance["step"] == 12
    val = reference_run["val"]
    assert "bits_per_byte" in val and val["bits_per_byte"] > 0
    assert list((reference_run["out"] / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference_run["out"] / "config.toml").read_text().startswith("[model]")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_data_parallel_matches_single_process(
    tmp_path, data_dir, strategy, single_process_losses
):
    single, single_checkpoint = single_process_losses
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "trainer.cli",
        "train",
        "--set",
        f'data.path="{data_dir}"',
        "--set",
        f'run.out_dir="{out}"',
        "--set",
        "data.seq_len=32",
        "--set",
        "data.micro_batch=2",
        "--set",
        "data.grad_accum=2",
        "--set",
        "schedule.max_steps=12",
        "--set",
        "schedule.warmup_steps=3",
        "--set",
        "run.eval_every=6",
        "--set",
        "run.eval_batches=2",
        "--set",
        "run.checkpoint_every=12",
        "--set",
        "run.threads=1",
        "--set",
        "run.sample_tokens=0",
        "--set",
        "model.overrides={dropout = 0.0}",
        "--set",
        "run.log_every=1",
        "--set",
        f'run.distributed="{strategy}"',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ddp = load_checkpoint(out / "checkpoints" / "step_000012").model
    one = load_checkpoint(single_checkpoint).model
    for (name, a), b in zip(one.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert single[-1] < single[0]


def test_schedule_warms_up_then_decays():
    cfg = load_train_config(
        None,
        [
            "schedule.max_steps=100",
            "schedule.warmup_steps=10",
            "optim.lr=1.0",
            "optim.min_lr_ratio=0.1",
        ],
    )
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    # The last step trains at the final lr (it stopped one step short of it, 0.1002).
    assert lrs[-1] == pytest.approx(0.1, rel=1e-12) and all(
        a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)
    )
    wsd = load_train_config(
        None,
        ["schedule.kind=wsd", "schedule.max_steps=20", "schedule.warmup_steps=4",
         "schedule.decay_fraction=0.25", "optim.lr=1.0", "optim.min_lr_ratio=0.1"],
    )  # fmt: skip
    lrs = [lr_at(s, wsd) for s in range(20)]
    assert lrs[14] == 1.0 and lrs[15] == 1.0 and lrs[-1] == pytest.approx(0.1, rel=1e-12)
    # A warmup ending inside the decay made the lr jump from the peak to half of it.
    with pytest.raises(TrainConfigError, match="warmup_steps must end before the WSD decay"):
        load_train_config(None, ["schedule.kind=wsd", "schedule.max_steps=100",
                                 "schedule.warmup_steps=90", "schedule.decay_fraction=0.2"])  # fmt: skip


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(TrainConfigError, match="unknown|unexpected|Object contains unknown field"):
        load_train_config(None, ["optim.learning_rate=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = 'x'\n")
    result = CliRunner().invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 1 and result.output.startswith("error:") and "seed" in result.output
    # A run shrunk below the config's warmup says both values and what to set.
    with pytest.raises(TrainConfigError, match=r"warmup_steps=20, max_steps=6\): set both"):
        load_train_config(None, ["schedule.warmup_steps=20", "schedule.max_steps=6"])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("run.eval_batches=0", "run.eval_batches must be >= 1"),  # reported val loss 0.0
        ("run.threads=-1", "run.threads must be >= 1"),
        ('run.device="gpu"', "run.device 'gpu' is not a device"),
        ("run.mlflow=true", "MLflow at run.mlflow_uri 'bogus://x'"),
        ("OUT_UNDER_A_FILE", "is under the file"),
        # Found by a QA pass: tracebacks, other libraries' words, or silently accepted.
        ('run.device="mps"', "run.device 'mps' is not a device"),
        ('run.device="meta"', "run.device 'meta' is not a device"),
        ('run.device="cpu:1"', "run.device 'cpu:1' is not a device"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.beta1=1.5", "optim.beta1 must be in [0, 1)"),
        ("optim.eps=-1", "optim.eps must be > 0"),
        ("run.seed=-1", "run.seed must be in [0, 2**32)"),
        ("run.sample_tokens=-5", "run.sample_tokens must be >= 0"),
        ("model.overrides={vocab_size=100}", "model.overrides cannot set vocab_size"),
        ("data.seq_len=100000", "data.seq_len=100000 exceeds the model's max_seq_len=256"),
    ]
    + (
        []
        if torch.cuda.is_available()
        else [('run.device="cuda"', "run.device is 'cuda' but this machine has")]
    ),
)
def test_bad_run_settings_are_one_line_errors_not_tracebacks(tmp_path, data_dir, setting, message):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / ("a_file/run" if setting == "OUT_UNDER_A_FILE" else "run")
    sets = [f'data.path="{data_dir}"', f'run.out_dir="{out}"', "schedule.max_steps=2",
            "schedule.warmup_steps=1", 'run.mlflow_uri="bogus://x"']  # fmt: skip
    if setting != "OUT_UNDER_A_FILE":
        sets.append(setting)
    result = CliRunner().invoke(app, ["train", *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], result.output
    assert "Traceback" not in result.output


def test_a_diverged_run_stops_naming_the_step_and_saves_no_nan_checkpoint(tmp_path, data_dir):
    """With lr 1e6 the loss was NaN from step 2 on; the run went on saving NaN checkpoints
    (keep_last pruning the good ones) and died in the checkpoint sample with a traceback."""
    from trainer.config import TrainingDiverged

    out = tmp_path / "diverged"
    # No checkpoint sample: without one, the run exited 0 after saving NaN checkpoints.
    cfg = config(data_dir, out, "optim.lr=1e6", "optim.grad_clip=0", "run.checkpoint_every=1",
                 "run.keep_last=100", "run.sample_tokens=0")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"training diverged: .* not finite at step \d+"):
        train(cfg, progress=False)
    for checkpoint in list_checkpoints(out):
        weights = load_checkpoint(checkpoint).model.state_dict().values()
        assert all(bool(torch.isfinite(w).all()) for w in weights), checkpoint
    # The command says it in one line.
    sets = [f'data.path="{data_dir}"', f'run.out_dir="{tmp_path / "cli"}"', "optim.lr=1e6",
            "optim.grad_clip=0", "schedule.max_steps=6", "schedule.warmup_steps=1"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: training diverged")


@pytest.mark.parametrize("steps", [6, 2])
def test_profile_writes_a_trace(tmp_path, data_dir, steps):
    """Also on a run shorter than the usual skip-one, warm-one, trace-three schedule (it
    used to write nothing and leave the profiler running, which crashed the exit)."""
    cfg = config(
        data_dir, tmp_path / "prof", f"schedule.max_steps={steps}", "schedule.warmup_steps=1"
    )
    train(cfg, profile=True, progress=False)
    trace = json.loads((tmp_path / "prof" / "profile_trace.json").read_text())
    assert any(e.get("name", "").startswith("ProfilerStep") for e in trace["traceEvents"])


def test_mlflow_logging_writes_a_local_run(tmp_path, data_dir, monkeypatch):
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the folder the command runs from must stay clean
    train(
        config(
            data_dir,
            tmp_path / "ml",
            "schedule.max_steps=4",
            "run.mlflow=true",
            "run.tensorboard=false",
        ),
        progress=False,
    )
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'ml' / 'mlflow.db').resolve()}")
    runs = mlflow.search_runs(experiment_names=["atlas"])
    assert len(runs) == 1 and runs.iloc[0]["metrics.train_loss"] > 0
    assert runs.iloc[0]["params.model.preset"] == "gpt2-tiny"  # comparable in MLflow's UI
    assert list(elsewhere.iterdir()) == []
    assert list((tmp_path / "ml").rglob("mlflow-artifacts/**/config.toml"))
    # A resumed run continues the same MLflow run: one curve, not two runs of one name.
    longer = config(data_dir, tmp_path / "ml", "schedule.max_steps=8", "run.mlflow=true",
                    "run.tensorboard=false")  # fmt: skip
    train(longer, resume=True, progress=False)
    runs = mlflow.search_runs(experiment_names=["atlas"])
    assert len(runs) == 1
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "train_loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]


def test_a_resumed_run_replaces_the_tensorboard_points_logged_after_its_checkpoint(
    tmp_path, data_dir
):
    """A run killed after its last checkpoint logged steps that the resumed run logs again:
    TensorBoard showed them twice (QA, SIGKILL at step 24 with a checkpoint at 20)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(config(data_dir, out, "schedule.max_steps=8", "run.log_every=1"), progress=False)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000008")  # as if killed after logging step 8
    train(config(data_dir, out, "schedule.max_steps=8", "run.log_every=1"), resume=True,
          progress=False)  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 9)), steps


def test_a_logging_backend_that_is_not_installed_is_one_line_before_anything_is_written(
    tmp_path, data_dir, monkeypatch
):
    """Without the optional `mlflow` package a run printed a 58-line traceback after writing
    its folder's config.toml."""
    shadow = tmp_path / "shadow" / "mlflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n"
    )
    monkeypatch.syspath_prepend(str(shadow.parent))
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "run"
    sets = [f'data.path="{data_dir}"', f'run.out_dir="{out}"', "schedule.max_steps=2",
            "schedule.warmup_steps=1", "run.mlflow=true"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'atlas-llm[mlflow]'" in lines[0], result.output
    assert not out.exists()


def test_hugging_face_datasets_source_streams_a_local_dataset(tmp_path, tokenizer_file):
    """`hf:NAME` goes through `datasets.load_dataset(..., streaming=True)`; a local folder needs no hub."""
    folder = tmp_path / "ds"
    folder.mkdir()
    records = [{"text": f"Record {i} of a local dataset, streamed."} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    manifest = prepare_data(
        [f"hf:{folder}"],
        tokenizer_file,
        tmp_path / "out",
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    assert manifest["documents"] == 40 and manifest["sources"] == [f"hf:{folder}"]
    # A misnamed field is named, with the fields the records have (every record was
    # dropped, then "no training tokens ... empty input").
    with pytest.raises(DataError, match=r"record 1 has no 'content' field \(its fields: 'text'\)"):
        prepare_data([f"hf:{folder}"], tokenizer_file, tmp_path / "out2", val_fraction=0.0,
                     workers=1, progress=False, text_field="content")  # fmt: skip


# --- validation split ---------------------------------------------------------------------------
def test_no_validation_split_warns_and_never_reports_training_loss_as_val(
    tmp_path, corpus, tokenizer_file, capsys, caplog
):
    """--val-fraction 0.001 over a few documents puts none in validation: prepare-data warns,
    and training warns and reports no val metrics (it used to evaluate on the training split)."""
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(corpus.iterdir())[:8]:
        (few / p.name).write_text(p.read_text())
    data = tmp_path / "data"
    with caplog.at_level("WARNING", logger="trainer.data"):
        manifest = prepare_data(
            [str(few)], tokenizer_file, data, val_fraction=0.001, workers=1, progress=False
        )
    assert manifest["val_tokens"] == 0
    assert "put none of the 8 documents in the validation split" in caplog.text
    capsys.readouterr()
    cfg = config(data, tmp_path / "run", "schedule.max_steps=4", "run.eval_every=2")
    summary = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "has no validation split" in err and "validation is skipped" in err
    assert "val" not in summary and not re.search(r"step \d+: val loss", err)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert not [t for t in events.Tags()["scalars"] if t.startswith("val/")]


# --- no host sync per step ----------------------------------------------------------------------
def test_the_loop_reads_losses_back_once_per_log_interval_not_every_step(
    tmp_path, data_dir, monkeypatch
):
    """Device -> host reads (.item(), .tolist(), float(t)) happen per log_every steps: on a GPU
    each one stalls the host until the queued work is done."""
    counts = {"reads": 0}
    for name in ("item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            counts["reads"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_for(steps: int) -> int:
        counts["reads"] = 0
        cfg = config(
            data_dir, tmp_path / f"s{steps}", f"schedule.max_steps={steps}", "run.log_every=4",
            f"run.eval_every={steps}", f"run.checkpoint_every={steps}", "run.sample_tokens=0",
            "run.tensorboard=false", 'run.cross_entropy="chunked"',
        )  # fmt: skip
        losses = train(cfg, progress=False)["losses"]
        assert len(losses) == steps and all(np.isfinite(losses))
        return counts["reads"]

    extra = reads_for(24) - reads_for(8)
    # 16 more steps are 4 more log intervals: 2 reads each (the losses, the gradient norm).
    assert extra <= 8, f"{extra} more device reads for 16 more steps"


# --- chunked cross-entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(tied):
    torch.manual_seed(0)
    n, c, v = 300, 32, 1000
    hidden = torch.randn(n, c, requires_grad=True)
    w = torch.randn(v, c, requires_grad=True) if tied else torch.randn(c, v, requires_grad=True)
    head = w.t() if tied else w  # [C, V]; the tied head is a transposed view
    targets = torch.randint(0, v, (n,))
    targets[::7] = IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy(hidden @ head, targets, ignore_index=IGNORE_INDEX)
    plain_grads = torch.autograd.grad(plain * 3.0, (hidden, w))
    chunked = chunked_cross_entropy(hidden, head, targets, chunk_rows=64)  # 5 chunks, 1 partial
    chunked_grads = torch.autograd.grad(chunked * 3.0, (hidden, w))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_never_keeps_the_full_logits():
    torch.manual_seed(0)
    n, c, v = 256, 16, 2048
    hidden = torch.randn(n, c, requires_grad=True)
    emb = torch.randn(v, c, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    kept: list[int] = []

    def pack(t):
        kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, emb.t(), targets, chunk_rows=64).backward()
    assert kept and max(kept) < n * v  # the plain path keeps the [N, V] logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(hidden @ emb.t(), targets).backward()
    assert max(kept) >= n * v  # (the check above can see a full logits tensor)


@pytest.mark.parametrize("preset", preset_names())
def test_next_token_loss_chunked_matches_plain_for_every_preset(preset):
    """The chunked path applies the head to `hidden_states`; the plain one runs the model's
    forward. Equal losses and gradients for every architecture keep the two in step."""
    torch.manual_seed(0)
    config = load_preset(preset, vocab_size=512, n_layers=1, max_seq_len=64)
    model = Transformer(config)
    idx = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    losses, grads = [], []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        loss = NextTokenLoss(model, chunked=chunked, chunk_rows=8)(idx, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_precision_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    from trainer.loop import resolve_precision

    cfg = load_train_config(None, ['run.precision="auto"'])
    for avx512_bf16, amx, expected in [
        (False, False, "fp32"),
        (True, False, "bf16"),
        (False, True, "bf16"),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision(cfg, "cpu") == expected
    explicit = load_train_config(None, ['run.precision="fp16"'])
    assert resolve_precision(explicit, "cpu") == "fp16"
