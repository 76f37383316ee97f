"""The token loader at OpenWebText's scale: a batch and the window table, against the old way.

What it does: builds the window table of 9B tokens in 90 shards of 100M (8.8M windows of
1024) with `trainer.loader.window_table` and with the list of (shard, offset) tuples the
loader once built (time and peak memory, tracemalloc), and times `TokenLoader.next_batch(8)`
over an 8.8M-window table against drawing the epoch's permutation for every call, as it
once did. Both in the same run; prints the ratios. Synthetic shards (two of 200k random
tokens, written to a temporary folder): only the table's size matters here.
Run: `python bench/bench_loader.py`. What it does not do: time a training step
(bench_train.py) or read real data.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.data import write_shard  # noqa: E402
from trainer.loader import TokenLoader, window_table  # noqa: E402

LENGTHS = [100_000_000] * 90  # 9B tokens
SEQ = 1024
WINDOWS = 8_800_000


def list_of_tuples_table(lengths: list[int], seq_len: int) -> np.ndarray:
    """The loader's former table: a Python list of (shard, offset) tuples, then an array."""
    window = seq_len + 1
    starts = [(i, o) for i, n in enumerate(lengths) for o in range(0, n - window + 1, seq_len)]
    return np.array(starts, dtype=np.int64)


def timed(fn, *args) -> tuple[float, float]:
    """(seconds, peak GB traced) of fn(*args), each measured on its own call."""
    start = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1] / 1e9
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M")}
    new_s, new_gb = timed(window_table, LENGTHS, SEQ)
    old_s, old_gb = timed(list_of_tuples_table, LENGTHS, SEQ)
    results["window_table"] = {
        "windows": len(window_table(LENGTHS, SEQ)),
        "numpy_s": round(new_s, 3), "numpy_peak_gb": round(new_gb, 2),
        "list_of_tuples_s": round(old_s, 2), "list_of_tuples_peak_gb": round(old_gb, 2),
        "speedup": round(old_s / new_s, 1),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        shards = []
        for i in range(2):
            tokens = rng.integers(0, 50_000, 200_000).astype(np.uint16)
            write_shard(folder / f"train_{i}.bin", tokens)
            shards.append({"file": f"train_{i}.bin", "tokens": len(tokens)})
        (folder / "manifest.json").write_text(json.dumps({"train": shards, "val": shards}))
        loader = TokenLoader(folder, "train", SEQ, seed=1337)
        loader.windows = np.zeros((WINDOWS, 2), dtype=np.int64)  # only its size matters
        loader.next_batch(8)  # the epoch's permutation, once
        start = time.perf_counter()
        for _ in range(20):
            loader.next_batch(8)
        cached_ms = (time.perf_counter() - start) / 20 * 1e3
        start = time.perf_counter()
        for _ in range(5):  # what every call paid before: the permutation, then the batch
            np.random.default_rng([1337, 0]).permutation(WINDOWS)
            loader.next_batch(8)
        per_call_ms = (time.perf_counter() - start) / 5 * 1e3
    results["next_batch_8"] = {
        "windows": WINDOWS,
        "permutation_once_per_epoch_ms": round(cached_ms, 3),
        "permutation_every_call_ms": round(per_call_ms, 1),
        "speedup": round(per_call_ms / cached_ms),
        "host_s_per_step_at_grad_accum_64_before": round(per_call_ms * 64 / 1e3, 1),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
