"""RAG benchmark: the vector store back ends side by side, and retrieval quality.

Default mode: for each back end and each collection size (1k / 10k / 100k / 1M chunks)
it measures the write rate (chunks/s of upserts with precomputed vectors, index building
included), retrieval latency p50 / p99 over `--queries` questions (MiniLM query embedding
+ dense search, top 5; BM25 search p50 beside it) and recall@10 of dense search against
exact search (NumPy over the same vectors) on 200 held-out real chunks used as queries.
The embedded store before Qdrant Edge, qdrant-client's local mode (`qdrant-local`), is
the baseline: every row prints the ratio of qdrant-local's search p50 to its own at the
same size, measured in the same run (search alone: the query embedding is the same for
all and, on a busy machine, the noisiest part). qdrant-local runs only up to
`--baseline-max` chunks (10,000): it searches exhaustively in Python and writes ~40
chunks/s, so 100,000 would take 40 minutes to fill and 1M hours. Milvus Lite stops at
10,000 too (`LIMITS`); `--max-size STORE=N` caps any other for one run.
`numpy-exact` is a plain matrix product over the vectors (no store), the floor an exact
search can reach.

PyTorch runs with OMP_WAIT_POLICY=PASSIVE, as `atlas serve` does (set before it loads):
with OpenMP's default spinning, two threads embedding one query wait on each other on a
loaded machine (~0.65 s p50 against ~13 ms passive: bench/bench_query_embedding.py).
Corpus: chunks of the Python standard library's docstrings and sources (64 word pieces,
no overlap) embedded with all-MiniLM-L6-v2, `--real` of them (default 20,000; embedded
once and cached under $ATLAS_HOME/bench (~/.cache/atlas/bench): 50 minutes on the busy
shared 2-core machine, a few on an idle one). Sizes
beyond the real chunks are SYNTHETIC: chunk j copies the text of real chunk j mod R and
gets its vector plus Gaussian noise (norm 0.5, then normalised: cosine ~0.89 to its
source), so the collection keeps the real data's cluster structure; the output says
which rows are synthetic. Progress goes to stderr; the table (Markdown) to stdout, and
`--json PATH` writes every number.
`--quality` instead prints hit@1, hit@5 and MRR of each retriever and fusion setting on
the earlier 24 labelled questions in tests/data/rag_queries.json (bm25 weights 1.0 and
0.5; a quick check that no longer sets a default: the quality table in docs/rag.md comes
from bench/bench_retrieval.py).
Run: `python bench/bench_rag.py [--sizes 1000,10000,100000,1000000] [--stores ...]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

# As `atlas serve` runs (atlas_server/cli.py): OpenMP threads sleep between parallel
# regions instead of spinning. Set before PyTorch loads. With spinning, one query's
# embedding took ~0.65 s p50 on the loaded 2-core machine, passive ~13 ms
# (bench/bench_query_embedding.py, docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from atlas_server.plugins import get_plugin_host  # noqa: E402
from atlas_server.rag.chunking import ChunkSettings, chunk_text  # noqa: E402
from atlas_server.rag.embedding import Embedder  # noqa: E402
from atlas_server.rag.pipeline import RAGPipeline  # noqa: E402
from atlas_server.rag.store import open_store  # noqa: E402
from atlas_server.rag.types import Chunk, RAGContext  # noqa: E402
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
HELD_OUT = 200  # real chunks kept out of every collection, used as recall queries
NOISE = 0.5  # norm of the noise added to a real vector to make a synthetic one
# back end label -> (registered store name, options)
STORES = {
    "embedded": ("embedded", {}),
    # The same store and search settings, loaded in bulk: the HNSW index is built once,
    # after the last write of a size (the benchmark calls optimize()), instead of every
    # 10,000 new chunks; re-indexing merged segments as they grow makes a 1M load take
    # hours on 2 cores.
    "embedded-bulk": ("embedded", {"optimize_every": 10**12}),
    "faiss": ("faiss", {}),
    "milvus": ("milvus", {}),  # Milvus Lite: the same engine and client code as a cluster
    "qdrant-local": ("qdrant", {}),  # the embedded store before this one: the baseline
}
# Largest size each runs at by default, and why not beyond (printed in the output).
LIMITS = {
    "milvus": (
        10_000,
        "Milvus Lite (a local engine process over gRPC, flat index) took ~1 s a search at "
        "10,000 chunks on the shared 2-core machine, so 100,000 would take most of an hour; "
        "at scale use a Milvus server (Helm chart) - not measured here",
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cache_dir() -> Path:
    home = Path(os.environ.get("ATLAS_HOME", Path.home() / ".cache" / "atlas"))
    return home / "bench"


def real_corpus(embedder: Embedder, n: int) -> tuple[list[Chunk], np.ndarray]:
    """n real chunks and their MiniLM vectors [n, D], built once and cached."""
    folder = cache_dir()
    chunks_path, vectors_path = folder / f"rag-chunks-{n}.jsonl", folder / f"rag-vectors-{n}.npy"
    if chunks_path.is_file() and vectors_path.is_file():
        chunks = [Chunk(**json.loads(line)) for line in chunks_path.open(encoding="utf-8")]
        return chunks, np.load(vectors_path)
    log(f"building the corpus: {n:,} chunks of the standard library (cached in {folder})")
    chunks: list[Chunk] = []
    settings = ChunkSettings(64, 0)
    for i, text in enumerate(stdlib_sample(60_000_000, docstring_share=0.3)):
        chunks += chunk_text(text, f"stdlib/{i}", embedder.count_pieces, settings)
        if len(chunks) >= n:
            break
    if len(chunks) < n:
        raise SystemExit(f"the standard library gave {len(chunks):,} chunks; use --real <= that")
    chunks = chunks[:n]
    vectors = np.zeros((n, embedder.dim), np.float32)  # [n, D]
    for i in tqdm(range(0, n, 256), desc="embedding the corpus", unit="batch", file=sys.stderr):
        vectors[i : i + 256] = embedder.encode([c.text for c in chunks[i : i + 256]])
    folder.mkdir(parents=True, exist_ok=True)
    np.save(vectors_path, vectors)
    with chunks_path.open("w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.__dict__) + "\n")
    return chunks, vectors


def extend(chunks: list[Chunk], vectors: np.ndarray, n: int) -> tuple[list[Chunk], np.ndarray]:
    """The first n chunks: real ones, then synthetic ones (see the module docstring)."""
    r = len(chunks)
    if n <= r:
        return chunks[:n], vectors[:n]
    rng = np.random.default_rng(0)
    extra = n - r
    base = np.arange(r, n) % r  # [extra]
    noise = rng.standard_normal((extra, vectors.shape[1]), dtype=np.float32)  # [extra, D]
    noise *= NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    synthetic = vectors[base] + noise
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    new_chunks = [
        Chunk(
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"atlas-bench-synthetic-{j}")),
            chunks[j % r].text,
            chunks[j % r].source,
            chunks[j % r].heading,
            chunks[j % r].start,
            chunks[j % r].end,
            {"synthetic": True},
        )
        for j in range(r, n)
    ]
    return chunks + new_chunks, np.concatenate([vectors, synthetic])


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] indices of the exact top k by inner product, in blocks to bound memory."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), 200_000):
        block = vectors[start : start + 200_000] @ queries.T  # [B, Q]
        top = np.argpartition(-block, min(k, len(block) - 1), axis=0)[:k].T  # [Q, k]
        scores = np.take_along_axis(block.T, top, axis=1)
        merged_s = np.concatenate([best_s, scores], axis=1)
        merged_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-merged_s, axis=1)[:, :k]
        best_s = np.take_along_axis(merged_s, order, axis=1)
        best_i = np.take_along_axis(merged_i, order, axis=1)
    return best_i


def timed_queries(search, embedder: Embedder, repeats: int) -> tuple[list[float], list[float]]:
    """Milliseconds of (query embedding + search, search alone), one query at a time."""
    total, alone = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        vector = embedder.encode([QUERIES[i % len(QUERIES)]])[0]
        t1 = time.perf_counter()
        search(vector)
        t2 = time.perf_counter()
        total.append((t2 - t0) * 1000)
        alone.append((t2 - t1) * 1000)
    return total, alone


def run_store(label, sizes, chunks, vectors, queries, truth, embedder, args, save) -> dict:
    """Fill one back end size by size (adding the difference) and measure at each size.

    `save(rows)` is called after every size, so a run stopped during the next (1M can take
    an hour on 2 cores) keeps the rows it measured.
    """
    name, options = STORES[label]
    rows = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = open_store(name, Path(tmp) / label, options=options)
        store.ensure_collection("bench", vectors.shape[1])
        have = 0
        for n in sizes:
            t0 = time.perf_counter()
            bar = tqdm(
                total=n - have, desc=f"{label}: writing to {n:,}", unit="chunk", file=sys.stderr
            )
            for i in range(have, n, args.batch):
                j = min(i + args.batch, n)
                store.upsert("bench", chunks[i:j], vectors[i:j])
                bar.update(j - i)
            bar.close()
            optimize = getattr(store, "optimize", None)
            if optimize:
                log(f"{label}: building the index at {n:,}")
                optimize("bench")
            elapsed = time.perf_counter() - t0
            write_rate = (n - have) / elapsed
            have = n
            assert store.count("bench") == n
            log(f"{label}: {n:,} chunks, {write_rate:,.0f} chunks/s; timing queries")
            dense, search_only = timed_queries(
                lambda q: store.search_dense("bench", q, 5), embedder, args.queries
            )
            bm25 = []
            for i in range(args.queries):
                t1 = time.perf_counter()
                store.search_bm25("bench", QUERIES[i % len(QUERIES)], 5)
                bm25.append((time.perf_counter() - t1) * 1000)
            found = 0
            index = {c.id: k for k, c in enumerate(chunks[:n])}
            for q, expected in zip(queries, truth[n], strict=True):
                got = {index[c.id] for c, _, _ in store.search_dense("bench", q, 10)}
                found += len(got & set(expected.tolist()))
            sweep = {}
            for ef in args.ef_sweep:  # search width against recall, on the same index
                if not hasattr(store, "hnsw_ef"):
                    break
                default_ef, store.hnsw_ef = store.hnsw_ef, ef
                _, alone = timed_queries(
                    lambda q: store.search_dense("bench", q, 5), embedder, args.queries
                )
                hits = sum(
                    len({index[c.id] for c, _, _ in store.search_dense("bench", q, 10)} & set(e))
                    for q, e in zip(queries, truth[n], strict=True)
                )
                sweep[ef] = {
                    "search_p50_ms": percentile(alone, 50),
                    "recall_at_10": hits / (10 * len(queries)),
                }
                store.hnsw_ef = default_ef
                log(f"{label} at {n:,}, hnsw_ef {ef}: {json.dumps(sweep[ef])}")
            rows[n] = {
                "hnsw_ef_sweep": sweep,
                "write_chunks_per_s": write_rate,
                "p50_ms": percentile(dense, 50),
                "p99_ms": percentile(dense, 99),
                "search_p50_ms": percentile(search_only, 50),
                "bm25_p50_ms": percentile(bm25, 50),
                "recall_at_10": found / (10 * len(queries)),
            }
            log(f"{label} at {n:,}: {json.dumps(rows[n])}")
            save(rows)
        store.close()
    return rows


def run_numpy(sizes, vectors, embedder, args) -> dict:
    rows = {}
    for n in sizes:
        matrix = np.ascontiguousarray(vectors[:n])  # [n, D]

        def search(q, matrix=matrix):
            scores = matrix @ q  # [n]
            top = np.argpartition(-scores, 5)[:5]
            return top[np.argsort(-scores[top])]

        times, search_only = timed_queries(search, embedder, args.queries)
        rows[n] = {
            "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99),
            "search_p50_ms": percentile(search_only, 50),
            "recall_at_10": 1.0,
        }
        log(f"numpy-exact at {n:,}: {json.dumps(rows[n])}")
    return rows


def table(results: dict, real: int) -> str:
    base = results["stores"].get("qdrant-local", {})
    lines = [
        "| back end | chunks | vectors | write chunks/s | embed + dense search p50 / p99 ms "
        "| search alone p50 ms | vs qdrant-local (search p50) | BM25 p50 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in results["stores"].items():
        for n, row in rows.items():
            ratio = (
                f"{base[n]['search_p50_ms'] / row['search_p50_ms']:.1f}x faster"
                if n in base
                else "not measured"
            )
            if label == "qdrant-local":
                ratio = "1.0 (baseline)"
            write = f"{row['write_chunks_per_s']:,.0f}" if "write_chunks_per_s" in row else "-"
            bm25 = f"{row['bm25_p50_ms']:.1f}" if "bm25_p50_ms" in row else "-"
            kind = "real" if n <= real else "synthetic"
            lines.append(
                f"| {label} | {n:,} | {kind} | {write} | {row['p50_ms']:.1f} / "
                f"{row['p99_ms']:.1f} | {row['search_p50_ms']:.2f} | {ratio} | {bm25} "
                f"| {row['recall_at_10']:.3f} |"
            )
    lines.append(
        f"\nQuery embedding alone (MiniLM, one query): p50 {results['embed_p50_ms']:.1f} ms, "
        f"fastest {results['embed_min_ms']:.1f} ms (the machine's load moves the p50)."
    )
    for label, reason in results["skipped"].items():
        lines.append(f"Not run: {label}: {reason}")
    return "\n".join(lines)


def benchmark(args) -> None:
    embedder = Embedder()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    chunks, vectors = real_corpus(embedder, args.real)
    held_out = vectors[-HELD_OUT:]  # [200, D]: the recall queries, never stored
    chunks, vectors = chunks[:-HELD_OUT], vectors[:-HELD_OUT]
    real = len(chunks)
    chunks, vectors = extend(chunks, vectors, max(sizes))
    if max(sizes) > real:
        log(f"sizes above {real:,} use synthetic vectors (module docstring)")
    log("exact top-10 of the recall queries at each size")
    truth = {n: exact_top(vectors[:n], held_out, 10) for n in sizes}
    embed_times, _ = timed_queries(lambda q: q, embedder, args.queries)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "real_chunks": real,
        "embed_p50_ms": percentile(embed_times, 50),
        "embed_min_ms": min(embed_times),
        "stores": {},
        "skipped": {},
    }
    labels = [s for s in args.stores.split(",") if s]
    caps = {k: int(v) for k, v in (item.split("=", 1) for item in args.max_size)}
    for label in labels:
        if label == "numpy-exact":
            results["stores"][label] = run_numpy(sizes, vectors, embedder, args)
            continue
        limit, reason = LIMITS.get(label, (None, ""))
        if label in caps:
            limit, reason = caps[label], "capped by --max-size for this run"
        if label == "qdrant-local":
            limit = args.baseline_max
            reason = (
                "qdrant-client's local mode searches exhaustively in Python (linear in the "
                "collection) and writes ~40 chunks/s: 100,000 would take 40 minutes to fill, "
                "1M hours"
            )
        run_sizes = [n for n in sizes if limit is None or n <= limit]
        if len(run_sizes) < len(sizes):
            results["skipped"][label] = f"sizes above {limit:,}: {reason}"

        def save(rows, label=label):
            results["stores"][label] = rows
            results["load_average_now"] = os.getloadavg()
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))

        try:
            results["stores"][label] = run_store(
                label, run_sizes, chunks, vectors, held_out, truth, embedder, args, save
            )
        except ImportError as e:
            results["skipped"][label] = f"not installed ({e})"
        gc.collect()
        if args.json:  # after every back end, so a stopped run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results, real))
    print(
        f"\n{results['date']}, {results['cpus']} CPUs, load average "
        f"{results['load_average_at_start'][0]:.1f} at start, "
        f"{results['load_average_at_end'][0]:.1f} at end"
    )


def quality() -> None:
    from rag_corpus import write_corpus

    from atlas_server.rag.ingest import documents_from_paths, ingest

    queries = json.loads((ROOT / "tests" / "data" / "rag_queries.json").read_text())["queries"]
    relevant = [set(q["relevant"]) for q in queries]
    host = get_plugin_host()
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "corpus")
        store = open_store("embedded", Path(tmp) / "store")
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
    parser = argparse.ArgumentParser(
        description="RAG benchmark: vector store back ends (latency, recall, write rate)"
    )
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument(
        "--stores", default="numpy-exact,embedded,faiss,milvus,qdrant-local", help="comma list"
    )
    parser.add_argument("--real", type=int, default=20_000, help="real chunks to embed")
    parser.add_argument("--queries", type=int, default=50, help="timed queries per row")
    parser.add_argument("--batch", type=int, default=512, help="chunks per upsert")
    parser.add_argument("--baseline-max", type=int, default=10_000)
    parser.add_argument(
        "--max-size",
        action="append",
        default=[],
        metavar="STORE=N",
        help="run STORE only up to N chunks (repeatable), e.g. embedded=100000",
    )
    parser.add_argument(
        "--ef-sweep",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        metavar="EF,EF",
        help="also measure HNSW search widths (embedded stores): search p50 and recall@10",
    )
    parser.add_argument("--tmp", default=None, help="folder for the stores (default: system tmp)")
    parser.add_argument("--json", default=None, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="1k and 10k only, 20 queries")
    parser.add_argument(
        "--quality", action="store_true", help="retrieval quality on the labelled questions"
    )
    args = parser.parse_args()
    if args.quality:
        quality()
        return
    if args.quick:
        args.sizes, args.queries = "1000,10000", 20
    benchmark(args)


if __name__ == "__main__":
    main()
