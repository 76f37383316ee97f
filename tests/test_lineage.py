"""Lineage and continued pretraining: `init_from` loads the weights with a fresh optimizer
at step 0; every checkpoint records its stage, its base checkpoint's hash and its data's
hash; `atlas checkpoint inspect` shows the chain pretrain -> sft -> dpo; checkpoints saved
before lineage existed still load, inspect and serve as bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from posttrain_helpers import (
    chat_records,
    config,
    make_base,
    preference_records,
    settings,
    write_jsonl,
)
from typer.testing import CliRunner

from atlas_server.checkpoint import lineage, load_checkpoint, read_metadata, sha256_file
from atlas_server.cli import app as atlas_app
from atlas_server.tokenizer import train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig as TokenizerConfig
from trainer.cli import app as train_app
from trainer.data import prepare_data
from trainer.loop import PRETRAINING, Dist, fit, setup, train
from trainer.posttrain import dpo_task, sft_task
from trainer.state import list_checkpoints

TEXTS = stdlib_sample(60_000, docstring_share=0.5)


def token_data(root: Path, tokenizer) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"d{i:03d}.txt").write_text(text)
    tokenizer.save(root / "atlas_tokenizer.json")
    out = root / "tokens"
    prepare_data([str(corpus)], root / "atlas_tokenizer.json", out, 0.1, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, byte_tokenizer) -> Path:
    return make_base(tmp_path_factory.mktemp("lineage"), byte_tokenizer)


def continued_config(base: Path, data: Path, out: Path, *extra: str):
    return config(
        base,
        out,
        f'data.path="{data}"',
        "data.seq_len=32",
        "schedule.max_steps=2",
        "run.checkpoint_every=2",
        "run.eval_every=2",
        "run.eval_batches=1",
        "run.sample_tokens=0",
        *extra,
    )


def test_init_from_loads_weights_with_a_fresh_optimizer_at_step_zero(
    tmp_path, base, byte_tokenizer
):
    data = token_data(tmp_path, byte_tokenizer)
    cfg = continued_config(base, data, tmp_path / "run")
    run = setup(cfg, Dist(), None, PRETRAINING)
    assert run.step == run.start_step == 0
    assert run.optimizer.state_dict()["state"] == {}  # no moments carried over
    loaded = load_checkpoint(base).model.state_dict()
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
    summary = fit(run, progress=False)
    assert summary["start_step"] == 0 and len(summary["losses"]) == 2
    prov = read_metadata(list_checkpoints(tmp_path / "run")[-1])["provenance"]
    assert prov["stage"] == "pretrain" and prov["step"] == 2
    assert prov["base_checkpoint_sha256"] == sha256_file(base / "model.safetensors")
    assert prov["data_sha256"] == sha256_file(data / "manifest.json")
    assert [(link["stage"], link.get("step")) for link in prov["lineage"]] == [
        ("pretrain", 7),
        ("pretrain", 2),
    ]


def test_init_from_refuses_data_of_another_tokenizer(tmp_path, base):
    other = train_from_texts(TEXTS[:20], TokenizerConfig(vocab_size=300), progress=False)
    data = token_data(tmp_path, other)
    overrides = settings(base, tmp_path / "run", f'data.path="{data}"', "data.seq_len=32")
    result = CliRunner().invoke(train_app, ["train", *[a for s in overrides for a in ("--set", s)]])
    assert result.exit_code == 1
    assert "was tokenized with another tokenizer" in result.output
    assert len(result.output.strip().splitlines()) == 1


ONE_STEP = ("schedule.max_steps=1", "run.checkpoint_every=1", "run.sample_tokens=0")


def sft_one_step(base: Path, out: Path, chat: Path, *extra: str) -> Path:
    """One SFT step from `base` on `chat`; its checkpoint (or adapter) folder."""
    cfg = config(base, out, f'sft.train=["{chat}"]', *ONE_STEP, *extra)
    train(cfg, progress=False, task=sft_task())
    return list_checkpoints(out)[-1]


def test_inspect_shows_the_chain_pretrain_sft_dpo(tmp_path, base):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_records())
    sft = sft_one_step(base, tmp_path / "sft", chat)
    train(
        config(sft, tmp_path / "dpo", f'dpo.train=["{prefs}"]', *ONE_STEP),
        progress=False,
        task=dpo_task(),
    )
    dpo = list_checkpoints(tmp_path / "dpo")[-1]

    result = CliRunner().invoke(atlas_app, ["checkpoint", "inspect", str(dpo), "--json"])
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)["lineage"]
    assert [link["stage"] for link in chain] == ["pretrain", "sft", "dpo"]
    # Each link names the weights it produced: the base, the sft checkpoint, this one.
    assert [link["checkpoint_sha256"] for link in chain] == [
        sha256_file(p / "model.safetensors") for p in (base, sft, dpo)
    ]
    assert chain[1]["data_sha256"] != chain[2]["data_sha256"]
    assert all(len(link["data_sha256"]) == 64 for link in chain[1:])

    text = CliRunner().invoke(atlas_app, ["checkpoint", "inspect", str(dpo)]).output
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("1. pretrain") and str(base) in line for line in lines)
    assert any(line.startswith("2. sft") and str(sft) in line for line in lines)
    assert any(line.startswith("3. dpo") and line.endswith("(this)") for line in lines)


def test_checkpoints_without_lineage_still_load_inspect_and_serve_as_bases(
    tiny_checkpoint, tmp_path
):
    meta = read_metadata(tiny_checkpoint)
    assert "lineage" not in meta["provenance"]
    assert lineage(meta["provenance"]) == [{"stage": "unknown", "source": "tests/conftest.py"}]
    assert load_checkpoint(tiny_checkpoint)
    result = CliRunner().invoke(atlas_app, ["checkpoint", "inspect", str(tiny_checkpoint)])
    assert result.exit_code == 0 and "1. unknown" in result.output
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    cfg = config(
        tiny_checkpoint,
        tmp_path / "sft",
        f'sft.train=["{chat}"]',
        "schedule.max_steps=1",
        "run.checkpoint_every=1",
        "run.sample_tokens=0",
    )
    train(cfg, progress=False, task=sft_task())
    chain = read_metadata(list_checkpoints(tmp_path / "sft")[-1])["provenance"]["lineage"]
    assert [link["stage"] for link in chain] == ["unknown", "sft"]


def test_a_fine_tune_keeps_the_special_ids_its_base_recorded(tmp_path, byte_tokenizer):
    """An imported model's recorded BOS/EOS ids (Llama 3 Instruct ends on two ids, neither
    <|endoftext|>) carry over to a checkpoint fine-tuned from it, and to a LoRA adapter
    merged into it: the server still stops on them and the exports still write them."""
    from atlas_server.engine.engine import checkpoint_eos_ids, checkpoint_text_adds
    from atlas_server.hf_export import special_ids

    base = make_base(tmp_path, byte_tokenizer)
    specials = byte_tokenizer.special_tokens
    start, end = specials["<|im_start|>"], specials["<|im_end|>"]
    recorded = {
        "bos_token_id": start,
        "eos_token_id": [end, specials["<|endoftext|>"]],
        "tokenizer_eos_token_id": end,
        "tokenizer_adds": {"before": [start], "after": []},
    }
    meta = json.loads((base / "config.json").read_text())
    meta["provenance"].update(recorded)
    (base / "config.json").write_text(json.dumps(meta))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    sft = sft_one_step(base, tmp_path / "sft", chat)
    # ... and a LoRA adapter merged into the base (merge-lora builds its own provenance).
    lora = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8.0")
    adapter = sft_one_step(base, tmp_path / "lora", chat, *lora)
    merge = ["checkpoint", "merge-lora", str(base), str(adapter), str(tmp_path / "merged")]
    assert CliRunner().invoke(atlas_app, merge).exit_code == 0
    for made in (sft, tmp_path / "merged"):
        tuned = load_checkpoint(made)
        assert {k: tuned.provenance.get(k) for k in recorded} == recorded, made
        assert checkpoint_eos_ids(tuned) == [end, specials["<|endoftext|>"]]
        assert checkpoint_text_adds(tuned) == ([start], [])
        assert special_ids(tuned.tokenizer, tuned.provenance).first_eos == end
