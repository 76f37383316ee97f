"""The whole HTTP API against its own OpenAPI schema, fuzzed by schemathesis.

For every route of a server with RAG enabled, schemathesis (a tool no one here wrote)
generates requests from the schema the server publishes at /schema/openapi.json, valid
and deliberately invalid ones, and checks every answer: never a 5xx, only statuses the
schema documents, the documented content type, and a body that matches the documented
schema (errors included: the OpenAI error body). Its command line, run by hand with more
examples (`st run URL/schema/openapi.json --checks all`), found a `seed` beyond 64 bits
that killed the engine thread and wedged the server; tests/test_api.py keeps that case.

Two of its checks are left out on purpose:
- `positive_data_acceptance`: a request the schema allows can still be refused for
  reasons a schema cannot state (a prompt longer than the context, an unknown collection);
- `negative_data_rejection`: Litestar converts bodies leniently ("3" to 3, 0 to false),
  as pydantic does for vLLM, so some requests the schema calls invalid are served.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from atlas_server.api import ServerState, create_app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.plugins import PluginHost

sys.path.insert(0, str(Path(__file__).parent))
from servers import serving  # noqa: E402
from test_rag_server import DOCS  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tiny_checkpoint, tmp_path_factory):
    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("qdrant"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    app = create_app(state, plugin_host=PluginHost())
    with serving(app) as base:
        # One collection that exists, so retrieval has something to find.
        r = httpx.post(
            base + "/v1/collections/std/documents", json={"documents": DOCS}, timeout=120
        )
        assert r.status_code == 200, r.text
        yield schemathesis.openapi.from_url(base + "/schema/openapi.json")


# Every route the server publishes; the first test checks the schema lists exactly these.
ROUTES = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/retrieve"),
    ("GET", "/v1/collections"),
    ("GET", "/v1/collections/{name}/documents"),
    ("POST", "/v1/collections/{name}/documents"),
    ("DELETE", "/v1/collections/{name}/documents"),
    ("DELETE", "/v1/collections/{name}"),
    ("GET", "/v1/plugins"),
]


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(ROUTES)


# Valid requests for every route; invalid ones where there is something to get wrong (a
# body: the GET routes take no input, and any string is a valid collection name to DELETE).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in ROUTES]
CASES += [(m, p, GenerationMode.NEGATIVE) for m, p in ROUTES if m == "POST"]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_route_answers_as_its_schema_says(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,  # the same requests on every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_per_schema(case):
        case.call_and_validate(checks=CHECKS, timeout=120)

    answers_per_schema()
