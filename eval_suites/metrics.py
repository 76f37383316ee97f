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

from atlas_server.rag.types import MetricResult

from .errors import MetricError, SuiteConfigError

__all__ = [
    "available_metrics",
    "check_metrics",
    "check_ranking_metrics",
    "compute_metric",
    "compute_ranking_metric",
    "load_metric",
]


def _registry() -> Mapping[str, Any]:
    from atlas_server.plugins import PluginError, get_plugin_host

    try:
        return get_plugin_host().metrics
    except PluginError as e:  # two plugins claim one name, a misspelled hook
        raise MetricError(str(e)) from None


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


def check_ranking_metrics(names: tuple[str, ...] | list[str]) -> None:
    """Every name is a registered metric with `compute_ranking(ranked, relevant)` (what
    the retrieval suite calls), checked before the first request as check_metrics is."""
    check_metrics(names)
    registry = _registry()
    ranking = sorted(
        n for n in registry if callable(getattr(registry[n](), "compute_ranking", None))
    )
    for name in names:
        if name not in ranking:
            raise SuiteConfigError(
                f"metric {name!r} is not a ranking metric (it has no compute_ranking(ranked,"
                f" relevant)); ranking metrics: {', '.join(ranking) or 'none'}"
            )


def compute_metric(
    name: str, predictions: list[str], references: list[list[str]]
) -> tuple[dict[str, float], dict[str, bool], str | None]:
    """Scores, higher-is-better flags and signature of metric `name` on one corpus.

    A metric that raises, or returns something other than a MetricResult of numbers, is a
    MetricError naming it and its plugin (the metrics run after the last request: the
    answers are in the response cache, and a rerun sends none of them again)."""
    return _checked(name, lambda metric: metric.compute(predictions, references))


def compute_ranking_metric(
    name: str, ranked: list[list[str]], relevant: list[set[str]]
) -> tuple[dict[str, float], dict[str, bool], str | None]:
    """compute_metric for a ranking metric: `ranked` ids per query, best first, and the
    `relevant` ids of each (binary relevance)."""
    return _checked(name, lambda metric: metric.compute_ranking(ranked, relevant))


def _checked(name: str, call: Any) -> tuple[dict[str, float], dict[str, bool], str | None]:
    """`call(metric)`'s MetricResult as (scores, flags, signature), or a MetricError."""
    metric = load_metric(name)
    try:
        result = call(metric)
        if not isinstance(result, MetricResult):  # a dict's .scores said AttributeError
            raise TypeError(f"returned a {type(result).__name__}, not a MetricResult")
        scores = {k: float(v) for k, v in result.scores.items()}
        flags = {k: bool(result.higher_is_better.get(k, True)) for k in scores}
        signature = result.signature
    except Exception as e:
        from atlas_server.plugins import get_plugin_host

        owner = get_plugin_host().owner("metrics", name)
        raise MetricError(
            f"metric {name!r} (plugin {owner!r}) failed: {type(e).__name__}: {e}"
        ) from e
    return scores, flags, signature
