"""RAG benchmark: ingestion chunks/s and retrieval latency at 1k and 10k chunks; fusion quality.

What it does: builds chunks from the Python standard library's docstrings and sources
(deterministic), ingests the first 1,000 and then 10,000 into an embedded Qdrant
collection (chunking + MiniLM embedding + upsert, timed), and times 50 retrievals per
retriever (query embedding + search, and + MMR rerank) reporting p50/p99 in ms.
`--quality` instead prints hit@1, hit@5 and MRR of each retriever and fusion setting on
the labelled questions in tests/data/rag_queries.json (the table in docs/rag.md).
Run: `python bench/bench_rag.py [--quick] [--quality]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from progress import Progress  # noqa: E402

from atlas_server.plugins import get_plugin_host  # noqa: E402
from atlas_server.rag.chunking import ChunkSettings, chunk_text  # noqa: E402
from atlas_server.rag.embedding import Embedder  # noqa: E402
from atlas_server.rag.pipeline import RAGPipeline  # noqa: E402
from atlas_server.rag.store import VectorStore  # noqa: E402
from atlas_server.rag.types import RAGContext  # noqa: E402
from atlas_server.tokenizer.corpus import stdlib_sample  # noqa: E402

QUERIES = [
    "how do I open a file for reading",
    "parse command line arguments",
    "sort a list of tuples by key",
    "create a temporary directory",
    "regular expression match groups",
    "format a date as a string",
    "compute a sha256 hash of bytes",
    "read a csv file",
    "start a thread and wait for it",
    "send an http request",
]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def corpus_chunks(embedder: Embedder, n: int) -> list:
    chunks = []
    for i, text in enumerate(stdlib_sample(40_000_000, docstring_share=0.3)):
        chunks += chunk_text(text, f"stdlib/{i}", embedder.count_pieces, ChunkSettings())
        if len(chunks) >= n:
            break
    return chunks[:n]


def ingest_timed(store: VectorStore, embedder: Embedder, name: str, chunks: list) -> float:
    store.ensure_collection(name, embedder.dim)
    t0 = time.perf_counter()
    for i in range(0, len(chunks), 64):
        batch = chunks[i : i + 64]
        store.upsert(name, batch, embedder.encode([c.text for c in batch]))
    return len(chunks) / (time.perf_counter() - t0)


def latency(
    pipeline: RAGPipeline, name: str, retriever: str, reranker: str | None, repeats: int
) -> dict:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipeline.retrieve(name, QUERIES[i % len(QUERIES)], 5, retriever, reranker)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "mean_ms": statistics.fmean(times),
    }


def quality() -> None:
    from rag_corpus import write_corpus

    from atlas_server.rag.ingest import documents_from_paths, ingest

    queries = json.loads((ROOT / "tests" / "data" / "rag_queries.json").read_text())["queries"]
    relevant = [set(q["relevant"]) for q in queries]
    host = get_plugin_host()
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "corpus")
        store = VectorStore(Path(tmp) / "q")
        ingest(
            store,
            embedder,
            "std",
            documents_from_paths([str(Path(tmp) / "corpus")]),
            progress=False,
        )
        print("| retriever | bm25 weight | hit@1 | hit@5 | MRR |\n|---|---|---|---|---|")
        settings = [("dense", None), ("bm25", None)] + [
            (r, w) for r in ("hybrid-rrf", "hybrid") for w in (1.0, 0.5)
        ]
        for name, weight in settings:
            options = {name: {"weights": {"dense": 1.0, "bm25": weight}}} if weight else {}
            pipeline = RAGPipeline(host, RAGContext(store, embedder), options)
            ranked = [
                [Path(r.chunk.source).stem for r in pipeline.retrieve("std", q["q"], 5, name)]
                for q in queries
            ]
            mrr = host.metrics["mrr"]().compute_ranking(ranked, relevant).scores["mrr"]
            hit1 = sum(
                bool(r[:1]) and r[0] in rel for r, rel in zip(ranked, relevant, strict=True)
            ) / len(queries)
            hit5 = sum(bool(set(r) & rel) for r, rel in zip(ranked, relevant, strict=True)) / len(
                queries
            )
            print(f"| {name} | {weight if weight else '-'} | {hit1:.3f} | {hit5:.3f} | {mrr:.3f} |")
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="RAG ingestion and retrieval benchmark")
    parser.add_argument("--quick", action="store_true", help="1k chunks only, fewer queries")
    parser.add_argument(
        "--quality", action="store_true", help="retrieval quality on the labelled questions"
    )
    args = parser.parse_args()
    if args.quality:
        quality()
        return
    sizes = [1000] if args.quick else [1000, 10000]
    progress = Progress(__file__, phases=1 + 3 * len(sizes))
    progress.phase(f"loading the embedder and chunking {max(sizes)} chunks of stdlib text")
    embedder = Embedder()
    chunks = corpus_chunks(embedder, max(sizes))
    host = get_plugin_host()
    results = {"date": time.strftime("%Y-%m-%d"), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = VectorStore(Path(tmp) / "q")
        pipeline = RAGPipeline(host, RAGContext(store, embedder))
        for n in sizes:
            name = f"c{n}"
            progress.phase(f"{n} chunks: embedding and ingesting")
            row = {"ingest_chunks_per_s": ingest_timed(store, embedder, name, chunks[:n])}
            progress.phase(f"{n} chunks: query latency of dense, bm25, hybrid")
            for retriever in ("dense", "bm25", "hybrid"):
                row[retriever] = latency(pipeline, name, retriever, None, 20 if args.quick else 50)
            progress.phase(f"{n} chunks: query latency of hybrid + MMR")
            row["hybrid+mmr"] = latency(pipeline, name, "hybrid", "mmr", 10 if args.quick else 30)
            results["sizes"][n] = row
        store.close()
    print(json.dumps(results, indent=2))
    print(
        "\n| chunks | ingest chunks/s | dense p50/p99 ms | bm25 p50/p99 ms | hybrid p50/p99 ms | hybrid+MMR p50/p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for n, row in results["sizes"].items():
        cells = " | ".join(
            f"{row[k]['p50_ms']:.1f} / {row[k]['p99_ms']:.1f}"
            for k in ("dense", "bm25", "hybrid", "hybrid+mmr")
        )
        print(f"| {n:,} | {row['ingest_chunks_per_s']:.0f} | {cells} |")
    progress.done()


if __name__ == "__main__":
    main()
