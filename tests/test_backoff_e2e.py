"""Upstream 429s end to end (SPEC section 5, "Upstream 429"): clients -> `sluice
serve` -> `sluice sim` with a hard cap below the proxy's limit."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import ProxyFactory, chat, sim_provider
from tests.servers import Server
from tests.waiting import eventually

NOTICE = "Concurrency limit auto-reduced to {} after a 429 — restore manually when ready."
TOKENS = 8


def configure_sim(sim: Server, **config: int | None) -> None:
    httpx.post(sim.url + "/sim/config", json=config).raise_for_status()


def sim_stats(sim: Server) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(sim.url + "/sim/stats").json()
    return stats


def status_of(proxy: Server) -> dict[str, Any]:
    response = httpx.get(proxy.url + "/concurrency/status/sim")
    assert response.status_code == 200
    status: dict[str, Any] = response.json()
    return status


def event_kinds(proxy: Server) -> list[str]:
    response = httpx.get(proxy.url + "/concurrency/events", params={"provider": "sim"})
    return [e["kind"] for e in response.json()["events"]]


async def stream_content(client: httpx.AsyncClient) -> tuple[int, str]:
    """Status and the assembled text of one streamed chat completion."""
    async with client.stream("POST", "/v1/chat/completions", json=chat(True)) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.text
        parts: list[str] = []
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        return 200, "".join(parts)


async def test_clients_never_see_the_429s_while_the_limit_converges(
    make_proxy: ProxyFactory, sim_clean: Server
) -> None:
    configure_sim(sim_clean, hardCap=2, retryAfterS=1, tokens=TOKENS, tokenDelayMs=20)
    proxy = make_proxy(
        sim_provider(sim_clean, limit=4, cooldown_ms=100, pause_s=0.2, retry_on_429=5)
    )
    paused_seen: list[dict[str, Any]] = []

    async def watch(client: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            status = (await client.get("/concurrency/status/sim")).json()
            if status["paused"]:
                paused_seen.append(status)
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(client, done))
        results = await asyncio.gather(*(stream_content(client) for _ in range(12)))
        done.set()
        await watcher

    assert results == [(200, expected_content(TOKENS))] * 12

    stats = sim_stats(sim_clean)
    assert stats["rateLimited"] > 0  # the proxy did hit the cap ...
    assert stats["completed"] == 12  # ... and retried every refused request
    assert stats["maxInFlight"] <= 2

    status = status_of(proxy)
    assert status["autoReduced"] is True
    assert status["autoReducedFrom"] == 4
    assert 1 <= status["limit"] <= 2
    assert status["notice"] == NOTICE.format(status["limit"])
    assert (status["inFlight"], status["queued"]) in {(0, 0), (1, 0), (2, 0)}  # cooling

    def journaled() -> list[str] | None:
        found = event_kinds(proxy)
        return found if {"rate_limited", "paused", "limit_reduced"} <= set(found) else None

    kinds: list[str] = await eventually(journaled)
    # Concurrent 429s of one overshoot cost one step: exactly one event per step.
    assert kinds.count("limit_reduced") == 4 - status["limit"]
    assert kinds.count("rate_limited") <= stats["rateLimited"]

    # The watcher saw the pause the sim's Retry-After asked for.
    assert paused_seen
    assert all(type(s["pausedUntil"]) is int for s in paused_seen)


async def test_while_paused_nothing_is_admitted(
    make_proxy: ProxyFactory, sim_clean: Server
) -> None:
    """A 429 with `Retry-After: 2` pauses the provider: status says until when, and a
    request that arrives meanwhile (the fast path included) waits for the pause."""
    configure_sim(sim_clean, hardCap=0, retryAfterS=2, tokens=TOKENS, tokenDelayMs=0)
    proxy = make_proxy(sim_provider(sim_clean, limit=3, retry_on_429=0, pause_s=30))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        before_ms = time.time() * 1000
        refused = await client.post("/v1/chat/completions", json=chat(False))
        assert refused.status_code == 429
        paused_at_ms = time.time() * 1000

        status = status_of(proxy)
        assert status["paused"] is True
        until = status["pausedUntil"]
        assert type(until) is int
        now_ms = time.time() * 1000
        assert now_ms < until
        # Retry-After: 2 from the moment of the 429, not pause_s = 30.
        assert before_ms + 2000 - 50 <= until <= paused_at_ms + 2000 + 50

        configure_sim(sim_clean, hardCap=None)  # the upstream would take it now
        started = time.time() * 1000
        waited = await client.post("/v1/chat/completions", json=chat(False))
        finished = time.time() * 1000
        assert waited.status_code == 200
        assert finished >= until - 20  # held until the pause ended, never sent early
        assert int(waited.headers["x-sluice-queue-ms"]) >= until - started - 50

    after = status_of(proxy)
    assert after["paused"] is False
    assert "pausedUntil" not in after
    assert sim_stats(sim_clean)["completed"] == 1


@pytest.mark.parametrize("limit", [2, None], ids=["limited", "unlimited"])
def test_with_retry_on_429_zero_the_upstream_429_reaches_the_client_unchanged(
    make_proxy: ProxyFactory, sim_clean: Server, limit: int | None
) -> None:
    configure_sim(sim_clean, hardCap=0, retryAfterS=7)
    settings: dict[str, int | float] = {"retry_on_429": 0}
    if limit is not None:
        settings["limit"] = limit
    proxy = make_proxy(sim_provider(sim_clean, **settings))
    direct = httpx.post(sim_clean.url + "/v1/chat/completions", json=chat(False))
    assert direct.status_code == 429

    via = httpx.post(proxy.url + "/v1/chat/completions", json=chat(False))
    assert via.status_code == 429
    assert via.content == direct.content
    assert via.headers["retry-after"] == "7"
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert via.headers["x-sluice-provider"] == "sim"
    assert sim_stats(sim_clean)["rateLimited"] == 2  # no retry

    status = status_of(proxy)
    if limit is None:
        assert status["autoReduced"] is False  # no limit to reduce
    else:
        assert status["paused"] is True
        assert status["limit"] == 1
        assert status["autoReducedFrom"] == 2
        assert status["notice"] == NOTICE.format(1)
