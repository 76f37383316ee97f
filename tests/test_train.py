"""The trainer: data shards, deterministic loader, exact resume (also after SIGKILL), DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint
from atlas_server.tokenizer import train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig as TokenizerConfig
from trainer.cli import app
from trainer.config import TrainConfigError, load_train_config
from trainer.data import DataError, prepare_data, read_shard
from trainer.loader import TokenLoader
from trainer.loop import lr_at, train
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


def test_same_seed_same_losses(tmp_path, data_dir):
    a = train(config(data_dir, tmp_path / "a"), progress=False)["losses"]
    b = train(config(data_dir, tmp_path / "b"), progress=False)["losses"]
    assert a == b
    assert a[-1] < a[0]


def test_resume_is_bit_exact_and_keeps_last_n(tmp_path, data_dir):
    full = train(config(data_dir, tmp_path / "full"), progress=False)["losses"]
    # an interrupted run: drop its last checkpoint so the newest one is at step 8
    part = train(config(data_dir, tmp_path / "part", "run.checkpoint_every=4"), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step_000008", "step_000012"]
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_000012")
    resumed = train(config(data_dir, tmp_path / "part"), resume=True, progress=False)
    assert resumed["start_step"] == 8
    assert resumed["losses"] == full[8:]
    assert part["losses"] == full


def test_sigkill_mid_save_then_resume_matches_uninterrupted(tmp_path, data_dir):
    full = train(config(data_dir, tmp_path / "full"), progress=False)["losses"]
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


def test_checkpoint_is_served_unchanged_and_logs_exist(tmp_path, data_dir):
    summary = train(config(data_dir, tmp_path / "run"), progress=False)
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt.provenance["step"] == 12
    assert "bits_per_byte" in summary["val"] and summary["val"]["bits_per_byte"] > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "config.toml").read_text().startswith("[model]")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_data_parallel_matches_single_process(tmp_path, data_dir, strategy):
    single = train(
        config(data_dir, tmp_path / "one", "data.micro_batch=4", "model.overrides={dropout = 0.0}"),
        progress=False,
    )["losses"]
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
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_000012").model
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
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(
        a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)
    )


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(TrainConfigError, match="unknown|unexpected|Object contains unknown field"):
        load_train_config(None, ["optim.learning_rate=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = 'x'\n")
    result = CliRunner().invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 1 and result.output.startswith("error:") and "seed" in result.output


def test_profile_writes_a_trace(tmp_path, data_dir):
    train(config(data_dir, tmp_path / "prof", "schedule.max_steps=6"), profile=True, progress=False)
    assert (tmp_path / "prof" / "profile_trace.json").stat().st_size > 0


def test_mlflow_logging_writes_a_local_run(tmp_path, data_dir):
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
