"""Retrieval quality on the Python-documentation question set: every retriever, fusion and reranker.

What it does: builds the corpus of `eval_suites/data/build_retrieval.py` (every section of
the Python 3.11 documentation and every glossary entry, 4,106 documents, from Debian's
`python3.11-doc`, fetched once into a cache folder), ingests it with `atlas rag`'s ingest
into an embedded (Qdrant Edge) store kept in a cache folder (resumable: a second run embeds
nothing; vectors of this script's earlier qdrant-client local-mode stores are copied, not
embedded again), and asks each of the 310 committed questions
(`retrieval/python_docs_qa.jsonl`: 170 FAQ questions, 14 other question headings, 126
glossary terms; split dev/test by id hash) through each retriever and reranker setting,
top 10 chunks. A chunk is relevant when its source is the question's answer section; the
ranking scored is the top 10 chunks' sources with repeats removed (what a RAG prompt with
top_k = 10 would draw on), so each question has one relevant document: recall@10 is its
hit rate, MRR is MRR@10, nDCG@10 is 1 / log2(1 + rank). Settings: `dense`, `bm25`,
`hybrid` (score fusion) and `hybrid-rrf` at several BM25 weights, the `mmr` reranker over
the default retriever and over dense, and with `--query-likelihood CHECKPOINT` the
`query-likelihood` reranker over the default retriever, its 40 candidates per question
scored in one call of the engine scorer `atlas serve` gives rerankers (an Atlas engine
serving CHECKPOINT in this process). The plugin classes are called directly (as the
pipeline calls them), with each question's dense and BM25 candidates searched once and
shared by every setting; dense search is exact cosine top-k over the stored vectors in
NumPy (`ExactDense`: what the embedder's vectors rank, without the HNSW index's small
recall loss). Prints one Markdown table per split (dev first: choose there, quote test),
per question kind for the chosen settings, and writes everything to `--json`.
`--backends auto,fp32,int8` repeats dense and the default fusion with each embedder
backend (one store per backend), to measure what bf16 / int8 embedding costs in quality.
The `cross-encoder` reranker needs a local CrossEncoder folder (`--cross-encoder DIR`;
none ships with Atlas or is on this machine). `atlas-eval run retrieval` asks the same
questions of a running server instead.
Run: `python bench/bench_retrieval.py [--docs DIR] [--backends auto,fp32,int8]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

# As `atlas serve` runs (atlas_server/cli.py): OpenMP threads sleep between parallel
# regions instead of spinning. Set before PyTorch loads. With spinning, one query's
# embedding took ~0.65 s p50 on the loaded 2-core machine, passive ~13 ms
# (bench/bench_query_embedding.py, docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import msgspec
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval_suites" / "data"))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from build_retrieval import QUESTIONS, build_corpus, cache_dir, docs_sources  # noqa: E402

from atlas_server.plugins import get_plugin_host  # noqa: E402
from atlas_server.rag.chunking import ChunkSettings, chunk_text  # noqa: E402
from atlas_server.rag.embedding import Embedder  # noqa: E402
from atlas_server.rag.ingest import Document, ingest  # noqa: E402
from atlas_server.rag.store import VectorStore  # noqa: E402
from atlas_server.rag.types import RAGContext, RetrievedChunk  # noqa: E402
from plugins import rerankers, retrievers  # noqa: E402

COLLECTION = "pydocs"
TOP_K = 10
BM25_WEIGHTS = (0.25, 0.5, 1.0)


class Cached:
    """A retriever whose results are computed once per query (at `depth`) and sliced.

    Exact search returns the same top 10 as the first 10 of its top 160, so every setting
    reads one dense and one BM25 search per question instead of one each.
    """

    def __init__(self, retriever, depth: int) -> None:
        self.retriever, self.depth, self.memo = retriever, depth, {}

    def retrieve(self, collection, query, top_k, filters=None):
        key = (collection, query)
        if key not in self.memo:
            self.memo[key] = self.retriever.retrieve(collection, query, self.depth, filters)
        return self.memo[key][:top_k]


class ExactDense:
    """The `dense` retriever's ranking (exact cosine top-k), computed with NumPy.

    Gets the stored vectors of every chunk once through the store's public `vectors()`
    and answers by one matrix product, so the benchmark does not wait on a store that
    scans every point in Python per query (the embedded store of today). Exact search,
    so the ranking is the one `DenseRetriever` gets from an exact store.
    """

    def __init__(self, store, embedder, chunks: list) -> None:
        self.embedder = embedder
        stored = {}
        for i in range(0, len(chunks), 1024):
            stored |= store.vectors(COLLECTION, [c.id for c in chunks[i : i + 1024]])
        self.chunks = [c for c in chunks if c.id in stored]
        self.matrix = np.asarray([stored[c.id] for c in self.chunks], dtype=np.float32)  # [N, D]

    def retrieve(self, collection, query, top_k, filters=None):
        scores = self.matrix @ self.embedder.encode([query])[0]  # [N]
        top = np.argsort(-scores, kind="stable")[:top_k]
        return [
            RetrievedChunk(self.chunks[i], float(scores[i]), "dense", self.matrix[i]) for i in top
        ]


def query_likelihood_scorer(checkpoint: Path):
    """An Atlas engine serving `checkpoint` in this process, and its `score_texts`.

    The same scorer `atlas serve` gives rerankers (`api/scoring.py`): every candidate of a
    query goes to the engine in one call, as prompt-logprobs requests prefilled together.
    """
    from atlas_server.api.scoring import EngineScorer
    from atlas_server.api.state import ServerState
    from atlas_server.config import EngineSection, ServerConfig

    # Larger steps than the server's default: 40 passages of ~300 tokens per call.
    engine = EngineSection(max_batched_tokens=4096, max_running=64)
    state = ServerState(msgspec.structs.replace(ServerConfig(), engine=engine))
    state.load(str(checkpoint))
    return state, EngineScorer(state).score_texts


def settings(
    store, embedder, chunks, cross_encoder: Path | None, score_texts=None
) -> dict[str, tuple]:
    """label -> (retriever object, reranker object or None) of every setting measured."""
    # What the pipeline asks for: a reranker gets 4 x top_k candidates, and fusion asks
    # each retriever for 4 x its own top_k, so dense and BM25 go 16 x top_k deep.
    depth = 4 * TOP_K
    base = RAGContext(store, embedder)
    parts = {
        "dense": Cached(ExactDense(store, embedder, chunks), 4 * depth),
        "bm25": Cached(retrievers.BM25Retriever(base), 4 * depth),
    }

    def fused(method: str, weights: dict | None = None):
        ctx = RAGContext(store, embedder, None, parts, {"weights": weights} if weights else {})
        return Cached(retrievers.HybridRetriever(ctx, method), depth)

    rows = {"dense": (parts["dense"], None), "bm25": (parts["bm25"], None)}
    for method, label in (("score", "hybrid"), ("rrf", "hybrid-rrf")):
        for w in BM25_WEIGHTS:
            rows[f"{label}, bm25 weight {w}"] = (fused(method, {"dense": 1.0, "bm25": w}), None)
    default = fused("score")
    mmr = rerankers.MMRReranker(base)
    rows["hybrid (default) + mmr"] = (default, mmr)
    rows["dense + mmr"] = (parts["dense"], mmr)
    if cross_encoder:
        ctx = RAGContext(store, embedder, options={"model_path": str(cross_encoder)})
        rows["hybrid (default) + cross-encoder"] = (default, rerankers.CrossEncoderReranker(ctx))
    if score_texts is not None:
        ctx = RAGContext(store, embedder, score_texts=score_texts)
        rows["hybrid (default) + query-likelihood"] = (
            default,
            rerankers.QueryLikelihoodReranker(ctx),
        )
    return rows


def scores(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    host = get_plugin_host()
    out = {}
    out["ndcg@10"] = host.metrics["ndcg"]().compute_ranking(ranked, relevant).scores["ndcg@10"]
    out["recall@10"] = (
        host.metrics["recall_at_k"]().compute_ranking(ranked, relevant).scores["recall@10"]
    )
    out["mrr"] = host.metrics["mrr"]().compute_ranking(ranked, relevant).scores["mrr"]
    return out


def ranked_sources(question: str, retriever, reranker) -> list[str]:
    """The top 10 chunks' sources, repeats removed (candidates 4 x 10 when reranking)."""
    if reranker is None:
        results = retriever.retrieve(COLLECTION, question, TOP_K)
    else:
        candidates = retriever.retrieve(COLLECTION, question, 4 * TOP_K)
        results = reranker.rerank(question, candidates, TOP_K)
    seen: list[str] = []
    for r in results:
        if r.chunk.source not in seen:
            seen.append(r.chunk.source)
    return seen


