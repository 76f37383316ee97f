"""atlas-eval guards: compare's "best" only between runs of the same items, results
files whose server fields compare reads are checked, and bad config (an unknown metric
plugin, a --base-url port) is one line before any request.

No model or server is needed: every case fails before a request is answered, or reads
hand-written results files.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from servers import free_port
from test_eval_cli_errors import assert_one_line_error, invoke

from eval_suites.compare import compare_runs
from eval_suites.errors import ResultsError
from eval_suites.results import write_run


# --- checks before any request -------------------------------------------------------------------
@pytest.mark.parametrize("suite", ["generation", "hallucination", "instruct"])
def test_an_unknown_metric_plugin_is_refused_before_any_request(tmp_path: Path, suite: str):
    # Nothing listens at the URL: reaching it first would say "cannot reach".
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(
        "run", suite, "--base-url", url, "--set", 'metrics=["nope"]', "--no-cache",
        "-o", tmp_path / "r",
    )  # fmt: skip
    assert_one_line_error(result, "metric 'nope' is not registered")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:port", "http://:80"]
)
def test_a_base_url_without_a_usable_host_and_port_is_one_line(tmp_path: Path, url: str):
    result = invoke("run", "perplexity", "--base-url", url, "--no-cache", "-o", tmp_path / "r")
    assert_one_line_error(result, "needs a host and a port from 1 to 65535")


# --- compare's "best" -----------------------------------------------------------------------------
def results_dir(tmp_path: Path, name: str, value: float, **changes) -> Path:
    results = {
        "suite": "generation",
        "metrics": {"all/chrf": {"value": value, "higher_is_better": True, "description": ""}},
        "details": {},
        "config": {"num_shots": 1, "tasks": ["heading"], "max_context_tokens": 0},
        "data": {"generation/items.jsonl": "ab" * 32},
        "context_fit": {"items_evaluated": 20, "items_trimmed": 0, "skipped": []},
        "run": {"seed": 0, "limit": None, "duration_s": 1.0, "started_at": "t"},
        "server": {"base_url": f"http://127.0.0.1:1/{name}", "model": name},
    }
    for key, value in changes.items():
        results[key] = {**results[key], **value} if isinstance(value, dict) else value
    write_run(tmp_path / name, results, [])
    return tmp_path / name


def chrf_row(table: str) -> str:
    return table.split("| all/chrf |")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"run": {"seed": 1}}, "--seed (0 vs 1)"),
        ({"run": {"limit": 5}}, "--limit (— vs 5)"),
        ({"config": {"num_shots": 3}}, "num_shots (1 vs 3)"),
        (
            {"data": {"generation/items.jsonl": "cd" * 32}},
            "data files (SHA-256) (abababababab… vs cdcdcdcdcdcd…)",
        ),
        ({"config": {"tasks": []}}, "tasks (heading vs —)"),
        ({"context_fit": {"items_evaluated": 18}}, "items evaluated (20 vs 18)"),
        ({"context_fit": {"skipped": [{"id": "x", "reason": "long"}]}}, "skipped items"),
    ],
)
def test_compare_marks_no_best_between_runs_of_different_items(
    tmp_path: Path, changes: dict, named: str
):
    same = [results_dir(tmp_path, "a", 50.0), results_dir(tmp_path, "b", 40.0)]
    table, _ = compare_runs(same, tmp_path / "same", ["a", "b"])
    assert "**50.0000**" in chrf_row(table) and "No best value" not in table
    # Neither the context option (a server without max_model_len needs it) nor the list of
    # metrics decides the items.
    other = results_dir(tmp_path, "c", 40.0, config={"max_context_tokens": 512, "metrics": []})
    table, _ = compare_runs([same[0], other], tmp_path / "ctx", ["a", "c"])
    assert "**50.0000**" in chrf_row(table)
    differs = results_dir(tmp_path, "d", 40.0, **changes)
    table, _ = compare_runs([same[0], differs], tmp_path / "diff", ["a", "d"])
    assert "**" not in chrf_row(table)
    assert "*No best value marked: these runs did not evaluate the same items" in table
    assert named in table


@pytest.mark.parametrize(("suite", "seed_counts"), [("perplexity", False), ("generation", True)])
def test_compare_ignores_the_seed_of_a_suite_it_does_not_change(
    tmp_path: Path, suite: str, seed_counts: bool
):
    """Perplexity scores every item the same way whatever the seed: two runs of different
    seeds measured the same thing, and one of them is the best."""
    runs = [
        results_dir(tmp_path, "a", 50.0, suite=suite),
        results_dir(tmp_path, "b", 40.0, suite=suite, run={"seed": 7}),
    ]
    table, _ = compare_runs(runs, tmp_path / "cmp", ["a", "b"])
    assert ("**50.0000**" in chrf_row(table)) is not seed_counts
    assert ("--seed (0 vs 7)" in table) is seed_counts


def test_compare_counts_one_data_file_spelled_two_ways_as_the_same_items(tmp_path: Path):
    sha = "ab" * 32
    runs = []
    for name, value, path in (
        ("a", 50.0, "generation/items.jsonl"),
        ("b", 40.0, "/abs/items.jsonl"),
    ):
        run = results_dir(tmp_path, name, value, config={"data": path})
        results = json.loads((run / "results.json").read_text())
        results["data"] = {path: sha}
        (run / "results.json").write_text(json.dumps(results))
        runs.append(run)
    table, _ = compare_runs(runs, tmp_path / "cmp", ["a", "b"])
    assert "**50.0000**" in chrf_row(table) and "No best value" not in table


def test_compare_refuses_a_results_file_whose_server_fields_are_not_strings(tmp_path: Path):
    good = results_dir(tmp_path, "a", 1.0)
    for field, value in (("base_url", 5), ("model", ["m"]), ("checkpoint", 1)):
        broken = results_dir(tmp_path, f"bad-{field}", 1.0, server={field: value})
        with pytest.raises(ResultsError, match=f"malformed: server.{field} is not a string"):
            compare_runs([good, broken], tmp_path / "cmp", [])
    broken = results_dir(tmp_path, "bad-fit", 1.0, context_fit={"skipped": 3})
    with pytest.raises(ResultsError, match="context_fit.skipped is not a list"):
        compare_runs([good, broken], tmp_path / "cmp", [])


@pytest.mark.parametrize("error", [httpx.WriteError("broken pipe"), OSError("no route")])
def test_any_transport_failure_is_an_unreachable_server(error: Exception):
    from eval_suites.client import OpenAIClient
    from eval_suites.errors import ServerUnreachableError

    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    async def ask() -> None:
        client = OpenAIClient("http://127.0.0.1:9")
        await client.aclose()
        client._http = httpx.AsyncClient(
            base_url=client.base_url, transport=httpx.MockTransport(fail)
        )
        async with client:
            await client.request("GET", "/v1/models")

    with pytest.raises(ServerUnreachableError, match="cannot reach an OpenAI-compatible server"):
        asyncio.run(ask())


def test_a_metric_with_nothing_to_measure_is_null_in_the_files_and_nan_when_read(tmp_path):
    """The plugin QA pass: results.json held a bare `NaN` ("value": NaN), which is not JSON:
    JavaScript's JSON.parse and jq refuse the whole file."""
    import json
    import math

    from eval_suites.results import load_results, write_run

    run = results_dir(tmp_path, "run", math.nan, details={"inf": math.inf})
    results = load_results(run)
    write_run(run, results, [{"id": "a", "score": math.nan}])

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    text = (run / "results.json").read_text()
    assert json.loads(text, parse_constant=strict)["metrics"]["all/chrf"]["value"] is None
    sample = (run / "samples.jsonl").read_text()
    assert json.loads(sample, parse_constant=strict)["score"] is None
    assert math.isnan(load_results(run)["metrics"]["all/chrf"]["value"])
    assert "| all/chrf | n/a |" in (run / "report.md").read_text()


