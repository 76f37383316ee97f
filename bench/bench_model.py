"""Batch-1 decode speed of the bare model (no engine) against transformers and the DRAM ceiling.

What it does: builds a random transformers `GPT2LMHeadModel` at the gpt2-124m size (fp32,
seed 0), converts the very same weights into an Atlas `Transformer` with
`atlas_server.hf_import.model_from_hf_tensors` (and checks the logits agree), then times
greedy decode at batch 1 with a KV cache for both: Atlas calls `forward(..., cache, slots,
last_only=True)` one token at a time, transformers calls the model with its KV cache
(`cache`, `past_key_values` in versions before the rename) and `use_cache=True`. Only
decode steps are timed (the prompt's prefill is not); the two alternate step by step, so
both see the same background load, and the median step time is reported (with the mean),
since the machine may be shared.

The ceiling: a batch-1 decode step reads every weight once (the embedding only through the
tied output head), so tokens/s can not exceed DRAM bandwidth / weight bytes per token. The
bandwidth is measured in the same run by `bench/ceilings.py`, as are the weight-read rates
of torch's own `x @ W` matrix-vector kernel, of oneDNN-packed weights and of Atlas's C
panel kernel on a 124M-sized set of matrices. Atlas is timed as served (the panel kernel
where a C compiler is found, else oneDNN-packed weights), with
`prepare_for_inference(pack=False)` (PyTorch's default kernels), to show what the copies buy,
and once more as served but alone, since alternating decoders evict each other's caches. Run:
`python bench/bench_model.py [--quick] [--threads N]`; prints JSON, or markdown with --markdown.
What it does not do: scheduling, sampling or HTTP (see bench_engine.py, bench_serving.py).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# As atlas_server does on import (see its __init__), before torch allocates anything, so
# Atlas and its baselines in this process run with the same allocator setting.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import dram_read_bandwidth, machine, matvec_bandwidth  # noqa: E402

from atlas_server.hf_import import model_from_hf_tensors  # noqa: E402
from atlas_server.model import Transformer  # noqa: E402

GPT2_124M = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}


def build_pair(dims: dict[str, int]):
    """A random GPT2LMHeadModel and an Atlas Transformer holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**dims, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    atlas = model_from_hf_tensors(config.to_dict(), hf.state_dict()).prepare_for_inference()
    return hf, atlas


def max_logit_difference(hf, atlas: Transformer, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf(ids).logits - atlas(ids)).abs().max().item()


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one batch-1 decode step reads: all but the embedding tables' unused rows."""
    cfg = model.config
    n = model.num_parameters(exclude_embeddings=True)
    n += cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0  # the tied head, read in full
    n += 2 * cfg.d_model  # one token row, one position row
    return n * model.tok_emb.weight.element_size()


