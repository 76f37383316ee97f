"""`atlas-train dpo`: end to end on a tiny model through the training loop. The first
step's loss is log 2 (policy == reference), the cached reference log-probs and a frozen
reference copy train identically, the logged and validation metrics are DPO's, training
raises the reward margin on its pairs, and the checkpoint records the dpo stage."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from posttrain_helpers import make_base, preference_records, settings, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint, read_metadata, sha256_file
from trainer.artifacts import weights_sha256
from trainer.chat_data import IGNORE
from trainer.cli import app
from trainer.config import load_train_config
from trainer.loop import Dist, train
from trainer.posttrain import DPOLoss, dpo_task, load_pairs
from trainer.state import list_checkpoints


@pytest.fixture(scope="module")
def files(tmp_path_factory, byte_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    return {
        "base": make_base(root, byte_tokenizer),
        "prefs": write_jsonl(root / "prefs.jsonl", preference_records()),
    }


def dpo_config(files, out: Path, *extra: str):
    return load_train_config(
        None,
        settings(
            files["base"],
            out,
            f'dpo.train=["{files["prefs"]}"]',
            f'dpo.val=["{files["prefs"]}"]',
            "schedule.max_steps=8",
            "run.eval_every=8",
            "run.checkpoint_every=8",
            "run.sample_tokens=0",
            *extra,
        ),
    )


def test_dpo_trains_from_log2_with_cached_or_frozen_reference_alike(tmp_path, files):
    cached = train(dpo_config(files, tmp_path / "cached"), progress=False, task=dpo_task())
    (cache,) = files["prefs"].parent.glob("prefs.jsonl.ref-logps-*.safetensors")
    # Scored once, stored beside the data, named by a hash of what its numbers depend on.
    assert re.fullmatch(r"prefs\.jsonl\.ref-logps-[0-9a-f]{12}\.safetensors", cache.name)
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("chosen").shape == (10,)
    assert meta["format"] == "atlas-dpo-reference"
    assert meta["model_sha256"] == weights_hash(files["base"])
    frozen = train(
        dpo_config(files, tmp_path / "frozen", 'dpo.reference="frozen"'),
        progress=False,
        task=dpo_task(),
    )
    # At step 0 the policy is the reference: every log-ratio is 0, the loss -log sigmoid(0).
    assert cached["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert cached["losses"] == pytest.approx(frozen["losses"], rel=1e-5)
    val = cached["val"]
    assert set(val) == {
        "loss",
        "preference_loss",
        "reward_margin",
        "preference_accuracy",
        "reward_chosen",
        "reward_rejected",
    }
    # Eight steps on ten pairs: the policy now prefers the chosen answers it was shown.
    assert val["reward_margin"] > 0 and val["loss"] < math.log(2)
    assert val["preference_accuracy"] > 0.5
    assert val["loss"] == val["preference_loss"]  # no sft_weight: the objective is DPO's
    assert val == pytest.approx(frozen["val"], rel=1e-4, abs=1e-6)


def test_dpo_command_logs_reward_metrics_and_records_lineage(tmp_path, files):
    out = tmp_path / "run"
    args = [
        a
        for s in settings(
            files["base"],
            out,
            f'dpo.train=["{files["prefs"]}"]',
            "dpo.beta=0.5",
            "dpo.label_smoothing=0.1",
            "run.tensorboard=true",
            "run.sample_tokens=0",
        )
        for a in ("--set", s)
    ]
    result = CliRunner().invoke(app, ["dpo", *args])
    assert result.exit_code == 0, result.output
    assert "dpo train: 10 pairs; skipped 0" in result.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/reward_margin", "train/preference_accuracy"} <= tags
    assert "train/preference_loss" in tags and "train/chosen_nll" not in tags
    prov = read_metadata(list_checkpoints(out)[-1])["provenance"]
    assert prov["stage"] == "dpo"
    assert prov["base_checkpoint_sha256"] == sha256_file(files["base"] / "model.safetensors")
    assert prov["data"]["pairs"] == 10 and len(prov["data_sha256"]) == 64


def weights_hash(checkpoint: Path) -> str:
    return weights_sha256(load_checkpoint(checkpoint).model.state_dict())


def test_each_reference_and_each_data_has_its_own_cache(tmp_path, files, byte_tokenizer):
    """Another reference model gets its own log-prob file, and so do other pairs in the
    same file: the name is a hash of both, so a stale file is never picked up."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_records())
    other = make_base(tmp_path / "other", byte_tokenizer, seed=1)
    one = ("schedule.max_steps=1", "run.sample_tokens=0")
    for base, out in ((files["base"], "a"), (other, "b")):
        cfg = dpo_config({"base": base, "prefs": prefs}, tmp_path / out, *one)
        train(cfg, progress=False, task=dpo_task())
    caches = sorted(tmp_path.glob("prefs.jsonl.ref-logps-*"))
    assert sorted(cache_meta(p)["model_sha256"] for p in caches) == sorted(
        weights_hash(b) for b in (files["base"], other)
    )
    write_jsonl(prefs, preference_records()[::-1])  # the same file name, other pairs
    train(dpo_config(files | {"prefs": prefs}, tmp_path / "c", *one), progress=False,
          task=dpo_task())  # fmt: skip
    (new,) = set(tmp_path.glob("prefs.jsonl.ref-logps-*")) - set(caches)
    assert cache_meta(new)["model_sha256"] == weights_hash(files["base"])
    assert len({cache_meta(p)["data_sha256"] for p in (caches[0], new)}) == 2


