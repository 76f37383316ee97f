"""The `retrieval` suite: ranking quality of a server's `POST /v1/retrieve` on a labelled question set.

What it does: fills a collection on the server with a corpus (`POST
/v1/collections/NAME/documents`, in batches; the server embeds only chunks it does not hold
yet, so a rerun or an interrupted run costs little), asks every question of a labelled set
through `/v1/retrieve` (top `top_k` chunks, with the configured retriever and reranker or
the server's defaults) and scores the ranking against the question's relevant documents
(and with the ranking metric plugins `metrics` names, a third party's included, whose
scores are `NAME/SCORE`):
nDCG@k, recall@k and MRR with k = `top_k` (`ndcg_at_10`, `recall_at_10` with the default 10;
binary relevance, as the ranking metric plugins `ndcg`, `recall_at_k`, `mrr` score), over
all questions and per split (`dev`: choose settings there; `test`: quote it) and per
question kind. The ranking scored is the retrieved chunks' `source`s with repeats removed,
in rank order: the documents a RAG prompt with `top_k` sources would draw on. So k counts
chunks, and fewer than k documents are ranked where chunks share a source: BEIR's nDCG@10
ranks 10 documents. The metrics are named after the cutoff applied, never "@10" for
another top_k.

The default set is the 310 questions of the Python 3.11 documentation
(`retrieval/python_docs_qa.jsonl`, built by `eval_suites/data/build_retrieval.py`), over
every section and glossary entry of that documentation (4,106 documents) as the corpus,
built on this machine from Debian's `python3.11-doc` (fetched once with `apt-get download`
into the cache, or from `docs_dir`). `corpus` may instead name a JSONL file of documents
(`{"text", "source", "title"?}`) and `questions` a JSONL of `{"id", "question", "relevant":
[source, ...], "split"?, "kind"?}`, to measure a collection of one's own.

The collection is named by a hash of the corpus (`retrieval-<hash>` unless `collection` is
set), so answers in the response cache never outlive a change of corpus, and it is kept
after the run (`keep_collection`): filling it embeds every chunk (minutes on a CPU), and a
rerun with another retriever or reranker reuses it. A collection of that name holding other
chunks stops the run with a one-line error. Only Atlas serves these routes; another server
stops the run with a one-line CapabilityError.
What it does not do: generate or judge answers (the `hallucination` suite's `context=rag`
does), or tune anything: it measures the settings it is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import OpenAIClient, gather_with_progress
from ..errors import CapabilityError, ServerRequestError, SuiteConfigError
from ..metrics import check_ranking_metrics, compute_ranking_metric, load_metric
from .base import (
    DATA_DIR,
    RunContext,
    Suite,
    SuiteResult,
    data_path,
    file_sha256,
    metric,
    missing_data_file,
    read_jsonl,
)

__all__ = ["RetrievalConfig", "RetrievalSuite", "load_corpus", "ranked_sources", "score_rankings"]

PYTHON_DOCS = "python-docs"  # `corpus` value: build the Python documentation corpus here


@dataclass(frozen=True)
class RetrievalConfig:
    questions: str  # JSONL; a relative path as base.data_path finds it
    corpus: str  # "python-docs" or a JSONL file of documents
    docs_dir: str  # python-docs: the package's html/_sources folder; "" = fetch into the cache
    collection: str  # "" = retrieval-<hash of the corpus>
    keep_collection: bool
    top_k: int
    retriever: str  # "" = the server's default
    reranker: str  # "" = the server's default
    splits: tuple[str, ...]  # which questions to ask, by split; empty = all
    batch_documents: int  # documents per ingest request
    max_context_tokens: int  # unused (no prompts); kept for the runner's context check
    metrics: tuple[str, ...]  # more ranking metric plugins, scored on the same rankings

    def validate(self) -> None:
        check_ranking_metrics(self.metrics)
        if not 1 <= self.top_k <= 100:
            raise SuiteConfigError("retrieval: top_k must be between 1 and 100")
        if self.batch_documents < 1:
            raise SuiteConfigError("retrieval: batch_documents must be at least 1")
        if self.corpus != PYTHON_DOCS and not data_path(self.corpus).is_file():
            raise SuiteConfigError(
                f"retrieval: corpus must be {PYTHON_DOCS!r} or a JSONL file of documents;"
                f" {missing_data_file(self.corpus)}"
            )
        if not data_path(self.questions).is_file():
            raise SuiteConfigError(f"retrieval: questions file {missing_data_file(self.questions)}")


def _read_jsonl(path: Path, what: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    return read_jsonl(path, "retrieval", what, required)


def load_corpus(cfg: RetrievalConfig) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(documents for the ingest route, data files with their sha256 for results.json)."""
    if cfg.corpus != PYTHON_DOCS:
        path = data_path(cfg.corpus)
        docs = _read_jsonl(path, "corpus", ("text", "source"))
        return [
            {"text": d["text"], "source": d["source"], "title": d.get("title") or d["source"]}
            for d in docs
        ], {cfg.corpus: file_sha256(path)}
    build = _build_retrieval()
    root = Path(cfg.docs_dir) if cfg.docs_dir else build.docs_sources()
    if not root.is_dir():
        raise SuiteConfigError(f"retrieval: docs_dir {root} is not a folder")
    docs = [
        {"text": d["text"], "source": d["source"], "title": d["title"]}
        for d in build.build_corpus(root)
    ]
    return docs, {}


