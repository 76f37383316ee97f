"""Prometheus metrics, named like vLLM's so existing dashboards transfer.

What it does: one `prometheus_client` registry per app with latency histograms (time to
first token, inter-token latency, each choice's mean time per output token, prefill and
decode time, end-to-end latency, queue time), size histograms (prompt and generated
tokens per request), gauges read from the engine at scrape time (running and waiting
requests, KV-cache slot usage) and counters (prompt and generation tokens, finished
requests by reason, errors by status).
Latencies are measured at the HTTP layer, from the moment the request body is parsed,
so they include tokenization and queueing as a client sees them.
What it does not do: serve the endpoint (see `system.py`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
# 1, 2, 5, 10, ... 50,000 tokens, as vLLM's request size histograms (which stop at the
# model's context; the metrics exist before the model loads, so these go past any here).
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(5) for m in (1, 2, 5))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def histogram(name: str, doc: str, buckets: tuple = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.ttft = histogram(
            "atlas:time_to_first_token_seconds",
            "Time to first token.",
        )
        self.itl = histogram(
            "atlas:inter_token_latency_seconds",
            "Time between successive streamed tokens.",
        )
        self.tpot = histogram(
            "atlas:request_time_per_output_token_seconds",
            "Each choice's mean time per output token after its first: decode time over "
            "tokens - 1 (vLLM's TPOT, which its dashboards read).",
        )
        self.prefill = histogram(
            "atlas:request_prefill_time_seconds",
            "Time to first token less queue time: tokenization and the prompt's forward pass.",
        )
        self.decode = histogram(
            "atlas:request_decode_time_seconds",
            "Each choice's time from its first token to its last.",
        )
        self.prompt_sizes = histogram(
            "atlas:request_prompt_tokens",
            "Prompt tokens per prompt.",
            _TOKEN_BUCKETS,
        )
        self.generation_sizes = histogram(
            "atlas:request_generation_tokens",
            "Tokens generated per choice.",
            _TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "atlas:e2e_request_latency_seconds",
            "End-to-end request latency.",
        )
        self.queue = histogram(
            "atlas:request_queue_time_seconds",
            "Time a request waited before the engine first scheduled it.",
        )
        self.running = Gauge(
            "atlas:num_requests_running", "Sequences in the running batch.", registry=r
        )
        self.waiting = Gauge(
            "atlas:num_requests_waiting", "Requests waiting to be scheduled.", registry=r
        )
        self.kv_usage = Gauge(
            "atlas:kv_cache_usage_perc", "Fraction of KV-cache slots in use.", registry=r
        )
        self.prompt_tokens = Counter("atlas:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.prefix_cache_hits = Counter(
            "atlas:prefix_cache_hit_tokens",
            "Prompt tokens whose KV rows came from the prefix cache instead of a forward pass.",
            registry=r,
        )
        self._prefix_hits_seen = 0
        self.generation_tokens = Counter("atlas:generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter(
            "atlas:request_success",
            "Finished sequences (one per choice) by finish reason: stop or length.",
            ["finished_reason"],
            registry=r,
        )
        self.errors = Counter(
            "atlas:request_errors",
            "Requests answered with an error (or a stream ended by one), by status; "
            "499: the client went away first.",
            ["status"],
            registry=r,
        )

    def on_prompt(self, n_tokens: int) -> None:
        """One prompt admitted: its tokens counted and its size observed."""
        self.prompt_tokens.inc(n_tokens)
        self.prompt_sizes.observe(n_tokens)

    def observe_engine(self, stats) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        total = max(1, stats.kv_slots_total)
        self.kv_usage.set(stats.kv_slots_used / total)
        # The engine keeps the running total; the counter takes what is new since last time.
        new_hits = stats.prefix_cache_hit_tokens_total - self._prefix_hits_seen
        if new_hits > 0:
            self.prefix_cache_hits.inc(new_hits)
            self._prefix_hits_seen = stats.prefix_cache_hit_tokens_total

    def render(self, engine_stats=None, model_name: str | None = None) -> bytes:
        """The Prometheus text; every series labelled `model_name` when given, as vLLM's
        are: its Grafana dashboard selects every panel on that label."""
        if engine_stats is not None:
            self.observe_engine(engine_stats)
        if model_name is None:
            return generate_latest(self.registry)
        return generate_latest(_Labelled(self.registry, {"model_name": model_name}))


class _Labelled:
    """A registry's families with extra labels on every sample (a collector for
    `generate_latest`): the served name is known only once the model loads, after the
    metrics were made, and changing every metric's label set would touch every update."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry, self.labels = registry, labels

    def collect(self):
        for family in self.registry.collect():
            family.samples = [
                s._replace(labels={**self.labels, **s.labels}) for s in family.samples
            ]
            yield family


class RequestTimer:
    """Per-choice timing of one request, fed by the stream of engine events."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics, self.start = metrics, start
        self.first: dict[int, float] = {}  # per choice: when its first token came
        self.last: dict[int, float] = {}  # ... and its latest
        self.counts: dict[int, int] = {}  # ... and how many so far
        self.queued: float | None = None  # the first queue time reported

    def on_queue_time(self, seconds: float | None) -> None:
        if seconds is not None:
            self.metrics.queue.observe(seconds)
            if self.queued is None:
                self.queued = seconds

    def on_tokens(self, index: int, now: float, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        previous = self.last.get(index)
        if previous is None:
            self.metrics.ttft.observe(now - self.start)
            self.first[index] = now
            if not self.counts:  # the request's first token: its prefill ends here
                self.metrics.prefill.observe(max(0.0, now - self.start - (self.queued or 0.0)))
        else:
            # Several tokens in one event share the gap evenly.
            gap = (now - previous) / n_tokens
            for _ in range(n_tokens):
                self.metrics.itl.observe(gap)
        self.last[index] = now
        self.counts[index] = self.counts.get(index, 0) + n_tokens
        self.metrics.generation_tokens.inc(n_tokens)

    def on_finish(self, now: float, reasons: list[str]) -> None:
        """The request's end-to-end latency, and one finish per choice (OpenAI's "stop" or
        "length"): n choices finish n sequences, as vLLM counts its child requests."""
        self.metrics.e2e.observe(now - self.start)
        for index, count in self.counts.items():
            self.metrics.generation_sizes.observe(count)
            decode = self.last[index] - self.first[index]
            self.metrics.decode.observe(decode)
            if count > 1:
                self.metrics.tpot.observe(decode / (count - 1))
        for reason in reasons:
            self.metrics.finished.labels(finished_reason=reason).inc()
