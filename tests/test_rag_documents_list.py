"""Listing a collection's documents: `GET /v1/collections/{name}/documents` and
`atlas rag documents`.

The server runs without a model (the RAG routes need none) and with a bag-of-words
embedder counting one piece per word, so chunks of at most 8 words make multi-chunk
documents out of a few sentences; each test runs against the embedded store and FAISS.
The expected rows come from the chunker itself (what the store holds), not from the code
under test. What it does not test: the stores' iter_chunks (tests/test_store_contract.py).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from atlas_server.api import ServerState, create_app
from atlas_server.api.embeddings import SharedEmbedder
from atlas_server.cli import app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.plugins import PluginHost
from atlas_server.rag.chunking import ChunkSettings, chunk_text
from atlas_server.rag.ingest import Document
from atlas_server.rag.service import RAGService

sys.path.insert(0, str(Path(__file__).parent))
from servers import serving  # noqa: E402
from test_rag_errors import DIM, FakeEmbedder, GatedEmbedder, service  # noqa: E402

STORES = ["embedded", "faiss"]
CHUNKING = ChunkSettings(8, 0)  # words, as WordEmbedder counts them
DOCS = [
    {"text": "Download the wheel first. Then install it with pip. Check the version.",
     "source": "guide/install.md", "title": "Install"},
    {"text": "# Usage\n\nStart the server here. Send it one request. Read the answer back."
             "\n\n## Stopping\n\nStop it with Ctrl-C. Nothing else is needed.",
     "source": "guide/usage.md"},  # its title: the first heading, not the last
    {"text": "The API is OpenAI's.", "source": "api.md", "title": "API"},
    {"text": "Questions nobody asked yet.", "source": "faq.md"},
    {"text": "Zebras are striped animals. They live in Africa. Lions hunt them often. "
             "Nobody knows why exactly.", "source": "notes/z.md", "title": "Zed"},
]  # fmt: skip


class WordEmbedder(FakeEmbedder):
    """test_rag_errors' embedder with what ingest also needs: a dimension, a piece count."""

    dim, name = DIM, "fake-words"

    def count_pieces(self, text: str) -> int:
        return len(text.split())


def expected_rows(docs=DOCS) -> list[dict]:
    """The rows the listing should give: the chunker's chunks of each document, grouped."""
    rows = []
    for d in docs:
        chunks = chunk_text(
            d["text"], d["source"], WordEmbedder().count_pieces, CHUNKING, d.get("title")
        )
        rows.append({"source": d["source"], "title": chunks[0].heading, "chunks": len(chunks),
                     "characters": max(c.end for c in chunks)})  # fmt: skip
    return sorted(rows, key=lambda r: r["source"])


def rag_section(data: Path, store: str) -> RAGSection:
    return RAGSection(
        store=store, data_dir=str(data), chunk_max_tokens=CHUNKING.max_tokens, chunk_overlap=0
    )


@pytest.fixture(scope="module", params=STORES)
def server(request, tmp_path_factory):
    """A RAG server over `request.param`'s store with DOCS in the collection `docs`."""
    config = ServerConfig(rag=rag_section(tmp_path_factory.mktemp(request.param), request.param))
    state = ServerState(config=config, model_name="tiny", embedder=SharedEmbedder(WordEmbedder))
    no_model = create_app(state, plugin_host=PluginHost(), load_on_startup=False)
    with serving(no_model, ready=lambda status: status == 503) as base:  # /health: no model
        r = httpx.post(base + "/v1/collections/docs/documents", json={"documents": DOCS})
        total = sum(row["chunks"] for row in expected_rows())
        assert r.status_code == 200 and r.json()["total"] == total == 9, r.text
        yield SimpleNamespace(base=base, store=request.param)


def listing(server, collection: str = "docs", **params) -> httpx.Response:
    return httpx.get(f"{server.base}/v1/collections/{collection}/documents", params=params)


def test_each_source_is_listed_once_with_its_chunks_and_title_sorted(server):
    expected = expected_rows()
    assert sum(r["chunks"] > 1 for r in expected) >= 3  # the grouping is exercised
    assert [r["title"] for r in expected] == ["API", None, "Install", "Usage", "Zed"]
    usage = chunk_text(DOCS[1]["text"], "u", WordEmbedder().count_pieces, CHUNKING)
    assert [c.heading for c in usage] == ["Usage", "Usage", "Stopping"]
    r = listing(server)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "list",
        "collection": "docs",
        "data": expected,
        "first_id": "api.md",
        "last_id": "notes/z.md",
        "has_more": False,
    }


