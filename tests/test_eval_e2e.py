"""atlas-eval end to end through real HTTP: Atlas and the transformers shim on a tiny model.

References nobody here wrote: the model's own logits (perplexity), lm-evaluation-harness's
`local-completions` rolling log-likelihood, and sacrebleu / rouge-score (generation).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import http.server
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from servers import JSONHandler, free_port

from atlas_server.checkpoint import load_checkpoint, save_checkpoint
from atlas_server.config import load_config
from atlas_server.model import Transformer, load_preset
from eval_suites.client import OpenAIClient
from eval_suites.runner import RunOptions, run_suite

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-123"


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def start(command: list[str], url: str, env: dict | None = None):
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    wait_healthy(url, process)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def eval_checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """gpt2-tiny with a 2048-token context, so few-shot and multi-source prompts fit."""
    torch.manual_seed(0)
    model = Transformer(
        load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size, max_seq_len=2048)
    )
    root = tmp_path_factory.mktemp("eval-ckpt")
    return save_checkpoint(
        root / "tiny-eval", model, byte_tokenizer, {"source": "tests/test_eval_e2e.py"}
    )


@pytest.fixture(scope="module")
def atlas_url(eval_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "atlas_server.cli",
        "serve",
        "--checkpoint",
        str(eval_checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = start(cmd, url)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def shim_url(eval_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "hf_openai_shim.py"),
        "--checkpoint",
        str(eval_checkpoint),
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--threads",
        "1",
    ]
    process = start(cmd, url)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def stdlib_docs(tmp_path_factory) -> Path:
    """Real text derived at test time: docstrings of three stdlib modules, 300-900 bytes each."""
    docs = [
        {"id": "heapq", "text": inspect.getdoc(heapq)[:900]},
        {"id": "json", "text": inspect.getdoc(json)[:700]},
        {
            "id": "bisect",
            "text": (
                inspect.getdoc(bisect.insort_left) + "\n" + inspect.getdoc(bisect.bisect_left)
            )[:500],
        },
    ]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def run(tmp_path: Path, suite: str, url: str, *overrides: str, **kwargs) -> dict:
    options = RunOptions(
        suite=suite,
        base_url=url,
        output=tmp_path / f"{suite}-{len(list(tmp_path.iterdir()))}",
        cache_path=kwargs.pop("cache", tmp_path / "cache.sqlite"),
        overrides=overrides,
        **kwargs,
    )
    out = run_suite(options)
    results = json.loads((out / "results.json").read_text())
    results["_samples"] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    results["_dir"] = out
    return results


# --- perplexity -------------------------------------------------------------------------------------
def direct_loglikelihood(checkpoint: Path, text: str) -> float:
    """Sum of log p(token | end-of-text, previous tokens) from one full forward of the model."""
    ckpt = load_checkpoint(checkpoint)
    ids = [ckpt.tokenizer.eot_id, *ckpt.tokenizer.encode_ordinary(text)]
    with torch.no_grad():
        logits = ckpt.model(torch.tensor([ids]))[0].double()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def test_perplexity_equals_the_models_own_logits(tmp_path, atlas_url, eval_checkpoint, stdlib_docs):
    results = run(tmp_path, "perplexity", atlas_url, f"data='{stdlib_docs}'", "window=1024")
    docs = [json.loads(x) for x in stdlib_docs.read_text().splitlines()]
    assert results["details"]["window"] == 1024 and results["details"]["requests"] == len(docs)
    reference = [direct_loglikelihood(eval_checkpoint, d["text"]) for d in docs]
    for sample, ref in zip(results["_samples"], reference, strict=True):
        assert sample["loglikelihood"] == pytest.approx(ref, abs=1e-4 * sample["tokens"])
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    expected_bpb = -sum(reference) / (n_bytes * math.log(2))
    assert results["metrics"]["bits_per_byte"]["value"] == pytest.approx(expected_bpb, abs=1e-4)
    assert results["metrics"]["bits_per_byte"]["higher_is_better"] is False
    expected_ppl = math.exp(-sum(reference) / sum(s["tokens"] for s in results["_samples"]))
    assert results["metrics"]["token_perplexity"]["value"] == pytest.approx(expected_ppl, rel=1e-4)


def test_perplexity_equals_lm_eval_local_completions(tmp_path, atlas_url, stdlib_docs):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    window = 100
    results = run(tmp_path, "perplexity", atlas_url, f"data='{stdlib_docs}'", f"window={window}")
    assert results["details"]["requests"] > len(results["_samples"])  # several windows per doc
    model = httpx.get(f"{atlas_url}/v1/models").json()["data"][0]["id"]
    eot = results["details"]["prefix_token_id"]
    lm = LocalCompletionsAPI(
        base_url=f"{atlas_url}/v1/completions",
        model=model,
        tokenizer_backend="remote",
        max_length=window + 2,
        custom_prefix_token_id=eot,
        num_concurrent=1,
    )
    docs = [json.loads(x)["text"] for x in stdlib_docs.read_text().splitlines()]
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = [s["loglikelihood"] for s in results["_samples"]]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_an_interrupted_run_resumes_from_the_cache_with_identical_results(
    tmp_path, atlas_url, stdlib_docs, monkeypatch
):
    overrides = (f"data='{stdlib_docs}'", "window=48")
    clean = run(tmp_path, "perplexity", atlas_url, *overrides, cache=tmp_path / "clean.sqlite")
    total = clean["details"]["requests"]

    real_request = OpenAIClient.request
    calls = {"n": 0}

    async def crash_midway(self, method, path, body=None):
        response = await real_request(self, method, path, body)
        if path == "/v1/completions" and len(body["prompt"][0]) > 8:  # not the probe
            calls["n"] += 1
            if calls["n"] > total // 2:
                raise ConnectionAbortedError("simulated crash midway")
        return response

    monkeypatch.setattr(OpenAIClient, "request", crash_midway)
    with pytest.raises(ConnectionAbortedError):
        run(
            tmp_path,
            "perplexity",
            atlas_url,
            *overrides,
            cache=tmp_path / "resume.sqlite",
            concurrency=1,
        )
    monkeypatch.setattr(OpenAIClient, "request", real_request)
    resumed = run(tmp_path, "perplexity", atlas_url, *overrides, cache=tmp_path / "resume.sqlite")
    assert resumed["metrics"] == clean["metrics"] and resumed["_samples"] == clean["_samples"]
    # Everything answered before the crash came from the cache; only the rest was sent.
    assert resumed["cache"]["hits"] >= total // 2


# --- errors -------------------------------------------------------------------------------------------
def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval_suites.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_reports_an_unreachable_server_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli("run", "perplexity", "--base-url", url, "--no-cache", "-o", str(tmp_path / "r"))
    assert_one_line_error(proc, "cannot reach", url, f"removed the empty folder {tmp_path / 'r'}")
    assert not (tmp_path / "r").exists()  # no empty results folder left behind


def test_cli_reports_a_wrong_api_key_in_one_line(tmp_path, shim_url):
    proc = cli(
        "run",
        "perplexity",
        "--base-url",
        shim_url,
        "--api-key",
        "wrong",
        "--no-cache",
        "-o",
        str(tmp_path / "r"),
    )
    assert_one_line_error(proc, "401", "--api-key")


class NoLogprobsHandler(JSONHandler):
    """A server that speaks the OpenAI API but ignores echo/logprobs (like some hosted APIs)."""

    def do_GET(self):
        self.reply(
            {"object": "list", "data": [{"id": "plain", "object": "model", "max_model_len": 512}]}
        )

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/tokenize":
            self.reply({"tokens": [1, 2, 3], "count": 3, "max_model_len": 512})
        else:
            self.reply(
                {
                    "choices": [
                        {"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}
                    ]
                }
            )


def test_cli_names_the_suite_that_needs_echo_logprobs(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = cli(
            "run",
            "perplexity",
            "--base-url",
            url,
            "--no-cache",
            "--set",
            "prefix_token_id=0",
            "-o",
            str(tmp_path / "r"),
        )
    finally:
        server.shutdown()
    assert_one_line_error(proc, "perplexity suite needs", "echo", "logprobs")


# --- hallucination --------------------------------------------------------------------------------------
def test_hallucination_runs_end_to_end_and_reports_its_judges(tmp_path, atlas_url):
    results = run(
        tmp_path, "hallucination", atlas_url, "max_tokens=16", "metrics=[]", limit=6, seed=3
    )
    samples = results["_samples"]
    assert len(samples) == 6 and {s["kind"] for s in samples} <= {
        "answerable",
        "counterfactual",
        "unanswerable",
    }
    assert all("closed_book_answer" in s and s["sources"] for s in samples)
    assert results["run"]["limit"] == 6 and "for testing only" in results["run"]["limit_note"]
    calibration = results["details"]["support_calibration"]
    assert set(calibration) == {"lexical", "embedding"}
    assert all(c["pairs"] >= 40 and 0.5 < c["loo_accuracy"] <= 1.0 for c in calibration.values())
    again = run(
        tmp_path, "hallucination", atlas_url, "max_tokens=16", "metrics=[]", limit=6, seed=3
    )
    assert again["metrics"] == results["metrics"] and again["_samples"] == samples


# --- compare: Atlas vs transformers on the same weights ---------------------------------------------------
def test_atlas_and_the_transformers_shim_agree_and_compare_plots_them(
    tmp_path, atlas_url, shim_url, stdlib_docs
):
    overrides = (f"data='{stdlib_docs}'", "window=200")
    atlas = run(tmp_path, "perplexity", atlas_url, *overrides)
    shim = run(tmp_path, "perplexity", shim_url, *overrides, api_key=API_KEY)
    assert atlas["metrics"]["bits_per_byte"]["value"] == pytest.approx(
        shim["metrics"]["bits_per_byte"]["value"], abs=1e-4
    )
    proc = cli(
        "compare",
        str(atlas["_dir"]),
        str(shim["_dir"]),
        "--label",
        "atlas",
        "--label",
        "hf",
        "-o",
        str(tmp_path / "cmp"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| metric | atlas | hf | better |" in proc.stdout
    assert (tmp_path / "cmp" / "perplexity_metrics.png").read_bytes()[:4] == b"\x89PNG"


class HostileHandler(NoLogprobsHandler):
    """A server whose answers are not what the OpenAI API promises."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/tokenize":
            self.reply({"tokens": ["not", "ids"]})
        elif self.path == "/v1/chat/completions":
            self.send_response(500)
            self.send_header("Content-Length", "21")
            self.end_headers()
            self.wfile.write(b"<html>crashed</html>\n")
        else:
            self.reply({"id": "x", "choices": []})


