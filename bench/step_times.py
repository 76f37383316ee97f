"""Where an engine step's time goes, in-process: the scheduler's schedule(), the runner's
execute() and the output processor's calls (launch, take_tokens, emit_text; process() in
revisions before the overlap split), timed around each call during a greedy decode.

What it does: builds a random-weight model (default gpt2-124m, fp32), starts an Engine
with the checkout on PYTHONPATH, decodes `--streams` 128-token prompts at once greedily
for `--tokens` tokens each, and prints the median milliseconds per step of each call (the
first two steps left out), and their sum without execute(): the host's own work per step,
which on a GPU is what overlap mode (engine.py) runs while the device computes. Point
PYTHONPATH at two checkouts in turn to compare revisions without HTTP:
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

from progress import check_preset  # noqa: E402

from atlas_server.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import byte_level_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--streams", type=int, default=1, help="prompts decoded at once")
    args = parser.parse_args()
    if args.tokens < 4:
        parser.error("--tokens must be at least 4")
    if not 1 <= args.streams <= 256:
        parser.error("--streams must be in 1..256")
    check_preset(parser, args.preset)
    torch.manual_seed(0)
    model = Transformer(load_preset(args.preset))
    config = EngineConfig(max_running=max(32, args.streams), max_batched_tokens=8192)
    engine = Engine(model, byte_level_tokenizer(), config)
    # Revisions before the overlap split have one output call per step; later ones three.
    output_calls = ("launch", "take_tokens", "emit_text")
    if not hasattr(engine.outputs, "take_tokens"):
        output_calls = ("process",)
    times: dict[str, list[float]] = {name: [] for name in ("schedule", "execute", *output_calls)}

    def timed(name, call):
        def wrapper(*args):
            started = time.perf_counter()
            result = call(*args)
            times[name].append(time.perf_counter() - started)
            return result

        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.execute = timed("execute", engine.runner.execute)
    for name in output_calls:
        setattr(engine.outputs, name, timed(name, getattr(engine.outputs, name)))
    engine.start()

    async def decode(stream: int) -> None:
        params = SamplingParams(
            temperature=0.0, max_tokens=args.tokens, ignore_eos=True, min_tokens=args.tokens
        )
        async for _ in engine.submit([1 + stream % 200, *range(2, 129)], params):
            pass

    async def decode_all() -> None:
        await asyncio.gather(*(decode(i) for i in range(args.streams)))

    try:
        asyncio.run(decode_all())
    finally:
        engine.shutdown()
    print(f"{args.preset}, {args.streams} stream(s), {args.tokens} tokens each")
    host = 0.0
    for name, values in times.items():
        median = 1000 * statistics.median(values[2:])
        host += median if name != "execute" else 0.0
        print(f"{name}: {median:.2f} ms per step (median)")
    print(f"host work besides execute: {host:.2f} ms per step")


if __name__ == "__main__":
    main()
