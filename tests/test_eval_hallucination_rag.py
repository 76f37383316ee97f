"""The hallucination suite's rag mode through real HTTP: a tiny Atlas server with RAG enabled.

What is checked against something the suite did not compute itself: the requests stored in
the response cache (they carried `rag`), the server's own `/v1/collections` and
`/v1/retrieve` answers, and retrieval recall recomputed from the sources the server
returned (recorded in samples.jsonl) and the item ids.
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import sys
import threading
from pathlib import Path

import httpx
import pytest

from atlas_server.api import ServerState, create_app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.plugins import PluginHost
from eval_suites.config import load_suite_config
from eval_suites.suites.base import DATA_DIR
from eval_suites.suites.hallucination import (
    HallucinationConfig,
    Judgements,
    build_items,
    collection_name,
    needed_pairs,
    rag_documents,
    score_answer,
    sentences_of,
    summarise,
    with_given_sources,
)
from eval_suites.support import LexicalJudge

sys.path.insert(0, str(Path(__file__).parent))
from servers import serving  # noqa: E402
from test_eval_e2e import assert_one_line_error, cli, run  # noqa: E402

FACTS = [
    json.loads(line)
    for line in (DATA_DIR / "hallucination" / "facts.jsonl").read_text().splitlines()
    if line
]
RAG = ("context=rag", "rag_top_k=2", "max_tokens=8", "metrics=[]")


@pytest.fixture(scope="module")
def rag_atlas(tmp_path_factory, byte_tokenizer):
    """gpt2-tiny (2048 positions, so two sources fit) served with RAG on a temporary store."""
    import torch

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import Transformer, load_preset

    torch.manual_seed(0)
    model = Transformer(
        load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size, max_seq_len=2048)
    )
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, byte_tokenizer)
    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("qdrant"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(checkpoint))
    app = create_app(state, plugin_host=PluginHost())
    with serving(app) as base:
        yield base


def collections(base: str) -> dict[str, int]:
    return {c["name"]: c["chunks"] for c in httpx.get(base + "/v1/collections").json()["data"]}


def test_collections_are_named_by_content_and_keep_counterfactuals_apart():
    cfg = load_suite_config("hallucination", HallucinationConfig)
    true_docs = rag_documents(FACTS, cfg, counterfactual=False)
    cf_docs = rag_documents(FACTS, cfg, counterfactual=True)
    assert collection_name("facts", true_docs) == collection_name("facts", list(true_docs))
    assert collection_name("facts", true_docs) != collection_name("counterfactual", true_docs)
    clipped = load_suite_config(
        "hallucination", HallucinationConfig, overrides=["max_passage_chars=60"]
    )
    assert collection_name("facts", rag_documents(FACTS, clipped, False)) != collection_name(
        "facts", true_docs
    )
    for fact, t, c in zip(FACTS, true_docs, cf_docs, strict=True):
        assert t["source"] == c["source"] == fact["id"]
        assert t["text"] == fact["passage"].format(answer=fact["answer"])
        assert c["text"] == fact["passage"].format(answer=fact["counterfactual"])


def test_rag_answers_are_scored_against_the_sources_the_server_gave():
    cfg = load_suite_config("hallucination", HallucinationConfig, overrides=["context=rag"])
    item = next(it for it in build_items(FACTS, cfg, seed=0) if it.kind == "counterfactual")
    fact = next(f for f in FACTS if f["id"] == item.id.split("/")[0])
    other = next(f for f in FACTS if f["id"] != fact["id"])
    given = [  # as the server lists them: the gold passage second
        {"id": 1, "source": other["id"], "heading": other["title"],
         "text": other["passage"].format(answer=other["counterfactual"])},
        {"id": 2, "source": fact["id"], "heading": fact["title"],
         "text": fact["passage"].format(answer=fact["counterfactual"])},
    ]  # fmt: skip
    posed = with_given_sources(item, given)
    assert posed.gold_indices == (2,) and [s.fact_id for s in posed.sources] == [
        other["id"],
        fact["id"],
    ]
    # [3] names no source the server gave: invalid, and it breaks that sentence's recall.
    claim = next(x for x in sentences_of(given[1]["text"]) if fact["counterfactual"] in x)
    answer = f"{claim.rstrip('.')} [2]. It took 98765 days [3]."
    judgements = Judgements(LexicalJudge(0.65))
    judgements.fill(needed_pairs(posed, answer))
    scores = score_answer(posed, answer, judgements)
    assert scores["adherent"] and scores["cites_gold"]
    assert (scores["citations"], scores["valid_citations"]) == (2, 1)
    assert scores["sentences"] == 2 and scores["supported_sentences"] == 1
    assert scores["cited_sentences_supported"] == 1 and scores["precise_citations"] == 1
    assert scores["unsupported_numbers"] == 1  # 98765 is in no given source


def test_rag_summary_reports_recall_and_leaves_out_distractor_and_position_metrics():
    rag_cfg = load_suite_config("hallucination", HallucinationConfig, overrides=["context=rag"])

    def sample(kind: str, retrieved: bool | None) -> dict:
        scores = {"correct": True, "abstained": kind == "unanswerable"}
        if retrieved is not None:
            scores["gold_retrieved"] = retrieved
        return {"kind": kind, "scores": scores, "distractors": 2, "position": "first"}

    samples = [sample("answerable", True), sample("answerable", False)]
    samples += [sample("answerable", False), sample("unanswerable", None)]
    metrics = summarise(samples, rag_cfg)
    assert metrics["retrieval_recall_at_k"]["value"] == pytest.approx(1 / 3)
    assert not [m for m in metrics if m.startswith(("accuracy_", "noise"))]
    inline = summarise(samples, load_suite_config("hallucination", HallucinationConfig))
    assert "accuracy_distractors_2" in inline and "retrieval_recall_at_k" not in inline


def test_rag_mode_asks_through_the_servers_rag_field(tmp_path, rag_atlas):
    cache = tmp_path / "cache.sqlite"
    kept = run(
        tmp_path,
        "hallucination",
        rag_atlas,
        *RAG,
        "rag_keep_collections=true",
        limit=4,
        seed=0,
        cache=cache,
    )
    assert kept["config"]["context"] == "rag" and kept["config"]["rag_top_k"] == 2
    rag = kept["details"]["rag"]
    names = {role: info["collection"] for role, info in rag["collections"].items()}
    assert set(names) == {"facts", "counterfactual"} and rag["collections_deleted"] is False
    # The collections were filled (the server's own listing) with one chunk per passage.
    assert all(rag["collections"][r]["chunks"] == len(FACTS) for r in names)
    listed = collections(rag_atlas)
    assert all(listed[n] == len(FACTS) for n in names.values())

    samples = kept["_samples"]
    assert [s["kind"] for s in samples] == [
        "answerable",
        "counterfactual",
        "answerable",
        "unanswerable",
    ]
    # Every sourced request carried `rag` with the item's collection; closed-book ones did not
    # (an answerable and a counterfactual item may share a question, hence sets).
    db = sqlite3.connect(cache)
    requests = [
        json.loads(r)
        for (r,) in db.execute("SELECT request FROM responses WHERE path = ?", ("/v1/completions",))
    ]
    db.close()
    with_rag = {(r["prompt"], json.dumps(r["rag"], sort_keys=True)) for r in requests if "rag" in r}
    closed = [r["prompt"] for r in requests if "rag" not in r]
    assert len(with_rag) == 4 and len(closed) == len({s["question"] for s in samples})
    for s in samples:
        role = "counterfactual" if s["kind"] == "counterfactual" else "facts"
        rag_field = {"collection": names[role], "top_k": 2}
        assert (s["question"], json.dumps(rag_field, sort_keys=True)) in with_rag
        assert any(p.endswith(f"Question: {s['question']}\nAnswer:") for p in closed)
        assert s["collection"] == names[role].rsplit("-", 1)[0]  # the run-independent name
        assert "distractors" not in s and "position" not in s
        # What the suite recorded is what the server's retrieval returns for the question.
        direct = httpx.post(
            rag_atlas + "/v1/retrieve",
            json={"collection": names[role], "query": s["question"], "top_k": 2},
            timeout=60,
        ).json()["data"]
        assert [r["chunk_id"] for r in s["retrieved"]] == [d["id"] for d in direct]
        fact = s["id"].split("/")[0]
        gold = [n for n, r in enumerate(s["retrieved"], 1) if r["source"] == fact]
        assert s["gold_sources"] == (gold if s["kind"] != "unanswerable" else [])

    # Recall@k recomputed from the sources the server returned and the item ids.
    scored = [s for s in samples if s["kind"] != "unanswerable"]
    hits = [s["id"].split("/")[0] in {r["source"] for r in s["retrieved"]} for s in scored]
    assert kept["metrics"]["retrieval_recall_at_k"]["value"] == pytest.approx(sum(hits) / len(hits))
    # The counterfactual item found the counterfactual passage, never the true one.
    (cf,) = [s for s in samples if s["kind"] == "counterfactual"]
    fact = next(f for f in FACTS if f["id"] == cf["id"].split("/")[0])
    (passage,) = [r["text"] for r in cf["retrieved"] if r["source"] == fact["id"]]
    assert passage == fact["passage"].format(answer=fact["counterfactual"])
    assert cf["gold"] == fact["counterfactual"]

    metrics = kept["metrics"]
    assert {"accuracy", "closed_book_accuracy", "context_gain", "retrieval_recall_at_k"} <= set(
        metrics
    )
    assert not [
        m for m in metrics if m.startswith(("accuracy_distractors", "accuracy_position", "noise"))
    ]
    assert "noise_sensitivity" in rag["omitted_metrics"] and rag["omitted_because"]

    # A rerun fills collections of its own (so two runs on one server never delete each
    # other's), yet hits the same cache keys, and deletes only its own at the end.
    again = run(tmp_path, "hallucination", rag_atlas, *RAG, limit=4, seed=0, cache=cache)
    again_names = {info["collection"] for info in again["details"]["rag"]["collections"].values()}
    assert again["cache"]["misses"] == 0 and again["details"]["rag"]["collections_deleted"]
    assert again["metrics"] == kept["metrics"] and again["_samples"] == samples
    assert not again_names & set(names.values())
    listed = collections(rag_atlas)
    assert not again_names & set(listed) and set(names.values()) <= set(listed)
    for name in names.values():
        httpx.delete(f"{rag_atlas}/v1/collections/{name}", timeout=60).raise_for_status()


class NoRAGHandler(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server without Atlas's collection routes."""

    posted: list[str] = []

    def log_message(self, *args):
        return

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "plain", "object": "model"}]})
        else:
            self.reply(404, {"error": {"message": "Not Found"}})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        NoRAGHandler.posted.append(self.path)
        self.reply(404, {"error": {"message": "Not Found"}})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_rag_mode_against_a_server_without_rag_routes_is_one_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRAGHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = cli(
            "run",
            "hallucination",
            "--base-url",
            url,
            "--no-cache",
            "--limit",
            "1",
            "--set",
            "context=rag",
            "-o",
            str(tmp_path / "r"),
        )
    finally:
        server.shutdown()
    assert_one_line_error(proc, "rag mode", "/v1/collections", "HTTP 404", "context=inline")
    assert NoRAGHandler.posted == []  # refused before ingesting or asking anything


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("context=bogus", "context must be 'inline' or 'rag'"),
        ("rag_top_k=0", "rag_top_k must be between 1 and 100"),
        ("rag_top_k=100000", "rag_top_k must be between 1 and 100"),
        ("rag_keep_collections=maybe", "rag_keep_collections"),
    ],
)
def test_bad_rag_options_are_one_line_errors_before_any_request(override, named):
    proc = cli(
        "run", "hallucination", "--base-url", "http://127.0.0.1:9", "--no-cache", "--set", override
    )
    assert_one_line_error(proc, named)
