"""One query's MiniLM embedding time under OpenMP's wait policies and thread counts.

What it does: for each OMP_WAIT_POLICY (the default, which spins, and PASSIVE, which
`atlas serve` sets), starts a fresh Python process (the policy is read when PyTorch
loads) that embeds short queries one at a time with 1 and with 2 PyTorch threads,
alternating, and prints p50 and the fastest time of each, with the load average. On a
machine whose CPUs are shared with other work, spinning threads wait on each other at
every parallel region, which is what this shows. What it does not do: search, or
measure batches (bench_ingest.py does).
Run: `python bench/bench_query_embedding.py [--queries 40]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [
    "how do I open a file for reading",
    "parse command line arguments",
    "sort a list of tuples by key",
    "create a temporary directory",
]


def child(n: int) -> None:
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from atlas_server.rag.embedding import Embedder

    embedder = Embedder()
    embedder.encode(QUERIES)  # warm up
    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(n):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            embedder.encode([QUERIES[i % len(QUERIES)]])
            times[threads].append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"backend": embedder.backend, "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40, help="queries per thread count")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.queries)
        return
    print(f"load average at start {os.getloadavg()[0]:.1f}")
    print("| OMP_WAIT_POLICY | threads | p50 ms | fastest ms |\n|---|---|---|---|")
    for policy in ("default (spin)", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "PASSIVE":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--queries", str(args.queries)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        for threads, times in result["times"].items():
            print(f"| {policy} | {threads} | {statistics.median(times):.1f} | {min(times):.1f} |")
    print(f"load average at end {os.getloadavg()[0]:.1f} (embedder backend {result['backend']})")


if __name__ == "__main__":
    main()
