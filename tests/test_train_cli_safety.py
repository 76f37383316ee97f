"""A refused `atlas-train` call destroys nothing: prepare-data checks everything before it
writes (the tokenizer copy of an existing preparation included), takes tokenizer and
checkpoint folders, and refuses bad --shard-tokens / --workers; training checks the data's
tokenizer copy, refuses a run folder that holds checkpoints unless --resume, writes
config.toml only once the run starts, names its own last checkpoint, and says so when
Ctrl-C stops it before the first step."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from posttrain_helpers import (
    chat_records,
    make_base,
    preference_records,
    settings,
    write_jsonl,
)
from typer.testing import CliRunner

import trainer.cli
import trainer.loop
from atlas_server.tokenizer import DEFAULT_SPECIAL_TOKENS, byte_level_tokenizer
from atlas_server.tokenizer.corpus import stdlib_sample
from trainer.cli import app
from trainer.config import load_train_config
from trainer.data import data_tokenizer, prepare_data
from trainer.flops import measured_matmul_peak
from trainer.loop import Dist, fit, setup
from trainer.state import list_checkpoints

NOTHING_SAVED = "interrupted before training started; no checkpoint was saved"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    """The output of a refused call: exit 1, one `error:` line holding every fragment."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(f in lines[0] for f in fragments), result.output
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory, byte_tokenizer) -> dict[str, Path]:
    """A small corpus; tokenizer A (extra special tokens before <|endoftext|>, so its ids
    run past the byte tokenizer's) and tokenizer B (the byte tokenizer); data prepared
    with A; a base checkpoint and chat and preference files for sft and dpo."""
    root = tmp_path_factory.mktemp("safety")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_sample(40_000, docstring_share=0.5)):
        (corpus / f"d{i:03d}.txt").write_text(text)
    extra = tuple(f"<|extra_{i}|>" for i in range(100))
    tok_a = byte_level_tokenizer(extra + DEFAULT_SPECIAL_TOKENS).save(
        root / "a" / "atlas_tokenizer.json"
    )
    tok_b = byte_tokenizer.save(root / "b" / "atlas_tokenizer.json")
    data = root / "tokens"
    prepare_data([str(corpus)], tok_a, data, 0.1, shard_tokens=20_000, workers=1, progress=False)
    tokens_b = root / "tokens-b"
    prepare_data([str(corpus)], tok_b, tokens_b, 0.1, shard_tokens=20_000, workers=1,
                 progress=False)  # fmt: skip
    return {
        "corpus": corpus,
        "tok_a": tok_a,
        "tok_b": tok_b,
        "data": data,
        "tokens_b": tokens_b,
        "base": make_base(root, byte_tokenizer),
        "chat": write_jsonl(root / "chat.jsonl", chat_records()),
        "prefs": write_jsonl(root / "prefs.jsonl", preference_records()),
    }


def pretrain_sets(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f'data.path="{data}"', f'run.out_dir="{out}"', 'model.preset="gpt2-tiny"',
        "data.seq_len=32", "data.micro_batch=2", "schedule.max_steps=2",
        "schedule.warmup_steps=1", "run.eval_every=2", "run.eval_batches=1",
        "run.checkpoint_every=2", "run.sample_tokens=0", "run.tensorboard=false",
        "run.threads=1", *extra,
    ]  # fmt: skip
    return [word for s in sets for word in ("--set", s)]


def plant_checkpoint(out: Path, step: int) -> Path:
    """What `list_checkpoints` counts as a complete checkpoint of another run."""
    folder = out / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


