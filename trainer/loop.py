"""The training loop: config -> checkpoints, in pieces that other training tasks reuse.

The pieces, in the order a run uses them:
- `find_resume_point`: the newest complete checkpoint of the run, read once (`--resume`);
  a run folder of another stage (an SFT run resumed by `atlas-train dpo`) is refused first.
- `setup` -> `Run`: without a resume point, the refusal of a run folder that already
  holds checkpoints (two runs would mix there); data.seq_len against init_from's
  max_seq_len; threads, seeds, data (the tokenizer copy checked against the manifest; the
  global batch against the data's size), the model (from a preset, `init_from`, or the
  resume point's weights; LoRA adapters when `[lora] enabled`), the loss module
  (`Task.make_loss`; pretraining's is `NextTokenLoss`), DDP or FSDP2 when launched by
  torchrun (gloo on CPU, NCCL on GPU), `torch.compile` of the whole loss module (the
  default on CUDA: forward, head and loss in one graph, backward too), fused AdamW
  (weight decay on matrices and embeddings, none on norms and biases, as GPT-2/nanoGPT
  do), the GradScaler; then the resume point's optimizer, scaler, data position and RNG
  states. Only then, with everything checked, is RUN/config.toml written (atomically): a
  refused call leaves the folder as it was.
- `train_step`: one optimizer step: learning rate (warmup + cosine, WSD or constant; a
  pure function of the step), gradient accumulation, bf16/fp16 autocast, clipping. It
  returns the loss as a device tensor and never reads it back: the loop reads the losses
  of `log_every` steps at once, so a GPU never waits for the host in between.
- `evaluate`: validation loss, perplexity and bits per byte (skipped, with a warning,
  when the data has no validation split: training loss is never reported as validation).
- `save`: an atomic checkpoint with the full trainer state (`state.py`).
- `fit`: the loop over steps with logging (TensorBoard, MLflow, a progress bar), periodic
  evaluation and checkpoints, `--profile` traces, and Ctrl-C handling (`interrupt.py`).
- `train(cfg)`: all of the above, for pretraining or the task given (SFT and DPO:
  `posttrain.py`).

Every checkpoint records its lineage (stage, base checkpoint hash, data hash: see
atlas_server/checkpoint.py); `init_from` starts from a checkpoint's weights with a fresh
optimizer at step 0 (continued pretraining, SFT, DPO).

Exact resume: the model, optimizer, scaler, data position and every RNG state are
restored, and the schedule is a function of the step, so a resumed run produces the same
losses bit for bit on CPU as one that was never interrupted (tests/test_train.py).
What it does not do: prepare data (see `data.py`) or define losses (see `loss.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from atlas_server.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from atlas_server.checkpoint import (
    CheckpointError,
    lineage_provenance,
    load_checkpoint,
    read_metadata,
    tokenizer_path,
)
from atlas_server.io import atomic_write_text
from atlas_server.model import ModelConfig, Transformer, load_preset
from atlas_server.tokenizer import Tokenizer
from atlas_server.tomlconfig import parse_toml

from .config import STAGE_COMMAND, TrainConfig, TrainConfigError, TrainingDiverged
from .data import DataError, data_tokenizer
from .flops import flops_per_token, measured_matmul_peak
from .interrupt import before_training, graceful_interrupt
from .loader import TokenLoader
from .logger import Logger, check_logging_packages
from .lora import LoRAConfig, LoRAReport, adapter_of, apply_lora, load_adapter, load_adapter_weights
from .loss import IGNORE_INDEX, NextTokenLoss
from .state import (
    STEP_DIR,
    ResumePoint,
    TrainerState,
    clean_partial,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    set_rng_state,
)


def say(message: str) -> None:
    """A line for the person at the terminal (stderr, beside the progress bar)."""
    tqdm.write(message, file=sys.stderr)


# --- distributed, seeds, schedule, optimizer ---------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    if "RANK" not in os.environ:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
    return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based); a pure function of the step."""
    s, o = cfg.schedule, cfg.optim
    min_lr = o.lr * o.min_lr_ratio
    if step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return o.lr
    if s.kind == "wsd":  # warmup-stable-decay: flat, then a linear decay at the end
        decay_start = int(s.max_steps * (1 - s.decay_fraction))
        if step < decay_start:
            return o.lr
        # The last step trains at min_lr, as the config says ("final lr"): step max_steps,
        # where the fraction would otherwise reach 1, never runs.
        frac = (step - decay_start) / max(1, s.max_steps - 1 - decay_start)
        return o.lr - (o.lr - min_lr) * min(1.0, frac)
    frac = (step - s.warmup_steps) / max(1, s.max_steps - 1 - s.warmup_steps)
    return min_lr + 0.5 * (o.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for block in model.blocks:
        block.forward = partial(activation_checkpoint, block.forward, use_reentrant=False)


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bf16 in hardware: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than fp32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return device == "cpu" and any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """`run.precision`, with "auto" made concrete for this device (bf16 or fp32)."""
    if cfg.run.precision != "auto":
        return cfg.run.precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_context(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def token_bytes_table(tokenizer: Tokenizer, vocab: int) -> torch.Tensor:
    return torch.tensor([len(tokenizer.token_bytes(i)) for i in range(vocab)], dtype=torch.float64)


def compile_enabled(cfg: TrainConfig) -> bool:
    """`run.compile`, or by default on CUDA only (CPU compile needs a C++ toolchain and
    minutes of compiling that a short CPU run never earns back)."""
    if cfg.run.compile is not None:
        return cfg.run.compile
    return cfg.run.device.startswith("cuda")


# --- the task: what a run trains for -----------------------------------------------------------
class Batches(Protocol):
    """A resumable source of batches (TokenLoader is one)."""

    def next_batch(self, per_rank: int) -> tuple[Tensor, ...]: ...
    def check_batch(self, per_rank: int) -> None: ...  # DataError if a batch cannot be cut
    # Validation: this rank's batches, its part of batch_size x n_batches x processes items
    # (`loader.eval_part`); `evaluate` sums over the ranks.
    def eval_batches(self, batch_size: int, n_batches: int): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def pretraining_data(cfg: TrainConfig, d: Dist) -> tuple[Batches, Batches | None]:
    """Token shards: the training split sharded over ranks, and the validation split (None
    when the data has none, or none long enough for one window)."""
    path, seq, seed = Path(cfg.data.path), cfg.data.seq_len, cfg.run.seed
    train_data = TokenLoader(path, "train", seq, seed, d.rank, d.world)
    manifest = train_data.manifest
    if not manifest.get("val"):
        _warn_no_validation(
            d,
            f"{path} has no validation split (prepared with val_fraction="
            f"{manifest.get('val_fraction')}, which put none of its {manifest.get('documents')} "
            "documents there)",
        )
        return train_data, None
    try:
        return train_data, TokenLoader(path, "val", seq, seed, d.rank, d.world)
    except DataError as e:
        _warn_no_validation(d, str(e))
        return train_data, None


def _warn_no_validation(d: Dist, why: str) -> None:
    if d.main:
        say(
            f"warning: {why}; validation is skipped and no val loss is reported. "
            "Re-run `atlas-train prepare-data` with a larger --val-fraction to get one."
        )


def next_token_loss(model: Transformer, cfg: TrainConfig) -> nn.Module:
    chunk = cfg.run.cross_entropy_chunk or None
    return NextTokenLoss(model, chunked=cfg.run.cross_entropy == "chunked", chunk_rows=chunk)


def pretraining_data_identity(cfg: TrainConfig, data: Batches) -> tuple[Any, str]:
    return cfg.data.path, _manifest_hash(cfg.data.path)


@dataclass(frozen=True)
class Task:
    """What a run trains for: the loss module over the model, and the data.

    `make_loss(model, cfg)` returns an nn.Module holding the model as `.model` (FSDP shards
    its blocks) whose `forward(*batch)` is the mean loss (a module with `pop_metrics()`
    also has training metrics logged: DPO's reward margin and accuracy); `make_data(cfg,
    dist)` returns the training batches (sharded over ranks) and the validation batches or
    None. `evaluate(loss_module, val_data, cfg, device, byte_table)` gives the validation
    metrics (the default expects batches whose second tensor is the targets,
    IGNORE_INDEX where they do not count). `batch_weight(batch)`, when given, weighs the
    micro-batches of a step (SFT: by trained tokens, so each counts alike); otherwise
    each weighs 1/grad_accum. `data_identity(cfg, train_data)` names the data and its hash
    for the checkpoint's lineage.
    """

    stage: str = "pretrain"
    make_loss: Callable[[Transformer, TrainConfig], nn.Module] = next_token_loss
    make_data: Callable[[TrainConfig, Dist], tuple[Batches, Batches | None]] = pretraining_data
    evaluate: Callable[..., dict[str, float]] | None = None  # None: `evaluate` below
    batch_weight: Callable[[tuple[Tensor, ...]], float] | None = None
    data_identity: Callable[[TrainConfig, Batches], tuple[Any, str]] = pretraining_data_identity


PRETRAINING = Task()


# --- setup and resume --------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds; `setup` builds it, `train_step` advances it."""

    cfg: TrainConfig
    dist: Dist
    device: str
    run_dir: Path
    tokenizer: Tokenizer
    model: Transformer  # the plain model: what checkpoints hold
    loss_module: nn.Module  # the task's loss over `model`, unwrapped
    step_module: Callable[..., Tensor]  # the same, wrapped (DDP/FSDP) and compiled as configured
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_data: Batches
    val_data: Batches | None
    precision: str = "fp32"  # run.precision with "auto" resolved for the device
    task: Task = field(default_factory=Task)
    lineage: dict[str, Any] = field(default_factory=dict)  # provenance fields of every save
    chat: ChatTemplate | None = None  # post-training: the base checkpoint's chat template
    lora: LoRAReport | None = None  # set when the run trains LoRA adapters
    step: int = 0
    start_step: int = 0
    last_checkpoint: tuple[Path, int] | None = None  # (folder, step)
    tokens_seen: int = 0  # token positions fed to the model by this process (for tokens/s)
    losses: list[float] = field(default_factory=list)

    @property
    def wrapped(self) -> nn.Module:
        return getattr(self.step_module, "_orig_mod", self.step_module)


def find_resume_point(run_dir: Path, d: Dist, stage: str | None = None) -> ResumePoint | None:
    """The newest complete checkpoint of `run_dir`, read once; partial saves are removed.
    With `stage`, a run folder of another stage is refused before anything is removed."""
    last = latest_checkpoint(run_dir)
    if stage is not None and last is not None:
        refuse_another_stage(run_dir, last, stage)
    if d.main:
        clean_partial(run_dir)
    last = latest_checkpoint(run_dir)
    if last is None:
        if d.main:
            # (Said without the flag's name: the quickstart resumes on its own, unasked.)
            say(f"no checkpoint to resume from in {run_dir / 'checkpoints'}; starting at step 0")
        return None
    point = load_training_checkpoint(last)
    if d.main:
        say(f"resuming from step {point.step} ({last})")
    return point


_STAGE_RUN = {"pretrain": "a pretraining run", "sft": "an SFT run", "dpo": "a DPO run"}


def checkpoint_stage(path: Path) -> str | None:
    """The stage that saved a run's checkpoint: its provenance's `stage` (config.json, or a
    LoRA checkpoint's adapter.json), else what its saved config trains; None if unknown."""
    for name in ("config.json", "adapter.json"):
        try:
            stage = (json.loads((path / name).read_text()).get("provenance") or {}).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
        if stage in _STAGE_RUN:
            return stage
    try:  # a checkpoint saved before lineage was recorded
        saved = json.loads((path / "trainer_state.json").read_text()).get("config_toml")
        table = parse_toml(saved)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    for stage in ("sft", "dpo"):
        if (table.get(stage) or {}).get("train"):
            return stage
    return "pretrain"


def refuse_another_stage(run_dir: Path, checkpoint: Path, stage: str) -> None:
    """Resuming another stage's run would train it as this stage, and `keep_last` would
    then delete its checkpoints: refused before anything is written or removed."""
    found = checkpoint_stage(checkpoint)
    if found is not None and found != stage:
        raise TrainConfigError(
            f"{run_dir} holds {_STAGE_RUN[found]} ({checkpoint.name}); resume it with "
            f"{STAGE_COMMAND[found]}, or choose another run.out_dir for this {stage} run"
        )


# Settings that change how often the run reports or saves, or how fast it runs, but not
# its numbers: resuming with other values is still the run it was.
_NOT_IN_THE_NUMBERS = {
    "run.out_dir", "run.eval_every", "run.eval_batches", "run.checkpoint_every",
    "run.keep_last", "run.log_every", "run.sample_tokens", "run.sample_prompt",
    "run.tensorboard", "run.mlflow", "run.mlflow_uri",
}  # fmt: skip
# Settings that change only the order of float sums (threads split reductions, compile
# fuses kernels, DDP and FSDP reduce gradients differently): the same computation, but the
# resumed run is no longer bit for bit the uninterrupted one.
_ROUNDING_ONLY = {"run.threads", "run.compile", "run.distributed"}
# The global batch, micro_batch x grad_accum x processes, is compared as a whole.
_BATCH_PARTS = {"data.micro_batch", "data.grad_accum"}


def resume_differences(
    saved_toml: str | None, saved_world: int | None, cfg: TrainConfig, world: int
) -> tuple[list[str], list[str]]:
    """(changes to what the resumed run computes, changes to its float rounding only), each
    `key (old -> new)`, between the checkpoint's config and process count and these."""
    if not saved_toml:
        return [], []  # a checkpoint from before the config was saved with it

    def flat(table: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict) and key != "overrides":
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old, new = flat(parse_toml(saved_toml)), flat(parse_toml(cfg.to_toml()))
    differ = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    computes = [k for k in differ if k not in _NOT_IN_THE_NUMBERS | _ROUNDING_ONLY | _BATCH_PARTS]
    rounding = [k for k in differ if k in _ROUNDING_ONLY]

    def shown(key: str, values: dict) -> str:  # to_toml() writes None as "__none__"
        value = values.get(key)
        return "unset" if value in (None, "__none__") else repr(value)

    changes = [f"{k} ({shown(k, old)} -> {shown(k, new)})" for k in computes]
    rounding_changes = [f"{k} ({shown(k, old)} -> {shown(k, new)})" for k in rounding]
    before_world = saved_world or world  # unknown before it was saved: assume the same
    batch_old = old["data.micro_batch"] * old["data.grad_accum"] * before_world
    batch_new = new["data.micro_batch"] * new["data.grad_accum"] * world
    split_old = (old["data.micro_batch"], old["data.grad_accum"], before_world)
    split_new = (new["data.micro_batch"], new["data.grad_accum"], world)
    batch = (
        f"the global batch ({batch_old} -> {batch_new} windows: data.micro_batch x "
        f"data.grad_accum x processes, {' x '.join(map(str, split_old))} -> "
        f"{' x '.join(map(str, split_new))})"
    )
    if batch_old != batch_new:
        changes.append(batch)
    elif split_old != split_new:  # the same windows per step, summed in other groups
        rounding_changes.append(batch.replace("the global batch", "the split of the global batch"))
    return changes, rounding_changes


def setup(
    cfg: TrainConfig, d: Dist, resume: ResumePoint | None = None, task: Task = PRETRAINING
) -> Run:
    """Build a run; with a resume point, restore everything it holds."""
    if cfg.stage != task.stage:
        raise TrainConfigError(
            f"the config is a {cfg.stage} config, the task trains {task.stage}"
            " (atlas-train sft / dpo pick the task from the config's [sft] or [dpo] section)"
        )
    device = (
        f"cuda:{d.local_rank}"
        if d.world > 1 and cfg.run.device.startswith("cuda")
        else cfg.run.device
    )
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir)
    _refuse_a_file_as_run_folder(run_dir)
    if d.main:
        check_logging_packages(cfg)
    if resume is None:
        _refuse_a_folder_with_checkpoints(run_dir)
    else:
        refuse_another_stage(run_dir, resume.path, task.stage)
    _check_seq_len_fits_the_model(cfg)  # before the data: DPO runs the reference over it
    seed_everything(cfg.run.seed)
    tokenizer = _run_tokenizer(cfg)
    if resume is not None:
        _refuse_another_vocabulary(cfg, resume.path, tokenizer)
    train_data, val_data = task.make_data(cfg, d)
    train_data.check_batch(cfg.data.micro_batch)  # not at the first step: after writing
    lora = cfg.lora.enabled
    # A LoRA run's resume point holds the adapter only: the base weights come from init_from.
    model = _build_model(cfg, tokenizer, resuming=resume is not None and not lora).to(device)
    if resume is not None and not lora:
        if resume.adapter_only:
            raise CheckpointError(
                f"{resume.path} holds a LoRA adapter, not a whole model: resume it with "
                "lora.enabled = true, its [lora] settings and its model.init_from"
            )
        try:  # full weights, before any sharding
            model.load_state_dict(resume.weights)
        except RuntimeError as e:
            raise CheckpointError(
                f"{resume.path} does not fit this run's model (was the config changed?): {e}"
            ) from None
    report = None
    if lora:
        torch.manual_seed(cfg.run.seed)  # the adapters' initial A matrices
        report = apply_lora(model, _lora_config(cfg))
        if d.main:
            say(str(report))
        if resume is not None:
            adapter = load_adapter(resume.path)
            if adapter.base_sha256 != report.base_sha256:  # as merge_lora refuses it
                raise CheckpointError(
                    f"{resume.path} holds an adapter trained on other base weights (sha256 "
                    f"{adapter.base_sha256[:12]}) than model.init_from = {cfg.model.init_from} "
                    f"({report.base_sha256[:12]}); resume with the run's own model.init_from"
                )
            load_adapter_weights(model, adapter)
        seed_everything(cfg.run.seed)
    if cfg.run.activation_checkpointing:
        enable_activation_checkpointing(model)
    loss_module = task.make_loss(model, cfg)
    wrapped = _wrap_distributed(loss_module, cfg, device) if d.world > 1 else loss_module
    step_module = torch.compile(wrapped) if compile_enabled(cfg) else wrapped
    # The optimizer is built after wrapping: FSDP replaces parameters with sharded ones.
    # The fused kernel updates each tensor in one pass, several times faster than the
    # default multi-tensor path on the CPU (bench/bench_train.py prints both). FSDP's sharded
    # (DTensor) parameters keep the default path.
    sharded = d.world > 1 and cfg.run.distributed == "fsdp"
    optimizer = torch.optim.AdamW(
        param_groups(wrapped, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=None if sharded or device.split(":")[0] not in ("cpu", "cuda") else True,
    )
    precision = resolve_precision(cfg, device)
    if cfg.run.precision == "auto" and d.main:
        say(f"precision auto: {precision} on {device}")
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    data, data_sha256 = task.data_identity(cfg, train_data)
    run = Run(
        cfg, d, device, run_dir, tokenizer, model, loss_module, step_module, optimizer, scaler,
        train_data, val_data, precision, task=task,
        lineage=lineage_provenance(task.stage, cfg.model.init_from, data, data_sha256),
        chat=_chat_template(cfg, tokenizer), lora=report,
    )  # fmt: skip
    if resume is not None:
        _restore_trainer_state(run, resume)
        changed, rounding = _changed_since(resume, cfg, d)
        if changed and d.main:  # allowed (a longer schedule, say), but no longer exact
            also = f" (and {', '.join(rounding)}, which change only float rounding)"
            say(
                f"--resume: settings differ from the checkpoint's: {', '.join(changed)}"
                f"{also if rounding else ''}; the run continues with the new ones, so it is "
                "not the run an uninterrupted training with either config would give"
            )
        elif rounding and d.main:
            say(
                f"--resume: {', '.join(rounding)} change only the order of float sums: the "
                "run continues the same computation, but not bit for bit"
            )
    if d.main:  # everything is checked and built: the run starts, and its folder says how
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    return run


def _changed_since(resume: ResumePoint, cfg: TrainConfig, d: Dist) -> tuple[list, list]:
    try:
        return resume_differences(resume.config_toml, resume.world_size, cfg, d.world)
    except ValueError as e:  # TOMLDecodeError: saved by an Atlas that left newlines unescaped
        if d.main:
            say(
                f"warning: the config saved in {resume.path / 'trainer_state.json'} is not valid"
                f" TOML ({e}); the settings it ran with cannot be compared with these"
            )
        return [], []


def _check_seq_len_fits_the_model(cfg: TrainConfig) -> None:
    """Before the data is read: a window longer than the model's context would otherwise
    be reported as a data problem (no window of that length, a batch too large)."""
    if cfg.model.init_from:
        try:  # the first read of init_from: a wrong path is named by its key
            max_seq_len = read_metadata(cfg.model.init_from)["model"]["max_seq_len"]
        except CheckpointError as e:
            raise TrainConfigError(f"model.init_from: {e}") from None
        owner = f"{cfg.model.init_from}'s"
    else:
        try:  # the vocabulary does not change the context length
            overrides = {"attention": cfg.run.attention, **cfg.model.overrides}
            max_seq_len = load_preset(cfg.model.preset, vocab_size=256, **overrides).max_seq_len
        except Exception:  # a bad preset or override: _build_model names it
            return
        owner = "the model's"
    if cfg.data.seq_len > max_seq_len:
        raise TrainConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds {owner} max_seq_len={max_seq_len}"
        )


def _refuse_a_folder_with_checkpoints(run_dir: Path) -> None:
    """A fresh run into a folder that holds checkpoints would mix two runs: its saves
    replace the old run's at the same steps, and the old run's later ones outlive it."""
    last = latest_checkpoint(run_dir)
    if last is not None:
        step = int(STEP_DIR.match(last.name).group(1))
        raise TrainConfigError(
            f"run.out_dir {run_dir} already holds checkpoints (the latest: step {step}, {last});"
            " pass --resume to continue that run, or choose another run.out_dir"
        )


def _run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """Pretraining: the data's tokenizer (which must be init_from's, if any), checked
    against the data's manifest; SFT and DPO: the base checkpoint's."""
    if cfg.stage != "pretrain":
        return load_checkpoint_tokenizer(cfg.model.init_from)
    tokenizer = data_tokenizer(cfg.data.path)  # its atlas_tokenizer.json
    if cfg.model.init_from:
        base = load_checkpoint_tokenizer(cfg.model.init_from)
        if _vocabulary(base) != _vocabulary(tokenizer):
            raise DataError(
                f"{cfg.data.path} was tokenized with another tokenizer than {cfg.model.init_from}"
                "'s; prepare the data with the checkpoint's own (atlas-train prepare-data"
                f" --tokenizer {cfg.model.init_from})"
            )
    return tokenizer


def _refuse_another_vocabulary(cfg: TrainConfig, checkpoint: Path, tokenizer: Tokenizer) -> None:
    """A resumed run keeps its vocabulary. Data prepared with another tokenizer of the same
    size fed the trained weights other ids without a word (and the next checkpoint carried
    the new tokenizer); of another size, the weights failed to load with torch's report."""
    if not (checkpoint / "config.json").is_file():
        return  # a LoRA run's adapter: its base, model.init_from, is checked instead
    if _vocabulary(load_checkpoint_tokenizer(checkpoint)) == _vocabulary(tokenizer):
        return
    source = f"data.path {cfg.data.path}" if cfg.stage == "pretrain" else cfg.model.init_from
    raise DataError(
        f"{source} has another tokenizer than {checkpoint}, the checkpoint being resumed; "
        "resume with the data it trained on, or start a new run in another run.out_dir"
    )


def _refuse_a_file_as_run_folder(run_dir: Path) -> None:
    """run.out_dir is a folder (to be): a file there, or above it, is named as such rather
    than as the OSError's errno."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == run_dir else f"is under the file {path}"
            raise TrainConfigError(f"run.out_dir {run_dir} {where}; give a folder")


def _vocabulary(tokenizer: Tokenizer) -> dict:
    return {k: v for k, v in tokenizer.to_dict().items() if k != "name"}


def load_checkpoint_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path(Path(directory), read_metadata(directory)))


def _chat_template(cfg: TrainConfig, tokenizer: Tokenizer) -> ChatTemplate | None:
    if cfg.stage == "pretrain":
        return None
    try:
        return load_chat_template(cfg.model.init_from, tokenizer)
    except ChatTemplateError as e:
        raise DataError(str(e)) from None


def _lora_config(cfg: TrainConfig) -> LoRAConfig:
    c = cfg.lora
    return LoRAConfig(c.rank, c.alpha, c.dropout, tuple(c.targets))


def _build_model(cfg: TrainConfig, tokenizer: Tokenizer, resuming: bool) -> Transformer:
    if cfg.model.init_from:
        if resuming:  # the resume point has the weights: only the shape is needed from here
            meta = read_metadata(cfg.model.init_from)["model"]
            model = Transformer(ModelConfig.from_dict({**meta, "attention": cfg.run.attention}))
        else:
            ckpt = load_checkpoint(cfg.model.init_from, attention=cfg.run.attention)
            model = ckpt.model.train()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise DataError(
                f"the tokenizer has {tokenizer.vocab_size} ids, {cfg.model.init_from} only "
                f"{model.config.vocab_size} embeddings"
            )
        return model  # data.seq_len was checked against it before the data was read
    overrides = {"attention": cfg.run.attention, **cfg.model.overrides}
    config = load_preset(cfg.model.preset, vocab_size=tokenizer.vocab_size, **overrides)
    if cfg.data.seq_len > config.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={config.max_seq_len}"
        )
    return Transformer(config)


def _wrap_distributed(module: nn.Module, cfg: TrainConfig, device: str) -> nn.Module:
    if cfg.run.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in module.model.blocks:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def _restore_trainer_state(run: Run, point: ResumePoint) -> None:
    if run.cfg.run.distributed == "fsdp" and run.dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            run.wrapped,
            run.optimizer,
            point.optimizer,
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        run.optimizer.load_state_dict(point.optimizer)
    if point.scaler:
        run.scaler.load_state_dict(point.scaler)
    run.train_data.load_state_dict(point.loader)
    set_rng_state(point.rng_tensors, point.rng_plain)
    run.step = run.start_step = point.step
    run.last_checkpoint = (point.path, point.step)


# --- one step, evaluation, checkpoint ----------------------------------------------------------
def _to_device(batch: tuple[Tensor, ...], device: str) -> tuple[Tensor, ...]:
    if device.startswith("cuda"):
        # Pinned memory and an asynchronous copy: a plain copy from pageable memory waits
        # for the GPU to finish the step before, which is a host sync every step.
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def _step_batches(data: Batches, per_rank: int, accum: int) -> list[tuple[Tensor, ...]]:
    """A step's micro-batches. The loaders' `step_batches` decide the epoch roll-over for
    the step's whole global batch, so micro_batch B x grad_accum A trains on the items of
    B*A x 1; a source without it is asked for one micro-batch at a time."""
    step_batches = getattr(data, "step_batches", None)
    if step_batches is not None:
        return step_batches(per_rank, accum)
    return [data.next_batch(per_rank) for _ in range(accum)]


def train_step(run: Run) -> tuple[Tensor, Tensor, float]:
    """One optimizer step. Returns (sum of the micro-batch losses, gradient norm, lr), the
    first two as device tensors that nothing here reads back."""
    cfg, d = run.cfg, run.dist
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    accum = cfg.data.grad_accum
    batches = _step_batches(run.train_data, cfg.data.micro_batch, accum)
    # What the model ran on: DPO's padded pairs vary in length from step to step.
    run.tokens_seen += sum(b[0].numel() for b in batches)
    shares = [1.0 / accum] * accum
    if run.task.batch_weight is not None:  # e.g. SFT: each trained token counts alike
        weights = [run.task.batch_weight(b) for b in batches]
        total = sum(weights)
        shares = [w / total if total > 0 else 1.0 / accum for w in weights]
    for micro, batch in enumerate(batches):
        batch = _to_device(batch, run.device)
        sync = micro == accum - 1
        # Gradients are reduced across ranks once per step, not per micro-batch: DDP's
        # no_sync, FSDP2's switch (it reduce-scattered after every micro-batch before).
        if d.world > 1 and hasattr(run.wrapped, "set_requires_gradient_sync"):
            run.wrapped.set_requires_gradient_sync(sync)
        no_sync = d.world > 1 and not sync and hasattr(run.wrapped, "no_sync")
        with run.wrapped.no_sync() if no_sync else contextlib.nullcontext():
            with autocast_context(run.precision, run.device):
                loss = run.step_module(*batch)
            run.scaler.scale(loss * shares[micro]).backward()
        # Logged as a mean over the step (Progress divides by grad_accum).
        loss_sum += loss.detach() * (shares[micro] * accum)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.wrapped.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    )
    run.scaler.step(run.optimizer)  # fp16 only: the scaler reads back whether grads are finite
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if d.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    run.step += 1
    return loss_sum, grad_norm, lr


@torch.no_grad()
def evaluate(
    loss_module: nn.Module, data: Batches, cfg: TrainConfig, device: str, byte_table: Tensor
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte (nats summed over target bytes).

    Runs the task's loss module (unwrapped, uncompiled) on (inputs, targets) batches; its
    mean over the targets that count (not IGNORE_INDEX) times their number is their sum.
    Each rank evaluates its part of the validation set and the sums are added over the
    ranks. The set is `run.eval_batches` global batches (micro_batch x processes x
    grad_accum items: windows, packed rows or pairs), so re-splitting the batch leaves it
    as it is.
    """
    was_training = loss_module.training
    loss_module.eval()
    nll, tokens, n_bytes = 0.0, 0, 0.0
    n_batches = cfg.run.eval_batches * cfg.data.grad_accum
    for batch in data.eval_batches(cfg.data.micro_batch, n_batches):
        y = batch[1]  # [B, T] targets; SFT batches also carry positions and doc ids
        valid = y != IGNORE_INDEX  # [B, T]
        count = int(valid.sum())
        nll += float(loss_module(*(t.to(device) for t in batch))) * count
        tokens += count
        n_bytes += float(byte_table[y[valid]].sum())
    loss_module.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = torch.tensor([nll, tokens, n_bytes], dtype=torch.float64, device=device)
        dist.all_reduce(sums)  # every rank evaluated its own part
        nll, tokens, n_bytes = sums.tolist()
    loss = nll / max(1, tokens)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nll / (math.log(2) * max(1.0, n_bytes)),
    }


