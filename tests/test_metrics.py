"""The metrics an operator asks for first (issue 16): every proxied request counted by
how it ended, 429s of unlimited providers too, cooling slots, the last `/usage` answer,
the build. End to end: `sluice serve` in front of `sluice sim`, real sockets."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.edge.metrics import OUTCOMES, Requests, outcome, package_version
from tests.conftest import ProxyFactory, chat, sim_provider
from tests.servers import Server, free_port
from tests.waiting import wait_until

ADMIN_TOKEN = "metrics-admin-token-8c1f"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
SLOW = {"x-sim-tokens": "60", "x-sim-token-delay-ms": "50"}  # about 3 s
PROVIDERS = ("open", "tight", "slow", "cool", "gated", "limited", "dead")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: Server) -> Samples:
    """Every sample of one scrape, by name and labels."""
    text = httpx.get(proxy.url + "/metrics", headers=ADMIN, timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(proxy: Server, name: str, **labels: str) -> float | None:
    return scrape(proxy).get((name, frozenset(labels.items())))


def outcomes(proxy: Server, provider: str) -> dict[str, float]:
    """The provider's non-zero `sluice_requests_total` by outcome."""
    found = scrape(proxy)
    counts = {o: found.get(("sluice_requests_total", _labels(provider, o)), -1) for o in OUTCOMES}
    assert -1 not in counts.values(), "every outcome is exported, zero or not"
    return {o: n for o, n in counts.items() if n}


def _labels(provider: str, result: str) -> frozenset[tuple[str, str]]:
    return frozenset({"provider": provider, "outcome": result}.items())


def in_background(call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def proxy(make_proxy: ProxyFactory, sim_clean: Server) -> Server:
    dead = f'\n[[providers]]\nid = "dead"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
    return make_proxy(
        sim_provider(sim_clean, "open", default=True, read_timeout_s=0.5)
        + sim_provider(sim_clean, "tight", limit=1, max_queue=0)
        + sim_provider(sim_clean, "slow", limit=1, queue_timeout_s=0.3)
        + sim_provider(sim_clean, "cool", limit=2, cooldown_ms=60_000)
        + sim_provider(sim_clean, "gated", limit=1, usage_gate=True)
        + sim_provider(sim_clean, "limited", limit=3)
        + dead,
        server=f'admin_token = "{ADMIN_TOKEN}"',
        admission="retry_on_429 = 0\npause_s = 0\ncooldown_ms = 0",
    )


# --- how a request ended ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "failure", "gone", "expected"),
    [
        (200, None, False, "ok"),
        (304, None, False, "ok"),
        (404, None, False, "upstream_4xx"),
        (429, None, False, "rate_limited"),
        (500, None, False, "upstream_5xx"),
        (503, "queue_full", False, "queue_full"),
        (503, "queue_timeout", False, "queue_timeout"),
        (502, "upstream_unavailable", False, "bad_gateway"),
        (504, "upstream_timeout", False, "gateway_timeout"),
        (200, "upstream_unavailable", False, "bad_gateway"),  # cut mid-stream
        (200, "upstream_timeout", False, "gateway_timeout"),  # went silent mid-stream
        (499, None, False, "client_gone"),
        (200, None, True, "client_gone"),  # left mid-stream
        (400, "bad_request", False, "bad_request"),
        (413, "body_too_large", False, "bad_request"),
        (0, None, False, "internal_error"),
    ],
)
def test_outcome_of_a_request(status: int, failure: str | None, gone: bool, expected: str) -> None:
    assert outcome(status, failure, gone) == expected
    assert expected in OUTCOMES


