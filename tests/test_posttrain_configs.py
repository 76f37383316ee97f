"""The shipped post-training configs load, validate and name the stage of their command."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_train_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "train").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_train_config_is_the_stage_its_name_says(path):
    cfg = load_train_config(path)
    expected = path.stem.split("-")[0] if path.stem.startswith(("sft-", "dpo-")) else "pretrain"
    assert cfg.stage == expected
    if expected != "pretrain":
        assert cfg.model.init_from  # post-training starts from a checkpoint
    assert cfg.lora.enabled == ("lora" in path.stem)
