"""The HTTP API, driven through the official `openai` client and checked against the model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
from openai import APIError, APIStatusError, BadRequestError, InternalServerError, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from servers import serving

from atlas_server.api import ServerState, create_app
from atlas_server.api.generation import TextOffsets
from atlas_server.checkpoint import load_checkpoint
from atlas_server.config import EngineSection, ModelSection, RAGSection, ServerConfig
from atlas_server.engine.types import RequestOutput

MODEL = "tiny"
# ATLAS_TEST_DEVICE=cuda serves the whole suite from a CUDA engine (bench/gpu_check.sh runs
# it so): graphs, GPU sampling and overlap mode, in fp32 so that greedy output still equals
# the CPU reference loops here.
DEVICE = os.environ.get("ATLAS_TEST_DEVICE", "cpu")


@contextmanager
def running_server(checkpoint, api_key=None, engine=EngineSection(), load=True):
    """A server without RAG (tests/test_rag_server.py serves it): no vector store opens."""
    config = ServerConfig(
        model=ModelSection(device=DEVICE, dtype="float32"),
        engine=engine,
        rag=RAGSection(enabled=False),
    )
    state = ServerState(config=config, model_name=MODEL, checkpoint_path=str(checkpoint))
    app = create_app(state, api_key=api_key, load_on_startup=load)
    # Without loading, /health answers 503 ("loading") for good: that is ready enough.
    with serving(app, ready=lambda status: status == 200 or (not load and status == 503)) as base:
        yield base, state


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).model


def greedy(model, ids, n):
    """A plain greedy loop over full forwards: the reference for the engine's output."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


def test_completion_greedy_text_equals_the_model(client, model, byte_tokenizer):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = byte_tokenizer.decode(greedy(model, byte_tokenizer.encode(prompt), 12))
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 12


