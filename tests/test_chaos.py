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
import contextlib
import random
import time

import httpx
import pytest

from proxy.tools import chaos
from proxy.tools.chaos import FAULT_RATES, STATUSES, Tally, chat, idle, unhandled
from tests.conftest import ProxyFactory
from tests.servers import Server, free_port, running
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

LIMIT = 4
COOLDOWN_MS = 100  # longer than the sim's usage lag (chaos.USAGE_LAG_MS, 30 ms)
RETRY_ON_429 = 2
QUEUE_TIMEOUT_S = 8.0
READ_TIMEOUT_S = 0.5  # shorter than a stall (chaos.STALL_S): a stall becomes a 504

REQUESTS = 300
CONCURRENCY = 100
SEED = 7
PROMPT_AGE_MS = 60_000  # prompts started up to a minute ago

# The longest a request can legitimately take: each admission (the first and one per
# retried 429) may wait out the queue timeout and then a read timeout, plus the
# stream itself; a little slack for a loaded CI machine.
DEADLINE_S = (RETRY_ON_429 + 1) * (QUEUE_TIMEOUT_S + READ_TIMEOUT_S + 0.3) + 3.0


def describe(tally: Tally, elapsed_s: float) -> str:
    """The figures of a run, for the assertion messages."""
    lines = [
        f"chaos: {tally.sent} requests, {CONCURRENCY} concurrent, in {elapsed_s:.1f} s",
        f"  responses by status        {dict(sorted(tally.statuses.items()))}",
        f"  error answers by type      {dict(sorted(tally.errors.items()))}",
        f"  transport errors           {dict(tally.transport_errors)}",
        f"  abandoned by the client    {dict(tally.abandoned)}",
        f"  without a response         {tally.without_response} (hung: {tally.hung})",
        f"  corrupted 200 bodies       {len(tally.corrupted)} "
        f"{[f'#{index}: {body!r}' for index, body in tally.corrupted[:3]]}",
        f"  malformed SSE passed on    {tally.malformed_passed}",
        f"  faults injected            {sum(tally.faults.values())} {tally.faults}",
        f"  highest upstream conc.     {tally.max_upstream} (limit {LIMIT})",
        f"  highest inFlight / queued  {tally.max_in_flight} / {tally.max_queued}",
        f"  limit restored after 429   {tally.limit_restores} times",
        f"  slowest request            {tally.slowest_s:.2f} s (deadline {DEADLINE_S:.1f} s)",
    ]
    return "\n".join(lines)


async def monitor(
    client: httpx.AsyncClient, proxy: Server, sim: Server, tally: Tally, stop: asyncio.Event
) -> None:
    """Poll both sides while the load runs, restoring the limit after each 429
    reduction, so the run keeps its pace."""
    while not stop.is_set():
        await chaos.poll(client, proxy.url, sim.url, LIMIT, tally)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def test_chaos_nothing_lost_nothing_leaked_never_over_the_limit(
    make_proxy: ProxyFactory,
) -> None:
    sim_port = free_port()
    with running(chaos.sim_args(sim_port, faults=FAULT_RATES, seed=SEED), sim_port) as sim:
        proxy = make_proxy(
            chaos.provider_toml(sim.url, limit=LIMIT, queue_timeout_s=QUEUE_TIMEOUT_S),
            server=f"upstream_read_timeout_s = {READ_TIMEOUT_S}",
            admission=chaos.admission_toml(cooldown_ms=COOLDOWN_MS, retry_on_429=RETRY_ON_429),
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
                    await chaos.one_request(
                        client, url, rng, tally, index=index, deadline_s=DEADLINE_S,
                        prompt_age_ms=PROMPT_AGE_MS, conversation_id=f"chaos-{index}",
                    )  # fmt: skip

            started = time.monotonic()
            await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
            elapsed_s = time.monotonic() - started
            stop.set()
            await watching

            await eventually(lambda: idle(watcher, proxy.url, sim.url), within=10)
            await chaos.finish(watcher, sim.url, tally)

        exit_code = proxy.stop()
        proxy_log = proxy.log()
    sim_log = sim.log()
    report = describe(tally, elapsed_s)
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
            chaos.provider_toml(sim.url, limit=1, queue_timeout_s=3), admission="cooldown_ms = 0"
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
            await eventually(lambda: idle(client, proxy.url, sim.url), within=5)
        assert unhandled(proxy.log()) == []


async def _status_is(client: httpx.AsyncClient, proxy: Server, key: str, value: int) -> bool:
    status = (await client.get(proxy.url + "/concurrency/status/sim")).json()
    return bool(status[key] == value)
