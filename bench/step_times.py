"""Where an engine step's time goes, in-process: the runner's execute() and the output
processor's process(), timed around each call during one greedy decode.

What it does: builds a random-weight model (default gpt2-124m, fp32), starts an Engine
with the checkout on PYTHONPATH, decodes one 128-token prompt greedily for `--tokens`
tokens, and prints the median milliseconds per step of the two calls (the first two steps
left out). Point PYTHONPATH at two checkouts in turn to compare revisions without HTTP:
`PYTHONPATH=/path/to/rev python bench/step_times.py`.
What it does not do: HTTP, batching, or sampling beyond greedy (ab_serving.py,
bench_serving.py, ab_sampling.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

# Last, not first: the checkout on PYTHONPATH (or installed) is the one measured.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from atlas_server.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import byte_level_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    if args.tokens < 4:
        parser.error("--tokens must be at least 4")
    torch.manual_seed(0)
    model = Transformer(load_preset(args.preset))
    engine = Engine(model, byte_level_tokenizer(), EngineConfig(max_running=32))
    times: dict[str, list[float]] = {"execute": [], "process": []}
    execute, process = engine.runner.execute, engine.outputs.process

    def timed_execute(plan):
        started = time.perf_counter()
        result = execute(plan)
        times["execute"].append(time.perf_counter() - started)
        return result

    def timed_process(plan, logits):
        started = time.perf_counter()
        result = process(plan, logits)
        times["process"].append(time.perf_counter() - started)
        return result

    engine.runner.execute, engine.outputs.process = timed_execute, timed_process
    engine.start()

    async def decode() -> None:
        params = SamplingParams(
            temperature=0.0, max_tokens=args.tokens, ignore_eos=True, min_tokens=args.tokens
        )
        async for _ in engine.submit(list(range(1, 129)), params):
            pass

    try:
        asyncio.run(decode())
    finally:
        engine.shutdown()
    for name, values in times.items():
        print(f"{name}: {1000 * statistics.median(values[2:]):.2f} ms per step (median)")


if __name__ == "__main__":
    main()