def save(run: Run) -> tuple[Path | None, Transformer]:
    """Write a checkpoint of the current step (rank 0); returns its folder (None on other
    ranks) and a model holding the full weights (for sampling)."""
    cfg, d = run.cfg, run.dist
    if cfg.run.distributed == "fsdp" and d.world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(run.wrapped, options=opts)
        opt_state = get_optimizer_state_dict(run.wrapped, run.optimizer, options=opts)
    else:
        weights, opt_state = None, run.optimizer.state_dict()
    if not d.main:
        return None, run.model
    full_model = run.model
    if weights is not None:  # names are the loss module's: "model.blocks.0..."
        # A private RNG: building the copy must not move the training stream (exact resume).
        with torch.random.fork_rng(devices=[]):
            full_model = Transformer(run.model.config)
            if run.lora is not None:  # the same adapters, so the gathered names fit
                apply_lora(full_model, run.lora.config)
        full_model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    state = TrainerState(
        step=run.step,
        optimizer=opt_state,
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        loader=run.train_data.state_dict(),
        config_toml=cfg.to_toml(),
        world_size=run.dist.world,
    )
    lineage = dict(run.lineage)
    lineage["lineage"] = [*lineage["lineage"][:-1], {**lineage["lineage"][-1], "step": run.step}]
    provenance = {
        "source": "atlas-train",
        "step": run.step,
        "precision": run.precision,
        "data": lineage["lineage"][-1]["data"],
        **(
            {"data_manifest_sha256": lineage["data_sha256"]} if run.task.stage == "pretrain" else {}
        ),
        **lineage,
    }
    adapter = None
    if run.lora is not None:
        provenance["base_checkpoint"] = cfg.model.init_from
        adapter = adapter_of(full_model, run.lora, provenance)  # FSDP: the gathered copy
    path = save_training_checkpoint(
        run.run_dir, full_model, run.tokenizer, state, provenance, cfg.run.keep_last,
        chat_template=_own_template(cfg), adapter=adapter,
    )  # fmt: skip
    run.last_checkpoint = (path, run.step)
    return path, full_model


