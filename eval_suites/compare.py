"""`atlas-eval compare`: side-by-side markdown tables and PNG plots of several runs.

Runs are grouped by suite; each suite gets one table (rows: metrics, columns: runs, the
best value in bold where the metric has a direction and the runs evaluated the same items:
the same seed, --limit, suite config, data files and items kept by the context; otherwise a
note under the table names what differs; token perplexity gets no best either between runs
whose tokenizers cut the same text into different numbers of tokens, and a note says so)
and one figure of small multiples
(one bar panel per metric, so metrics of different scales stay readable; a panel whose
values span more than `LOG_SPAN` uses a log scale, so a small bar never vanishes beside a
large one, and every bar carries its value). Latency runs also get percentile-vs-
concurrency line plots (TTFT, TPOT, ITL, E2E at p50/p90/p99) and a table per load level.

Column labels, unless given with --label: `model@host` (the model alone for `--checkpoint`
runs, whose port is random); runs of one suite whose labels collide are told apart by their
results folder's name (without the `SUITE-` prefix), then by start time, then by number.
Plots use matplotlib's Agg backend (no display needed). An output folder that already
holds a comparison (compare.md) is refused unless `overwrite` is set, as `atlas-eval run`
refuses a folder with a complete run. What it does not do: statistics across seeds or
re-scoring; it reads results.json files only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ResultsError
from .results import (
    check_output_folder,
    format_value,
    load_results,
    make_output_folder,
    write_text_atomic,
)

__all__ = ["compare_runs", "labels_for", "markdown_tables"]

LOG_SPAN = 20.0  # max / min of a panel's positive values beyond which its y axis is log

LATENCY_SERIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
LATENCY_TABLE_FIELDS = (
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_e2el_ms",
    "request_goodput",
    "failed",
    "short",
    "not_sent",
)


def run_label(results: dict[str, Any]) -> str:
    """`model@host:port`, or the model alone for a `--checkpoint` run (a random port)."""
    server = results.get("server", {})
    if server.get("checkpoint"):
        return str(server.get("model"))
    host = urlparse(server.get("base_url") or "").netloc or "?"
    return f"{server.get('model')}@{host}"


def folder_tag(run_dir: Path, suite: str) -> str:
    """A results folder's name without the `SUITE-` of `eval_runs/SUITE-UTCSTAMP`."""
    name = run_dir.resolve().name
    rest = name.removeprefix(f"{suite}-")
    return rest or name


