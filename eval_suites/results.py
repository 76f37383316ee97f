"""A run's results directory: results.json, samples.jsonl and report.md, written atomically.

results.json holds everything needed to trust and reproduce a number: the metrics (each
with its higher-is-better flag and a description), the suite config snapshot, the data
files' SHA-256, the seed, `--limit` (marked "for testing only"), package versions, the git
commit of this checkout, the server's /v1/models answer, the start/end times and the
run's `warnings` (also in report.md; the CLI prints them on stderr). Counts (a metric
stored as an integer) are shown as integers. Only `run.started_at`, `run.finished_at`,
`run.duration_s` and `cache` vary between two runs with the same seed against the same
server. `load_results` (what `compare` reads) checks
the fields compare uses and names the first malformed one, so a hand-edited or foreign
file is a one-line error. What it does not do: compare runs (see `compare.py`).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from atlas_server.io import atomic_write_text

from .errors import EvalError, ResultsError

__all__ = ["load_results", "package_versions", "git_state", "write_json_atomic", "write_run"]

PACKAGES = (
    "atlas-llm",
    "torch",
    "httpx",
    "sacrebleu",
    "rouge-score",
    "sentence-transformers",
    "transformers",
    "numpy",
    "matplotlib",
)
LIMIT_NOTE = (
    "for testing only: --limit evaluates a prefix of the suite's items; do not report these numbers"
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def check_output_folder(
    output: Path,
    finished_file: str,
    holds: str,
    overwrite: bool,
    error: type[EvalError] = ResultsError,
) -> None:
    """Refuse an --output that is (or is under) a file, or that holds `finished_file` (what
    a finished run or comparison writes last) unless `overwrite`: earlier results are never
    replaced silently."""
    if output.exists() and not output.is_dir():
        raise error(f"--output {output} is a file, not a folder")
    if file := next((p for p in output.parents if p.is_file()), None):
        raise error(f"--output {output}: {file} is a file, not a folder")
    if (output / finished_file).exists() and not overwrite:
        raise error(
            f"{output} already holds {holds} ({finished_file}); pass --overwrite to replace"
            " it, or give another --output"
        )


def make_output_folder(output: Path, error: type[EvalError] = ResultsError) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no permission, a read-only disk
        raise error(f"cannot create the output folder {output}: {e.strerror or e}") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file beside `path`, fsync, rename: Atlas's one atomic writer."""
    atomic_write_text(path, text)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None: Python writes them as bare NaN/Infinity,
    which is not JSON (JavaScript's JSON.parse, jq and most other readers refuse the file).
    A metric with nothing to measure is NaN in a run and null in its files (`load_results`
    reads it back as NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    text = json.dumps(json_safe(value), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(path, text + "\n")


def write_run(output_dir: Path, results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Write samples first and results.json last: its presence marks a complete run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps(json_safe(s), ensure_ascii=False, allow_nan=False) + "\n" for s in samples
    )
    write_text_atomic(output_dir / "samples.jsonl", lines)
    write_text_atomic(output_dir / "report.md", run_markdown(results))
    write_json_atomic(output_dir / "results.json", results)


def run_markdown(results: dict[str, Any]) -> str:
    server = results.get("server", {})
    lines = [
        f"# atlas-eval {results['suite']}: {server.get('model')} at {server.get('base_url')}",
        "",
        f"- seed {results['run']['seed']}, {results['run']['duration_s']:.1f} s,"
        f" started {results['run']['started_at']}",
    ]
    if results["run"].get("limit"):
        lines.append(f"- **limit {results['run']['limit']}: {LIMIT_NOTE}**")
    if fit := results.get("context_fit"):
        lines.append(f"- {context_fit_line(fit)}")
    lines += [f"- **warning: {w}**" for w in results.get("warnings") or []]
    lines += ["", "| metric | value | better |", "|---|---:|:---:|"]
    for name, m in results["metrics"].items():
        arrow = {True: "higher", False: "lower", None: ""}[m.get("higher_is_better")]
        lines.append(f"| {name} | {format_value(m['value'])} | {arrow} |")
    return "\n".join(lines) + "\n"


def context_fit_line(fit: dict[str, Any]) -> str:
    """One line on how prompts met the context: its length, trimmed and skipped items."""
    window = fit.get("max_model_len")
    head = (
        f"context {window} tokens ({fit.get('source')})"
        if window
        else f"context {fit.get('source')}"
    )
    total = fit.get("items_evaluated", 0) + fit.get("items_skipped", 0)
    notes = "".join(f"; {n}" for n in fit.get("notes") or [])
    if not total:  # a suite with nothing to trim per item (latency at fixed lengths)
        return head + notes
    parts = [f"{fit.get('items_evaluated', 0)} of {total} items evaluated"]
    if fit.get("items_trimmed"):
        parts.append(f"{fit['items_trimmed']} of them trimmed to fit")
    if fit.get("items_skipped"):
        parts.append(
            f"**{fit['items_skipped']} skipped: too long for the context**"
            " (ids and reasons in results.json `context_fit.skipped`)"
        )
    return f"{head}: " + ", ".join(parts) + notes


def format_value(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):  # a count: failed requests
        return f"{value:,}"
    if value != value:  # NaN: a metric with nothing to measure (e.g. no numbers in answers)
        return "n/a"
    if abs(value) >= 1e7:
        return f"{value:.4e}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4f}"


def load_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise ResultsError(f"{run_dir} has no results.json; is it an atlas-eval run directory?")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise ResultsError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(results, dict) or "metrics" not in results or "suite" not in results:
        raise ResultsError(f"{path} is not an atlas-eval results file")
    for entry in results["metrics"].values() if isinstance(results["metrics"], dict) else ():
        if isinstance(entry, dict) and "value" in entry and entry["value"] is None:
            entry["value"] = math.nan  # written as null (json_safe): nothing to measure
    if problem := malformed_field(results):
        raise ResultsError(f"{path} is malformed: {problem}")
    return results


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def malformed_field(results: dict[str, Any]) -> str | None:
    """The first field `compare` reads that does not have the shape `write_run` gives it
    (a hand-edited or foreign file), said so the user can find it; None when all do."""
    if not isinstance(results["suite"], str):
        return '"suite" is not a string'
    if not isinstance(results["metrics"], dict):
        return '"metrics" is not an object'
    for name, entry in results["metrics"].items():
        if not isinstance(entry, dict):
            return f'metrics.{name} is not an object with a "value" (got {entry!r:.40})'
        if not is_number(entry.get("value")):
            return f"metrics.{name}.value is not a number (got {entry.get('value')!r:.40})"
        if entry.get("higher_is_better") not in (True, False, None):
            return f"metrics.{name}.higher_is_better is not true, false or null"
    for key in ("run", "server", "details", "config", "data", "context_fit"):
        if not isinstance(results.get(key, {}), dict):
            return f'"{key}" is not an object'
    if not isinstance(results.get("context_fit", {}).get("skipped", []), list):
        return "context_fit.skipped is not a list"
    for key in ("base_url", "model", "checkpoint"):  # what compare's column labels read
        value = results.get("server", {}).get(key)
        if value is not None and not isinstance(value, str):
            return f"server.{key} is not a string or null (got {value!r:.40})"
    levels = results.get("details", {}).get("levels", [])
    if not isinstance(levels, list):
        return "details.levels is not a list"
    for i, level in enumerate(levels):
        if not isinstance(level, dict) or not isinstance(level.get("summary"), dict):
            return f'details.levels[{i}] is not an object with a "summary" object'
        concurrency = level.get("concurrency")
        if concurrency is not None and not is_number(concurrency):
            return f"details.levels[{i}].concurrency is not a number"
        for field, value in level["summary"].items():
            if field.endswith("_ms") and value is not None and not is_number(value):
                return f"details.levels[{i}].summary.{field} is not a number or null"
    return None


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
