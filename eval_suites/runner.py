"""Run one suite end to end: config, cache, server, client, suite, results directory.

This is `atlas-eval run` without the command-line parsing, so tests and scripts can call
it directly. A run that fails leaves no empty results folder behind: a folder it created
and left empty is removed, and the error says so (with `--checkpoint` the folder keeps the
server's log, and the error points to it). A folder that already holds a complete run
(results.json) is refused unless `overwrite` is set, so a rerun never replaces earlier
results silently; a folder without one (an interrupted run) is used as it is, so rerunning
the same command continues it from the response cache. A run stopped by Ctrl-C raises
`RunInterrupted` (a KeyboardInterrupt) whose `advice` says how to go on for its suite (the
latency suite caches nothing, but keeps its finished levels in OUTPUT/levels.jsonl); a
server that fails or goes away mid-run is an error that says how many answers the cache
kept for the rerun. The server's cache identity is its root URL however it is spelled
(`http://h:8000/v1/` and `http://h:8000` are one server). What it does not do: print (the
CLI does) or interpret numbers (suites do).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import ResponseCache
from .client import OpenAIClient, server_root
from .config import load_suite_config
from .errors import EvalError, ServerRequestError, ServerUnreachableError, SuiteConfigError
from .fit import PromptFitter, resolve_context
from .results import (
    LIMIT_NOTE,
    check_output_folder,
    command_line,
    git_state,
    make_output_folder,
    package_versions,
    write_run,
)
from .server import checkpoint_identity, local_atlas_server
from .suites import SUITES
from .suites.base import RunContext, SuiteResult, data_path, missing_data_file
from .suites.latency import LEVELS_FILE
from .suites.retrieval import PYTHON_DOCS
from .tokens import LocalTokenizer, TokenCounter

__all__ = ["RunOptions", "default_cache_path", "run_suite"]


@dataclass
class RunOptions:
    suite: str
    base_url: str | None = None
    checkpoint: Path | None = None
    model: str | None = None
    api_key: str | None = None
    output: Path | None = None
    limit: int | None = None
    seed: int = 0
    concurrency: int | None = None  # None: DEFAULT_CONCURRENCY (the latency suite refuses it)
    config_file: Path | None = None
    overrides: tuple[str, ...] = ()
    tokenizer: Path | None = None
    cache_path: Path | None = None
    use_cache: bool = True
    overwrite: bool = False  # replace a complete earlier run in `output`
    server_args: tuple[str, ...] = field(default_factory=tuple)


DEFAULT_CONCURRENCY = 4


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what the user should know to continue (`advice`)."""

    def __init__(self, advice: str) -> None:
        super().__init__(advice)
        self.advice = advice


def default_cache_path() -> Path:
    """ATLAS_EVAL_CACHE, else $ATLAS_HOME/eval-cache.sqlite (Atlas's one home folder), else
    $XDG_CACHE_HOME/atlas/..., else ~/.cache/atlas/eval-cache.sqlite."""
    if env := os.environ.get("ATLAS_EVAL_CACHE"):
        return Path(env)
    if home := os.environ.get("ATLAS_HOME"):
        return Path(home) / "eval-cache.sqlite"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "atlas" / "eval-cache.sqlite"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_suite(options: RunOptions) -> Path:
    """Run `options.suite` and return the results directory."""
    if options.suite not in SUITES:
        raise SuiteConfigError(f"unknown suite {options.suite!r}; available: {', '.join(SUITES)}")
    if (options.base_url is None) == (options.checkpoint is None):
        raise SuiteConfigError("give exactly one of --base-url URL or --checkpoint DIR")
    if options.limit is not None and options.limit < 1:
        raise SuiteConfigError("--limit must be >= 1")
    if options.concurrency is not None and options.concurrency < 1:
        raise SuiteConfigError("--concurrency must be >= 1")
    if options.concurrency is not None and options.suite == "latency":
        # Its load levels are its own options; a --concurrency it ignored would look measured.
        raise SuiteConfigError(
            "the latency suite does not take --concurrency: its load levels are set with"
            " --set 'concurrencies=[1,4,16]' (and request_rates for Poisson arrivals)"
        )
    if options.base_url is not None:
        check_base_url(options.base_url)
    suite = SUITES[options.suite]()
    config = load_suite_config(
        options.suite, suite.config_cls, options.config_file, options.overrides
    )
    check_data_files(options.suite, config)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = options.output or Path("eval_runs") / f"{options.suite}-{stamp}"
    check_output(output, options.overwrite)
    if options.base_url is not None:
        suite.check_server(options.base_url, config)
    # Opened before the folder and the server: a bad --cache is refused before anything starts.
    cache = ResponseCache(options.cache_path or default_cache_path()) if options.use_cache else None
    created = not output.exists()
    try:
        make_output_folder(output, SuiteConfigError)
        with server_for(options, output) as (base_url, server_id):
            return asyncio.run(_run(options, suite, config, base_url, server_id, output, cache))
    except BaseException as e:
        note = tidy_failed_output(output, created)
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted(interrupted_advice(suite, cache, output)) from None
        if isinstance(e, EvalError) and e.args:
            notes = [n for n in (kept_answers(e, suite, cache), note) if n]
            if notes:
                e.args = (f"{str(e.args[0]).rstrip()} ({'; '.join(notes)})", *e.args[1:])
        raise
    finally:
        if cache is not None:
            cache.close()


