"""A/B the sampler of two git revisions on the same logits, alternating, in one process.

What it does: loads `atlas_server/engine/sampling.py` as it is at revision A and at
revision B (`git show REV:path`, imported under separate names against this checkout's
`atlas_server.engine.types`), then for each case (greedy; temperature + top-p; the same
with repetition / frequency / presence penalties over a 300-token history; seeded rows)
and batch size, times `sample()` plus the copy of the ids to the host (what a step pays),
alternating A and B `--rounds` times, and prints the median ms per call of each, the B/A
ratio, and whether both picked the same tokens (with the global generator reset to the same seed, every case should). Logits are
[batch, 50257] float32, GPT-2's vocabulary.
Run: `python bench/ab_sampling.py REV_A REV_B [--device cpu] [--batch 1 16 64] [--rounds 5]`.
What it does not do: time the forward or HTTP (ab_serving.py), or check distributions
(tests/test_sampling.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progress import check_device  # noqa: E402

from atlas_server.engine.types import SamplingParams  # noqa: E402

VOCAB = 50257
PATH = "atlas_server/engine/sampling.py"


def load_revision(rev: str, tag: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{PATH}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Relative imports (`from .types import ...`) resolve against this checkout's package.
    name = f"atlas_server.engine._sampling_{tag}"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


CASES = {
    "greedy": dict(temperature=0.0),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_p_penalties": dict(
        temperature=0.8,
        top_p=0.9,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
        presence_penalty=0.2,
    ),  # fmt: skip
    "seeded_top_k": dict(temperature=1.0, top_k=40),
}


def rows_for(module, case: str, batch: int, device: torch.device):
    history = list(range(0, 6000, 20))  # 300 distinct ids
    seeded = case.startswith("seeded")
    return [
        module.SamplingRow(
            SamplingParams(**CASES[case]),
            history[:200],
            history[200:],
            torch.Generator(device=device).manual_seed(i) if seeded else None,
        )
        for i in range(batch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="A/B two revisions' samplers")
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1 or min(args.batch) < 1:
        parser.error("--rounds, --calls and every --batch must be at least 1")
    check_device(parser, args.device)
    device = torch.device(args.device)
    modules = {"A": load_revision(args.rev_a, "a"), "B": load_revision(args.rev_b, "b")}
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    results = []
    for batch in args.batch:
        logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
        logits = logits.to(device)
        for case in CASES:
            times: dict[str, list[float]] = {"A": [], "B": []}
            picked: dict[str, list[int]] = {}
            for _ in range(args.rounds):
                for side, module in modules.items():
                    rows = rows_for(module, case, batch, device)
                    module.sample(logits, rows).tolist()  # warm-up
                    rows = rows_for(module, case, batch, device)  # fresh seeded streams
                    torch.manual_seed(0)  # and the same global stream for unseeded rows
                    started = time.perf_counter()
                    for call in range(args.calls):
                        ids = module.sample(logits, rows).tolist()
                        if call == 0:
                            picked[side] = ids
                    times[side].append((time.perf_counter() - started) / args.calls)
            a, b = statistics.median(times["A"]), statistics.median(times["B"])
            row = {
                "batch": batch,
                "case": case,
                "a_ms": 1000 * a,
                "b_ms": 1000 * b,
                "b_over_a": b / a,
                "same_tokens": picked["A"] == picked["B"],
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print(json.dumps({"rev_a": args.rev_a, "rev_b": args.rev_b, "device": str(device),
                      "rows": results}, indent=2))  # fmt: skip
    print("\n| batch | case | A ms | B ms | B/A | same tokens |")
    print("|---|---|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['batch']} | {r['case']} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | "
            f"{r['b_over_a']:.2f}x | {r['same_tokens']} |"
        )


if __name__ == "__main__":
    main()
