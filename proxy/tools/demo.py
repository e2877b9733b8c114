"""`sluice demo`: the simulated upstream, the proxy in front of it, and a fleet of agents.

Everything runs in this one process on loopback ports. The sim has a hard cap of 4
concurrent sessions and an accounting lag; the proxy starts with a limit of 6, too
high on purpose, so the demo shows a 429 turning into a pause and a lower limit
while the agents' requests all complete.

The agents behave like coding agents: no `X-Prompt-Started-At`, each task a tool
loop (the sim answers with tool calls, the agent sends the history back with the
results), new tasks starting while older ones are mid-way. The same load runs twice:
with task age derived from the requests (the default), then in plain arrival order
(`derive_prompt_start = false`), and the summary compares the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
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
from proxy.tools.process import free_port
from proxy.tools.sim import SimApp, SimConfig

HARD_CAP = 4
START_LIMIT = 6


@dataclass
class DemoPlan:
    agents: int = 12
    tasks_per_agent: int = 2
    rounds: tuple[int, ...] = (0, 2, 5)  # tool rounds a task takes, drawn per task
    tokens: int = 8
    token_delay_ms: int = 20
    usage_lag_ms: int = 150
    cooldown_ms: int = 150


@dataclass
class Call:
    """One model call of an agent, as the agent saw it."""

    task: int
    task_started: float  # when the task's first call was sent (monotonic s)
    continuation: bool  # a tool round of a task already under way
    sent: float
    queue_ms: int
    source: str  # X-Sluice-Prompt-Source


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    client_429s: int = 0
    errors: int = 0
    queue_ms: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    task_s: dict[int, float] = field(default_factory=dict)  # task -> seconds to finish
    task_rounds: dict[int, int] = field(default_factory=dict)

    def ahead_of_newer(self) -> int:
        """Continuations admitted while a newer task's first call was waiting."""
        firsts = [c for c in self.calls if not c.continuation]
        count = 0
        for c in self.calls:
            if not c.continuation:
                continue
            admitted = c.sent + c.queue_ms / 1000
            if any(
                f.task_started > c.task_started and f.sent <= admitted < f.sent + f.queue_ms / 1000
                for f in firsts
            ):
                count += 1
        return count


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
    client: httpx.AsyncClient, plan: DemoPlan, tally: Tally, rng: random.Random, index: int
) -> None:
    """Run tasks one after another, each a tool loop, sending no priority header."""
    await asyncio.sleep(rng.random() * 1.5)
    for n in range(plan.tasks_per_agent):
        task = index * plan.tasks_per_agent + n
        rounds = rng.choice(plan.rounds)
        script = [{"name": "shell", "arguments": {"cmd": f"step {i}"}} for i in range(rounds)]
        headers = {"x-sim-tool-script": json.dumps(script)}
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": f"task {task}: fix the bug"},
        ]
        started = time.monotonic()
        tally.task_rounds[task] = rounds
        while True:
            tally.requests += 1
            sent = time.monotonic()
            body = {"model": "sim-1", "messages": messages}
            try:
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
            except httpx.HTTPError:
                tally.errors += 1
                break
            if response.status_code == 429:
                tally.client_429s += 1
                break
            if response.status_code != 200:
                tally.errors += 1
                break
            tally.completed += 1
            queue_ms = int(response.headers.get("x-sluice-queue-ms", "0"))
            tally.queue_ms.append(queue_ms)
            source = response.headers.get("x-sluice-prompt-source", "")
            tally.calls.append(Call(task, started, len(messages) > 2, sent, queue_ms, source))
            message = response.json()["choices"][0]["message"]
            if not message.get("tool_calls"):
                tally.task_s[task] = time.monotonic() - started
                break
            call = message["tool_calls"][0]
            messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]


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


def _percentile(values: list[int] | list[float], q: float) -> float:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Pass:
    """One run of the load: what the agents saw, and the proxy and sim at its end."""

    tally: Tally
    status: dict[str, Any]
    max_in_flight: int
    rate_limited: int


