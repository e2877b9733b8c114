"""Soak: the chaos invariants under sustained load, plus the proxy's memory over time.

    python -m bench.soak --minutes 3        (or: python bench/soak.py --minutes 3)

Starts `sluice sim` with random faults (resets, cuts, stalls, 5xx, 429s, malformed
SSE, a flapping `/v1/usage`) and `sluice serve` in front of it with a small limit, then
keeps `--clients` clients busy for `--minutes`: most read their answers to the end,
some give up while queued and some mid-stream. Meanwhile it polls the sim's true
concurrency and the proxy's status (restoring the limit after each 429 reduction, as
an operator would, so the run keeps its pace) and samples the proxy's resident memory
(VmRSS of the `sluice serve` process, from /proc) every `--sample-s` seconds.

Prints a table of samples and a summary, and exits 1 if an invariant broke: the
upstream's concurrency went above the limit, a request ended without a response or
past its deadline, a 200 carried a damaged body, the proxy did not come back to
`inFlight` = `queued` = 0, logged a traceback, or its RSS grew after the warm-up by
more than `--max-growth-mb`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/soak.py`
    sys.path.insert(0, str(ROOT))

from bench.loadgen import ProcWatch  # noqa: E402
from proxy.tools import chaos  # noqa: E402
from proxy.tools.process import Process, free_port, python, start  # noqa: E402


@dataclass(frozen=True)
class Plan:
    minutes: float
    clients: int
    limit: int
    cooldown_ms: int
    queue_timeout_s: float
    read_timeout_s: float
    retry_on_429: int
    sample_s: float
    warmup_s: float
    max_growth_mb: float
    seed: int
    faults: str

    @property
    def deadline_s(self) -> float:
        """The longest a request may take: every admission (the first, one per retried
        429) may wait out the queue timeout and a read timeout; plus slack."""
        per_try = self.queue_timeout_s + self.read_timeout_s + 0.5
        return (self.retry_on_429 + 1) * per_try + 5.0


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    sent: int
    ok: int
    in_flight: int
    queued: int
    limit: int | None


# --- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(plan: Plan, workdir: Path) -> Iterator[tuple[Process, Process]]:
    sim_port, proxy_port = free_port(), free_port()

    def sluice(name: str, args: list[str], port: int) -> Process:
        return start(
            name, python("proxy", *args), port, workdir, stop_timeout_s=30.0, log_lines=None
        )

    sim = sluice("sim", chaos.sim_args(sim_port, faults=plan.faults, seed=plan.seed), sim_port)
    config = workdir / "sluice.toml"
    config.write_text(
        "[server]\n"
        f"port = {proxy_port}\n"
        f'database = "{workdir / "sluice.db"}"\n'
        f"upstream_read_timeout_s = {plan.read_timeout_s}\n"
        "\n[admission]\n"
        + chaos.admission_toml(cooldown_ms=plan.cooldown_ms, retry_on_429=plan.retry_on_429)
        + "\n"
        + chaos.provider_toml(sim.url, limit=plan.limit, queue_timeout_s=plan.queue_timeout_s)
    )
    try:
        proxy = sluice("proxy", ["serve", "--config", str(config)], proxy_port)
    except BaseException:
        sim.stop()
        raise
    try:
        yield sim, proxy
    finally:
        proxy.stop()
        sim.stop()


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB (VmRSS from /proc/<pid>/status)."""
    kib = ProcWatch.rss_kib(pid)
    if kib < 0:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return kib / 1024


# --- load -----------------------------------------------------------------------------------


def take_sample(at_s: float, proxy: Process, tally: chaos.Tally, status: dict[str, Any]) -> Sample:
    return Sample(
        at_s=at_s,
        rss_mb=rss_mb(proxy.pid),
        sent=tally.sent,
        ok=tally.statuses[200],
        in_flight=status["inFlight"],
        queued=status["queued"],
        limit=status["limit"],
    )