@pytest.mark.parametrize(
    "suite,extra,needle",
    [
        ("perplexity", [], "/tokenize did not return a list of token ids"),
        ("generation", ["--set", "api=chat", "--limit", "1"], "HTTP 500"),
        ("hallucination", ["--limit", "1"], "without choices[0]"),
    ],
)
def test_cli_turns_malformed_server_answers_into_one_line_errors(tmp_path, suite, extra, needle):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = cli("run", suite, "--base-url", url, "--no-cache", "-o", str(tmp_path / "r"), *extra)
    finally:
        server.shutdown()
    assert_one_line_error(proc, needle)


# --- generation: metric plugins equal the libraries; a third-party metric plugs in -------------------------
def test_generation_scores_equal_sacrebleu_and_rouge_score(tmp_path, atlas_url):
    import sacrebleu
    from rouge_score import rouge_scorer

    overrides = ("num_shots=1", "max_tokens=24", "max_source_chars=200")
    results = run(tmp_path, "generation", atlas_url, *overrides, limit=4)
    metrics = results["metrics"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for task in ("heading", "continuation"):
        rows = [s for s in results["_samples"] if s["task"] == task]
        assert len(rows) == 4
        preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        assert metrics[f"{task}/bleu"]["value"] == pytest.approx(
            sacrebleu.corpus_bleu(preds, [refs]).score
        )
        chrf = sacrebleu.corpus_chrf(preds, [refs]).score
        assert chrf > 0 and metrics[f"{task}/chrf"]["value"] == pytest.approx(chrf)
        for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            expected = (
                sum(scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs, strict=True)) / 4
            )
            assert metrics[f"{task}/{kind}"]["value"] == pytest.approx(expected)
    assert results["details"]["signatures"]["bleu"].startswith("nrefs:1|")
    assert "chrf" in results["details"]["signatures"]


