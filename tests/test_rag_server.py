"""RAG inside the server: HTTP ingestion, retrieval, grounded answers with citations, plugins."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from atlas_server.api import RequestError, ServerState, create_app
from atlas_server.api.scoring import EngineScorer
from atlas_server.config import EngineSection, RAGSection, ServerConfig
from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginHost
from atlas_server.rag.ingest import Document
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


class ReturnsInts:
    def retrieve(self, collection, query, top_k, filters=None):
        return [1, 2, 3]


class BrokenPlugin:
    @hookimpl
    def atlas_register_retrievers(self, register):
        register("exploding", lambda ctx: Exploding())
        register("returns-ints", lambda ctx: ReturnsInts())


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
def rag_served(long_checkpoint, tmp_path_factory):
    """A RAG server (base URL and state) with DOCS ingested into the collection `std`."""
    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("qdrant"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(long_checkpoint))
    host = PluginHost()
    host.register(BrokenPlugin(), "broken-at-runtime")
    app = create_app(state, plugin_host=host)
    with serving(app) as base:
        r = httpx.post(
            base + "/v1/collections/std/documents", json={"documents": DOCS}, timeout=120
        )
        assert r.status_code == 200 and r.json()["total"] == 3, r.text
        yield SimpleNamespace(base=base, state=state)


@pytest.fixture(scope="module")
def rag_server(rag_served):
    return rag_served.base


def test_the_server_holds_its_embedded_store_from_the_start(long_checkpoint, tmp_path):
    """The folder used to be taken at the first RAG request: until then `atlas rag ingest`
    wrote into a served store, and the server's next request got a 503 blaming a running
    `atlas serve`. A folder that cannot be opened at start is retried by the requests."""
    from atlas_server.rag.store import StoreError, VectorStore

    data = tmp_path / "store"
    config = ServerConfig(rag=RAGSection(data_dir=str(data)))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(long_checkpoint))
    up = lambda status: status == 503  # noqa: E731 (answering; no model is loaded)
    served = serving(create_app(state, load_on_startup=False), ready=up)
    with served, pytest.raises(StoreError, match="in use by another process"):
        VectorStore(data)  # what `atlas rag ingest --data-dir` opens; no request made
    held = VectorStore(data)  # the server has let it go; now another takes it first
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(long_checkpoint))
    with serving(create_app(state, load_on_startup=False), ready=up) as base:
        assert httpx.get(base + "/v1/collections").status_code == 503
        held.close()
        assert httpx.get(base + "/v1/collections").status_code == 200  # retried


def test_ingest_is_idempotent_over_http(rag_server):
    r = httpx.post(
        rag_server + "/v1/collections/std/documents", json={"documents": DOCS}, timeout=60
    )
    assert r.json()["total"] == 3
    listed = httpx.get(rag_server + "/v1/collections").json()["data"]
    assert {"name": "std", "chunks": 3} in listed


def test_document_metadata_is_stored_and_filtered_on(rag_server):
    """Found by an audit: the route dropped `metadata`, so the documented metadata filters
    could match nothing a user had ingested."""
    docs = [
        {"text": "A heap keeps its smallest item first.", "source": "en.md",
         "metadata": {"lang": "en", "tags": {"level": 1}}},
        {"text": "Un tas garde son plus petit élément en tête.", "source": "fr.md",
         "metadata": {"lang": "fr", "tags": {"level": 2}}},
    ]  # fmt: skip
    url = rag_server + "/v1/collections/meta/documents"
    assert httpx.post(url, json={"documents": docs}, timeout=60).status_code == 200
    for filters, source in (({"lang": "fr"}, "fr.md"), ({"metadata.tags.level": 1}, "en.md")):
        body = {"collection": "meta", "query": "heap", "filters": filters}
        data = httpx.post(rag_server + "/v1/retrieve", json=body, timeout=60).json()["data"]
        assert [c["source"] for c in data] == [source], data
        assert data[0]["metadata"] == docs[["en.md", "fr.md"].index(source)]["metadata"]
    # Keys a filter could never name are refused, at any depth (a dot means nesting).
    # ... and integers beyond 64 bits, which came back floats (1e20) no filter matched.
    for metadata in ({'a"b': 1}, {"a.b": 1}, {"tags": {"x.y": 1}}, {"": 1}, {"n": 10**20},
                     {"n": [1, -(10**20)]}):  # fmt: skip
        bad = {"documents": [{"text": "x", "source": "x", "metadata": metadata}]}
        r = httpx.post(url, json=bad, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "documents[0].metadata", r.text
    # A source too long for the URL query its DELETE names it in (API QA pass).
    long_source = {"documents": [{"text": "x", "source": "s" * 2049}]}
    r = httpx.post(url, json=long_source, timeout=60)
    assert r.status_code == 400 and "documents[0].source" in r.json()["error"]["param"], r.text
    # A whitespace-only text made no chunk, and the 200 said nothing of it (API QA pass).
    blank = {"documents": [docs[0], {"text": " \n\n ", "source": "blank.md"}]}
    r = httpx.post(url, json=blank, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[1].text", r.text
    huge = {"collection": "meta", "query": "heap", "filters": {"lang": 2**80}}
    r = httpx.post(rag_server + "/v1/retrieve", json=huge, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "filters", r.text


def test_documents_are_chunked_as_the_rag_section_says(tmp_path):
    """A short-context model needs short chunks; the documents route takes [rag]'s."""
    from atlas_server.config import RAGSection
    from atlas_server.plugins import PluginHost
    from atlas_server.rag.embedding import Embedder
    from atlas_server.rag.service import RAGService

    text = " ".join(f"Sentence number {i} says something." for i in range(40))
    counts = []
    for size in (200, 20):
        rag = RAGSection(data_dir=str(tmp_path / str(size)), chunk_max_tokens=size, chunk_overlap=0)
        svc = RAGService(PluginHost(), Embedder, store_config=rag)
        try:
            counts.append(svc.add_documents("c", [Document(text, "s.md")])["chunks"])
        finally:
            svc.close()
    assert counts[1] >= 5 * counts[0], counts  # 20-piece chunks: several times as many


