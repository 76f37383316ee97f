"""What the OpenMP wait policy costs a decode step when nothing else needs the CPU.

What it does: builds the gpt2-124m preset (random weights, fp32, prepared for serving;
`--quantize int8`: with 8-bit weights) with
16 KV slots of 128-190 cached positions, and times decode steps (`forward_segments`, the
engine's call) of 1 and of 16 rows back to back on a thread of their own, as the engine
runs them, each policy in a fresh process (OpenMP reads the policy when it loads):
- `default`: GNU OpenMP's own (idle workers spin for up to 300,000 rounds, then sleep);
- `PASSIVE`: idle workers sleep at once (what `atlas` sets; atlas_server/cli.py);
- `ACTIVE`: idle workers spin on;
- `spin N` for each `--spin N`: no policy set, GNU OpenMP's spin limit `GOMP_SPINCOUNT=N`
  rounds (a short spin between sleeping at once and the default).
`--busy K` runs K processes that only spin (Python loops) while it measures, to see each
policy on a machine whose cores other work wants, as on a shared host.
Policies alternate for `--rounds` rounds; it prints JSON, the median step times, the
ratios to `default`, and the load average before and after (on a shared machine, other
work decides more than the policy does). Steps run back to back here, so a spinning
worker is always ready for the next parallel region: this is the best case for spinning.
The cost of spinning (a core held while the engine does Python between steps, which the
server's event loop needs) shows in serving: `python bench/ab_serving.py REV REV --env-b
OMP_WAIT_POLICY=PASSIVE` on a revision that sets no policy (before 21c9ecd).
Run: `python bench/omp_wait_policy.py [--rounds 3] [--steps 32] [--spin 10000] [--busy 3]
[--quantize int8]`.
What it does not do: HTTP or sampling (bench_serving.py, ab_serving.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ("default", "PASSIVE", "ACTIVE")


def step_ms(steps: int, quantize: str = "none") -> dict[str, float]:
    """Median ms of a batch-1 and a batch-16 decode step, in this process."""
    import torch

    from atlas_server.compute_threads import call_in_fresh_thread
    from atlas_server.model import Transformer, load_preset
    from atlas_server.model.transformer import Segment

    torch.set_num_threads(min(2, os.cpu_count() or 1))

    def build():
        torch.manual_seed(0)
        model = Transformer(load_preset("gpt2-124m")).prepare_for_inference(quantize=quantize)
        cache = model.new_cache(16, 256)
        with torch.inference_mode():
            for slot in range(16):
                prompt = torch.randint(0, 50000, (1, 128))
                model(prompt, torch.arange(128)[None], cache, torch.tensor([slot]), last_only=True)
        return model, cache

    model, cache = call_in_fresh_thread(build)

    def run(rows: int) -> list[float]:
        times = []
        for i in range(steps):
            context = 128 + 2 * (i % 32)  # [rows, 1] positions 128..190
            step = Segment(0, rows, rows, 1, torch.arange(rows), torch.full((rows, 1), context),
                           kv_length=context + 1, first_slot=0)  # fmt: skip
            start = time.perf_counter()
            with torch.inference_mode():
                model.forward_segments(
                    torch.randint(0, 50000, (rows,)), [step], cache, torch.arange(rows)
                )
            times.append(time.perf_counter() - start)
        return times

    result = {}
    for rows in (1, 16):
        call_in_fresh_thread(run, rows)  # warm-up
        result[f"batch_{rows}"] = 1e3 * statistics.median(call_in_fresh_thread(run, rows))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--spin",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also GOMP_SPINCOUNT=N with no policy set, for each N",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="K",
        help="K spinning processes beside the measurement",
    )
    parser.add_argument(
        "--quantize", choices=["none", "int8"], default="none", help="the weights (int8: 8-bit)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if any(n < 0 for n in args.spin) or args.busy < 0:
        parser.error("--spin and --busy take counts of 0 or more")
    if args.child:  # one measurement, under the policy the parent put in the environment
        print(json.dumps(step_ms(args.steps, args.quantize)))
        return
    candidates = {policy: {"OMP_WAIT_POLICY": policy} for policy in POLICIES}
    candidates["default"] = {}
    candidates |= {f"spin {n}": {"GOMP_SPINCOUNT": str(n)} for n in args.spin}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        load_before = os.getloadavg()
        results: dict[str, dict[str, list[float]]] = {c: {} for c in candidates}
        for _ in range(args.rounds):
            for name, settings in candidates.items():
                env = {k: v for k, v in os.environ.items()
                       if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # fmt: skip
                env |= settings
                cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps),
                       "--quantize", args.quantize]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                for key, ms in json.loads(out.stdout.splitlines()[-1]).items():
                    results[name].setdefault(key, []).append(ms)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    medians = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in results.items()}
    print(json.dumps({"step_ms": results, "median_ms": medians, "busy": args.busy,
                      "load_before": load_before, "load_after": os.getloadavg()}))  # fmt: skip
    print(
        f"{args.busy} busy process(es); load average before {load_before}, after {os.getloadavg()}"
    )
    print("\n| policy | batch-1 step ms | batch-16 step ms | vs default (1 / 16) |")
    print("|---|---:|---:|---:|")
    base = medians["default"]
    for policy, m in medians.items():
        ratios = f"{m['batch_1'] / base['batch_1']:.2f} / {m['batch_16'] / base['batch_16']:.2f}"
        print(f"| {policy} | {m['batch_1']:.1f} | {m['batch_16']:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