class LengthRatioPlugin:
    """A third party's metric, registered through the plugin host like any installed plugin."""

    class LengthRatio:
        name = "length_ratio"

        def compute(self, predictions, references):
            from atlas_server.rag.types import MetricResult

            ratio = sum(len(p) for p in predictions) / max(1, sum(len(r[0]) for r in references))
            return MetricResult({"length_ratio": ratio}, {"length_ratio": False}, None)

    @staticmethod
    def atlas_register_metrics(register):
        register("length_ratio", LengthRatioPlugin.LengthRatio)


def test_a_metric_plugin_registered_by_a_third_party_scores_a_suite(
    tmp_path, atlas_url, monkeypatch
):
    import atlas_server.plugins
    from atlas_server.hookspecs import hookimpl

    host = atlas_server.plugins.PluginHost()
    plugin = type(
        "ThirdParty",
        (),
        {
            "atlas_register_metrics": staticmethod(
                hookimpl(LengthRatioPlugin.atlas_register_metrics)
            )
        },
    )
    host.register(plugin, "third-party-length")
    monkeypatch.setattr(atlas_server.plugins, "get_plugin_host", lambda: host)
    results = run(
        tmp_path,
        "generation",
        atlas_url,
        "metrics=['length_ratio']",
        "tasks=['heading']",
        "num_shots=0",
        "max_tokens=16",
        "max_source_chars=200",
        limit=3,
    )
    rows = results["_samples"]
    expected = sum(len(r["prediction"]) for r in rows) / sum(len(r["reference"]) for r in rows)
    entry = results["metrics"]["heading/length_ratio"]
    assert entry["value"] == pytest.approx(expected) and entry["higher_is_better"] is False
    with pytest.raises(Exception, match="not registered by any installed plugin"):
        run(tmp_path, "generation", atlas_url, "metrics=['no_such_metric']", limit=1)


