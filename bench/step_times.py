"""Where an engine step's time goes, in-process: the runner's execute() and the output
processor's calls (launch, take_tokens, emit_text; process() in revisions before the
overlap split), timed around each call during one greedy decode.

What it does: builds a random-weight model (default gpt2-124m, fp32), starts an Engine
with the checkout on PYTHONPATH, decodes one 128-token prompt greedily for `--tokens`
tokens, and prints the median milliseconds per step of each call (the first two steps
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
    # Revisions before the overlap split have one output call per step; later ones three.
    output_calls = ("launch", "take_tokens", "emit_text")
    if not hasattr(engine.outputs, "take_tokens"):
        output_calls = ("process",)
    times: dict[str, list[float]] = {name: [] for name in ("execute", *output_calls)}

    def timed(name, call):
        def wrapper(*args):
            started = time.perf_counter()
            result = call(*args)
            times[name].append(time.perf_counter() - started)
            return result

        return wrapper

    engine.runner.execute = timed("execute", engine.runner.execute)
    for name in output_calls:
        setattr(engine.outputs, name, timed(name, getattr(engine.outputs, name)))
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