def test_prompt_forms_and_choice_indices(client, model, byte_tokenizer):
    r = client.completions.create(
        model=MODEL,
        prompt=["ab", "xyz"],
        max_tokens=3,
        temperature=0,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] == byte_tokenizer.decode(greedy(model, list(b"ab"), 3))
    assert by_index[2] == byte_tokenizer.decode(greedy(model, list(b"xyz"), 3))
    ids = client.completions.create(
        model=MODEL,
        prompt=[120, 121, 122],
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert ids.choices[0].text == by_index[2]
    many = client.completions.create(
        model=MODEL,
        prompt=[[97, 98], [120, 121, 122]],
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [
        by_index[0],
        by_index[2],
    ]


def test_echo_logprobs_equal_log_softmax_like_lm_eval(server, model):
    # Exactly the request lm-evaluation-harness's local-completions sends for loglikelihood.
    ids = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    body = {
        "model": MODEL,
        "prompt": [ids],
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
    }
    r = httpx.post(server[0] + "/v1/completions", json=body).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - float(expected[i - 1, ids[i]])) < 1e-4
        top_token, top_value = max(lp["top_logprobs"][i].items(), key=lambda kv: kv[1])
        assert abs(top_value - float(expected[i - 1].max())) < 1e-4
    assert len(lp["tokens"]) == len(ids) + 1 and lp["text_offset"][:3] == [0, 1, 2]


def test_text_offsets_count_a_character_split_across_tokens_once(server):
    # byte-level ids: "a", then é and € as their UTF-8 bytes, one token each, then "b"
    ids = [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 98]
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 0, "logprobs": 0, "echo": True}
    choice = httpx.post(server[0] + "/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "a\u00e9\u20acb"
    # the tokens that make one character all start where it does
    assert choice["logprobs"]["text_offset"] == [0, 1, 1, 2, 2, 2, 3]


def test_text_offsets_follow_the_generated_text_as_the_engine_builds_it(byte_tokenizer):
    eot = byte_tokenizer.eot_id
    generated = [0xC3, 0xA9, eot, 98]  # é split in two, a special token, "b"
    skipping = TextOffsets(byte_tokenizer, skip_special_tokens=True)
    assert skipping.prompt([97]) + skipping.generated(generated) == [0, 1, 1, 2, 2]
    keeping = TextOffsets(byte_tokenizer, skip_special_tokens=False)
    # the echo's unfinished character ends as U+FFFD: one character before the answer
    assert keeping.prompt([97, 0xE2]) == [0, 1]
    assert keeping.generated(generated[:2]) + keeping.generated(generated[2:]) == [
        2, 2, 3, 3 + len("<|endoftext|>"),
    ]  # fmt: skip


def test_echo_with_zero_max_tokens_scores_the_prompt(server):
    body = {"model": MODEL, "prompt": "scoring only", "max_tokens": 0, "logprobs": 0, "echo": True}
    r = httpx.post(server[0] + "/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == "scoring only" and r["usage"]["completion_tokens"] == 0
    assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == len("scoring only")


def test_seeded_sampling_is_reproducible_and_choices_differ(client):
    kwargs = dict(
        model=MODEL,
        prompt="Once",
        max_tokens=16,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a = [c.text for c in sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)]
    b = [c.text for c in sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)]
    assert a == b and len(set(a)) == 3


def test_stop_string_cuts_the_text_and_never_leaks(client, model, byte_tokenizer):
    full = byte_tokenizer.decode(greedy(model, list(b"Stop here"), 20))
    stop = full[5:8]
    kwargs = dict(
        model=MODEL,
        prompt="Stop here",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices
    )
    assert streamed == r.choices[0].text
    # vLLM's include_stop_str_in_output keeps the stop string, streamed or not
    kwargs["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    kept = client.completions.create(**kwargs).choices[0]
    assert kept.text == full[: full.index(stop) + len(stop)] and kept.finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices
    )
    assert streamed == kept.text


def test_streaming_matches_non_streaming_and_reports_usage(client):
    kwargs = dict(
        model=MODEL, prompt="Streams", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_stream(client, model, byte_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant"
    tok = byte_tokenizer
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    ids = []
    for m in messages:
        ids += [start, *tok.encode(f"{m['role']}\n{m['content']}"), end, *tok.encode("\n")]
    ids += [start, *tok.encode("assistant\n")]
    expected = greedy(model, ids, 6)
    stops = [i for i, t in enumerate(expected) if t in (end, tok.eot_id)]
    cut = stops[0] if stops else len(expected)
    assert r.choices[0].message.content == tok.decode(expected[:cut])
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_tokenizer_routes_and_models(server, byte_tokenizer):
    base = server[0]
    t = httpx.post(base + "/tokenize", json={"prompt": "héllo"}).json()
    assert t["tokens"] == byte_tokenizer.encode("héllo") and t["count"] == 6
    assert (
        httpx.post(base + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "héllo"
    )
    info = httpx.get(base + "/tokenizer_info").json()
    assert (
        info["vocab_size"] == byte_tokenizer.vocab_size
        and info["eos_token_id"] == byte_tokenizer.eot_id
    )
    models = httpx.get(base + "/v1/models").json()["data"]
    assert models[0]["id"] == MODEL and models[0]["max_model_len"] == 256


HOSTILE = [
    (b"{not json", "application/json"),
    (b"[]", "application/json"),
    (b'{"prompt": 5}', "application/json"),
    (b'{"prompt": "x", "max_tokens": -1}', "application/json"),
    (b'{"prompt": "x", "max_tokens": 1e999}', "application/json"),
    (b'{"prompt": "x", "temperature": "hot"}', "application/json"),
    (b'{"prompt": "x", "temperature": NaN}', "application/json"),
    (b'{"prompt": "x", "n": 1000}', "application/json"),
    (b'{"prompt": "x", "logprobs": 99}', "application/json"),
    (b'{"prompt": "x", "best_of": 3}', "application/json"),
    (b'{"prompt": [[1, 2], "x"]}', "application/json"),
    (b'{"prompt": [999999]}', "application/json"),
    (b'{"prompt": ""}', "application/json"),
    (b'{"prompt": "x", "logit_bias": {"abc": 1}}', "application/json"),
    (b'{"prompt": "x", "stop": [""]}', "application/json"),
    (b'{"prompt": "x", "model": "gpt-9"}', "application/json"),
    (b'{"prompt": "x", "rag": {"collection": "c"}}', "application/json"),
    ((b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"), "application/json"),
    (b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
]


def test_a_body_that_ends_early_is_called_incomplete_json(server):
    """msgspec's "Input data was truncated" did not say that the body was JSON cut short."""
    for body in (b'{"prompt": "ab', b"{", b'{"prompt"'):
        r = httpx.post(server[0] + "/v1/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith(
            "the request body is not valid JSON: it ends"
        )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_bodies_get_openai_errors_never_5xx(server, path):
    for body, ctype in HOSTILE:
        r = httpx.post(server[0] + path, content=body, headers={"content-type": ctype}, timeout=30)
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text[:200])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_specific_error_statuses(server):
    base = server[0]
    assert (
        httpx.post(base + "/v1/completions", json={"prompt": "x", "model": "nope"}).status_code
        == 404
    )
    too_long = httpx.post(base + "/v1/completions", json={"prompt": "x" * 250, "max_tokens": 10})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    wrong_type = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": "a"})
    assert wrong_type.json()["error"]["param"] == "max_tokens"
    assert httpx.get(base + "/v1/completions").status_code == 405
    assert httpx.get(base + "/nowhere").status_code == 404
    big = httpx.post(
        base + "/v1/completions",
        content=b"x" * (5 * 2**20),
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413


def test_tool_calls_and_json_output_are_refused_not_ignored(client):
    """A client asking for tool calls or JSON gets a 400 naming the field, not free text it
    would fail to parse later; tool_choice "none" and response_format "text" are served."""
    messages = [{"role": "user", "content": "weather in Paris?"}]
    tool = {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
    }
    refused = (
        ({"tools": [tool]}, "tools"),
        ({"tools": [tool], "tool_choice": "required"}, "tools"),
        ({"functions": [tool["function"]]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),  # nothing to call
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    )  # fmt: skip
    for extra, param in refused:
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)
        assert e.value.body["param"] == param, extra
        assert "not supported" in e.value.body["message"] or param == "tool_choice"
    # vLLM's structured-output fields and its prompt_logprobs, on both routes; they were
    # ignored (free text answered a guided_choice of two words).
    for field, value in (("guided_choice", ["yes", "no"]), ("guided_json", {"type": "object"}),
                         ("guided_regex", "[0-9]+"), ("structured_outputs", {"choice": ["a"]}),
                         ("prompt_logprobs", 3),
                         ("response_format", {"type": "json_object"})):  # fmt: skip
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=2, extra_body={field: value}
            )
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"]
        with pytest.raises(BadRequestError) as e:
            client.completions.create(
                model=MODEL, prompt="x", max_tokens=2, extra_body={field: value}
            )
        assert e.value.body["param"] == field
    # stream_options without stream: OpenAI's 400
    for route, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": messages})):  # fmt: skip
        r = httpx.post(
            str(client.base_url) + route,
            json={**body, "max_tokens": 2, "stream_options": {"include_usage": True}},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    # Malformed values are the schema's 400 naming the field, never a 500.
    for extra, param in (
        ({"tools": "weather"}, "tools"),
        ({"tool_choice": 5}, "tool_choice"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": ["json_object"] * 10_000}}, "response_format"),
        ({"functions": [1, 2]}, "functions"),
    ):
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, **extra}
        r = httpx.post(str(client.base_url) + "chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (extra, r.text[:200])
        assert param in (r.json()["error"]["param"] or ""), (extra, r.text[:200])
        assert len(r.json()["error"]["message"]) < 400  # the input is not echoed back whole
    served = (
        {"tools": [tool], "tool_choice": "none"},
        {"functions": [tool["function"]], "function_call": "none"},
        {"response_format": {"type": "text"}},
        {"response_format": {}},
    )
    for extra in served:
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)
        assert out.choices[0].finish_reason == "length"


def test_continue_final_message_continues_the_prefilled_answer(
    server, client, model, byte_tokenizer
):
    """vLLM's continue_final_message: the last (assistant) message is left open and the
    model continues it; it was ignored, and the turn closed with <|im_end|>."""
    tok = byte_tokenizer
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    ids = [start, *tok.encode("user\nHi"), end, *tok.encode("\n"), start,
           *tok.encode("assistant\nHello, I")]  # fmt: skip
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(server[0] + "/tokenize", json=body, timeout=30).json()["tokens"]
    assert tokens == ids
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True,
                    "ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].message.content == tok.decode(greedy(model, ids, 5))
    assert r.usage.prompt_tokens == len(ids)
    both = httpx.post(
        server[0] + "/v1/chat/completions",
        json={"messages": messages, "continue_final_message": True},  # add_generation_prompt
        timeout=30,
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_api_key_is_required_on_v1_only(tiny_checkpoint):
    with running_server(tiny_checkpoint, api_key="s3cret") as (base, _):
        assert httpx.get(base + "/v1/models").status_code == 401
        assert (
            httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        assert (
            httpx.get(base + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        for header, status in (
            ("bearer s3cret", 200),
            ("BEARER  s3cret", 200),
            ("Bearer S3CRET", 401),
            ("Basic s3cret", 401),
            ("s3cret", 401),
        ):
            r = httpx.get(base + "/v1/models", headers={"Authorization": header})
            assert r.status_code == status, header  # the scheme's case is free, the key's not
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.head(base + "/health").status_code == 200
        with pytest.raises(APIStatusError) as e:
            OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0).models.list()
        assert e.value.status_code == 401


def test_the_suite_serves_from_the_device_it_was_given(server):
    """On CPU by default; with ATLAS_TEST_DEVICE=cuda every test here ran on the GPU."""
    backend = httpx.get(server[0] + "/health").json()["backend"]
    assert backend["device"].split(":")[0] == DEVICE.split(":")[0]
    assert backend["dtype"] == "float32"


def test_health_is_503_until_the_model_is_loaded(tiny_checkpoint):
    with running_server(tiny_checkpoint, load=False) as (base, _):
        assert httpx.get(base + "/health").status_code == 503
        assert httpx.head(base + "/health").status_code == 503  # load balancers probe so
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_health_says_rag_is_off_on_a_server_without_it(server):
    body = httpx.get(server[0] + "/health").json()
    assert body["status"] == "ok" and body["rag"] == "off"


def test_out_of_range_seed_is_a_400_and_the_server_keeps_serving(server):
    base = server[0]
    for seed in (2**63, -(2**63) - 1, 2**64 + 5):
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    edge = {"prompt": "x", "max_tokens": 2, "n": 2, "seed": 2**63 - 1}  # + choice index
    assert httpx.post(base + "/v1/completions", json=edge, timeout=30).status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_engine_thread_died(tiny_checkpoint):
    with running_server(tiny_checkpoint) as (base, state):

        def crash():
            raise RuntimeError("bug")

        state.engine._apply_aborts = crash
        state.engine._wake.set()
        state.engine._thread.join(10)
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and "engine thread has stopped" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ],
)
def test_streams_are_labelled_as_event_streams(server, path, body):
    """Browsers' EventSource and strict SSE clients refuse any other content type."""
    with httpx.stream("POST", server[0] + path, json={**body, "max_tokens": 2}) as r:
        assert r.headers.get_list("content-type") == ["text/event-stream"]
        assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]
    schema = httpx.get(server[0] + "/schema/openapi.json").json()
    ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}


def test_missing_body_is_named(server):
    r = httpx.post(server[0] + "/v1/completions")
    assert r.status_code == 400 and "request body is missing" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/v1/completions", {"max_tokens": 2}, "prompt"),
     ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role"),
     ("/detokenize", {}, "tokens")],
)  # fmt: skip
def test_a_missing_required_field_is_named_in_param(server, path, body, param):
    error = httpx.post(server[0] + path, json=body).json()["error"]
    assert error["param"] == param and "missing required field" in error["message"], error


def test_full_queue_answers_429_with_retry_after(tiny_checkpoint):
    engine = EngineSection(max_running=1, max_queued=1, max_batched_tokens=64)

    async def burst(base):
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"prompt": "queue", "max_tokens": 200, "extra": 1, "ignore_eos": True}
            return await asyncio.gather(
                *[http.post(base + "/v1/completions", json=body) for _ in range(6)]
            )

    with running_server(tiny_checkpoint, engine=engine) as (base, _):
        # Two prompts are two requests, and the second would always wait: a 400, not a
        # 429 that a client retries forever.
        listed = httpx.post(base + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
        assert _error(listed)["param"] == "prompt" and "max_queued" in _error(listed)["message"]
        responses = asyncio.run(burst(base))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert (
        int(limited.headers["retry-after"]) >= 1
        and limited.json()["error"]["type"] == "rate_limit_error"
    )


def _gauge(base, name):
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_32_concurrent_streams_with_disconnects(server, client):
    base, _ = server
    prompts = [f"client {i} says" for i in range(32)]
    expected = {
        p: client.completions.create(
            model=MODEL, prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts[::4]
    }

    async def one(http, i, prompt):
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        text, done = "", False
        async with http.stream("POST", base + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                if i % 3 == 0 and len(text) >= 3:
                    return prompt, None  # disconnect midway
        return prompt, text if done else None

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*[one(http, i, p) for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    finished = {p: t for p, t in results if t is not None}
    assert len(finished) >= 20
    for prompt, text in finished.items():
        if prompt in expected:
            assert text == expected[prompt]
    deadline = time.time() + 10
    while _gauge(base, "atlas:num_requests_running") != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert _gauge(base, "atlas:num_requests_running") == 0
    assert _gauge(base, "atlas:kv_cache_usage_perc") == 0
    assert _gauge(base, "atlas:time_to_first_token_seconds_count") > 0


def _errors_with_status(base: str, status: str) -> float:
    text = httpx.get(base + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "atlas:request_errors_total" and sample.labels["status"] == status:
                return sample.value
    return 0.0


def test_a_stream_the_client_leaves_is_counted_as_499_like_a_non_streamed_one(server):
    """QA found dropped streams counted nowhere in /metrics, while a non-streamed request
    whose client hung up counted as a 499: dashboards under-counted aborts."""
    base, _ = server
    before = _errors_with_status(base, "499")
    limit = httpx.get(base + "/v1/models").json()["data"][0]["max_model_len"]
    body = {"model": MODEL, "prompt": "leave", "max_tokens": limit - 16, "n": 4,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.time() + 30
    while _errors_with_status(base, "499") == before and time.time() < deadline:
        time.sleep(0.05)
    assert _errors_with_status(base, "499") == before + 1


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(server, caplog):
    """QA found a body cut short (headers say 100 bytes, 12 arrive, the socket closes)
    counted as a 500 and logged at ERROR: every flaky client paged whoever alerts on 5xx."""
    import socket
    from urllib.parse import urlsplit

    base, _ = server
    before = {s: _errors_with_status(base, s) for s in ("499", "500")}
    url = urlsplit(base)
    with caplog.at_level(logging.INFO, logger="atlas.api"):
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": "'
            )
        deadline = time.time() + 30
        while _errors_with_status(base, "499") == before["499"] and time.time() < deadline:
            time.sleep(0.05)
    assert _errors_with_status(base, "499") == before["499"] + 1
    assert _errors_with_status(base, "500") == before["500"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_non_streaming_client_that_hangs_up_is_cancelled_quietly(server):
    """No traceback in the server log (a hang-up is routine), and the request is aborted."""
    base, _ = server
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "atlas.api", "litestar")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        limit = httpx.get(base + "/v1/models").json()["data"][0]["max_model_len"]
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": "hang up",
                "max_tokens": limit - 16,
                "n": 4,
                "ignore_eos": True,
            }
        ).encode()
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # send, then hang up at once
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.05)
        deadline = time.time() + 10
        while _gauge(base, "atlas:num_requests_running") != 0 and time.time() < deadline:
            time.sleep(0.05)
        assert _gauge(base, "atlas:num_requests_running") == 0
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert records == []


def test_openapi_schema_is_served(server):
    schema = httpx.get(server[0] + "/schema/openapi.json").json()
    assert "/v1/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]
    # Zero bounds of optional fields, which Litestar leaves out (api/openapi_bounds.py),
    # are there as msgspec enforces them.
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["max_tokens"]["minimum"] == 0
    assert completion["max_tokens"]["maximum"] == 1_000_000
    assert completion["temperature"]["minimum"] == 0
    assert completion["top_p"]["exclusiveMinimum"] == 0
    assert completion["logprobs"]["minimum"] == 0
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["max_completion_tokens"]["minimum"] == 0
    assert chat["top_logprobs"]["minimum"] == 0
    assert completion["repetition_penalty"]["minimum"] == 0.01

    # Bounds inside unions and containers, which Litestar drops altogether.
    def member(prop: dict, kind: str) -> dict:
        found = [m for m in prop.get("oneOf", prop.get("anyOf", [])) if m.get("type") == kind]
        assert len(found) == 1, prop
        return found[0]

    one_stop, stops = member(completion["stop"], "string"), member(completion["stop"], "array")
    assert (one_stop["minLength"], one_stop["maxLength"]) == (1, 256)
    assert stops["maxItems"] == 16 and stops["items"]["maxLength"] == 256
    bias = member(completion["logit_bias"], "object")
    assert (bias["additionalProperties"]["minimum"], bias["additionalProperties"]["maximum"]) == (
        -100,
        100,
    )
    assert bias["propertyNames"]["pattern"] == "^-?[0-9]+$"
    assert member(completion["prompt"], "string")["minLength"] == 1
    assert member(completion["prompt"], "array")["minItems"] == 1


def test_next_chat_turn_reports_cached_prompt_tokens(server, client, model, byte_tokenizer):
    """A conversation's second turn resends the first: the prefix cache serves those tokens,
    `usage.prompt_tokens_details.cached_tokens` says how many, /metrics counts them, and the
    answer is still the model's own greedy continuation."""

    def hits() -> float:
        text = httpx.get(server[0] + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = families["atlas:prefix_cache_hit_tokens"].samples
        return sum(s.value for s in samples if s.name.endswith("_total"))

    before = hits()
    history = [{"role": "user", "content": "Name a sorting algorithm and say why it is fast."}]
    first = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=8, temperature=0
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a slow one?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0.5 * second.usage.prompt_tokens  # the whole first turn, about
    assert hits() - before == cached
    ids = httpx.post(server[0] + "/tokenize", json={"messages": history}).json()["tokens"]
    expected = byte_tokenizer.decode(greedy(model, ids, 8))
    assert second.choices[0].message.content == expected


class FailingEngine:
    """The server's real engine, except that every request fails after its first event,
    the way the engine reports a step that raised (finish_reason "error")."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt_ids, params, request_id=None):
        stream = self._engine.submit(prompt_ids, params, request_id=request_id)

        async def failing():
            try:
                first = await stream.__anext__()
                yield dataclasses.replace(first, finished=False, finish_reason=None)
                yield RequestOutput(
                    first.request_id, 0, [], "", finished=True, finish_reason="error",
                    error="RuntimeError('the step failed')",
                )  # fmt: skip
            finally:
                await stream.aclose()

        return failing()


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_failing_engine_is_an_error_on_both_routes_streamed_or_not(server, client, route):
    """Never a finish_reason: a 500 body, or (streamed) an error event the `openai` client
    raises, then [DONE]."""
    base, state = server
    kwargs = dict(model=MODEL, max_tokens=8, extra_body={"ignore_eos": True})
    if route == "completions":
        path, body = "/v1/completions", {"prompt": "Hi"}

        def create(**more):
            return client.completions.create(prompt="Hi", **kwargs, **more)
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}

        def create(**more):
            return client.chat.completions.create(messages=body["messages"], **kwargs, **more)

    real = state.engine
    state.engine = FailingEngine(real)
    try:
        with pytest.raises(InternalServerError, match="generation failed.*the step failed"):
            create()
        with pytest.raises(APIError, match="generation failed.*the step failed"):
            for _ in create(stream=True):
                pass
        wire = {**body, "max_tokens": 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + path, json=wire) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        state.engine = real
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    reasons = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert reasons and set(reasons) == {None}
    assert state.in_flight == 0


def test_embeddings_and_plugins_are_served_without_rag(tiny_checkpoint, monkeypatch):
    """`[rag] enabled = false` drops retrieval, not /v1/embeddings or /v1/plugins; the
    embedder loads on the first request, on a thread that ends with it."""
    from atlas_server.api import embeddings

    loaded_on = []

    def factory():
        loaded_on.append(threading.current_thread().name)
        return embeddings.default_embedder()

    with running_server(tiny_checkpoint) as (base, state):
        assert not state.config.rag.enabled and state.rag is None
        state.embedder = embeddings.SharedEmbedder(factory)
        r = httpx.post(base + "/v1/embeddings", json={"input": ["heap queue", "x"]}, timeout=120)
        assert r.status_code == 200, r.text
        data = r.json()
        assert len(data["data"]) == 2 and len(data["data"][0]["embedding"]) == 384
        assert loaded_on == ["atlas-compute"]
        assert "atlas-compute" not in {t.name for t in threading.enumerate()}
        httpx.post(base + "/v1/embeddings", json={"input": "again"}, timeout=120)
        assert loaded_on == ["atlas-compute"]  # loaded once
        plugins = {p["name"]: p for p in httpx.get(base + "/v1/plugins").json()["data"]}
        assert "hybrid" in plugins["atlas-retrievers"]["registered"]["retrievers"]
        assert httpx.post(base + "/v1/retrieve", json={}).status_code == 404
        rag = {"prompt": "q", "rag": {"collection": "c"}}
        refused = httpx.post(base + "/v1/completions", json=rag)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "rag"


def test_nan_infinity_and_huge_numbers_are_a_400_naming_their_field(server):
    """Python's json.dumps writes NaN and Infinity (httpx and requests users send them):
    msgspec refused the body as malformed JSON with `param: null`."""
    base, _ = server
    for body, param in [
        (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
        (b'{"prompt": "hi", "top_p": 1e400}', "top_p"),
        (b'{"prompt": "hi", "logit_bias": {"5": -Infinity}}', "logit_bias.5"),
        (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": NaN}',
         "presence_penalty"),
    ]:  # fmt: skip
        route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = httpx.post(base + route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "finite number" in error["message"], error
    # Malformed for another reason: still malformed, naming nothing.
    r = httpx.post(base + "/v1/completions", content=b'{"prompt": "hi",',
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, server, model):
    """vLLM's truncate_prompt_tokens (left truncation) was ignored: the whole prompt ran."""
    state = server[1]
    ids = state.tokenizer.encode("The quick brown fox")
    kept = ids[-3:]
    body = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    cut = client.completions.create(
        prompt="The quick brown fox",
        echo=True,
        **{**body, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 3}},
    )
    assert cut.usage.prompt_tokens == 3
    expected = greedy(model, kept, 5)
    assert cut.choices[0].text == state.tokenizer.decode(kept) + state.tokenizer.decode(expected)
    same = client.completions.create(prompt=kept, **body)
    assert same.choices[0].text == state.tokenizer.decode(expected)
    # Longer than the prompt: nothing is cut. Chat cuts the rendered prompt.
    whole = client.completions.create(
        prompt=ids, **{**body, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 99}}
    )
    assert whole.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "a rather long question " * 4}],
        **{**body, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 7}},
    )
    assert chat.usage.prompt_tokens == 7
    with pytest.raises(BadRequestError) as e:
        client.completions.create(
            prompt="x", **{**body, "extra_body": {"truncate_prompt_tokens": 0}}
        )
    assert e.value.body["param"] == "truncate_prompt_tokens"
    # With rag, the cut kept the grounded prompt's tail while the answer listed the sources
    # it dropped (API QA pass): refused on both routes, before any retrieval.
    rag = {"truncate_prompt_tokens": 5, "rag": {"collection": "docs"}}
    for call in (
        lambda: client.completions.create(prompt="x", **{**body, "extra_body": rag}),
        lambda: client.chat.completions.create(
            messages=[{"role": "user", "content": "x"}], **{**body, "extra_body": rag}
        ),
    ):
        with pytest.raises(BadRequestError) as e:
            call()
        assert (
            e.value.body["param"] == "truncate_prompt_tokens" and "rag" in e.value.body["message"]
        )


