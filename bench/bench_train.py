"""Training-step benchmark: tokens/s and MFU of Atlas's model, against the measured peak.

What it does: for the gpt2-124m preset (or `--preset`), times full training steps
(forward, backward, AdamW) on random token ids, in several settings — eager with SDPA
attention (the default), the reference attention path, `torch.compile`, and activation
checkpointing — and reports tokens/s, model FLOPs utilisation (6N + 12*L*C*T FLOPs per
token, trainer/flops.py) against the fp32 matmul peak measured in the same run (bf16 peak
on CUDA), and the activation memory each setting keeps for the backward pass (bytes of
tensors saved by autograd, counted with saved-tensor hooks).
Run: `python bench/bench_train.py [--quick] [--preset NAME] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# As atlas_server does on import (see its __init__), before torch allocates anything, so
# Atlas and its baselines in this process run with the same allocator setting.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ceilings import machine, matmul_peak_flops  # noqa: E402
from progress import Progress  # noqa: E402

from atlas_server.model import Transformer, load_preset  # noqa: E402
from trainer.flops import flops_per_token  # noqa: E402
from trainer.loop import enable_activation_checkpointing, param_groups  # noqa: E402


def saved_activation_bytes(model, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def run_setting(
    preset: str,
    device: str,
    batch: int,
    seq: int,
    steps: int,
    attention: str,
    compile_model: bool,
    checkpointing: bool,
    precision: str,
) -> dict:
    torch.manual_seed(0)
    config = load_preset(preset, attention=attention)
    model = Transformer(config).to(device)
    if checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1),
        lr=1e-4,
        fused=True,  # as the trainer builds it
    )
    forward = torch.compile(model) if compile_model else model
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(
        device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"
    )

    def step() -> None:
        with autocast:
            logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    best = min(times)
    n_params = model.num_parameters()
    tok_s = batch * seq / best
    return {
        "attention": attention,
        "compile": compile_model,
        "activation_checkpointing": checkpointing,
        "step_s": best,
        "tokens_per_s": tok_s,
        "flops_per_token": flops_per_token(config, n_params, seq),
        "activation_bytes": saved_activation_bytes(model, x, y),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description="training step tokens/s and MFU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    args = parser.parse_args()
    steps = 2 if args.quick else 5
    settings = [("sdpa", False, False), ("reference", False, False), ("sdpa", False, True)]
    if not args.quick:
        settings.append(("sdpa", True, False))
    progress = Progress(__file__, phases=len(settings) + 2)
    progress.phase(f"measuring the matmul peak on {args.device}")
    peak = matmul_peak_flops(device=args.device)
    rows = []
    for attention, compiled, ckpt in settings:
        progress.phase(
            f"{args.preset}: {steps} training steps, attention {attention}, compile {compiled},"
            f" activation checkpointing {ckpt}"
        )
        r = run_setting(
            args.preset,
            args.device,
            args.batch,
            args.seq,
            steps,
            attention,
            compiled,
            ckpt,
            args.precision,
        )
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        rows.append(r)
    progress.phase("timing the AdamW step: fused, then multi-tensor")
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "device": args.device,
        "precision": args.precision,
        "batch": args.batch,
        "seq_len": args.seq,
        "peak_matmul_gflops": peak / 1e9,
        "settings": rows,
        "adamw_step_ms": {
            "fused": optimizer_step_ms(args.preset, args.device, fused=True),
            "multi_tensor": optimizer_step_ms(args.preset, args.device, fused=False),
        },
    }
    print(json.dumps(result, indent=2))
    print("\n| attention | compile | activation ckpt | tokens/s | MFU | saved activations |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attention']} | {r['compile']} | {r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.0f}% | {r['activation_bytes'] / 2**20:,.0f} MiB |"
        )
    adamw = result["adamw_step_ms"]
    print(
        f"\nAdamW step: fused {adamw['fused']:.0f} ms, multi-tensor {adamw['multi_tensor']:.0f} ms "
        f"({adamw['multi_tensor'] / adamw['fused']:.1f}x)"
    )
    progress.done()


if __name__ == "__main__":
    main()