def _build_retrieval():
    """eval_suites/data/build_retrieval.py (a script beside the data, not a package module)."""
    path = DATA_DIR / "build_retrieval.py"
    spec = importlib.util.spec_from_file_location("atlas_build_retrieval", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_hash(docs: list[dict[str, str]]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        digest.update(json.dumps(d, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def ranked_sources(chunks: list[dict[str, Any]]) -> list[str]:
    """The chunks' sources in rank order, repeats removed."""
    seen: list[str] = []
    for c in chunks:
        if c.get("source") not in seen:
            seen.append(c.get("source"))
    return seen


def score_rankings(ranked: list[list[str]], relevant: list[set[str]], k: int) -> dict[str, float]:
    """nDCG@k, recall@k and MRR of the rankings, with binary relevance as the ranking metric
    plugins score them (`ndcg`, `recall_at_k`, `mrr`). k is `top_k`, the cutoff the ranking
    had: the distinct sources of the top k chunks, so at most k documents (fewer where
    chunks share a source) — not BEIR's k documents. The plugins cut at 1, 3, 5 and 10 only:
    nDCG and recall at k are computed here by their formulas (equal at k = 10, tested)."""
    n = max(1, len(ranked))
    ndcg = recall = 0.0
    for ids, rel in zip(ranked, relevant, strict=True):
        top = ids[:k]
        dcg = sum(1.0 / math.log2(i + 2) for i, x in enumerate(top) if x in rel)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
        ndcg += dcg / ideal if ideal else 0.0
        recall += len(set(top) & rel) / max(1, len(rel))
    return {
        f"ndcg_at_{k}": ndcg / n,
        f"recall_at_{k}": recall / n,
        "mrr": load_metric("mrr").compute_ranking(ranked, relevant).scores["mrr"],
    }


async def fill_collection(
    client: OpenAIClient, name: str, docs: list[dict[str, str]], batch: int
) -> dict[str, Any]:
    """Ingest the corpus in batches; refuse a collection that holds other chunks."""
    from atlas_server.progress import progress_bar

    path = f"/v1/collections/{name}/documents"
    chunks = embedded = 0
    total = None
    with progress_bar(total=len(docs), desc=f"filling {name}", unit="doc", leave=False) as bar:
        for start in range(0, len(docs), batch):
            part = docs[start : start + batch]
            answer = await client.request("POST", path, {"documents": part})
            if not isinstance(answer, dict) or not isinstance(answer.get("chunks"), int):
                raise ServerRequestError(
                    f"POST {path} did not answer with chunk counts: {answer!r:.120}"
                )
            chunks += answer["chunks"]
            embedded += int(answer.get("embedded", 0) or 0)
            total = answer.get("total")
            bar.update(len(part))
    if isinstance(total, int) and total != chunks:
        raise ServerRequestError(
            f"collection {name} holds {total} chunks after ingesting {chunks}; it has other"
            f" content: delete it (DELETE /v1/collections/{name}) or set collection = NAME"
        )
    return {"collection": name, "documents": len(docs), "chunks": chunks, "embedded_now": embedded}


class RetrievalSuite(Suite):
    name = "retrieval"
    seeded = False  # every item, scored the same way whatever the seed
    description = (
        "ranking quality of /v1/retrieve on labelled questions: nDCG@k, recall@k, MRR (k = top_k)"
    )
    metrics = (
        "ndcg_at_{k}",
        "recall_at_{k}",
        "mrr",
        "{split}_ndcg_at_{k}",
        "{split}_mrr",
        "{plugin}/{score}",
    )
    metrics_note = (
        "{k}: top_k, the chunks ranked (10 by default: ndcg_at_10); {split}: each split asked"
        " (dev, test); {plugin}/{score}: each ranking metric plugin in `metrics`"
    )
    config_cls = RetrievalConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: RetrievalConfig = ctx.config
        questions = _read_jsonl(
            data_path(cfg.questions), "questions", ("id", "question", "relevant")
        )
        if cfg.splits:
            questions = [q for q in questions if q.get("split") in cfg.splits]
        if ctx.limit:
            questions = questions[: ctx.limit]
        if not questions:
            raise SuiteConfigError(
                f"retrieval: no question of {cfg.questions} is in splits {list(cfg.splits)}"
            )
        try:
            await ctx.client.request("GET", "/v1/collections")
        except ServerRequestError as e:
            if e.status in (404, 405):
                raise CapabilityError(
                    f"the retrieval suite needs Atlas's RAG routes, but {ctx.client.base_url}"
                    f" answered GET /v1/collections with HTTP {e.status}; run it against"
                    " `atlas serve` with [rag] enabled"
                ) from None
            raise
        docs, data_files = load_corpus(cfg)
        sources = {d["source"] for d in docs}
        unanswerable = [q["id"] for q in questions if not set(q["relevant"]) & sources]
        if unanswerable:
            raise SuiteConfigError(
                f"retrieval: {len(unanswerable)} question(s) have no relevant document in the"
                f" corpus, e.g. {unanswerable[0]!r}: the questions and the corpus do not match"
            )
        data_files[cfg.questions] = file_sha256(data_path(cfg.questions))
        collection = cfg.collection or f"retrieval-{corpus_hash(docs)}"
        filled = await fill_collection(ctx.client, collection, docs, cfg.batch_documents)

        def body(q: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {
                "collection": collection,
                "query": q["question"],
                "top_k": cfg.top_k,
            }
            if cfg.retriever:
                out["retriever"] = cfg.retriever
            if cfg.reranker:
                out["reranker"] = cfg.reranker
            return out

        try:
            answers = await gather_with_progress(
                (ctx.client.cached_post("/v1/retrieve", body(q)) for q in questions),
                desc="retrieval",
                total=len(questions),
            )
        finally:
            if not cfg.keep_collection:
                await ctx.client.request("DELETE", f"/v1/collections/{collection}")
                filled["deleted"] = True
        samples, ranked = [], []
        for q, answer in zip(questions, answers, strict=True):
            chunks = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(chunks, list):
                raise ServerRequestError(
                    f"POST /v1/retrieve answered without data: {answer!r:.120}"
                )
            ranking = ranked_sources(chunks)
            ranked.append(ranking)
            relevant = set(q["relevant"])
            hit = next((i for i, s in enumerate(ranking, 1) if s in relevant), None)
            samples.append(
                {
                    "id": q["id"],
                    "split": q.get("split"),
                    "kind": q.get("kind"),
                    "question": q["question"],
                    "relevant": q["relevant"],
                    "ranked_sources": ranking,
                    "first_relevant_rank": hit,
                    "chunk_ids": [c.get("id") for c in chunks],
                }
            )
        relevant = [set(q["relevant"]) for q in questions]
        k = cfg.top_k
        overall = score_rankings(ranked, relevant, k)
        groups: dict[str, dict[str, list[int]]] = {
            "split": defaultdict(list),
            "kind": defaultdict(list),
        }
        for i, q in enumerate(questions):
            for field in groups:
                if q.get(field):
                    groups[field][q[field]].append(i)
        by = {
            field: {
                value: {
                    "questions": len(index),
                    **score_rankings([ranked[i] for i in index], [relevant[i] for i in index], k),
                }
                for value, index in sorted(members.items())
            }
            for field, members in groups.items()
        }
        metrics = {
            f"ndcg_at_{k}": metric(
                overall[f"ndcg_at_{k}"],
                True,
                f"nDCG@{k} of the distinct sources of the top {k} chunks, all questions asked",
            ),
            f"recall_at_{k}": metric(
                overall[f"recall_at_{k}"],
                True,
                f"share of relevant documents among the sources of the top {k} chunks",
            ),
            "mrr": metric(
                overall["mrr"], True, "mean reciprocal rank of the first relevant source"
            ),
        }
        for split, scores in by["split"].items():
            for key, value in scores.items():
                if key != "questions":
                    metrics[f"{split}_{key}"] = metric(value, True, f"{key} on the {split} split")
        for name in cfg.metrics:  # a plugin's own cutoffs and formulas, on the same rankings
            scores, flags, _ = compute_ranking_metric(name, ranked, relevant)
            for key, value in scores.items():
                metrics[f"{name}/{key}"] = metric(
                    value, flags[key], f"{name} plugin, distinct sources of the top {k} chunks"
                )
        return SuiteResult(
            metrics=metrics,
            samples=samples,
            data_files=data_files,
            details={
                "collection": filled,
                "retriever": cfg.retriever or "server default",
                "reranker": cfg.reranker or "server default",
                "questions": len(questions),
                "by_split": by["split"],
                "by_kind": by["kind"],
            },
        )