def test_the_drain_waits_for_work_off_the_engine_and_answers_it_503_past_the_deadline():
    """Retrieval, documents, embeddings and plugin discovery run on compute threads, not
    in the engine: the drain counts them as in flight, and one still running at the
    deadline (a hung plugin) answers an OpenAI 503 at once instead of being cancelled by
    uvicorn at exit with a plain-text 500."""
    from atlas_server.api.errors import ServerDraining, ShutDownBeforeFinishing

    release = threading.Event()

    async def scenario():
        state = ServerState(config=ServerConfig(rag=RAGSection(enabled=False)))
        quick = asyncio.ensure_future(state.compute(lambda: 7))
        hung = asyncio.ensure_future(state.compute(release.wait, 60))
        await asyncio.sleep(0)
        assert state.in_flight == 2
        assert await quick == 7  # the drain below waits for none of it: it is done
        state.draining = True
        with pytest.raises(ServerDraining):  # new work is refused while draining
            await state.compute(lambda: 8)
        await state.drain(0.3)
        assert hung.done() and state.in_flight == 0
        with pytest.raises(ShutDownBeforeFinishing) as caught:
            hung.result()
        assert caught.value.status == 503 and "shut down" in caught.value.message

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        release.set()


def test_a_draining_server_refuses_embeddings_and_plugin_listing_with_503(server):
    base, state = server
    state.draining = True
    try:
        for method, path, body in [
            ("POST", "/v1/embeddings", {"input": "x"}),
            ("GET", "/v1/plugins", None),
        ]:
            r = httpx.request(method, base + path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "shutting down" in r.json()["error"]["message"]
    finally:
        state.draining = False


# A template of a checkpoint's own (as an imported Hugging Face model brings one), using
# the byte tokenizer's special tokens in a layout unlike ChatML.
CUSTOM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] | trim }}"
    "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}"
)