@pytest.mark.e2e
def test_every_outcome_is_counted_per_provider(proxy: Server) -> None:
    url = proxy.url
    with httpx.Client(timeout=10) as client:
        assert all(not outcomes(proxy, p) for p in PROVIDERS)

        assert client.post(f"{url}/v1/chat/completions", json=chat()).status_code == 200
        assert client.get(f"{url}/v1/models").status_code == 200
        assert client.get(f"{url}/v1/no-such-route").status_code == 404
        fault = {"x-sim-fault": "status:500"}
        assert client.post(f"{url}/v1/chat/completions", json=chat(), headers=fault).is_error
        stall = {"x-sim-fault": "stall:3"}
        response = client.post(f"{url}/v1/chat/completions", json=chat(), headers=stall)
        assert response.status_code == 504
        bad = {"x-prompt-started-at": "not a time"}
        assert (
            client.post(f"{url}/v1/chat/completions", json=chat(), headers=bad).status_code == 400
        )
        assert client.post(f"{url}/dead/v1/chat/completions", json=chat()).status_code == 502

        # One slot, no queue: the second request is refused while the first runs.
        held = in_background(
            lambda: httpx.post(f"{url}/tight/v1/chat/completions", json=chat(), headers=SLOW)
        )
        wait_until(lambda: value(proxy, "sluice_in_flight", provider="tight") == 1)
        refused = client.post(f"{url}/tight/v1/chat/completions", json=chat())
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"

        # One slot, a short wait: the second request gives up in the queue.
        waiting = in_background(
            lambda: httpx.post(f"{url}/slow/v1/chat/completions", json=chat(), headers=SLOW)
        )
        wait_until(lambda: value(proxy, "sluice_in_flight", provider="slow") == 1)
        timed_out = client.post(f"{url}/slow/v1/chat/completions", json=chat())
        assert timed_out.json()["error"]["code"] == "queue_timeout"

        # A client that leaves mid-stream.
        body = chat(stream=True)
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=SLOW) as s:
            next(s.iter_bytes())
        held.join()
        waiting.join()
        wait_until(lambda: "client_gone" in outcomes(proxy, "open"))

    assert outcomes(proxy, "open") == {
        "ok": 2,
        "upstream_4xx": 1,
        "upstream_5xx": 1,
        "gateway_timeout": 1,
        "bad_request": 1,
        "client_gone": 1,
    }
    assert outcomes(proxy, "dead") == {"bad_gateway": 1}
    assert outcomes(proxy, "tight") == {"ok": 1, "queue_full": 1}
    assert outcomes(proxy, "slow") == {"ok": 1, "queue_timeout": 1}


@pytest.mark.e2e
def test_429s_are_counted_for_limited_and_unlimited_providers(proxy: Server) -> None:
    rate_limit = {"x-sim-fault": "rate-limit"}
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for prefix in ("", "/limited", "/limited"):  # the second waits out the first's pause
            response = client.post(f"{prefix}/v1/chat/completions", json=chat(), headers=rate_limit)
            assert response.status_code == 429
    # An unlimited provider's 429 passes straight through, and is counted all the same.
    assert value(proxy, "sluice_upstream_429_total", provider="open") == 1
    assert outcomes(proxy, "open") == {"rate_limited": 1}
    assert value(proxy, "sluice_upstream_429_total", provider="limited") == 2
    assert outcomes(proxy, "limited") == {"rate_limited": 2}


def test_a_429_no_limiter_saw_is_counted_at_the_edge() -> None:
    @dataclass
    class Ended:
        provider: str = "p"
        status: int = 429
        started: bool = True
        failure: str | None = None

    requests = Requests()
    requests.finished(Ended(), client_gone=False, limiter_saw_429=True)
    assert requests.unseen_429["p"] == 0  # the limiter counted that one
    requests.finished(Ended(), client_gone=False, limiter_saw_429=False)
    requests.finished(Ended(status=503, started=False, failure="queue_full"), False, False)
    assert requests.unseen_429["p"] == 1
    assert requests.outcomes == {("p", "rate_limited"): 2, ("p", "queue_full"): 1}


@pytest.mark.e2e
def test_cooling_slots_and_the_last_usage_answer_are_gauges(proxy: Server) -> None:
    assert value(proxy, "sluice_cooling", provider="cool") == 0
    assert value(proxy, "sluice_upstream_sessions", provider="gated") is None  # no answer yet
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/cool/v1/chat/completions", json=chat()).status_code == 200
        # The gate polls /usage for a waiter: make one.
        url, brief = f"{proxy.url}/gated/v1/chat/completions", {"x-sim-token-delay-ms": "100"}
        first = in_background(lambda: httpx.post(url, json=chat(), headers=brief))
        wait_until(lambda: value(proxy, "sluice_in_flight", provider="gated") == 1)
        assert client.post("/gated/v1/chat/completions", json=chat()).status_code == 200
        first.join()
        status = client.get("/concurrency/status/gated", headers=ADMIN).json()
    assert value(proxy, "sluice_cooling", provider="cool") == 1  # 60 s of cooldown
    assert value(proxy, "sluice_in_flight", provider="cool") == 1
    assert status["upstreamSessions"] is not None
    assert value(proxy, "sluice_upstream_sessions", provider="gated") == status["upstreamSessions"]


@pytest.mark.e2e
def test_build_info_names_the_version(proxy: Server) -> None:
    found = {
        labels: v for (name, labels), v in scrape(proxy).items() if name == "sluice_build_info"
    }
    assert found == {frozenset({"version": package_version()}.items()): 1}
