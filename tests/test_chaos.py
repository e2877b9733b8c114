"""Chaos: hundreds of clients through `sluice serve` against a sim that fails on purpose
(issue 7). Bounded: one run of a few hundred requests, well under 90 s.

The sim resets connections, cuts streams, stalls, answers 5xx and 429, sends malformed
SSE, and its `/v1/usage` flaps between garbage and good answers; some clients give up
while queued or mid-stream. Checked during the run and at the end:

- the upstream's true concurrency never goes above the limit (the sim's usage lag,
  30 ms, is shorter than the cooldown, 100 ms);
- every request ends with a response (any status) or a transport error the client can
  see, none later than its deadline; no 200 arrives with a body that is neither the
  full answer nor the sim's deliberately malformed one;
- `inFlight` and `queued` come back to 0;
- the proxy logs no unhandled exception (the mid-stream cuts, which the proxy reports
  itself and aborts the client's connection for, leave a warning and no traceback).

Run with `-s` to see the figures; they are also in every assertion message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from proxy.sim import MALFORMED_JSON, MALFORMED_SSE, expected_content
from tests.conftest import ProxyFactory
from tests.servers import Server, free_port, running
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

LIMIT = 4
COOLDOWN_MS = 100
USAGE_LAG_MS = 30  # shorter than the cooldown: the gate's view is never older than a slot
RETRY_ON_429 = 2
QUEUE_TIMEOUT_S = 8.0
READ_TIMEOUT_S = 0.5
STALL_S = 2.0  # longer than the read timeout: a stall becomes a 504
TOKENS = 6
TOKEN_DELAY_MS = 5

REQUESTS = 300
CONCURRENCY = 100
# Clients that read to the end, give up while waiting, give up after the first chunk.
LEAVE_WEIGHTS = (0.88, 0.06, 0.06)
LONG_TOKENS = 40  # the streams of clients that leave mid-stream
STREAM_RATE = 0.75
SEED = 7

FAULT_RATES = "reset=0.03,cut=0.04,stall=0.02,500=0.02,502=0.02,503=0.02,429=0.01,malformed=0.03"
# The longest a request can legitimately take: each admission (the first and one per
# retried 429) may wait out the queue timeout and then a read timeout, plus the
# stream itself; a little slack for a loaded CI machine.
DEADLINE_S = (RETRY_ON_429 + 1) * (QUEUE_TIMEOUT_S + READ_TIMEOUT_S + 0.3) + 3.0
STATUSES = frozenset({200, 429, 500, 502, 503, 504})

FULL_STREAM_CONTENT = expected_content(TOKENS)
MALFORMED_STREAM = b"".join(MALFORMED_SSE)


@dataclass
class Tally:
    """What happened to every request, and what the monitor saw meanwhile."""

    sent: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: collections.Counter[str] = field(default_factory=collections.Counter)
    hung: list[int] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    malformed_passed: int = 0
    slowest_s: float = 0.0
    max_upstream: int = 0
    max_in_flight: int = 0
    max_queued: int = 0
    limit_restores: int = 0
    polls: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def without_response(self) -> int:
        """Requests that neither got a response, nor a transport error, nor were
        abandoned by their client on purpose (the hung ones among them): must be 0."""
        ended = self.answered + sum(self.transport_errors.values()) + sum(self.abandoned.values())
        return self.sent - ended

    def report(self) -> str:
        lines = [
            f"chaos: {self.sent} requests, {CONCURRENCY} concurrent, in {self.elapsed_s:.1f} s",
            f"  responses by status        {dict(sorted(self.statuses.items()))}",
            f"  error answers by type      {dict(sorted(self.errors.items()))}",
            f"  transport errors           {dict(self.transport_errors)}",
            f"  abandoned by the client    {dict(self.abandoned)}",
            f"  without a response         {self.without_response} (hung: {self.hung})",
            f"  corrupted 200 bodies       {len(self.corrupted)} {self.corrupted[:3]}",
            f"  malformed SSE passed on    {self.malformed_passed}",
            f"  faults injected            {sum(self.faults.values())} {self.faults}",
            f"  highest upstream conc.     {self.max_upstream} (limit {LIMIT})",
            f"  highest inFlight / queued  {self.max_in_flight} / {self.max_queued}",
            f"  limit restored after 429   {self.limit_restores} times",
            f"  slowest request            {self.slowest_s:.2f} s (deadline {DEADLINE_S:.1f} s)",
        ]
        return "\n".join(lines)


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def check_body(status: int, stream: bool, body: bytes, tally: Tally, index: int) -> None:
    """A 200 must carry the whole answer, or exactly the sim's malformed one."""
    if status != 200:
        try:
            kind = json.loads(body)["error"]["type"]
        except (ValueError, KeyError, TypeError):
            kind = "unreadable"
        tally.errors[f"{status} {kind}"] += 1
        return
    if body in (MALFORMED_STREAM, MALFORMED_JSON):
        tally.malformed_passed += 1
        return
    try:
        if stream:
            events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(event) for event in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        else:
            text = json.loads(body)["choices"][0]["message"]["content"]
        assert text == FULL_STREAM_CONTENT
    except (AssertionError, ValueError, KeyError, IndexError):
        tally.corrupted.append(f"#{index}: {body[:80]!r}")