# --- prepare-data -------------------------------------------------------------------------------
def test_a_refused_preparation_leaves_the_stored_tokenizer_and_progress_alone(files, tmp_path):
    """D2: another tokenizer into an existing preparation is refused, and the copy of the
    shards' tokenizer is still theirs (it was overwritten before the refusal)."""
    data = tmp_path / "tokens"
    shutil.copytree(files["data"], data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    result = invoke(
        "prepare-data", files["corpus"], "--tokenizer", files["tok_b"], "--output", data,
        "--val-fraction", "0.1", "--shard-tokens", "20000", "--workers", "1",
    )  # fmt: skip
    # The message names what differs (it did not: found by a QA pass).
    one_line_error(result, "holds a preparation with other settings (the tokenizer)")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_training_refuses_a_tokenizer_copy_that_is_not_the_shards(files, tmp_path):
    """D2: a copy replaced since preparation (the data holds ids up to 356, the byte
    tokenizer has 259) is a one-line error, not an IndexError from the embedding; the
    preparation's own command restores the copy."""
    data = tmp_path / "tokens"
    shutil.copytree(files["data"], data)
    shutil.copy(files["tok_b"], data / "atlas_tokenizer.json")
    out = tmp_path / "run"
    result = invoke("train", *pretrain_sets(data, out))
    one_line_error(result, "is not the tokenizer the shards of", str(data))
    assert not out.exists()
    prepare_data(
        [str(files["corpus"])], files["tok_a"], data, 0.1, shard_tokens=20_000, workers=1,
        progress=False,
    )  # fmt: skip
    assert data_tokenizer(data).vocab_size == 359


@pytest.mark.parametrize("which", ["tokenizer folder", "checkpoint folder"])
def test_prepare_data_takes_a_tokenizer_or_a_checkpoint_folder(files, tmp_path, which):
    """D5: --help says a folder holding atlas_tokenizer.json works, and the trainer's error
    suggests `--tokenizer CHECKPOINT`; the folder's file is hashed and handed to the
    workers (it failed with "[Errno 21] Is a directory")."""
    folder = files["tok_a"].parent if which == "tokenizer folder" else files["base"]
    out = tmp_path / "tokens"
    workers = "2" if which == "checkpoint folder" else "1"  # the worker processes read it too
    result = invoke(
        "prepare-data", files["corpus"], "--tokenizer", folder, "--output", out,
        "--val-fraction", "0.1", "--workers", workers,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == sha256(folder / "atlas_tokenizer.json")
    assert data_tokenizer(out).vocab_size == manifest["tokenizer_vocab_size"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard-tokens", "0"], "--shard-tokens must be >= 1"),
        (["--shard-tokens", "-5"], "--shard-tokens must be >= 1"),
        (["--workers", "-3"], "--workers must be >= 0"),
        (["--tokenizer", "no/such/tokenizer.json"], "no tokenizer file at"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1)"),
    ],
)
def test_bad_prepare_data_arguments_are_refused_before_anything_is_written(
    files, tmp_path, flags, message
):
    """D11 (and D2's "check before writing"): no output folder is left behind."""
    out = tmp_path / "tokens"
    args = {"--tokenizer": str(files["tok_a"]), "--workers": "1"}
    args.update(zip(flags[::2], flags[1::2], strict=True))
    result = invoke(
        "prepare-data", files["corpus"], "--output", out, *(w for kv in args.items() for w in kv)
    )
    one_line_error(result, message)
    assert not out.exists()


def test_missing_input_is_refused_before_anything_is_written(files, tmp_path):
    out = tmp_path / "tokens"
    result = invoke(
        "prepare-data", tmp_path / "nothing", "--tokenizer", files["tok_a"], "--output", out
    )
    one_line_error(result, "no such file, folder or glob match")
    assert not out.exists()


# --- training into a run folder -----------------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "sft", "dpo"])
def test_a_run_folder_with_checkpoints_needs_resume(files, tmp_path, stage):
    """D3: a fresh run into a folder holding another run's checkpoints used to replace
    them step by step and report the old run's last one as its own. Each command refuses
    it, naming the folder and the step, before it writes or reads anything large."""
    out = tmp_path / "run"
    old = plant_checkpoint(out, 20)
    (out / "config.toml").write_text("# the old run's\n")
    if stage == "train":
        args = pretrain_sets(files["data"], out)
    else:
        data = files["chat"] if stage == "sft" else files["prefs"]
        sets = settings(files["base"], out, f'{stage}.train=["{data}"]', "schedule.max_steps=1")
        args = [word for s in sets for word in ("--set", s)]
    result = invoke(stage, *args)
    one_line_error(result, f"run.out_dir {out} already holds checkpoints", "step 20", "--resume")
    assert "choose another run.out_dir" in result.output
    assert list_checkpoints(out) == [old]
    assert (out / "config.toml").read_text() == "# the old run's\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.toml"]


