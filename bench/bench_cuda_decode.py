"""Decode step time of the runners, without HTTP: eager vs the graph runner's eager twin vs
captured CUDA graphs, at several batch sizes, plus the batched sampler's time per step.

What it does: builds a random-weight model (default gpt2-124m) on the device in each
dtype asked, fills `batch` KV slots with 128-token prompts, then times `steps` decode
steps per runner and batch size, each step as the engine does it: `runner.execute(plan)`
then the greedy argmax copied to the host (one device sync per step, as serving has). The
runners: `EagerRunner` (one eager forward), `GraphRunner(cuda_graphs=False)` (the static,
bucketed, padded forward run eagerly) and `GraphRunner` with graphs (one replay). Then the
sampler (`sample_step`) on [batch, V] logits: greedy, and temperature + top-p + penalties
with per-row seeds. Prints JSON: ms per step, tok/s, the graphs' speed-up over eager and
their capture time. On the CPU (`--device cpu`) only the first two runners run.
Run: `python bench/bench_cuda_decode.py --device cuda [--dtype float32 bfloat16]
[--batch 1 16 64 256] [--steps 50] [--out FILE.json]` (about a minute on an H200).
What it does not do: prefill, scheduling or HTTP (bench_serving.py measures the server).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from progress import check_device, check_preset  # noqa: E402

from atlas_server.engine.cuda_runner import GraphRunner  # noqa: E402
from atlas_server.engine.request import Request  # noqa: E402
from atlas_server.engine.runner import EagerRunner  # noqa: E402
from atlas_server.engine.sampling import SamplingRow, sample_step  # noqa: E402
from atlas_server.engine.scheduler import DecodeBatch, PrefillChunk, StepPlan  # noqa: E402
from atlas_server.engine.types import SamplingParams  # noqa: E402
from atlas_server.io import atomic_write_text  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402

PROMPT = 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(runner, batch: int, vocab: int) -> None:
    """Prefill `batch` slots with PROMPT random tokens each, 16 slots per step."""
    generator = torch.Generator().manual_seed(0)
    for first in range(0, batch, 16):
        chunks = []
        for slot in range(first, min(batch, first + 16)):
            tokens = torch.randint(0, vocab, (PROMPT,), generator=generator).tolist()
            request = Request(f"r{slot}", tokens, SamplingParams(), 0.0)
            chunks.append(PrefillChunk(request, slot, 0, tuple(tokens), "none"))
        runner.execute(StepPlan(prefill=chunks))


def time_decode(runner, batch: int, steps: int, device: torch.device) -> float:
    """Seconds per decode step (execute + greedy ids to the host)."""
    tokens = tuple([1] * batch)
    slots = tuple(range(batch))
    elapsed = 0.0
    for step in range(steps + 3):  # 3 warm-up steps
        plan = StepPlan(decode=DecodeBatch((), tokens, (PROMPT + step,) * batch, slots))
        sync(device)
        started = time.perf_counter()
        ids = runner.execute(plan).decode.argmax(-1).tolist()
        if step >= 3:
            elapsed += time.perf_counter() - started
        tokens = tuple(ids)
    return elapsed / steps


def time_sampling(batch: int, vocab: int, steps: int, device: torch.device) -> dict:
    logits = torch.randn(batch, vocab, device=device)
    history = list(range(200))
    cases = {
        "greedy": [SamplingRow(SamplingParams(temperature=0.0), history, history, None)] * batch,
        "top_p_penalties_seeded": [
            SamplingRow(
                SamplingParams(
                    temperature=0.8, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3
                ),
                history,
                history,
                torch.Generator(device=device).manual_seed(i),
            )
            for i in range(batch)
        ],
    }
    out = {}
    for name, rows in cases.items():
        sample_step(logits, rows)  # warm-up
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            sample_step(logits, rows, [None] * batch)
        out[name] = 1000 * (time.perf_counter() - started) / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (then only the eager runners)"
    )
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.steps < 1 or min(args.batch) < 1:
        parser.error("--steps and every --batch must be at least 1")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    check_device(parser, args.device)
    check_preset(parser, args.preset)
    device = torch.device(args.device)
    # "complete" stays False while the file is rewritten after each row.
    results: dict = {"device": str(device), "preset": args.preset, "prompt": PROMPT}
    results |= {"complete": False, "rows": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for dtype_name in args.dtype:
        torch.manual_seed(0)
        config = load_preset(args.preset)
        model = Transformer(config).to(device, getattr(torch, dtype_name))
        slots, max_len = max(args.batch), min(config.max_seq_len, 512)
        runners = {
            "eager": EagerRunner(model, slots, max_len),
            "padded_eager": GraphRunner(model, slots, max_len, cuda_graphs=False),
        }
        if device.type == "cuda":
            started = time.perf_counter()
            runners["graphs"] = GraphRunner(model, slots, max_len, cuda_graphs=True)
            results[f"capture_s_{dtype_name}"] = time.perf_counter() - started
            results[f"graphs_{dtype_name}"] = runners["graphs"].graph_status
        for batch in args.batch:
            row: dict = {"dtype": dtype_name, "batch": batch}
            with torch.inference_mode():
                for name, runner in runners.items():
                    fill(runner, batch, config.vocab_size)
                    seconds = time_decode(runner, batch, args.steps, device)
                    row[f"{name}_ms"] = 1000 * seconds
                    row[f"{name}_tok_s"] = batch / seconds
                row["sampling_ms"] = time_sampling(batch, config.vocab_size, 20, device)
            if "graphs_ms" in row:
                row["graphs_speedup"] = row["eager_ms"] / row["graphs_ms"]
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
            if args.out:  # what is measured survives a run cut short
                atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        del runners, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["complete"] = True
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