# --- the loop ----------------------------------------------------------------------------------
SHOWN_ON_BAR = ("reward_margin", "preference_accuracy")

# The best matmul peak this process has measured, by (device, threads): the hardware does not
# change between the runs of one process (a sweep, a notebook, a test suite), so a later run
# starts from it instead of spending a second measuring again.
_PEAK_SEEN: dict[tuple[str, int, str], float] = {}
# A CPU peak measured under load comes out low, so it is measured again (half a second) at a
# validation step, but no sooner than this after the last measurement: at most ~1% of the
# time goes to it, however often a run validates.
PEAK_REFRESH_SECONDS = 50.0


class Progress:
    """Logging every `log_every` steps: reads the pending step losses back in one transfer,
    writes scalars, moves the bar. Rank 0 only writes; every rank keeps the losses."""

    def __init__(self, run: Run, enabled: bool) -> None:
        cfg = run.cfg
        self.run = run
        self.pending: list[Tensor] = []
        n_params = run.model.num_parameters()
        self.flops_per_token = flops_per_token(run.model.config, n_params, cfg.data.seq_len)
        # Before the bar: a Ctrl-C during these seconds leaves no half-drawn bar behind.
        # The peak of the precision the matmuls run in: bf16 autocast on a CPU with bf16
        # units ran past an fp32 peak (MFU 104-108% in the quickstart on such a host).
        self.peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision)
        self.peak_key = (str(run.device), torch.get_num_threads(), str(self.peak_dtype))
        self.peak = 0.0
        if run.dist.main:
            self.peak = _PEAK_SEEN.get(self.peak_key) or measured_matmul_peak(
                run.device, dtype=self.peak_dtype
            )
            _PEAK_SEEN[self.peak_key] = self.peak
        self.peak_measured_at = time.perf_counter()
        self.logger = Logger(cfg, run.run_dir, run.dist.main, resumed_at=run.start_step)
        shown = enabled and run.dist.main
        # Into a file or a pipe (nohup, a batch job) a bar is a stream of carriage returns:
        # there, each log step is a plain line instead, as nanoGPT prints them.
        self.lines = shown and not sys.stderr.isatty()
        self.bar = tqdm(
            total=cfg.schedule.max_steps,
            initial=run.step,
            disable=not shown or self.lines,
            desc="training",
            unit="step",
        )
        self.t_last, self.tokens_last = time.perf_counter(), run.tokens_seen

    def refresh_peak(self) -> None:
        """On the CPU, measure the matmul peak again (half a second, at most every
        PEAK_REFRESH_SECONDS) and keep the best: one measured while other work loads the
        cores comes out low, and every MFU after it high (96% was seen in a run that started
        beside the test suite). A GPU is rarely shared that way, and a second measurement
        there would allocate ~0.7 GB at once."""
        start = time.perf_counter()
        due = start - self.peak_measured_at >= PEAK_REFRESH_SECONDS
        if self.run.dist.main and self.run.device == "cpu" and due:
            self.peak = max(
                self.peak, measured_matmul_peak("cpu", seconds=0.5, dtype=self.peak_dtype)
            )
            _PEAK_SEEN[self.peak_key] = self.peak
            self.peak_measured_at = time.perf_counter()
            self.t_last += self.peak_measured_at - start  # not training time: out of tok/s

    def step_done(self, loss_sum: Tensor) -> None:
        self.pending.append(loss_sum)
        self.bar.update(1)

    def flush(self, grad_norm: Tensor, lr: float) -> None:
        """Read the pending losses (the one host sync of `log_every` steps) and log."""
        run, cfg = self.run, self.run.cfg
        if not self.pending:
            return
        accum = cfg.data.grad_accum
        losses = [v / accum for v in torch.stack(self.pending).tolist()]
        self.pending.clear()
        self._refuse_non_finite(losses)
        run.losses.extend(losses)
        if not run.dist.main:
            return
        now = time.perf_counter()
        tokens = (run.tokens_seen - self.tokens_last) * run.dist.world
        tok_s = tokens / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, run.tokens_seen
        values = {
            "train/loss": losses[-1],
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "perf/tokens_per_s": tok_s,
            # Against every process's device: tok_s counts all of them (nanoGPT's and
            # torchtitan's MFU are per device too).
            "perf/mfu": (
                tok_s * self.flops_per_token / (self.peak * run.dist.world) if self.peak else 0.0
            ),
        }
        extra = getattr(run.loss_module, "pop_metrics", None)
        shown = {}
        if extra is not None:  # e.g. DPO: reward margin, preference accuracy
            shown = extra()
            values.update({f"train/{k}": v for k, v in shown.items()})
        if run.device.startswith("cuda"):
            values["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.scalars(run.step, values)
        fields = {
            "loss": f"{losses[-1]:.4f}",
            **{k: f"{v:.3f}" for k, v in shown.items() if k in SHOWN_ON_BAR},
            "lr": f"{lr:.2e}",
            "tok_s": f"{tok_s:,.0f}",
        }
        if self.lines:
            mfu = f" | mfu {values['perf/mfu']:.1%}" if self.peak else ""
            say(
                f"step {run.step}/{cfg.schedule.max_steps} | "
                + " | ".join(f"{k} {v}" for k, v in fields.items())
                + f" | grad_norm {values['train/grad_norm']:.3f}{mfu}"
            )
        else:
            self.bar.set_postfix(**fields)

    def check_finite(self) -> None:
        """Before a checkpoint: the losses since the last log step, and the weights this
        step's update made (no loss has seen them yet), must be numbers."""
        run = self.run
        if self.pending:
            accum = run.cfg.data.grad_accum
            self._refuse_non_finite([v / accum for v in torch.stack(self.pending).tolist()])
        # FSDP holds a shard of each parameter on each rank (to_local): each checks its own.
        local = [p.to_local() if hasattr(p, "to_local") else p for p in run.model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in local]).all()):
            raise TrainingDiverged(_diverged_message(run, "the weights are", run.step))

    def _refuse_non_finite(self, losses: list[float]) -> None:
        """Stop a diverged run: training on only makes NaN weights, whose checkpoints
        `keep_last` would keep in place of the good ones (`losses` end at run.step)."""
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                step = self.run.step - len(losses) + 1 + i
                raise TrainingDiverged(_diverged_message(self.run, f"the loss ({loss}) is", step))

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def _diverged_message(run: Run, what: str, step: int) -> str:
    last = run.last_checkpoint
    kept = (
        f"the last checkpoint is {last[0]} (step {last[1]})"
        if last is not None
        else "no checkpoint was saved"
    )
    return (
        f"training diverged: {what} not finite at step {step} (lower optim.lr, lengthen "
        f"the warmup, or set optim.grad_clip); {kept}"
    )


