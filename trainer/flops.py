"""FLOP accounting for model FLOPs utilisation (MFU).

What it does: counts training FLOPs per token as 6N + 12*L*C*T (PaLM, appendix B): N is
every parameter that takes part in a matrix multiply (all parameters but the position
table; a tied embedding counts once, as the output projection), and 12*L*C*T is the
attention score and value products for a context of T. It also measures the machine's
peak fp32 matmul rate (or bf16 on CUDA) in a few hundred milliseconds.
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
    device: str = "cpu", size: int | None = None, seconds: float = 1.0
) -> float:
    """Best observed FLOP/s of square matmuls (fp32 on CPU, bf16 on CUDA), fastest kernel.

    Two sizes (size and 1.5 x size; default 2048 on CPU, 8192 on a GPU, where smaller
    products leave an H100 at ~70% of what it reaches): with 2 MB-aligned buffers
    (THP_MEM_ALLOC_ENABLE, which atlas_server sets) a 2048^3 product can hit cache-set
    conflicts and understate the peak.
    """
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    size = size or (8192 if gpu else 2048)
    # Random operands (a GPU draws less power on constant data and runs faster than on real
    # work) from a private generator: measuring must not move the global RNG (exact resume).
    generator = torch.Generator(device=device).manual_seed(0)
    kernels = []  # (function, FLOPs)
    for n in (size, size * 3 // 2):
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        kernels.append((lambda a=a, b=b: a @ b, 2 * n**3))
        if device == "cpu" and packing_supported(b):
            # PyTorch's default fp32 matmul (MKL) runs at under half of oneDNN's rate on AMD
            # CPUs; the peak is what the fastest kernel reaches (see bench/ceilings.py).
            kernels.append(
                (
                    lambda a=a, b=b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""),
                    2 * n**3,
                )
            )
    best = 0.0
    for kernel, flops in kernels:
        deadline = time.perf_counter() + seconds / len(kernels)
        while time.perf_counter() < deadline:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            kernel()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = max(best, flops / (time.perf_counter() - t0))
    return best