def atlas_decoder(model: Transformer, prompt: torch.Tensor) -> Iterator[float]:
    """Greedy decode after a prefill of `prompt` ([1, P]); yields each step's seconds."""
    n_prompt = prompt.shape[1]
    cache = model.new_cache(n_slots=1, max_len=model.config.max_seq_len)
    slot = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        logits = model(prompt, torch.arange(n_prompt)[None], cache, slot, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        for pos in range(n_prompt, model.config.max_seq_len):
            start = time.perf_counter()
            logits = model(token, torch.tensor([[pos]]), cache, slot, last_only=True)  # [1, 1, V]
            token = logits[:, -1].argmax(-1, keepdim=True)
            yield time.perf_counter() - start


def hf_decoder(hf, prompt: torch.Tensor) -> Iterator[float]:
    # The KV cache's name, argument and output field alike: `cache` in current transformers,
    # where the old `past_key_values` still works but prints a FutureWarning on every run.
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf(input_ids=prompt, use_cache=True)
        kwargs = {name: out[name], "use_cache": True}
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        while True:
            start = time.perf_counter()
            out = hf(input_ids=token, **kwargs)
            kwargs[name], token = out[name], out.logits[:, -1].argmax(-1, keepdim=True)
            yield time.perf_counter() - start


def step_times(hf, atlas: Transformer, plain: Transformer, prompt: torch.Tensor, steps: int):
    """Per-step seconds of the decoders, alternating step by step so all see the same load."""
    decoders = [atlas_decoder(atlas, prompt), atlas_decoder(plain, prompt), hf_decoder(hf, prompt)]
    times: list[list[float]] = [[], [], []]
    for _ in range(steps):
        for decoder, t in zip(decoders, times, strict=True):
            t.append(next(decoder))
    return times


def run(quick: bool, threads: int | None) -> dict:
    from progress import Progress

    if threads:
        torch.set_num_threads(threads)
    steps = 32 if quick else 128
    progress = Progress(__file__, phases=4)
    progress.phase("building gpt2-124m in transformers and Atlas, checking their logits")
    hf, atlas = build_pair(GPT2_124M)
    prompt = torch.randint(
        0, GPT2_124M["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1)
    )
    diff = max_logit_difference(hf, atlas, prompt)
    progress.phase("measuring the memory bandwidth and the matrix-vector kernels' read rates")
    bandwidth = dram_read_bandwidth(0.5 if quick else 1.0)
    # What torch's own matrix-vector kernel reaches on the [in, out] layout: a practical
    # ceiling below the streaming-read one when the kernel, not DRAM, is the limit.
    kernels = matvec_bandwidth(repeats=3)
    matvec = kernels["x_at_w_in_out_gbs"] * 1e9
    plain = copy.deepcopy(atlas).prepare_for_inference(pack=False)
    progress.phase(f"decoding {steps} steps, Atlas / Atlas unpacked / transformers alternating")
    step_times(hf, atlas, plain, prompt, 4)  # warm-up: allocator, thread pool
    atlas_times, plain_times, hf_times = step_times(hf, atlas, plain, prompt, steps)
    # Atlas once more on its own: alternating decoders evict each other's caches and thread
    # state, which costs the fastest one most.
    progress.phase(f"decoding {steps} steps, Atlas alone")
    alone = atlas_decoder(atlas, prompt)
    alone_times = [next(alone) for _ in range(steps)]
    progress.done()
    per_token = weight_bytes_per_token(atlas)
    # The median step resists the spikes of a shared machine; the mean is reported too.
    atlas_tps, hf_tps = 1 / statistics.median(atlas_times), 1 / statistics.median(hf_times)
    plain_tps = 1 / statistics.median(plain_times)
    ceiling_tps = bandwidth / per_token
    return {
        "machine": machine(),
        "model": "gpt2-124m (random weights, fp32, batch 1, KV cache)",
        "decode_steps": steps,
        "max_abs_logit_diff_vs_transformers": diff,
        "weight_mb_per_token": per_token / 1e6,
        "dram_read_gbs": bandwidth / 1e9,
        "ceiling_tokens_per_s": ceiling_tps,
        "atlas_tokens_per_s": atlas_tps,
        "atlas_unpacked_tokens_per_s": plain_tps,
        "atlas_alone_tokens_per_s": 1 / statistics.median(alone_times),
        "transformers_tokens_per_s": hf_tps,
        "atlas_tokens_per_s_mean": steps / sum(atlas_times),
        "transformers_tokens_per_s_mean": steps / sum(hf_times),
        "atlas_vs_transformers": atlas_tps / hf_tps,
        "atlas_pct_of_dram_ceiling": 100 * atlas_tps / ceiling_tps,
        "matvec_read_gbs": matvec / 1e9,
        "atlas_pct_of_matvec_ceiling": 100 * atlas_tps * per_token / matvec,
        "onednn_matvec_read_gbs": kernels.get("onednn_packed_gbs"),
        "transformers_pct_of_dram_ceiling": 100 * hf_tps / ceiling_tps,
    }


def markdown(r: dict) -> str:
    return "\n".join(
        [
            "| | tokens/s | % of DRAM ceiling |",
            "|---|---|---|",
            f"| Atlas | {r['atlas_tokens_per_s']:.1f} | {r['atlas_pct_of_dram_ceiling']:.0f} |",
            f"| Atlas, run alone (not alternating) | {r['atlas_alone_tokens_per_s']:.1f} "
            f"| {100 * r['atlas_alone_tokens_per_s'] / r['ceiling_tokens_per_s']:.0f} |",
            f"| Atlas, PyTorch's default kernels (pack=False) | {r['atlas_unpacked_tokens_per_s']:.1f} "
            f"| {100 * r['atlas_unpacked_tokens_per_s'] / r['ceiling_tokens_per_s']:.0f} |",
            f"| transformers | {r['transformers_tokens_per_s']:.1f} "
            f"| {r['transformers_pct_of_dram_ceiling']:.0f} |",
            f"| ceiling ({r['dram_read_gbs']:.1f} GB/s / {r['weight_mb_per_token']:.0f} MB) "
            f"| {r['ceiling_tokens_per_s']:.1f} | 100 |",
            f"| torch x @ W matvec ({r['matvec_read_gbs']:.1f} GB/s) "
            f"| {r['matvec_read_gbs'] * 1e3 / r['weight_mb_per_token']:.1f} "
            f"| {100 * r['matvec_read_gbs'] / r['dram_read_gbs']:.0f} |",
            "",
            f"Atlas / transformers: {r['atlas_vs_transformers']:.2f}x; max |logit diff| "
            f"{r['max_abs_logit_diff_vs_transformers']:.1e}; threads {r['machine']['torch_threads']}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 decode steps instead of 128, 0.5 GiB bandwidth buffer",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table too")
    args = parser.parse_args()
    result = run(args.quick, args.threads)
    print(json.dumps(result, indent=2))
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
