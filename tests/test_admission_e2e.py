"""Admission end to end: `sluice serve` with a limit in front of `sluice sim` (issue 3)."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import httpx
import pytest

from proxy.tools.sim import expected_content
from tests.conftest import ProxyFactory, chat, sim_provider
from tests.servers import Server, free_port
from tests.waiting import eventually


async def status(client: httpx.AsyncClient, proxy: Server) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.get(proxy.url + "/concurrency/status/sim")).json()
    return answer


async def stats(client: httpx.AsyncClient, sim: Server) -> dict[str, int]:
    answer: dict[str, int] = (await client.get(sim.url + "/sim/stats")).json()
    return answer


async def stream_text(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> str:
    text = []
    async with client.stream("POST", url, json=chat(True), headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return "".join(text)


async def test_three_n_clients_never_exceed_limit_n(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    limit = 3
    # The sim's accounting lag (50 ms) is shorter than the cooldown (150 ms).
    async with httpx.AsyncClient() as client:
        await client.post(sim_reset.url + "/sim/config", json={"usageLagMs": 50, "tokens": 10})
    proxy = make_proxy(
        sim_provider(sim_reset, limit=limit, usage_gate=True), admission="cooldown_ms = 150"
    )
    async with httpx.AsyncClient(timeout=30) as client:
        texts = await asyncio.gather(
            *(
                stream_text(
                    client, proxy.url + "/v1/chat/completions", {"x-conversation-id": f"c{i}"}
                )
                for i in range(3 * limit)
            )
        )
        assert texts == [expected_content(10)] * (3 * limit)
        sim_stats = await stats(client, sim_reset)
        assert sim_stats["maxInFlight"] <= limit
        assert sim_stats["completed"] == 3 * limit
        assert sim_stats["rateLimited"] == 0
        await eventually(lambda: _idle(client, proxy))


async def _idle(client: httpx.AsyncClient, proxy: Server) -> bool:
    s = await status(client, proxy)
    return bool(s["inFlight"] == 0 and s["queued"] == 0)


async def test_oldest_prompt_first_whatever_the_arrival_order(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=1), admission="cooldown_ms = 0")
    url = proxy.url + "/v1/chat/completions"
    order: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:

        async def agent(name: str, prompt_started_at: str, tokens: str = "3") -> None:
            headers = {"x-prompt-started-at": prompt_started_at, "x-sim-tokens": tokens}
            await stream_text(client, url, headers)
            order.append(name)

        holder = asyncio.create_task(agent("holder", "1795830000000", tokens="40"))
        await eventually(lambda: _running(client, proxy, 1))
        waiters = []
        # Arrival order: newest prompt first; an RFC 3339 time in the middle.
        for name, started in (
            ("new", "1795830003000"),
            ("oldest", "1795830001000"),
            ("middle", "2026-11-28T01:40:02Z"),
        ):
            waiters.append(asyncio.create_task(agent(name, started)))
            await eventually(functools.partial(_queued, client, proxy, len(waiters)))
        await asyncio.gather(holder, *waiters)
    # 2026-11-28T01:40:02Z is 1795830002000 epoch ms.
    assert order == ["holder", "oldest", "middle", "new"]


async def _running(client: httpx.AsyncClient, proxy: Server, n: int) -> bool:
    return bool((await status(client, proxy))["inFlight"] == n)


async def _queued(client: httpx.AsyncClient, proxy: Server, n: int) -> bool:
    return bool((await status(client, proxy))["queued"] == n)


async def test_usage_gate_holds_back_while_upstream_reports_outside_load(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=2, usage_gate=True, usage_poll_interval_ms=50),
        admission="cooldown_ms = 0",
    )
    url = proxy.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as client:
        # Someone else holds 2 sessions on the account: the upstream reports 2 >= limit.
        await client.post(sim_reset.url + "/sim/config", json={"outsideLoad": 2})
        # The fast path (nobody queued) admits without polling: two requests run...
        first = [
            asyncio.create_task(stream_text(client, url, {"x-sim-tokens": "20"})) for _ in range(2)
        ]
        await eventually(lambda: _running(client, proxy, 2))
        # ...the third queues, and once the slots free up the gate keeps it queued.
        third = asyncio.create_task(stream_text(client, url, {}))
        await eventually(lambda: _queued(client, proxy, 1))
        await asyncio.gather(*first)
        polls_before = (await stats(client, sim_reset))["usagePolls"]
        # It re-polls every usage_poll_interval_ms and still holds back.
        await eventually(lambda: _polled_more(client, sim_reset, polls_before + 3), within=10)
        s = await status(client, proxy)
        assert s["queued"] == 1
        assert s["upstreamSessions"] == 2
        assert (await stats(client, sim_reset))["requests"] == 2
        # The outside load goes away: the next poll admits the waiter.
        await client.post(sim_reset.url + "/sim/config", json={"outsideLoad": 0})
        assert await asyncio.wait_for(third, 10) == expected_content(5)
        assert (await stats(client, sim_reset))["requests"] == 3


async def _polled_more(client: httpx.AsyncClient, sim: Server, n: int) -> bool:
    return (await stats(client, sim))["usagePolls"] >= n


async def test_disconnects_mid_stream_and_while_queued_leak_nothing(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=1), admission="cooldown_ms = 50")
    url = proxy.url + "/v1/chat/completions"
    long = {"x-sim-tokens": "500", "x-sim-token-delay-ms": "20"}
    async with httpx.AsyncClient(timeout=30) as watcher:
        running_client = httpx.AsyncClient(timeout=30)
        queued_client = httpx.AsyncClient(timeout=30)
        running = asyncio.create_task(stream_text(running_client, url, long))
        await eventually(lambda: _running(watcher, proxy, 1))
        queued = asyncio.create_task(stream_text(queued_client, url, long))
        await eventually(lambda: _queued(watcher, proxy, 1))
        # The queued client gives up: it leaves the queue.
        queued.cancel()
        await queued_client.aclose()
        await eventually(lambda: _queued(watcher, proxy, 0))
        # The running client gives up mid-stream: the slot comes back after the cooldown
        # and the upstream sees the disconnect.
        running.cancel()
        await running_client.aclose()
        await eventually(lambda: _idle(watcher, proxy))
        await eventually(lambda: _disconnected(watcher, sim_reset))
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        # The slot really is free: a new request is admitted at once.
        assert await stream_text(watcher, url, {}) == expected_content(5)


async def _disconnected(client: httpx.AsyncClient, sim: Server) -> bool:
    s = await stats(client, sim)
    return s["disconnected"] == 1 and s["inFlight"] == 0


async def test_upstream_failure_releases_the_slot(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        f"""
        [[providers]]
        id = "sim"
        base_url = "http://127.0.0.1:{free_port()}/v1"
        limit = 1
        """,
        admission="cooldown_ms = 0",
    )
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):  # with a leaked slot the second request would queue forever
            response = await client.post(proxy.url + "/v1/chat/completions", json=chat(False))
            assert response.status_code == 502
        await eventually(lambda: _idle(client, proxy))


async def test_queue_full_and_queue_timeout_are_503_with_retry_after(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(
        sim_provider(sim_reset, limit=1, max_queue=1, queue_timeout_s=0.5),
        admission="cooldown_ms = 0",
    )
    url = proxy.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as client:
        holder = asyncio.create_task(
            stream_text(client, url, {"x-sim-tokens": "100", "x-sim-token-delay-ms": "20"})
        )
        await eventually(lambda: _running(client, proxy, 1))
        waiting = asyncio.create_task(client.post(url, json=chat(False)))
        await eventually(lambda: _queued(client, proxy, 1))
        full = await client.post(url, json=chat(False))
        assert full.status_code == 503
        assert full.json()["error"]["type"] == "sluice_queue_full"
        assert int(full.headers["retry-after"]) >= 1
        timed_out = await waiting
        assert timed_out.status_code == 503
        assert timed_out.json()["error"]["type"] == "sluice_queue_timeout"
        assert int(timed_out.headers["retry-after"]) >= 1
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await eventually(lambda: _idle(client, proxy))


async def test_malformed_prompt_started_at_is_400(
    make_proxy: ProxyFactory, sim_reset: Server
) -> None:
    proxy = make_proxy(sim_provider(sim_reset, limit=2))
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            proxy.url + "/v1/chat/completions",
            json=chat(False),
            headers={"x-prompt-started-at": "yesterday"},
        )
        assert response.status_code == 400
        assert "X-Prompt-Started-At" in response.json()["error"]["message"]
        assert (await stats(client, sim_reset))["requests"] == 0
        await eventually(lambda: _idle(client, proxy))
