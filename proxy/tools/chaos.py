"""The chaos rig: a `sluice sim` that fails on purpose, the proxy in front of it, and
clients that sometimes give up. `tests/test_chaos.py` runs it once, bounded;
`bench.soak` runs it for minutes and watches the proxy's memory.

The sim resets connections, cuts streams, stalls, answers 5xx and 429, sends malformed
SSE, and its `/v1/usage` flaps between garbage and good answers. Every request is
tallied: its status or transport error, whether its client gave up (while waiting or
mid-stream) or it outlived its deadline, and whether a 200 carried a damaged body.
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

from proxy.tools.sim import MALFORMED_JSON, MALFORMED_SSE, expected_content

FAULT_RATES = "reset=0.03,cut=0.04,stall=0.02,500=0.02,502=0.02,503=0.02,429=0.01,malformed=0.03"
TOKENS = 6
TOKEN_DELAY_MS = 5
USAGE_LAG_MS = 30  # shorter than the cooldown: the gate's view is never older than a slot
STALL_S = 2.0  # longer than the read timeout: a stall becomes a 504
STATUSES = frozenset({200, 429, 500, 502, 503, 504})
"""Every status a request may end with."""

STREAM_RATE = 0.75
# Clients that read to the end, give up while waiting, give up after the first chunk.
LEAVE_WEIGHTS = (0.88, 0.06, 0.06)
LONG_TOKENS = 40  # the streams of clients that leave mid-stream

FULL_CONTENT = expected_content(TOKENS)
MALFORMED_STREAM = b"".join(MALFORMED_SSE)
UNHANDLED = ("Traceback", "Exception in ASGI application", "Task exception was never retrieved")


def sim_args(port: int, *, faults: str, seed: int) -> list[str]:
    """`sluice sim` arguments: random `faults`, stalls, a flapping `/v1/usage`."""
    return [
        "sim",
        "--port", str(port),
        "--tokens", str(TOKENS),
        "--token-delay-ms", str(TOKEN_DELAY_MS),
        "--usage-lag-ms", str(USAGE_LAG_MS),
        "--retry-after-s", "1",
        "--fault-rate", faults,
        "--stall-s", str(STALL_S),
        "--usage-fault", "flap",
        "--seed", str(seed),
    ]  # fmt: skip


def admission_toml(*, cooldown_ms: int, retry_on_429: int) -> str:
    """The lines of the proxy's `[admission]` table."""
    return f"cooldown_ms = {cooldown_ms}\nretry_on_429 = {retry_on_429}\npause_s = 1\n"


def provider_toml(sim_url: str, *, limit: int, queue_timeout_s: float) -> str:
    """The sim as the proxy's provider `sim`, gated by its `/v1/usage`."""
    return (
        "[[providers]]\n"
        'id = "sim"\n'
        f'base_url = "{sim_url}/v1"\n'
        f"limit = {limit}\n"
        "usage_gate = true\n"
        "usage_poll_interval_ms = 50\n"
        f"queue_timeout_s = {queue_timeout_s}\n"
    )


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


@dataclass
class Tally:
    """What happened to every request, and what polling both sides saw meanwhile."""

    sent: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: collections.Counter[str] = field(default_factory=collections.Counter)
    hung: list[int] = field(default_factory=list)  # past their deadline, by index
    corrupted: list[tuple[int, bytes]] = field(default_factory=list)  # index, body's start
    malformed_passed: int = 0
    slowest_s: float = 0.0
    max_upstream: int = 0
    max_in_flight: int = 0
    max_queued: int = 0
    limit_restores: int = 0
    polls: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def without_response(self) -> int:
        """Requests that neither got a response, nor a transport error, nor were
        abandoned by their client on purpose (the hung ones among them): must be 0."""
        ended = self.answered + sum(self.transport_errors.values()) + sum(self.abandoned.values())
        return self.sent - ended


def check_body(status: int, stream: bool, body: bytes, tally: Tally, index: int) -> None:
    """A 200 must carry the whole answer, or exactly the sim's malformed one; an error
    answer is counted by status and type."""
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
            if events[-1] != "[DONE]":
                raise ValueError("no [DONE]")
            chunks = [json.loads(event) for event in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        else:
            text = json.loads(body)["choices"][0]["message"]["content"]
        if text != FULL_CONTENT:
            raise ValueError("wrong content")
    except (ValueError, KeyError, IndexError):
        tally.corrupted.append((index, body[:80]))


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    rng: random.Random,
    tally: Tally,
    *,
    index: int,
    deadline_s: float,
    prompt_age_ms: int,
    conversation_id: str | None = None,
) -> None:
    """One client, always bounded by `deadline_s`. Most read their answer to the end;
    some give up while still waiting (queued, or upstream before the headers), some
    after the first chunk of a longer stream. Its prompt started up to `prompt_age_ms`
    ago."""
    stream = rng.random() < STREAM_RATE
    mode = rng.choices(["patient", "leaves waiting", "leaves streaming"], LEAVE_WEIGHTS)[0]
    headers = {"x-prompt-started-at": str(int(time.time() * 1000) - rng.randrange(prompt_age_ms))}
    if conversation_id is not None:
        headers["x-conversation-id"] = conversation_id
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
        async with asyncio.timeout(deadline_s):
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


async def poll(
    client: httpx.AsyncClient, proxy_url: str, sim_url: str, limit: int, tally: Tally
) -> dict[str, Any]:
    """Look at both sides once; play the operator who restores the limit after a 429
    reduction, so the run keeps its pace. The proxy's status of the provider."""
    upstream = (await client.get(sim_url + "/sim/stats")).json()
    status: dict[str, Any] = (await client.get(proxy_url + "/concurrency/status/sim")).json()
    tally.polls += 1
    tally.max_upstream = max(tally.max_upstream, upstream["maxInFlight"])
    tally.max_in_flight = max(tally.max_in_flight, status["inFlight"])
    tally.max_queued = max(tally.max_queued, status["queued"])
    if status["autoReduced"]:
        restored = await client.put(proxy_url + "/concurrency/limits/sim", json={"limit": limit})
        restored.raise_for_status()
        tally.limit_restores += 1
    return status


async def idle(client: httpx.AsyncClient, proxy_url: str, sim_url: str) -> bool:
    """Whether nothing is in flight or queued at the proxy, nor in flight at the sim."""
    status = (await client.get(proxy_url + "/concurrency/status/sim")).json()
    upstream = (await client.get(sim_url + "/sim/stats")).json()
    return bool(status["inFlight"] == 0 and status["queued"] == 0 and upstream["inFlight"] == 0)


async def finish(client: httpx.AsyncClient, sim_url: str, tally: Tally) -> None:
    """Take the sim's final counts: its highest concurrency, the faults it injected."""
    final = (await client.get(sim_url + "/sim/stats")).json()
    tally.max_upstream = max(tally.max_upstream, final["maxInFlight"])
    tally.faults = final.get("faults", {})


def unhandled(log: str) -> list[str]:
    """The lines of `log` that show an unhandled exception."""
    return [line for line in log.splitlines() if any(marker in line for marker in UNHANDLED)]
