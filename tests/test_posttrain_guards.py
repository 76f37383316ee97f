"""Post-training calls that must be refused, or must work, without losing anything: a
resume into another stage's run folder, a setting that TOML cannot hold unescaped, a
batch larger than the data, a DPO reference cache after ordinary config changes, a bad
parquet file, data.seq_len against the base model's limit. Each refusal is one line,
before anything is written or removed (tiny gpt2 over the byte tokenizer: seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from posttrain_helpers import (
    chat_records,
    make_base,
    preference_records,
    settings,
    write_jsonl,
)
from typer.testing import CliRunner

from atlas_server.checkpoint import read_metadata
from atlas_server.tomlconfig import parse_toml
from trainer.cli import app
from trainer.config import TrainConfigError, load_train_config
from trainer.state import list_checkpoints


@pytest.fixture(scope="module")
def files(tmp_path_factory, byte_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guards")
    return {
        "base": make_base(root, byte_tokenizer),
        "chat": write_jsonl(root / "chat.jsonl", chat_records()),
        "prefs": write_jsonl(root / "prefs.jsonl", preference_records()),
        "root": root,
    }


def invoke(stage: str, base: Path, out: Path, data: Path, *extra: str, resume=False):
    sets = settings(
        base, out, f'{stage}.train=["{data}"]', "schedule.max_steps=2",
        "run.checkpoint_every=2", "run.eval_every=2", "run.sample_tokens=0", *extra,
    )  # fmt: skip
    args = [stage, *(w for s in sets for w in ("--set", s))] + (["--resume"] if resume else [])
    return CliRunner().invoke(app, args)


def one_line_error(result, *fragments: str) -> str:
    """A refused call: exit 1, and one `error:` line (after what was read, if anything)
    holding every fragment."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert all(f in errors[0] for f in fragments), result.output
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- 1. a run folder belongs to one stage ----------------------------------------------------------
def test_dpo_resume_of_an_sft_run_folder_is_refused_and_the_sft_run_kept(files, tmp_path):
    """QA: `atlas-train dpo --resume` into an SFT run's folder trained the SFT checkpoint
    as DPO, and keep_last then deleted the SFT checkpoints (lineage lost the SFT stage)."""
    out = tmp_path / "sft"
    assert invoke("sft", files["base"], out, files["chat"]).exit_code == 0
    partial = out / "checkpoints" / ".tmp-step_000004"  # an interrupted save: kept too
    partial.mkdir()
    before = snapshot(out)
    result = invoke("dpo", files["base"], out, files["prefs"], resume=True)
    one_line_error(
        result, f"{out} holds an SFT run", "resume it with atlas-train sft", "another run.out_dir"
    )
    assert snapshot(out) == before and partial.is_dir()
    assert read_metadata(list_checkpoints(out)[-1])["provenance"]["stage"] == "sft"


def plant(out: Path, name: str, record: dict) -> Path:
    """A complete checkpoint as `list_checkpoints` sees it, with one metadata file."""
    folder = out / "checkpoints" / "step_000020"
    folder.mkdir(parents=True)
    state = {"step": 20}
    if name == "trainer_state.json":  # saved before lineage: only its config says the stage
        state["config_toml"] = record["config_toml"]
    else:
        (folder / name).write_text(json.dumps(record))
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.mark.parametrize(
    ("stage", "name", "record", "says"),
    [
        ("sft", "config.json", {"provenance": {"stage": "pretrain"}}, "a pretraining run"),
        ("dpo", "adapter.json", {"provenance": {"stage": "sft"}}, "an SFT run"),  # LoRA
        ("sft", "trainer_state.json", {"config_toml": '[dpo]\ntrain = ["p.jsonl"]\n'}, "a DPO run"),
    ],
)
def test_resume_into_another_stages_folder_is_refused(files, tmp_path, stage, name, record, says):
    out = tmp_path / "run"
    plant(out, name, record)
    before = snapshot(out)
    data = files["chat"] if stage == "sft" else files["prefs"]
    one_line_error(invoke(stage, files["base"], out, data, resume=True), f"holds {says}")
    assert snapshot(out) == before


# --- 2. config.toml holds any string ---------------------------------------------------------------
STRINGS = [
    "What does\njson.dumps do?",
    "tab\there, CR\r, FF\f, BS\b",
    'quotes "inside" and \\backslashes\\ and \\n literally',
    "NUL \x00, unit separator \x1f, DEL \x7f",
    "non-ASCII: é ü 漢字 🙂",
    "",
]


@pytest.mark.parametrize("text", STRINGS)
def test_to_toml_round_trips_every_string(tmp_path, text):
    """QA: a newline in run.sample_prompt made config.toml (and every checkpoint's saved
    config) invalid TOML, and each resume failed with "Illegal character '\\n'"."""
    base = load_train_config(None)
    cfg = msgspec.structs.replace(
        base,
        run=msgspec.structs.replace(base.run, sample_prompt=text),
        model=msgspec.structs.replace(base.model, overrides={"a b": text}),
    )
    table = parse_toml(cfg.to_toml())
    assert table["run"]["sample_prompt"] == text
    assert table["model"]["overrides"] == {"a b": text}
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_train_config(path) == cfg


def test_a_run_with_a_newline_in_its_prompt_resumes(files, tmp_path):
    out = tmp_path / "run"
    prompt = 'run.sample_prompt="What does\\njson.dumps do?"'
    first = invoke("sft", files["base"], out, files["chat"], prompt, "run.sample_tokens=2")
    assert first.exit_code == 0, first.output
    more = invoke("sft", files["base"], out, files["chat"], prompt, "schedule.max_steps=3",
                  resume=True)  # fmt: skip
    assert more.exit_code == 0, more.output
    assert "resuming from step 2" in more.output and "Illegal character" not in more.output
    assert load_train_config(out / "config.toml").run.sample_prompt == "What does\njson.dumps do?"