async def one_request(
    client: httpx.AsyncClient, url: str, index: int, rng: random.Random, tally: Tally
) -> None:
    """One client, always bounded by its deadline. Most read their answer to the end;
    some give up while still waiting (queued, or upstream before the headers), some
    after the first chunk of a longer stream."""
    stream = rng.random() < STREAM_RATE
    mode = rng.choices(["patient", "leaves waiting", "leaves streaming"], LEAVE_WEIGHTS)[0]
    headers = {
        "x-conversation-id": f"chaos-{index}",
        "x-prompt-started-at": str(int(time.time() * 1000) - rng.randrange(0, 60_000)),
    }
    if mode == "leaves streaming":
        stream = True
        headers["x-sim-tokens"] = str(LONG_TOKENS)
    patience_s = rng.uniform(0.05, 1.5)
    got_headers = asyncio.Event()

    async def exchange() -> None:
        async with client.stream("POST", url, json=chat(stream), headers=headers) as response:
            got_headers.set()
            if mode == "leaves streaming" and response.status_code == 200:
                async for _ in response.aiter_raw():
                    tally.abandoned["streaming"] += 1
                    return  # leaving the block closes the connection mid-stream
            body = await response.aread()
        tally.statuses[response.status_code] += 1
        check_body(response.status_code, stream, body, tally, index)

    started = time.monotonic()
    tally.sent += 1
    work = asyncio.ensure_future(exchange())
    try:
        async with asyncio.timeout(DEADLINE_S):
            if mode == "leaves waiting":
                await asyncio.wait({work}, timeout=patience_s)
                if not got_headers.is_set():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    tally.abandoned["waiting"] += 1
                    return
            await work
    except httpx.TransportError as exc:
        tally.transport_errors[type(exc).__name__] += 1
    except TimeoutError:
        work.cancel()
        tally.hung.append(index)
    finally:
        tally.slowest_s = max(tally.slowest_s, time.monotonic() - started)


async def monitor(
    client: httpx.AsyncClient, proxy: Server, sim: Server, tally: Tally, stop: asyncio.Event
) -> None:
    """Poll both sides while the load runs; play the operator who restores the limit
    after each 429 reduction, so the run keeps its pace."""
    while not stop.is_set():
        upstream = (await client.get(sim.url + "/sim/stats")).json()
        status = (await client.get(proxy.url + "/concurrency/status/sim")).json()
        tally.polls += 1
        tally.max_upstream = max(tally.max_upstream, upstream["maxInFlight"])
        tally.max_in_flight = max(tally.max_in_flight, status["inFlight"])
        tally.max_queued = max(tally.max_queued, status["queued"])
        if status["autoReduced"]:
            restored = await client.put(
                proxy.url + "/concurrency/limits/sim", json={"limit": LIMIT}
            )
            restored.raise_for_status()
            tally.limit_restores += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def idle(client: httpx.AsyncClient, proxy: Server, sim: Server) -> bool:
    status = (await client.get(proxy.url + "/concurrency/status/sim")).json()
    upstream = (await client.get(sim.url + "/sim/stats")).json()
    return bool(status["inFlight"] == 0 and status["queued"] == 0 and upstream["inFlight"] == 0)


def unhandled(log: str) -> list[str]:
    markers = ("Traceback", "Exception in ASGI application", "Task exception was never retrieved")
    return [line for line in log.splitlines() if any(marker in line for marker in markers)]