def migrate_local(folder: Path, store: VectorStore, chunks: list) -> None:
    """Copy vectors from this benchmark's earlier qdrant-client local-mode store, if any.

    The stores of runs before the embedded default became Qdrant Edge are local-mode
    folders of the same chunks (same ids); copying their vectors saves embedding the
    corpus again, and ingest then finds every chunk stored.
    """
    old_folder = folder.with_name(folder.name.removesuffix("-edge"))
    if store.count(COLLECTION) or not (old_folder / "collection" / COLLECTION).is_dir():
        return
    from atlas_server.rag.store import open_store as open_named

    old = open_named("qdrant", old_folder)
    copied = 0
    for i in range(0, len(chunks), 512):
        part = chunks[i : i + 512]
        stored = old.vectors(COLLECTION, [c.id for c in part])
        have = [c for c in part if c.id in stored]
        if have:
            store.upsert(COLLECTION, have, np.asarray([stored[c.id] for c in have], np.float32))
            copied += len(have)
    old.close()
    print(f"copied {copied} stored vectors from {old_folder}", flush=True)


def open_corpus_store(
    backend: str, docs: list[Document], store_root: Path
) -> tuple[VectorStore, Embedder, list]:
    """The corpus in an embedded (Qdrant Edge) store of this embedder backend, resumable."""
    from atlas_server.rag.store import open_store as open_named

    embedder = Embedder(backend=backend)
    chunks = [
        c
        for d in docs
        for c in chunk_text(d.text, d.source, embedder.count_pieces, ChunkSettings(), d.title)
    ]
    folder = store_root / f"{embedder.backend}-{len(docs)}docs-edge"
    store = open_named("embedded", folder)
    store.ensure_collection(COLLECTION, embedder.dim)
    migrate_local(folder, store, chunks)
    result = ingest(store, embedder, COLLECTION, docs, progress=True)
    print(
        f"[{embedder.backend}] corpus: {result['chunks']} chunks ({result['embedded']} embedded "
        f"now, {result['embedded'] / max(result['seconds'], 1e-9):.1f}/s)",
        flush=True,
    )
    return store, embedder, chunks


