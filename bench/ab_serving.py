"""A/B two revisions of Atlas's server on the same machine, alternating, same load.

What it does: checks out each git revision into a temporary worktree, then for each round
starts `atlas serve` from revision A, then from revision B (the revision's code comes first
on PYTHONPATH), on the same random-weight gpt2-124m checkpoint, and runs the load
generator at each concurrency: 128 prompt and 64 output tokens, unless `--prompt-tokens`
and `--output-tokens` say otherwise (bench_serving.py's decode-bound workload is 16 and
128). Alternating rounds puts both builds under the same machine state, which on a shared
or virtual machine drifts by more than the differences being measured. Prints every round
and the mean output tokens/s per build and concurrency, with the B/A ratio.
`--env-a` / `--env-b KEY=VALUE` (repeatable) set environment variables for one side's
server only, so one revision can be compared with itself under two settings, e.g.
`python bench/ab_serving.py HEAD HEAD --env-b OMP_WAIT_POLICY=ACTIVE` or `--env-b
ATLAS_NATIVE=0`. The machine's load average is printed before and after: on a shared
machine it says how far to trust small differences.
Run: `python bench/ab_serving.py REV_A REV_B [--concurrency 4 16] [--rounds 2]
[--prompt-tokens 128] [--output-tokens 64] [--env-a K=V ...] [--env-b K=V ...]`.
What it does not do: compare against other servers (bench_serving.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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
    serve,
    warm_up,
)
from progress import Progress  # noqa: E402


def _parse_env(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--env-a/--env-b take KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _label(env: dict[str, str]) -> str:
    return "".join(f" {k}={v}" for k, v in env.items())


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set, restored after (the server copies it at start)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT)
    parser.add_argument("--output-tokens", type=int, default=OUTPUT)
    for side in "ab":
        parser.add_argument(f"--env-{side}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"an environment variable for side {side.upper()}'s server")  # fmt: skip
    args = parser.parse_args()
    envs = {"A": _parse_env(parser, args.env_a), "B": _parse_env(parser, args.env_b)}
    if min(args.concurrency) < 1 or args.rounds < 1 or args.prompt_tokens < 1:
        parser.error("--concurrency, --rounds and --prompt-tokens must be at least 1")
    if args.output_tokens < 2:
        parser.error("--output-tokens must be at least 2")
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict[tuple[str, int], list[float]] = {}
    progress = Progress(__file__, phases=1 + 2 * args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        progress.phase("building a random-weight gpt2-124m checkpoint and the two worktrees")
        checkpoint, _ = build_checkpoint(Path(tmp))
        # Keyed by side, not by revision: the same revision twice is an A/A run, which
        # measures the noise.
        trees = {"A": (args.rev_a, Path(tmp) / "tree-a"), "B": (args.rev_b, Path(tmp) / "tree-b")}
        for rev, tree in trees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev],
                check=True,
            )
        try:
            for round_ in range(args.rounds):
                for side, (rev, tree) in trees.items():
                    os.environ["PYTHONPATH"] = str(tree)  # the served code is this revision's
                    progress.phase(f"round {round_ + 1}/{args.rounds}, {side} = {rev}: atlas serve,"
                                   f" concurrency {' '.join(map(str, args.concurrency))}")  # fmt: skip
                    port = free_port()
                    with _environment(envs[side]):
                        server = serve(checkpoint, port, max_running=32)
                    base = f"http://127.0.0.1:{port}"
                    try:
                        warm_up(base)
                        for c in args.concurrency:
                            summary = closed_loop(base, c, 3 * c, args.prompt_tokens,
                                                  args.output_tokens, seed=c)  # fmt: skip
                            if summary["completed"] < 3 * c:
                                raise SystemExit(f"error: {rev} at concurrency {c}: only "
                                                 f"{summary['completed']} of {3 * c} requests completed")  # fmt: skip
                            results.setdefault((side, c), []).append(summary["output_throughput"])
                            print(f"round {round_} {side} {rev}{_label(envs[side])} c{c}: "
                                  f"{summary['output_throughput']:.1f} tok/s", flush=True)  # fmt: skip
                    finally:
                        server.terminate()
                        server.wait(60)
        finally:
            os.environ.pop("PYTHONPATH", None)
            for _, tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])
    print(f"load average after: {os.getloadavg()}")
    print(f"A: {args.rev_a}{_label(envs['A'])}; B: {args.rev_b}{_label(envs['B'])}")
    print("\n| concurrency | A tok/s (mean) | B tok/s (mean) | B / A |\n|---|---:|---:|---:|")
    for c in args.concurrency:
        a, b = (statistics.mean(results[(side, c)]) for side in "AB")
        print(f"| {c} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    progress.done()


if __name__ == "__main__":
    main()
