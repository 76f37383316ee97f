"""Serving benchmark: `atlas serve` over HTTP vs Hugging Face `transformers` generate.

What it does, in one run on one machine:
1. measures the ceilings (DRAM read bandwidth, fp32 matmul peak; bench/ceilings.py);
2. builds a GPT-2 124M-shaped checkpoint with random weights (fp32; a 50257-id tokenizer
   whose every id decodes to visible text, so each streamed token is a visible chunk);
3. starts `atlas serve` on it and runs the load generator (eval_suites/loadgen.py):
   a concurrency sweep 1/4/16/32 and a Poisson run, 128 prompt and 64 output tokens
   (`--prompt-tokens`, `--output-tokens`), then 16 streams of a decode-bound workload,
   16 prompt and 128 output tokens;
4. runs `transformers` GPT2LMHeadModel.generate on the same weights, greedy, at batch 1
   and at batch 16, with the same lengths as each workload;
5. prints JSON and a Markdown table: batch-1 decode tok/s over HTTP (1 / mean TPOT) vs
   transformers batch 1, aggregate output tok/s with 16 concurrent streams vs transformers
   batch 16 for both workloads, and each as a percentage of its ceiling (DRAM bandwidth /
   weight bytes for batch 1; matmul peak / 2 * params for batches, and the tighter bound of
   each workload with its prefill FLOPs counted).
Run: `python bench/bench_serving.py [--quick] [--out FILE.json] [--device cuda]
[--dtype bfloat16] [--streams 64 256]`
(about 4 minutes on 2 cores; `--quick` about 1.5; far longer on a busy machine: each phase
prints a progress line on stderr, stdout carries only the results). With
`--device cuda` both run on the GPU (fp32 unless `--dtype bfloat16`, which both sides
then use; TF32 off as PyTorch defaults) and the ceilings are the GPU's: a streaming read
of a 4 GiB buffer and the matmul peak in that dtype (the CPU figures and their oneDNN
readers do not apply there). `--streams 64 256` adds Atlas-only rows at those
concurrencies (sweep lengths), each as a share of the FLOP ceiling and of the
weight-streaming one (each step reads the weights once for all its streams).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# As atlas_server does on import (see its __init__), before torch allocates anything, so
# Atlas and its baselines in this process run with the same allocator setting.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import hf_from_atlas  # noqa: E402
from ceilings import dram_read_bandwidth, machine, matmul_peak_flops  # noqa: E402
from progress import Progress, check_device  # noqa: E402

from atlas_server.checkpoint import save_checkpoint  # noqa: E402
from atlas_server.io import atomic_write_text  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import Tokenizer  # noqa: E402
from eval_suites.loadgen import LoadSpec, run  # noqa: E402

PROMPT, OUTPUT = 128, 64
# The workload the issue's reference figures describe ("transformers decodes about 145
# tok/s at batch 16"): short prompts, long generations, as bench/bench_engine.py times.
DECODE_BOUND_PROMPT, DECODE_BOUND_OUTPUT = 16, 128


def visible_tokenizer(vocab: int) -> Tokenizer:
    """256 byte tokens + ids that decode to 't<id> ' (no merges needed: prompts are ids)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(256, vocab - 1):
        ranks[f"t{i} ".encode()] = i
    return Tokenizer(ranks, {"<|endoftext|>": vocab - 1}, merges=None, name="bench")


def build_checkpoint(folder: Path) -> tuple[Path, Transformer]:
    torch.manual_seed(0)
    config = load_preset("gpt2-124m")
    model = Transformer(config)
    return save_checkpoint(
        folder / "gpt2-124m-random", model, visible_tokenizer(config.vocab_size)
    ), model


def hf_generate_tok_s(
    hf, batch: int, repeats: int, prompt: int = PROMPT, output: int = OUTPUT
) -> float:
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(hf.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    best = 0.0
    with torch.inference_mode():
        hf.generate(
            ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
        )  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf.generate(
                ids,
                max_new_tokens=output,
                min_new_tokens=output,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
            sync()
            best = max(best, batch * output / (time.perf_counter() - t0))
    return best


def gpu_read_bandwidth(device: str, gib: float = 4.0, repeats: int = 10) -> float:
    """Best bytes/s of a `sum()` over a buffer far larger than the GPU's L2 cache."""
    buf = torch.rand(int(gib * 2**30 / 4), device=device)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        buf.sum()
        torch.cuda.synchronize()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t0))
    return best