def interrupted_advice(suite, cache: ResponseCache | None, output: Path) -> str:
    """What Ctrl-C leaves behind and how to go on, for this suite and cache setting."""
    if not suite.cached:
        kept = finished_levels(output)
        return f"the {suite.name} suite caches nothing: a rerun measures everything again" + (
            f"; {kept}" if kept else ""
        )
    if cache is None:
        return "rerun without --no-cache to keep answers across interruptions"
    return "rerun the same command to continue from the response cache"


def kept_answers(error: EvalError, suite, cache: ResponseCache | None) -> str | None:
    """For a server that went away or failed mid-run: the answers it gave so far are in
    the response cache, and a rerun asks only for the rest."""
    server_failed = isinstance(error, ServerUnreachableError) or (
        isinstance(error, ServerRequestError)
        and error.status is not None
        and (error.status >= 500 or error.status == 429)
    )
    if not server_failed or not suite.cached or cache is None:
        return None
    answers = cache.stored + cache.hits
    if not answers:
        return None
    return (
        f"the {answers} answer(s) received so far are in the response cache: rerun the same"
        " command to continue"
    )


def check_base_url(base_url: str) -> None:
    """An http(s) URL with a host and, if given, a port in 1..65535 (else the HTTP client
    fails deep inside with an OverflowError)."""
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise SuiteConfigError(
            f"--base-url {base_url!r} is not an http(s) URL; give one like http://127.0.0.1:8000"
        )
    try:
        port = url.port
    except ValueError:  # not a number, or above 65535
        port = -1
    if not url.hostname or (port is not None and not 1 <= port <= 65535):
        raise SuiteConfigError(
            f"--base-url {base_url!r} needs a host and a port from 1 to 65535;"
            " give one like http://127.0.0.1:8000"
        )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a results folder that is a file, or that holds a complete run (results.json is
    written last, so only a finished run has it) unless `overwrite`. A folder without
    results.json is an interrupted run's: rerunning the same command continues it."""
    check_output_folder(output, "results.json", "a complete run", overwrite, SuiteConfigError)


def tidy_failed_output(output: Path, created: bool) -> str | None:
    """After a failed run: remove the results folder if this run created it and it holds
    nothing; return what the user should know about it (None: nothing to say)."""
    if (output / "results.json").exists():
        return None  # a complete earlier run in a folder given again: left as it was
    if created and output.is_dir() and not any(output.iterdir()):
        shutil.rmtree(output, ignore_errors=True)
        return f"no results written; removed the empty folder {output}"
    notes = [finished_levels(output)]
    if (output / "server.log").is_file():
        notes.append(f"no results written; the server's log is {output / 'server.log'}")
    return "; ".join(n for n in notes if n) or None


def finished_levels(output: Path) -> str | None:
    """Where the latency suite's levels that finished before a failure or Ctrl-C are."""
    path = output / LEVELS_FILE
    try:
        done = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return None
    return f"the {done} load level(s) that finished are in {path}" if done else None


