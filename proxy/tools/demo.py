"""`sluice demo`: the simulated upstream, the proxy in front of it, and a burst of agents.

Everything runs in this one process on loopback ports. The sim has a hard cap of 4
concurrent sessions and an accounting lag; the proxy starts with a limit of 6, too
high on purpose, so the demo shows a 429 turning into a pause and a lower limit
while the agents' requests all complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
import uvicorn

from proxy.edge import logs
from proxy.edge.app import Sluice
from proxy.settings import Settings
from proxy.tools.sim import SimApp, SimConfig

HARD_CAP = 4
START_LIMIT = 6


@dataclass
class DemoPlan:
    agents: int = 24
    requests_per_agent: int = 2
    tokens: int = 24
    token_delay_ms: int = 25
    usage_lag_ms: int = 150
    cooldown_ms: int = 250


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    client_429s: int = 0
    errors: int = 0
    queue_ms: list[int] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _serving(app: Any, port: int, lifespan: Literal["on", "off"]) -> AsyncIterator[None]:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="error",
            access_log=False,
            loop="none",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # startup failed: raise its error
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def _stream_one(client: httpx.AsyncClient, out: TextIO) -> None:
    """One streamed completion, printed token by token as it arrives."""
    out.write("A streamed completion through the proxy, printed as it arrives:\n  ")
    body = {"model": "sim-1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                out.write(delta)
                out.flush()
    out.write("\n\n")


async def _agent(
    client: httpx.AsyncClient, plan: DemoPlan, tally: Tally, rng: random.Random
) -> None:
    # Scattered prompt start times: some agents are deep into a task (an old
    # prompt), others just started; sluice serves the oldest prompt first.
    prompt_started_at = int(time.time() * 1000) - rng.randint(0, 60_000)
    await asyncio.sleep(rng.random() * 0.5)
    body = {"model": "sim-1", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    headers = {"x-prompt-started-at": str(prompt_started_at)}
    for _ in range(plan.requests_per_agent):
        tally.requests += 1
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                if response.status_code == 429:
                    tally.client_429s += 1
                    continue
                if response.status_code != 200:
                    tally.errors += 1
                    continue
                tally.queue_ms.append(int(response.headers.get("x-sluice-queue-ms", "0")))
                async for _ in response.aiter_raw():
                    pass
                tally.completed += 1
        except httpx.HTTPError:
            tally.errors += 1


WATCH_COLUMNS = ("time", "inFlight", "running", "cooling", "queued", "upstream", "limit", "paused")
WATCH_LEGEND = (
    "inFlight = running + cooling: a finished request's slot cools down for cooldown_ms\n"
    "before it is reused, so `upstream` (what the sim sees) can be 0 while slots are held.\n"
)


async def _watch(proxy: httpx.AsyncClient, sim: SimApp, out: TextIO, done: asyncio.Event) -> None:
    out.write(WATCH_LEGEND)
    out.write(" ".join(f"{name:>8}" for name in WATCH_COLUMNS) + "\n")
    started = time.monotonic()
    while not done.is_set():
        status = (await proxy.get("/concurrency/status/sim")).json()
        row = (
            f"{time.monotonic() - started:.1f}",
            status["inFlight"],
            status["running"],
            status["cooling"],
            status["queued"],
            sim.stats.in_flight,
            status["limit"],
            str(status["paused"]).lower(),
        )
        out.write(" ".join(f"{cell:>8}" for cell in row) + "\n")
        out.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)


def _percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_demo(plan: DemoPlan, out: TextIO) -> Tally:
    sim_port, proxy_port = _free_port(), _free_port()
    sim = SimApp(
        SimConfig(
            port=sim_port,
            tokens=plan.tokens,
            token_delay_ms=plan.token_delay_ms,
            hard_cap=HARD_CAP,
            usage_lag_ms=plan.usage_lag_ms,
            retry_after_s=1,
        )
    )
    with tempfile.TemporaryDirectory(prefix="sluice-demo-") as tmp:
        settings = Settings.model_validate(
            {
                "server": {"port": proxy_port, "database": str(Path(tmp) / "demo.db")},
                "admission": {
                    "cooldown_ms": plan.cooldown_ms,
                    "retry_on_429": 5,
                    "pause_s": 1,
                },
                "providers": [
                    {
                        "id": "sim",
                        "base_url": f"http://127.0.0.1:{sim_port}/v1",
                        "limit": START_LIMIT,
                    }
                ],
            }
        )
        async with (
            _serving(sim, sim_port, "off"),
            _serving(Sluice(settings), proxy_port, "on"),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", timeout=60) as client,
        ):
            out.write(
                f"sim on :{sim_port} (hard cap {HARD_CAP}, accounting lag {plan.usage_lag_ms} ms), "
                f"sluice on :{proxy_port} (limit {START_LIMIT}, cooldown {plan.cooldown_ms} ms)\n\n"
            )
            await _stream_one(client, out)
            sim.reset()
            out.write(
                f"{plan.agents} agents x {plan.requests_per_agent} streamed requests, "
                "prompt start times scattered over the last minute:\n"
            )
            tally = Tally()
            rng = random.Random(7)
            done = asyncio.Event()
            watcher = asyncio.create_task(_watch(client, sim, out, done))
            await asyncio.gather(*(_agent(client, plan, tally, rng) for _ in range(plan.agents)))
            done.set()
            await watcher
            status = (await client.get("/concurrency/status/sim")).json()
    p50, p99 = _percentile(tally.queue_ms, 0.5), _percentile(tally.queue_ms, 0.99)
    lines = [
        "",
        "summary",
        f"  requests                      {tally.requests} "
        f"({tally.completed} completed, {tally.errors} errors)",
        f"  429s seen by clients          {tally.client_429s}",
        f"  429s from the upstream        {sim.stats.rate_limited} (sluice paused and retried)",
        f"  highest upstream concurrency  {sim.stats.max_in_flight} (hard cap {HARD_CAP})",
        f"  queue wait                    p50 {p50} ms, p99 {p99} ms",
        f"  limit now                     {status['limit']}",
    ]
    if status.get("notice"):
        lines.append(f"  notice                        {status['notice']}")
    out.write("\n".join(lines) + "\n")
    return tally


def main(plan: DemoPlan | None = None, out: TextIO = sys.stdout) -> int:
    logs.configure("console", "warning", stream=out)
    tally = asyncio.run(run_demo(plan or DemoPlan(), out))
    return 0 if tally.completed + tally.client_429s == tally.requests else 1