@pytest.mark.parametrize(
    ("computes", "says"),
    [("raise", "RuntimeError: metric kaboom"), ("a float", "returned a float, not a MetricResult")],
)
def test_a_broken_metric_plugin_is_one_line_naming_it_after_the_requests(
    tmp_path, atlas_url, monkeypatch, computes, says
):
    """A metric plugin that raised, or returned 0.5 instead of a MetricResult, ended the
    run with a traceback after every request had been sent; it is one line naming the
    metric and its plugin, and the answers stay in the response cache."""
    from typer.testing import CliRunner

    import atlas_server.plugins
    from atlas_server.hookspecs import hookimpl
    from eval_suites.cli import app

    class Broken:
        name = "broken"

        def compute(self, predictions, references):
            if computes == "raise":
                raise RuntimeError("metric kaboom")
            return 0.5

    class BrokenPlugin:
        @hookimpl
        def atlas_register_metrics(self, register):
            register("broken", Broken)

    host = atlas_server.plugins.PluginHost()
    host.register(BrokenPlugin(), "broken-metric")
    monkeypatch.setattr(atlas_server.plugins, "get_plugin_host", lambda: host)
    args = ["run", "generation", "--base-url", atlas_url, "--limit", "1",
            "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.sqlite"),
            "--set", "metrics=['bleu','broken']", "--set", "tasks=['heading']",
            "--set", "num_shots=0", "--set", "max_tokens=4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "metric 'broken' (plugin 'broken-metric') failed" in lines[0] and says in lines[0]
    assert "the answers are cached" in lines[0]


