"""Benchmark Atlas's BPE tokenizer against HF `tokenizers` (training) and tiktoken (encoding).

    .venv/bin/python bench/bench_tokenizer.py            # ~10 MB corpus, 8k vocab
    .venv/bin/python bench/bench_tokenizer.py --quick    # ~2 MB corpus, 8k vocab
    .venv/bin/python bench/bench_tokenizer.py [--write FILE.md]

What it measures, all in one run on the same machine:
- training: Atlas `train_from_files` vs HF `BpeTrainer` on the same files, same vocab size,
  same special tokens and the same pre-tokenization (GPT-4 split, then byte-level); HF runs in
  a subprocess twice, with RAYON_NUM_THREADS=1 and with its default thread count.
- encoding: Atlas `encode_ordinary` (cold cache: a freshly loaded tokenizer; warm: the second
  pass) vs tiktoken `encode_ordinary` (single thread) on the same ranks and the same text,
  checking that both give the same ids.
The corpus is a deterministic sample of the running Python's standard library (docstrings
and sources). It prints JSON and a Markdown table; `--write` also saves the Markdown.
It does not measure multi-threaded encoding or memory use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_tokenizers import to_tiktoken  # noqa: E402

from atlas_server.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT4_SPLIT_PATTERN, Tokenizer  # noqa: E402
from atlas_server.tokenizer.corpus import stdlib_sample  # noqa: E402
from atlas_server.tokenizer.train import TrainConfig, TrainStats, train_from_files  # noqa: E402


def write_corpus(folder: Path, max_bytes: int) -> tuple[list[Path], str]:
    """Write the stdlib sample as numbered .txt files; returns them and their joined text."""
    docs = stdlib_sample(max_bytes, docstring_share=0.3)
    files = []
    for i, doc in enumerate(docs):
        path = folder / f"doc{i:05d}.txt"
        path.write_text(doc, encoding="utf-8")
        files.append(path)
    return files, "\n".join(docs)


def train_atlas(folder: Path, vocab_size: int, workers: int = 1) -> tuple[Tokenizer, dict]:
    stats = TrainStats()
    start = time.perf_counter()
    tok = train_from_files(
        [folder], TrainConfig(vocab_size=vocab_size), progress=False, stats=stats, workers=workers
    )
    return tok, {
        "seconds": time.perf_counter() - start,
        "seconds_counting": stats.seconds_counting,
        "seconds_merging": stats.seconds_merging,
        "merges": stats.merges,
        "distinct_pretokens": stats.distinct_pretokens,
    }


def hf_train_main(folder: str, vocab_size: int) -> None:
    """Subprocess entry: train HF BpeTrainer on the folder's files, print seconds as JSON."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    files = sorted(str(p) for p in Path(folder).glob("*.txt"))
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    start = time.perf_counter()
    hf.train(files, trainer)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "vocab_size": hf.get_vocab_size()}))


def train_hf(folder: Path, vocab_size: int, threads: int | None) -> dict:
    env = dict(os.environ)
    env.pop("RAYON_NUM_THREADS", None)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, __file__, "--hf-train", str(folder), "--vocab-size", str(vocab_size)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_encoding(tok: Tokenizer, text: str, repeats: int) -> dict:
    enc = to_tiktoken(tok)
    megabytes = len(text.encode("utf-8")) / 1e6
    reference = enc.encode_ordinary(text)
    tiktoken_s = best_seconds(lambda: enc.encode_ordinary(text), repeats)

    # Cold: a freshly loaded tokenizer (empty piece cache); loading is not timed.
    data = tok.to_dict()
    cold_times = []
    for _ in range(repeats):
        fresh = Tokenizer.from_dict(data)
        start = time.perf_counter()
        fresh.encode_ordinary(text)
        cold_times.append(time.perf_counter() - start)
    cold_s = min(cold_times)
    warm_tok = Tokenizer.from_dict(tok.to_dict())
    same_ids = warm_tok.encode_ordinary(text) == reference  # also warms the cache
    warm_s = best_seconds(lambda: warm_tok.encode_ordinary(text), repeats)
    return {
        "megabytes": megabytes,
        "tokens": len(reference),
        "same_ids_as_tiktoken": same_ids,
        "tiktoken_mb_per_s": megabytes / tiktoken_s,
        "atlas_cold_mb_per_s": megabytes / cold_s,
        "atlas_warm_mb_per_s": megabytes / warm_s,
    }


def machine_info() -> dict:
    import tiktoken
    import tokenizers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "tiktoken": tiktoken.__version__,
        "tokenizers": tokenizers.__version__,
    }


