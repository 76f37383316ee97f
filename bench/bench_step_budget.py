"""What the per-step token budget (`engine.max_batched_tokens`) trades: stalls against throughput.

Each engine step runs every decoding sequence's next token plus prompt chunks up to the
budget. A large budget prefills new prompts in few steps, which is cheapest in total, but
every running stream waits for the whole step: on 2 CPU cores a 512-token step takes about
half a second, and that is the inter-token latency (ITL) a stream sees while others join.
A small budget cuts that stall and spreads each prompt over more steps.

What it does: builds the GPT-2 124M-shaped random-weight checkpoint of bench_serving.py,
then for each round and each budget starts `atlas serve` with that budget (32 KV slots,
RAG off) and streams 16 concurrent clients of 128 prompt and 64 output tokens (48
requests), then the same 48 requests arriving as a Poisson process at 3 per second. Budgets
alternate within a round, so each sees the same machine state. Prints JSON and a Markdown
table of the means over rounds: output tok/s, TTFT and ITL p50/p99, and each budget's
output tok/s and ITL p99 as a ratio to the default budget's in the same run. With
`--out DIR`, also `step_budget.json` and `step_budget.png` (output tok/s, ITL p99, median
TTFT by budget).
Run: `python bench/bench_step_budget.py [--budgets 128 256 512 1024] [--rounds 2] [--out DIR]`.
What it does not do: compare against other servers (bench_serving.py does), or GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import (  # noqa: E402
    OUTPUT,
    PROMPT,
    build_checkpoint,
    closed_loop,
    free_port,
    poisson_arrivals,
    serve,
    warm_up,
)
from progress import Progress  # noqa: E402

from atlas_server.config import EngineSection  # noqa: E402

CONCURRENCY, REQUESTS = 16, 48
DEFAULT_BUDGET = EngineSection().max_batched_tokens  # what `atlas serve` uses unless told
# Arrivals spread out, so new prompts keep landing in steps that running streams wait on
# (16 closed-loop clients start and finish in waves); about 80% of the server's capacity.
POISSON_RATE = 3.0
MEASURES = {  # loadgen summary key -> column
    "output_throughput": "output tok/s",
    "median_ttft_ms": "TTFT p50 ms",
    "p99_ttft_ms": "TTFT p99 ms",
    "median_itl_ms": "ITL p50 ms",
    "p99_itl_ms": "ITL p99 ms",
}


def measure(checkpoint: Path, budget: int, folder: Path, seed: int) -> dict:
    config = folder / f"budget-{budget}.toml"
    config.write_text(f"[engine]\nmax_batched_tokens = {budget}\n\n[rag]\nenabled = false\n")
    port = free_port()
    server = serve(checkpoint, port, max_running=32, config=config)
    base = f"http://127.0.0.1:{port}"
    try:
        warm_up(base)
        summaries = {
            "16 streams": closed_loop(base, CONCURRENCY, REQUESTS, PROMPT, OUTPUT, seed),
            f"Poisson {POISSON_RATE} req/s": poisson_arrivals(
                base, POISSON_RATE, REQUESTS, PROMPT, OUTPUT, seed
            ),
        }
    finally:
        server.terminate()
        server.wait(60)
    for load, summary in summaries.items():
        if summary["failed"]:
            raise RuntimeError(f"budget {budget}, {load}: {summary['failed']} requests failed")
    return {load: {key: s[key] for key in MEASURES} for load, s in summaries.items()}


def plot(means: dict[int, dict[str, dict]], loads: list[str], path: Path) -> None:
    """Output tok/s, ITL p99 and median TTFT against the budget, one line per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(means)
    keys = ["output_throughput", "p99_itl_ms", "median_ttft_ms"]
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.8), constrained_layout=True)
    for ax, key in zip(axes, keys, strict=True):
        for load in loads:
            ax.plot(budgets, [means[b][load][key] for b in budgets], marker="o", label=load)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("engine.max_batched_tokens")
        ax.set_title(MEASURES[key])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="engine.max_batched_tokens: ITL vs throughput")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write step_budget.json and .png here")
    args = parser.parse_args()
    # The engine needs room for every decoding row (32 slots) plus some prompt each step.
    if min(args.budgets) <= 32 or args.rounds < 1:
        parser.error("every budget must exceed the 32 KV slots, and --rounds must be >= 1")
    if args.out is not None:  # before minutes of measuring, not after
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: {e.strerror or e}")
    runs: dict[int, list[dict]] = {b: [] for b in args.budgets}
    progress = Progress(__file__, phases=1 + args.rounds * len(args.budgets))
    with tempfile.TemporaryDirectory() as tmp:
        progress.phase("building a random-weight gpt2-124m checkpoint")
        checkpoint, model = build_checkpoint(Path(tmp))
        del model
        for round_ in range(args.rounds):
            for budget in args.budgets:
                progress.phase(
                    f"round {round_ + 1}/{args.rounds}, max_batched_tokens {budget}: atlas serve,"
                    f" {CONCURRENCY} streams then Poisson {POISSON_RATE} req/s, {REQUESTS} requests each"
                )
                runs[budget].append(measure(checkpoint, budget, Path(tmp), seed=round_))
                streams = runs[budget][-1]["16 streams"]
                progress.note(
                    f"16 streams: {streams['output_throughput']:.1f} output tok/s,"
                    f" ITL p99 {streams['p99_itl_ms']:.0f} ms"
                )
    loads = list(runs[args.budgets[0]][0])
    means = {
        b: {load: {k: statistics.mean(r[load][k] for r in rs) for k in MEASURES} for load in loads}
        for b, rs in runs.items()
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
        "means": means,
    }
    print(json.dumps(result))
    if args.out:
        (args.out / "step_budget.json").write_text(json.dumps(result, indent=2))
        plot(means, loads, args.out / "step_budget.png")
    # Ratios against the server's default budget when it was measured, else the first one.
    base = DEFAULT_BUDGET if DEFAULT_BUDGET in means else args.budgets[0]
    print(
        "\n| load | max_batched_tokens | " + " | ".join(MEASURES.values())
        + f" | tok/s vs {base} | ITL p99 vs {base} |"
    )  # fmt: skip
    print("|---|---:|" + "---:|" * (len(MEASURES) + 2))
    for load in loads:
        for budget, m in means.items():
            cells = " | ".join(f"{m[load][k]:.1f}" for k in MEASURES)
            ratios = [
                m[load][k] / means[base][load][k] for k in ("output_throughput", "p99_itl_ms")
            ]
            print(f"| {load} | {budget} | {cells} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    progress.done()


if __name__ == "__main__":
    main()
