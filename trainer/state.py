"""Training checkpoints: an atlas checkpoint plus the trainer state, saved atomically.

Layout of `RUN/checkpoints/step_000200/`: the atlas checkpoint (config.json,
model.safetensors, atlas_tokenizer.json: the server loads it unchanged) plus
`trainer_state.safetensors` (optimizer moments and the torch RNG states, as tensors) and
`trainer_state.json` (step, optimizer hyper-parameters, GradScaler, data-loader position,
Python and NumPy RNG states, config). A LoRA run's checkpoint holds its adapter
(adapter.safetensors + adapter.json, `trainer/lora.py`) in place of the full model: the
base weights are the run's `model.init_from`. Nothing is pickled: loading reads safetensors and
JSON only.

Atomicity: everything is written into `.tmp-step_000200/` and renamed into place at the
end, so a crash (SIGKILL included) leaves either a whole checkpoint or a temp folder that
`latest_checkpoint()` ignores and `clean_partial()` removes. A step saved twice keeps its
first save (renamed `.old-step_000200/`) until the second is in place, and the folder is
fsynced after the renames. `keep_last` prunes the oldest.
What it does not do: decide when to save (see `loop.py`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from atlas_server.checkpoint import WEIGHTS_FILE, CheckpointError, save_checkpoint

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # Keys are "opt|PARAM|SLOT": PARAM is an index (plain optimizers) or a parameter name
    # (FSDP's full optimizer state), so "|" separates rather than the "." inside names.
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"opt|{index}|{name}"] = (
                value if torch.is_tensor(value) else torch.tensor(value)
            )
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int | str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt|"):
            _, index, name = key.split("|", 2)
            state.setdefault(int(index) if index.isdigit() else index, {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


@dataclass
class TrainerState:
    """What exact resume needs besides the weights (the RNG states are taken at save time)."""

    step: int
    optimizer: dict  # optimizer.state_dict(), or FSDP's full optimizer state
    scaler: dict | None  # GradScaler state (fp16 only)
    loader: dict  # the data position
    config_toml: str
    world_size: int = 1  # processes: with micro_batch and grad_accum, the global batch


@dataclass
class ResumePoint:
    """A training checkpoint read back in one pass over its files."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]  # Transformer.state_dict() names; {} for a LoRA adapter
    optimizer: dict
    scaler: dict | None
    loader: dict
    rng_tensors: dict[str, torch.Tensor]
    rng_plain: dict[str, Any]
    config_toml: str | None = None  # the config of the run that saved it
    world_size: int | None = None  # its processes (None: saved before they were recorded)

    @property
    def adapter_only(self) -> bool:
        """A LoRA run's checkpoint: its adapter (read by the loop), no whole model."""
        return not self.weights and (self.path / "adapter.json").is_file()


def save_training_checkpoint(
    run_dir: Path,
    model,
    tokenizer,
    state: TrainerState,
    provenance: dict,
    keep_last: int,
    chat_template: str | None = None,
    adapter=None,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNN atomically (see the module docstring); prune old ones.

    With `adapter` (a lora.Adapter), the adapter is written instead of the full model."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:06d}"
    tmp = ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is not None:
        from .lora import save_adapter

        save_adapter(tmp, adapter)
    else:
        save_checkpoint(tmp, model, tokenizer, provenance, chat_template)
    opt_tensors, opt_plain = optimizer_to_flat(state.optimizer)
    rng_tensors, rng_plain = rng_state()
    save_file(
        {k: v.contiguous().cpu() for k, v in {**opt_tensors, **rng_tensors}.items()},
        str(tmp / "trainer_state.safetensors"),
    )
    _maybe_die_for_test(state.step)
    plain = {
        "step": state.step,
        "optimizer": opt_plain,
        "scaler": state.scaler,
        "loader": state.loader,
        "rng": rng_plain,
        "config_toml": state.config_toml,
        "world_size": state.world_size,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(plain))
    for f in tmp.iterdir():
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
    final = ckpt_root / name
    previous = ckpt_root / f".old-{name}"
    if final.exists():  # this step saved again: its first save stays until the new one is in
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_folder(ckpt_root)  # the renames themselves survive a power loss
    shutil.rmtree(previous, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_die_for_test(step: int) -> None:
    # Test hook: SIGKILL this process in the middle of a save, to prove saves are atomic.
    target = os.environ.get("ATLAS_TEST_SIGKILL_DURING_SAVE_AT_STEP")
    if target is not None and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: Path) -> None:
    """Remove what an interrupted save left: its temporary folder, and the earlier save of
    the same step it was replacing, which is put back if the new one never got in."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".old-*"):
            target = root / p.name.removeprefix(".old-")
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # killed between the two renames: the earlier save is whole
                os.replace(p, target)


def load_training_checkpoint(path: Path) -> ResumePoint:
    """Read a training checkpoint for resuming: each of its files once, nothing unpickled.

    The weights are checked against the run's model when they are loaded into it (names
    and shapes, `load_state_dict(strict=True)`); the trainer state here.
    """
    try:
        # A LoRA checkpoint has no full model: the adapter is read by the loop (lora.py).
        adapter_only = not (path / WEIGHTS_FILE).exists() and (path / "adapter.json").is_file()
        weights = {} if adapter_only else load_file(str(path / WEIGHTS_FILE))
        tensors = load_file(str(path / "trainer_state.safetensors"))
        plain = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:  # a missing file, bad JSON, safetensors' own error types
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    return ResumePoint(
        path=path,
        step=int(plain["step"]),
        weights=weights,
        optimizer=optimizer_from_flat(tensors, plain["optimizer"]),
        scaler=plain.get("scaler"),
        loader=plain["loader"],
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng.")},
        rng_plain=plain["rng"],
        config_toml=plain.get("config_toml"),
        world_size=plain.get("world_size"),
    )