def gpu_fp32_peak(
    device: str, n: int = 8192, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of an n^3 product in `dtype` with PyTorch's default precision (no TF32)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(
    checkpoint: Path,
    port: int,
    max_running: int,
    device: str = "cpu",
    config: Path | None = None,
    dtype: str | None = None,
) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,  # the CLI as a module: also where no `atlas` script is installed
            "-m",
            "atlas_server.cli",
            "serve",
            "--device",
            device,
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
            "--max-running",
            str(max_running),
            "--log-level",
            "warning",
            *(["--config", str(config)] if config else []),
            *(["--dtype", dtype] if dtype else []),
            # Generation only: with RAG on, the server opens its vector store at start-up,
            # whose package a bare GPU image may lack, and holds its folder.
            "--set",
            "rag.enabled=false",
        ],
        env=env,
        # Not the repo: `python -m` puts the working directory first on sys.path, which would
        # shadow the revision that PYTHONPATH names (bench/ab_serving.py relies on it).
        cwd=checkpoint.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        time.sleep(0.5)
    raise RuntimeError("atlas serve did not become ready")


def closed_loop(base: str, clients: int, requests: int, prompt: int, output: int, seed: int):
    """Loadgen summary of `requests` streamed by `clients` clients, each sending its next
    request when its last one ends."""
    spec = LoadSpec(base, mode="concurrency", concurrency=clients, num_requests=requests,
                    prompt_tokens=prompt, output_tokens=output, seed=seed)  # fmt: skip
    return run(spec)["summary"]


def poisson_arrivals(base: str, rate: float, requests: int, prompt: int, output: int, seed: int):
    """Loadgen summary of `requests` arriving as a Poisson process at `rate` per second."""
    spec = LoadSpec(base, mode="poisson", request_rate=rate, num_requests=requests,
                    prompt_tokens=prompt, output_tokens=output, seed=seed)  # fmt: skip
    return run(spec)["summary"]


def warm_up(base: str) -> None:
    """One short request, so the first measured one does not pay for first-use costs."""
    closed_loop(base, 1, 1, 16, 8, seed=0)


def workload_flops_per_output(n_params: int, head: int, pos: int, prompt: int, output: int):
    """FLOPs per output token with the prefill counted: a request's prompt tokens pass every
    matmul but the output head (logits of the last one only), its output tokens all."""
    return 2 * (prompt * (n_params - head - pos) + output * (n_params - pos)) / output


