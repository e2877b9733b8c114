"""Cluster mode end to end (issue 8): several `sluice serve` processes on one real
redis-server, in front of a recording upstream served from the test's own event loop.

The upstream counts true concurrency (globally and per replica: clients tag their
requests with `x-replica`, which the proxy passes through), records the order in which
requests reach it with their `x-prompt-started-at`, can hold streams open until the
test lets them go (`x-hold`), and can answer a group of requests 429 together
(`x-fail-together`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.redis_server import RedisServer, redis_server
from tests.servers import Server, free_port, start
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

LEASE_S = 2.0


class Upstream:
    """An OpenAI-shaped streaming upstream that records what the proxies did."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.in_flight = 0
        self.max_in_flight = 0
        self.per_replica: dict[str, int] = defaultdict(int)
        self.max_per_replica: dict[str, int] = defaultdict(int)
        self.arrivals: list[tuple[str, str]] = []  # (x-prompt-started-at, x-replica)
        self.hold = asyncio.Event()
        self._failing = 0
        self._fail = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def reset_maxima(self) -> None:
        self.max_in_flight = self.in_flight
        self.max_per_replica = defaultdict(int, self.per_replica)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        replica = request.headers.get("x-replica", "?")
        self.arrivals.append((request.headers.get("x-prompt-started-at", ""), replica))
        self.in_flight += 1
        self.per_replica[replica] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_per_replica[replica] = max(
            self.max_per_replica[replica], self.per_replica[replica]
        )
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.in_flight -= 1
                self.per_replica[replica] -= 1

        try:
            together = int(request.headers.get("x-fail-together", "0"))
            if together:
                self._failing += 1
                if self._failing >= together:
                    self._fail.set()
                await self._fail.wait()
                return web.json_response(
                    {"error": {"message": "too many sessions", "type": "rate_limit"}},
                    status=429,
                    headers={"retry-after": "1"},
                )
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                if request.headers.get("x-hold"):
                    await self.hold.wait()
                for i in range(int(request.headers.get("x-tokens", "3"))):
                    chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    await asyncio.sleep(0.01)
                await response.write(b"data: [DONE]\n\n")
                # Counted out before the end of the body leaves: once a proxy has it, it
                # may admit the next request, and this task may run only much later
                # when the test process is busy (seen: 5 in flight against a limit of 4).
                end()
                await response.write_eof()
            return response
        finally:
            end()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    found = Upstream()
    await found.start()
    yield found
    await found.close()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def config(
    tmp_path: Path,
    name: str,
    upstream: Upstream,
    redis_url: str,
    *,
    limit: int = 4,
    admission: str = "",
    clients: str = "",
) -> tuple[Path, int]:
    port = free_port()
    directory = tmp_path / name
    directory.mkdir()
    path = directory / "sluice.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            port = {port}
            database = "{directory / "sluice.db"}"
            log_level = "info"

            [admission]
            cooldown_ms = 50
            retry_on_429 = 0
            {admission}

            [[providers]]
            id = "up"
            base_url = "{upstream.url}"
            limit = {limit}
            {clients}

            [cluster]
            redis_url = "{redis_url}"
            lease_s = {LEASE_S}
            instance_id = "{name}"
            """
        )
    )
    return path, port


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, upstream: Upstream, redis: RedisServer, n: int, **kwargs: Any
) -> AsyncIterator[list[Server]]:
    """`n` replicas, started in parallel."""
    configs = [config(tmp_path, f"r{i}", upstream, redis.url, **kwargs) for i in range(n)]
    replicas = await asyncio.gather(
        *(
            asyncio.to_thread(start, ["serve", "--config", str(path)], port)
            for path, port in configs
        )
    )
    try:
        yield list(replicas)
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)


async def status(client: httpx.AsyncClient, replica: Server) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.get(replica.url + "/concurrency/status/up")).json()
    return answer


async def stream(
    client: httpx.AsyncClient, replica: Server, name: str, headers: dict[str, str] | None = None
) -> int:
    """One streaming chat completion; its status once the stream is complete."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    sent = {"x-replica": name, **(headers or {})}
    async with client.stream(
        "POST", replica.url + "/v1/chat/completions", json=body, headers=sent
    ) as response:
        text = (await response.aread()).decode()
        if response.status_code == 200:
            assert text.rstrip().endswith("data: [DONE]"), text
        return response.status_code