def test_chat_renders_with_the_checkpoints_own_template(tmp_path, tiny_checkpoint, model):
    """What /tokenize shows and chat feeds the model is the shared renderer's prompt; the
    reply stops at the template's end-of-turn token; training on the answered conversation
    sees the served prompt first."""
    from atlas_server.chat_template import ChatTemplate

    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "chat_template.jinja").write_text(CUSTOM_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}]
    with running_server(checkpoint) as (base, state):
        template = ChatTemplate(CUSTOM_TEMPLATE, state.tokenizer)
        ids = httpx.post(base + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert ids == template.prompt_ids(messages)
        assert state.tokenizer.decode(ids).endswith("<|im_start|>ASSISTANT: ")
        info = httpx.get(base + "/tokenizer_info").json()
        assert info["chat_template"] == CUSTOM_TEMPLATE
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0
        )
    expected = greedy(model, ids, 12)
    stops = [i for i, t in enumerate(expected) if t in template.stop_token_ids]
    expected = expected[: stops[0]] if stops else expected
    assert reply.choices[0].message.content == state.tokenizer.decode(expected)
    assert template.stop_token_ids == (state.tokenizer.eot_id,)
    answered = [*messages, {"role": "assistant", "content": reply.choices[0].message.content}]
    assert template.training_example(answered).ids[: len(ids)] == ids


