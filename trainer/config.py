"""Training configuration: TOML decoded into frozen, validated structs.

What it does: defines `TrainConfig` (model, data, optim, schedule, run sections), loads it
from a TOML file and `--set section.key=value` overrides through Atlas's one config loader
(`atlas_server.tomlconfig`: unknown keys and wrong types are errors naming the key and
where it came from; `--set optim.lr=3e-4`, `--set run.compile=true` are TOML values) and
renders the resolved config that every run saves beside its checkpoints.
What it does not do: build models or optimizers (see `loop.py`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

import msgspec

from atlas_server import tomlconfig


class TrainConfigError(ValueError):
    """A training config that cannot be used; the message names the key."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (raised by the loop, which saves no checkpoint
    after it); the fix is in the config: a lower lr, a longer warmup, gradient clipping."""


# The command that trains each stage (TrainConfig.stage), for messages that say which to run.
STAGE_COMMAND = {
    "pretrain": "atlas-train train",
    "sft": "atlas-train sft",
    "dpo": "atlas-train dpo",
}


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSection(_Section):
    preset: str = "gpt2-tiny"  # configs/models/NAME.toml; vocab_size comes from the tokenizer
    overrides: dict[str, Any] = {}  # e.g. {max_seq_len = 256, dropout = 0.1}
    init_from: str | None = None  # start from an atlas checkpoint instead of random weights


class DataSection(_Section):
    path: str = "data/tokens"  # output of `atlas-train prepare-data`
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward/backward on one process
    grad_accum: int = 1  # micro-batches per optimizer step


class OptimSection(_Section):
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


class ScheduleSection(_Section):
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    max_steps: int = 1000
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly


class RunSection(_Section):
    out_dir: str = "runs/default"
    seed: int = 1337
    device: str = "cpu"
    # "auto": bf16 autocast where the device computes bf16 natively (a CUDA GPU that supports
    # it; a CPU with AVX512-BF16 or AMX), else fp32. See loop.resolve_precision().
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # torch.compile of the whole loss module (forward, head, loss; backward too). Unset: on
    # for CUDA, off for the CPU (where compiling takes minutes and needs a C++ toolchain).
    compile: bool | None = None
    # "chunked": head and loss together over chunks of rows, never the full [tokens, vocab]
    # logits (trainer/loss.py); "plain": the model's logits, then F.cross_entropy.
    cross_entropy: Literal["chunked", "plain"] = "chunked"
    # Rows per chunk; 0: chunks of ~8 MiB of fp32 logits on a CPU (they stay in cache), ~256 MiB on a GPU.
    cross_entropy_chunk: int = 0
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "reference"] = "sdpa"
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    sample_tokens: int = 48  # generated at each checkpoint; 0 disables
    sample_prompt: str = "def "
    tensorboard: bool = True
    mlflow: bool = False
    mlflow_uri: str | None = None  # default: a local SQLite store, out_dir/mlflow.db
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched by torchrun
    threads: int | None = None  # torch intra-op threads; None keeps torch's default


class SFTSection(_Section):
    # Chat JSONL / parquet files, folders, globs or hf:NAME (trainer/chat_data.py). Setting
    # `train` makes the config an SFT config: `atlas-train sft` runs it.
    train: list[str] = []
    val: list[str] = []  # held-out conversations for validation loss; [] skips validation


class DPOSection(_Section):
    # Preference records (prompt or messages, chosen, rejected). Setting `train` makes the
    # config a DPO config: `atlas-train dpo` runs it.
    train: list[str] = []
    val: list[str] = []  # held-out pairs: validation loss, reward margin, preference accuracy
    beta: float = 0.1
    label_smoothing: float = 0.0  # > 0: conservative DPO (labels flipped with this probability)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    # > 0 adds this times the chosen responses' mean next-token loss (TRL's rpo_alpha, the
    # RPO paper's NLL term): the policy keeps generating what it prefers, not only ranking it.
    sft_weight: float = 0.0
    # "cached": the reference (model.init_from) scores every pair once, before training, into
    # PREFS.jsonl.ref-logps-KEY.safetensors beside the data (KEY: a hash of the reference
    # weights, the tokenized pairs and the settings the numbers depend on);
    # "frozen": a frozen copy of the reference runs beside the policy at every step.
    reference: Literal["cached", "frozen"] = "cached"


class LoRASection(_Section):
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Projection names, dotted suffixes or globs (trainer/lora.py): attn.wqkv, attn.wo,
    # mlp.w_in, mlp.w_out; lm_head where embeddings are untied.
    targets: list[str] = msgspec.field(
        default_factory=lambda: ["attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out"]
    )


class TrainConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    run: RunSection = RunSection()
    sft: SFTSection = SFTSection()
    dpo: DPOSection = DPOSection()
    lora: LoRASection = LoRASection()

    @property
    def stage(self) -> Literal["pretrain", "sft", "dpo"]:
        """What the config trains: "sft" with sft.train set, "dpo" with dpo.train set."""
        if self.sft.train:
            return "sft"
        if self.dpo.train:
            return "dpo"
        return "pretrain"

    def validate(self) -> TrainConfig:
        checks = [
            (self.data.seq_len >= 2, "data.seq_len must be >= 2"),
            (self.data.micro_batch >= 1, "data.micro_batch must be >= 1"),
            (self.data.grad_accum >= 1, "data.grad_accum must be >= 1"),
            (0 < self.optim.lr < math.inf, "optim.lr must be a finite number > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (0 <= self.optim.beta1 < 1, "optim.beta1 must be in [0, 1)"),
            (0 <= self.optim.beta2 < 1, "optim.beta2 must be in [0, 1)"),
            (self.optim.eps > 0, "optim.eps must be > 0"),
            (0 <= self.run.seed < 2**32, "run.seed must be in [0, 2**32)"),
            (self.run.sample_tokens >= 0, "run.sample_tokens must be >= 0 (0: no sample)"),
            (
                "vocab_size" not in self.model.overrides,
                "model.overrides cannot set vocab_size: it comes from the tokenizer",
            ),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0"),
            (self.schedule.max_steps >= 1, "schedule.max_steps must be >= 1"),
            (
                0 <= self.schedule.warmup_steps <= self.schedule.max_steps,
                f"schedule.warmup_steps must be between 0 and max_steps (warmup_steps="
                f"{self.schedule.warmup_steps}, max_steps={self.schedule.max_steps}): set "
                "both, e.g. --set schedule.warmup_steps=1",
            ),
            (0 < self.schedule.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]"),
            (
                self.schedule.kind != "wsd"
                or self.schedule.warmup_steps
                <= int(self.schedule.max_steps * (1 - self.schedule.decay_fraction)),
                "schedule.warmup_steps must end before the WSD decay starts (at "
                "max_steps * (1 - decay_fraction)): the lr would jump down when warmup ends",
            ),
            (self.run.keep_last >= 1, "run.keep_last must be >= 1"),
            (self.run.cross_entropy_chunk >= 0, "run.cross_entropy_chunk must be >= 0"),
            (
                not (self.sft.train and self.dpo.train),
                "set sft.train or dpo.train, not both: a run is one stage",
            ),
            (
                self.stage == "pretrain" or bool(self.model.init_from),
                f"{self.stage} starts from a trained model: set model.init_from to a checkpoint",
            ),
            (self.dpo.beta > 0, "dpo.beta must be > 0"),
            (self.dpo.sft_weight >= 0, "dpo.sft_weight must be >= 0"),
            (0 <= self.dpo.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
            (
                not (self.dpo.loss_type == "ipo" and self.dpo.label_smoothing),
                "dpo.label_smoothing applies to loss_type sigmoid, not ipo",
            ),
            (self.lora.rank >= 1, "lora.rank must be >= 1"),
            (self.lora.alpha > 0, "lora.alpha must be > 0"),
            (0 <= self.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
            (bool(self.lora.targets), "lora.targets must name at least one projection"),
            (
                not self.lora.enabled or bool(self.model.init_from),
                "LoRA adapts a trained model: set model.init_from to a checkpoint",
            ),
            (
                self.run.eval_every >= 1
                and self.run.checkpoint_every >= 1
                and self.run.log_every >= 1,
                "run.eval_every, run.checkpoint_every and run.log_every must be >= 1",
            ),
            (self.run.eval_batches >= 1, "run.eval_batches must be >= 1"),
            (
                self.run.threads is None or self.run.threads >= 1,
                "run.threads must be >= 1 (leave it unset for PyTorch's default)",
            ),
            (
                _is_device(self.run.device),
                f"run.device {self.run.device!r} is not a device: cpu, cuda or cuda:N",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)
        return self

    def to_toml(self) -> str:
        lines = []
        for section, values in msgspec.to_builtins(self).items():
            lines.append(f"[{section}]")
            for k, v in values.items():
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


def _is_device(name: str) -> bool:
    """cpu, cuda or cuda:N: the devices the trainer runs on (PyTorch parses more, such as
    mps or meta, which failed later with a traceback)."""
    return re.fullmatch(r"cpu|cuda(:\d+)?", name) is not None


# TOML basic strings: these have short escapes; every other control character (U+0000 to
# U+001F and U+007F) is written \uXXXX. A raw newline would end the line mid-string.
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    escaped = (
        _SHORT_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
        for c in text
    )
    return '"' + "".join(escaped) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _toml_string(v)
    if v is None:
        return '"__none__"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _strip_none(data: Any) -> Any:
    # to_toml() writes None as "__none__" (TOML has no null); reading it back means "unset".
    if isinstance(data, dict):
        return {k: _strip_none(v) for k, v in data.items() if v != "__none__"}
    return data


def load_train_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """A config file (or the defaults when `path` is None), then `--set` overrides in order."""
    layers = []
    if path is not None:
        origin, values = tomlconfig.file_layer(path, TrainConfigError)
        layers.append((origin, _strip_none(values)))
    layers.append(tomlconfig.set_layer(overrides, TrainConfigError))
    return tomlconfig.decode(TrainConfig, layers, TrainConfigError).validate()