def test_a_changed_document_replaces_its_chunks_by_deleting_its_source(rag_server):
    url = rag_server + "/v1/collections/edits/documents"
    first = {"documents": [{"text": "Version one of the notes.", "source": "notes.md"},
                           {"text": "Unrelated text stays.", "source": "other.md"}]}  # fmt: skip
    assert httpx.post(url, json=first, timeout=60).json()["total"] == 2
    r = httpx.delete(url, params={"source": ["notes.md", "never-stored.md"]}, timeout=60)
    assert r.status_code == 200 and r.json() == {"collection": "edits", "deleted": 1, "total": 1}
    second = {"documents": [{"text": "Version two of the notes.", "source": "notes.md"}]}
    assert httpx.post(url, json=second, timeout=60).json()["total"] == 2
    body = {"collection": "edits", "query": "notes version", "filters": {"source": "notes.md"}}
    hits = httpx.post(rag_server + "/v1/retrieve", json=body, timeout=60).json()["data"]
    assert [h["text"] for h in hits] == ["Version two of the notes."]
    for params in ({}, {"source": ""}):
        r = httpx.delete(url, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == "source", r.text
    bad_name = httpx.delete(
        rag_server + "/v1/collections/bad.name/documents", params={"source": "x"}
    )
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    missing = httpx.delete(rag_server + "/v1/collections/nope/documents", params={"source": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"


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


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/retrieve"])
def test_plugin_failure_is_named_logged_once_and_the_server_stays_up(rag_server, caplog, route):
    """The client gets a 502 naming the plugin; the server log gets its traceback, once."""
    if route == "/v1/retrieve":
        body = {"collection": "std", "query": "anything", "retriever": "exploding"}
    else:
        body = {"prompt": "anything", "rag": {"collection": "std", "retriever": "exploding"}}
    with caplog.at_level(logging.ERROR):
        r = httpx.post(rag_server + route, json=body, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "plugin_error"
    assert "broken-at-runtime" in r.json()["error"]["message"]
    assert "index corrupted" in r.json()["error"]["message"]
    logged = [rec for rec in caplog.records if "exploding" in rec.getMessage()]
    assert len(logged) == 1 and "broken-at-runtime" in logged[0].getMessage()
    traceback = caplog.text[caplog.text.index("Traceback") :]
    assert "in retrieve" in traceback and "ValueError: index corrupted" in traceback
    health = httpx.get(rag_server + "/health")
    assert health.status_code == 200 and health.json()["rag"] == "ok"  # the store opened


def _body_for(route: str, options: dict, rag_only: dict | None = None) -> dict:
    """A request about "heap" over collection std: /v1/retrieve's body with `options`, or a
    one-token completion / chat whose `rag` holds `options` and `rag_only`."""
    if route == "/v1/retrieve":
        return {"collection": "std", "query": "heap", **options}
    rag = {"collection": "std", **options, **(rag_only or {})}
    if route == "/v1/completions":
        return {"prompt": "heap", "max_tokens": 1, "rag": rag}
    return {"messages": [{"role": "user", "content": "heap"}], "max_tokens": 1, "rag": rag}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/retrieve"])
def test_a_malformed_plugin_result_is_a_502_naming_the_plugin(rag_server, route):
    """Found by an audit: [1, 2, 3] from a retriever was a 500 on /v1/retrieve, and a 502
    blaming the reranker after it on completions."""
    body = _body_for(route, {"retriever": "returns-ints"}, {"reranker": "mmr"})
    r = httpx.post(rag_server + route, json=body, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "plugin_error", r.text
    message = r.json()["error"]["message"]
    assert message.startswith("retriever 'returns-ints' (plugin 'broken-at-runtime')"), message
    assert "result 0 is int" in message


@pytest.mark.parametrize("filters", [{"": "x"}, {"metadata.": "x"}, {"start": True}])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/retrieve"])
def test_a_bad_filter_key_is_a_400_naming_filters(rag_server, route, filters):
    """Found by an audit: {"": "x"} and "metadata." answered 503 store_unavailable."""
    body = _body_for(route, {"filters": filters})
    r = httpx.post(rag_server + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == ("filters" if route == "/v1/retrieve" else "rag.filters"), error


def test_sources_are_dropped_to_fit_a_short_context(tiny_checkpoint, tmp_path):
    """gpt2-tiny has 256 positions: the grounded prompt keeps as many sources as fit."""
    from atlas_server.api.schemas import RAGOptions

    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path / "q")))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    create_app(state, plugin_host=PluginHost())
    state.load(str(tiny_checkpoint))
    try:
        state.rag.add_documents("c", [Document(d["text"], d["source"]) for d in DOCS])
        options = RAGOptions(collection="c", top_k=3)
        aug = asyncio.run(state.augmenter.augment(options, "Why?", None, 340))
        assert len(state.tokenizer.encode(aug.prompt)) <= 340 and 1 <= len(aug.context) < 3
        with pytest.raises(RequestError, match="no retrieved source fits"):
            asyncio.run(state.augmenter.augment(options, "Why?", None, 200))
        # A question too long by itself is named as the problem, not the sources.
        with pytest.raises(RequestError, match="the question alone does not fit the model's"):
            asyncio.run(state.augmenter.augment(options, "Why? " * 60, None, 200))
    finally:
        state.shutdown()


def test_bad_rag_requests_are_4xx(rag_server):
    cases = [
        {"prompt": "q", "rag": {"collection": "std", "retriever": "nope"}},
        {"prompt": "q", "rag": {"collection": "std", "top_k": 0}},
        {"prompt": ["a", "b"], "rag": {"collection": "std"}},
        {"prompt": "q", "rag": {"collection": ""}},
        {"prompt": "q", "rag": {"collection": "../etc"}},
        {"prompt": "q", "rag": {"collection": "std", "filters": {"source": ["a", 1]}}},
        {"prompt": "q", "rag": {"collection": "std", "filters": {"source": {"$ne": 1}}}},
        {"prompt": "q", "rag": {"collection": "std", "filter": {"source": "a"}}},  # a typo
    ]
    for body in cases:
        r = httpx.post(rag_server + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].startswith(("rag", "collection"))
    # Found by schemathesis: a content part whose text is not a string reached retrieval,
    # which read the question from it and failed (a 5xx).
    for content in ([{"type": "text", "text": {}}], [{"type": "image_url", "image_url": {}}]):
        body = {"messages": [{"role": "user", "content": content}], "rag": {"collection": "std"}}
        r = httpx.post(rag_server + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages[0].content"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/v1/retrieve", {"collection": "std", "query": "q", "topk": 2}, "topk"),
     ("/v1/retrieve", {"collection": "std", "query": "q", "filter": {"a": "b"}}, "filter"),
     ("/v1/collections/std/documents", {"documents": [{"text": "t", "source": ""}]},
      "documents[0].source"),
     ("/v1/collections/std/documents", {"documents": [{"text": "", "source": "s"}]},
      "documents[0].text"),
     ("/v1/collections/std/documents",
      {"documents": [{"text": "t", "source": "s", "metdata": {}}]}, "documents[0].metdata")],
)  # fmt: skip
def test_atlas_bodies_refuse_unknown_fields_and_empty_names(rag_server, path, body, param):
    """Found by an audit: a mistyped field was ignored (retrieving unfiltered), and an
    empty source or text was stored. The unknown field is named in `param` (it was null)."""
    r = httpx.post(rag_server + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error


def test_an_unknown_collection_is_a_404_everywhere(rag_server):
    """Like OpenAI's unknown model (404 model_not_found, also when named in a body)."""
    message = {"messages": [{"role": "user", "content": "q"}]}
    cases = [
        ("post", "/v1/completions", {"prompt": "q", "rag": {"collection": "missing"}}, "rag.collection"),
        ("post", "/v1/chat/completions", {**message, "rag": {"collection": "missing"}}, "rag.collection"),
        ("post", "/v1/retrieve", {"collection": "missing", "query": "q"}, "collection"),
        ("delete", "/v1/collections/missing", None, "name"),
    ]  # fmt: skip
    for method, path, body, param in cases:
        r = httpx.request(method, rag_server + path, json=body, timeout=60)
        assert r.status_code == 404, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "collection_not_found" and error["param"] == param, error
        assert "'missing' does not exist" in error["message"]


def test_a_collection_name_the_stores_cannot_hold_is_a_400_naming_the_rule(rag_server):
    """Found by fuzzing: '¹' passed str.isalnum() and the store's ASCII rule raised a 500."""
    for name in ("%C2%B9", "caf%C3%A9"):  # '¹', 'café'
        r = httpx.post(
            f"{rag_server}/v1/collections/{name}/documents",
            json={"documents": [{"text": "x", "source": "s"}]},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        assert "letters, digits, - and _" in r.json()["error"]["message"]


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
        # msgspec names a map's values `filters[...]`; param names the map itself
        ({"collection": "std", "query": "q", "filters": {"source": []}}, "filters"),
        ({"collection": "std", "query": "q", "filters": {"source": 1.5}}, "filters"),
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


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"model": "all-MiniLM-L6-v2"}, 200, None),
        ({"model": "sentence-transformers/all-MiniLM-L6-v2", "dimensions": 384}, 200, None),
        ({"model": "text-embedding-3-small"}, 404, "model"),
        ({"dimensions": 8}, 400, "dimensions"),
    ],
)
def test_embeddings_model_and_dimensions_are_checked(rag_server, extra, status, param):
    """As on the generation routes, another model's name is a 404, and a size MiniLM cannot
    give is a 400, rather than 384 floats the client did not ask for."""
    r = httpx.post(rag_server + "/v1/embeddings", json={"input": "heap", **extra}, timeout=60)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    else:
        assert len(r.json()["data"][0]["embedding"]) == 384


