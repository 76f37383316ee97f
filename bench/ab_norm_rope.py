"""A Llama block's RMSNorm and RoPE on Atlas's C kernels against PyTorch's operations:
batch-1 (or `--batch`) decode step time, both paths in one process, alternated step by step.

What it does: builds a random-weight model per `--presets` (default llama-124m, llama-50m),
prepared for serving (fp32, the C panel matmuls), prefills a 16-token prompt into two KV
slots, then decodes `--steps` tokens in each slot, one step with the C norm and RoPE
(native.rms_norm, native.rope_in_place), the next with them turned off (the PyTorch ops
transformer.py runs otherwise), swapping which goes first every step so both see the same
machine load. Prints the median step time of each, their ratio, and JSON (`--out` to save).
Everything else in the step (matmuls, attention, cache writes) is the same on both sides.
What it does not do: HTTP, batching by the engine, or GPT-2-style models (LayerNorm and
learned positions have no such kernels; bench_model.py and bench_llamacpp.py time those).
Needs a C compiler (native.available()).

Run: `python bench/ab_norm_rope.py [--presets llama-124m llama-50m] [--steps 300]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import machine  # noqa: E402

from atlas_server.model import Transformer, load_preset, native, transformer  # noqa: E402
from atlas_server.model.config import ConfigError  # noqa: E402


def step_times(preset: str, steps: int, batch: int) -> dict[str, float]:
    """Median decode step time in ms with the C norm and RoPE ("c") and without ("pytorch")."""
    real = transformer.native_inference
    use_c = {"on": True}
    # The switch: the C norm and RoPE are taken only where native_inference says so.
    transformer.native_inference = lambda *t: use_c["on"] and real(*t)
    try:
        torch.manual_seed(0)
        model = Transformer(load_preset(preset)).eval().prepare_for_inference()
        cache = model.new_cache(2 * batch, 16 + steps + 1)
        slots = {True: torch.arange(batch), False: torch.arange(batch, 2 * batch)}  # [B] each
        times: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            prompt = torch.randint(0, model.config.vocab_size, (batch, 16))  # [B, 16]
            for on in (True, False):
                use_c["on"] = on
                model(prompt, torch.arange(16).expand(batch, 16), cache, slots[on], last_only=True)
            token = torch.full((batch, 1), 5)  # [B, 1]
            for i in range(steps):
                position = torch.full((batch, 1), 16 + i)  # [B, 1]
                for on in (True, False) if i % 2 else (False, True):
                    use_c["on"] = on
                    started = time.perf_counter()
                    model(token, position, cache, slots[on], last_only=True)
                    times[on].append(time.perf_counter() - started)
    finally:
        transformer.native_inference = real
    skip = min(20, steps // 5)  # warm-up steps
    c_ms = 1e3 * statistics.median(times[True][skip:])
    pytorch_ms = 1e3 * statistics.median(times[False][skip:])
    return {"preset": preset, "batch": batch, "c_ms": c_ms, "pytorch_ms": pytorch_ms,
            "speedup": pytorch_ms / c_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["llama-124m", "llama-50m"])
    parser.add_argument("--steps", type=int, default=300, help="decode steps per path")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.steps < 10:
        parser.error("--steps must be at least 10")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    for preset in args.presets:
        try:
            config = load_preset(preset)
        except ConfigError as e:
            parser.error(str(e))
        if config.norm != "rmsnorm" or config.pos_encoding != "rope":
            parser.error(f"{preset} has no RMSNorm and RoPE to compare")
    if not native.available():
        parser.error("no C compiler here: the kernels this compares are not built")
    rows = [step_times(preset, args.steps, args.batch) for preset in args.presets]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": args.steps,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print("\n| preset | batch | C norm + RoPE, ms/step | PyTorch ops, ms/step | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['c_ms']:.2f} | {r['pytorch_ms']:.2f} | "
              f"{r['speedup']:.3f}x |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
