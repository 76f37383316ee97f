"""8-bit weights against fp32 for serving on the CPU: decode speed, the DRAM ceiling, quality.

What it does:
1. Speed. For each preset (default gpt2-124m and llama-124m, random fp32 weights), the
   serving engine decodes greedily at one sequence and at --batch sequences, once with the
   fp32 panels and once with the 8-bit ones (`model.quantize = "int8"`: q8_0 blocks, fp32
   arithmetic), the two alternated --repeats times, best kept; tokens/s after each request's
   first token (bench_engine.atlas_decode_rate). The ceiling for one sequence is the DRAM
   read bandwidth, measured in the same run (bench/ceilings.py), over the weight bytes a
   one-row step reads (4 a weight in fp32, 1 + 2/32 in int8: each block of 32 has an fp16
   scale), so each rate is also given as a share of its own ceiling.
2. Quality, with --checkpoint (e.g. the quickstart's, ~/.cache/atlas/quickstart/
   checkpoint): bits per byte of the checkpoint's model on held-out tokens (the validation
   shards of --data, default the checkpoint's sibling `data` folder, as the quickstart lays
   it out), fp32 and int8, over the same windows of the model's context; and the share of
   positions whose most likely next token is the same in both.

Run:  python bench/bench_int8.py [--quick] [--checkpoint DIR] [--json FILE]
What it does not do: compare with llama.cpp's own q8_0 (`python bench/bench_llamacpp.py
--type q8_0 --quantize int8` does, same weights), HTTP, or GPUs (int8 is a CPU path).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as atlas_server sets on import
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import atlas_decode_rate  # noqa: E402
from bench_model import weight_bytes_per_token  # noqa: E402
from ceilings import dram_read_bandwidth  # noqa: E402

from atlas_server.compute_threads import call_in_fresh_thread  # noqa: E402
from atlas_server.engine import Engine, EngineConfig  # noqa: E402
from atlas_server.model import Transformer, load_preset, native  # noqa: E402
from atlas_server.tokenizer import byte_level_tokenizer  # noqa: E402

BYTES_PER_WEIGHT = {"none": 4.0, "int8": 1.0 + 2.0 / native.Q8_BLOCK}  # int8: fp16 scales


def step_weights(model: Transformer) -> int:
    """Weights a one-row decode step reads (bench_model's count, which is in the model's
    fp32 bytes): every matrix, the head in full; one row of each embedding table."""
    return weight_bytes_per_token(model) // 4


def decode_rates(preset: str, batch: int, new_tokens: int, repeats: int, prompt_tokens: int):
    """{quantize: {"batch_1": tok/s, f"batch_{batch}": tok/s}} for one preset."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    # The preset's own vocabulary (50,257 for gpt2-124m): its head is a third of the weights a
    # step reads. Ids past the byte tokenizer decode as nothing; only their count matters.
    base = Transformer(load_preset(preset)).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 256, (batch, prompt_tokens), generator=gen).tolist()
    config = EngineConfig(
        max_running=batch,
        max_batched_tokens=max(512, batch * prompt_tokens),
        max_model_len=prompt_tokens + new_tokens,
    )
    models = {q: copy.deepcopy(base) for q in BYTES_PER_WEIGHT}
    rates: dict[str, dict[str, float]] = {q: {} for q in models}
    for rows in sorted({1, batch}):
        for _ in range(repeats):
            for quantize, model in models.items():  # alternated: both see the same load
                engine_config = dataclasses.replace(config, quantize=quantize)
                engine = call_in_fresh_thread(
                    lambda m=model, c=engine_config: Engine(m, tokenizer, c).start()
                )
                try:
                    atlas_decode_rate(engine, prompts[:rows], 4)  # warm-up
                    rate = atlas_decode_rate(engine, prompts[:rows], new_tokens)
                finally:
                    engine.shutdown()
                key = f"batch_{rows}"
                rates[quantize][key] = max(rates[quantize].get(key, 0.0), rate)
    return rates, step_weights(base)


