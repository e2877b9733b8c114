"""Prometheus metrics at `/metrics`, per provider, all named `sluice_*`.

Gauges and counters are read from the limiters when Prometheus scrapes (a custom
collector), so the request path pays only for the two histograms, whose
per-provider children are bound once at start, and for one dict increment in
`Requests` when a request ends. In cluster mode the gauges are the cluster-wide
figures last read from Redis, plus `sluice_cluster_fallback`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.runtime.seam import Admission

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

OUTCOMES = (
    "ok",
    "upstream_4xx",
    "upstream_5xx",
    "rate_limited",
    "queue_full",
    "queue_timeout",
    "bad_gateway",
    "gateway_timeout",
    "client_gone",
    "bad_request",
    "internal_error",
)
"""The `outcome` label of `sluice_requests_total`: the nine the README lists first, then two of ours
for requests that never reached the upstream through no fault of it (`bad_request`:
sluice refused the request itself, 400 or 413; `internal_error`: an exception sluice
did not expect)."""

# The code of an error sluice answered itself (`proxy.errors`) -> its outcome.
_FAILURES = {
    "queue_full": "queue_full",
    "queue_timeout": "queue_timeout",
    "upstream_unavailable": "bad_gateway",
    "upstream_timeout": "gateway_timeout",
    "bad_request": "bad_request",
    "not_found": "bad_request",
    "body_too_large": "bad_request",
}


def outcome(status: int, failure: str | None, client_gone: bool) -> str:
    """How a proxied request ended. `status` is the one the client got (the
    upstream's once its response started), `failure` the code of the error sluice
    raised, if any (after the response started too: an upstream cut mid-stream is a
    `bad_gateway` or a `gateway_timeout` whatever its status line said)."""
    if client_gone or status == 499:
        return "client_gone"
    if failure is not None:
        return _FAILURES.get(failure, "internal_error")
    if status == 429:
        return "rate_limited"
    if 100 <= status < 400:
        return "ok"
    if 400 <= status < 500:
        return "upstream_4xx"
    if 500 <= status < 600:
        return "upstream_5xx"
    return "internal_error"  # no status: an exception left the relay


class Finished(Protocol):
    """What `Requests.finished` reads of a request (the relay's `Exchange`)."""

    @property
    def provider(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def started(self) -> bool: ...
    @property
    def failure(self) -> str | None: ...


class Requests:
    """Counts of proxied requests by provider and outcome, and the upstream 429s no
    limiter was told of (an unlimited provider's, or one on a path that takes no
    slot): plain ints, read at scrape time."""

    __slots__ = ("outcomes", "unseen_429")

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unseen_429: Counter[str] = Counter()

    def finished(self, request: Finished, client_gone: bool, limiter_saw_429: bool) -> None:
        """One request ended; `limiter_saw_429`: its admission was told of any 429
        (it held a slot of a limited provider) and counted it already."""
        self.outcomes[request.provider, outcome(request.status, request.failure, client_gone)] += 1
        if request.status == 429 and request.started and not limiter_saw_429:
            self.unseen_429[request.provider] += 1


def package_version() -> str:
    """The installed distribution's version (`sluice --version` prints the same)."""
    try:
        return version("llm-sluice")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


class _LimiterCollector(Collector):
    def __init__(self, limiters: Callable[[], Iterable[Admission]], requests: Requests) -> None:
        self._limiters = limiters
        self._requests = requests
        self._version = package_version()

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
            "cooling": GaugeMetricFamily(
                "sluice_cooling",
                "Released slots still cooling down (part of sluice_in_flight)",
                labels=["provider"],
            ),
            "upstream_sessions": GaugeMetricFamily(
                "sluice_upstream_sessions",
                "Concurrent sessions in the provider's last /usage answer (absent until one)",
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
            "auto_restores": CounterMetricFamily(
                "sluice_auto_restores",
                "Restore steps of an auto-reduced limit (restore_after_s)",
                labels=["provider"],
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
        requests = CounterMetricFamily(
            "sluice_requests",
            "Proxied requests by how they ended",
            labels=["provider", "outcome"],
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
            gauges["cooling"].add_metric(pid, status.cooling)
            if status.upstream_sessions is not None:
                gauges["upstream_sessions"].add_metric(pid, status.upstream_sessions)
            c = limiter.counters
            counters["admitted"].add_metric(pid, c.admitted)
            counters["rate_limited"].add_metric(
                pid, c.rate_limited + self._requests.unseen_429[limiter.provider_id]
            )
            counters["auto_reductions"].add_metric(pid, c.auto_reductions)
            counters["auto_restores"].add_metric(pid, c.auto_restores)
            counters["slots_reclaimed"].add_metric(pid, c.slots_reclaimed)
            polls.add_metric([*pid, "room"], c.usage_polls_room)
            polls.add_metric([*pid, "full"], c.usage_polls_full)
            polls.add_metric([*pid, "no_info"], c.usage_polls_no_info)
            for share in status.clients:
                client_in_flight.add_metric([*pid, share.client_id], share.in_flight)
                client_queued.add_metric([*pid, share.client_id], share.queued)
            outcomes = self._requests.outcomes
            for name in OUTCOMES:
                requests.add_metric([*pid, name], outcomes[limiter.provider_id, name])
        build = GaugeMetricFamily(
            "sluice_build_info", "The running sluice's version (always 1)", labels=["version"]
        )
        build.add_metric([self._version], 1)
        yield build
        yield from gauges.values()
        yield from counters.values()
        yield requests
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
        self.requests = Requests()
        self.registry.register(_LimiterCollector(limiters, self.requests))
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