@contextlib.contextmanager
def server_for(options: RunOptions, output: Path) -> Iterator[tuple[str, str]]:
    if options.checkpoint is None:
        assert options.base_url is not None
        # One server, one cache identity, however its URL is spelled (…/v1/, a trailing /).
        yield options.base_url, server_root(options.base_url)
        return
    with local_atlas_server(
        options.checkpoint, output, api_key=options.api_key, extra_args=options.server_args
    ) as url:
        yield url, checkpoint_identity(options.checkpoint)


# Suite options that name a data file (suites.base.data_path says where it is looked for).
DATA_FILE_OPTIONS = ("data", "corpus", "calibration", "lengths_file", "pairs", "questions")


def check_data_files(suite: str, config) -> None:
    """A data file option that names no file is a one-line error before anything runs."""
    for name in DATA_FILE_OPTIONS:
        value = getattr(config, name, None)
        if not isinstance(value, str) or not value or (suite, value) == ("retrieval", PYTHON_DOCS):
            continue
        path = data_path(value)
        if path.is_dir():
            raise SuiteConfigError(f"{suite} option {name}: {path} is a folder, not a file")
        if not path.is_file():
            raise SuiteConfigError(f"{suite} option {name}: {missing_data_file(value)}")


async def _run(
    options: RunOptions,
    suite,
    config,
    base_url: str,
    server_id: str,
    output: Path,
    cache: ResponseCache | None,
) -> Path:
    started_at, t0 = utc_now(), time.perf_counter()
    client = OpenAIClient(
        base_url,
        api_key=options.api_key,
        model=options.model,
        cache=cache,
        server_id=server_id,
        concurrency=options.concurrency or DEFAULT_CONCURRENCY,
    )
    try:
        card = await client.resolve_model()
        models = await client.models()
        local = LocalTokenizer(options.tokenizer) if options.tokenizer else None
        fit = PromptFitter(
            resolve_context(card, getattr(config, "max_context_tokens", 0)),
            TokenCounter(client, local),
        )
        ctx = RunContext(
            client, config, options.seed, options.limit, output, card, fit, options.tokenizer
        )
        try:
            result: SuiteResult = await suite.run(ctx)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a user's data file
            raise SuiteConfigError(f"{suite.name}: a data file is not UTF-8 JSONL: {e}") from None
    finally:
        await client.aclose()
    results = assemble(options, suite, config, base_url, server_id, client.model, models, result)
    results["run"].update(
        started_at=started_at, finished_at=utc_now(), duration_s=round(time.perf_counter() - t0, 3)
    )
    results["context_fit"] = fit.report()
    results["warnings"] = [*result.warnings, *counter_warnings(fit)]
    results["cache"] = (
        {"path": str(cache.path), "hits": cache.hits, "misses": cache.misses}
        if cache is not None
        else None
    )
    write_run(output, results, result.samples)
    return output


def counter_warnings(fit: PromptFitter) -> list[str]:
    """A /tokenize that answered something unusable (no tokens for a non-empty prompt, an
    error) was given up for an estimate: safe (it never counts too few for a byte-level
    BPE) but coarse, and a sign the server's /tokenize is not vLLM's."""
    what = {"prompt": "prompts", "messages": "chat prompts"}
    return [
        f"{what.get(kind, kind)} were fitted to the context with an estimate of their tokens"
        f" (safe but coarse): {reason}"
        for kind, reason in sorted(fit.counter.estimated.items())
        if reason.startswith("/tokenize could not")
    ]


def assemble(options, suite, config, base_url, server_id, model, models, result) -> dict[str, Any]:
    return {
        "format": "atlas-eval-results",
        "format_version": 1,
        "suite": suite.name,
        "metrics": result.metrics,
        "details": result.details,
        "config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
        },
        "data": result.data_files,
        "run": {
            "seed": options.seed,
            "limit": options.limit,
            "limit_note": LIMIT_NOTE if options.limit else None,
            # The latency suite sets its own load (concurrencies): no client bound applies.
            "concurrency": None
            if suite.name == "latency"
            else options.concurrency or DEFAULT_CONCURRENCY,
            "command": command_line(),
            "samples": len(result.samples),
        },
        "server": {
            "base_url": base_url,
            "identity": server_id,
            "checkpoint": str(options.checkpoint) if options.checkpoint else None,
            "model": model,
            "models": models,
        },
        "environment": {"packages": package_versions(), "git": git_state()},
    }
