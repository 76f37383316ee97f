"""Training-step benchmark: tokens/s and MFU of the trainer's step, and the quickstart's step.

Default mode: for the gpt2-124m preset (or `--preset`), times full training steps as the
trainer runs them (the loss module of trainer/loss.py, forward + backward, gradient
clipping, fused AdamW) on random token ids, in several settings: eager or
`torch.compile` of the whole loss module, plain or chunked cross-entropy, SDPA or the
reference attention, activation checkpointing (on CUDA only with `--checkpointing`: one
more cold compile, and no target of issue 16 rests on it). Steps run back to back with one device
sync at the end, as in the trainer (which reads losses back only every `log_every`
steps). It reports tokens/s, model FLOPs utilisation (6N + 12*L*C*T FLOPs per token,
trainer/flops.py) against the matmul peak measured in the same run (fp32 on CPU, bf16 on
CUDA) and, on a known GPU, against its datasheet dense bf16/fp16 peak (the usual MFU),
and the activation memory each setting keeps for the backward pass.
Run: `python bench/bench_train.py [--quick] [--preset NAME] [--device cuda] [--batch 16
--seq 1024 --precision bf16] [--checkpointing] [--out FILE.json]`.

`--quickstart` mode: the step of `atlas-train quickstart` (configs/train/quickstart.toml)
through the trainer's own `setup` and `train_step`, on the quickstart's token shards
(`--data`, default `$ATLAS_HOME/quickstart/data`), for the settings named in SETTINGS,
each in a process of its own (OpenMP's wait policy is fixed when a process starts),
alternated round by round so that a shared machine's load falls on all of them alike; it
prints each setting's wall and CPU seconds per step (min / median / max over every step
of every round) and the load average after each round.
Run: `python bench/bench_train.py --quickstart [--rounds 5] [--steps 3]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# As atlas_server does on import (see its __init__), before torch allocates anything, so
# Atlas and its baselines in this process run with the same allocator setting.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
if "--omp-default" not in sys.argv:  # a --quickstart setting measures libgomp's own default
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `atlas-train` (trainer/__init__.py)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ceilings import machine, matmul_peak_flops  # noqa: E402
from progress import Progress, check_device, check_preset  # noqa: E402

from atlas_server.io import atomic_write_text  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from trainer.flops import flops_per_token  # noqa: E402
from trainer.loop import enable_activation_checkpointing, param_groups  # noqa: E402
from trainer.loss import NextTokenLoss  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; the
# first name fragment found in torch.cuda.get_device_name() wins, so specific ones first.
DATASHEET_BF16_PEAK = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
]


def datasheet_peak(device: str, precision: str) -> tuple[str, float] | None:
    """(GPU name, its dense bf16/fp16 peak) when the GPU is in the table, else None."""
    if not device.startswith("cuda") or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for fragment, peak in DATASHEET_BF16_PEAK:
        if fragment in name:
            return name, peak
    return None


def saved_activation_bytes(loss_module, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_module(x, y)
    loss.backward()
    loss_module.zero_grad(set_to_none=True)
    return total


def run_setting(args, attention: str, compiled: bool, chunked: bool, checkpointing: bool) -> dict:
    device, steps = args.device, args.steps
    torch.manual_seed(0)
    config = load_preset(args.preset, attention=attention)
    model = Transformer(config).to(device)
    if checkpointing:
        enable_activation_checkpointing(model)
    loss_module = NextTokenLoss(model, chunked=chunked)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)  # as the trainer
    step_module = torch.compile(loss_module) if compiled else loss_module
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    autocast = torch.autocast(
        device.split(":")[0],
        dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16,
        enabled=args.precision != "fp32",
    )

    def step() -> None:
        with autocast:
            loss = step_module(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    step()
    sync()
    warmup_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    n_params = model.num_parameters()
    row = {
        "attention": attention,
        "compile": compiled,
        "cross_entropy": "chunked" if chunked else "plain",
        "activation_checkpointing": checkpointing,
        "step_s": best,
        "warmup_s": warmup_s,
        "tokens_per_s": args.batch * args.seq / best,
        "flops_per_token": flops_per_token(config, n_params, args.seq),
        "activation_bytes": saved_activation_bytes(loss_module, x, y),
    }
    if device.startswith("cuda"):
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def optimizer_step_ms(preset: str, device: str, fused: bool, repeats: int = 5) -> float:
    """Best AdamW step time over the preset's parameters, fused kernel or multi-tensor path."""
    torch.manual_seed(0)
    model = Transformer(load_preset(preset)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=fused or None)
    optimizer.step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def settings_for(args) -> list[tuple[str, bool, bool, bool]]:
    """(attention, compiled, chunked cross-entropy, activation checkpointing)."""
    if args.device.startswith("cuda"):
        # The trainer's default first, then eager: each row is saved as soon as it is measured,
        # so a run cut short (the GPU check's time limit) keeps the rows that matter most.
        rows = [
            ("sdpa", True, True, False),  # the trainer's CUDA default
            ("sdpa", False, False, False),
            ("sdpa", False, True, False),
            ("sdpa", True, False, False),
        ]
        if args.checkpointing:  # one more cold compile, for a memory question
            rows.append(("sdpa", True, True, True))
        return rows
    rows = [
        ("sdpa", False, False, False),  # the trainer's CPU default
        ("reference", False, False, False),
        ("sdpa", False, True, False),
        ("sdpa", False, False, True),
    ]
    if not args.quick:
        rows.append(("sdpa", True, False, False))
    return rows


