"""RAG inside the server: HTTP ingestion, retrieval, grounded answers with citations, plugins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from atlas_server.api import RequestError, ServerState, create_app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginHost
from atlas_server.rag.server import rag_extensions
from atlas_server.rag.types import RetrievedChunk

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, serving  # noqa: E402
from test_plugins import install_faiss_example  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    {
        "text": "The bisect module keeps a list in sorted order. insort inserts an item at its sorted position.",
        "source": "bisect.md",
        "title": "bisect",
    },
    {
        "text": "The heapq module implements the heap queue algorithm, also known as the priority queue.",
        "source": "heapq.md",
        "title": "heapq",
    },
    {
        "text": "The json module serializes Python objects to JSON text with dumps and parses it with loads.",
        "source": "json.md",
        "title": "json",
    },
]


class Exploding:
    def retrieve(self, collection, query, top_k, filters=None) -> list[RetrievedChunk]:
        raise ValueError("index corrupted")


class BrokenPlugin:
    @hookimpl
    def atlas_register_retrievers(self, register):
        register("exploding", lambda ctx: Exploding())


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, byte_tokenizer):
    """gpt2-tiny with a 1024-token context: byte-level prompts with sources are long."""
    import torch

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import Transformer, load_preset

    torch.manual_seed(0)
    model = Transformer(
        load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size, max_seq_len=1024)
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-long", model, byte_tokenizer)


@pytest.fixture(scope="module")
def rag_server(long_checkpoint, tmp_path_factory):

    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("qdrant"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(long_checkpoint))
    host = PluginHost()
    host.register(BrokenPlugin(), "broken-at-runtime")
    app = create_app(state, **rag_extensions(state, host))
    with serving(app) as base:
        r = httpx.post(
            base + "/v1/collections/std/documents", json={"documents": DOCS}, timeout=120
        )
        assert r.status_code == 200 and r.json()["total"] == 3, r.text
        yield base


def test_ingest_is_idempotent_over_http(rag_server):
    r = httpx.post(
        rag_server + "/v1/collections/std/documents", json={"documents": DOCS}, timeout=60
    )
    assert r.json()["total"] == 3
    listed = httpx.get(rag_server + "/v1/collections").json()["data"]
    assert {"name": "std", "chunks": 3} in listed


@pytest.mark.parametrize("retriever", ["dense", "bm25", "hybrid", "hybrid-rrf"])
def test_retrieve_ranks_the_right_document_first(rag_server, retriever):
    r = httpx.post(
        rag_server + "/v1/retrieve",
        json={
            "collection": "std",
            "query": "priority queue heap",
            "top_k": 2,
            "retriever": retriever,
        },
        timeout=60,
    ).json()
    assert r["data"][0]["source"] == "heapq.md" and r["data"][0]["rank"] == 1
    assert r["data"][0]["text"] == DOCS[1]["text"] and r["data"][0]["span"] == [
        0,
        len(DOCS[1]["text"]),
    ]


def test_grounded_completion_returns_citations_of_given_sources(rag_server):
    body = {
        "prompt": "Which module keeps a list sorted?",
        "max_tokens": 8,
        "temperature": 0,
        "rag": {"collection": "std", "top_k": 2},
    }
    r = httpx.post(rag_server + "/v1/completions", json=body, timeout=60).json()
    choice = r["choices"][0]
    assert isinstance(choice["citations"], list) and choice["dropped_citations"] >= 0
    # Every source given is listed in prompt order; citations are a subset of them.
    given = r["sources"]
    assert [s["id"] for s in given] == list(range(1, len(given) + 1)) and 1 <= len(given) <= 2
    assert given[0]["source"] == "bisect.md" and given[0]["text"] == DOCS[0]["text"]
    assert all(c == given[c["id"] - 1] for c in choice["citations"])
    assert r["usage"]["prompt_tokens"] > len(body["prompt"]) + len(
        DOCS[0]["text"]
    )  # sources were added
    tokenized = httpx.post(rag_server + "/tokenize", json={"prompt": "x"}).json()
    assert tokenized["count"] == 1


def test_streamed_grounded_completion_ends_with_the_same_citations_and_sources(rag_server):
    body = {
        "prompt": "Which module keeps a list sorted?",
        "max_tokens": 8,
        "temperature": 0,
        "rag": {"collection": "std", "top_k": 2},
    }
    whole = httpx.post(rag_server + "/v1/completions", json=body, timeout=60).json()
    with httpx.stream(
        "POST", rag_server + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        chunks = [
            json.loads(line[6:])
            for line in s.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    last = chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["citations"] == whole["choices"][0]["citations"]
    assert last["sources"] == whole["sources"]
    assert all("sources" not in c for c in chunks[:-1])


def test_grounded_chat_and_stream(rag_server):
    body = {
        "messages": [{"role": "user", "content": "What parses JSON?"}],
        "max_tokens": 4,
        "temperature": 0,
        "rag": {"collection": "std", "top_k": 1},
    }
    r = httpx.post(rag_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and "citations" in r.json()["choices"][0]
    assert [s["source"] for s in r.json()["sources"]] == ["json.md"]
    with httpx.stream(
        "POST", rag_server + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"citations"' in lines[-2] and '"sources"' in lines[-2]


def test_plugin_failure_is_named_and_the_server_stays_up(rag_server):
    body = {
        "prompt": "anything",
        "max_tokens": 2,
        "rag": {"collection": "std", "retriever": "exploding"},
    }
    r = httpx.post(rag_server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 502
    assert (
        "broken-at-runtime" in r.json()["error"]["message"]
        and "index corrupted" in r.json()["error"]["message"]
    )
    assert httpx.get(rag_server + "/health").status_code == 200


def test_sources_are_dropped_to_fit_a_short_context(tiny_checkpoint, tmp_path):
    """gpt2-tiny has 256 positions: the grounded prompt keeps as many sources as fit."""
    import asyncio

    from atlas_server.api.schemas import RAGOptions

    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path / "q")))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    state.load(str(tiny_checkpoint))
    ext = rag_extensions(state, PluginHost())
    service = ext["augmenter"].service
    from atlas_server.rag.ingest import Document, ingest

    ingest(
        service.store,
        service.embedder,
        "c",
        [Document(d["text"], d["source"]) for d in DOCS],
        progress=False,
    )
    aug = asyncio.run(
        ext["augmenter"].augment(RAGOptions(collection="c", top_k=3), "Why?", None, 340)
    )
    assert len(state.tokenizer.encode(aug.prompt)) <= 340 and 1 <= len(aug.context) < 3
    with pytest.raises(RequestError, match="no retrieved source fits"):
        asyncio.run(
            ext["augmenter"].augment(RAGOptions(collection="c", top_k=3), "Why?", None, 200)
        )
    state.shutdown()
    service.store.close()


def test_bad_rag_requests_are_4xx(rag_server):
    cases = [
        {"prompt": "q", "rag": {"collection": "missing"}},
        {"prompt": "q", "rag": {"collection": "std", "retriever": "nope"}},
        {"prompt": "q", "rag": {"collection": "std", "top_k": 0}},
        {"prompt": ["a", "b"], "rag": {"collection": "std"}},
        {"prompt": "q", "rag": {"collection": ""}},
        {"prompt": "q", "rag": {"collection": "../etc"}},
        {"prompt": "q", "rag": {"collection": "std", "filters": {"source": ["a", 1]}}},
        {"prompt": "q", "rag": {"collection": "std", "filters": {"source": {"$ne": 1}}}},
    ]
    for body in cases:
        r = httpx.post(rag_server + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].startswith(("rag", "collection"))


def test_bad_retrieve_requests_are_400s_before_any_plugin_runs(rag_server):
    """Found by fuzzing: an empty collection name reached the plugin and came back a 502."""
    cases = [
        ({"collection": "", "query": "q"}, "collection"),
        ({"collection": "a/b", "query": "q"}, "collection"),
        ({"collection": "x" * 256, "query": "q"}, "collection"),
        ({"collection": "std", "query": ""}, "query"),
        ({"collection": "std", "query": "   "}, "query"),
        ({"collection": "std", "query": "q", "top_k": 0}, "top_k"),
        ({"collection": "std", "query": "q", "filters": {"source": [1, "a"]}}, "filters"),
        ({"collection": "std", "query": "q", "filters": {"source": []}}, "filters[...]"),
        (
            {"collection": "std", "query": "q", "filters": {"source": 1.5}},
            "filters[...]",
        ),  # msgspec names dict values so
    ]
    for body, param in cases:
        r = httpx.post(rag_server + "/v1/retrieve", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    ok = {"collection": "std", "query": "heap", "filters": {"source": ["heapq.md", "json.md"]}}
    sources = {c["source"] for c in httpx.post(rag_server + "/v1/retrieve", json=ok).json()["data"]}
    assert sources and sources <= {"heapq.md", "json.md"}


def test_embeddings_match_sentence_transformers(rag_server):
    from atlas_server.rag.embedding import Embedder

    r = httpx.post(
        rag_server + "/v1/embeddings", json={"input": ["hello world", "heap"]}, timeout=60
    ).json()
    expected = Embedder().encode(["hello world", "heap"])
    assert (
        len(r["data"]) == 2
        and abs(sum(a * b for a, b in zip(r["data"][0]["embedding"], expected[0], strict=False)))
        > 0.999
    )
    assert httpx.post(rag_server + "/v1/embeddings", json={"input": []}).status_code == 400


def test_plugins_route_lists_registrations(rag_server):
    rows = {p["name"]: p for p in httpx.get(rag_server + "/v1/plugins").json()["data"]}
    assert rows["broken-at-runtime"]["registered"]["retrievers"] == ["exploding"]
    assert "hybrid" in rows["atlas-retrievers"]["registered"]["retrievers"]


def test_installed_faiss_example_is_used_by_the_server(tmp_path, tiny_checkpoint):
    """Install the example package beside Atlas and pick its retriever by name over HTTP."""
    import time

    target = tmp_path / "site"
    install_faiss_example(target)
    config = tmp_path / "server.toml"
    config.write_text(f'[rag]\ndata_dir = "{tmp_path / "qdrant"}"\nretriever = "faiss"\n')
    port = free_port()
    env = {
        "PYTHONPATH": str(target),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "HOME": str(tmp_path),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlas_server.cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        httpx.post(
            base + "/v1/collections/c/documents", json={"documents": DOCS}, timeout=120
        ).raise_for_status()
        r = httpx.post(
            base + "/v1/retrieve", json={"collection": "c", "query": "priority queue"}, timeout=60
        ).json()
        assert r["data"][0]["retriever"] == "faiss" and r["data"][0]["source"] == "heapq.md"
        plugins = {p["name"] for p in httpx.get(base + "/v1/plugins").json()["data"]}
        assert "faiss" in plugins
    finally:
        proc.terminate()
        proc.wait(30)


def test_query_likelihood_reranker_scores_with_the_served_model(
    rag_server, long_checkpoint, byte_tokenizer
):
    """The reranker's scores are the model's own mean log p(query | passage)."""
    import torch

    from atlas_server.checkpoint import load_checkpoint

    body = {
        "collection": "std",
        "query": "priority queue",
        "top_k": 3,
        "retriever": "dense",
        "reranker": "query-likelihood",
    }
    r = httpx.post(rag_server + "/v1/retrieve", json=body, timeout=120).json()["data"]
    assert [c["retriever"] for c in r] == ["query-likelihood"] * 3
    model = load_checkpoint(long_checkpoint).model
    expected = {}
    for doc in DOCS:
        prefix = byte_tokenizer.encode(f"Passage: {doc['text']}\nQuestion:")
        text = byte_tokenizer.encode(" priority queue")
        ids = torch.tensor([prefix + text])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        picked = logprobs[torch.arange(len(prefix) - 1, ids.shape[1] - 1), ids[0, len(prefix) :]]
        expected[doc["text"]] = float(picked.mean())
    assert [c["text"] for c in r] == sorted(expected, key=lambda t: -expected[t])
    for c in r:
        assert abs(c["score"] - expected[c["text"]]) < 1e-4
