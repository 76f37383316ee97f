"""`atlas-train sft`: end to end on a tiny model through the training loop, exact resume,
token-weighted gradient accumulation, bad records named by file:line, long conversations
skipped and counted, configs refused by the wrong command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from posttrain_helpers import chat_records, config, make_base, settings, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint, read_metadata, sha256_file
from trainer.cli import app
from trainer.loop import Dist, setup, train, train_step
from trainer.posttrain import sft_task
from trainer.state import list_checkpoints


@pytest.fixture(scope="module")
def files(tmp_path_factory, byte_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    return {
        "base": make_base(root, byte_tokenizer),
        "chat": write_jsonl(root / "chat.jsonl", chat_records()),
        "val": write_jsonl(root / "val.jsonl", chat_records()[:4]),
    }


def sft_settings(files, out: Path, *extra: str) -> list[str]:
    return settings(
        files["base"],
        out,
        f'sft.train=["{files["chat"]}"]',
        f'sft.val=["{files["val"]}"]',
        *extra,
    )


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_sft_command_trains_checkpoints_and_resumes_bit_exact(tmp_path, files):
    out = tmp_path / "full"
    args = ["sft"] + [a for s in sft_settings(files, out) for a in ("--set", s)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "sft train: 10 conversations" in result.output
    steps = list_checkpoints(out)
    assert [p.name for p in steps] == ["step_000003", "step_000006"]
    final = steps[-1]
    # A servable checkpoint of the sft stage, whose base is the init_from checkpoint.
    ckpt = load_checkpoint(final)
    prov = read_metadata(final)["provenance"]
    assert prov["stage"] == "sft"
    assert prov["base_checkpoint_sha256"] == sha256_file(files["base"] / "model.safetensors")
    assert [link["stage"] for link in prov["lineage"]] == ["pretrain", "sft"]
    base = load_checkpoint(files["base"]).model
    pairs = zip(base.parameters(), ckpt.model.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs), "sft did not change the weights"

    # Resume from step 3 of a copy: the same final weights, bit for bit.
    part = tmp_path / "part"
    shutil.copytree(out, part)
    shutil.rmtree(part / "checkpoints" / "step_000006")
    args = ["sft", "--resume"] + [a for s in sft_settings(files, part) for a in ("--set", s)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "resuming from step 3" in result.output
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_losses_are_deterministic_and_validation_is_reported(tmp_path, files):
    cfg = config(files["base"], tmp_path / "a", f'sft.train=["{files["chat"]}"]')
    first = train(cfg, progress=False, task=sft_task())
    cfg = config(files["base"], tmp_path / "b", f'sft.train=["{files["chat"]}"]')
    second = train(cfg, progress=False, task=sft_task())
    assert first["losses"] == second["losses"] and len(first["losses"]) == 6
    cfg = config(files["base"], tmp_path / "c", *sft_settings(files, tmp_path / "c")[-2:])
    summary = train(cfg, progress=False, task=sft_task())
    assert set(summary["val"]) == {"loss", "perplexity", "bits_per_byte"}
    assert summary["val"]["loss"] < first["losses"][0]  # it learned something


def test_micro_batches_are_weighed_by_trained_tokens(tmp_path, files, byte_tokenizer):
    """Two micro-batches of one row make the same step as one micro-batch of both rows:
    every assistant token counts alike (rows hold different numbers of them)."""
    chat = write_jsonl(
        tmp_path / "uneven.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "a?"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "Tell me more?"},
                    {"role": "assistant", "content": "A much longer answer with many tokens."},
                ]
            },
        ],
    )
    common = [f'sft.train=["{chat}"]', "data.seq_len=80", "run.sample_tokens=0"]
    one = step_gradients(config(files["base"], tmp_path / "one", *common, "data.micro_batch=2"))
    two = step_gradients(
        config(files["base"], tmp_path / "two", *common, "data.micro_batch=1", "data.grad_accum=2")
    )
    assert one[0] == pytest.approx(two[0], rel=1e-5)  # the logged loss: a token-weighted mean
    for name, grad in one[1].items():
        torch.testing.assert_close(grad, two[1][name], rtol=1e-4, atol=1e-7)


def step_gradients(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's logged loss and the gradients the optimizer steps with."""
    run = setup(cfg, Dist(), None, sft_task())
    grads: dict[str, torch.Tensor] = {}
    step = run.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters()})
        return step(*args, **kwargs)

    run.optimizer.step = capture
    loss_sum, _, _ = train_step(run)
    return float(loss_sum) / cfg.data.grad_accum, grads


def test_bad_record_fails_with_file_and_line(tmp_path, files):
    records = chat_records()
    lines = [json.dumps(r) for r in records[:2]]
    lines.append(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}))
    lines.append("{not json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = [
        a
        for s in settings(files["base"], tmp_path / "run", f'sft.train=["{bad}"]')
        for a in ("--set", s)
    ]
    result = run_cli("sft", *args)
    assert result.exit_code == 1
    assert f"{bad}:3: messages[0].role is 'robot'" in result.output
    assert f"{bad}:4: not valid JSON" in result.output
    assert "Traceback" not in result.output


def test_too_long_conversations_are_skipped_counted_and_recorded(tmp_path, files):
    records = chat_records()
    records.append(
        {
            "messages": [
                {"role": "user", "content": "Say a lot."},
                {"role": "assistant", "content": "word " * 40},
            ]
        }
    )
    chat = write_jsonl(tmp_path / "long.jsonl", records)
    args = [
        a
        for s in settings(files["base"], tmp_path / "run", f'sft.train=["{chat}"]')
        for a in ("--set", s)
    ]
    result = run_cli("sft", *args)
    assert result.exit_code == 0, result.output
    assert "skipped 1 longer than 97 tokens" in result.output
    assert f"{chat}:11" in result.output
    prov = read_metadata(list_checkpoints(tmp_path / "run")[-1])["provenance"]
    assert prov["data"]["skipped_too_long"] == 1 and prov["data"]["conversations"] == 11


def test_each_command_refuses_another_stage_config(tmp_path, files):
    sft_args = [a for s in sft_settings(files, tmp_path / "x") for a in ("--set", s)]
    result = run_cli("train", *sft_args)
    assert result.exit_code == 1
    assert "is a sft config" in result.output and "atlas-train sft" in result.output
    result = run_cli("dpo", *sft_args)
    assert result.exit_code == 1 and "atlas-train sft" in result.output
    result = run_cli("sft", "--set", f'sft.train=["{files["chat"]}"]')
    assert result.exit_code == 1 and "set model.init_from" in result.output