def test_checkpoint_mode_starts_and_stops_an_atlas_server(tmp_path, eval_checkpoint, atlas_url):
    out = tmp_path / "ckpt-run"
    proc = cli(
        "run",
        "perplexity",
        "--checkpoint",
        str(eval_checkpoint),
        "--limit",
        "1",
        "--set",
        "window=255",
        "--cache",
        str(tmp_path / "c.sqlite"),
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["server"]["checkpoint"] == str(eval_checkpoint)
    assert results["server"]["identity"].startswith(f"checkpoint://{eval_checkpoint.resolve()}#")
    assert (out / "server.log").is_file()
    # Its RAG store (created on first use) is the run's own, not the user's default one.
    assert load_config(out / "server.toml").rag.data_dir == str(out / "qdrant")
    # The same numbers as the long-running server on the same weights.
    reference = run(tmp_path, "perplexity", atlas_url, "window=255", limit=1)
    assert results["metrics"]["bits_per_byte"]["value"] == pytest.approx(
        reference["metrics"]["bits_per_byte"]["value"], abs=1e-6
    )
    # The child server is gone: its port no longer answers.
    port = int(results["server"]["base_url"].rsplit(":", 1)[1])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)


# --- latency ---------------------------------------------------------------------------------------------
def prefix_cache_hits(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "atlas:prefix_cache_hit_tokens_total":
                return sample.value
    raise AssertionError("no atlas:prefix_cache_hit_tokens_total in /metrics")


def test_latency_suite_measures_every_level_with_vllm_field_names(tmp_path, atlas_url):
    overrides = (
        "concurrencies=[1,2]",
        "request_rates=[8.0]",
        "num_prompts=4",
        "input_len=16",
        "output_len=6",
    )
    hits_before = prefix_cache_hits(atlas_url)
    results = run(tmp_path, "latency", atlas_url, *overrides)
    # Each level sends its own prompts: with one list for all, the second and third levels
    # were served from the prefix cache (8 x 15 of their 16-token prompts).
    assert prefix_cache_hits(atlas_url) - hits_before < 16
    levels = results["details"]["levels"]
    assert [lv["load"] for lv in levels] == ["concurrency 1", "concurrency 2", "poisson 8 req/s"]
    for level in levels:
        s = level["summary"]
        assert (s["completed"], s["failed"], s["total_output_tokens"]) == (
            4,
            0,
            24,
        )  # ignore_eos + min_tokens
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < s[f"median_{name}_ms"] <= s[f"p90_{name}_ms"] <= s[f"p99_{name}_ms"]
        assert s["median_ttft_ms"] < s["median_e2el_ms"] and s["output_throughput"] > 0
    assert len(results["_samples"]) == 12 and all(r["success"] for r in results["_samples"])
    assert results["metrics"]["c2/output_throughput"]["higher_is_better"] is True
    assert results["metrics"]["failed"]["value"] == 0 and results["cache"]["misses"] == 0
    proc = cli("compare", str(results["_dir"]), "-o", str(tmp_path / "cmp"))
    assert proc.returncode == 0 and (tmp_path / "cmp" / "latency_percentiles.png").is_file()


def test_latency_refuses_non_loopback_servers(tmp_path):
    proc = cli(
        "run",
        "latency",
        "--base-url",
        "http://10.255.255.1:8000",
        "--no-cache",
        "-o",
        str(tmp_path / "r"),
    )
    assert_one_line_error(proc, "loopback", "10.255.255.1", "allow_remote=true")


def test_allow_remote_lets_the_latency_suite_load_another_host():
    from eval_suites.config import load_suite_config
    from eval_suites.errors import SuiteConfigError
    from eval_suites.suites.latency import LatencyConfig, LatencySuite

    remote = "http://10.255.255.1:8000"
    allowed = load_suite_config("latency", LatencyConfig, overrides=["allow_remote=true"])
    LatencySuite().check_server(remote, allowed)  # no error: nothing is sent yet
    default = load_suite_config("latency", LatencyConfig)
    with pytest.raises(SuiteConfigError, match="allow_remote"):
        LatencySuite().check_server(remote, default)


def test_a_level_the_server_refused_whole_stops_the_run_with_its_message(tmp_path, atlas_url):
    """Found by a QA pass: chat prompts of input_len random words outgrew a model's context,
    every request was a 400, and the run still exited 0 with a report of zeros."""
    proc = cli("run", "latency", "--base-url", atlas_url, "--no-cache", "-o", str(tmp_path / "r"),
               "--set", 'endpoint="chat"', "--set", 'mode="sweep"', "--set", "concurrencies=[1,2]",
               "--set", "num_prompts=2", "--set", "input_len=400", "--set", "output_len=4",
               "--set", "warmup_requests=0")  # fmt: skip
    assert_one_line_error(
        proc, "refused every request at concurrency 1", "maximum context length", "lower input_len"
    )
    # With the warm-up request (the default), the run stops at it, as vllm bench serve stops
    # at its test request.
    proc = cli("run", "latency", "--base-url", atlas_url, "--no-cache", "-o", str(tmp_path / "r"),
               "--set", 'endpoint="chat"', "--set", "input_len=400", "--set", "output_len=4")  # fmt: skip
    assert_one_line_error(proc, "refused every request at warm-up", "maximum context length")


def test_only_refusals_stop_a_latency_run():
    """429s are an answer under load, and cut-off or 5xx requests are what a load test
    reports; a level with one success is measured."""
    from eval_suites.loadgen import RequestRecord
    from eval_suites.suites.latency import refused_level

    def record(status, success=False, error=None):
        return RequestRecord(success, 8, status=status, error=error or f"HTTP {status}")

    refused = refused_level("concurrency 4", [record(400, error="too long")] * 3, "completions")
    assert "concurrency 4: too long" in str(refused) and refused.status == 400
    assert refused_level("c", [record(429), record(400)], "completions") is None
    assert refused_level("c", [record(400), record(200, success=True)], "completions") is None
    assert refused_level("c", [record(0, error="cut off at max_duration_s (1 s)")], "chat") is None
    assert refused_level("c", [record(503)], "chat") is None
    assert refused_level("c", [], "chat") is None


def test_a_local_tokenizer_file_gives_the_same_ids_as_the_servers_tokenize(
    tmp_path, atlas_url, eval_checkpoint, stdlib_docs
):
    overrides = (f"data='{stdlib_docs}'", "window=128", "stride=64")
    remote = run(tmp_path, "perplexity", atlas_url, *overrides)
    local = run(
        tmp_path,
        "perplexity",
        atlas_url,
        *overrides,
        tokenizer=eval_checkpoint / "atlas_tokenizer.json",
    )
    assert (
        local["details"]["tokenizer"].endswith("tokenizer.json")
        and remote["details"]["stride"] == 64
    )
    assert local["metrics"] == remote["metrics"]


def test_generation_through_chat_completions(tmp_path, atlas_url):
    results = run(
        tmp_path,
        "generation",
        atlas_url,
        "api=chat",
        "num_shots=1",
        "max_tokens=8",
        "max_source_chars=120",
        "metrics=['chrf']",
        limit=2,
    )
    assert len(results["_samples"]) == 4
    assert all(s["finish_reason"] in ("stop", "length") for s in results["_samples"])
    assert set(results["metrics"]) == {"heading/chrf", "continuation/chrf", "all/chrf"}


# --- fixes from the 2026-12-05 audit ---------------------------------------------------------------
def test_latency_prompts_have_input_len_tokens_behind_an_api_key(eval_checkpoint):
    """The load generator asks /tokenizer_info with the key: without it a keyed server said
    401 and prompts fell back to words of ~6x the asked length."""
    import asyncio

    from servers import serving

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import ModelSection, RAGSection, ServerConfig
    from eval_suites import loadgen

    config = ServerConfig(model=ModelSection(device="cpu"), rag=RAGSection(enabled=False))
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(eval_checkpoint))
    with serving(create_app(state, api_key=API_KEY)) as base:
        spec = loadgen.LoadSpec(base_url=base, api_key=API_KEY, num_requests=3, prompt_tokens=24,
                                output_tokens=3)  # fmt: skip
        records, summary = asyncio.run(loadgen.run_load(spec))
    assert summary["failed"] == 0, summary
    assert [r.prompt_tokens for r in records] == [24, 24, 24]
    assert summary["total_input_tokens"] == 72


