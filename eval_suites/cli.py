"""`atlas-eval`: list suites, run one against a server, compare runs.

Errors a user can fix (unreachable server, wrong API key, a server without echo/logprobs,
a bad option, an output folder that already holds results) are printed as one line
`error: ...` with exit status 1, never a traceback. Ctrl-C during a run exits 130 (128 +
SIGINT, as `atlas-train` does), after saying how to continue (from the response cache, or,
for the latency suite, which caches nothing, where its finished levels are). A finished
run's warnings (results.json `warnings`) follow its report as `warning: ...` on stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from atlas_server.commands._common import run_app

from .errors import EvalError, MetricError

app = typer.Typer(
    name="atlas-eval",
    help="Evaluate Atlas or any OpenAI-compatible server: perplexity, generation, hallucination, latency, instruct, retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command("list")
def list_suites() -> None:
    """Show the suites and the metrics each reports.

    Example: atlas-eval list
    """
    from .config import CONFIG_DIR
    from .suites import SUITES

    for name, suite in SUITES.items():
        typer.echo(f"{name:<14} {suite.description}")
        typer.echo(f"{'':<14} metrics: {', '.join(suite.metrics)}")
        if suite.metrics_note:
            typer.echo(f"{'':<14}          ({suite.metrics_note})")
        typer.echo(f"{'':<14} config:  {CONFIG_DIR / (name + '.toml')}")


@app.command("run")
def run(
    suite: str = typer.Argument(..., help="suite name (see `atlas-eval list`)"),
    base_url: str = typer.Option(
        None, "--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000"
    ),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="start `atlas serve` on this checkpoint for the run"
    ),
    model: str = typer.Option(
        None, "--model", help="model name to request (default: the first in /v1/models)"
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="ATLAS_EVAL_API_KEY", help="sent as Authorization: Bearer KEY"
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="results directory (default eval_runs/SUITE-TIME)"
    ),
    limit: int = typer.Option(
        None, "--limit", help="evaluate only the first N items (for testing only)"
    ),
    seed: int = typer.Option(0, "--seed", help="seed for item selection and sampling"),
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        help="requests in flight at once (default 4; not for latency: --set 'concurrencies=[...]')",
    ),
    config: Path = typer.Option(None, "--config", help="a TOML file with suite options"),
    set_: list[str] = typer.Option(
        [], "--set", help="suite option override key=value (repeatable)"
    ),
    tokenizer: Path = typer.Option(
        None,
        "--tokenizer",
        help="tokenizer file (atlas_tokenizer.json or HF tokenizer.json) when the server has no /tokenize",
    ),
    cache: Path = typer.Option(
        None,
        "--cache",
        help="response cache file (default $ATLAS_HOME/eval-cache.sqlite, ~/.cache/atlas/...)",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="send every request again"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a complete earlier run in the --output folder"
    ),
) -> None:
    """Run SUITE against a server and write results.json, samples.jsonl and report.md.

    Examples:

      atlas-eval run perplexity --checkpoint quickstart/

      atlas-eval run generation --base-url http://127.0.0.1:8000 --model my-model --limit 20

      atlas-eval run latency --base-url http://127.0.0.1:8000 --set 'concurrencies=[1,4,16]'

      atlas-eval run hallucination --base-url http://127.0.0.1:8000 --set context=rag
    """
    from .runner import RunOptions, run_suite

    options = RunOptions(
        suite=suite,
        base_url=base_url,
        checkpoint=checkpoint,
        model=model,
        api_key=api_key,
        output=output,
        limit=limit,
        seed=seed,
        concurrency=concurrency,
        config_file=config,
        overrides=tuple(set_),
        tokenizer=tokenizer,
        cache_path=cache,
        use_cache=not no_cache,
        overwrite=overwrite,
    )
    try:
        out = run_suite(options)
    except MetricError as e:  # after every request: say where the answers are
        kept = (
            "--no-cache kept no answers" if no_cache
            else "the answers are cached: a rerun sends no request again"
        )  # fmt: skip
        fail(f"{e}; {kept}")
    except EvalError as e:
        fail(str(e))
    except KeyboardInterrupt as e:
        # The runner says what the suite kept (the latency suite caches nothing); with
        # --no-cache nothing was kept: a rerun starts over, and should be told so.
        rerun = getattr(e, "advice", None) or (
            "rerun without --no-cache to keep answers across interruptions"
            if no_cache
            else "rerun the same command to continue from the response cache"
        )
        typer.echo(f"error: interrupted; {rerun}", err=True)
        raise typer.Exit(130) from None
    report = (out / "report.md").read_text(encoding="utf-8")
    typer.echo(report)
    typer.echo(f"results: {out / 'results.json'}")
    for warning in json.loads((out / "results.json").read_text(encoding="utf-8")).get(
        "warnings", []
    ):
        typer.echo(f"warning: {warning}", err=True)


@app.command("compare")
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="results directories of `atlas-eval run`"),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="where to write compare.md and PNG plots (default eval_compare)",
    ),
    labels: list[str] = typer.Option(
        [], "--label", help="a column label per run (default: model@server)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an earlier comparison in the --output folder"
    ),
) -> None:
    """Print a side-by-side markdown table of runs and write plots (PNG).

    Example: atlas-eval compare runs/atlas-ppl runs/hf-ppl runs/atlas-lat runs/hf-lat -o docs/img
    """
    from .compare import compare_runs

    try:
        table, files = compare_runs(run_dirs, output, labels, overwrite=overwrite)
    except EvalError as e:
        fail(str(e))
    typer.echo(table)
    for path in files:
        typer.echo(f"wrote {path}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_app(app)


if __name__ == "__main__":
    main()
