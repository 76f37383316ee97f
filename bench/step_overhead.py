"""How much of a CPU decode step is not its matrix products, block by block and in one call.

What it does: builds a random-weight model of `--preset` prepared for serving (fp32 on the
CPU, its products through Atlas's C panel kernel), fills `--batch` KV slots with a
16-token prompt, then times decode steps (median of `--steps`) three ways, alternated in
rounds: the whole step block by block (`ATLAS_DECODE_STACK=0`), the same step with every
panel product replaced by a ready-made output of the right shape, and the whole step as
the server runs it, every block in one C call (atlas_server/model/decode_stack.py); and,
in the same rounds, the step's products alone (every panel weight of the model, head
included, called in a loop on inputs of the step's shape). The second is what the
block-by-block step costs besides reading and multiplying the weights: attention, norms,
RoPE, the KV-cache write, the small PyTorch operations and the Python that calls them.
At one row the products run at DRAM speed (bench/ceilings.py), so this remainder is what
a decoder with no interpreter in the loop (llama.cpp) does not pay; the one-call step
over the products alone says how much of it is left.
Run: `python bench/step_overhead.py [--preset llama-124m] [--threads 1] [--batch 1]`.
What it does not do: the engine's scheduling and sampling (bench/bench_engine.py), or a
split of the remainder by operation (bench/profile_step.py, for gpt2-124m).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import machine  # noqa: E402
from progress import Progress, check_fits, check_preset, positive  # noqa: E402

from atlas_server.model import Transformer, load_preset, native  # noqa: E402
from atlas_server.model.transformer import Linear  # noqa: E402

PROMPT = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-124m")
    p.add_argument("--threads", type=positive, default=torch.get_num_threads())
    p.add_argument("--batch", type=positive, default=1, help="rows decoding together")
    p.add_argument("--steps", type=positive, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=positive, default=4, help="alternated rounds")
    args = p.parse_args(argv)
    check_preset(p, args.preset)
    config = load_preset(args.preset)
    if cache_len(args) > config.max_seq_len:
        p.error(
            f"--rounds {args.rounds} x --steps {args.steps} decode past {args.preset}'s"
            f" max_seq_len {config.max_seq_len} (the steps follow each other in one cache)"
        )
    slot_bytes = 2 * config.n_layers * config.kv_heads * config.head_dim * 4 * cache_len(args)
    check_fits(p, args.batch * slot_bytes, f"--batch {args.batch}'s KV cache")
    return args


def cache_len(args: argparse.Namespace) -> int:
    """Positions the run fills: the prompt, then every step of every round (and warm-ups)."""
    return PROMPT + args.rounds * 3 * (args.steps + 1) + 1


class ProductsSkipped:
    """While active, every PanelWeight call returns a cached tensor of its output's shape."""

    def __enter__(self) -> None:
        self.real, outputs = native.PanelWeight.__call__, {}

        def skipped(weight, x, bias=None, gelu_tanh=False):
            shape = x.shape[:-1] + (weight.n_out,)
            if shape not in outputs:
                outputs[shape] = torch.zeros(shape)
            return outputs[shape]

        native.PanelWeight.__call__ = skipped

    def __exit__(self, *exc) -> None:
        native.PanelWeight.__call__ = self.real


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not native.available():
        raise SystemExit("error: needs Atlas's C kernels (a C compiler; see docs/architecture.md)")
    torch.set_num_threads(args.threads)
    progress = Progress(__file__, phases=2)
    progress.phase(f"building {args.preset} (random weights) and filling {args.batch} slot(s)")
    torch.manual_seed(0)
    config = load_preset(args.preset)
    model = Transformer(config).eval().prepare_for_inference()
    cache = model.new_cache(args.batch, cache_len(args))
    slots = torch.arange(args.batch)
    gen = torch.Generator().manual_seed(1)
    position = PROMPT

    def step() -> float:
        nonlocal position
        ids = torch.randint(0, config.vocab_size, (args.batch, 1), generator=gen)
        start = time.perf_counter()
        model(ids, torch.full((args.batch, 1), position), cache, slots, last_only=True)
        position += 1
        return time.perf_counter() - start

    progress.phase(
        f"{args.rounds} alternated rounds of {args.steps} steps, {args.threads} thread(s)"
    )
    weights = [m.packed for m in model.modules() if isinstance(m, Linear)] + [model._packed_head]
    inputs = [(w, torch.randn(args.batch, w.panels.shape[1])) for w in weights if w is not None]

    def products() -> float:
        start = time.perf_counter()
        for weight, x in inputs:
            weight(x)
        return time.perf_counter() - start

    kinds = ("whole_step_ms", "without_products_ms", "one_call_step_ms", "products_alone_ms")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with torch.inference_mode():
        prompt = torch.randint(0, config.vocab_size, (args.batch, PROMPT), generator=gen)
        model(prompt, torch.arange(PROMPT).expand(args.batch, PROMPT), cache, slots)
        for r in range(args.rounds):
            for kind in kinds if r % 2 else kinds[::-1]:
                os.environ["ATLAS_DECODE_STACK"] = "1" if kind == "one_call_step_ms" else "0"
                run = products if kind == "products_alone_ms" else step
                with ProductsSkipped() if kind == "without_products_ms" else nullcontext():
                    run()  # warm-up, also of the cached outputs
                    times[kind] += [1e3 * run() for _ in range(args.steps)]
    progress.done()
    whole, rest, one_call, alone = (statistics.median(times[k]) for k in kinds)
    result = {
        "machine": machine(),
        "preset": args.preset,
        "threads": args.threads,
        "batch": args.batch,
        "cached_positions": f"{PROMPT}-{position}",
        "whole_step_ms": whole,
        "without_products_ms": rest,
        "products_ms": whole - rest,
        "share_not_products": rest / whole,
        "one_call_step_ms": one_call,
        "products_alone_ms": alone,
        "one_call_over_products_alone": one_call / alone,
        "one_call_speedup": whole / one_call,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.preset}, batch {args.batch}, {args.threads} thread(s): step {whole:.2f} ms, "
        f"without its products {rest:.2f} ms ({100 * rest / whole:.0f}%); in one call "
        f"{one_call:.2f} ms ({whole / one_call:.2f}x faster), {one_call / alone:.2f}x its products"
        f" alone ({alone:.2f} ms)"
    )


if __name__ == "__main__":
    main()