def test_a_level_where_every_request_failed_has_no_latency_and_no_best(tmp_path):
    """Nothing measured is null, not 0 ms: compare never bolds it as the lowest latency."""
    from eval_suites import loadgen
    from eval_suites.compare import best_index

    failed = [loadgen.RequestRecord(False, 16, status=400, error="HTTP 400")]
    summary = loadgen.summarize(failed, 1.0, loadgen.LoadSpec(base_url="http://127.0.0.1:9"))
    assert summary["failed"] == 1
    assert summary["median_ttft_ms"] is None and summary["p99_itl_ms"] is None
    assert best_index([12.5, summary["median_ttft_ms"]], higher=False) is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--base-url", "127.0.0.1:9"], "is not an http(s) URL"),
        (["--base-url", "http://127.0.0.1:9", "--set", "data=/no/such.jsonl"],
         "perplexity option data: /no/such.jsonl does not exist"),
        (["--base-url", "http://127.0.0.1:9", "--set", "data=no_such.jsonl"],
         "perplexity option data: no_such.jsonl is neither in the current folder nor in "),
        (["--base-url", "http://127.0.0.1:9", "--set", "data=/"],
         "perplexity option data: / is a folder, not a file"),
    ],
)  # fmt: skip
def test_cli_refuses_a_bad_url_or_data_file_in_one_line(tmp_path, args, needle):
    proc = cli("run", "perplexity", *args, "--no-cache", "-o", str(tmp_path / "r"))
    assert_one_line_error(proc, needle)