def held_out_quality(checkpoint: Path, data: Path | None, max_tokens: int) -> dict:
    """Bits per byte of fp32 and int8 on the same held-out windows, and argmax agreement."""
    from atlas_server.checkpoint import load_checkpoint
    from trainer.data import read_shard

    ckpt = load_checkpoint(checkpoint)
    data = data or checkpoint.parent / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    shards = manifest["val"] or manifest["train"][-1:]
    tokens = torch.cat([torch.as_tensor(read_shard(data / s["file"])).long() for s in shards])
    window = ckpt.model.config.max_seq_len
    n_windows = max(1, min(len(tokens), max_tokens) // window)
    ids = tokens[: n_windows * window].view(n_windows, window)  # [W, T]
    byte_lengths = torch.tensor(
        [len(ckpt.tokenizer.token_bytes(i)) for i in range(ckpt.tokenizer.vocab_size)],
        dtype=torch.float64,
    )
    predicted_bytes = byte_lengths[ids[:, 1:]].sum().item()
    fp32 = copy.deepcopy(ckpt.model).prepare_for_inference()
    int8 = copy.deepcopy(ckpt.model).prepare_for_inference(quantize="int8")
    nll = {"fp32": 0.0, "int8": 0.0}
    same = 0
    with torch.inference_mode():
        for row in ids.split(8):  # [b, T]
            logits = {name: m(row)[:, :-1].float() for name, m in (("fp32", fp32), ("int8", int8))}
            for name, lg in logits.items():
                nll[name] += torch.nn.functional.cross_entropy(
                    lg.reshape(-1, lg.shape[-1]), row[:, 1:].reshape(-1), reduction="sum"
                ).item()
            same += (logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).sum().item()
    bpb = {name: value / math.log(2) / predicted_bytes for name, value in nll.items()}
    return {
        "checkpoint": str(checkpoint),
        "held_out_tokens": int(ids[:, 1:].numel()),
        "bits_per_byte_fp32": round(bpb["fp32"], 5),
        "bits_per_byte_int8": round(bpb["int8"], 5),
        "int8_over_fp32": round(bpb["int8"] / bpb["fp32"], 5),
        "same_argmax": round(same / ids[:, 1:].numel(), 4),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-124m"])
    p.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    p.add_argument("--new-tokens", type=int, default=None, help="default 48 (--quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="default 2 (--quick 1)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the quality part")
    p.add_argument("--data", type=Path, help="its prepared data (default: CHECKPOINT/../data)")
    p.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens scored")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not native.available():
        p.error("int8 serving needs Atlas's C kernels: no C compiler found (or ATLAS_NATIVE=0)")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint} is not an atlas checkpoint (no config.json)")
    new_tokens = args.new_tokens or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    bandwidth = dram_read_bandwidth()
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dram_read_gb_s": round(bandwidth / 1e9, 1),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "speed": {},
    }
    rows = []
    for preset in args.presets:
        rates, weights = decode_rates(preset, args.batch, new_tokens, repeats, args.prompt_tokens)
        entry = {"step_weights": weights}
        for quantize, by_batch in rates.items():
            ceiling = bandwidth / (weights * BYTES_PER_WEIGHT[quantize])
            entry[quantize] = {
                **{k: round(v, 1) for k, v in by_batch.items()},
                "batch_1_ceiling": round(ceiling, 1),
                "batch_1_of_ceiling": round(by_batch["batch_1"] / ceiling, 3),
            }
        for key in rates["none"]:
            entry[f"{key}_int8_over_fp32"] = round(rates["int8"][key] / rates["none"][key], 2)
            rows.append(
                f"| {preset} | {key.removeprefix('batch_')} | {rates['none'][key]:.1f} | "
                f"{rates['int8'][key]:.1f} | {entry[f'{key}_int8_over_fp32']:.2f} |"
            )
        report["speed"][preset] = entry
    if args.checkpoint is not None:
        report["quality"] = held_out_quality(args.checkpoint, args.data, args.max_tokens)

    print(json.dumps(report, indent=2))
    print(
        "\n| model | sequences | fp32 tok/s | int8 tok/s | int8 / fp32 |\n|---|---:|---:|---:|---:|"
    )
    print("\n".join(rows))
    for preset, entry in report["speed"].items():
        print(
            f"{preset}, one sequence: fp32 {entry['none']['batch_1_of_ceiling']:.0%} of its "
            f"ceiling ({entry['none']['batch_1_ceiling']} tok/s), int8 "
            f"{entry['int8']['batch_1_of_ceiling']:.0%} ({entry['int8']['batch_1_ceiling']})"
        )
    if "quality" in report:
        q = report["quality"]
        print(
            f"held-out bits per byte: fp32 {q['bits_per_byte_fp32']}, int8 "
            f"{q['bits_per_byte_int8']} (x{q['int8_over_fp32']}); same next-token argmax at "
            f"{q['same_argmax']:.1%} of {q['held_out_tokens']} positions"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
