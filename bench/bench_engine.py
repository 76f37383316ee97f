"""Decode throughput of the Atlas engine vs Hugging Face transformers `generate`, same weights.

What it does: builds one random-weight model from a preset (default gpt2-124m, fp32),
copies its weights into a transformers GPT2LMHeadModel, then measures greedy decode
tokens/s at batch 1 and at batch 16 (16 concurrent requests through `Engine.submit`)
for both, in the same process, and prints JSON plus a markdown table with the ratios
and the share of the machine's ceilings reached: DRAM streaming-read bandwidth (a batch-1
decode step must read every weight once) and fp32 matmul FLOP/s.

Decode rate excludes the prompt: for transformers it is (t(N tokens) - t(1 token)) over
the N - 1 later tokens; for Atlas, the time from a request's first token to its last,
from the engine's own event timestamps. What it does not do: HTTP (see the API's own
benchmark), sampling cost (greedy only), or prompts longer than a few dozen tokens.

Run:  .venv/bin/python bench/bench_engine.py --quick      (about a minute)
      .venv/bin/python bench/bench_engine.py              (longer generations)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from atlas_server.compute_threads import call_in_fresh_thread  # noqa: E402
from atlas_server.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from atlas_server.hf_export import to_transformers  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import byte_level_tokenizer  # noqa: E402


# --- ceilings ----------------------------------------------------------------------------
def ceilings() -> dict[str, float]:
    """DRAM read bandwidth and fp32 matmul peak, measured now by bench/ceilings.py."""
    from ceilings import dram_read_bandwidth, matmul_peak_flops

    return {"dram_bytes_per_s": dram_read_bandwidth(), "matmul_flops": matmul_peak_flops()}


# --- models ------------------------------------------------------------------------------
def build_models(preset: str, vocab_size: int):
    torch.manual_seed(0)
    atlas = Transformer(load_preset(preset, vocab_size=vocab_size)).prepare_for_inference()
    return atlas, hf_from_atlas(atlas)


def hf_from_atlas(atlas: Transformer):
    """The `transformers` model holding the same weights (the export's own name map)."""
    return to_transformers(atlas)


def check_same_logits(atlas: Transformer, hf, prompt: list[int]) -> float:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        return float((atlas(ids) - hf(ids).logits).abs().max())


# --- measurements --------------------------------------------------------------------------
def hf_decode_rate(hf, prompts: torch.Tensor, new_tokens: int) -> float:
    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    t1, tn = timed(1), timed(new_tokens)
    return prompts.shape[0] * (new_tokens - 1) / (tn - t1)


def atlas_decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    async def one(prompt):
        first = last = None
        async for event in engine.submit(prompt, params):
            first = first or event.first_token_time
            last = event.time
        return first, last

    async def all_requests():
        return await asyncio.gather(*(one(p) for p in prompts))

    spans = asyncio.run(all_requests())
    # All prompts fit one step's token budget, so every request gets its first token in
    # the same step and then decodes in lockstep: N - 1 more tokens each.
    start = max(first for first, _ in spans)
    end = max(last for _, last in spans)
    return len(prompts) * (new_tokens - 1) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (about a minute)")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per measurement (best kept)"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    from progress import Progress, check_preset

    check_preset(parser, args.preset)
    torch.set_num_threads(args.threads)
    new_tokens = 32 if args.quick else 128
    args.repeats = args.repeats or (2 if args.quick else 3)
    progress = Progress(__file__, phases=4)
    progress.phase(f"building {args.preset} for Atlas and transformers, checking their logits")
    tokenizer = byte_level_tokenizer()
    vocab = load_preset(args.preset).vocab_size
    # Every PyTorch job of this process runs on a thread that ends with it, and the engine
    # (its thread) lives only while it is measured, as `atlas serve` keeps one compute
    # thread: a second live thread that had run PyTorch would keep a second OpenMP team
    # and slow whichever side is measured (atlas_server/compute_threads.py,
    # bench/omp_teams.py).
    atlas, hf = call_in_fresh_thread(build_models, args.preset, vocab)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, tokenizer.vocab_size, (16, args.prompt_tokens), generator=gen)
    max_abs_diff = call_in_fresh_thread(check_same_logits, atlas, hf, prompts[0].tolist())
    config = EngineConfig(
        max_running=16, max_batched_tokens=512, max_model_len=args.prompt_tokens + new_tokens
    )

    def atlas_rate(batch: int, n: int) -> float:
        engine = call_in_fresh_thread(lambda: Engine(atlas, tokenizer, config).start())
        try:
            return atlas_decode_rate(engine, prompts[:batch].tolist(), n)
        finally:
            engine.shutdown()

    def hf_rate(batch: int, n: int) -> float:
        return call_in_fresh_thread(hf_decode_rate, hf, prompts[:batch], n)

    results = {}
    for batch in (1, 16):
        progress.phase(
            f"batch {batch}: {args.repeats} alternated repeat(s) of {new_tokens} tokens each side"
        )
        hf_rate(batch, 4)  # warm-up both
        atlas_rate(batch, 4)
        # Interleaved repeats, best of each: the machine may be shared, and the best run is
        # the one least disturbed by other work.
        hf_rates, atlas_rates = [], []
        for _ in range(args.repeats):
            hf_rates.append(hf_rate(batch, new_tokens))
            atlas_rates.append(atlas_rate(batch, new_tokens))
        results[f"batch_{batch}"] = {
            "atlas_tok_s": round(max(atlas_rates), 1),
            "transformers_tok_s": round(max(hf_rates), 1),
            "ratio": round(max(atlas_rates) / max(hf_rates), 2),
        }

    progress.phase("measuring the ceilings (memory bandwidth, matmul peak)")
    limits = ceilings()
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in atlas.named_parameters() if "emb" not in n
    )
    head_bytes = atlas.output_weight().numel() * 4  # the tied head copy read every step
    bytes_per_step = weight_bytes + head_bytes
    ceiling_tok_s = limits["dram_bytes_per_s"] / bytes_per_step
    flops_per_token = (
        2 * atlas.num_parameters(exclude_embeddings=True) + 2 * atlas.output_weight().numel()
    )
    for batch in (1, 16):
        r = results[f"batch_{batch}"]
        # One decode step reads the weights once for the whole batch: compare steps/s.
        r["pct_dram_ceiling"] = round(100 * r["atlas_tok_s"] / batch / ceiling_tok_s, 1)
        r["pct_matmul_peak"] = round(
            100 * r["atlas_tok_s"] * flops_per_token / limits["matmul_flops"], 1
        )
    report = {
        "preset": args.preset,
        "dtype": "float32",
        "threads": args.threads,
        "new_tokens": new_tokens,
        "repeats_best_of": args.repeats,
        "prompt_tokens": args.prompt_tokens,
        "max_abs_logit_diff_vs_transformers": max_abs_diff,
        "dram_read_GB_s": round(limits["dram_bytes_per_s"] / 1e9, 1),
        "matmul_GFLOP_s": round(limits["matmul_flops"] / 1e9, 1),
        "bytes_read_per_decode_step_MB": round(bytes_per_step / 1e6, 1),
        "batch1_dram_ceiling_tok_s": round(ceiling_tok_s, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}",
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print()
    print(
        "| batch | Atlas tok/s | transformers tok/s | ratio | % DRAM ceiling (steps/s) | % matmul peak |"
    )
    print("|---|---|---|---|---|---|")
    for batch in (1, 16):
        r = results[f"batch_{batch}"]
        print(
            f"| {batch} | {r['atlas_tok_s']} | {r['transformers_tok_s']} | {r['ratio']}x "
            f"| {r['pct_dram_ceiling']} | {r['pct_matmul_peak']} |"
        )
    progress.done()


if __name__ == "__main__":
    main()