def test_a_relative_data_file_is_read_from_the_current_folder(tmp_path, atlas_url):
    """`--set data=held.jsonl` names the user's file where they run the command (the suites'
    own files, named relative to eval_suites/data/, are found there when it holds none)."""
    lines = [json.dumps({"id": f"d{i}", "text": f"def f{i}(x):\n    return x + {i}\n"})
             for i in range(3)]  # fmt: skip
    (tmp_path / "held.jsonl").write_text("\n".join(lines) + "\n")
    proc = cli("run", "perplexity", "--base-url", atlas_url, "--set", "data=held.jsonl",
               "--no-cache", "-o", "r", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(next((tmp_path / "r").rglob("results.json")).read_text())
    own = hashlib.sha256((tmp_path / "held.jsonl").read_bytes()).hexdigest()
    assert results["data"] == {"held.jsonl": own}  # this file, not one in eval_suites/data/


def test_a_data_file_that_is_not_jsonl_is_a_one_line_error(tmp_path, atlas_url):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    proc = cli("run", "perplexity", "--base-url", atlas_url, "--set", f"data={bad}",
               "--no-cache", "-o", str(tmp_path / "r"))  # fmt: skip
    assert_one_line_error(proc, f"perplexity: {bad}:1 is not JSON")


def test_checkpoint_mode_reports_a_checkpoint_the_server_cannot_load_at_once(
    tmp_path, eval_checkpoint
):
    """The server's /health says why it failed to load; waiting 180 s for it hid the cause.
    A config that is not a checkpoint's is refused by `atlas serve` before the load."""
    broken = tmp_path / "broken"
    shutil.copytree(eval_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # fails in the load
    started = time.monotonic()
    proc = cli("run", "perplexity", "--checkpoint", str(broken), "--no-cache", "-o",
               str(tmp_path / "r"))  # fmt: skip
    assert_one_line_error(proc, "failed to load")
    assert time.monotonic() - started < 120
    (broken / "config.json").write_text("{}")
    proc = cli("run", "perplexity", "--checkpoint", str(broken), "--no-cache", "-o",
               str(tmp_path / "r2"))  # fmt: skip
    assert_one_line_error(proc, "is not an atlas checkpoint config")