def test_an_embedding_input_longer_than_the_model_reads_is_refused(rag_server):
    """QA found texts past MiniLM's 254 word pieces embedded by their start only (two
    texts differing after it got one vector) while usage billed every piece: a 400 naming
    the input and the limit, as OpenAI answers a text over its context."""
    long = "word " * 300
    r = httpx.post(
        rag_server + "/v1/embeddings", json={"input": ["heap", long + "about physics"]}, timeout=60
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and "input[1] is" in error["message"]
    assert "at most 254" in error["message"]
    fits = httpx.post(rag_server + "/v1/embeddings", json={"input": "word " * 250}, timeout=60)
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == 250


def test_a_big_embeddings_request_leaves_the_embedder_between_slices(rag_server, monkeypatch):
    """One request of 2,048 texts held the embedder's lock for all of them (a RAG query
    waited 96 s behind it in the API QA pass): it is embedded in slices, each its own call,
    so other requests get the model between them; the vectors are the same."""
    from atlas_server.api.embeddings import SLICE
    from atlas_server.rag.embedding import Embedder

    sizes: list[int] = []
    encode = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, t: sizes.append(len(t)) or encode(self, t))
    texts = [f"text {i}" for i in range(2 * SLICE + 5)]
    r = httpx.post(rag_server + "/v1/embeddings", json={"input": texts}, timeout=120).json()
    assert sizes == [SLICE, SLICE, 5]
    assert len(r["data"]) == len(texts) and [d["index"] for d in r["data"]] == list(
        range(len(texts))
    )
    alone = httpx.post(rag_server + "/v1/embeddings", json={"input": texts[-1]}, timeout=60).json()
    assert r["data"][-1]["embedding"] == pytest.approx(alone["data"][0]["embedding"], abs=1e-5)