def fit(run: Run, profile: bool = False, progress: bool = True) -> dict:
    """Train `run` to `schedule.max_steps` (or to a Ctrl-C); returns the summary."""
    cfg, d = run.cfg, run.dist
    max_steps = cfg.schedule.max_steps
    summary: dict[str, Any] = {"losses": run.losses, "start_step": run.start_step}
    with before_training(d.main):  # the matmul peak takes seconds on a GPU
        byte_table = token_bytes_table(run.tokenizer, run.model.config.vocab_size)
        log = Progress(run, progress)
    profiler, profiled_steps = None, 0
    if profile and d.main:
        profiler, profiled_steps = _profiler(max_steps - run.step)
    stopped = False
    try:
        # Distributed: the ranks agree on the step to stop after (a collective each step).
        with graceful_interrupt(distributed=d.world > 1, announce=d.main) as stop:
            while run.step < max_steps and not stopped:
                loss_sum, grad_norm, lr = train_step(run)
                log.step_done(loss_sum)
                done, stopped = run.step, stop.after_step()
                if profiler is not None:
                    profiler.step()
                    if done - run.start_step >= profiled_steps:
                        _finish_profile(profiler, run.run_dir)
                        profiler = None
                last = done == max_steps
                if done % cfg.run.log_every == 0 or last or stopped:
                    log.flush(grad_norm, lr)
                if done % cfg.run.eval_every == 0 and not last:
                    log.refresh_peak()
                if (done % cfg.run.eval_every == 0 or last) and run.val_data is not None:
                    metrics = _evaluate(run, byte_table)
                    summary["val"] = metrics
                    if d.main:
                        log.logger.scalars(done, {f"val/{k}": v for k, v in metrics.items()})
                        say(f"step {done}: {_describe(metrics)}")
                if done % cfg.run.checkpoint_every == 0 or last or stopped:
                    _checkpoint_and_sample(run, log)
    except KeyboardInterrupt:  # a second Ctrl-C (distributed: 2 s or more after the first)
        log.close()
        if d.main:
            say(_stop_message(run))
        raise
    except TrainingDiverged:
        log.close()
        raise
    finally:
        if profiler is not None:  # stopped before its steps were traced (Ctrl-C, an error)
            # A profiler left running crashes the interpreter at exit (seen: SIGSEGV).
            profiler.stop()
            say("profiling: the run stopped before the traced steps ran; no trace written")
    log.close()
    if "val" not in summary and run.val_data is not None and run.step == run.start_step:
        # Resumed at max_steps: nothing to train, but the summary still has its metrics.
        summary["val"] = _evaluate(run, byte_table)
    if stopped and d.main:
        say(_stop_message(run))
    summary["interrupted"] = stopped
    if stopped:  # the exit status a signal gives: 130 for Ctrl-C, 143 for SIGTERM
        summary["exit_status"] = 128 + int(stop.signal)
    summary["run_dir"] = str(run.run_dir)
    # The run's own last save (or its resume point): not whatever step is highest on disk.
    last = run.last_checkpoint
    summary["checkpoint"] = str(last[0]) if d.main and last is not None else None
    return summary