def test_a_bad_chat_template_fails_the_load_not_each_request(tmp_path, tiny_checkpoint):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with running_server(checkpoint, load=False) as (base, state):
        state.load_in_background(str(checkpoint)).join(60)
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "chat_template.jinja: line 1" in health.json()["error"]
        body = {"messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(base + "/v1/chat/completions", json=body)
        assert r.status_code == 503 and "chat_template.jinja" in r.json()["error"]["message"]


def _error(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_context_errors_name_what_does_not_fit(server, model):
    """The tiny server's context is 256 tokens: errors blame the field that overflows it, in
    words `eval_suites/fit.py` recognises, and scoring uses every position it can."""
    url = server[0] + "/v1/completions"
    full = {"model": MODEL, "prompt": [[7] * 256]}
    e = _error(httpx.post(url, json=full))  # no max_tokens: nothing is left to generate
    assert e["param"] == "prompt" and "maximum context length is 256" in e["message"]
    assert "has 256, which leaves nothing to generate" in e["message"]
    e = _error(httpx.post(url, json={"model": MODEL, "prompt": [[7] * 300], "max_tokens": 0,
                                     "echo": True, "logprobs": 0}))  # fmt: skip
    assert e["param"] == "prompt" and "has 300, more than that" in e["message"]
    e = _error(httpx.post(url, json={**full, "max_tokens": 0, "echo": True, "logprobs": 0}))
    assert e["param"] == "prompt" and "at most 255 tokens" in e["message"]
    # 255 tokens score whole: every prompt token but the first gets the model's logprob.
    ids = [(5 * i) % 250 for i in range(255)]
    r = httpx.post(url, json={"model": MODEL, "prompt": [ids], "max_tokens": 0, "echo": True,
                              "logprobs": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    assert len(scored) == 255 and scored[0] is None
    assert abs(scored[254] - float(expected[253, ids[254]])) < 1e-4

    chat = server[0] + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    for field in ("max_tokens", "max_completion_tokens"):
        e = _error(httpx.post(chat, json={"messages": messages, field: 0}))
        assert e["param"] == field and f"{field} must be >= 1" in e["message"]
        e = _error(httpx.post(chat, json={"messages": messages, field: 1000}))
        assert e["param"] == field and f"{field} asks for 1000 more" in e["message"]
    e = _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "x" * 300}]}))
    assert e["param"] == "messages" and "maximum context length is 256" in e["message"]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_text_offsets_run_on_like_the_whole_response(client, echo):
    kwargs = dict(model=MODEL, prompt="Offsets", max_tokens=12, temperature=0, logprobs=2,
                  echo=echo, extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert whole.text_offset == sorted(whole.text_offset) and len(set(whole.text_offset)) > 1


def test_a_temperature_too_small_for_fp32_is_greedy(client):
    """Below 1e-5 a temperature is greedy (as in vLLM): dividing fp32 logits by 1e-45 gave
    infinities, a NaN softmax and token 0 every time."""
    kwargs = dict(model=MODEL, prompt="Tiny", max_tokens=8, extra_body={"ignore_eos": True})
    greedy_text = client.completions.create(temperature=0, **kwargs).choices[0].text
    for t in (1e-45, 5e-324, 1e-6):
        assert client.completions.create(temperature=t, **kwargs).choices[0].text == greedy_text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tiny"}], max_tokens=8,
        temperature=1e-45, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "\x00" not in chat.choices[0].message.content


def test_a_repetition_penalty_too_small_for_fp32_is_refused(server):
    for value in (1e-300, 0.001):
        r = httpx.post(server[0] + "/v1/completions",
                       json={"prompt": "x", "repetition_penalty": value})  # fmt: skip
        assert _error(r)["param"] == "repetition_penalty"


def _successes(base: str) -> dict[str, float]:
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)
    }
    return {
        s.labels["finished_reason"]: s.value
        for s in families["atlas:request_success"].samples
        if s.name.endswith("_total")
    }