def labels_for(
    runs: list[dict[str, Any]], given: list[str], run_dirs: list[Path] | None = None
) -> list[str]:
    """One distinct label per run within its suite (module docstring)."""
    if given and len(given) != len(runs):
        raise ResultsError(
            f"{len(given)} --label values for {len(runs)} runs; give one per run or none"
        )
    labels = list(given) or [run_label(r) for r in runs]
    if not given:
        dirs = run_dirs or [Path(f"run{i + 1}") for i in range(len(runs))]
        tags = (
            lambda i: folder_tag(dirs[i], runs[i]["suite"]),
            lambda i: str(runs[i].get("run", {}).get("started_at") or ""),
        )
        for tag in tags:
            for i in colliding(runs, labels):
                if extra := tag(i):
                    labels[i] = f"{labels[i]} · {extra}"
    seen: dict[tuple[str, str], int] = {}
    for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
        # Still the same label in one suite (or given twice): "label #2".
        key = (run["suite"], label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            labels[i] = f"{label} #{seen[key]}"
    return labels


def colliding(runs: list[dict[str, Any]], labels: list[str]) -> list[int]:
    """Indices of runs whose label another run of the same suite also has."""
    counts: dict[tuple[str, str], int] = {}
    for run, label in zip(runs, labels, strict=True):
        counts[(run["suite"], label)] = counts.get((run["suite"], label), 0) + 1
    return [
        i
        for i, (run, label) in enumerate(zip(runs, labels, strict=True))
        if counts[(run["suite"], label)] > 1
    ]


def compare_runs(
    run_dirs: list[Path], output: Path | None, labels: list[str], overwrite: bool = False
) -> tuple[str, list[Path]]:
    if not run_dirs:
        raise ResultsError("give at least one results directory")
    runs = [load_results(Path(d)) for d in run_dirs]
    names = labels_for(runs, labels, [Path(d) for d in run_dirs])
    table = markdown_tables(runs, names)
    output = output or Path("eval_compare")
    make_output(output, overwrite)
    files = [output / "compare.md"]
    write_text_atomic(files[0], table)
    files += plot_runs(runs, names, output)
    return table, files


def make_output(output: Path, overwrite: bool) -> None:
    """The folder for compare.md and the plots; one holding an earlier comparison is refused
    unless `overwrite` (its compare.md and plots would be replaced)."""
    check_output_folder(output, "compare.md", "a comparison", overwrite)
    make_output_folder(output)


def by_suite(
    runs: list[dict[str, Any]], labels: list[str]
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for label, run in zip(labels, runs, strict=True):
        groups.setdefault(run["suite"], []).append((label, run))
    return groups


def best_index(values: list[float | None], higher: bool | None) -> int | None:
    present = [(v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if higher is None or len(present) < 2:
        return None
    value, index = max(present) if higher else min(present)
    # A tie has no winner, and neither has a difference the table cannot show (1e-9 apart
    # looks like a tie and is one for any reader).
    # (As floats: a count of 0 and an older file's 0.0 are one value.)
    if sum(format_value(float(v)) == format_value(float(value)) for v, _ in present) > 1:
        return None
    return index


# Config keys that change no item: the context is compared through what it did to the
# items (context_fit), so a server needing max_context_tokens set still compares; `metrics`
# only adds or removes rows (a metric both runs computed scored the same items the same way).
NOT_ITEM_KEYS = {"max_context_tokens", "metrics"}


def item_settings(run: dict[str, Any]) -> dict[str, Any]:
    """What decides which items a run evaluated, by the name the note shows: the seed,
    --limit, the suite config, the data files' SHA-256 and the items the context kept."""
    from .suites import SUITES  # the suites import the client; compare alone does not

    settings = {"--limit": run.get("run", {}).get("limit")}
    suite = SUITES.get(run.get("suite"))
    if suite is None or suite.seeded:  # an unknown suite: the seed may count
        settings = {"--seed": run.get("run", {}).get("seed"), **settings}
    data = run.get("data") or {}  # file as the config names it -> its SHA-256

    def content(value: Any) -> Any:
        # A data file counts by its content: the same file spelled two ways is one file.
        if isinstance(value, list):
            return [content(v) for v in value]
        return f"SHA-256 {data[value][:12]}" if isinstance(value, str) and value in data else value

    for key, value in (run.get("config") or {}).items():
        if key not in NOT_ITEM_KEYS:
            settings[key] = content(value)
    settings["data files (SHA-256)"] = sorted(data.values())
    fit = run.get("context_fit") or {}
    settings["items evaluated"] = fit.get("items_evaluated")
    settings["items trimmed"] = fit.get("items_trimmed")
    settings["skipped items"] = [
        s.get("id") if isinstance(s, dict) else s for s in fit.get("skipped") or []
    ]
    return settings


def item_differences(runs: list[dict[str, Any]]) -> list[str]:
    """The item settings (`item_settings`) that differ between runs, each with its values
    in column order."""
    settings = [item_settings(run) for run in runs]
    differ = []
    for key in dict.fromkeys(k for s in settings for k in s):
        values = [s.get(key) for s in settings]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            differ.append(f"{key} ({' vs '.join(short_value(v) for v in values)})")
    return differ


# Metrics per token: runs whose tokenizers cut the same text into different numbers of
# tokens (details.counts.tokens) measured them on different scales.
PER_TOKEN_METRICS = ("token_perplexity",)


def token_counts(runs: list[dict[str, Any]]) -> list[Any] | None:
    """Each run's token count of its text, when they differ (different tokenizers)."""
    counts = [(run.get("details") or {}).get("counts", {}).get("tokens") for run in runs]
    if all(c is None for c in counts) or len({json.dumps(c) for c in counts}) == 1:
        return None
    return counts


def short_value(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "—"
    if isinstance(value, list):  # data files' SHA-256, skipped item ids
        return f"{len(value)} ids" if len(value) > 3 else ", ".join(map(short_value, value))
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 20 else text[:12] + "…"


def markdown_tables(runs: list[dict[str, Any]], labels: list[str]) -> str:
    parts = []
    for suite, group in by_suite(runs, labels).items():
        # Runs that evaluated different items measured different things: no "best" then.
        differ = item_differences([run for _, run in group])
        # The same items, cut into other numbers of tokens: per-token metrics get no best.
        tokens = None if differ else token_counts([run for _, run in group])
        names = [label for label, _ in group]
        metric_names: list[str] = []
        for _, run in group:
            metric_names += [m for m in run["metrics"] if m not in metric_names]
        lines = [
            f"## {suite}",
            "",
            "| metric | " + " | ".join(names) + " | better |",
            "|---|" + "---:|" * len(names) + ":---:|",
        ]
        for name in metric_names:
            entries = [run["metrics"].get(name) for _, run in group]
            values = [e["value"] if e else None for e in entries]
            higher = next((e.get("higher_is_better") for e in entries if e), None)
            per_token = tokens is not None and name in PER_TOKEN_METRICS
            best = None if differ or per_token else best_index(values, higher)
            cells = [
                "—" if v is None else (f"**{format_value(v)}**" if i == best else format_value(v))
                for i, v in enumerate(values)
            ]
            arrow = {True: "↑", False: "↓", None: ""}[higher]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {arrow} |")
        if differ:
            lines += [
                "",
                "*No best value marked: these runs did not evaluate the same items; differs: "
                + "; ".join(differ)
                + ".*",
            ]
        shown = [m for m in PER_TOKEN_METRICS if m in metric_names]
        if tokens is not None and shown:
            counts = " vs ".join(f"{c:,}" if isinstance(c, int) else short_value(c) for c in tokens)
            lines += [
                "",
                f"*No best {', '.join(shown)} marked: the runs' tokenizers cut the same text"
                f" into different numbers of tokens ({counts}), so a per-token figure is on"
                " another scale in each run; bits_per_byte, byte_perplexity, word_perplexity"
                " and nll compare across tokenizers.*",
            ]
        limited = [label for label, run in group if run.get("run", {}).get("limit")]
        if limited:
            lines += ["", f"*{', '.join(limited)}: run with --limit (for testing only).*"]
        if suite == "latency":
            lines += ["", *latency_table(group)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def latency_table(group: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| run | load | " + " | ".join(LATENCY_TABLE_FIELDS) + " |",
        "|---|---|" + "---:|" * len(LATENCY_TABLE_FIELDS),
    ]
    for label, run in group:
        for level in run.get("details", {}).get("levels", []):
            summary = level["summary"]
            cells = [
                format_value(summary[f]) if isinstance(summary.get(f), int | float) else "—"
                for f in LATENCY_TABLE_FIELDS
            ]
            lines.append(f"| {label} | {level.get('load', '?')} | " + " | ".join(cells) + " |")
    return lines


# --- plots ----------------------------------------------------------------------------------------
def plot_runs(runs: list[dict[str, Any]], labels: list[str], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    files = []
    for suite, group in by_suite(runs, labels).items():
        files.append(plot_metric_bars(suite, group, output / f"{suite}_metrics.png"))
        if suite == "latency":
            path = plot_latency(group, output / "latency_percentiles.png")
            if path is not None:
                files.append(path)
    return files


def plot_metric_bars(suite: str, group: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = metric_bars_figure(suite, group)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_bars_figure(suite: str, group: list[tuple[str, dict[str, Any]]]):
    """One bar panel per metric, one bar per run, under the suite's title."""
    import matplotlib.pyplot as plt

    metric_names: list[str] = []
    for _, run in group:
        metric_names += [m for m in run["metrics"] if m not in metric_names]
    cols = min(4, len(metric_names)) or 1
    rows = math.ceil(len(metric_names) / cols) or 1
    # Constrained layout keeps the suptitle clear of the first row (tight_layout does not).
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, metric_names, strict=False):
        values = [run["metrics"].get(name, {}).get("value", float("nan")) for _, run in group]
        bars = ax.bar(
            range(len(group)), values, color=[colors[i % len(colors)] for i in range(len(group))]
        )
        ax.bar_label(bars, labels=[bar_text(v) for v in values], fontsize=6)
        log = scale_panel(ax, values)
        higher = next(
            (
                run["metrics"][name].get("higher_is_better")
                for _, run in group
                if name in run["metrics"]
            ),
            None,
        )
        arrow = "↑" if higher else "↓" if higher is False else ""
        ax.set_title(f"{name} {arrow}{' (log)' if log else ''}", fontsize=8)
        ax.set_xticks(
            range(len(group)), [label for label, _ in group], fontsize=6, rotation=20, ha="right"
        )
        ax.tick_params(axis="y", labelsize=7)
        ax.yaxis.get_offset_text().set_fontsize(6)  # "1e-5" above the axis, clear of the title
    for ax in list(axes.flat)[len(metric_names) :]:
        ax.axis("off")
    fig.suptitle(f"atlas-eval {suite}", fontsize=10)
    return fig


def use_log_scale(values: list[float]) -> bool:
    """Positive values spanning more than LOG_SPAN: a linear axis would flatten the small ones."""
    finite = [v for v in values if v == v and not math.isinf(v)]
    if len(finite) < 2 or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > LOG_SPAN


def scale_panel(ax, values: list[float]) -> bool:
    """Log scale where `use_log_scale`; headroom for the value labels; returns log or not."""
    finite = [v for v in values if v == v and not math.isinf(v)]
    if use_log_scale(values):
        ax.set_yscale("log")
        ax.set_ylim(min(finite) / 2, max(finite) * 3)
        return True
    top = max(finite, default=0.0)
    bottom = min(0.0, min(finite, default=0.0))
    # All zero (e.g. failed requests): 0..1 rather than matplotlib's -0.05..0.05.
    ax.set_ylim(bottom * 1.15, top * 1.15 if top > 0 else 1.0)
    return False


def bar_text(value: float) -> str:
    return "n/a" if value != value else f"{value:.4g}"


def plot_latency(group: list[tuple[str, dict[str, Any]]], path: Path) -> Path | None:
    """Percentiles vs concurrency: one panel per latency, one line style per percentile."""
    import matplotlib.pyplot as plt

    series = []
    for label, run in group:
        levels = [lv for lv in run.get("details", {}).get("levels", []) if lv.get("concurrency")]
        if levels:
            series.append((label, sorted(levels, key=lambda lv: lv["concurrency"])))
    if not series:
        return None
    fig, axes = plt.subplots(
        1,
        len(LATENCY_SERIES),
        figsize=(4.2 * len(LATENCY_SERIES), 3.4),
        squeeze=False,
        layout="constrained",
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], LATENCY_SERIES, strict=True):
        shown: list[float] = []
        for i, (label, levels) in enumerate(series):
            x = [lv["concurrency"] for lv in levels]
            for pct, style in (("median", "-"), ("p90", "--"), ("p99", ":")):
                # null where a level measured nothing: a gap in the line, not a 0 ms point
                y = [lv["summary"].get(f"{pct}_{key}_ms") for lv in levels]
                y = [float("nan") if v is None else v for v in y]
                shown += y
                ax.plot(
                    x,
                    y,
                    style,
                    marker="o",
                    ms=3,
                    color=colors[i % len(colors)],
                    label=f"{label} {'p50' if pct == 'median' else pct}",
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({lv["concurrency"] for _, levels in series for lv in levels})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        log = use_log_scale(shown)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms (log)" if log else "ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
