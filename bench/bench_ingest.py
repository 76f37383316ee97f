"""Ingest throughput: today's path against the pre-rewrite one, measured in the same run.

What it does: writes a folder of short text files (the standard library's docstrings, one
file each: the "folder of thousands of small files" case) until they make about `--chunks`
chunks, then ingests the folder into a fresh embedded-store collection with
  - `baseline`: the ingest path of commit 467e516, frozen in `bench/ingest_baseline.py`
    (a chunker that re-tokenizes every growing span, 64 chunks per fp32 encode call,
    sequential upserts);
  - `new`: `atlas_server.rag.ingest.ingest` with its defaults (backend `auto`, windows of
    256 chunks sorted by length and embedded 64 per call, embedding on its own thread,
    resume check);
  - with `--variants`, also `new` with one setting changed at a time (fp32, int8, no
    embedding thread, windows of 64: no sorting across calls, one embedding worker with
    batches of 64 as before the worker split, forward batches of 8 or 16 instead of 4,
    256 chunks per embedding call instead of 64), to see what each part contributes.
The runs alternate (baseline, new, ..., then the reverse order) for `--rounds` rounds so
that load from other jobs falls on both, and it prints each run as it ends, then chunks/s,
input KB/s and the ratio of each to the baseline over all rounds, with the machine's load
average at the start and end. Everything is read from the same files and written to the
same kind of store, so the ratio is the ingest path's.
Run: `python bench/bench_ingest.py [--chunks 600] [--rounds 2] [--variants [fp32,int8,...]]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ingest_baseline  # noqa: E402

from atlas_server.rag.chunking import ChunkSettings, chunk_text  # noqa: E402
from atlas_server.rag.embedding import Embedder  # noqa: E402
from atlas_server.rag.ingest import Corpus, ingest  # noqa: E402
from atlas_server.rag.store import VectorStore  # noqa: E402
from atlas_server.tokenizer.corpus import stdlib_sample  # noqa: E402

# name: (label, one change to `new`: ingest() keywords, or Embedder keywords under "embedder")
VARIANTS = {
    "fp32": ("new, fp32", {"embedder": {"backend": "fp32"}}),
    "int8": ("new, int8", {"embedder": {"backend": "int8"}}),
    "no-thread": ("new, no embedding thread", {"pipeline": False}),
    "no-sort": ("new, no sorting across calls", {"window": 64}),
    "one-worker": (
        "new, one worker, batches of 64",
        {"embedder": {"workers": 1, "batch_size": 64}},
    ),
    "batch-8": ("new, batches of 8", {"embedder": {"batch_size": 8}}),
    "batch-16": ("new, batches of 16", {"embedder": {"batch_size": 16}}),
    "call-256": ("new, 256 chunks per call", {"batch_size": 256}),
}


def write_folder(folder: Path, embedder: Embedder, chunks: int) -> tuple[int, int]:
    """Docstring files until they make `chunks` chunks; returns (files, chunks)."""
    folder.mkdir(parents=True)
    made = files = 0
    for i, text in enumerate(stdlib_sample(50_000_000, docstring_share=1.0)):
        if len(text) < 200:  # one-liners make one tiny chunk each: not a realistic file
            continue
        path = folder / f"doc{i:05d}.txt"
        path.write_text(text, encoding="utf-8")
        files += 1
        made += len(chunk_text(text, str(path), embedder.count_pieces, ChunkSettings()))
        if made >= chunks:
            break
    return files, made


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=600, help="about this many chunks per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every run")
    parser.add_argument(
        "--variants",
        nargs="?",
        const=",".join(VARIANTS),
        default="",
        help=f"also time one-change variants: any of {','.join(VARIANTS)} (all if bare)",
    )
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.chunks < 1 or args.rounds < 1:
        parser.error("--chunks and --rounds must be at least 1")
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    load_start = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, {os.cpu_count()} CPUs, "
        f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}",
        flush=True,
    )
    # The baseline's embedder as it was then: one thread team, 64 texts per forward pass.
    embedders = {"baseline": Embedder(backend="fp32", workers=1, batch_size=64), "auto": Embedder()}
    auto = embedders["auto"]
    print(
        f"default embedder: backend {auto.backend}, {auto.workers} workers, "
        f"batches of {auto.batch_size} on this CPU",
        flush=True,
    )
    for key in chosen:
        if "embedder" in VARIANTS[key][1]:
            embedders[key] = Embedder(**VARIANTS[key][1]["embedder"])
    runs = {
        "baseline": lambda store, docs: ingest_baseline.ingest(
            store, embedders["baseline"], "c", docs
        ),
        "new": lambda store, docs: ingest(store, embedders["auto"], "c", docs, progress=False)[
            "chunks"
        ],
    }
    for key in chosen:
        name, change = VARIANTS[key]
        emb = embedders[key if "embedder" in change else "auto"]
        kwargs = {k: v for k, v in change.items() if k != "embedder"}
        runs[name] = lambda store, docs, emb=emb, kwargs=kwargs: ingest(
            store, emb, "c", docs, progress=False, **kwargs
        )["chunks"]

    results: dict[str, list[tuple[int, float]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "files"
        files, chunks = write_folder(folder, embedders["baseline"], args.chunks)
        nbytes = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{files} files, {nbytes / 1e3:.0f} KB, {chunks} chunks per run", flush=True)
        order = list(runs)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                store_dir = Path(tmp) / "store"
                shutil.rmtree(store_dir, ignore_errors=True)
                store = VectorStore(store_dir)
                docs = list(Corpus([str(folder)]))  # read before timing: both read the same
                t0 = time.perf_counter()
                n = runs[name](store, docs)
                seconds = time.perf_counter() - t0
                assert store.count("c") == n == chunks, (name, store.count("c"), n, chunks)
                store.close()
                results[name].append((n, seconds))
                print(
                    f"round {r + 1} {name:<26} {n / seconds:7.1f} chunks/s "
                    f"({seconds:.1f} s, load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )

    load_end = os.getloadavg()
    base_n = sum(n for n, _ in results["baseline"])
    base_rate = base_n / sum(s for _, s in results["baseline"])
    print(f"\nload average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print("\n| path | chunks/s | input KB/s | ratio to baseline |\n|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        n, s = sum(r[0] for r in rows), sum(r[1] for r in rows)
        rate = n / s
        summary[name] = {"chunks_per_s": rate, "ratio": rate / base_rate, "runs": rows}
        kbps = nbytes * len(rows) / s / 1e3
        print(f"| {name} | {rate:.1f} | {kbps:.1f} | {rate / base_rate:.2f}x |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "cpu": cpu_name(),
                    "load_start": load_start,
                    "load_end": load_end,
                    "files": files,
                    "chunks": chunks,
                    "results": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
