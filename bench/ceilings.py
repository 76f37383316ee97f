"""The machine's physical ceilings, measured: DRAM read bandwidth and peak matmul FLOP/s.

What it does: `dram_read_bandwidth()` streams float32 data much larger than any cache
(1 GiB by default) and reports the best GB/s of several passes and of three readers: a
`sum()` reduction, a oneDNN matrix-vector product over a 1 GiB matrix, and Atlas's own C
panel kernel at one row (`atlas_server.model.native.matmul_panels`, where a compiler is
present) over the same matrix. A ceiling is what the hardware allows, so the fastest
reader sets it (on one of this project's AMD EPYC hosts the oneDNN mat-vec read ~1.2x
faster than `sum()`). `matvec_bandwidth()` compares ways to multiply a vector by a
124M-sized stack of weight matrices — `torch.mv` over [out, in], `x @ W` over [in, out],
oneDNN-packed weights and Atlas's C panel kernel (what Atlas serves fp32 with) — as the
GB/s of weight bytes they read. `matmul_peak_flops()` times large square fp32 matmuls
(2048 and 3072 on a CPU) with PyTorch's default kernel (MKL) and with oneDNN and keeps the
fastest (bf16 on CUDA): MKL runs its AVX2 path on AMD CPUs and reaches less than half of
what oneDNN's AVX-512 kernel does, so MKL alone would understate the peak. Batch-1 decode
is bound by the first; batched decode and training by the last.
Run: `python bench/ceilings.py [--quick]`.
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


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(weight_out_in: torch.Tensor):
    """x @ weight.T through a oneDNN-packed copy of the weight (see atlas_server/model/onednn.py)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight_out_in, None)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def dram_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best streaming-read bandwidth in bytes/s over data >> last-level cache (best reader)."""
    # Random contents from an unpredictable seed, not a constant or a fixed seed: identical
    # pages can be merged by the host (same-page merging), also across processes that
    # drew the same numbers, and reads of them could then come partly from cache. (On the
    # project's VM the figure is bimodal anyway, 46-50 or 70-80 GB/s: docs/benchmarks.md.)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
    buf = torch.rand(int(gib * 2**30 / 4), generator=gen)
    buf.sum()  # touch every page once before timing
    best = buf.numel() * 4 / _best(buf.sum, repeats)
    del buf
    # 16 matrices of [out, 4096] filling `gib` GiB.
    n_out = int(gib * 2**30 / 4 / 4096 / 16)
    x = torch.randn(1, 4096)
    if _onednn_available():  # the packed copies are what is read
        mats = [_onednn_linear(torch.rand(n_out, 4096, generator=gen)) for _ in range(16)]
        [m(x) for m in mats]
        seconds = _best(lambda: [m(x) for m in mats], repeats)
        best = max(best, 16 * n_out * 4096 * 4 / seconds)
        del mats
    native = _atlas_native()
    if native is not None:
        mats = [native.pack_panels(torch.rand(4096, n_out, generator=gen)) for _ in range(16)]
        [native.matmul_panels(x, m, n_out) for m in mats]
        seconds = _best(lambda: [native.matmul_panels(x, m, n_out) for m in mats], repeats)
        best = max(best, 16 * n_out * 4096 * 4 / seconds)
    return best


def _atlas_native():
    """atlas_server.model.native when its kernels are built here, else None."""
    try:
        from atlas_server.model import native
    except ImportError:  # run from outside the repo without Atlas installed
        return None
    return native if native.available() else None


def matvec_bandwidth(
    rows: int = 768, cols: int = 3072 * 4, layers: int = 12, repeats: int = 5
) -> dict[str, float]:
    """Weight-read GB/s of a 124M-sized stack of matrices, by kernel and layout."""
    row_major = [torch.randn(cols, rows) for _ in range(layers)]  # [out, in], as nn.Linear
    in_out = [w.t().contiguous() for w in row_major]  # [in, out], Atlas's stored layout
    x = torch.randn(rows)
    nbytes = sum(w.numel() * 4 for w in row_major)
    mv = _best(lambda: [torch.mv(w, x) for w in row_major], repeats)
    xw = _best(lambda: [x @ w for w in in_out], repeats)
    result = {"torch_mv_row_major_gbs": nbytes / mv / 1e9, "x_at_w_in_out_gbs": nbytes / xw / 1e9}
    native = _atlas_native()
    if native is not None:
        x2, panels = x[None], [native.pack_panels(w) for w in in_out]  # [1, in]
        seconds = _best(lambda: [native.matmul_panels(x2, p, cols) for p in panels], repeats)
        result["atlas_c_panels_gbs"] = nbytes / seconds / 1e9
        del panels
    if _onednn_available():
        packed = [_onednn_linear(w) for w in row_major]
        del row_major, in_out
        x2 = x[None]  # [1, in]
        dnnl = _best(lambda: [m(x2) for m in packed], repeats)
        result["onednn_packed_gbs"] = nbytes / dnnl / 1e9
    return result


def matmul_peak_by_kernel(
    size: int = 2048, repeats: int = 5, device: str = "cpu"
) -> dict[str, float]:
    """FLOP/s of a size^3 matmul per kernel: PyTorch's default, and oneDNN-packed on CPU."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    result = {"default": 2 * size**3 / _best(run, repeats)}
    if device == "cpu" and _onednn_available():
        linear = _onednn_linear(b.t().contiguous())
        linear(a)
        result["onednn"] = 2 * size**3 / _best(lambda: linear(a), repeats)
    return result


def matmul_peak_flops(repeats: int = 5, device: str = "cpu") -> float:
    """Peak matmul FLOP/s: the fastest kernel and size (fp32 on CPU, bf16 on CUDA).

    Two sizes, because one can hit cache-set conflicts: with 2 MB-aligned buffers (PyTorch
    with THP_MEM_ALLOC_ENABLE=1, as Atlas sets it) a 2048^3 oneDNN matmul measured 326
    GFLOP/s in some runs where 3072^3 reached 506. On a GPU, 8192 and 12288: at 2048-3072
    an H100 reached 548-576 bf16 TFLOP/s, about 70% of what it does on large products.
    """
    sizes = (8192, 12288) if device.startswith("cuda") else (2048, 3072)
    return max(max(matmul_peak_by_kernel(size, repeats, device).values()) for size in sizes)


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
    peaks = {
        kernel: max(matmul_peak_by_kernel(size)[kernel] for size in (2048, 3072))
        for kernel in matmul_peak_by_kernel(256)
    }
    result = {
        "machine": machine(),
        "dram_read_gbs": dram_read_bandwidth(gib) / 1e9,
        **matvec_bandwidth(repeats=3 if args.quick else 5),
        "fp32_matmul_gflops": max(peaks.values()) / 1e9,
        **{f"fp32_matmul_gflops_{k}": v / 1e9 for k, v in peaks.items()},
    }
    torch.set_num_threads(1)
    result["fp32_matmul_gflops_1_thread"] = matmul_peak_flops() / 1e9
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
