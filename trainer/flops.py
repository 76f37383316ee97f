"""FLOP accounting for model FLOPs utilisation (MFU).

What it does: counts training FLOPs per token as 6N + 12*L*C*T (PaLM, appendix B): N is
every parameter that takes part in a matrix multiply (all parameters but the position
table; a tied embedding counts once, as the output projection), and 12*L*C*T is the
attention score and value products for a context of T. It also measures the machine's
peak matmul rate in the run's precision (fp32, or bf16 on CUDA, by default) in about a
second.
What it does not do: decide what "good" is; benchmarks compare against this peak.
"""

from __future__ import annotations

import time

import torch

from atlas_server.model import ModelConfig
from atlas_server.model.onednn import packing_supported


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    matmul_params = n_params - (
        config.max_seq_len * config.d_model if config.pos_encoding == "learned" else 0
    )
    return 6.0 * matmul_params + 12.0 * config.n_layers * config.d_model * seq_len


def measured_matmul_peak(
    device: str = "cpu",
    size: int | None = None,
    seconds: float = 1.0,
    dtype: torch.dtype | None = None,
) -> float:
    """Best observed FLOP/s of square matmuls in `dtype` (default fp32 on CPU, bf16 on CUDA:
    pass the precision the run multiplies in, e.g. bf16 for bf16 autocast on a CPU that has
    AVX512-BF16 or AMX, where an fp32 peak put MFU over 100%), fastest kernel, in about
    `seconds`.

    Two sizes, n and 1.5 n: with 2 MB-aligned buffers (THP_MEM_ALLOC_ENABLE, which
    atlas_server sets) a 2048^3 product can hit cache-set conflicts and understate the peak.
    n is `size`, or 8192 on a GPU (smaller products leave an H100 at ~70% of what it
    reaches); on a CPU, the largest of 2048, 1024, 512, ... whose 1.5 n product fits its
    share of the time: one 3072^3 product takes over a second on one thread (a run with
    run.threads=1), and every kernel runs at least once, so a fixed 2048 overran a second's
    budget fourfold. A single thread is at its peak long before 1024.
    """
    gpu = device.startswith("cuda")
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    # Random operands (a GPU draws less power on constant data and runs faster than on real
    # work) from a private generator: measuring must not move the global RNG (exact resume).
    generator = torch.Generator(device=device).manual_seed(0)

    def kernels(n: int) -> list:
        """The products of two n x n operands: the default matmul, and oneDNN's on a CPU."""
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        found = [lambda: a @ b]
        if device == "cpu" and packing_supported(b):
            # PyTorch's default fp32 matmul (MKL) runs at under half of oneDNN's rate on AMD
            # CPUs; the peak is what the fastest kernel reaches (see bench/ceilings.py).
            found.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        return found

    def rate(kernel, flops: float, budget: float) -> float:
        """Best FLOP/s of `kernel` over `budget` seconds (one run at least)."""
        best, deadline = 0.0, time.perf_counter() + budget
        while True:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            kernel()
            if gpu:
                torch.cuda.synchronize()
            best = max(best, flops / (time.perf_counter() - t0))
            if time.perf_counter() >= deadline:
                return best

    n = size or (8192 if gpu else 2048)
    if size is None and not gpu:
        probe = kernels(512)
        fast = max(rate(k, 2 * 512**3, 0.0) for k in probe)  # FLOP/s, one product each
        share = seconds / (2 * len(probe))  # per kernel and size
        while n > 512 and 2 * (n * 3 // 2) ** 3 / fast > share:
            n //= 2
    best = 0.0
    for m in (n, n * 3 // 2):
        found = kernels(m)
        for kernel in found:
            best = max(best, rate(kernel, 2 * m**3, seconds / (2 * len(found))))
    return best
