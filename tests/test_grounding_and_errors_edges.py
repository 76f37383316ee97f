"""Edges a mutation pass found unguarded: which source a grounded prompt drops when it does
not fit, what a 500 tells the client, and the chosen token in completions' top_logprobs.

References: `RAGService.ground`'s docstring ("the lowest-ranked dropped until it fits"; the
sources come best first), `atlas_server/api/errors.py`'s ("Unexpected exceptions become 500
with a generic message; their traceback goes to the server log, never to the client"), and
vLLM's completions logprobs, which `completion_logprobs` follows: each position's
`top_logprobs` lists the token chosen there, with its logprob, next to the top N (N + 1
entries when it is not among them).
"""

from __future__ import annotations

import logging
import math

import httpx
import pytest
from openai import InternalServerError, OpenAI
from test_api import MODEL, running_server

from atlas_server.rag.grounding import grounded_messages, grounded_prompt
from atlas_server.rag.service import RAGService
from atlas_server.rag.types import Chunk, RetrievedChunk

# --- grounding under context pressure ----------------------------------------------------


def _ranked(n: int) -> list[RetrievedChunk]:
    """n sources, best first, each as long as the others (so any n of them fit alike)."""
    return [
        RetrievedChunk(
            Chunk(f"c{i}", f"source number {i} says fact {i}", f"doc{i}.md", None, 0, 30),
            score=1.0 - i / 10,
            retriever="dense",
        )
        for i in range(n)
    ]


def _words(text: str) -> int:
    return len(text.split())


def _service() -> RAGService:
    return RAGService(host=None, embedder=lambda: None)  # ground() opens nothing


@pytest.mark.parametrize("keep", [1, 2])
def test_a_prompt_that_does_not_fit_drops_the_lowest_ranked_sources_first(keep):
    chunks = _ranked(3)
    question = "Which fact matters?"
    limit = _words(grounded_prompt(question, chunks[:keep]))
    assert limit < _words(grounded_prompt(question, chunks[: keep + 1]))
    grounded = _service().ground(chunks, _words, prompt=question, max_prompt_tokens=limit)
    assert [r.chunk.id for r in grounded.chunks] == [f"c{i}" for i in range(keep)]
    assert grounded.prompt == grounded_prompt(question, chunks[:keep])
    assert "[1] (doc0.md) source number 0" in grounded.prompt


@pytest.mark.parametrize("keep", [1, 2])
def test_chat_messages_that_do_not_fit_drop_the_lowest_ranked_sources_first(keep):
    chunks = _ranked(3)
    messages = [{"role": "user", "content": "Which fact matters?"}]

    def count_messages(msgs):
        return sum(_words(m["content"]) + 4 for m in msgs)  # a template adds a few per message

    limit = count_messages(grounded_messages(messages, chunks[:keep]))
    grounded = _service().ground(
        chunks,
        _words,
        messages=messages,
        max_prompt_tokens=limit,
        count_messages=count_messages,
    )
    assert [r.chunk.id for r in grounded.chunks] == [f"c{i}" for i in range(keep)]
    assert grounded.messages == grounded_messages(messages, chunks[:keep])


def test_a_prompt_that_fits_keeps_every_source_in_rank_order():
    chunks = _ranked(3)
    limit = _words(grounded_prompt("q?", chunks))
    grounded = _service().ground(chunks, _words, prompt="q?", max_prompt_tokens=limit)
    assert [r.chunk.id for r in grounded.chunks] == ["c0", "c1", "c2"]


# --- a server for the HTTP edges ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


SECRET = "/srv/secret/weights.bin token=hunter2"
GENERIC = "internal server error; the server log has the details"


class BrokenEngine:
    """The server's engine, except that submitting raises an exception no handler expects."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt_ids, params, request_id=None):
        raise RuntimeError(f"could not open {SECRET}")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ],
)
def test_an_unexpected_exception_is_a_generic_500_and_its_text_is_only_logged(
    server, caplog, path, body
):
    base, state = server
    real = state.engine
    state.engine = BrokenEngine(real)
    try:
        with caplog.at_level(logging.ERROR, logger="atlas.api"):
            r = httpx.post(base + path, json={"model": MODEL, **body}, timeout=60)
    finally:
        state.engine = real
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["message"] == GENERIC
    assert error["type"] == "server_error"
    assert "secret" not in r.text and "hunter2" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and SECRET in str(rec.exc_info[1])]
    assert logged, "the exception should be in the server log"


def test_the_openai_client_sees_only_the_generic_500(server, client):
    base, state = server
    real = state.engine
    state.engine = BrokenEngine(real)
    try:
        with pytest.raises(InternalServerError) as caught:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    finally:
        state.engine = real
    assert caught.value.status_code == 500
    assert GENERIC in str(caught.value) and "hunter2" not in str(caught.value)
    # The server keeps serving.
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


# --- the chosen token in top_logprobs ----------------------------------------------------


def _check_chosen_is_listed(lp, n_top: int, first: int = 0) -> int:
    """Every position from `first` lists its token; returns how many chose a non-top-N one."""
    outside = 0
    for i in range(first, len(lp.tokens)):
        token, chosen, top = lp.tokens[i], lp.token_logprobs[i], lp.top_logprobs[i]
        assert token in top, (i, token, top)
        assert top[token] == pytest.approx(chosen, abs=1e-6)
        assert n_top <= len(top) <= n_top + 1, (i, top)
        if len(top) == n_top + 1:  # chosen outside the top N: it scores no better than them
            outside += 1
            assert all(chosen <= v + 1e-6 for t, v in top.items() if t != token)
        assert all(math.isfinite(v) for v in top.values())
    return outside


def test_logprobs_zero_lists_just_the_chosen_token_like_vllm(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The quick brown fox",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8
    _check_chosen_is_listed(lp, n_top=0)
    assert all(len(top) == 1 for top in lp.top_logprobs)


def test_a_sampled_token_outside_the_top_n_is_listed_too(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Sampling far from the mode",
        max_tokens=24,
        temperature=2.0,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 24
    # At temperature 2 over a random model, most picks are outside the top 2.
    assert _check_chosen_is_listed(lp, n_top=2) > 0


def test_echoed_prompt_tokens_are_listed_in_their_top_logprobs(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Echo every prompt token",
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
    )
    lp = r.choices[0].logprobs
    assert lp.top_logprobs[0] is None  # the first prompt token has no context
    _check_chosen_is_listed(lp, n_top=1, first=1)