def _evaluate(run: Run, byte_table: Tensor) -> dict[str, float]:
    evaluate_fn = run.task.evaluate or evaluate
    return evaluate_fn(run.loss_module, run.val_data, run.cfg, run.device, byte_table)


def _describe(metrics: dict[str, float]) -> str:
    if {"loss", "perplexity", "bits_per_byte"} <= set(metrics):
        return (
            f"val loss {metrics['loss']:.4f}, ppl {metrics['perplexity']:.2f}, "
            f"bpb {metrics['bits_per_byte']:.4f}"
        )
    return "val " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())


def _checkpoint_and_sample(run: Run, log: Progress) -> None:
    log.check_finite()  # never a checkpoint of NaN weights
    path, full_model = save(run)
    if path is None or run.cfg.run.sample_tokens <= 0:
        return
    try:
        sample = _sample(full_model, run.tokenizer, run.cfg, run.chat)
    except FloatingPointError:  # finite weights whose outputs overflow: the next loss is NaN
        raise TrainingDiverged(
            _diverged_message(run, "the model's outputs are", run.step)
        ) from None
    log.logger.text(run.step, "sample", sample)
    say(f"step {run.step}: saved {path}\n  sample: {sample!r}")


def _stop_message(run: Run) -> str:
    if run.last_checkpoint is None:
        return (
            f"stopped at step {run.step}; no checkpoint yet (the first comes at step "
            f"{run.cfg.run.checkpoint_every}); a rerun starts from step 0"
        )
    path, step = run.last_checkpoint
    return f"stopped at step {run.step}; last checkpoint {path} (step {step}); resume with --resume"


