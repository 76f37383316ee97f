"""Overlap mode off and on, alternated in one process: what scheduling ahead of the tokens
buys the engine on a device.

What it does: builds a random-weight model (default gpt2-124m) on `--device`, in its
serving dtype there (bfloat16 on CUDA, float32 on the CPU), starts two engines over it,
`engine.overlap` false and true (each with its own KV cache and, on CUDA, its own decode
graphs), and for each `--streams` count submits that many requests at once: a 16-token
prompt each, `--tokens` output tokens, sampled (temperature 0.8, top-p 0.95, a
repetition penalty and a seed per request, so the sampler does the work a real request
asks of it). Output tokens/s is the requests' tokens over the wall time from submitting
to the last event. Rounds alternate off, on, off, on... so both see the same machine
state; the mean per mode, the on/off ratio, and whether both modes produced the same
tokens are printed as JSON and a Markdown table. (Seeded streams do not depend on their
batch, so they should; in bf16 two runs whose steps batch differently can still part at a
near-tie, which is why the exact check is tests/test_cuda.py's, in fp32.)

Run: `python bench/bench_overlap.py --device cuda [--streams 1 16 64] [--tokens 128]
[--rounds 3] [--out FILE.json]` (under a minute on a GPU; on the CPU overlap has nothing
to overlap, and `--preset gpt2-tiny` keeps it short).
What it does not do: HTTP (bench_serving.py), or compare with other servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from atlas_server.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from atlas_server.engine.runner import resolve_dtype  # noqa: E402
from atlas_server.io import atomic_write_text  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import byte_level_tokenizer  # noqa: E402

PROMPT_TOKENS = 16


def params_for(stream: int, tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.8,
        top_p=0.95,
        repetition_penalty=1.1,
        seed=stream,
        max_tokens=tokens,
        ignore_eos=True,
    )


async def decode(engine: Engine, streams: int, tokens: int) -> tuple[float, list[list[int]]]:
    """All streams at once -> (output tokens/s, each stream's token ids)."""

    async def one(stream: int) -> list[int]:
        prompt = [(7 * stream + i) % 250 + 1 for i in range(PROMPT_TOKENS)]
        return [
            t async for e in engine.submit(prompt, params_for(stream, tokens)) for t in e.token_ids
        ]

    started = time.perf_counter()
    outputs = await asyncio.gather(*(one(s) for s in range(streams)))
    elapsed = time.perf_counter() - started
    return sum(len(o) for o in outputs) / elapsed, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if any(s < 1 for s in args.streams) or args.tokens < 2 or args.rounds < 1:
        parser.error("--streams must be >= 1, --tokens >= 2 and --rounds >= 1")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    from progress import Progress, check_device, check_preset

    check_device(parser, args.device)
    check_preset(parser, args.preset)
    progress = Progress(__file__, phases=2 + len(args.streams))
    progress.phase(f"building {args.preset} on {args.device} and two engines (overlap off, on)")
    dtype = resolve_dtype(args.device, "auto")
    torch.manual_seed(0)
    model = Transformer(load_preset(args.preset)).to(args.device, getattr(torch, dtype))
    max_len = PROMPT_TOKENS + args.tokens
    engines = {}
    for overlap in (False, True):
        config = EngineConfig(
            max_running=max(args.streams),
            max_batched_tokens=max(512, PROMPT_TOKENS * max(args.streams)),
            max_model_len=max_len,
            overlap=overlap,
        )
        engines[overlap] = Engine(model, byte_level_tokenizer(), config).start()
    rows = []

    def report(complete: bool) -> dict:
        return {
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "dtype": dtype,
            "preset": args.preset,
            "prompt_tokens": PROMPT_TOKENS,
            "output_tokens": args.tokens,
            "rounds": args.rounds,
            "backend": engines[True].backend,
            "load_average": os.getloadavg()[0],
            "complete": complete,  # False: the file was written after a row, more were due
            "rows": rows,
        }

    try:
        for overlap in (False, True):  # warm-up: lazy initialisation, allocator pools
            asyncio.run(decode(engines[overlap], 2, min(8, args.tokens)))
        for streams in args.streams:
            progress.phase(f"{streams} stream(s): {args.rounds} alternated round(s) per mode")
            rates: dict[bool, list[float]] = {False: [], True: []}
            same = True
            for _ in range(args.rounds):
                outputs = {}
                for overlap in (False, True):
                    rate, outputs[overlap] = asyncio.run(
                        decode(engines[overlap], streams, args.tokens)
                    )
                    rates[overlap].append(rate)
                same = same and outputs[False] == outputs[True]
            off, on = statistics.mean(rates[False]), statistics.mean(rates[True])
            rows.append(
                {
                    "streams": streams,
                    "off_tok_s": [round(r, 1) for r in rates[False]],
                    "on_tok_s": [round(r, 1) for r in rates[True]],
                    "on_over_off": round(on / off, 3),
                    "same_tokens": same,
                }
            )
            progress.note(f"{streams} stream(s): off {off:.1f}, on {on:.1f} tok/s")
            if args.out is not None:  # what is measured survives a run cut short
                atomic_write_text(args.out, json.dumps(report(False), indent=2) + "\n")
    finally:
        for engine in engines.values():
            engine.shutdown()
    progress.phase("done")
    text = json.dumps(report(True), indent=2)
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
    print("\n| streams | overlap off tok/s | on tok/s | on / off | same tokens |")
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['streams']} | {statistics.mean(r['off_tok_s']):.1f} | "
            f"{statistics.mean(r['on_tok_s']):.1f} | {r['on_over_off']:.3f} | {r['same_tokens']} |"
        )


if __name__ == "__main__":
    main()