def test_the_summary_names_this_runs_last_checkpoint(files, tmp_path):
    """D3: the final checkpoint reported is the one this run saved, not the highest step
    on disk (a later step of something else appeared in the folder meanwhile)."""
    out = tmp_path / "run"
    run = setup(load_train_config(None, pretrain_sets(files["data"], out)[1::2]), Dist())
    plant_checkpoint(out, 40)
    summary = fit(run, progress=False)
    assert summary["checkpoint"] == str(out / "checkpoints" / "step_000002")


def test_a_refused_call_keeps_the_run_folder_as_it_was(files, tmp_path):
    """D4: a config that fails to build used to overwrite the folder's config.toml first,
    and leave a new run folder behind."""
    out = tmp_path / "ref"
    out.mkdir()
    (out / "config.toml").write_text("# the run that worked\n")
    result = invoke("train", *pretrain_sets(files["data"], out, "model.overrides={n_heads=3}"))
    one_line_error(result, "not divisible by n_heads=3")
    assert (out / "config.toml").read_text() == "# the run that worked\n"
    fresh = tmp_path / "fresh"
    result = invoke("train", *pretrain_sets(files["data"], fresh, "data.seq_len=512"))
    one_line_error(result, "exceeds the model's max_seq_len")
    assert not fresh.exists()


def test_config_toml_is_written_once_the_run_starts(files, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *pretrain_sets(files["data"], out))
    assert result.exit_code == 0, result.output
    assert f"final checkpoint: {out / 'checkpoints' / 'step_000002'}" in result.output
    assert 'out_dir = "' in (out / "config.toml").read_text()
    assert not list(out.glob(".config.toml*"))  # no temp file of the atomic write left