def cache_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_sft_weight_adds_the_chosen_responses_mean_token_loss(tmp_path, files):
    """dpo.sft_weight = w: the loss is the DPO loss plus w times the cross-entropy of the
    chosen responses' tokens (TRL's rpo_alpha), from the same forward pass."""
    cfg = dpo_config(files, tmp_path / "w", "dpo.sft_weight=0.5")
    plain_cfg = dpo_config(files, tmp_path / "p")
    data = load_pairs(cfg, cfg.dpo.train, Dist(), "train")
    inputs, labels = data._batch([0, 1, 2])
    model = load_checkpoint(files["base"]).model.train()
    refs = torch.full((3,), -20.0), torch.full((3,), -25.0)
    with torch.no_grad():
        weighted = DPOLoss(model, cfg)(inputs, labels, *refs)
        plain = DPOLoss(model, plain_cfg)(inputs, labels, *refs)
        logits = model(inputs[:3])  # [3, T, V]: the chosen rows
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:3], ignore_index=IGNORE)
    assert float(plain) != pytest.approx(float(weighted))
    assert float(weighted) == pytest.approx(float(plain) + 0.5 * float(nll), rel=1e-5)


def test_dpo_resume_is_bit_exact(tmp_path, files):
    """The pair loader's position and the RNG states come back: a run resumed from step 4
    ends with the weights of one that never stopped."""
    extra = ("schedule.max_steps=8", "run.checkpoint_every=4", "run.eval_every=100")
    full = train(dpo_config(files, tmp_path / "full", *extra), progress=False, task=dpo_task())
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step_000008")
    resumed = train(dpo_config(files, part, *extra), resume=True, progress=False, task=dpo_task())
    assert resumed["start_step"] == 4 and resumed["losses"] == full["losses"][4:]
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000008" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_with_sft_weight_train_and_val_loss_are_one_objective_logged_in_parts(tmp_path, files):
    """QA: with sft_weight 1, train/loss was DPO + NLL (about 6.3) while val/loss was DPO
    alone (about 0.70): the curves read as a 9x train/val gap. Both are now the objective
    trained on, and its two parts are logged apart on both sides."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = dpo_config(files, out, "dpo.sft_weight=1.0", "run.log_every=1", "run.tensorboard=true")
    summary = train(cfg, progress=False, task=dpo_task())
    val = summary["val"]
    assert val["loss"] == pytest.approx(val["preference_loss"] + val["chosen_nll"], rel=1e-9)
    assert val["chosen_nll"] > 1.0 > val["preference_loss"]  # parts of very different sizes
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalar = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in
              ("train/loss", "train/preference_loss", "train/chosen_nll")}  # fmt: skip
    for step, loss in scalar["train/loss"].items():
        parts = scalar["train/preference_loss"][step] + scalar["train/chosen_nll"][step]
        assert loss == pytest.approx(parts, rel=1e-5), step