def test_plugins_route_lists_registrations(rag_server):
    rows = {p["name"]: p for p in httpx.get(rag_server + "/v1/plugins").json()["data"]}
    assert rows["broken-at-runtime"]["registered"]["retrievers"] == ["exploding", "returns-ints"]
    assert "hybrid" in rows["atlas-retrievers"]["registered"]["retrievers"]


def test_installed_faiss_example_is_used_by_the_server(tmp_path, tiny_checkpoint):
    """`atlas serve` as a process, with the example package installed beside Atlas: its
    retriever is picked by name over HTTP; the printed config names the checkpoint served;
    SIGTERM after RAG use exits 0 with no error from a vector-store client left to the
    garbage collector at exit (`Exception ignored in: QdrantClient.__del__`)."""
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
    command = [
        sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tiny_checkpoint),
        "--port", str(port), "--config", str(config), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"[model]\ncheckpoint = '{tiny_checkpoint}'" in out
    assert "Exception ignored" not in err and "Traceback" not in err, err[-2000:]


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


class RecordingEngine:
    """The server's engine, recording each submit (thread, event loop) and each event read."""

    def __init__(self, engine) -> None:
        self._engine, self.log = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt_ids, params, request_id=None):
        stream = self._engine.submit(prompt_ids, params, request_id=request_id)
        loop = asyncio.get_running_loop()
        self.log.append(("submit", threading.current_thread().name, id(loop)))
        log = self.log

        class Recorded:
            def __aiter__(self):
                return self

            async def __anext__(self):
                event = await stream.__anext__()
                log.append(("event", threading.current_thread().name, id(loop)))
                return event

            async def aclose(self):
                await stream.aclose()

        return Recorded()


