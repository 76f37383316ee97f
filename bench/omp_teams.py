"""What a second OpenMP thread team costs the serving engine: a decode step, one team vs two.

What it does: builds the gpt2-124m preset (random weights, fp32, prepared for serving) and
16 KV slots of 128-190 cached positions, then times batch-16 decode steps
(`Transformer.forward_segments`, the engine's call) on a thread of their own, as the
engine runs them, in two cases, each in a fresh process:
- one team: nothing else in the process has run a parallel region (as in `atlas serve`,
  where the model loads on a thread that has ended, and RAG work runs on threads that end
  with each call: atlas_server/compute_threads.py);
- two teams: the main thread ran one PyTorch parallel region first, so its team of
  OpenMP workers outlives it (as a pool thread that ran the embedder once would).
The cases alternate for `--rounds` rounds; it prints JSON and the ratio of the medians.
Run: `python bench/omp_teams.py [--rounds 3] [--steps 32]`.
What it does not do: measure anything but this effect (bench/profile_step.py breaks a
step down; bench/bench_serving.py measures serving).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decode_step_ms(second_team: bool, steps: int) -> float:
    import torch

    from atlas_server.compute_threads import call_in_fresh_thread
    from atlas_server.model import Transformer, load_preset
    from atlas_server.model.transformer import Segment

    torch.set_num_threads(2)

    def build():
        torch.manual_seed(0)
        model = Transformer(load_preset("gpt2-124m")).prepare_for_inference()
        cache = model.new_cache(16, 256)
        with torch.inference_mode():
            for slot in range(16):
                prompt = torch.randint(0, 50000, (1, 128))
                model(prompt, torch.arange(128)[None], cache, torch.tensor([slot]), last_only=True)
        return model, cache

    model, cache = call_in_fresh_thread(build)  # its team ends with the thread
    if second_team:
        torch.ones(2**22).mul_(2.0)  # one parallel region on the main thread: a team for good

    def run() -> list[float]:
        times = []
        for i in range(steps):
            context = 128 + 2 * (i % 32)  # [16, 1] positions 128..190
            step = Segment(0, 16, 16, 1, torch.arange(16), torch.full((16, 1), context),
                           kv_length=context + 1, first_slot=0)  # fmt: skip
            start = time.perf_counter()
            with torch.inference_mode():
                model.forward_segments(
                    torch.randint(0, 50000, (16,)), [step], cache, torch.arange(16)
                )
            times.append(time.perf_counter() - start)
        return times

    call_in_fresh_thread(run)  # warm-up
    return 1e3 * statistics.median(call_in_fresh_thread(run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--case", choices=["one", "two"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if args.case:  # a child process: one measurement
        print(decode_step_ms(args.case == "two", args.steps))
        return
    results: dict[str, list[float]] = {"one": [], "two": []}
    for _ in range(args.rounds):
        for case in results:
            cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[case].append(float(out.split()[-1]))
    one, two = (statistics.median(results[c]) for c in ("one", "two"))
    print(json.dumps({"decode_step_ms": results, "median_one_team": one, "median_two_teams": two}))
    print(f"batch-16 decode step: one team {one:.1f} ms, two teams {two:.1f} ms ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
