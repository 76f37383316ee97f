"""atlas-eval's command line on user errors: one line, exit 1, and nothing stored is lost.

Every error case here fails before a request is answered (a refused option, an unreachable
port), so no server or model is needed: earlier results must come out of each byte for
byte. The last test backs docs/evaluation.md's claim that a run's numbers do not depend on
the order answers arrive in (a fake server, no model).
"""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from pathlib import Path

import pytest
from servers import JSONHandler, free_port
from typer.testing import CliRunner

from eval_suites.cache import ResponseCache
from eval_suites.cli import app
from eval_suites.compare import compare_runs
from eval_suites.errors import CacheError, ResultsError
from eval_suites.results import write_run
from eval_suites.runner import RunOptions, run_suite

RUNNER = CliRunner()


def invoke(*args: str):
    return RUNNER.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    # An exception other than SystemExit is a traceback the user would have seen.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"


def finished_run(folder: Path, suite: str = "perplexity", bpb: float = 2.5) -> Path:
    results = {
        "suite": suite,
        "metrics": {"bits_per_byte": {"value": bpb, "higher_is_better": False, "description": ""}},
        "details": {},
        "run": {"seed": 0, "limit": None, "duration_s": 1.0, "started_at": "t"},
        "server": {"base_url": "http://127.0.0.1:1", "model": folder.name},
    }
    write_run(folder, results, [{"id": "a", "loglikelihood": -1.0}])
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- D8: an earlier complete run or comparison is never replaced silently ---------------------------
def test_run_refuses_a_folder_with_a_complete_run_unless_overwrite(tmp_path: Path):
    out = finished_run(tmp_path / "ppl")
    before = snapshot(out)
    url = unreachable()
    refused = invoke("run", "perplexity", "--base-url", url, "--no-cache", "-o", out)
    assert_one_line_error(refused, f"{out} already holds a complete run", "--overwrite")
    assert snapshot(out) == before
    # --overwrite gets past the check (to the unreachable server); a run that fails leaves
    # the earlier one as it was, since results.json is only replaced by a finished run.
    forced = invoke("run", "perplexity", "--base-url", url, "--no-cache", "-o", out, "--overwrite")
    assert_one_line_error(forced, "cannot reach", url)
    assert snapshot(out) == before


def test_an_interrupted_run_in_the_folder_is_continued_not_refused(tmp_path: Path):
    """No results.json: an interrupted run ("rerun the same command to continue")."""
    out = tmp_path / "ppl"
    out.mkdir()
    (out / "server.log").write_text("the interrupted run's log\n")
    url = unreachable()
    again = invoke("run", "perplexity", "--base-url", url, "--no-cache", "-o", out)
    assert_one_line_error(again, "cannot reach", url)
    assert (out / "server.log").read_text() == "the interrupted run's log\n"


