"""LoRA from a training config: SFT and DPO train adapters only, checkpoints hold the small
adapter (and resume bit for bit), `atlas checkpoint merge-lora` writes a checkpoint whose
logits equal base-plus-adapter logits, refuses bad input in one line, and the merged
checkpoint is served through /v1/chat/completions like any other."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
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
from safetensors.torch import load_file
from servers import serving
from typer.testing import CliRunner

from atlas_server.api import ServerState, create_app
from atlas_server.chat_template import ChatTemplate
from atlas_server.checkpoint import CheckpointError, load_checkpoint, read_metadata
from atlas_server.cli import app as atlas_app
from atlas_server.config import ServerConfig
from trainer.loop import train
from trainer.lora import apply_lora, load_adapter, load_adapter_weights
from trainer.posttrain import dpo_task, sft_task
from trainer.state import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8.0")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, byte_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root, byte_tokenizer)
    chat = write_jsonl(root / "chat.jsonl", chat_records())
    out = root / "run"
    train(config(base, out, f'sft.train=["{chat}"]', *LORA), progress=False, task=sft_task())
    return {"base": base, "chat": chat, "run": out, "adapter": list_checkpoints(out)[-1]}


def base_plus_adapter(base: Path, adapter_dir: Path):
    adapter = load_adapter(adapter_dir)
    model = load_checkpoint(base).model
    apply_lora(model, adapter.config)
    load_adapter_weights(model, adapter)
    return model.eval()


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(lora_run, tmp_path):
    adapter_dir = lora_run["adapter"]
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter.safetensors", "adapter.json"} <= names
    assert "model.safetensors" not in names
    full = (lora_run["base"] / "model.safetensors").stat().st_size
    assert (adapter_dir / "adapter.safetensors").stat().st_size < full / 4
    adapter = load_adapter(adapter_dir)
    assert adapter.config.rank == 4 and adapter.provenance["stage"] == "sft"
    assert [link["stage"] for link in adapter.provenance["lineage"]] == ["pretrain", "sft"]
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B"))

    part = tmp_path / "part"
    shutil.copytree(lora_run["run"], part)
    shutil.rmtree(part / "checkpoints" / adapter_dir.name)
    cfg = config(lora_run["base"], part, f'sft.train=["{lora_run["chat"]}"]', *LORA)
    resumed = train(cfg, resume=True, progress=False, task=sft_task())
    assert resumed["start_step"] == 3
    a = load_file(str(adapter_dir / "adapter.safetensors"))
    b = load_file(str(part / "checkpoints" / adapter_dir.name / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_lora_cli_logits_equal_base_plus_adapter_and_record_lineage(lora_run, tmp_path):
    out = tmp_path / "merged"
    args = ["checkpoint", "merge-lora", str(lora_run["base"]), str(lora_run["adapter"]), str(out)]
    result = CliRunner().invoke(atlas_app, args)
    assert result.exit_code == 0, result.output
    merged = load_checkpoint(out).model
    reference = base_plus_adapter(lora_run["base"], lora_run["adapter"])
    base = load_checkpoint(lora_run["base"]).model
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = reference(ids), merged(ids), base(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter did change the model
    prov = read_metadata(out)["provenance"]
    assert prov["stage"] == "sft" and prov["lora"] == {"rank": 4, "alpha": 8.0}
    shown = CliRunner().invoke(atlas_app, ["checkpoint", "inspect", str(out)])
    assert shown.exit_code == 0
    assert "1. pretrain" in shown.output and "2. sft" in shown.output


def test_merge_lora_bad_input_is_one_line_and_non_zero(lora_run, tmp_path, byte_tokenizer):
    other = make_base(tmp_path / "other", byte_tokenizer, seed=1)
    runner = CliRunner()
    cases = [
        ([str(other), str(lora_run["adapter"]), str(tmp_path / "o1")], "other base weights"),
        ([str(lora_run["base"]), str(tmp_path / "nope"), str(tmp_path / "o2")], "adapter.json"),
        ([str(tmp_path / "nope"), str(lora_run["adapter"]), str(tmp_path / "o3")], "nope"),
        ([str(lora_run["base"]), str(lora_run["adapter"]), str(other)], "--overwrite"),
    ]
    for args, expected in cases:
        result = runner.invoke(atlas_app, ["checkpoint", "merge-lora", *args])
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert load_checkpoint(other)  # the existing OUT was left as it was


def test_serving_or_exporting_an_adapter_says_to_merge_it_first(lora_run, tmp_path):
    """QA: `atlas serve` and `export-hf` on an adapter folder said it was not a checkpoint
    (no config.json), though `checkpoint inspect` knew it for an adapter."""
    adapter = str(lora_run["adapter"])
    runner = CliRunner()
    for args in (
        ["serve", "--checkpoint", adapter, "--port", "1"],
        ["checkpoint", "export-hf", adapter, str(tmp_path / "hf")],
    ):
        result = runner.invoke(atlas_app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "holds a LoRA adapter" in lines[0], (args, result.output)
        assert "atlas checkpoint merge-lora BASE ADAPTER OUT" in lines[0]


def test_merged_checkpoint_serves_base_plus_adapter_replies(lora_run, tmp_path, byte_tokenizer):
    out = tmp_path / "merged"
    args = ["checkpoint", "merge-lora", str(lora_run["base"]), str(lora_run["adapter"]), str(out)]
    assert CliRunner().invoke(atlas_app, args).exit_code == 0
    messages = [{"role": "user", "content": "What does f3 do?"}]
    template = ChatTemplate.chatml(byte_tokenizer)
    expected = base_plus_adapter(lora_run["base"], lora_run["adapter"]).generate(
        template.prompt_ids(messages), 8
    )
    state = ServerState(config=ServerConfig(), model_name="merged", checkpoint_path=str(out))
    with serving(create_app(state)) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "merged", "messages": messages, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
    assert reply.status_code == 200, reply.text
    stops = [i for i, t in enumerate(expected) if t in template.stop_token_ids]
    text = byte_tokenizer.decode(expected[: stops[0]] if stops else expected)
    assert reply.json()["choices"][0]["message"]["content"] == text


def test_lora_dpo_reference_is_the_base_without_adapters(tmp_path, byte_tokenizer):
    """With LoRA, the frozen reference is the policy with its adapters off: it trains
    exactly as with reference log-probs scored beforehand by the base checkpoint."""
    base = make_base(tmp_path, byte_tokenizer)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_records())
    common = [f'dpo.train=["{prefs}"]', "schedule.max_steps=4", "run.sample_tokens=0", *LORA]
    frozen = train(
        config(base, tmp_path / "frozen", *common, 'dpo.reference="frozen"'),
        progress=False,
        task=dpo_task(),
    )
    cached = train(config(base, tmp_path / "cached", *common), progress=False, task=dpo_task())
    assert frozen["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert frozen["losses"] == pytest.approx(cached["losses"], rel=1e-5)
    assert (list_checkpoints(tmp_path / "frozen")[-1] / "adapter.json").is_file()


def test_resuming_a_lora_run_without_lora_or_on_another_base_is_refused(
    lora_run, tmp_path, byte_tokenizer
):
    """A LoRA run's checkpoints hold its adapter only: resumed as a full run, the error says
    so (it listed every missing weight); resumed over another base it is refused, as
    merge-lora refuses it (it trained on silently)."""
    part = tmp_path / "part"
    shutil.copytree(lora_run["run"], part)
    chat = f'sft.train=["{lora_run["chat"]}"]'
    with pytest.raises(CheckpointError, match="holds a LoRA adapter, not a whole model"):
        train(config(lora_run["base"], part, chat), resume=True, progress=False, task=sft_task())
    other = make_base(tmp_path / "other", byte_tokenizer, seed=1)
    with pytest.raises(CheckpointError, match="trained on other base weights"):
        train(config(other, part, chat, *LORA), resume=True, progress=False, task=sft_task())


def test_fsdp_lora_saves_the_adapter_ddp_trains(lora_run, tmp_path):
    """LoRA under FSDP (two CPU processes) checkpoints the adapter DDP trains from the same
    rows; its save used to fail, loading the gathered LoRA weights into a plain model."""
    chat = f'sft.train=["{lora_run["chat"]}"]'
    flags = [chat, *LORA, "lora.dropout=0.0", "schedule.max_steps=3", "run.sample_tokens=0",
             "data.micro_batch=1"]  # fmt: skip
    adapters = {}
    for port, strategy in enumerate(("ddp", "fsdp")):
        out = tmp_path / strategy
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(29700 + port + 2 * (os.getpid() % 500)), "-m",
               "trainer.cli", "sft"]  # fmt: skip
        for s in settings(lora_run["base"], out, *flags, f'run.distributed="{strategy}"'):
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        adapters[strategy] = load_adapter(out / "checkpoints" / "step_000003").tensors
    assert set(adapters["ddp"]) == set(adapters["fsdp"])
    assert any(t.abs().sum() > 0 for k, t in adapters["fsdp"].items() if k.endswith("lora_B"))
    for name, tensor in adapters["ddp"].items():
        torch.testing.assert_close(adapters["fsdp"][name], tensor, atol=1e-5, rtol=1e-4)
