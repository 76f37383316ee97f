"""Metric plugins, looked up by name in the Atlas plugin registry.

Suites never import a metric implementation: they name metrics ("bleu", "chrf", "rouge",
"token_f1", ...) in their TOML config, and this module asks the plugin host
(`atlas_server.plugins.get_plugin_host().metrics`, name -> factory) for them. So a third
party's metric, registered through the `atlas` entry-point group or directly on the host,
is usable in a suite without code changes. A metric object has `name` and
`compute(predictions, references) -> MetricResult(scores, higher_is_better, signature)`.
What this module does not do: define metrics (see plugins/ and atlas_server/hookspecs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import SuiteConfigError

__all__ = ["available_metrics", "check_metrics", "compute_metric", "load_metric"]


def _registry() -> Mapping[str, Any]:
    from atlas_server.plugins import get_plugin_host

    return get_plugin_host().metrics


def available_metrics() -> list[str]:
    return sorted(_registry())


def check_metrics(names: tuple[str, ...] | list[str]) -> None:
    """Every name is a registered metric. Suites call it when validating their config, so a
    typo is an error before the first request, not after the last."""
    registry = _registry()
    for name in names:
        if name not in registry:
            raise SuiteConfigError(
                f"metric {name!r} is not registered by any installed plugin;"
                f" registered metrics: {', '.join(sorted(registry)) or 'none'}"
            )


def load_metric(name: str) -> Any:
    check_metrics([name])
    return _registry()[name]()


def compute_metric(
    name: str, predictions: list[str], references: list[list[str]]
) -> tuple[dict[str, float], dict[str, bool], str | None]:
    """Scores, higher-is-better flags and signature of metric `name` on one corpus."""
    result = load_metric(name).compute(predictions, references)
    scores = {k: float(v) for k, v in result.scores.items()}
    flags = {k: bool(result.higher_is_better.get(k, True)) for k in scores}
    return scores, flags, result.signature