def main_step(args) -> None:
    settings = list(settings_for(args))
    progress = Progress(__file__, phases=len(settings) + 2)
    progress.phase(f"measuring the matmul peak on {args.device}")
    peak = matmul_peak_flops(device=args.device)
    spec = datasheet_peak(args.device, args.precision)
    rows = []
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": args.preset,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "precision": args.precision,
        "batch": args.batch,
        "seq_len": args.seq,
        "peak_matmul_tflops_measured": peak / 1e12,
        "peak_tflops_datasheet": spec[1] / 1e12 if spec else None,
        "settings": rows,
        "complete": False,  # until the AdamW timing below: the file is rewritten after each row
    }
    for attention, compiled, chunked, ckpt in settings:
        progress.phase(
            f"{args.preset}: {args.steps} training steps, attention {attention}, compile "
            f"{compiled}, cross-entropy {'chunked' if chunked else 'plain'}, activation checkpointing {ckpt}"
        )
        r = run_setting(args, attention, compiled, chunked, ckpt)
        if args.device.startswith("cuda"):
            gc.collect()  # the setting's model and optimizer state, before the next one
            torch.cuda.empty_cache()
        r["mfu_measured_peak"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        if spec is not None:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / spec[1]
        rows.append(r)
        progress.note(json.dumps(r))
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    progress.phase("timing the AdamW step: fused, then multi-tensor")
    result["adamw_step_ms"] = {
        "fused": optimizer_step_ms(args.preset, args.device, fused=True),
        "multi_tensor": optimizer_step_ms(args.preset, args.device, fused=False),
    }
    result["complete"] = True
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    mfu_head = "MFU (datasheet) | " if spec else ""
    print(
        f"\n| attention | compile | cross-entropy | activation ckpt | tokens/s | {mfu_head}"
        "MFU (measured peak) | saved activations |"
    )
    print("|---|---|---|---|---|" + ("---|" if spec else "") + "---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.0f}% | " if spec else ""
        print(
            f"| {r['attention']} | {r['compile']} | {r['cross_entropy']} | "
            f"{r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | {mfu}"
            f"{100 * r['mfu_measured_peak']:.0f}% | {r['activation_bytes'] / 2**20:,.0f} MiB |"
        )
    adamw = result["adamw_step_ms"]
    print(
        f"\nAdamW step: fused {adamw['fused']:.1f} ms, multi-tensor {adamw['multi_tensor']:.1f} ms "
        f"({adamw['multi_tensor'] / adamw['fused']:.1f}x)"
    )
    progress.done()


# --- the quickstart's step ---------------------------------------------------------------------
# name -> (OpenMP wait policy, --set overrides of configs/train/quickstart.toml), each
# setting one change on the one before. "before" is the quickstart's step before it was
# tuned: fp32, the whole batch's logits then the softmax, libgomp's default wait policy
# (spin, then sleep); "now, fp32" is today's step on a CPU without native bf16; "now" is
# today's (bf16 where the CPU has it); "now, 1 thread" the same on one thread.
FP32_PLAIN = ['run.precision="fp32"', 'run.cross_entropy="plain"']
SETTINGS = {
    "before": ("default", FP32_PLAIN),
    "passive threads": ("passive", FP32_PLAIN),
    "now, fp32": ("passive", ['run.precision="fp32"']),
    "now": ("passive", []),
    "now, 1 thread": ("passive", ["run.threads=1"]),
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quickstart_child(args) -> None:
    """One setting in this process (its OpenMP policy is fixed at start): JSON per-step times."""
    from atlas_server.model.config import configs_dir
    from trainer.config import load_train_config
    from trainer.loop import Dist, setup, train_step

    _, sets = SETTINGS[args.quickstart_child]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_train_config(
            configs_dir() / "train" / "quickstart.toml",
            [f"data.path={json.dumps(args.data)}", f'run.out_dir="{tmp}/run"',
             "run.tensorboard=false", *sets],
        )  # fmt: skip
        run = setup(cfg, Dist())
        float(train_step(run)[0])  # warm-up
        wall, cpu = [], []
        for _ in range(args.steps):
            t, c = time.perf_counter(), _cpu_seconds()
            float(train_step(run)[0])
            wall.append(time.perf_counter() - t)
            cpu.append(_cpu_seconds() - c)
    print(json.dumps({"wall": wall, "cpu": cpu, "precision": run.precision}))


def main_quickstart(args) -> None:
    """Each setting in its own process, settings alternated round by round."""
    import subprocess

    from atlas_server.paths import quickstart_dir

    data = Path(args.data) if args.data else quickstart_dir() / "data"
    if not (data / "manifest.json").is_file():
        sys.exit(f"error: no token shards at {data}; run `atlas-train quickstart` or pass --data")
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in SETTINGS}
    precision, loads = {}, []
    for r in range(args.rounds):
        for name, (omp, _) in SETTINGS.items():
            cmd = [sys.executable, __file__, "--quickstart-child", name, "--data", str(data),
                   "--steps", str(args.steps), *(["--omp-default"] if omp == "default" else [])]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            times[name]["wall"] += child["wall"]
            times[name]["cpu"] += child["cpu"]
            precision[name] = child["precision"]
        loads.append(os.getloadavg()[0])
        line = ", ".join(
            f"{n} {statistics.median(v['wall'][-args.steps :]):.2f} s" for n, v in times.items()
        )
        print(
            f"round {r + 1}/{args.rounds}: {line} (load {loads[-1]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps_per_round": args.steps,
        "load_average_1min": loads,
        "settings": {
            n: {"omp_wait_policy": omp, "set": sets, "precision": precision[n]}
            for n, (omp, sets) in SETTINGS.items()
        },  # fmt: skip
        "wall_s_per_step": {n: _spread(v["wall"]) for n, v in times.items()},
        "cpu_s_per_step": {n: _spread(v["cpu"]) for n, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    base = result["wall_s_per_step"]["before"]["median"]
    for name, spread in result["wall_s_per_step"].items():
        print(
            f"{name}: {spread['min']:.2f} / {spread['median']:.2f} / {spread['max']:.2f} s per step "
            f"(min / median / max), {base / spread['median']:.2f}x 'before' by the median"
        )


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description="training step tokens/s and MFU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--quickstart", action="store_true", help="time the quickstart's step")
    parser.add_argument("--data", help="--quickstart: token shards (default: the quickstart's)")
    parser.add_argument("--rounds", type=int, default=5, help="--quickstart: rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="CUDA: also time the compiled step with activation checkpointing",
    )
    parser.add_argument("--quickstart-child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--omp-default", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_device(parser, args.device)
    check_preset(parser, args.preset)
    if args.quickstart_child:
        args.steps = args.steps or 3
        quickstart_child(args)
        return
    if args.quickstart:
        args.steps = args.steps or 3
        main_quickstart(args)
        return
    args.steps = args.steps or (2 if args.quick else 5)
    args.repeats = 2 if args.quick else 3
    main_step(args)


if __name__ == "__main__":
    main()
