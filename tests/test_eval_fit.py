"""Every suite fits its prompts to the server's context, and a prompt that cannot fit is
skipped and counted, never the end of the run (issue 20 item 6, issue 21).

The judge of "fits" is nobody's code here: Atlas's own engine refuses a prompt whose tokens
plus max_tokens exceed max_model_len with an HTTP 400, so a run where every item was
answered proves every prompt fitted. Two servers, in process:
  - a stand-in for the default model the README serves (`atlas-train quickstart`): its
    preset's context length (512) and a 4096-token BPE trained, as the quickstart trains
    its own, on the standard library's text; the weights are gpt2-tiny's (only the
    context and the tokenizer matter to fitting);
  - the same context with the byte-level tokenizer (one token per byte: the hardest case,
    where some items cannot fit at all).
A fake OpenAI-compatible server with no max_model_len and no /tokenize covers the rest:
the server's 400 as the last resort, and the `max_context_tokens` option.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from servers import serving

from atlas_server.api import ServerState, create_app
from atlas_server.checkpoint import save_checkpoint
from atlas_server.config import RAGSection, ServerConfig
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig, train_from_texts
from eval_suites.config import load_suite_config
from eval_suites.errors import ServerRequestError, SuiteConfigError
from eval_suites.fit import ContextWindow, PromptFitter, is_context_error, resolve_context
from eval_suites.runner import RunOptions, default_cache_path, run_suite
from eval_suites.suites.base import DATA_DIR
from eval_suites.suites.generation import GenerationConfig, pose
from eval_suites.suites.generation import build_items as generation_items
from eval_suites.suites.hallucination import HallucinationConfig, fit_inline, open_prompt
from eval_suites.suites.hallucination import build_items as hallucination_items
from eval_suites.suites.latency import LatencyConfig, fit_lengths
from eval_suites.suites.perplexity import PerplexityConfig, fit_window
from eval_suites.tokens import LocalTokenizer, TokenCounter, estimate_tokens

ROOT = Path(__file__).resolve().parent.parent
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def default_model_context() -> int:
    """The context length of the model `configs/train/quickstart.toml` trains."""
    train = tomllib.loads((ROOT / "configs" / "train" / "quickstart.toml").read_text())
    return load_preset(train["model"]["preset"]).max_seq_len


def serve_checkpoint(path: Path):
    state = ServerState(
        config=ServerConfig(rag=RAGSection(enabled=False)),
        model_name=path.name,
        checkpoint_path=str(path),
    )
    return serving(create_app(state))


@pytest.fixture(scope="module")
def quickstart_tokenizer(tmp_path_factory) -> Path:
    """4096 tokens learned from the standard library, like the quickstart's (on less text)."""
    tokenizer = train_from_texts(
        stdlib_sample(1_000_000, docstring_share=0.5), TrainConfig(vocab_size=4096)
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(path)
    return path


def checkpoint(root: Path, name: str, tokenizer) -> Path:
    torch.manual_seed(0)
    model = Transformer(
        load_preset(
            "gpt2-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=default_model_context()
        )
    )
    return save_checkpoint(root / name, model, tokenizer, {"source": "tests/test_eval_fit.py"})


@pytest.fixture(scope="module")
def default_model_url(tmp_path_factory, quickstart_tokenizer):
    from atlas_server.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(quickstart_tokenizer)
    path = checkpoint(tmp_path_factory.mktemp("ckpt"), "quickstart-stand-in", tokenizer)
    with serve_checkpoint(path) as url:
        yield url


@pytest.fixture(scope="module")
def byte_model_url(tmp_path_factory, byte_tokenizer):
    path = checkpoint(tmp_path_factory.mktemp("ckpt"), "bytes-512", byte_tokenizer)
    with serve_checkpoint(path) as url:
        yield url


def run(tmp_path: Path, suite: str, url: str, *overrides: str, **kwargs) -> dict:
    out = run_suite(
        RunOptions(
            suite=suite,
            base_url=url,
            output=tmp_path / f"{suite}-{len(list(tmp_path.iterdir()))}",
            cache_path=kwargs.pop("cache", tmp_path / "cache.sqlite"),
            overrides=overrides,
            **kwargs,
        )
    )
    results = json.loads((out / "results.json").read_text())
    results["_samples"] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    results["_report"] = (out / "report.md").read_text()
    return results


# --- the defaults on the default model ------------------------------------------------------------
@pytest.mark.parametrize(
    ("suite", "limit"),
    [("perplexity", 2), ("generation", 3), ("hallucination", 6), ("latency", 2)],
)
def test_every_suites_defaults_run_on_the_default_models_context(
    tmp_path, default_model_url, suite, limit
):
    # No --set: the suite's own defaults. --limit only shortens the run (every item's fit
    # is checked below without a server).
    results = run(tmp_path, suite, default_model_url, limit=limit)
    fit = results["context_fit"]
    assert fit["max_model_len"] == default_model_context() == 512
    assert fit["items_skipped"] == 0, fit["skipped"]
    assert results["metrics"] and f"context {fit['max_model_len']} tokens" in results["_report"]
    if suite == "latency":
        assert results["metrics"]["failed"]["value"] == 0


def fitter_for(tokenizer_file: Path, tokens: int) -> SimpleNamespace:
    """A RunContext stand-in for the fitting functions: a local tokenizer, no server."""
    local = LocalTokenizer(tokenizer_file)
    return SimpleNamespace(
        fit=PromptFitter(ContextWindow(tokens, "test"), TokenCounter(None, local)), local=local
    )


def facts() -> list[dict]:
    path = DATA_DIR / "hallucination" / "facts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def records() -> list[dict]:
    path = DATA_DIR / "generation" / "python_faq.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_every_default_item_fits_the_default_model(quickstart_tokenizer):
    """All 100 generation and 48 hallucination items, counted by the model's tokenizer."""
    context = default_model_context()
    gen_cfg = load_suite_config("generation", GenerationConfig)
    ctx = fitter_for(quickstart_tokenizer, context)
    shots, items = generation_items(records(), gen_cfg, seed=0)

    async def fit_generation():
        return [await pose(ctx, gen_cfg, t, shots[t], it) for t in items for it in items[t]]

    posed = asyncio.run(fit_generation())
    assert len(posed) == 100 and not ctx.fit.skipped
    for p in posed:
        assert ctx.local.count(p.prompt) + gen_cfg.max_tokens <= context

    hal_cfg = load_suite_config("hallucination", HallucinationConfig)
    ctx = fitter_for(quickstart_tokenizer, context)
    hal_items = hallucination_items(facts(), hal_cfg, seed=0)

    async def fit_hallucination():
        return [await fit_inline(ctx, hal_cfg, it) for it in hal_items]

    fitted = asyncio.run(fit_hallucination())
    assert len(fitted) == 48 and all(f is not None for f in fitted) and not ctx.fit.skipped
    for item, cut in fitted:
        assert ctx.local.count(open_prompt(item)) + hal_cfg.max_tokens <= context
        if cut is not None:  # the answer stays in the gold passage
            assert all(item.gold in item.sources[i - 1].text for i in item.gold_indices)
    # The failure: the items with 4 distractors are too long whole (534 tokens with
    # this tokenizer) and are cut; the rest are sent as they are.
    assert 0 < sum(cut is not None for _, cut in fitted) < 48


# --- one token per byte: trimmed, and skipped when nothing fits ------------------------------------
def test_generation_defaults_fit_a_512_token_byte_model(tmp_path, byte_model_url):
    # Before prompts were fitted this aborted: "this model's maximum context length is 512
    # tokens; the prompt has 1048 and max_tokens asks for 64 more (1112)".
    results = run(tmp_path, "generation", byte_model_url, limit=3)
    fit = results["context_fit"]
    assert fit["items_evaluated"] == 6 and fit["items_skipped"] == 0
    assert fit["token_counter"] == "server /tokenize"
    # The server answered every prompt, so each fitted; bytes are tokens here.
    samples = results["_samples"]
    assert len(samples) == 6 and all(s["shots"] < 2 for s in samples)
    assert fit["items_trimmed"] == 6 and "6 of them trimmed" in results["_report"]


def test_hallucination_skips_what_cannot_fit_and_counts_it(tmp_path, byte_model_url):
    # Item 5 (seed 0) has 4 distractors: five sources do not fit 512 bytes even cut to
    # 48 characters each; the others do once cut.
    results = run(tmp_path, "hallucination", byte_model_url, "closed_book=false", limit=6)
    fit = results["context_fit"]
    skipped = [s["id"] for s in fit["skipped"]]
    assert fit["items_skipped"] == len(skipped) >= 1
    assert fit["items_evaluated"] + fit["items_skipped"] == 6
    assert all("does not fit the 512-token context" in s["reason"] for s in fit["skipped"])
    ids = [s["id"] for s in results["_samples"]]
    assert len(ids) == fit["items_evaluated"] and not set(ids) & set(skipped)
    cfg = load_suite_config("hallucination", HallucinationConfig)
    sources = {it.id: len(it.sources) for it in hallucination_items(facts(), cfg, seed=0)}
    assert all(sources[i] == 5 for i in skipped)  # only the gold passage + 4 distractors
    assert f"**{len(skipped)} skipped: too long for the context**" in results["_report"]
    assert any(s["passage_chars"] for s in results["_samples"])


def test_a_perplexity_window_larger_than_the_context_is_lowered(tmp_path, byte_model_url):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d", "text": json.__doc__ * 2}) + "\n")
    big = run(tmp_path, "perplexity", byte_model_url, f"data='{docs}'", "window=1024")
    assert big["details"]["window"] == 510 and big["details"]["window_requested"] == 1024
    assert "window 1024 lowered to 510" in big["context_fit"]["notes"][0]
    exact = run(tmp_path, "perplexity", byte_model_url, f"data='{docs}'", "window=510")
    assert big["metrics"] == exact["metrics"]


# --- a server that reports no context: its 400, or max_context_tokens ------------------------------
class ByteLimitedHandler(http.server.BaseHTTPRequestHandler):
    """OpenAI-compatible, no max_model_len, no /tokenize; a prompt of more than LIMIT bytes
    (one token per byte) plus max_tokens gets vLLM's 400."""

    LIMIT = 300
    max_model_len: int | None = None
    refused: list[int] = []

    def log_message(self, *args):
        return

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path != "/v1/models":
            return self.reply(404, {"error": {"message": "not found"}})
        card = {"id": "bytes", "object": "model"}
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        self.reply(200, {"object": "list", "data": [card]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self.reply(404, {"error": {"message": "not found"}})
        asked = len(body["prompt"].encode()) + body["max_tokens"]
        if asked > self.LIMIT:
            self.refused.append(asked)
            message = (
                f"This model's maximum context length is {self.LIMIT} tokens. However, you"
                f" requested {asked} tokens. Please reduce the length of the messages."
            )
            return self.reply(400, {"error": {"message": message, "type": "BadRequestError"}})
        self.reply(200, {"choices": [{"index": 0, "text": " why", "finish_reason": "stop"}]})


@pytest.fixture
def byte_limited_url():
    ByteLimitedHandler.refused = []
    ByteLimitedHandler.max_model_len = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ByteLimitedHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_without_a_known_context_the_servers_400_skips_the_item(tmp_path, byte_limited_url):
    results = run(tmp_path, "generation", byte_limited_url, "num_shots=0", limit=8)
    fit = results["context_fit"]
    assert fit["max_model_len"] is None and fit["source"].startswith("unknown")
    assert fit["items_skipped"] == len(ByteLimitedHandler.refused) > 0
    assert all("refused it as too long" in s["reason"] for s in fit["skipped"])
    assert fit["items_evaluated"] == 16 - fit["items_skipped"] == len(results["_samples"]) > 0


def test_max_context_tokens_fits_prompts_for_a_server_that_reports_none(
    tmp_path, byte_limited_url, monkeypatch
):
    # And with no --cache, the response cache lives in ATLAS_HOME (issue 21).
    monkeypatch.delenv("ATLAS_EVAL_CACHE", raising=False)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    results = run(
        tmp_path,
        "generation",
        byte_limited_url,
        "num_shots=0",
        f"max_context_tokens={ByteLimitedHandler.LIMIT}",
        limit=8,
        cache=None,
    )
    fit = results["context_fit"]
    assert fit["max_model_len"] == 300 and fit["source"] == "max_context_tokens option"
    # No /tokenize: counted by the byte estimate, which never undercounts here.
    assert fit["token_counter"].startswith("estimate")
    assert ByteLimitedHandler.refused == [] and fit["items_skipped"] == 0
    assert fit["items_evaluated"] == 16 and fit["items_trimmed"] > 0
    assert results["cache"]["path"] == str(tmp_path / "home" / "eval-cache.sqlite")
    assert (tmp_path / "home" / "eval-cache.sqlite").is_file()


def test_a_run_where_nothing_fits_fails_in_one_line_and_leaves_no_empty_folder(
    tmp_path, byte_limited_url
):
    ByteLimitedHandler.max_model_len = 70
    out = tmp_path / "nothing"
    with pytest.raises(SuiteConfigError, match="none of the 4 items fits") as error:
        run_suite(
            RunOptions(
                suite="generation",
                base_url=byte_limited_url,
                output=out,
                overrides=("num_shots=0",),
                limit=2,
                use_cache=False,
            )
        )
    assert not out.exists() and f"removed the empty folder {out}" in str(error.value)
    # Fixed latency lengths that exceed the context: refused before anything is sent.
    with pytest.raises(SuiteConfigError, match="do not fit the server's 70-token context"):
        run_suite(RunOptions(suite="latency", base_url=byte_limited_url, output=out))
    assert not out.exists()


# --- pieces ------------------------------------------------------------------------------------------
def test_the_context_comes_from_the_server_or_the_option_whichever_is_smaller():
    assert resolve_context({"max_model_len": 512}, 0) == ContextWindow(
        512, "server /v1/models max_model_len"
    )
    assert resolve_context({"max_model_len": 512}, 256).tokens == 256
    assert resolve_context({"max_model_len": 512}, 4096).tokens == 512
    assert resolve_context({}, 2048) == ContextWindow(2048, "max_context_tokens option")
    assert resolve_context({"max_model_len": None}, 0).tokens is None


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (400, "this model's maximum context length is 512 tokens; the prompt has 450", True),
        (400, "This model's maximum context length is 2048 tokens. However, you requested", True),
        (400, "the request exceeds the available context size, try increasing it", True),
        (422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048", True),
        # Atlas's RAG, when no retrieved source fits beside the question
        (400, "no retrieved source fits the model's 512-token context next to the question", True),
        (400, "temperature must be >= 0", False),
        (500, "maximum context length", False),
    ],
)
def test_context_errors_are_told_from_other_errors(status, message, expected):
    assert is_context_error(ServerRequestError(message, status=status)) is expected


def test_the_byte_estimate_never_counts_fewer_tokens_than_a_bpe(quickstart_tokenizer):
    local = LocalTokenizer(quickstart_tokenizer)
    texts = [r["paragraph"] for r in records()] + ["ünïcödé ✓ 字", "", "  \n\n  x"]
    assert all(estimate_tokens(t) >= local.count(t) for t in texts)
    messages = [{"role": "user", "content": "hello"}]
    assert estimate_tokens(messages) >= len(b"hello") + 8


def test_fixed_latency_lengths_must_fit_and_lengths_file_rows_that_do_not_are_skipped():
    cfg = load_suite_config("latency", LatencyConfig, overrides=["lengths_file=rows.jsonl"])
    fit = PromptFitter(ContextWindow(200, "test"), TokenCounter(None))
    kept = fit_lengths(cfg, [(100, 50), (190, 20), (10, 10)], fit)
    assert kept == [(100, 50), (10, 10)] and list(fit.skipped) == ["rows.jsonl:2"]
    fixed = load_suite_config("latency", LatencyConfig, overrides=["input_len=180"])
    with pytest.raises(SuiteConfigError, match="--set input_len=136"):
        fit_lengths(fixed, None, fit)


def test_perplexity_windows_follow_the_context():
    cfg = load_suite_config("perplexity", PerplexityConfig)
    notes: list[str] = []
    assert fit_window(cfg, ContextWindow(512, "s"), notes) == (510, 510) and not notes
    assert fit_window(cfg, ContextWindow(8192, "s"), notes) == (2048, 2048)
    strided = load_suite_config("perplexity", PerplexityConfig, overrides=["stride=600"])
    assert fit_window(strided, ContextWindow(512, "s"), notes) == (510, 510)
    assert notes == ["stride 600 lowered to the window, 510"]
    with pytest.raises(SuiteConfigError, match="max_context_tokens"):
        fit_window(cfg, ContextWindow(None, "unknown"), [])


def test_the_eval_cache_lives_in_atlas_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ATLAS_EVAL_CACHE", raising=False)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "eval-cache.sqlite"
    monkeypatch.setenv("ATLAS_EVAL_CACHE", str(tmp_path / "x.sqlite"))
    assert default_cache_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("ATLAS_EVAL_CACHE")
    monkeypatch.delenv("ATLAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_path() == tmp_path / "user" / ".cache" / "atlas" / "eval-cache.sqlite"


def test_chat_prompts_are_fitted_through_the_chat_template(tmp_path, byte_model_url):
    results = run(
        tmp_path, "generation", byte_model_url, "api=chat", "max_tokens=8", "metrics=['chrf']",
        limit=2,
    )  # fmt: skip
    fit = results["context_fit"]
    assert fit["items_evaluated"] == 4 and fit["items_skipped"] == 0
    assert fit["token_counter"] == "server /tokenize"