async def _one_pass(plan: DemoPlan, out: TextIO, *, derive: bool, watch: bool, first: bool) -> Pass:
    """The sim and a fresh proxy (a store of its own), the agents, and the result."""
    sim_port, proxy_port = free_port(), free_port()
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
                    "derive_prompt_start": derive,
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
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", timeout=120) as client,
        ):
            if first:
                out.write(
                    f"sim on :{sim_port} (hard cap {HARD_CAP}, accounting lag "
                    f"{plan.usage_lag_ms} ms), sluice on :{proxy_port} (limit {START_LIMIT}, "
                    f"cooldown {plan.cooldown_ms} ms)\n\n"
                )
                await _stream_one(client, out)
                sim.reset()
            tally = Tally()
            rng = random.Random(7)  # the same load in both passes
            done = asyncio.Event()
            watcher = asyncio.create_task(_watch(client, sim, out, done)) if watch else None
            await asyncio.gather(*(_agent(client, plan, tally, rng, i) for i in range(plan.agents)))
            done.set()
            if watcher is not None:
                await watcher
            status = (await client.get("/concurrency/status/sim")).json()
    return Pass(tally, status, sim.stats.max_in_flight, sim.stats.rate_limited)


async def run_demo(plan: DemoPlan, out: TextIO) -> Tally:
    tasks = plan.agents * plan.tasks_per_agent
    out.write(
        f"{plan.agents} agents, {tasks} tasks of {'/'.join(map(str, plan.rounds))} tool "
        "rounds, no X-Prompt-Started-At header; sluice derives each prompt's start:\n"
    )
    derived = await _one_pass(plan, out, derive=True, watch=True, first=True)
    out.write("\nThe same load again in plain arrival order (derive_prompt_start = false)...\n")
    arrival = await _one_pass(plan, out, derive=False, watch=False, first=False)
    _summary(plan, derived, arrival, out)
    return derived.tally


def _summary(plan: DemoPlan, derived: Pass, arrival: Pass, out: TextIO) -> None:
    d, a = derived.tally, arrival.tally
    longest = max(plan.rounds)

    def finish(tally: Tally, q: float) -> str:
        return f"{_percentile(list(tally.task_s.values()), q):.1f} s"

    def long_mean(tally: Tally) -> str:
        long = [s for task, s in tally.task_s.items() if tally.task_rounds[task] == longest]
        return f"{sum(long) / len(long):.1f} s" if long else "-"

    sources = sorted({c.source for c in d.calls if c.source})
    rows = [
        ("", "task age", "arrival order"),
        ("continuations admitted ahead of newer tasks", d.ahead_of_newer(), a.ahead_of_newer()),
        ("time to finish a task, p50", finish(d, 0.5), finish(a, 0.5)),
        ("time to finish a task, p99", finish(d, 0.99), finish(a, 0.99)),
        (f"mean time to finish the longest tasks ({longest} rounds)", long_mean(d), long_mean(a)),
    ]
    p50, p99 = _percentile(d.queue_ms, 0.5), _percentile(d.queue_ms, 0.99)
    lines = [
        "",
        "summary",
        f"  requests                      {d.requests} "
        f"({d.completed} completed, {d.errors} errors)",
        f"  429s seen by clients          {d.client_429s}",
        f"  429s from the upstream        {derived.rate_limited} (sluice paused and retried)",
        f"  highest upstream concurrency  {derived.max_in_flight} (hard cap {HARD_CAP})",
        f"  queue wait                    p50 {p50:.0f} ms, p99 {p99:.0f} ms",
        f"  prompt sources                {', '.join(sources)}",
        f"  limit now                     {derived.status['limit']}",
    ]
    if derived.status.get("notice"):
        lines.append(f"  notice                        {derived.status['notice']}")
    lines += ["", "task age against arrival order (the same load)"]
    lines += [f"  {name:<55} {x!s:>10} {y!s:>14}" for name, x, y in rows]
    out.write("\n".join(lines) + "\n")


def main(plan: DemoPlan | None = None, out: TextIO = sys.stdout) -> int:
    logs.configure("console", "warning", stream=out)
    tally = asyncio.run(run_demo(plan or DemoPlan(), out))
    return 0 if tally.completed + tally.client_429s == tally.requests else 1
