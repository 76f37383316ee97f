"""A grounded chat on a short-context model keeps the sources that fit its chat template.

Found by QA: on gpt2-tiny (256 positions) a chat with `rag` was a 400 ("the messages has
254 and max_tokens asks for 8 more") instead of dropping the lowest-ranked sources, since
the fit counted the message contents, not the ids the chat template renders around them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from atlas_server.api import ServerState, create_app
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.plugins import PluginHost

sys.path.insert(0, str(Path(__file__).parent))
from servers import serving  # noqa: E402

# Short, so that with the byte-level tokenizer (a token a byte) one source fits next to
# the instruction and the question in 256 positions and two do not, where counting the
# contents alone (the bug) kept two: rendered, each is `[n] (x) ...` of 19-20 tokens.
DOCS = [
    {"text": "bisect sorts", "source": "b"},
    {"text": "heapq queues", "source": "h"},
    {"text": "json parses", "source": "j"},
]
QUESTION = [{"role": "user", "content": "keep a list sorted"}]


@pytest.fixture(scope="module")
def short_rag_server(tiny_checkpoint, tmp_path_factory):
    """gpt2-tiny (256 positions) served with RAG, DOCS ingested into `manual`."""
    config = ServerConfig(rag=RAGSection(data_dir=str(tmp_path_factory.mktemp("qdrant"))))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    with serving(create_app(state, plugin_host=PluginHost())) as base:
        r = httpx.post(
            base + "/v1/collections/manual/documents", json={"documents": DOCS}, timeout=120
        )
        assert r.status_code == 200 and r.json()["total"] == 3, r.text
        yield base


def chat(base: str, max_tokens: int) -> httpx.Response:
    body = {
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "temperature": 0,
        "rag": {"collection": "manual", "top_k": 3},
    }
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)


def test_a_chat_keeps_the_sources_that_fit_the_context(short_rag_server):
    r = chat(short_rag_server, max_tokens=8)
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert prompt_tokens + 8 <= 256
    assert 1 <= len(r.json()["sources"]) < 3  # the lowest-ranked dropped, not the request


@pytest.mark.parametrize(
    "max_tokens, problem",
    [
        (40, "no retrieved source fits"),  # the question fits (37 ids), a source next to it not
        (230, "the question alone does not fit"),
    ],
)
def test_a_chat_where_no_source_fits_is_a_400_naming_the_context(
    short_rag_server, max_tokens, problem
):
    r = chat(short_rag_server, max_tokens=max_tokens)
    assert r.status_code == 400, r.text
    assert f"{problem} the model's 256-token context" in r.json()["error"]["message"]


def test_a_grounded_completion_still_fits(short_rag_server):
    body = {
        "prompt": "keep a list sorted",
        "max_tokens": 8,
        "rag": {"collection": "manual", "top_k": 3},
    }
    r = httpx.post(short_rag_server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] + 8 <= 256 and r.json()["sources"]