def main() -> None:
    parser = argparse.ArgumentParser(description="Atlas serving vs transformers generate")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT,
        help=f"prompt tokens per request in the sweep (default {PROMPT})",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=OUTPUT,
        help=f"output tokens per request in the sweep (default {OUTPUT})",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights on both sides (default float32; the server's own default on CUDA is"
        " bfloat16)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        nargs="*",
        default=[],
        help="extra Atlas-only rows at these concurrencies (e.g. 64 256 on a GPU); the"
        " server then runs with max_running = the largest",
    )
    args = parser.parse_args()
    if args.prompt_tokens < 1 or args.output_tokens < 2:
        parser.error("--prompt-tokens must be at least 1 and --output-tokens at least 2")
    if any(c < 1 for c in args.streams):
        parser.error(f"--streams takes concurrencies of at least 1, got {args.streams}")
    if args.out is not None and not args.out.parent.is_dir():  # before minutes of measuring
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    check_device(parser, args.device)
    # The sweep's workload, then the decode-bound one that bench_engine.py times without
    # HTTP; each compared at 16 streams with transformers at batch 16 on the same lengths.
    workloads = {
        "prompt_heavy": (args.prompt_tokens, args.output_tokens),
        "decode_bound": (DECODE_BOUND_PROMPT, DECODE_BOUND_OUTPUT),
    }
    reps = 1 if args.quick else 3
    concurrencies = [1, 16] if args.quick else [1, 4, 16, 32]
    progress = Progress(__file__, phases=10 + len(concurrencies))
    progress.phase(f"measuring the ceilings on {args.device} (memory bandwidth, matmul peak)")
    bf16_peak = args.device.startswith("cuda") and args.dtype == "bfloat16"
    if args.device.startswith("cuda"):
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        bandwidth, peak = gpu_read_bandwidth(args.device), gpu_fp32_peak(args.device, dtype=dtype)
    else:
        bandwidth, peak = dram_read_bandwidth(), matmul_peak_flops()
    with tempfile.TemporaryDirectory() as tmp:
        progress.phase("building a random-weight gpt2-124m checkpoint")
        checkpoint, model = build_checkpoint(Path(tmp))
        n_params = model.num_parameters()
        # bytes read per decode step: every weight once (the tied head via its [C, V] copy);
        # the position table contributes one row only.
        weight_bytes = (n_params - model.pos_emb.weight.numel()) * (
            2 if args.dtype == "bfloat16" else 4
        )
        pos_params, head_params = model.pos_emb.weight.numel(), model.tok_emb.weight.numel()
        port = free_port()
        progress.phase("starting atlas serve")
        server = serve(
            checkpoint,
            port,
            max_running=max([32, *args.streams]),
            device=args.device,
            dtype=args.dtype,
        )
        base = f"http://127.0.0.1:{port}"
        prompt, output = workloads["prompt_heavy"]
        sweep, atlas_c16, streams = {}, {}, {}
        lengths = f"{prompt} prompt + {output} output tokens"
        # What is measured so far, rewritten to --out after each phase: a run cut off (the
        # GPU check's time limit) still leaves its Atlas rows. The full result replaces it.
        partial = {"complete": False, "device": args.device, "dtype": args.dtype,
                   "prompt_tokens": prompt, "output_tokens": output, "atlas_sweep": sweep,
                   "atlas_16_streams": atlas_c16, "atlas_streams": streams}  # fmt: skip

        def save_partial(**measured) -> None:
            partial.update(measured)
            if args.out:
                atomic_write_text(args.out, json.dumps(partial, indent=2))

        try:
            progress.phase("atlas: warm-up request")
            warm_up(base)
            for c in concurrencies:
                n = max(2 * c, 4) if args.quick else max(3 * c, 8)
                progress.phase(f"atlas: concurrency {c}, {n} requests of {lengths}")
                sweep[c] = closed_loop(base, c, n, prompt, output, seed=c)
                progress.note(f"concurrency {c}: {sweep[c]['output_throughput']:.1f} output tok/s")
                save_partial()
            atlas_c16["prompt_heavy"] = sweep[16]
            n = 8 if args.quick else 32
            progress.phase(f"atlas: Poisson arrivals at 2 req/s, {n} requests of {lengths}")
            poisson = poisson_arrivals(base, 2.0, n, prompt, output, seed=7)
            save_partial(atlas_poisson=poisson)
            n = 32 if args.quick else 48
            decode_prompt, decode_output = workloads["decode_bound"]
            progress.phase(
                f"atlas: 16 streams, {n} requests of {decode_prompt} prompt + {decode_output}"
                " output tokens"
            )
            atlas_c16["decode_bound"] = closed_loop(
                base, 16, n, *workloads["decode_bound"], seed=16
            )
            save_partial()
            for c in args.streams:
                progress.note(f"atlas: {c} streams, {2 * c} requests of {lengths}")
                streams[c] = closed_loop(base, c, 2 * c, prompt, output, seed=c)
                save_partial()
        finally:
            server.terminate()
            server.wait(60)
        progress.phase("transformers: loading the same weights into GPT2LMHeadModel")
        hf = hf_from_atlas(model).to(args.device, getattr(torch, args.dtype))
        del model
        progress.phase(f"transformers: generate at batch 1, {reps} repeat(s) of {lengths}")
        hf_b1 = hf_generate_tok_s(hf, 1, reps, prompt, output)
        hf_b16 = {}
        save_partial(transformers_batch1_tok_s=hf_b1, transformers_batch16_tok_s=hf_b16)
        for name, w in workloads.items():
            progress.phase(
                f"transformers: generate at batch 16, {reps} repeat(s) of {w[0]} prompt +"
                f" {w[1]} output tokens"
            )
            hf_b16[name] = hf_generate_tok_s(hf, 16, reps, *w)
            save_partial()
    atlas_b1 = 1000.0 / sweep[1]["mean_tpot_ms"]
    ceiling_b1 = bandwidth / weight_bytes
    ceiling_batch = peak / (2 * n_params)
    concurrent16 = {}
    for name, (w_prompt, w_output) in workloads.items():
        flops = workload_flops_per_output(n_params, head_params, pos_params, w_prompt, w_output)
        atlas = atlas_c16[name]["output_throughput"]
        concurrent16[name] = {
            "prompt_tokens": w_prompt,
            "output_tokens": w_output,
            "atlas_http_output_tok_s": atlas,
            "transformers_batch16_tok_s": hf_b16[name],
            "ratio": atlas / hf_b16[name],
            "ceiling_tok_s": ceiling_batch,
            "atlas_pct_of_ceiling": 100 * atlas / ceiling_batch,
            "workload_flops_per_output_token": flops,
            "workload_ceiling_tok_s": peak / flops,
            "atlas_pct_of_workload_ceiling": 100 * atlas * flops / peak,
            "median_tpot_ms": atlas_c16[name]["median_tpot_ms"],
            "median_ttft_ms": atlas_c16[name]["median_ttft_ms"],
        }
    result = {
        "complete": True,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "dtype": args.dtype,
        "dram_read_gbs": bandwidth / 1e9,
        # The peak of the dtype served (bf16 on CUDA when asked): named for it, as the
        # GPU-readiness review found a bf16 rate under an "fp32" key.
        f"{'bf16' if bf16_peak else 'fp32'}_matmul_gflops": peak / 1e9,
        "params": n_params,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "batch1": {
            "atlas_http_tok_s": atlas_b1,
            "transformers_tok_s": hf_b1,
            "ratio": atlas_b1 / hf_b1,
            "ceiling_tok_s": ceiling_b1,
            "atlas_pct_of_ceiling": 100 * atlas_b1 / ceiling_b1,
        },
        "concurrent16": concurrent16,
        "sweep": sweep,
        "poisson": poisson,
        "streams": {
            c: {
                "output_tok_s": s["output_throughput"],
                "pct_of_flop_ceiling": 100 * s["output_throughput"] / ceiling_batch,
                # each step reads the weights once for all streams: tok/s / c steps/s
                "pct_of_bandwidth_ceiling": 100
                * s["output_throughput"]
                / c
                * weight_bytes
                / bandwidth,
                "median_tpot_ms": s["median_tpot_ms"],
                "median_ttft_ms": s["median_ttft_ms"],
            }
            for c, s in streams.items()
        },
    }
    print(json.dumps(result, indent=2))
    b1 = result["batch1"]
    print("\n| measure | Atlas (HTTP) | transformers | ratio | Atlas % of ceiling |")
    print("|---|---|---|---|---|")
    print(
        f"| batch-1 decode tok/s | {b1['atlas_http_tok_s']:.1f} | {b1['transformers_tok_s']:.1f} | "
        f"{b1['ratio']:.2f}x | {b1['atlas_pct_of_ceiling']:.0f}% of {b1['ceiling_tok_s']:.0f} |"
    )
    for c16 in concurrent16.values():
        print(
            f"| 16 streams, output tok/s, {c16['prompt_tokens']} prompt + "
            f"{c16['output_tokens']} output tokens | {c16['atlas_http_output_tok_s']:.1f} | "
            f"{c16['transformers_batch16_tok_s']:.1f} | {c16['ratio']:.2f}x | "
            f"{c16['atlas_pct_of_ceiling']:.0f}% of {c16['ceiling_tok_s']:.0f}; "
            f"{c16['atlas_pct_of_workload_ceiling']:.0f}% of {c16['workload_ceiling_tok_s']:.0f} "
            "with the prefill counted |"
        )
    for c, s in sweep.items():
        print(
            f"concurrency {c}: output {s['output_throughput']:.1f} tok/s, TTFT p50 {s['median_ttft_ms']:.0f} ms, "
            f"TPOT p50 {s['median_tpot_ms']:.1f} ms, ITL p99 {s['p99_itl_ms']:.1f} ms"
        )
    for c, row in result["streams"].items():
        print(
            f"{c} streams: output {row['output_tok_s']:.1f} tok/s, "
            f"{row['pct_of_flop_ceiling']:.1f}% of the FLOP ceiling, "
            f"{row['pct_of_bandwidth_ceiling']:.0f}% of the weight-streaming ceiling, "
            f"TPOT p50 {row['median_tpot_ms']:.1f} ms"
        )
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))
    progress.done()


if __name__ == "__main__":
    main()