def test_compare_refuses_a_folder_with_an_earlier_comparison_unless_overwrite(tmp_path: Path):
    a = finished_run(tmp_path / "a", bpb=2.5)
    b = finished_run(tmp_path / "b", bpb=3.0)
    cmp = tmp_path / "cmp"
    assert invoke("compare", a, b, "-o", cmp).exit_code == 0
    before = snapshot(cmp)
    assert "compare.md" in before and "perplexity_metrics.png" in before
    refused = invoke("compare", a, b, "-o", cmp, "--label", "x", "--label", "y")
    assert_one_line_error(refused, f"{cmp} already holds a comparison", "--overwrite")
    assert snapshot(cmp) == before
    replaced = invoke("compare", a, b, "-o", cmp, "--label", "x", "--label", "y", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "| metric | x | y | better |" in (cmp / "compare.md").read_text()


# --- D9: paths that cannot be used are named in one line, not a traceback ----------------------------
def test_an_output_that_is_a_file_is_a_one_line_error(tmp_path: Path):
    taken = tmp_path / "existing_file.json"
    taken.write_text('{"mine": true}\n')
    url = unreachable()
    for out in (taken, taken / "sub"):
        run = invoke(
            "run", "perplexity", "--base-url", url, "--no-cache", "-o", out, "--limit", "2"
        )
        assert_one_line_error(run, f"--output {out}", f"{taken} is a file, not a folder")
    runs = [finished_run(tmp_path / "a"), finished_run(tmp_path / "b")]
    compare = invoke("compare", *runs, "-o", taken)
    assert_one_line_error(compare, f"--output {taken} is a file, not a folder")
    assert taken.read_text() == '{"mine": true}\n'


def test_a_cache_that_cannot_be_opened_is_a_one_line_error_before_anything_starts(
    tmp_path: Path,
):
    folder = tmp_path / "some_folder"
    folder.mkdir()
    out = tmp_path / "x"
    run = invoke("run", "perplexity", "--base-url", unreachable(), "--cache", folder, "-o", out)
    assert_one_line_error(run, f"the response cache {folder} is a folder", "--no-cache")
    assert not out.exists() and list(folder.iterdir()) == []
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("my notes, not a database\n" * 50)
    with pytest.raises(CacheError, match=f"cannot open the response cache {not_sqlite}"):
        ResponseCache(not_sqlite)
    assert not_sqlite.read_text() == "my notes, not a database\n" * 50
    with pytest.raises(CacheError, match=f"{not_sqlite} is a file, not a folder"):
        ResponseCache(not_sqlite / "cache.sqlite")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"metrics": {"nll": 5}}, "metrics.nll is not an object"),
        ({"metrics": {"nll": {"value": "low"}}}, "metrics.nll.value is not a number"),
        ({"metrics": {"nll": {"value": [1.0]}}}, "metrics.nll.value is not a number"),
        (
            {"metrics": {"nll": {"value": 1.0, "higher_is_better": "no"}}},
            "metrics.nll.higher_is_better",
        ),
        ({"metrics": []}, '"metrics" is not an object'),
        ({"suite": 3}, '"suite" is not a string'),
        ({"run": [1]}, '"run" is not an object'),
        ({"server": "local"}, '"server" is not an object'),
        ({"details": {"levels": [{"load": "c1"}]}}, "details.levels[0] is not an object"),
        (
            {"details": {"levels": [{"summary": {"median_ttft_ms": "fast"}}]}},
            "details.levels[0].summary.median_ttft_ms",
        ),
    ],
)
def test_compare_names_the_malformed_field_of_a_results_file(
    tmp_path: Path, change: dict, field: str
):
    good = finished_run(tmp_path / "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    results = {"suite": "perplexity", "metrics": {"nll": {"value": 1.0}}, **change}
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(ResultsError, match="malformed") as error:
        compare_runs([good, broken], tmp_path / "cmp", [])
    assert str(error.value).startswith(f"{broken / 'results.json'} is malformed: {field}")
    assert not (tmp_path / "cmp").exists()


def test_compare_cli_reports_a_malformed_results_file_in_one_line(tmp_path: Path):
    broken = tmp_path / "broken4"
    broken.mkdir()
    (broken / "results.json").write_text('{"suite":"perplexity","metrics":{"nll":5}}\n')
    (tmp_path / "latin1" / "results.json").parent.mkdir()
    (tmp_path / "latin1" / "results.json").write_bytes(b'{"suite": "caf\xe9"}')
    good = finished_run(tmp_path / "ppl")
    result = invoke("compare", good, broken, "-o", tmp_path / "cmp")
    assert_one_line_error(result, f"{broken / 'results.json'} is malformed: metrics.nll")
    result = invoke("compare", good, tmp_path / "latin1", "-o", tmp_path / "cmp")
    assert_one_line_error(result, "is not UTF-8")


# --- D12 and Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-2"])
def test_concurrency_below_one_is_refused(tmp_path: Path, value: str):
    out = tmp_path / "r"
    result = invoke(
        "run", "perplexity", "--base-url", unreachable(), "--concurrency", value, "-o", out
    )
    assert_one_line_error(result, "--concurrency must be >= 1")
    assert not out.exists()


def test_ctrl_c_exits_130_and_says_how_to_continue(tmp_path: Path, monkeypatch):
    import eval_suites.runner

    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_suites.runner, "run_suite", interrupted)
    result = invoke("run", "perplexity", "--base-url", unreachable(), "-o", tmp_path / "r")
    assert result.exit_code == 130, result.output
    assert "rerun the same command to continue" in result.stderr
    assert "Traceback" not in result.output
    # With --no-cache nothing was kept: it must not promise that a rerun continues.
    args = ["--base-url", unreachable(), "-o", tmp_path / "r2", "--no-cache"]
    result = invoke("run", "perplexity", *args)
    assert result.exit_code == 130
    assert "continue" not in result.stderr and "without --no-cache" in result.stderr


# --- docs/evaluation.md "Determinism and resume": answers combine in item order ---------------------
class ShuffledAnswersHandler(JSONHandler):
    """Scores every prompt token by a fixed rule, with values of very different sizes (so a
    sum in another order rounds differently), and answers after a random delay (so answers
    arrive in a different order at every concurrency)."""

    def do_GET(self):
        if self.path == "/tokenizer_info":
            self.reply({"eos_token_id": 0})
        else:
            self.reply({"data": [{"id": "fake", "object": "model", "max_model_len": 64}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self.reply({"tokens": list(body["prompt"].encode())})
            return
        time.sleep(random.random() * 0.01)
        ids = body["prompt"][0]
        logprobs = [None] + [-((t * 7919 + i) % 97 + 1) * 10.0 ** (t % 5 - 4) for i, t in
                             enumerate(ids[1:])] + [-0.5]  # fmt: skip
        choice = {"index": 0, "text": "x", "logprobs": {"token_logprobs": logprobs}}
        self.reply({"choices": [choice]})


def test_perplexity_numbers_do_not_depend_on_the_order_answers_arrive_in(tmp_path: Path):
    docs = tmp_path / "docs.jsonl"
    texts = [" ".join(f"w{i * j % 89}" for j in range(40 + 10 * i)) for i in range(4)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShuffledAnswersHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache.sqlite"

    def run(name: str, concurrency: int, **kwargs) -> dict:
        options = RunOptions(suite="perplexity", base_url=url, output=tmp_path / name,
                             overrides=(f"data='{docs}'", "window=16"),
                             concurrency=concurrency, **kwargs)  # fmt: skip
        out = run_suite(options)
        results = json.loads((out / "results.json").read_text())
        return {"samples": (out / "samples.jsonl").read_text(), "metrics": results["metrics"]}

    try:
        one_by_one = run("c1", 1, use_cache=False)
        assert one_by_one["metrics"]["nll"]["value"] > 0
        assert run("c8", 8, use_cache=False) == one_by_one
        assert run("fill", 8, cache_path=cache) == one_by_one
        assert run("from-cache", 3, cache_path=cache) == one_by_one
    finally:
        server.shutdown()
