"""The fp32 products of serving, by number of rows: Atlas's C panel kernel vs oneDNN vs MKL.

What it does: for each weight shape of GPT-2 124M (qkv 768x2304, attention out 768x768,
MLP 768x3072 and 3072x768, tied head 768x50257) and each row count (default 1, 4, 8,
16, 32, 64, 128), times `x @ W` three ways over enough copies of the weight that they
cannot stay in the last-level cache (as in a decode step, where every weight comes from
DRAM): `native.matmul_panels` over `native.pack_panels` copies (what Atlas serves fp32
with), oneDNN's packed weights (`onednn.PackedWeight`) and PyTorch's default `x @ W`
(MKL). The first two alternate in rounds and each keeps its median, so both see the same
machine state; MKL runs after them, on its own, so it cannot disturb their alternation
(in a trial, both measured slower when alternated with it). Prints JSON and a Markdown table of GFLOP/s, the share of the fp32 peak
measured in the same run (bench/ceilings.py), and the panel kernel's speed-up.
Run: `python bench/bench_matmul.py [--rows 1 16 64] [--rounds 5]`.
What it does not do: whole steps (bench/profile_step.py) or serving (bench_serving.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import machine, matmul_peak_flops  # noqa: E402

from atlas_server.model import native  # noqa: E402
from atlas_server.model.onednn import PackedWeight, packing_supported  # noqa: E402

SHAPES = {"qkv": (768, 2304), "attn out": (768, 768), "mlp in": (768, 3072)}
SHAPES |= {"mlp out": (3072, 768), "head": (768, 50257)}
COPY_BYTES = 96 * 2**20  # three times a 32 MB last-level cache


def multiply(copies: list, x: torch.Tensor) -> list:
    """x times every copy: a WeightCopy (callable) or a plain [K, N] tensor (MKL)."""
    return [c(x) if callable(c) else x @ c for c in copies]


def time_ms(copies: list, x: torch.Tensor, reps: int = 3) -> float:
    multiply(copies, x)
    start = time.perf_counter()
    for _ in range(reps):
        multiply(copies, x)
    return 1e3 * (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds per case")
    args = parser.parse_args()
    if min(args.rows) < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    if not native.available() or not packing_supported(torch.zeros(1)):
        raise SystemExit("error: needs the native kernels (a C compiler) and oneDNN")
    peak = matmul_peak_flops()
    result: dict = {"machine": machine(), "fp32_peak_gflops": peak / 1e9, "cases": []}
    gen = torch.Generator().manual_seed(0)
    for name, (k, n) in SHAPES.items():
        copies = max(1, -(-COPY_BYTES // (k * n * 4)))
        weights = [torch.randn(k, n, generator=gen) for _ in range(copies)]
        kernels = {
            "c_panels": [native.PanelWeight(w) for w in weights],
            "onednn": [PackedWeight(w) for w in weights],
        }
        for rows in args.rows:
            x = torch.randn(rows, k, generator=gen)
            times: dict[str, list[float]] = {kind: [] for kind in kernels}
            with torch.inference_mode():
                for r in range(args.rounds):
                    for kind in list(kernels) if r % 2 else list(kernels)[::-1]:
                        times[kind].append(time_ms(kernels[kind], x) / copies)
            flops = 2 * rows * k * n
            case = {"shape": name, "k": k, "n": n, "rows": rows}
            for kind, t in times.items():
                case[f"{kind}_gflops"] = flops / statistics.median(t) / 1e6
            with torch.inference_mode():
                mkl = [time_ms(weights, x) / copies for _ in range(args.rounds)]
            case["mkl_gflops"] = flops / statistics.median(mkl) / 1e6
            result["cases"].append(case)
            print(json.dumps(case), file=sys.stderr)
    print(json.dumps(result, indent=2))
    print(f"\nfp32 peak {result['fp32_peak_gflops']:.0f} GFLOP/s (same run)\n")
    print("| shape | rows | C panels GFLOP/s (% of peak) | oneDNN | MKL | panels / oneDNN |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in result["cases"]:
        pct = 100 * c["c_panels_gflops"] / result["fp32_peak_gflops"]
        print(
            f"| {c['shape']} {c['k']}x{c['n']} | {c['rows']} | {c['c_panels_gflops']:.0f} "
            f"({pct:.0f}%) | {c['onednn_gflops']:.0f} | {c['mkl_gflops']:.0f} | "
            f"{c['c_panels_gflops'] / c['onednn_gflops']:.2f}x |"
        )


if __name__ == "__main__":
    main()
