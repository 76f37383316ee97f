"""Where a serving step's time goes: a prompt prefill and decode steps of 16 and 1 rows, by kind.

What it does: builds the gpt2-124m preset (random weights, fp32) prepared for serving (on
the CPU, Atlas's C panel kernel where a compiler is found, else oneDNN-packed weights),
then times (median of N) a 128-token prefill into one KV slot, a decode step of 16
sequences at ~190 cached positions in consecutive slots (the shapes of
`bench/bench_serving.py` at 16 streams) and a decode step of one. Each is also timed with
the panel kernel and with oneDNN-packed copies instead, alternated in rounds. A
`torch.profiler` pass splits each into matmuls (Atlas's C panels, oneDNN), attention (SDPA
or the C kernel), KV-cache writes and everything else (self CPU time; the profiler adds
overhead, so the split is a proportion, the medians are the times). Decode steps run
block by block (`ATLAS_DECODE_STACK=0`), the way a split by kind can see them.
Run: `python bench/profile_step.py [--steps N]`; prints JSON and a markdown table.
What it does not do: HTTP, scheduling or sampling (see bench_serving.py, bench_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as atlas_server sets it
# Block by block: the split needs each kind as its own call, and the two kernels' rounds
# must differ only in their products (bench/step_overhead.py times the one-call step).
os.environ["ATLAS_DECODE_STACK"] = "0"
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import machine  # noqa: E402

from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.model.onednn import PackedWeight  # noqa: E402
from atlas_server.model.transformer import Linear  # noqa: E402

KINDS = {
    "mkldnn::_linear_pointwise": "matmul (oneDNN)",
    "aten::mm": "matmul (MKL)",
    "aten::addmm": "matmul (MKL)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "atlas::decode_attention": "attention",
    "atlas::matmul_panels": "matmul (Atlas C panels)",
    "aten::index_put_": "KV-cache write",
    "aten::_index_put_impl_": "KV-cache write",
}


def split_by_kind(fn, repeats: int = 5) -> dict[str, float]:
    with torch.profiler.profile() as prof:
        for _ in range(repeats):
            fn()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = KINDS.get(event.key, "other")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    return {kind: t / whole for kind, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def panels_ab(model: Transformer, step, steps: int, rounds: int = 8) -> dict[str, float]:
    """Median step time with the column panels (C kernel) and with oneDNN-packed copies
    instead, alternating in rounds so both see the same machine state."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    panels = [m.packed for m in linears] + [model._packed_head]
    onednn = [PackedWeight(m.weight) for m in linears]
    onednn.append(PackedWeight(model.tok_emb.weight, out_in=True))

    def use(copies: list) -> None:
        for m, c in zip(linears, copies, strict=False):
            m.packed = c
        model._packed_head = copies[-1]

    times: dict[str, list[float]] = {"c_panels_ms": [], "onednn_ms": []}
    for r in range(rounds):
        for name in ("c_panels_ms", "onednn_ms") if r % 2 else ("onednn_ms", "c_panels_ms"):
            use(panels if name == "c_panels_ms" else onednn)
            times[name].append(median_ms(step, max(2, steps // rounds)))
    use(panels)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed repeats of each forward")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.manual_seed(0)
    model = Transformer(load_preset("gpt2-124m")).prepare_for_inference()
    n_matmul = model.num_parameters() - model.pos_emb.weight.numel() - model.tok_emb.weight.numel()
    cache = model.new_cache(32, 1024)
    prompt, batch, context = 128, 16, 190
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        ids = torch.randint(0, 50000, (batch, context), generator=gen)
        model(ids, None, cache, torch.arange(batch), last_only=True)  # fill 16 slots

        prompt_ids = torch.randint(0, 50000, (1, prompt), generator=gen)
        positions = torch.arange(prompt)[None]
        slot = torch.tensor([20])

        def prefill():
            model(prompt_ids, positions, cache, slot, last_only=True)

        token = torch.randint(0, 50000, (batch, 1), generator=gen)
        decode_pos = torch.randint(context - 60, context, (batch, 1), generator=gen)
        slots = torch.arange(batch)

        def decode():
            model(token, decode_pos, cache, slots, last_only=True)

        one_token, one_pos = token[:1], decode_pos[:1]

        def decode_one():
            model(one_token, one_pos, cache, slots[:1], last_only=True)

        result = {"machine": machine(), "model": "gpt2-124m, random weights, fp32, packed"}
        for name, fn, flops in [
            (f"prefill {prompt} tokens", prefill, 2 * n_matmul * prompt),
            (f"decode step, batch {batch}", decode, 2 * model.num_parameters() * batch),
            ("decode step, batch 1", decode_one, 2 * model.num_parameters()),
        ]:
            ms = median_ms(fn, args.steps)
            result[name] = {
                "median_ms": ms,
                "gflops_per_s": flops / ms / 1e6,
                "share_by_kind": split_by_kind(fn),
            }
        for name, fn in [
            (f"prefill {prompt} tokens", prefill),
            (f"batch-{batch} step", decode),
            ("batch-1 step", decode_one),
        ]:
            result[f"{name}, C panels vs oneDNN"] = panels_ab(model, fn, args.steps)
    print(json.dumps(result, indent=2))
    print("\n| forward | median ms | GFLOP/s | share of self CPU time |\n|---|---:|---:|---|")
    for name, r in result.items():
        if isinstance(r, dict) and "median_ms" in r:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["share_by_kind"].items())
            print(f"| {name} | {r['median_ms']:.1f} | {r['gflops_per_s']:.0f} | {shares} |")
    print()
    for name, ab in result.items():
        if name.endswith("C panels vs oneDNN"):
            print(
                f"{name.split(',')[0]}, alternated: C panels {ab['c_panels_ms']:.1f} ms, oneDNN "
                f"packed {ab['onednn_ms']:.1f} ms ({ab['onednn_ms'] / ab['c_panels_ms']:.2f}x)"
            )


if __name__ == "__main__":
    main()
