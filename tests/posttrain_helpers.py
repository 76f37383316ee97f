"""Shared pieces of the post-training command tests: a tiny base checkpoint, chat and
preference files, and a config builder (gpt2-tiny over the byte-level tokenizer, a few
steps: seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atlas_server.checkpoint import save_checkpoint
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import Tokenizer
from trainer.config import TrainConfig, load_train_config

WORDS = ["sum", "max", "min", "len", "abs", "sort", "hash", "repr", "iter", "next"]
QA = [(f"What does f{i} do?", f"Return the {w} of x.") for i, w in enumerate(WORDS)]


def make_base(root: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A gpt2-tiny checkpoint whose provenance says it was pretrained (no lineage: the
    shape of checkpoints saved before lineage was recorded)."""
    torch.manual_seed(seed)
    model = Transformer(load_preset("gpt2-tiny", vocab_size=tokenizer.vocab_size))
    return save_checkpoint(root / "base", model, tokenizer, {"source": "atlas-train", "step": 7})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]


def preference_records() -> list[dict]:
    return [
        {"prompt": q, "chosen": a, "rejected": QA[(i + 1) % len(QA)][1]}
        for i, (q, a) in enumerate(QA)
    ]


def settings(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        f'model.init_from="{base}"',
        f'run.out_dir="{out}"',
        "data.seq_len=96",
        "data.micro_batch=2",
        "schedule.max_steps=6",
        "schedule.warmup_steps=1",
        "optim.lr=3e-3",
        "run.eval_every=3",
        "run.eval_batches=4",
        "run.checkpoint_every=3",
        "run.keep_last=2",
        "run.log_every=1",
        "run.sample_tokens=4",
        'run.sample_prompt="What does f1 do?"',
        "run.tensorboard=false",
        "run.threads=1",
        *extra,
    ]


def config(base: Path, out: Path, *extra: str) -> TrainConfig:
    return load_train_config(None, settings(base, out, *extra))