def test_a_checkpoint_with_an_unreadable_saved_config_still_resumes(files, tmp_path):
    """One saved by an Atlas that wrote newlines unescaped: the settings cannot be
    compared, and the warning names the file that holds them."""
    out = tmp_path / "run"
    assert invoke("sft", files["base"], out, files["chat"]).exit_code == 0
    state_file = list_checkpoints(out)[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config_toml"] += '[x]\ny = "broken\nstring"\n'
    state_file.write_text(json.dumps(state))
    result = invoke("sft", files["base"], out, files["chat"], "schedule.max_steps=3", resume=True)
    assert result.exit_code == 0, result.output
    assert f"the config saved in {state_file} is not valid TOML" in result.output


def test_a_config_file_that_is_not_toml_is_named(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[run]\nsample_prompt = "a\nb"\n')
    with pytest.raises(TrainConfigError, match=f"{bad} is not valid TOML"):
        load_train_config(bad)


# --- 3. a batch larger than the data is refused before anything is written -------------------------
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_batch_larger_than_the_data_is_refused_before_writing(files, tmp_path, stage):
    """QA: the refusal came at the first step, after RUN/config.toml and tensorboard/ were
    written (with --resume, over the run's own config.toml); DPO also ran its reference."""
    data = write_jsonl(
        tmp_path / "data.jsonl", chat_records() if stage == "sft" else preference_records()
    )
    fresh = tmp_path / "fresh"
    what = "rows exceeds the" if stage == "sft" else "pairs exceeds the 10 pairs"
    result = invoke(stage, files["base"], fresh, data, "data.micro_batch=1000")
    one_line_error(result, "a global batch of 1000", what, "lower data.micro_batch")
    assert not fresh.exists()
    assert not list(tmp_path.glob("data.jsonl.ref-logps*"))  # no reference pass ran
    out = tmp_path / "run"
    assert invoke(stage, files["base"], out, data).exit_code == 0
    before = snapshot(out)
    result = invoke(stage, files["base"], out, data, "data.micro_batch=1000", resume=True)
    one_line_error(result, "a global batch of 1000")
    assert snapshot(out) == before


# --- 4. the DPO reference cache: one file per variant ----------------------------------------------
def test_ordinary_dpo_changes_get_their_own_reference_cache(files, tmp_path):
    """QA: after one DPO run, loss_type ipo or another data.seq_len was refused ("was
    computed for other inputs (average=false, now true)") though nothing was stale, and
    no option recomputed it. Each variant now has its own file; the first is untouched."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_records())
    assert invoke("dpo", files["base"], tmp_path / "a", prefs).exit_code == 0
    (first,) = tmp_path.glob("prefs.jsonl.ref-logps-*.safetensors")
    before = first.read_bytes()
    # ipo averages per token; seq_len 56 keeps 4 of the 10 pairs (other tokenized pairs)
    for name, extra in (("b", 'dpo.loss_type="ipo"'), ("c", "data.seq_len=56")):
        result = invoke("dpo", files["base"], tmp_path / name, prefs, extra)
        assert result.exit_code == 0, result.output
        assert "written to" in result.output and str(first) not in result.output
    assert len(list(tmp_path.glob("prefs.jsonl.ref-logps-*.safetensors"))) == 3
    assert first.read_bytes() == before
    again = invoke("dpo", files["base"], tmp_path / "d", prefs, 'dpo.loss_type="ipo"')
    assert again.exit_code == 0 and "reference log-probs read from" in again.output


# --- 5. a bad parquet file is named ----------------------------------------------------------------
def test_a_file_that_is_not_parquet_is_named(files, tmp_path):
    bad = tmp_path / "f.parquet"
    bad.write_text("x")
    result = invoke("sft", files["base"], tmp_path / "run", bad)
    one_line_error(result, f"{bad} is not a readable parquet file")
    assert not (tmp_path / "run").exists()


# --- 6. data.seq_len against the base model's max_seq_len ------------------------------------------
def test_dpo_refuses_a_seq_len_beyond_the_model_before_the_reference_pass(files, tmp_path):
    """QA: it failed after the reference pass with "position 469 exceeds max_seq_len=256"."""
    long = [{"prompt": "q" * 300, "chosen": "a", "rejected": "b"}, *preference_records()]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", long)
    result = invoke("dpo", files["base"], tmp_path / "run", prefs, "data.seq_len=512")
    one_line_error(result, "data.seq_len=512 exceeds", "max_seq_len=256")
    assert not list(tmp_path.glob("prefs.jsonl.ref-logps*")) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("stage", "seq_len", "advice"),
    [
        ("sft", 256, "data.seq_len is already"),
        ("dpo", 256, "data.seq_len is already"),
        ("sft", 100, "raise data.seq_len (up to"),
    ],
)
def test_too_long_data_says_whether_seq_len_can_grow(files, tmp_path, stage, seq_len, advice):
    if stage == "sft":
        records = [
            {
                "messages": [
                    {"role": "user", "content": "q" * 300},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ]
    else:
        records = [{"prompt": "q" * 300, "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "long.jsonl", records)
    result = invoke(stage, files["base"], tmp_path / "run", data, f"data.seq_len={seq_len}")
    line = one_line_error(result, advice)
    if seq_len == 256:
        assert "max_seq_len (256)" in line and "raise data.seq_len" not in line