def test_a_metric_plugin_that_fails_or_returns_no_metricresult_is_named(monkeypatch):
    """The plugin QA pass: a metric returning a dict failed with "AttributeError: 'dict'
    object has no attribute 'scores'"."""
    import types

    import atlas_server.plugins as plugins
    from atlas_server.hookspecs import hookimpl
    from atlas_server.plugins import PluginHost
    from eval_suites.errors import MetricError
    from eval_suites.metrics import compute_metric

    class Dicty:
        def compute(self, predictions, references):
            return {"dicty": 1.0}

    class Broken:
        def compute(self, predictions, references):
            raise ValueError("no references")

    module = types.ModuleType("qa_metrics")

    @hookimpl
    def atlas_register_metrics(register):
        register("dicty", Dicty)
        register("broken", Broken)

    module.atlas_register_metrics = atlas_register_metrics
    host = PluginHost(discover=False)
    host.register(module, "qa-metrics")
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    with pytest.raises(MetricError) as e:
        compute_metric("dicty", ["a"], [["a"]])
    assert str(e.value) == (
        "metric 'dicty' (plugin 'qa-metrics') failed: TypeError: returned a dict, not a MetricResult"
    )
    with pytest.raises(MetricError, match=r"'broken' \(plugin 'qa-metrics'\) failed: ValueError"):
        compute_metric("broken", ["a"], [["a"]])
