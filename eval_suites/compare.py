"""`atlas-eval compare`: side-by-side markdown tables and PNG plots of several runs.

Runs are grouped by suite; each suite gets one table (rows: metrics, columns: runs, the
best value in bold where the metric has a direction) and one figure of small multiples
(one bar panel per metric, so metrics of different scales stay readable). Latency runs
also get percentile-vs-concurrency line plots (TTFT, TPOT, ITL, E2E at p50/p90/p99) and a
table per load level. Plots use matplotlib's Agg backend (no display needed). What it does
not do: statistics across seeds or re-scoring; it reads results.json files only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ResultsError
from .results import format_value, load_results, write_text_atomic

__all__ = ["compare_runs", "markdown_tables"]

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
)


def run_label(results: dict[str, Any]) -> str:
    server = results.get("server", {})
    host = urlparse(server.get("base_url") or "").netloc or "?"
    return f"{server.get('model')}@{host}"


def labels_for(runs: list[dict[str, Any]], given: list[str]) -> list[str]:
    if given and len(given) != len(runs):
        raise ResultsError(
            f"{len(given)} --label values for {len(runs)} runs; give one per run or none"
        )
    labels = list(given) or [run_label(r) for r in runs]
    seen: dict[tuple[str, str], int] = {}
    for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
        # Two runs of one suite with the same label (same server twice) become "label #2".
        key = (run["suite"], label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            labels[i] = f"{label} #{seen[key]}"
    return labels


def compare_runs(
    run_dirs: list[Path], output: Path | None, labels: list[str]
) -> tuple[str, list[Path]]:
    if not run_dirs:
        raise ResultsError("give at least one results directory")
    runs = [load_results(Path(d)) for d in run_dirs]
    names = labels_for(runs, labels)
    table = markdown_tables(runs, names)
    output = output or Path("eval_compare")
    output.mkdir(parents=True, exist_ok=True)
    files = [output / "compare.md"]
    write_text_atomic(files[0], table)
    files += plot_runs(runs, names, output)
    return table, files


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
    if sum(format_value(v) == format_value(value) for v, _ in present) > 1:
        return None
    return index


def markdown_tables(runs: list[dict[str, Any]], labels: list[str]) -> str:
    parts = []
    for suite, group in by_suite(runs, labels).items():
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
            higher = next((e["higher_is_better"] for e in entries if e), None)
            best = best_index(values, higher)
            cells = [
                "—" if v is None else (f"**{format_value(v)}**" if i == best else format_value(v))
                for i, v in enumerate(values)
            ]
            arrow = {True: "↑", False: "↓", None: ""}[higher]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {arrow} |")
        limited = [label for label, run in group if run["run"].get("limit")]
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
            lines.append(f"| {label} | {level['load']} | " + " | ".join(cells) + " |")
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

    metric_names: list[str] = []
    for _, run in group:
        metric_names += [m for m in run["metrics"] if m not in metric_names]
    cols = min(4, len(metric_names)) or 1
    rows = math.ceil(len(metric_names) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, metric_names, strict=False):
        values = [run["metrics"].get(name, {}).get("value", float("nan")) for _, run in group]
        bars = ax.bar(
            range(len(group)), values, color=[colors[i % len(colors)] for i in range(len(group))]
        )
        ax.bar_label(bars, fmt="%.4g", fontsize=6)
        higher = next(
            (
                run["metrics"][name]["higher_is_better"]
                for _, run in group
                if name in run["metrics"]
            ),
            None,
        )
        ax.set_title(f"{name} {'↑' if higher else '↓' if higher is False else ''}", fontsize=8)
        ax.set_xticks(
            range(len(group)), [label for label, _ in group], fontsize=6, rotation=20, ha="right"
        )
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metric_names) :]:
        ax.axis("off")
    fig.suptitle(f"atlas-eval {suite}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        1, len(LATENCY_SERIES), figsize=(4.2 * len(LATENCY_SERIES), 3.4), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], LATENCY_SERIES, strict=True):
        for i, (label, levels) in enumerate(series):
            x = [lv["concurrency"] for lv in levels]
            for pct, style in (("median", "-"), ("p90", "--"), ("p99", ":")):
                y = [lv["summary"].get(f"{pct}_{key}_ms", float("nan")) for lv in levels]
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
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
