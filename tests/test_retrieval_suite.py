"""The `retrieval` eval suite through real HTTP: a tiny Atlas server with RAG on a temporary store.

What is checked against something the suite did not compute itself: the server's own
`/v1/retrieve` answers, asked directly here, scored by hand (one relevant document per
question: nDCG@10 = 1 / log2(1 + rank), MRR = 1 / rank, recall@10 = hit), and the server's
`/v1/collections` listing.
"""

from __future__ import annotations

import http.server
import json
import math
import sys
import threading
from pathlib import Path

import httpx
import pytest

from atlas_server.api import ServerState, create_app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.plugins import PluginHost
from eval_suites.errors import ServerRequestError, SuiteConfigError

sys.path.insert(0, str(Path(__file__).parent))
from servers import serving  # noqa: E402
from test_eval_e2e import assert_one_line_error, cli, run  # noqa: E402
from test_eval_hallucination_rag import NoRAGHandler  # noqa: E402

DOCS = [
    ("bisect", "The bisect module keeps a list in sorted order without sorting it after each insertion."),
    ("heapq", "The heapq module implements a priority queue: the smallest item is always first."),
    ("json", "The json module encodes Python objects as JSON text and decodes JSON text back."),
    ("socket", "The socket module opens network connections and sends and receives bytes."),
    ("zipfile", "The zipfile module reads and writes ZIP archives of compressed files."),
    ("random", "The random module draws pseudo-random numbers, shuffles lists and samples items."),
    # A second chunk of one source: the ranking scored counts each source once.
    ("bisect", "bisect.insort inserts an item into a list that is already sorted."),
]  # fmt: skip
QUESTIONS = [
    ("q1", "How do I keep a list sorted while inserting?", "bisect", "dev"),
    ("q2", "Which module gives me a priority queue?", "heapq", "dev"),
    ("q3", "How can I turn a dict into JSON text?", "json", "test"),
    ("q4", "How do I compress files into an archive?", "zipfile", "test"),
    ("q5", "How do I send bytes over the network?", "socket", "test"),
]


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory, byte_tokenizer):
    import torch

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import Transformer, load_preset

    torch.manual_seed(0)
    model = Transformer(load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size))
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, byte_tokenizer)
    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("store"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(checkpoint))
    with serving(create_app(state, plugin_host=PluginHost())) as base:
        yield base


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("retrieval-data")
    corpus, questions = folder / "corpus.jsonl", folder / "questions.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t, "source": s, "title": s}) + "\n" for s, t in DOCS)
    )
    questions.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "relevant": [r], "split": sp, "kind": "module"})
            + "\n"
            for i, q, r, sp in QUESTIONS
        )
    )
    return corpus, questions


def by_hand(base: str, collection: str, question: str, relevant: str, **extra) -> dict:
    """The server's ranking for one question, scored here."""
    body = {"collection": collection, "query": question, "top_k": 10, **extra}
    chunks = httpx.post(base + "/v1/retrieve", json=body, timeout=60).json()["data"]
    sources = list(dict.fromkeys(c["source"] for c in chunks))
    rank = sources.index(relevant) + 1 if relevant in sources[:10] else None
    return {
        "ndcg": 1 / math.log2(1 + rank) if rank else 0.0,
        "mrr": 1 / rank if rank else 0.0,
        "recall": 1.0 if rank else 0.0,
    }


def collections(base: str) -> dict[str, int]:
    return {c["name"]: c["chunks"] for c in httpx.get(base + "/v1/collections").json()["data"]}


def test_the_suite_scores_the_servers_own_rankings(tmp_path, rag_server, data):
    corpus, questions = data
    sets = (f"corpus={corpus}", f"questions={questions}", "collection=mods")
    results = run(tmp_path, "retrieval", rag_server, *sets, "reranker=mmr")
    hand = [by_hand(rag_server, "mods", q, r, reranker="mmr") for _, q, r, _ in QUESTIONS]
    metrics = {k: v["value"] for k, v in results["metrics"].items()}
    assert metrics["ndcg_at_10"] == pytest.approx(sum(h["ndcg"] for h in hand) / len(hand))
    assert metrics["mrr"] == pytest.approx(sum(h["mrr"] for h in hand) / len(hand))
    assert metrics["recall_at_10"] == pytest.approx(sum(h["recall"] for h in hand) / len(hand))
    test = [h for h, q in zip(hand, QUESTIONS, strict=True) if q[3] == "test"]
    assert metrics["test_mrr"] == pytest.approx(sum(h["mrr"] for h in test) / len(test))
    assert results["details"]["by_split"]["dev"]["questions"] == 2
    assert results["details"]["reranker"] == "mmr"
    assert [s["id"] for s in results["_samples"]] == [q[0] for q in QUESTIONS]
    # Kept, with every document's chunks; a rerun embeds nothing and scores the same.
    assert collections(rag_server)["mods"] == results["details"]["collection"]["chunks"] == 7
    again = run(tmp_path, "retrieval", rag_server, *sets, "reranker=mmr", "splits=['test']")
    assert again["details"]["collection"]["embedded_now"] == 0
    assert again["metrics"]["mrr"]["value"] == pytest.approx(metrics["test_mrr"])


