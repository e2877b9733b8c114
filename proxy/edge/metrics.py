"""Prometheus metrics at `/metrics`, per provider, all named `sluice_*`.

Gauges and counters are read from the limiters when Prometheus scrapes (a custom
collector), so the request path pays only for the two histograms, whose
per-provider children are bound once at start. In cluster mode the gauges are the
cluster-wide figures last read from Redis, plus `sluice_cluster_fallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.runtime.seam import Admission

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _LimiterCollector(Collector):
    def __init__(self, limiters: Callable[[], Iterable[Admission]]) -> None:
        self._limiters = limiters

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "in_flight": GaugeMetricFamily(
                "sluice_in_flight",
                "Slots in use: running requests plus slots cooling down",
                labels=["provider"],
            ),
            "queued": GaugeMetricFamily(
                "sluice_queued", "Requests waiting for a slot", labels=["provider"]
            ),
            "limit": GaugeMetricFamily(
                "sluice_limit",
                "Current concurrency limit (absent when unlimited)",
                labels=["provider"],
            ),
            "paused": GaugeMetricFamily(
                "sluice_paused", "1 while the queue is paused after a 429", labels=["provider"]
            ),
            "auto_reduced": GaugeMetricFamily(
                "sluice_auto_reduced",
                "1 when the limit was lowered after a 429",
                labels=["provider"],
            ),
        }
        counters = {
            "admitted": CounterMetricFamily(
                "sluice_admitted", "Requests admitted to the upstream", labels=["provider"]
            ),
            "rate_limited": CounterMetricFamily(
                "sluice_upstream_429", "429 answers from the upstream", labels=["provider"]
            ),
            "auto_reductions": CounterMetricFamily(
                "sluice_auto_reductions", "Limit reductions after a 429", labels=["provider"]
            ),
            "slots_reclaimed": CounterMetricFamily(
                "sluice_watchdog_reclaims", "Slots reclaimed by the watchdog", labels=["provider"]
            ),
        }
        polls = CounterMetricFamily(
            "sluice_usage_polls",
            "Polls of the upstream's /usage by result",
            labels=["provider", "result"],
        )
        # Labelled by configured client ids only, so the series stay bounded.
        client_in_flight = GaugeMetricFamily(
            "sluice_client_in_flight",
            "A client's running requests (cooling slots count only toward the limit)",
            labels=["provider", "client"],
        )
        client_queued = GaugeMetricFamily(
            "sluice_client_queued", "A client's requests waiting", labels=["provider", "client"]
        )
        fallback = GaugeMetricFamily(
            "sluice_cluster_fallback",
            "1 while this replica cannot reach Redis and admits only its local share",
            labels=["provider"],
        )
        for limiter in self._limiters():
            pid = [limiter.provider_id]
            status = limiter.snapshot()
            cluster = limiter.cluster()
            if cluster is not None:
                fallback.add_metric(pid, int(cluster.mode == "fallback"))
            gauges["in_flight"].add_metric(pid, status.in_flight)
            gauges["queued"].add_metric(pid, status.queued)
            if status.limit is not None:
                gauges["limit"].add_metric(pid, status.limit)
            gauges["paused"].add_metric(pid, int(status.paused))
            gauges["auto_reduced"].add_metric(pid, int(status.auto_reduced))
            c = limiter.counters
            counters["admitted"].add_metric(pid, c.admitted)
            counters["rate_limited"].add_metric(pid, c.rate_limited)
            counters["auto_reductions"].add_metric(pid, c.auto_reductions)
            counters["slots_reclaimed"].add_metric(pid, c.slots_reclaimed)
            polls.add_metric([*pid, "room"], c.usage_polls_room)
            polls.add_metric([*pid, "full"], c.usage_polls_full)
            polls.add_metric([*pid, "no_info"], c.usage_polls_no_info)
            for share in status.clients:
                client_in_flight.add_metric([*pid, share.client_id], share.in_flight)
                client_queued.add_metric([*pid, share.client_id], share.queued)
        yield from gauges.values()
        yield from counters.values()
        yield polls
        if client_in_flight.samples:  # with [[clients]] only
            yield client_in_flight
            yield client_queued
        if fallback.samples:  # cluster mode only
            yield fallback


class Metrics:
    """One registry per app (not the global one), so tests can run several apps."""

    def __init__(self, limiters: Callable[[], Iterable[Admission]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LimiterCollector(limiters))
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Time admitted requests spent queued",
            ["provider"],
            registry=self.registry,
            buckets=_SECONDS_BUCKETS,
        )
        self.upstream_ttfb = Histogram(
            "sluice_upstream_ttfb_seconds",
            "Time from sending a request upstream to its response headers",
            ["provider"],
            registry=self.registry,
            buckets=_SECONDS_BUCKETS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
