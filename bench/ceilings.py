"""The machine's physical ceilings, measured: DRAM read bandwidth and peak matmul FLOP/s.

What it does: `dram_read_bandwidth()` streams a float32 buffer much larger than any cache
(1 GiB by default) through a reduction and reports the best GB/s of several passes; it
also compares two ways to multiply a vector by a weight matrix, `torch.mv` over a
row-major [out, in] matrix and `x @ W` over the [in, out] layout Atlas stores, as the GB/s
of weight bytes they read. `matmul_peak_flops()` times large square fp32 matmuls (bf16
on CUDA). Batch-1 decode is bound by the first (every weight is read once per token);
batched decode and training by the second. Run: `python bench/ceilings.py [--quick]`.
What it does not do: model-level numbers (see bench_serving.py, bench_train.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def dram_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best streaming-read bandwidth in bytes/s (sum over a buffer >> last-level cache)."""
    # Random contents, not a constant: identical pages can be merged by the hypervisor
    # (same-page merging), and a sum over them then reads cache, not DRAM (measured here:
    # a ones-filled buffer "read" at twice the speed of a random one).
    buf = torch.rand(int(gib * 2**30 / 4), generator=torch.Generator().manual_seed(0))
    buf.sum()  # touch every page once before timing
    seconds = _best(lambda: buf.sum(), repeats)
    return buf.numel() * 4 / seconds


def matvec_bandwidth(
    rows: int = 768, cols: int = 3072 * 4, layers: int = 12, repeats: int = 5
) -> dict[str, float]:
    """Weight-read GB/s of a 124M-sized stack of matrices: torch.mv on [out, in] vs x @ W on [in, out]."""
    row_major = [
        torch.randn(cols, rows) for _ in range(layers)
    ]  # [out, in], as nn.Linear stores it
    in_out = [w.t().contiguous() for w in row_major]  # [in, out], as Atlas stores it
    x = torch.randn(rows)
    nbytes = sum(w.numel() * 4 for w in row_major)
    mv = _best(lambda: [torch.mv(w, x) for w in row_major], repeats)
    xw = _best(lambda: [x @ w for w in in_out], repeats)
    return {"torch_mv_row_major_gbs": nbytes / mv / 1e9, "x_at_w_in_out_gbs": nbytes / xw / 1e9}


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    return 2 * size**3 / _best(run, repeats)


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    gib = 0.5 if args.quick else 1.0
    result = {
        "machine": machine(),
        "dram_read_gbs": dram_read_bandwidth(gib) / 1e9,
        **matvec_bandwidth(repeats=3 if args.quick else 5),
        "fp32_matmul_gflops": matmul_peak_flops() / 1e9,
    }
    torch.set_num_threads(1)
    result["fp32_matmul_gflops_1_thread"] = matmul_peak_flops() / 1e9
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
