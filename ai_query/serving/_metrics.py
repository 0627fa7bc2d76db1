"""Prometheus metrics of ``ai-query serve`` at ``GET /metrics`` (the ``serve`` extra's ``prometheus-client``).

What users of vLLM, the LiteLLM proxy and Ray Serve scrape, per serving endpoint and served entity:

- ``aiq_serving_requests_total{endpoint, entity, status}``: queries answered, by HTTP status (an
  error is any status but 200; ``entity`` is empty for a query refused before a model was picked);
- ``aiq_serving_request_seconds{endpoint, entity}``: latency histogram, request in to response out;
- ``aiq_serving_tokens_total{endpoint, entity, kind}``: prompt and completion tokens;
- ``aiq_serving_in_flight{endpoint}``: queries being answered now;
- ``aiq_serving_rate_limited_total{endpoint}``: queries the server's own rate limits refused (429).

Only queries of endpoints that exist get an ``endpoint`` label (a name someone made up would grow
the label set without bound); the others count under ``endpoint=""``.

**Several workers** (``--workers N``): each worker process counts its own queries, and a scrape
reaches one of them, so the supervisor points every worker at one directory
(``PROMETHEUS_MULTIPROC_DIR``, prometheus-client's multiprocess mode) and any worker's ``/metrics``
sums all of them (the in-flight gauge over live workers only). The variable must be set before
``prometheus_client`` is imported, which is why the supervisor sets it before starting workers.

The query path pays a dictionary lookup and an increment per metric: the labelled children are
cached per label tuple.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .._errors import ConfigError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def prometheus_missing() -> str | None:
    """Why ``/metrics`` cannot answer (the package is not installed), or None."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return ("GET /metrics needs the prometheus-client package: pip install 'spark-ai-query[serve]' "
                "(or pip install prometheus-client), then restart ai-query serve")
    return None


class ServingMetrics:
    """The server's counters (see the module docstring); ``exposition()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir is not None and not os.path.isdir(self.multiprocess_dir):
            raise ConfigError(f"{MULTIPROC_ENV}={self.multiprocess_dir!r} is not a directory; create it (empty) or unset "
                              "the variable (ai-query serve --workers N sets it for its workers)")
        # one process: a registry of our own (several servers in one process do not collide);
        # multiprocess mode: values go to files, and /metrics reads every process's files
        self.registry = None if self.multiprocess_dir else CollectorRegistry()
        reg = {"registry": self.registry}
        self._requests = Counter("aiq_serving_requests", "Queries answered, by HTTP status",
                                 ["endpoint", "entity", "status"], **reg)
        self._latency = Histogram("aiq_serving_request_seconds", "Query latency, request in to response out",
                                  ["endpoint", "entity"], buckets=_BUCKETS, **reg)
        self._tokens = Counter("aiq_serving_tokens", "Tokens of answered queries", ["endpoint", "entity", "kind"], **reg)
        self._in_flight = Gauge("aiq_serving_in_flight", "Queries being answered now", ["endpoint"],
                                multiprocess_mode="livesum", **reg)
        self._refused = Counter("aiq_serving_rate_limited", "Queries refused by the server's rate limits (429)",
                                ["endpoint"], **reg)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, endpoint: str) -> None:
        self._child(self._in_flight, endpoint).inc()

    def finished(self, endpoint: str, entity: str, status: int, seconds: float, counted_in_flight: bool) -> None:
        """One query done (``counted_in_flight``: ``started`` was called for it)."""
        if counted_in_flight:
            self._child(self._in_flight, endpoint).dec()
        self._child(self._requests, endpoint, entity, str(status)).inc()
        self._child(self._latency, endpoint, entity).observe(seconds)

    def tokens(self, endpoint: str, results: Sequence[Any]) -> None:
        for r in results:
            entity = r.model or ""
            if r.prompt_tokens:
                self._child(self._tokens, endpoint, entity, "prompt").inc(r.prompt_tokens)
            if r.completion_tokens:
                self._child(self._tokens, endpoint, entity, "completion").inc(r.completion_tokens)

    def rate_limited(self, endpoint: str) -> None:
        self._child(self._refused, endpoint).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def create_metrics() -> ServingMetrics | None:
    """The server's metrics, or None without prometheus-client (``/metrics`` then says how to install it)."""
    return None if prometheus_missing() else ServingMetrics()


def worker_exited(pid: int, path: str) -> None:
    """Forget a dead worker's in-flight gauge in the multiprocess directory ``path`` (its counters stay)."""
    if not prometheus_missing():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
