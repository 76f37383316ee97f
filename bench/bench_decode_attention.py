"""Decode attention on the CPU: Atlas's C kernel against PyTorch's SDPA and the DRAM ceiling.

What it does: for each batch size (default 1, 8, 16) and cached length (default 64, 256,
1024), one query token per row attends over its row's cached keys and values, with the
shapes of llama-124m (12 query heads over 4 key/value heads of 64 dims; `--heads`,
`--kv-heads`, `--head-dim` change them). The cache is copied enough times that the copies
cannot stay in the last-level cache (in a decode step the weights evict it, so the cache
comes from DRAM), and each call reads the next copy. Two ways, alternated in rounds,
median kept: `native.decode_attention` (what a decode step runs in fp32) and
`F.scaled_dot_product_attention` over the same rows (a view of the consecutive slots, no
mask since every row has the same length: SDPA's best case; a serving batch has ragged
rows and needs a mask). Their outputs are compared once per case. The DRAM read ceiling
is measured in the same run (bench/ceilings.py) at the same thread count; the table gives
each way's key/value read rate and the kernel's share of that ceiling.
Run: `python bench/bench_decode_attention.py [--rows 1 8] [--lengths 256 1024] [--threads 1]`.
What it does not do: the cache write, the projections, or a whole step (bench/profile_step.py,
bench/bench_engine.py), or any device but the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import dram_read_bandwidth, machine  # noqa: E402
from progress import Progress, check_fits, positive  # noqa: E402

from atlas_server.model import native  # noqa: E402

COPY_BYTES = 96 * 2**20  # three times a 32 MB last-level cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=positive, nargs="+", default=[1, 8, 16], help="batch sizes")
    p.add_argument("--lengths", type=positive, nargs="+", default=[64, 256, 1024])
    p.add_argument("--heads", type=positive, default=12)
    p.add_argument("--kv-heads", type=positive, default=4)
    p.add_argument("--head-dim", type=positive, default=64)
    p.add_argument("--threads", type=positive, default=torch.get_num_threads())
    p.add_argument("--rounds", type=positive, default=5, help="alternated rounds per case")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim > 256:
        p.error("--head-dim above 256 is not served by the C kernel")
    largest = 2 * max(args.rows) * args.kv_heads * max(args.lengths) * args.head_dim * 4
    check_fits(p, max(largest, COPY_BYTES), "the largest case's key/value cache")
    return args


def time_calls(calls: list, reps: int = 3) -> float:
    """Seconds per call of the list, each call once per pass, after a warm-up pass."""
    for call in calls:
        call()
    start = time.perf_counter()
    for _ in range(reps):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (reps * len(calls))


def case(args: argparse.Namespace, rows: int, length: int, gen: torch.Generator) -> dict:
    H, K, D = args.heads, args.kv_heads, args.head_dim
    kv_bytes = 2 * rows * K * length * D * 4  # what one call reads
    copies = max(1, -(-COPY_BYTES // kv_bytes))
    caches = [
        (
            torch.randn(rows, K, length, D, generator=gen),
            torch.randn(rows, K, length, D, generator=gen),
        )
        for _ in range(copies)
    ]  # [slots, K, len, D] each
    q = torch.randn(rows, H, D, generator=gen)  # [B, H, D]
    slots, lengths = torch.arange(rows), torch.full((rows,), length)
    scale = D**-0.5

    def atlas(k, v):
        return native.decode_attention(q, k, v, slots, lengths, scale)  # [B, H, D]

    def sdpa(k, v):
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]

    kinds = {
        "atlas_c": [lambda k=k, v=v: atlas(k, v) for k, v in caches],
        "pytorch_sdpa": [lambda k=k, v=v: sdpa(k, v) for k, v in caches],
    }
    with torch.inference_mode():
        k, v = caches[0]
        torch.testing.assert_close(atlas(k, v), sdpa(k, v), atol=2e-5, rtol=1e-4)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for r in range(args.rounds):
            for kind in list(kinds) if r % 2 else list(kinds)[::-1]:
                times[kind].append(time_calls(kinds[kind]))
    result = {"rows": rows, "length": length, "kv_bytes_per_call": kv_bytes}
    for kind, t in times.items():
        seconds = statistics.median(t)
        result[f"{kind}_us"] = seconds * 1e6
        result[f"{kind}_gbs"] = kv_bytes / seconds / 1e9
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not native.available():
        raise SystemExit("error: needs Atlas's C kernels (a C compiler; see docs/architecture.md)")
    torch.set_num_threads(args.threads)
    cases = [(b, n) for b in args.rows for n in args.lengths]
    progress = Progress(__file__, phases=1 + len(cases))
    progress.phase(f"DRAM read ceiling at {args.threads} thread(s)")
    ceiling = dram_read_bandwidth()
    result = {
        "machine": machine(),
        "threads": args.threads,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "dram_read_gbs": ceiling / 1e9,
        "date": time.strftime("%Y-%m-%d"),
        "cases": [],
    }
    gen = torch.Generator().manual_seed(0)
    for rows, length in cases:
        progress.phase(f"batch {rows}, {length} cached positions")
        result["cases"].append(case(args, rows, length, gen))
    progress.done()
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.heads} heads over {args.kv_heads} kv heads of {args.head_dim} dims, "
        f"{args.threads} thread(s); DRAM read ceiling {result['dram_read_gbs']:.1f} GB/s "
        "(same run)\n"
    )
    print("| batch | positions | Atlas C us (GB/s, % of DRAM) | SDPA us (GB/s) | C / SDPA speed |")
    print("|---:|---:|---:|---:|---:|")
    for c in result["cases"]:
        share = 100 * c["atlas_c_gbs"] / result["dram_read_gbs"]
        print(
            f"| {c['rows']} | {c['length']} | {c['atlas_c_us']:.0f} ({c['atlas_c_gbs']:.1f}, "
            f"{share:.0f}%) | {c['pytorch_sdpa_us']:.0f} ({c['pytorch_sdpa_gbs']:.1f}) | "
            f"{c['pytorch_sdpa_us'] / c['atlas_c_us']:.2f}x |"
        )


if __name__ == "__main__":
    main()