def test_the_collection_is_dropped_unless_kept(tmp_path, rag_server, data):
    corpus, questions = data
    sets = (f"corpus={corpus}", f"questions={questions}", "collection=dropme")
    results = run(tmp_path, "retrieval", rag_server, *sets, "keep_collection=false")
    assert results["details"]["collection"]["deleted"]
    assert "dropme" not in collections(rag_server)


def test_mismatched_questions_and_foreign_collections_stop_the_run(tmp_path, rag_server, data):
    corpus, questions = data
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": DOCS[0][1], "source": "bisect"}) + "\n")
    with pytest.raises(SuiteConfigError, match="no relevant document in the corpus"):
        run(tmp_path, "retrieval", rag_server, f"corpus={other}", f"questions={questions}")
    # A collection of that name already holding other chunks would mix them into rankings.
    httpx.post(
        rag_server + "/v1/collections/taken/documents",
        json={"documents": [{"text": "Unrelated text about gardening.", "source": "garden"}]},
        timeout=60,
    ).raise_for_status()
    with pytest.raises(ServerRequestError, match="other content"):
        run(
            tmp_path,
            "retrieval",
            rag_server,
            f"corpus={corpus}",
            f"questions={questions}",
            "collection=taken",
        )


def test_a_server_without_rag_routes_is_refused_in_one_line(tmp_path, data):
    corpus, questions = data
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRAGHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    NoRAGHandler.posted = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = cli(
            "run", "retrieval", "--base-url", url, "--no-cache", "-o", str(tmp_path / "r"),
            "--set", f"corpus={corpus}", "--set", f"questions={questions}",
        )  # fmt: skip
    finally:
        server.shutdown()
    assert_one_line_error(proc, "retrieval suite needs Atlas's RAG routes", "HTTP 404")
    assert NoRAGHandler.posted == []  # refused before ingesting or asking anything


class HitsAtTwo:
    """A third party's ranking metric: the share of queries with a relevant id in the top 2."""

    name = "hits-at-2"

    def compute(self, predictions, references):  # the text form every metric has
        raise AssertionError("the retrieval suite must call compute_ranking")

    def compute_ranking(self, ranked, relevant):
        from atlas_server.rag.types import MetricResult

        hits = [any(x in rel for x in ids[:2]) for ids, rel in zip(ranked, relevant, strict=True)]
        return MetricResult({"hits_at_2": sum(hits) / len(hits)}, {"hits_at_2": True}, None)


class NotRanking:
    name = "text-only"

    def compute(self, predictions, references):
        raise AssertionError("never called")


def test_ranking_metric_plugins_score_the_same_rankings(tmp_path, rag_server, data, monkeypatch):
    """`metrics` names ranking metric plugins (a third party's too); their scores are
    NAME/SCORE, on the rankings the server gave; a name without compute_ranking stops the
    run before any request."""
    import atlas_server.plugins as plugins_module
    from atlas_server.hookspecs import hookimpl

    class ThirdParty:
        @staticmethod
        @hookimpl
        def atlas_register_metrics(register):
            register("hits-at-2", HitsAtTwo)
            register("text-only", NotRanking)

    host = PluginHost()
    host.register(ThirdParty, "third-party-metrics")
    host.collect()
    monkeypatch.setattr(plugins_module, "get_plugin_host", lambda: host)
    corpus, questions = data
    sets = (f"corpus={corpus}", f"questions={questions}", "collection=mods")
    results = run(tmp_path, "retrieval", rag_server, *sets, "metrics=['hits-at-2', 'mrr']")
    ranks = [s["first_relevant_rank"] for s in results["_samples"]]
    metrics = {k: v["value"] for k, v in results["metrics"].items()}
    assert metrics["hits-at-2/hits_at_2"] == pytest.approx(
        sum(r is not None and r <= 2 for r in ranks) / len(ranks)
    )
    assert metrics["mrr/mrr"] == pytest.approx(metrics["mrr"])
    with pytest.raises(SuiteConfigError, match="'text-only' is not a ranking metric"):
        run(tmp_path, "retrieval", rag_server, *sets, "metrics=['text-only']")
