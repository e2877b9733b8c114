"""Which 429s lower the limit, and the opt-in restore, end to end (SPEC section 12):
clients -> `sluice serve` (with its SQLite store) -> `sluice sim`.

The sim answers two kinds of 429: over its hard cap `"code": "concurrency_limit"`,
and for `X-Sim-Fault: rate-limit` `"code": "rate_limit_exceeded"` (a budget, not a
concurrency cap) - the case `reduce_on_429 = "match"` is for.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory, chat, proxy_config, sim_provider
from tests.servers import Server, start
from tests.waiting import wait_until

NOTICE = "Concurrency limit auto-reduced to {} after a 429 — restore manually when ready."
FAULT_429 = {"x-sim-fault": "rate-limit"}


def configure_sim(sim: Server, **config: int | None) -> None:
    httpx.post(sim.url + "/sim/config", json=config).raise_for_status()


def status_of(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/concurrency/status/sim")
    assert response.status_code == 200
    status: dict[str, Any] = response.json()
    return status


def events_of(url: str) -> list[dict[str, Any]]:
    """The journal, oldest first."""
    response = httpx.get(url + "/concurrency/events", params={"provider": "sim"})
    events: list[dict[str, Any]] = response.json()["events"]
    return events[::-1]


def journaled(url: str, kind: str, count: int = 1) -> list[dict[str, Any]] | None:
    found = [e for e in events_of(url) if e["kind"] == kind]
    return found if len(found) >= count else None


@pytest.fixture
def capped_sim(sim_clean: Server) -> Iterator[Server]:
    """The sim with Retry-After 1 and its hard cap lifted again afterwards."""
    configure_sim(sim_clean, retryAfterS=1)
    yield sim_clean
    configure_sim(sim_clean, hardCap=None)


def test_a_429_that_does_not_match_pauses_without_lowering_the_limit(
    make_proxy: ProxyFactory, capped_sim: Server
) -> None:
    proxy = make_proxy(
        sim_provider(
            capped_sim,
            limit=3,
            retry_on_429=0,
            reduce_on_429="match",
            reduce_on_429_match='"code":\\s*"concurrency_limit"',
        )
    )
    direct = httpx.post(capped_sim.url + "/v1/chat/completions", json=chat(), headers=FAULT_429)
    via = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=FAULT_429)
    # Read ahead to be judged, the 429 still reaches the client byte for byte.
    assert via.status_code == 429
    assert via.content == direct.content
    assert via.headers["retry-after"] == "1"

    status = status_of(proxy.url)
    assert status["paused"] is True
    assert (status["limit"], status["autoReduced"]) == (3, False)
    assert "notice" not in status
    [rate_limited] = wait_until(lambda: journaled(proxy.url, "rate_limited"))
    assert rate_limited["detail"] == (
        "429 from upstream (limit kept: no match for reduce_on_429_match)"
    )
    assert "limit_reduced" not in [e["kind"] for e in events_of(proxy.url)]

    # Over the hard cap: a concurrency 429, which matches and lowers the limit.
    configure_sim(capped_sim, hardCap=0)
    refused = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), timeout=10)
    assert refused.status_code == 429
    assert b"concurrency_limit" in refused.content
    status = status_of(proxy.url)
    assert (status["limit"], status["autoReduced"], status["autoReducedFrom"]) == (2, True, 3)
    second = wait_until(lambda: journaled(proxy.url, "rate_limited", 2))[1]
    assert second["detail"] == "429 from upstream (matched reduce_on_429_match)"
    [reduced] = wait_until(lambda: journaled(proxy.url, "limit_reduced"))
    assert reduced["detail"] == "limit 3 -> 2 after a 429"


class Sluice:
    """`sluice serve` on one config file and SQLite database, restartable."""

    def __init__(self, directory: Path, providers: str) -> None:
        self.config, self.port = proxy_config(directory, providers)
        self.server: Server | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = start(["serve", "--config", str(self.config)], self.port)

    def kill(self) -> None:
        if self.server is not None:
            self.server.stop(signal.SIGKILL)
            self.server = None


def busy(url: str, count: int, seconds: float) -> list[threading.Thread]:
    """`count` streamed completions of about `seconds` each: demand while they run."""
    headers = {"x-sim-tokens": str(round(seconds * 20)), "x-sim-token-delay-ms": "50"}

    def request() -> None:
        # The proxy may be killed under it: what it answers does not matter here.
        with httpx.Client(timeout=30) as client, contextlib.suppress(httpx.HTTPError):
            client.post(url + "/v1/chat/completions", json=chat(), headers=headers)

    threads = [threading.Thread(target=request, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_restore_steps_are_persisted_and_survive_a_kill(capped_sim: Server, tmp_path: Path) -> None:
    proxy = Sluice(
        tmp_path,
        sim_provider(capped_sim, limit=3, retry_on_429=0, cooldown_ms=0, restore_after_s=1),
    )
    proxy.start()
    try:
        configure_sim(capped_sim, hardCap=0)
        for _ in range(2):  # two 429s, the second after the first's pause: 3 -> 2 -> 1
            refused = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), timeout=10)
            assert refused.status_code == 429
        assert status_of(proxy.url)["limit"] == 1
        configure_sim(capped_sim, hardCap=None)

        # One long request keeps the only slot busy: after 1 s of that, 1 -> 2; then
        # one of two slots is busy, no demand, no further step.
        busy(proxy.url, 1, 3.0)
        [step] = wait_until(lambda: journaled(proxy.url, "limit_restored"))
        assert step["detail"] == "limit 1 -> 2 after 1 s without a 429 while busy"
        status = status_of(proxy.url)
        assert (status["limit"], status["autoReduced"], status["autoReducedFrom"]) == (2, True, 3)
        assert status["notice"] == NOTICE.format(2)
        # Journaled means durable: the step's event is committed with the limit.
        proxy.kill()

        proxy.start()
        status = status_of(proxy.url)
        assert (status["limit"], status["autoReduced"], status["autoReducedFrom"]) == (2, True, 3)
        assert status["notice"] == NOTICE.format(2)

        # Both slots busy: the next step brings the limit before the reductions back.
        busy(proxy.url, 2, 3.0)
        wait_until(lambda: journaled(proxy.url, "limit_restored", 2))
        status = status_of(proxy.url)
        assert (status["limit"], status["autoReduced"]) == (3, False)
        assert "notice" not in status
        assert "autoReducedFrom" not in status
        proxy.kill()

        proxy.start()
        status = status_of(proxy.url)
        assert (status["limit"], status["autoReduced"]) == (3, False)
        assert "notice" not in status
    finally:
        proxy.kill()


def test_a_manual_limit_ends_the_restore(capped_sim: Server, tmp_path: Path) -> None:
    proxy = Sluice(
        tmp_path,
        sim_provider(capped_sim, limit=3, retry_on_429=0, cooldown_ms=0, restore_after_s=1),
    )
    proxy.start()
    try:
        configure_sim(capped_sim, hardCap=0)
        assert httpx.post(proxy.url + "/v1/chat/completions", json=chat()).status_code == 429
        configure_sim(capped_sim, hardCap=None)
        put = httpx.put(proxy.url + "/concurrency/limits/sim", json={"limit": 2})
        assert put.json() == {"providerId": "sim", "limit": 2}
        threads = busy(proxy.url, 3, 2.5)  # demand for longer than the window
        for thread in threads:
            thread.join(timeout=30)
        status = status_of(proxy.url)
        assert (status["limit"], status["autoReduced"]) == (2, False)
        assert journaled(proxy.url, "limit_restored") is None
    finally:
        proxy.kill()
