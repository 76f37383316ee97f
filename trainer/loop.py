"""The training loop: one readable function from config to checkpoints.

What it does: sets up (distributed when launched by torchrun: DDP, or FSDP2 for models
that do not fit; gloo on CPU, NCCL on GPU), builds the model and AdamW (weight decay on
matrices and embeddings, none on norms and biases, as GPT-2/nanoGPT do), runs
warmup + cosine (or WSD, or constant) learning rate, gradient accumulation, clipping,
bf16/fp16 autocast (fp16 with a GradScaler), optional activation checkpointing and
`torch.compile`; evaluates validation loss, perplexity and bits per byte; samples text
and writes atomic checkpoints with the full trainer state; logs to TensorBoard and MLflow
and shows a progress bar; `--profile` records a torch.profiler trace.

Exact resume: the model, optimizer, scaler, data position and every RNG state are
restored, and the schedule is a function of the step, so a resumed run produces the same
losses bit for bit on CPU as one that was never interrupted (tests/test_train.py).
What it does not do: prepare data (see `data.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from atlas_server.checkpoint import load_checkpoint
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import Tokenizer

from .config import TrainConfig
from .flops import flops_per_token, measured_matmul_peak
from .loader import TokenLoader
from .state import (
    clean_partial,
    latest_checkpoint,
    load_trainer_state,
    optimizer_from_flat,
    save_training_checkpoint,
    set_rng_state,
)


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
        frac = (step - decay_start) / max(1, s.max_steps - decay_start)
        return o.lr - (o.lr - min_lr) * min(1.0, frac)
    frac = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return min_lr + 0.5 * (o.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
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


def autocast_context(cfg: TrainConfig, device: str):
    if cfg.run.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def token_bytes_table(tokenizer: Tokenizer, vocab: int) -> torch.Tensor:
    return torch.tensor([len(tokenizer.token_bytes(i)) for i in range(vocab)], dtype=torch.float64)


class Logger:
    """TensorBoard (default) and MLflow (when enabled) scalars, on rank 0 only."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool) -> None:
        self.tb = self.mlflow = None
        if not enabled:
            return
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.run.mlflow:
            import mlflow

            # A local SQLite store beside the run (MLflow 3 retired the plain file store).
            mlflow.set_tracking_uri(
                cfg.run.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            )
            mlflow.set_experiment("atlas")
            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_text(cfg.to_toml(), "config.toml")
            self.mlflow = mlflow

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def train(
    cfg: TrainConfig, resume: bool = False, profile: bool = False, progress: bool = True
) -> dict:
    """Run training; returns a summary (losses per step, final validation metrics)."""
    device = cfg.run.device
    d = setup_distributed(device)
    if d.world > 1 and device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    run_dir = Path(cfg.run.out_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
    seed_everything(cfg.run.seed)

    data_dir = Path(cfg.data.path)
    tokenizer = Tokenizer.from_file(data_dir)  # its atlas_tokenizer.json
    train_data = TokenLoader(data_dir, "train", cfg.data.seq_len, cfg.run.seed, d.rank, d.world)
    val_split = "val" if json.loads((data_dir / "manifest.json").read_text())["val"] else "train"
    val_data = TokenLoader(data_dir, val_split, cfg.data.seq_len, cfg.run.seed)

    if cfg.model.init_from:
        model = load_checkpoint(cfg.model.init_from, attention=cfg.run.attention).model.train()
    else:
        overrides = {"attention": cfg.run.attention, **cfg.model.overrides}
        config = load_preset(cfg.model.preset, vocab_size=tokenizer.vocab_size, **overrides)
        if cfg.data.seq_len > config.max_seq_len:
            raise ValueError(
                f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={config.max_seq_len}"
            )
        model = Transformer(config)
    model.to(device)
    raw_model = model
    if cfg.run.activation_checkpointing:
        enable_activation_checkpointing(model)
    start_step, saved = 0, None
    if resume:
        clean_partial(run_dir)
        last = latest_checkpoint(run_dir)
        if last is not None:
            saved = load_trainer_state(last)
            weights = load_checkpoint(last, attention=cfg.run.attention).model.state_dict()
            raw_model.load_state_dict(weights)  # full weights, before any sharding
            start_step = saved[1]["step"]

    if d.world > 1:
        model = _wrap_distributed(model, cfg, device)
    # The optimizer is built after wrapping: FSDP replaces parameters with sharded ones.
    # The fused kernel updates each tensor in one pass, several times faster than the
    # default multi-tensor path on the CPU (bench/bench_train.py prints both). FSDP's sharded
    # (DTensor) parameters keep the default path.
    sharded = d.world > 1 and cfg.run.distributed == "fsdp"
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=None if sharded or device.split(":")[0] not in ("cpu", "cuda") else True,
    )
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.run.precision == "fp16")
    if saved is not None:
        tensors, plain = saved
        optim_state = optimizer_from_flat(tensors, plain["optimizer"])
        if cfg.run.distributed == "fsdp" and d.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(optim_state)
        if plain.get("scaler"):
            scaler.load_state_dict(plain["scaler"])
        train_data.load_state_dict(plain["loader"])
        set_rng_state(tensors, plain["rng"])
    forward_model = torch.compile(model) if cfg.run.compile else model

    n_params = raw_model.num_parameters()
    tokens_per_step = cfg.data.micro_batch * cfg.data.grad_accum * d.world * cfg.data.seq_len
    flops_tok = flops_per_token(raw_model.config, n_params, cfg.data.seq_len)
    peak = measured_matmul_peak(device) if d.main else 0.0
    byte_table = token_bytes_table(tokenizer, raw_model.config.vocab_size)
    logger = Logger(cfg, run_dir, d.main)
    losses: list[float] = []
    summary: dict = {"losses": losses, "start_step": start_step}
    bar = tqdm(
        total=cfg.schedule.max_steps,
        initial=start_step,
        disable=not (progress and d.main),
        desc="training",
        unit="step",
    )
    profiler = _profiler(run_dir) if profile and d.main else None
    t_last = time.perf_counter()
    for step in range(start_step, cfg.schedule.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.data.grad_accum):
            x, y = train_data.next_batch(cfg.data.micro_batch)
            x, y = x.to(device), y.to(device)
            sync = micro == cfg.data.grad_accum - 1
            ctx = (
                model.no_sync()
                if (d.world > 1 and not sync and hasattr(model, "no_sync"))
                else contextlib.nullcontext()
            )
            with ctx, autocast_context(cfg, device):
                logits = forward_model(x)  # [B, T, V]
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)
                )
            scaler.scale(loss / cfg.data.grad_accum).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if d.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        step_loss = loss_sum.item() / cfg.data.grad_accum
        losses.append(step_loss)
        done = step + 1
        if profiler is not None:
            profiler.step()
            if done - start_step >= 5:
                _finish_profile(profiler, run_dir)
                profiler = None
        if d.main and (done % cfg.run.log_every == 0 or done == cfg.schedule.max_steps):
            elapsed = time.perf_counter() - t_last
            steps = cfg.run.log_every if done % cfg.run.log_every == 0 else done % cfg.run.log_every
            tok_s = tokens_per_step * steps / max(elapsed, 1e-9)
            t_last = time.perf_counter()
            values = {
                "train/loss": step_loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "perf/tokens_per_s": tok_s,
                "perf/mfu": tok_s * flops_tok / peak if peak else 0.0,
            }
            if device.startswith("cuda"):
                values["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logger.scalars(done, values)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if done % cfg.run.eval_every == 0 or done == cfg.schedule.max_steps:
            metrics = evaluate(raw_model, val_data, cfg, device, byte_table)
            summary["val"] = metrics
            if d.main:
                logger.scalars(done, {f"val/{k}": v for k, v in metrics.items()})
                bar.write(
                    f"step {done}: val loss {metrics['loss']:.4f}, ppl {metrics['perplexity']:.2f}, "
                    f"bpb {metrics['bits_per_byte']:.4f}"
                )
        if done % cfg.run.checkpoint_every == 0 or done == cfg.schedule.max_steps:
            _checkpoint(
                cfg,
                d,
                run_dir,
                done,
                raw_model,
                model,
                tokenizer,
                optimizer,
                scaler,
                train_data,
                logger,
                bar,
            )
    bar.close()
    logger.close()
    summary["run_dir"] = str(run_dir)
    summary["checkpoint"] = str(latest_checkpoint(run_dir)) if d.main else None
    if d.world > 1:
        dist.destroy_process_group()
    return summary


def _wrap_distributed(model: Transformer, cfg: TrainConfig, device: str):
    if cfg.run.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def evaluate(
    model: Transformer, data: TokenLoader, cfg: TrainConfig, device: str, byte_table: torch.Tensor
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte (nats summed over target bytes)."""
    was_training = model.training
    model.eval()
    nll, tokens, n_bytes = 0.0, 0, 0.0
    for x, y in data.eval_batches(cfg.data.micro_batch, cfg.run.eval_batches):
        with autocast_context(cfg, device):
            logits = model(x.to(device))
        losses = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1), reduction="sum"
        )
        nll += float(losses)
        tokens += y.numel()
        n_bytes += float(byte_table[y].sum())
    model.train(was_training)
    loss = nll / max(1, tokens)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nll / (math.log(2) * max(1.0, n_bytes)),
    }


def _checkpoint(
    cfg,
    d: Dist,
    run_dir,
    step,
    raw_model,
    model,
    tokenizer,
    optimizer,
    scaler,
    train_data,
    logger,
    bar,
) -> None:
    if cfg.run.distributed == "fsdp" and d.world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        opt_state = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        weights, opt_state = None, optimizer.state_dict()
    if not d.main:
        return
    save_model = raw_model
    if weights is not None:
        save_model = Transformer(raw_model.config)
        save_model.load_state_dict(weights)
    path = save_training_checkpoint(
        run_dir,
        step,
        save_model,
        tokenizer,
        opt_state,
        scaler.state_dict() if scaler.is_enabled() else None,
        train_data.state_dict(),
        cfg.to_toml(),
        {
            "source": "atlas-train",
            "step": step,
            "data": cfg.data.path,
            "data_manifest_sha256": _manifest_hash(cfg.data.path),
        },
        cfg.run.keep_last,
    )
    if cfg.run.sample_tokens > 0:
        sample = _sample(save_model, tokenizer, cfg)
        logger.text(step, "sample", sample)
        bar.write(f"step {step}: saved {path}\n  sample: {sample!r}")


def _sample(model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig) -> str:
    # A private generator, so sampling never disturbs the training RNG stream.
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


def _manifest_hash(path: str) -> str:
    import hashlib

    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()


def _profiler(run_dir: Path):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    prof = profile(
        activities=activities, schedule=schedule(wait=1, warmup=1, active=3), record_shapes=True
    )
    prof.start()
    return prof


def _finish_profile(prof, run_dir: Path) -> None:
    prof.stop()
    trace = run_dir / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"profiler trace written to {trace} (open in chrome://tracing or Perfetto)")