def test_query_likelihood_reranking_is_one_engine_round_trip_per_query(rag_served):
    """All candidates are submitted together, from the reranker's thread and one event
    loop of its own, before any result is read: one hand-over to the engine and back."""
    state = rag_served.state
    real = state.engine
    state.engine = recording = RecordingEngine(real)
    body = {"collection": "std", "query": "heap", "top_k": 3, "retriever": "dense"}
    try:
        plain = httpx.post(rag_served.base + "/v1/retrieve", json=body, timeout=120).json()
        body["reranker"] = "query-likelihood"
        reranked = httpx.post(rag_served.base + "/v1/retrieve", json=body, timeout=120).json()
    finally:
        state.engine = real
    candidates = len(plain["data"])
    assert candidates >= 2 and len(reranked["data"]) == candidates
    kinds = [kind for kind, _, _ in recording.log]
    assert kinds[:candidates] == ["submit"] * candidates and "submit" not in kinds[candidates:]
    assert len(kinds) > candidates  # the results were read after all were submitted
    assert {(thread, loop) for _, thread, loop in recording.log} == {
        (recording.log[0][1], recording.log[0][2])
    }
    assert recording.log[0][1] == "atlas-compute"


def test_batched_scores_equal_one_at_a_time_even_past_a_full_queue(long_checkpoint):
    """score_texts of many pairs = each pair scored alone, with an engine that queues one
    request at a time (the scorer submits the rest as earlier ones finish)."""
    engine = EngineSection(max_running=1, max_queued=1, max_batched_tokens=64)
    state = ServerState(
        config=ServerConfig(engine=engine, rag=RAGSection(enabled=False)), model_name="tiny"
    )
    state.load(str(long_checkpoint))
    try:
        scorer = EngineScorer(state)
        pairs = [(f"Passage: {d['text']}\nQuestion:", " which module?") for d in DOCS]
        pairs += [("", "no prefix at all"), ("x" * 2000, " a prefix cut from the left")]
        together = scorer.score_texts(pairs)
        alone = [scorer.score_texts([pair])[0] for pair in pairs]
    finally:
        state.shutdown()
    assert len(together) == len(pairs) and len(set(together)) == len(pairs)
    for a, b in zip(together, alone, strict=True):
        assert abs(a - b) < 1e-4