def test_progress_into_a_file_is_plain_lines_not_a_bar(files, tmp_path):
    """Under nohup or a batch job a bar is a stream of carriage returns; there each log
    step is one line (CliRunner's stderr is not a terminal)."""
    out = tmp_path / "run"
    result = invoke("train", *pretrain_sets(files["data"], out, "run.log_every=1"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if " | loss " in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"], result.output
    assert all(" | tok_s " in line and " | grad_norm " in line for line in lines)
    assert "\r" not in result.output and "training:" not in result.output


def test_resume_says_which_settings_changed_the_run(files, tmp_path):
    """Found by an audit: a --resume with another seq_len or batch continued silently, and
    the run was no longer the one the docs call exact."""
    out = tmp_path / "run"
    assert invoke("train", *pretrain_sets(files["data"], out)).exit_code == 0
    same = invoke("train", *pretrain_sets(files["data"], out, "run.log_every=1"), "--resume")
    assert same.exit_code == 0 and "settings differ" not in same.output, same.output
    longer = invoke(
        "train", *pretrain_sets(files["data"], out, "schedule.max_steps=3", "optim.lr=1e-3"),
        "--resume",
    )  # fmt: skip
    assert longer.exit_code == 0, longer.output
    assert "settings differ from the checkpoint's: optim.lr (0.0006 -> 0.001), " in longer.output
    assert "schedule.max_steps (2 -> 3)" in longer.output
    # A rounding-only change made beside them is named too (it was dropped).
    threads = invoke(
        "train", *pretrain_sets(files["data"], out, "schedule.max_steps=4", "run.threads=2"),
        "--resume",
    )  # fmt: skip
    assert threads.exit_code == 0, threads.output
    assert "schedule.max_steps (3 -> 4) (and run.threads" in threads.output, threads.output
    # QA: a max_steps below the checkpoint's step trained nothing, said "the run continues"
    # and exited 0.
    shorter = invoke(
        "train", *pretrain_sets(files["data"], out, "schedule.max_steps=3"), "--resume"
    )
    assert shorter.exit_code == 1, shorter.output
    assert "the checkpoint is at step 4, past schedule.max_steps = 3" in shorter.output
    assert "Traceback" not in shorter.output


def test_resume_compares_the_global_batch_and_names_changes_of_rounding():
    """Found by a QA pass: resuming a 2-process run in one process halved the global batch
    without a word, while 2 x 8 resumed as 1 x 16 (the same batch) was called another run;
    and another run.threads or run.compile passed quietly though no longer bit for bit."""
    from trainer.loop import resume_differences

    def cfg(*sets):
        return load_train_config(None, ["data.micro_batch=8", *sets])

    saved = cfg().to_toml()
    assert resume_differences(saved, 2, cfg(), 2) == ([], [])
    changes, rounding = resume_differences(saved, 2, cfg(), 1)
    assert changes == ["the global batch (16 -> 8 windows: data.micro_batch x data.grad_accum "
                       "x processes, 8 x 1 x 2 -> 8 x 1 x 1)"] and rounding == []  # fmt: skip
    changes, rounding = resume_differences(saved, 2, cfg("data.micro_batch=16"), 1)
    assert changes == [] and rounding[0].startswith("the split of the global batch (16 -> 16")
    changes, rounding = resume_differences(saved, 1, cfg("run.threads=1", "run.compile=true"), 1)
    assert changes == [] and [r.split(" ")[0] for r in rounding] == ["run.compile", "run.threads"]
    assert "run.threads (unset -> 1)" in rounding  # not the config's "__none__" marker
    # A checkpoint from before processes were recorded: taken to have as many as now.
    assert resume_differences(saved, None, cfg(), 2) == ([], [])


def test_the_cpu_matmul_peak_is_measured_again_and_the_best_kept(files, tmp_path, monkeypatch):
    """A peak measured while other work loads the cores is low, and every MFU after it
    high: it is measured again at each validation, and the best kept."""
    peaks = iter([1e6, 1e15, 1e3])  # at the start (a loaded machine), then at steps 1 and 2
    monkeypatch.setattr(trainer.loop, "measured_matmul_peak", lambda *a, **k: next(peaks))
    monkeypatch.setattr(trainer.loop, "_PEAK_SEEN", {})  # no earlier run's peak
    monkeypatch.setattr(trainer.loop, "PEAK_REFRESH_SECONDS", 0.0)  # at every validation
    out = tmp_path / "run"
    sets = pretrain_sets(files["data"], out, "run.log_every=1", "run.eval_every=1",
                         "schedule.max_steps=3")  # fmt: skip
    result = invoke("train", *sets)
    assert result.exit_code == 0, result.output
    mfu = [line.rsplit("mfu ", 1)[1] for line in result.output.splitlines() if " | mfu " in line]
    assert float(mfu[0].rstrip("%")) > 100 and mfu[1:] == ["0.0%", "0.0%"], result.output


def test_the_peak_is_measured_once_per_process_and_again_only_after_a_while(
    files, tmp_path, monkeypatch
):
    """A second run in one process (a sweep, a notebook) starts from the peak the first
    measured, and validating often does not re-measure more than every
    PEAK_REFRESH_SECONDS: each measurement costs the run half a second to a second."""
    calls = []
    monkeypatch.setattr(
        trainer.loop, "measured_matmul_peak", lambda *a, **k: calls.append(a) or 1e12
    )
    monkeypatch.setattr(trainer.loop, "_PEAK_SEEN", {})
    sets = ("run.log_every=1", "run.eval_every=1", "schedule.max_steps=3")
    first = invoke("train", *pretrain_sets(files["data"], tmp_path / "a", *sets))
    assert first.exit_code == 0, first.output
    assert len(calls) == 1  # at the start; the validations at steps 1 and 2 came too soon
    second = invoke("train", *pretrain_sets(files["data"], tmp_path / "b", *sets))
    assert second.exit_code == 0, second.output
    assert len(calls) == 1  # the first run's peak was reused
    assert " | mfu " in second.output


def test_mfu_is_against_the_peak_of_the_precision_the_run_multiplies_in(
    files, tmp_path, monkeypatch
):
    """bf16 autocast on a CPU with bf16 units (AVX512-BF16, AMX) multiplies faster than the
    fp32 peak it was measured against: the quickstart logged MFU 104-108% on such a host.
    A bf16 run's peak is a bf16 one; an fp32 run's stays fp32."""
    asked = []
    monkeypatch.setattr(
        trainer.loop, "measured_matmul_peak", lambda *a, **k: asked.append(k.get("dtype")) or 1e12
    )
    monkeypatch.setattr(trainer.loop, "_PEAK_SEEN", {})
    sets = ("schedule.max_steps=1",)
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        result = invoke("train", *pretrain_sets(files["data"], out, *sets,
                                                f'run.precision="{precision}"'))  # fmt: skip
        assert result.exit_code == 0, result.output
    assert asked == [torch.bfloat16, None]
    # And the measurement itself multiplies in the dtype asked for.
    seen = []
    real_randn = torch.randn
    monkeypatch.setattr(
        torch, "randn", lambda *a, **k: seen.append(k.get("dtype")) or real_randn(*a, **k)
    )
    assert measured_matmul_peak("cpu", size=64, seconds=0.01, dtype=torch.bfloat16) > 0
    assert seen and set(seen) == {torch.bfloat16}


def test_the_peak_measurement_keeps_to_its_time_on_one_thread():
    """One thread multiplies a 3072^3 product in over a second; run.threads=1 runs (every
    test run) spent 2-4 s measuring a 1 s peak before the sizes followed the budget."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        peak = measured_matmul_peak("cpu", seconds=0.2)
        took = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert peak > 1e9  # FLOP/s: any CPU core of this century
    assert took < 1.5, f"measuring for 0.2 s took {took:.2f} s"


def test_resuming_on_data_of_another_tokenizer_is_refused_before_training(files, tmp_path):
    """Data prepared with another tokenizer of the same size used to be resumed on without
    a word: the trained weights were fed other ids, and the next checkpoint carried the new
    tokenizer. Of another size, torch's multi-line load report came out."""
    other = tuple(f"<|other_{i}|>" for i in range(100))  # as many ids as tokenizer A
    tok_c = byte_level_tokenizer(other + DEFAULT_SPECIAL_TOKENS).save(
        tmp_path / "c" / "atlas_tokenizer.json"
    )
    data_c = tmp_path / "tokens-c"
    prepare_data([str(files["corpus"])], tok_c, data_c, 0.1, shard_tokens=20_000, workers=1,
                 progress=False)  # fmt: skip
    out = tmp_path / "run"
    assert invoke("train", *pretrain_sets(files["data"], out)).exit_code == 0
    before = [p.name for p in list_checkpoints(out)]
    for data in (data_c, files["tokens_b"]):
        longer = pretrain_sets(data, out, "schedule.max_steps=4")
        result = invoke("train", *longer, "--resume")
        lines = result.output.strip().splitlines()  # "resuming from step 2 (...)", then it
        assert result.exit_code == 1 and lines[-1].startswith("error:"), result.output
        assert [line for line in lines if line.startswith("error:")] == lines[-1:]
        assert "has another tokenizer than" in lines[-1] and str(data) in lines[-1]
    assert [p.name for p in list_checkpoints(out)] == before  # nothing written


def test_a_run_folder_that_is_a_file_and_data_that_is_not_prepared_are_named(files, tmp_path):
    """They came out as `[Errno 17] File exists` and `no tokenizer file at ...`."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, says in ((afile, "is a file"), (afile / "sub", "is under the file")):
        one_line_error(invoke("train", *pretrain_sets(files["data"], out)), "run.out_dir", says)
    for data, says in ((tmp_path / "nodata", "does not exist"),
                       (files["corpus"], "is not prepared data")):  # fmt: skip
        result = invoke("train", *pretrain_sets(data, tmp_path / "run"))
        one_line_error(result, f"data.path {data}", says, "prepare-data")


# --- Ctrl-C before the first step ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "name"),
    [
        (trainer.cli, "load_train_config"),  # before the loop is called
        (trainer.loop, "setup"),  # reading data, building the model
        (trainer.loop, "measured_matmul_peak"),  # the progress tracker's peak
    ],
)
def test_ctrl_c_before_training_says_nothing_was_saved(files, tmp_path, monkeypatch, module, name):
    """D13: it exited 130 without a word, as if the loop had said where it stopped."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
    monkeypatch.setattr(trainer.loop, "_PEAK_SEEN", {})  # the peak is measured, not recalled
    out = tmp_path / "run"
    result = invoke("train", *pretrain_sets(files["data"], out))
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [NOTHING_SAVED], result.output
    assert not list_checkpoints(out)


def test_a_missing_init_from_is_named_by_its_key(files, tmp_path):
    """QA: the shipped SFT config's `init_from = "posttrain/base"` gave "posttrain/base is
    not a directory", and the user had to find which setting held that path."""
    missing = tmp_path / "posttrain" / "base"
    result = invoke(
        "train", *pretrain_sets(files["data"], tmp_path / "run", f'model.init_from="{missing}"')
    )
    assert result.exit_code == 1, result.output
    assert f"model.init_from: {missing} is not a directory" in result.output
    assert "Traceback" not in result.output