def markdown(result: dict, command: str) -> str:
    t, e = result["training"], result["encoding"]
    hf1, hfn = t["hf_1_thread"]["seconds"], t["hf_default_threads"]["seconds"]
    ap = t["atlas_parallel_counting"]
    m = result["machine"]
    lines = [
        "## Tokenizer",
        "",
        f"Command: `{command}`",
        "",
        f"Corpus: {result['corpus_mb']:.1f} MB of Python {m['python']} stdlib docstrings and sources "
        f"({result['corpus_files']} files); vocab size {result['vocab_size']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average_1m']:.2f} at the start; "
        f"tiktoken {m['tiktoken']}, tokenizers {m['tokenizers']}.",
        "",
        "On a shared machine the figures move by 10-20% between runs; the load average above",
        "says how busy it was. Training is one run of each; encoding is the best of several.",
        "",
        "| what | Atlas | baseline | Atlas / baseline |",
        "|---|---|---|---|",
        f"| train, seconds (HF 1 thread) | {t['atlas']['seconds']:.2f} | {hf1:.2f} | {t['atlas']['seconds'] / hf1:.2f} (time) |",
        f"| train, seconds (HF default threads; Atlas counting in {ap['workers']} processes) | {ap['seconds']:.2f} | {hfn:.2f} | {ap['seconds'] / hfn:.2f} (time) |",
        f"| encode_ordinary MB/s, cold cache (tiktoken 1 thread) | {e['atlas_cold_mb_per_s']:.1f} | {e['tiktoken_mb_per_s']:.1f} | {e['atlas_cold_mb_per_s'] / e['tiktoken_mb_per_s']:.2f} (speed) |",
        f"| encode_ordinary MB/s, warm cache (tiktoken 1 thread) | {e['atlas_warm_mb_per_s']:.1f} | {e['tiktoken_mb_per_s']:.1f} | {e['atlas_warm_mb_per_s'] / e['tiktoken_mb_per_s']:.2f} (speed) |",
        "",
        f"Atlas training: {t['atlas']['seconds_counting']:.2f} s reading and counting "
        f"{t['atlas']['distinct_pretokens']:,} distinct pre-tokens, {t['atlas']['seconds_merging']:.2f} s "
        f"for {t['atlas']['merges']:,} merges. Encoding {e['megabytes']:.1f} MB gives {e['tokens']:,} "
        f"tokens; identical ids to tiktoken: {e['same_ids_as_tiktoken']}. Encoding: best of "
        f"{result['repeats']} runs. Parallel counting gave the same tokenizer: "
        f"{ap['same_tokenizer']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 MB corpus instead of 10 MB")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--corpus-mb", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--hf-train", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_train:
        hf_train_main(args.hf_train, args.vocab_size)
        return
    corpus_mb = args.corpus_mb or (2.0 if args.quick else 10.0)
    from progress import Progress  # bench/ is on sys.path when this runs as a script

    progress = Progress(__file__, phases=5)
    with tempfile.TemporaryDirectory(prefix="atlas-bench-tok-") as tmp:
        folder = Path(tmp)
        progress.phase(f"writing a {corpus_mb:g} MB corpus from the standard library")
        files, text = write_corpus(folder, int(corpus_mb * 1e6))
        machine = machine_info()
        progress.phase(f"training Atlas's tokenizer, vocab {args.vocab_size}")
        tok, atlas_train = train_atlas(folder, args.vocab_size)
        workers = os.cpu_count() or 1
        progress.phase(f"training Atlas's tokenizer again, counting in {workers} processes")
        parallel_tok, atlas_parallel = train_atlas(folder, args.vocab_size, workers)
        atlas_parallel["workers"] = workers
        atlas_parallel["same_tokenizer"] = parallel_tok.to_dict() == tok.to_dict()
        progress.phase("training HF tokenizers' BpeTrainer: 1 thread, then its default threads")
        training = {
            "atlas": atlas_train,
            "atlas_parallel_counting": atlas_parallel,
            "hf_1_thread": train_hf(folder, args.vocab_size, threads=1),
            "hf_default_threads": train_hf(folder, args.vocab_size, threads=None),
        }
    progress.phase(f"encoding with Atlas and tiktoken, {args.repeats} repeat(s)")
    encoding = measure_encoding(tok, text, args.repeats)
    result = {
        "corpus_mb": len(text.encode("utf-8")) / 1e6,
        "corpus_files": len(files),
        "vocab_size": args.vocab_size,
        "repeats": args.repeats,
        "machine": machine,
        "training": training,
        "encoding": encoding,
    }
    command = ".venv/bin/python bench/bench_tokenizer.py" + (" --quick" if args.quick else "")
    print(json.dumps(result, indent=2))
    report = markdown(result, command)
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")
    progress.done()


if __name__ == "__main__":
    main()