async def test_chaos_nothing_lost_nothing_leaked_never_over_the_limit(
    make_proxy: ProxyFactory,
) -> None:
    sim_port = free_port()
    sim_args = [
        "sim",
        "--port",
        str(sim_port),
        "--tokens",
        str(TOKENS),
        "--token-delay-ms",
        str(TOKEN_DELAY_MS),
        "--usage-lag-ms",
        str(USAGE_LAG_MS),
        "--retry-after-s",
        "1",
        "--fault-rate",
        FAULT_RATES,
        "--stall-s",
        str(STALL_S),
        "--usage-fault",
        "flap",
        "--seed",
        str(SEED),
    ]
    with running(sim_args, sim_port) as sim:
        proxy = make_proxy(
            f"""
            [[providers]]
            id = "sim"
            base_url = "{sim.url}/v1"
            limit = {LIMIT}
            usage_gate = true
            usage_poll_interval_ms = 50
            queue_timeout_s = {QUEUE_TIMEOUT_S}
            """,
            server=f"upstream_read_timeout_s = {READ_TIMEOUT_S}",
            admission=f"cooldown_ms = {COOLDOWN_MS}\nretry_on_429 = {RETRY_ON_429}\npause_s = 1",
        )
        tally = Tally()
        rng = random.Random(SEED)
        url = proxy.url + "/v1/chat/completions"
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=CONCURRENCY)
        async with (
            httpx.AsyncClient(timeout=None, limits=limits) as client,
            httpx.AsyncClient(timeout=5.0) as watcher,
        ):
            stop = asyncio.Event()
            watching = asyncio.create_task(monitor(watcher, proxy, sim, tally, stop))
            gate = asyncio.Semaphore(CONCURRENCY)

            async def bounded(index: int) -> None:
                async with gate:
                    await one_request(client, url, index, rng, tally)

            started = time.monotonic()
            await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
            tally.elapsed_s = time.monotonic() - started
            stop.set()
            await watching

            await eventually(lambda: idle(watcher, proxy, sim), within=10)
            final = (await watcher.get(sim.url + "/sim/stats")).json()
            tally.max_upstream = max(tally.max_upstream, final["maxInFlight"])
            tally.faults = final.get("faults", {})

        exit_code = proxy.stop()
        proxy_log = proxy.log()
    sim_log = sim.log()
    report = tally.report()
    print("\n" + report)

    assert tally.sent == REQUESTS, report
    assert tally.without_response == 0, report
    assert not tally.hung, report
    assert not tally.corrupted, report
    assert set(tally.statuses) <= STATUSES, report
    assert tally.max_upstream <= LIMIT, report
    assert tally.max_in_flight <= LIMIT, report
    assert tally.polls >= 10, report
    # The run really was chaotic: faults of every kind on the completions path, and
    # some clients gave up.
    assert tally.faults.get("cut", 0) > 0, report
    assert sum(tally.faults.values()) >= 20, report
    assert sum(tally.abandoned.values()) > 0, report
    assert tally.statuses[200] > REQUESTS // 2, report
    # The proxy invents no failure: each one it reports traces back to an injected fault.
    assert sum(tally.transport_errors.values()) <= tally.faults.get("cut", 0), report
    assert tally.errors["502 sluice_upstream_error"] <= tally.faults.get("reset", 0), report
    assert tally.errors["504 sluice_upstream_error"] <= tally.faults.get("stall", 0), report
    assert tally.statuses[429] <= tally.faults.get("429", 0), report
    # Clean logs: the cuts are reported as warnings, never as tracebacks.
    assert exit_code == 0, report
    assert unhandled(proxy_log) == [], report + "\n" + "\n".join(unhandled(proxy_log)[:5])
    assert "upstream failed mid-response" in proxy_log, report
    assert unhandled(sim_log) == [], report


async def test_a_usage_answer_too_deep_to_parse_means_no_information(
    make_proxy: ProxyFactory,
) -> None:
    sim_port = free_port()
    with running(["sim", "--port", str(sim_port), "--usage-fault", "nested"], sim_port) as sim:
        proxy = make_proxy(
            f"""
            [[providers]]
            id = "sim"
            base_url = "{sim.url}/v1"
            limit = 1
            usage_gate = true
            usage_poll_interval_ms = 50
            queue_timeout_s = 3
            """,
            admission="cooldown_ms = 0",
        )
        url = proxy.url + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as client:
            slow = {"x-sim-tokens": "10", "x-sim-token-delay-ms": "30"}
            first = asyncio.create_task(client.post(url, json=chat(False), headers=slow))
            await eventually(
                lambda: _status_is(client, proxy, "inFlight", 1), within=5
            )  # the fast path: no poll
            second = asyncio.create_task(client.post(url, json=chat(False)))
            await eventually(lambda: _status_is(client, proxy, "queued", 1), within=5)
            assert (await first).status_code == 200
            started = time.monotonic()
            answer = await second
            waited = time.monotonic() - started
            assert (answer.status_code, waited < 2.0) == (200, True), (answer.status_code, waited)
            await eventually(lambda: idle(client, proxy, sim), within=5)
        assert unhandled(proxy.log()) == []


async def _status_is(client: httpx.AsyncClient, proxy: Server, key: str, value: int) -> bool:
    status = (await client.get(proxy.url + "/concurrency/status/sim")).json()
    return bool(status[key] == value)