def test_metrics_count_each_choices_finish_streamed_or_not(server, client):
    base = server[0]
    response = httpx.get(base + "/metrics")
    assert response.headers["content-type"].count("charset") == 1
    before = _successes(base)
    kwargs = dict(model=MODEL, prompt="Count", max_tokens=3, n=2, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    client.completions.create(**kwargs)
    list(client.completions.create(stream=True, **kwargs))
    after = _successes(base)
    assert set(after) <= {"stop", "length"}, after
    assert after["length"] - before.get("length", 0) == 4  # 2 requests x 2 choices
    # Every series names the served model, as vLLM's do: its Grafana dashboard selects
    # each panel on model_name, and with no such label every panel was empty.
    families = text_string_to_metric_families(httpx.get(base + "/metrics").text)
    samples = [sample for family in families for sample in family.samples]
    assert samples and all(sample.labels.get("model_name") == MODEL for sample in samples)


def _histograms(base: str) -> dict[str, float]:
    """Every histogram's `_count` and `_sum` in /metrics, by sample name."""
    families = text_string_to_metric_families(httpx.get(base + "/metrics").text)
    return {
        s.name: s.value
        for f in families
        if f.type == "histogram"
        for s in f.samples
        if s.name.endswith(("_count", "_sum"))
    }


def test_metrics_have_vllms_per_request_histograms(server, client):
    """vLLM's dashboards read TPOT from `request_time_per_output_token_seconds` (a
    choice's decode time over its tokens after the first) and request sizes from
    `request_prompt_tokens` / `request_generation_tokens`: each choice and prompt counts
    once, with its own sizes."""
    base = server[0]
    before = _histograms(base)
    kwargs = dict(model=MODEL, prompt="Count", max_tokens=3, n=2, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    prompt_tokens = client.completions.create(**kwargs).usage.prompt_tokens
    list(client.completions.create(stream=True, **kwargs))
    after = _histograms(base)

    def grew(name: str) -> float:
        return after[f"atlas:{name}"] - before.get(f"atlas:{name}", 0.0)

    assert grew("request_prompt_tokens_count") == 2  # two requests, one prompt each
    assert grew("request_prompt_tokens_sum") == 2 * prompt_tokens
    assert grew("request_generation_tokens_count") == 4  # 2 requests x 2 choices
    assert grew("request_generation_tokens_sum") == 4 * 3
    assert grew("request_time_per_output_token_seconds_count") == 4
    assert grew("request_decode_time_seconds_count") == 4
    # Three tokens each: a choice's TPOT is its decode time over two gaps.
    decode = grew("request_decode_time_seconds_sum")
    assert decode > 0
    assert grew("request_time_per_output_token_seconds_sum") == pytest.approx(decode / 2)
    assert grew("request_prefill_time_seconds_count") == 2
    assert 0 < grew("request_prefill_time_seconds_sum") <= grew("time_to_first_token_seconds_sum")


def test_the_served_model_can_be_retrieved_by_id(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == 256
    with pytest.raises(APIStatusError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.status_code == 404 and e.value.body["param"] == "model"


def test_ignore_eos_on_chat_also_ignores_the_end_of_turn(server, byte_tokenizer):
    """vLLM's `ignore_eos` (what `vllm bench serve` sends for fixed-length outputs) runs a
    chat to max_tokens even when the model ends its turn; without it the turn ends there."""
    end = byte_tokenizer.special_tokens["<|im_end|>"]
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "logit_bias": {str(end): 100}}  # fmt: skip
    url = server[0] + "/v1/chat/completions"
    ended = httpx.post(url, json=body, timeout=30).json()
    assert ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] == 1
    # The end of turn is the chat's EOS: no stop_reason (vLLM's null), unless the client
    # named the id itself.
    assert ended["choices"][0]["stop_reason"] is None
    named = httpx.post(url, json={**body, "stop_token_ids": [end]}, timeout=30).json()
    assert named["choices"][0]["stop_reason"] == end
    ran_on = httpx.post(url, json={**body, "ignore_eos": True}, timeout=30).json()
    assert ran_on["choices"][0]["finish_reason"] == "length"
    assert ran_on["usage"]["completion_tokens"] == 4


def test_streamed_chat_logprobs_cover_tokens_whose_text_is_held_back(client):
    """A sampled byte that starts a UTF-8 character has no text yet, but it has a logprob:
    the stream carries one entry per generated token, as the whole response does."""
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                  temperature=1.0, seed=3, logprobs=True, extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert len(whole) == 40
    # The random byte model samples bytes >= 0x80 that open or continue a character: the
    # case where a chunk's text is empty.
    assert any(not e.bytes or e.bytes[0] >= 0x80 for e in whole)
    assert [e.token for e in streamed] == [e.token for e in whole]
    # The second request reuses the first one's prompt rows (prefix caching) and computes
    # only the last prompt token anew, in a one-token step rather than the prefill: the
    # same numbers to float rounding, not bit for bit.
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed, whole, strict=True))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_huge_top_k_means_no_top_k_and_fails_no_one(server, route):
    """top_k past int64 once failed the tensor build, and with it every request in the
    step; it is now clamped to the vocabulary, which is no truncation at all."""
    base = server[0] + route
    body = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    body |= {"prompt": "k"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": "k"}]}  # fmt: skip

    def text(response):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice.get("text", (choice.get("message") or {}).get("content"))

    async def together():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(
                *[http.post(base, json={**body, "top_k": k}) for k in (2**63, 2**70, 0, 0)]
            )

    texts = [text(r) for r in asyncio.run(together())]
    assert len(set(texts)) == 1, texts  # each as if top_k were off


def test_null_means_the_default_as_in_the_openai_api(server):
    base = server[0]
    plain = {"prompt": "nulls", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    nulls = dict.fromkeys(
        ["stream", "n", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
         "min_tokens", "stream_options", "logprobs"]
    )  # fmt: skip
    a = httpx.post(base + "/v1/completions", json=plain, timeout=30).json()
    b = httpx.post(base + "/v1/completions", json={**plain, **nulls}, timeout=30)
    assert b.status_code == 200, b.text
    assert b.json()["choices"][0]["text"] == a["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0}
    chat_nulls = dict.fromkeys(["logprobs", "stream", "n", "add_generation_prompt", "ignore_eos"])
    r = httpx.post(base + "/v1/chat/completions", json={**chat, **chat_nulls}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    assert httpx.post(base + "/tokenize",
                      json={"prompt": "x", "add_special_tokens": None}).status_code == 200  # fmt: skip


def test_every_bit_of_a_seed_counts(client):
    """PyTorch's CPU generator keeps only a seed's low 32 bits; seeds are mixed first, so
    seeds 2**32 apart draw different tokens."""
    kwargs = dict(model=MODEL, prompt="Seeds", max_tokens=16, temperature=1.0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    texts = [client.completions.create(seed=s, **kwargs).choices[0].text for s in (0, 2**32, -1)]
    assert len(set(texts)) == 3, texts


@pytest.mark.parametrize("stream", [False, True])
def test_special_tokens_are_left_out_of_the_text_unless_asked(server, byte_tokenizer, stream):
    """As in vLLM (skip_special_tokens, default true): a model that emits <|im_start|>
    mid-answer does not show it; its logprob entry still names it."""
    start = byte_tokenizer.special_tokens["<|im_start|>"]
    body = {"prompt": "s", "max_tokens": 3, "temperature": 0, "logprobs": 0, "stream": stream,
            "logit_bias": {str(start): 100}}  # fmt: skip

    def text_and_tokens(extra):
        r = httpx.post(server[0] + "/v1/completions", json={**body, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        if not stream:
            choice = r.json()["choices"][0]
            return choice["text"], choice["logprobs"]["tokens"]
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
        return "".join(c["text"] for c in choices), tokens

    assert text_and_tokens({}) == ("", ["<|im_start|>"] * 3)
    assert text_and_tokens({"skip_special_tokens": False})[0] == "<|im_start|>" * 3
