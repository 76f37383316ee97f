"""Prefill of a prompt's first chunk: causal attention over its own keys against the KV-cache read.

What it does: builds a random model of a preset (fp32 on the CPU, bf16 on CUDA unless
`--dtype`), and times `forward_segments` on one prompt chunk that starts at position 0,
two ways in alternation: with the engine's `kv_length` hint (the chunk sees only itself,
so attention is SDPA's unmasked causal kernel over the fresh keys; flash on a GPU) and
without it (the general path: write the cache, read it back, masked SDPA). The logits of
the two are compared, and the median times and their ratio printed per prompt length.
Run: `python bench/bench_prefill_attention.py [--preset gpt2-124m] [--lengths 128,512,1024] [--out F]`.
What it does not do: decode, scheduling or HTTP (bench_engine.py, bench_serving.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from progress import check_device, check_preset  # noqa: E402

from atlas_server.io import atomic_write_text  # noqa: E402
from atlas_server.model.config import load_preset  # noqa: E402
from atlas_server.model.transformer import Segment, Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--lengths", default="128,512,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths takes comma-separated token counts, not {args.lengths!r}")
    if min(lengths) < 1 or args.repeats < 1:
        parser.error("--lengths and --repeats must be at least 1")
    check_device(parser, args.device)
    check_preset(parser, args.preset)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    model = Transformer(load_preset(args.preset, max_seq_len=max(lengths)))
    model = model.to(device=device, dtype=dtype).prepare_for_inference()
    cache = model.new_cache(1, max(lengths))
    slot = torch.tensor([0], device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} {args.preset} {dtype} on {device}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    def report(rows: list, complete: bool) -> dict:
        head = {"preset": args.preset, "device": str(device), "dtype": str(dtype)}
        return head | {"complete": complete, "rows": rows}

    rows = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (n,), device=device)
        positions = torch.arange(n, device=device)[None]  # [1, n]
        last = torch.tensor([n - 1], device=device)
        ways = {
            "causal, own keys": Segment(0, n, 1, n, slot, positions, kv_length=n),
            "cache read, masked": Segment(0, n, 1, n, slot, positions),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        logits = {}
        with torch.no_grad():
            for name, seg in ways.items():  # warm-up, and the logits to compare
                logits[name] = model.forward_segments(ids, [seg], cache, last).float()
            for _ in range(args.repeats):
                for name, seg in ways.items():
                    sync()
                    t0 = time.perf_counter()
                    model.forward_segments(ids, [seg], cache, last)
                    sync()
                    times[name].append(time.perf_counter() - t0)
        fast, slow = (statistics.median(times[name]) for name in ways)
        diff = (logits["causal, own keys"] - logits["cache read, masked"]).abs().max().item()
        row = {
            "tokens": n,
            "causal_ms": fast * 1e3,
            "masked_ms": slow * 1e3,
            "speedup": slow / fast,
            "max_logit_diff": diff,
        }
        rows.append(row)
        print(
            f"{n:>5} tokens: causal over own keys {fast * 1e3:8.1f} ms, cache read + mask "
            f"{slow * 1e3:8.1f} ms, {slow / fast:.2f}x; max |logit diff| {diff:.2e}",
            flush=True,
        )
        if args.out:  # what is measured survives a run cut short
            atomic_write_text(args.out, json.dumps(report(rows, False), indent=2) + "\n")
    result = report(rows, True)
    print(json.dumps(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