def table(results: dict, split: str, questions: list[dict]) -> str:
    n = sum(q["split"] == split for q in questions)
    lines = [
        f"\n{split} ({n} questions)\n",
        "| setting | nDCG@10 | recall@10 | MRR |",
        "|---|---|---|---|",
    ]
    for label, by_split in results.items():
        s = by_split[split]
        lines.append(f"| {label} | {s['ndcg@10']:.3f} | {s['recall@10']:.3f} | {s['mrr']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, help="the package's html/_sources folder")
    parser.add_argument("--backends", default="auto", help="embedder backends, comma-separated")
    parser.add_argument("--store-dir", type=Path, default=cache_dir().parent / "bench-retrieval")
    parser.add_argument("--cross-encoder", type=Path, help="a local CrossEncoder folder")
    parser.add_argument(
        "--query-likelihood",
        type=Path,
        metavar="CHECKPOINT",
        help="an Atlas checkpoint folder: adds the query-likelihood reranker's row",
    )
    parser.add_argument("--limit", type=int, help="only the first N questions (for testing)")
    parser.add_argument(
        "--pages",
        help="only documents of pages starting with these prefixes, comma-separated "
        "(e.g. faq,glossary,tutorial,howto: a smaller corpus for comparing backends)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"{started}, load average {os.getloadavg()[0]:.2f}", flush=True)
    root = args.docs or docs_sources()
    corpus = build_corpus(root)
    if args.pages:
        corpus = [d for d in corpus if d["source"].startswith(tuple(args.pages.split(",")))]
    docs = [Document(d["text"], d["source"], d["title"]) for d in corpus]
    sources = {d.source for d in docs}
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line]
    questions = [q for q in questions if set(q["relevant"]) <= sources]
    questions = questions[: args.limit] if args.limit else questions
    print(f"{len(docs)} documents, {len(questions)} questions", flush=True)
    report: dict = {
        "date": started,
        "documents": len(docs),
        "questions": len(questions),
        "pages": args.pages or "all",
        "backends": {},
    }

    state, score_texts = None, None
    if args.query_likelihood:
        state, score_texts = query_likelihood_scorer(args.query_likelihood)
        report["query_likelihood_checkpoint"] = str(args.query_likelihood)
    for index, backend in enumerate(args.backends.split(",")):
        store, embedder, chunks = open_corpus_store(backend, docs, args.store_dir)
        rows = settings(store, embedder, chunks, args.cross_encoder, score_texts)
        if index > 0:  # other backends: the retrievers that use the embedder
            rows = {k: v for k, v in rows.items() if k in ("dense", "hybrid, bm25 weight 0.25")}
        results: dict = {}
        per_question: dict = {}
        for label, (retriever, reranker) in rows.items():
            t0 = time.perf_counter()
            ranked = [
                ranked_sources(q["question"], retriever, reranker)
                for q in tqdm(questions, desc=label, unit="question", file=sys.stderr)
            ]
            ms = (time.perf_counter() - t0) * 1000 / len(questions)
            per_question[label] = ranked
            results[label] = {
                split: scores(
                    [r for r, q in zip(ranked, questions, strict=True) if q["split"] == split],
                    [set(q["relevant"]) for q in questions if q["split"] == split],
                )
                for split in ("dev", "test")
            }
            results[label]["ms_per_query"] = ms
            dev = results[label]["dev"]
            print(
                f"[{embedder.backend}] {label}: dev nDCG@10 {dev['ndcg@10']:.3f} "
                f"({ms:.0f} ms/query beyond what earlier settings cached)",
                flush=True,
            )
        store.close()
        label = f"{backend} ({embedder.backend})"
        report["backends"][label] = results
        print(f"\n## embedder backend {label}")
        for split in ("dev", "test"):
            print(table(results, split, questions))
        kinds = sorted({q["kind"] for q in questions})
        print("\nby question kind, test split, nDCG@10:\n")
        print("| setting | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
        for name, ranked in per_question.items():
            cells = []
            for kind in kinds:
                pick = [
                    i for i, q in enumerate(questions) if q["kind"] == kind and q["split"] == "test"
                ]
                s = scores([ranked[i] for i in pick], [set(questions[i]["relevant"]) for i in pick])
                cells.append(f"{s['ndcg@10']:.3f} ({len(pick)})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    if state is not None:
        state.shutdown()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