async def test_three_replicas_share_one_limit_and_one_line(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    async with (
        cluster(tmp_path, upstream, redis, 3) as replicas,
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client,
    ):
        # Four holders take the whole limit, through different replicas.
        holders = [
            asyncio.create_task(
                stream(client, replicas[i % 3], f"r{i % 3}", {"x-hold": "1", "x-tokens": "1"})
            )
            for i in range(4)
        ]
        await eventually(lambda: _running(client, replicas[0], 4))
        # 56 more, spread over the replicas, each with its own prompt start time,
        # arriving in an order unrelated to it.
        prompts = random.Random(8).sample(range(10**12, 10**12 + 1_000_000), 56)
        waiters = [
            asyncio.create_task(
                stream(
                    client,
                    replicas[i % 3],
                    f"r{i % 3}",
                    {"x-prompt-started-at": str(p), "x-tokens": "6"},
                )
            )
            for i, p in enumerate(prompts)
        ]
        await eventually(lambda: _queued(client, replicas[1], 56))
        shown = await status(client, replicas[2])
        assert shown["inFlight"] == 4
        assert shown["cluster"]["mode"] == "redis"
        per_replica = {i["instanceId"]: i["queued"] for i in shown["instances"]}
        assert per_replica == {"r0": 19, "r1": 19, "r2": 18}
        upstream.hold.set()
        statuses = await asyncio.wait_for(asyncio.gather(*holders, *waiters), 30)
    assert statuses == [200] * 60
    assert upstream.max_in_flight <= 4
    # The upstream saw the waiters in prompt order, up to the reordering possible among
    # requests admitted at about the same moment: while one admitted request is on its
    # way to the upstream it holds a slot, so at most limit - 1 others can overtake it
    # (each stream lasts longer than that way).
    seen = [int(p) for p, _ in upstream.arrivals[4:]]
    rank = {p: i for i, p in enumerate(sorted(prompts))}
    displacement = max(abs(rank[p] - i) for i, p in enumerate(seen))
    assert displacement < 4, seen


async def _running(client: httpx.AsyncClient, replica: Server, n: int) -> bool:
    return bool((await status(client, replica))["inFlight"] == n)


async def _queued(client: httpx.AsyncClient, replica: Server, n: int) -> bool:
    return bool((await status(client, replica))["queued"] == n)


async def test_a_429_seen_by_two_replicas_at_once_reduces_the_limit_by_one(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    async with (
        cluster(tmp_path, upstream, redis, 3) as replicas,
        httpx.AsyncClient(timeout=30) as client,
    ):
        together = {"x-fail-together": "2"}
        answers = await asyncio.gather(
            stream(client, replicas[0], "r0", together),
            stream(client, replicas[1], "r1", together),
        )
        assert list(answers) == [429, 429]
        shown = await status(client, replicas[2])
        assert (shown["limit"], shown["autoReduced"], shown["autoReducedFrom"]) == (3, True, 4)
        # Each replica journals its own events (in the background: poll for them).
        await eventually(lambda: _journaled(client, replicas[:2], "rate_limited", 2))
        await eventually(lambda: _journaled(client, replicas[:2], "limit_reduced", 1))
        # An admin write on one replica takes effect on every replica at once.
        put = await client.put(replicas[2].url + "/concurrency/limits/up", json={"limit": 4})
        assert put.status_code == 200
        for replica in replicas:
            limit = (await client.get(replica.url + "/concurrency/limits/up")).json()
            assert limit == {"providerId": "up", "limit": 4}
            assert (await status(client, replica))["autoReduced"] is False


async def _journaled(client: httpx.AsyncClient, replicas: list[Server], kind: str, n: int) -> bool:
    found = 0
    for replica in replicas:
        events = (await client.get(replica.url + "/concurrency/events")).json()["events"]
        found += sum(e["kind"] == kind for e in events)
    return found == n


async def test_a_killed_replicas_slots_come_back_within_the_lease(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    async with (
        cluster(tmp_path, upstream, redis, 2, limit=2) as (victim, survivor),
        httpx.AsyncClient(timeout=30) as client,
    ):
        held = {"x-hold": "1"}
        doomed = [asyncio.create_task(stream(client, victim, "r0", held)) for _ in range(2)]
        await eventually(lambda: _running(client, survivor, 2))
        # Its waiters are the oldest: they are the head of the line when it dies.
        doomed += [
            asyncio.create_task(stream(client, victim, "r0", {"x-prompt-started-at": p}))
            for p in ("1000000000100", "1000000000200")
        ]
        await eventually(lambda: _queued(client, survivor, 2))
        bystander = asyncio.create_task(
            stream(client, survivor, "r1", {"x-prompt-started-at": "1000000000300"})
        )
        await eventually(lambda: _queued(client, survivor, 3))
        victim.stop(signal.SIGKILL)
        killed = time.monotonic()
        assert await asyncio.wait_for(bystander, 10) == 200
        assert time.monotonic() - killed <= LEASE_S + 1.0
        # The dead replica's clients got an error, nothing else did.
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(o, httpx.TransportError) for o in outcomes), outcomes
        await eventually(lambda: _running(client, survivor, 0))
        await eventually(lambda: _journaled(client, [survivor], "slot_reclaimed", 2))
        events = (await client.get(survivor.url + "/concurrency/events")).json()["events"]
        assert "replica r0" in events[0]["detail"]


async def test_redis_stopped_mid_run_means_local_shares_then_the_global_limit_again(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    async with (
        cluster(tmp_path, upstream, redis, 3) as replicas,
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client,
    ):
        stop = asyncio.Event()
        failures: list[int] = []

        async def agent(i: int) -> None:
            while not stop.is_set():
                code = await stream(client, replicas[i % 3], f"r{i % 3}")
                if code != 200:
                    failures.append(code)

        agents = [asyncio.create_task(agent(i)) for i in range(12)]
        await asyncio.sleep(1.0)
        assert upstream.max_in_flight <= 4

        redis.stop()
        for replica in replicas:
            await eventually(functools.partial(_mode, client, replica, "fallback"))
            shown = await status(client, replica)
            assert shown["cluster"]["localLimit"] == 2  # ceil(4 / 3)
        metrics = (await client.get(replicas[0].url + "/metrics")).text
        assert 'sluice_cluster_fallback{provider="up"} 1.0' in metrics
        await asyncio.sleep(0.3)  # what each replica held at the switch has finished
        upstream.reset_maxima()
        await asyncio.sleep(1.5)
        assert max(upstream.max_per_replica.values()) <= 2, dict(upstream.max_per_replica)

        redis.start()
        for replica in replicas:
            await eventually(functools.partial(_mode, client, replica, "redis"))
        await asyncio.sleep(0.3)
        upstream.reset_maxima()
        await asyncio.sleep(1.5)
        assert upstream.max_in_flight <= 4
        shown = await status(client, replicas[1])
        assert shown["limit"] == 4
        assert shown["inFlight"] <= 4
        stop.set()
        await asyncio.wait_for(asyncio.gather(*agents), 10)
    assert failures == []


async def _mode(client: httpx.AsyncClient, replica: Server, mode: str) -> bool:
    return bool((await status(client, replica))["cluster"]["mode"] == mode)


def test_workers_are_refused_without_a_redis_url(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text('[[providers]]\nid = "up"\nbase_url = "http://127.0.0.1:9/v1"\nlimit = 2\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--workers" in lines[0]
    assert "cluster.redis_url" in lines[0]


async def test_workers_share_the_limit_through_redis(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    path, port = config(tmp_path, "w", upstream, redis.url, limit=2)
    server = await asyncio.to_thread(
        start, ["serve", "--config", str(path), "--workers", "2"], port
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            codes = await asyncio.gather(*(stream(client, server, "w") for _ in range(12)))
            assert codes == [200] * 12
            assert upstream.max_in_flight <= 2

            async def two_workers() -> bool:
                return len((await status(client, server))["instances"]) == 2

            await eventually(two_workers)
    finally:
        assert await asyncio.to_thread(server.stop) == 0


async def test_client_caps_hold_across_replicas(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    """SPEC 11: team-a (cap 1) floods both replicas; team-b (cap 1) is served beside
    it at once, and team-a never runs more than one request in the whole cluster."""
    digest_a = hashlib.sha256(b"key-a").hexdigest()
    digest_b = hashlib.sha256(b"key-b").hexdigest()
    clients = f"""
            [[clients]]
            id = "team-a"
            key_sha256 = "{digest_a}"
            max_in_flight = {{ up = 1 }}
            [[clients]]
            id = "team-b"
            key_sha256 = "{digest_b}"
            max_in_flight = {{ up = 1 }}
    """
    async with (
        cluster(tmp_path, upstream, redis, 2, limit=2, clients=clients) as replicas,
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as client,
    ):
        # The upstream counts by x-replica: here, by client.
        team_a = {"authorization": "Bearer key-a", "x-hold": "1", "x-tokens": "1"}
        flood = [
            asyncio.create_task(
                stream(
                    client,
                    replicas[i % 2],
                    "team-a",
                    {**team_a, "x-prompt-started-at": str(10**12 + i)},
                )
            )
            for i in range(6)
        ]
        await eventually(lambda: _queued(client, replicas[0], 5))
        shown = await status(client, replicas[1])
        assert shown["clients"][0] == {
            "clientId": "team-a",
            "inFlight": 1,
            "queued": 5,
            "maxInFlight": 1,
        }
        team_b = {"authorization": "Bearer key-b"}
        served = await asyncio.wait_for(
            asyncio.gather(*(stream(client, replicas[i % 2], "team-b", team_b) for i in range(4))),
            10,
        )
        assert served == [200] * 4
        assert not any(task.done() for task in flood)  # team-a still held at its cap
        upstream.hold.set()
        assert await asyncio.wait_for(asyncio.gather(*flood), 30) == [200] * 6
    assert upstream.max_per_replica["team-a"] == 1
    assert upstream.max_in_flight <= 2