async def watch(
    client: httpx.AsyncClient,
    sim: Process,
    proxy: Process,
    plan: Plan,
    tally: chaos.Tally,
    samples: list[Sample],
    stop: asyncio.Event,
    started: float,
) -> None:
    """Poll both sides every 0.2 s, restore the limit after 429 reductions, and sample
    the proxy's RSS every `plan.sample_s`."""
    next_sample = started
    while not stop.is_set():
        status = await chaos.poll(client, proxy.url, sim.url, plan.limit, tally)
        now = time.monotonic()
        if now >= next_sample:
            samples.append(take_sample(now - started, proxy, tally, status))
            print(row(samples[-1]), flush=True)
            next_sample += plan.sample_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def row(sample: Sample) -> str:
    return (
        f"{sample.at_s:>7.0f} {sample.rss_mb:>8.1f} {sample.sent:>8} {sample.ok:>8} "
        f"{sample.in_flight:>8} {sample.queued:>7} {sample.limit!s:>6}"
    )


HEADER = (
    f"{'t (s)':>7} {'RSS MB':>8} {'sent':>8} {'200':>8} {'inFlight':>8} {'queued':>7} {'limit':>6}"
)


async def soak(plan: Plan, sim: Process, proxy: Process) -> tuple[chaos.Tally, list[Sample], bool]:
    tally = chaos.Tally()
    samples: list[Sample] = []
    rng = random.Random(plan.seed)
    url = proxy.url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=plan.clients)
    print(HEADER, flush=True)
    async with (
        httpx.AsyncClient(timeout=None, limits=limits) as client,
        httpx.AsyncClient(timeout=10) as watcher,
    ):
        stop = asyncio.Event()
        started = time.monotonic()
        watching = asyncio.create_task(
            watch(watcher, sim, proxy, plan, tally, samples, stop, started)
        )
        end = started + plan.minutes * 60

        async def worker() -> None:
            while time.monotonic() < end:
                await chaos.one_request(
                    client, url, rng, tally, index=tally.sent, deadline_s=plan.deadline_s,
                    prompt_age_ms=5_000,
                )  # fmt: skip

        await asyncio.gather(*(worker() for _ in range(plan.clients)))
        stop.set()
        await watching
        idle = False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not idle:
            idle = await chaos.idle(watcher, proxy.url, sim.url)
            await asyncio.sleep(0.1)
        await chaos.finish(watcher, sim.url, tally)
        status = (await watcher.get(proxy.url + "/concurrency/status/sim")).json()
        samples.append(take_sample(time.monotonic() - started, proxy, tally, status))
        print(row(samples[-1]) + "   (after the load, idle)", flush=True)
    return tally, samples, idle


def slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares trend of RSS over the samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s.at_s / 60 for s in samples]
    ys = [s.rss_mb for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def summary(
    plan: Plan,
    tally: chaos.Tally,
    samples: list[Sample],
    start_mb: float,
    idle: bool,
    proxy_log: str,
) -> tuple[str, list[str]]:
    after_warmup = [s for s in samples if s.at_s >= plan.warmup_s] or samples[-1:]
    warm = after_warmup[0]
    end = samples[-1]
    growth = end.rss_mb - warm.rss_mb
    peak = max(s.rss_mb for s in after_warmup)
    # Still growing at the end is what a leak looks like; a step early on is warm-up.
    second_half = [s for s in samples if s.at_s >= samples[-1].at_s / 2] or samples[-1:]
    tracebacks = chaos.unhandled(proxy_log)
    failures = []
    if tally.max_upstream > plan.limit:
        failures.append(f"upstream concurrency {tally.max_upstream} > limit {plan.limit}")
    if tally.without_response or tally.hung:
        failures.append(f"{tally.without_response} requests without a response")
    if tally.corrupted:
        example = tally.corrupted[0][1]
        failures.append(f"{len(tally.corrupted)} damaged 200 bodies, e.g. {example!r}")
    if set(tally.statuses) - chaos.STATUSES:
        failures.append(f"unexpected statuses {sorted(set(tally.statuses) - chaos.STATUSES)}")
    if not idle:
        failures.append("inFlight/queued did not come back to 0")
    if tracebacks:
        failures.append(f"{len(tracebacks)} unhandled exceptions in the proxy log")
    if growth > plan.max_growth_mb:
        failures.append(f"RSS grew {growth:+.1f} MB after the warm-up")
    cuts = proxy_log.count("upstream failed mid-response")
    lines = [
        "",
        f"soak: {plan.minutes:g} min, {plan.clients} clients, limit {plan.limit}, "
        f"cooldown {plan.cooldown_ms} ms, seed {plan.seed}",
        f"  requests sent               {tally.sent}",
        f"  responses by status         {dict(sorted(tally.statuses.items()))}",
        f"  transport errors            {dict(tally.transport_errors)}",
        f"  abandoned by the client     {dict(tally.abandoned)}",
        f"  without a response          {tally.without_response} "
        f"(past deadline: {len(tally.hung)})",
        f"  damaged 200 bodies          {len(tally.corrupted)}",
        f"  faults injected             {sum(tally.faults.values())} {tally.faults}",
        f"  cuts reported by the proxy  {cuts} (warnings, no traceback: {len(tracebacks)})",
        f"  highest upstream conc.      {tally.max_upstream} (limit {plan.limit})",
        f"  highest inFlight / queued   {tally.max_in_flight} / {tally.max_queued}",
        f"  limit restored after 429    {tally.limit_restores} times",
        f"  slowest request             {tally.slowest_s:.2f} s (deadline {plan.deadline_s:.1f} s)",
        f"  RSS at start                {start_mb:.1f} MB",
        f"  RSS after warm-up           {warm.rss_mb:.1f} MB (at {warm.at_s:.0f} s)",
        f"  RSS at end                  {end.rss_mb:.1f} MB (peak after warm-up {peak:.1f} MB)",
        f"  growth after warm-up        {growth:+.1f} MB ({growth / warm.rss_mb:+.1%}), "
        f"trend {slope_mb_per_min(after_warmup):+.2f} MB/min",
        f"  second half of the run      {second_half[0].rss_mb:.1f} -> {end.rss_mb:.1f} MB, "
        f"trend {slope_mb_per_min(second_half):+.2f} MB/min",
        f"  verdict                     {'FAIL: ' + '; '.join(failures) if failures else 'PASS'}",
    ]
    return "\n".join(lines), failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--minutes", type=float, default=3.0, help="how long to load (default: %(default)s)")
    add("--clients", type=int, default=64, help="concurrent clients (default: %(default)s)")
    add("--limit", type=int, default=4, help="the provider's limit (default: %(default)s)")
    add("--cooldown-ms", type=int, default=100, help="admission cooldown (default: %(default)s)")
    add("--queue-timeout-s", type=float, default=10.0, help="(default: %(default)s)")
    add(
        "--read-timeout-s",
        type=float,
        default=0.5,
        help="upstream read timeout (default: %(default)s)",
    )
    add("--retry-on-429", type=int, default=2, help="(default: %(default)s)")
    add("--sample-s", type=float, default=5.0, help="RSS sampling period (default: %(default)s)")
    add(
        "--warmup-s",
        type=float,
        default=60.0,
        help="warm-up excluded from growth (default: %(default)s)",
    )
    add(
        "--max-growth-mb",
        type=float,
        default=8.0,
        help="allowed RSS growth after warm-up (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=7,
        help="seed for the clients and the sim's faults (default: %(default)s)",
    )
    add(
        "--fault-rate",
        default=chaos.FAULT_RATES,
        help="the sim's random faults (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan(
        minutes=args.minutes,
        clients=args.clients,
        limit=args.limit,
        cooldown_ms=args.cooldown_ms,
        queue_timeout_s=args.queue_timeout_s,
        read_timeout_s=args.read_timeout_s,
        retry_on_429=args.retry_on_429,
        sample_s=args.sample_s,
        warmup_s=args.warmup_s,
        max_growth_mb=args.max_growth_mb,
        seed=args.seed,
        faults=args.fault_rate,
    )
    with (
        tempfile.TemporaryDirectory(prefix="sluice-soak-") as tmp,
        servers(plan, Path(tmp)) as (
            sim,
            proxy,
        ),
    ):
        start_mb = rss_mb(proxy.proc.pid)
        tally, samples, idle = asyncio.run(soak(plan, sim, proxy))
        exit_code = proxy.stop()
        text, failures = summary(plan, tally, samples, start_mb, idle, proxy.log())
        if exit_code != 0:
            failures.append(f"the proxy exited with {exit_code}")
            text += f"\n  proxy exit code             {exit_code}"
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