def test_pages_of_two_visit_every_source_once(server):
    seen, pages, after = [], [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after is not None else {})
        page = listing(server, **params).json()
        pages.append(page)
        seen += [row["source"] for row in page["data"]]
        assert page["first_id"] == page["data"][0]["source"]
        after = page["last_id"]
        if not page["has_more"]:
            break
        assert len(pages) < 10, pages  # has_more stays true: a client would loop forever
    assert seen == [r["source"] for r in expected_rows()]
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    past_the_end = listing(server, limit=2, after="notes/z.md").json()
    assert past_the_end["data"] == [] and past_the_end["has_more"] is False
    assert past_the_end["first_id"] is None and past_the_end["last_id"] is None


def test_a_prefix_lists_only_the_sources_under_it(server):
    page = listing(server, prefix="guide/", limit=1).json()
    assert [row["source"] for row in page["data"]] == ["guide/install.md"] and page["has_more"]


def test_a_deleted_source_leaves_the_list_and_a_new_one_joins_it(server):
    url = f"{server.base}/v1/collections/edits/documents"
    assert httpx.post(url, json={"documents": DOCS[:2]}).status_code == 200
    assert httpx.delete(url, params={"source": "guide/install.md"}).json()["deleted"] == 2
    assert [row["source"] for row in listing(server, "edits").json()["data"]] == ["guide/usage.md"]
    assert httpx.post(url, json={"documents": DOCS[2:3]}).status_code == 200
    rows = listing(server, "edits").json()["data"]
    assert rows == [r for r in expected_rows() if r["source"] in ("api.md", "guide/usage.md")]


def test_an_unknown_collection_is_a_404_with_the_openai_error_body(server):
    r = listing(server, "missing")
    assert r.status_code == 404, r.text
    assert r.json() == {
        "error": {
            "message": "collection 'missing' does not exist",
            "type": "not_found_error",
            "param": "name",
            "code": "collection_not_found",
        }
    }
    bad = listing(server, "bad.name")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name", bad.text


@pytest.mark.parametrize("limit", [0, -1, 1001, 100000, "ten"])
def test_a_limit_outside_1_to_1000_is_a_400_naming_it(server, limit):
    r = listing(server, limit=limit)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "limit" and r.json()["error"]["type"] == (
        "invalid_request_error"
    )


def test_the_route_answers_as_its_schema_says(server):
    """The route fuzzed from the server's own OpenAPI schema, as tests/test_api_schema.py
    does every route: documented statuses and bodies only, never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(server.base + "/schema/openapi.json")
    operation = schema["/v1/collections/{name}/documents"]["GET"]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def answers_per_schema(case):
            case.call_and_validate(checks=checks, timeout=60)

        answers_per_schema()


def test_a_listing_waits_for_an_ingest_and_counts_its_document_whole(tmp_path):
    """The listing takes the service's write lock: one that ran beside an ingest could
    count a big document half written (its chunks go to the store in several writes)."""
    gate, started = threading.Event(), threading.Event()
    s = service(tmp_path)  # collection `c`: a.md and b.md, a chunk each
    s._embedder = lambda: GatedEmbedder(gate, started)
    try:
        docs = [Document(f"part {i} of the big document.", "big.md") for i in range(3)]
        adding = threading.Thread(target=s.add_documents, args=("c", docs))
        adding.start()
        assert started.wait(10)  # the ingest is under way, holding its embedding
        result = []
        lister = threading.Thread(target=lambda: result.append(s.documents("c")))
        lister.start()
        lister.join(0.5)
        assert lister.is_alive()  # it waits for the ingest
        gate.set()
        adding.join(10)
        lister.join(10)
        rows, more = result[0]
        assert [(d.source, d.chunks) for d in rows] == [("a.md", 1), ("b.md", 1), ("big.md", 3)]
        assert more is False
    finally:
        gate.set()
        s.close()


@pytest.mark.parametrize("store", STORES)
def test_the_cli_lists_the_rows_the_route_gives(tmp_path, store):
    data = tmp_path / store
    svc = RAGService(PluginHost(), WordEmbedder, store_config=rag_section(data, store))
    try:
        docs = [Document(d["text"], d["source"], d.get("title")) for d in DOCS]
        svc.add_documents("docs", docs)
    finally:
        svc.close()  # the CLI opens the folder itself
    args = ["rag", "documents", "--collection", "docs", "--data-dir", str(data), "--store", store]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    header, *lines, summary = result.stdout.splitlines()
    assert header.split() == ["chunks", "characters", "source", "—", "title"]
    rows = []
    for line in lines:
        chunks, characters, rest = line.split(None, 2)
        source, _, title = rest.partition(" — ")
        rows.append({"source": source, "title": title or None, "chunks": int(chunks),
                     "characters": int(characters)})  # fmt: skip
    assert rows == expected_rows()
    assert summary == "5 documents, 9 chunks (collection 'docs')"

    missing = CliRunner().invoke(app, [*args[:3], "missing", *args[4:]])
    assert missing.exit_code == 1 and missing.stdout == ""
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, missing.stderr
    assert lines[0].startswith("error: collection 'missing' does not exist"), lines