def train(
    cfg: TrainConfig,
    resume: bool = False,
    profile: bool = False,
    progress: bool = True,
    task: Task = PRETRAINING,
) -> dict:
    """Run training; returns a summary (losses per step, final validation metrics, whether
    Ctrl-C stopped it, the last checkpoint)."""
    _check_device_present(cfg.run.device)
    d = setup_distributed(cfg.run.device)
    try:
        with before_training(d.main):
            point = find_resume_point(Path(cfg.run.out_dir), d, task.stage) if resume else None
            if point is not None and point.step > cfg.schedule.max_steps:
                # It would load everything, train nothing and exit 0 as if it had continued.
                raise TrainConfigError(
                    f"--resume: the checkpoint is at step {point.step}, past schedule.max_steps"
                    f" = {cfg.schedule.max_steps}: there is nothing to train; raise"
                    " schedule.max_steps to continue the run"
                )
            run = setup(cfg, d, point, task)
        return fit(run, profile, progress)
    finally:
        if d.world > 1:
            dist.destroy_process_group()


# --- helpers -----------------------------------------------------------------------------------
def _check_device_present(device: str) -> None:
    """A CUDA device asked for on a machine or a PyTorch build without one is a config error
    (one line), not PyTorch's assertion from deep inside the first tensor move."""
    if torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch" if torch.version.cuda is None else "no visible CUDA device"
        raise TrainConfigError(f"run.device is {device!r} but this machine has {build}")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise TrainConfigError(
            f"run.device is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )


def _sample(
    model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, chat: ChatTemplate | None = None
) -> str:
    # A private generator, so sampling never disturbs the training RNG stream.
    if chat is not None:  # a chat model: the prompt as a user message, the reply to its end
        return _chat_sample(model, tokenizer, cfg, chat)
    prompt = tokenizer.encode(cfg.run.sample_prompt) or [tokenizer.eot_id or 0]
    budget = min(cfg.run.sample_tokens, model.config.max_seq_len - len(prompt))
    was_training = model.training
    model.eval()
    out = model.generate(
        prompt,
        max(0, budget),
        temperature=0.8,
        generator=torch.Generator(device=model.tok_emb.weight.device).manual_seed(0),
    )
    model.train(was_training)
    return cfg.run.sample_prompt + tokenizer.decode(out)


def _own_template(cfg: TrainConfig) -> str | None:
    """The init_from checkpoint's chat_template.jinja, carried to the checkpoints it begets."""
    if not cfg.model.init_from:
        return None
    path = Path(cfg.model.init_from) / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _chat_sample(
    model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, chat: ChatTemplate
) -> str:
    prompt = chat.prompt_ids([{"role": "user", "content": cfg.run.sample_prompt}])
    budget = max(0, min(cfg.run.sample_tokens, model.config.max_seq_len - len(prompt)))
    was_training = model.training
    model.eval()
    out = model.generate(prompt, budget, temperature=0.0)
    model.train(was_training)
    stops = [i for i, t in enumerate(out) if t in chat.stop_token_ids]
    reply = tokenizer.decode(out[: stops[0]] if stops else out)
    return f"{cfg.run.sample_prompt} -> {reply}"


def _manifest_hash(path: str) -> str:
    import hashlib

    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()


def _profiler(steps_left: int):
    """A started profiler and the number of steps it needs: skip one step (start-up
    costs), warm up one, trace three; fewer on a run with under five steps left. (None, 0)
    when no step is left."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if steps_left < 1:
        say("profiling: no step left to train, so nothing to trace")
        return None, 0
    wait, warmup = (1, 1) if steps_left >= 5 else (0, min(1, steps_left - 1))
    active = min(3, steps_left - wait - warmup)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    prof = profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        record_shapes=True,
    )
    prof.start()
    return prof, wait + warmup + active


def _finish_profile(prof, run_dir: Path) -> None:
    prof.stop()
    trace = run_dir / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"profiler trace written to {trace} (open in chrome://tracing or Perfetto)")
