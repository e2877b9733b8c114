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
import collections
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/soak.py`
    sys.path.insert(0, str(ROOT))

from bench.targets import free_port  # noqa: E402
from proxy.sim import MALFORMED_JSON, MALFORMED_SSE, expected_content  # noqa: E402

FAULT_RATES = "reset=0.03,cut=0.04,stall=0.02,500=0.02,502=0.02,503=0.02,429=0.01,malformed=0.03"
TOKENS = 6
TOKEN_DELAY_MS = 5
LONG_TOKENS = 40
STALL_S = 2.0
USAGE_LAG_MS = 30
STATUSES = frozenset({200, 429, 500, 502, 503, 504})
UNHANDLED = ("Traceback", "Exception in ASGI application", "Task exception was never retrieved")


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
class Tally:
    sent: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: collections.Counter[str] = field(default_factory=collections.Counter)
    hung: int = 0
    corrupted: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    max_upstream: int = 0
    max_in_flight: int = 0
    max_queued: int = 0
    limit_restores: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    @property
    def without_response(self) -> int:
        ended = (
            sum(self.statuses.values())
            + sum(self.transport_errors.values())
            + sum(self.abandoned.values())
        )
        return self.sent - ended


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


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(args: list[str], port: int, log_path: Path) -> Process:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    process = Process(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"`sluice {args[0]}` exited with {proc.returncode}:\n{process.log()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(process.url + "/healthz", timeout=1).status_code == 200:
                return process
        time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"`sluice {args[0]}` did not become ready:\n{process.log()}")


@contextlib.contextmanager
def servers(plan: Plan, workdir: Path) -> Iterator[tuple[Process, Process]]:
    sim_port, proxy_port = free_port(), free_port()
    sim_args = ["sim", "--port", str(sim_port), "--tokens", str(TOKENS)]
    sim_args += ["--token-delay-ms", str(TOKEN_DELAY_MS), "--usage-lag-ms", str(USAGE_LAG_MS)]
    sim_args += ["--retry-after-s", "1", "--fault-rate", plan.faults, "--stall-s", str(STALL_S)]
    sim_args += ["--usage-fault", "flap", "--seed", str(plan.seed)]
    sim = start(sim_args, sim_port, workdir / "sim.log")
    config = workdir / "sluice.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            port = {proxy_port}
            database = "{workdir / "sluice.db"}"
            upstream_read_timeout_s = {plan.read_timeout_s}

            [admission]
            cooldown_ms = {plan.cooldown_ms}
            retry_on_429 = {plan.retry_on_429}
            pause_s = 1

            [[providers]]
            id = "sim"
            base_url = "{sim.url}/v1"
            limit = {plan.limit}
            usage_gate = true
            usage_poll_interval_ms = 50
            queue_timeout_s = {plan.queue_timeout_s}
            """
        )
    )
    try:
        proxy = start(["serve", "--config", str(config)], proxy_port, workdir / "proxy.log")
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
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- load -----------------------------------------------------------------------------------


def check_body(status: int, stream: bool, body: bytes, tally: Tally) -> None:
    """A 200 must carry the whole answer, or exactly the sim's malformed one."""
    if status != 200 or body in (b"".join(MALFORMED_SSE), MALFORMED_JSON):
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
        if text != expected_content(TOKENS):
            raise ValueError("wrong content")
    except (ValueError, KeyError, IndexError):
        tally.corrupted.append(repr(body[:80]))


async def one_request(
    client: httpx.AsyncClient, url: str, rng: random.Random, plan: Plan, tally: Tally
) -> None:
    stream = rng.random() < 0.75
    mode = rng.choices(["patient", "leaves waiting", "leaves streaming"], (0.88, 0.06, 0.06))[0]
    headers = {"x-prompt-started-at": str(int(time.time() * 1000) - rng.randrange(0, 5_000))}
    if mode == "leaves streaming":
        stream = True
        headers["x-sim-tokens"] = str(LONG_TOKENS)
    got_headers = asyncio.Event()
    body_json = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}]}

    async def exchange() -> None:
        async with client.stream(
            "POST", url, json={**body_json, "stream": stream}, headers=headers
        ) as response:
            got_headers.set()
            if mode == "leaves streaming" and response.status_code == 200:
                async for _ in response.aiter_raw():
                    tally.abandoned["streaming"] += 1
                    return
            body = await response.aread()
        tally.statuses[response.status_code] += 1
        check_body(response.status_code, stream, body, tally)

    started = time.monotonic()
    tally.sent += 1
    work = asyncio.ensure_future(exchange())
    try:
        async with asyncio.timeout(plan.deadline_s):
            if mode == "leaves waiting":
                await asyncio.wait({work}, timeout=rng.uniform(0.05, 1.5))
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
        tally.hung += 1
    finally:
        tally.slowest_s = max(tally.slowest_s, time.monotonic() - started)


async def watch(
    client: httpx.AsyncClient,
    sim: Process,
    proxy: Process,
    plan: Plan,
    tally: Tally,
    samples: list[Sample],
    stop: asyncio.Event,
    started: float,
) -> None:
    """Poll both sides every 0.2 s, restore the limit after 429 reductions, and sample
    the proxy's RSS every `plan.sample_s`."""
    next_sample = started
    while not stop.is_set():
        upstream = (await client.get(sim.url + "/sim/stats")).json()
        status = (await client.get(proxy.url + "/concurrency/status/sim")).json()
        tally.max_upstream = max(tally.max_upstream, upstream["maxInFlight"])
        tally.max_in_flight = max(tally.max_in_flight, status["inFlight"])
        tally.max_queued = max(tally.max_queued, status["queued"])
        if status["autoReduced"]:
            await client.put(proxy.url + "/concurrency/limits/sim", json={"limit": plan.limit})
            tally.limit_restores += 1
        now = time.monotonic()
        if now >= next_sample:
            sample = Sample(
                at_s=now - started,
                rss_mb=rss_mb(proxy.proc.pid),
                sent=tally.sent,
                ok=tally.statuses[200],
                in_flight=status["inFlight"],
                queued=status["queued"],
                limit=status["limit"],
            )
            samples.append(sample)
            print(row(sample), flush=True)
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


async def soak(plan: Plan, sim: Process, proxy: Process) -> tuple[Tally, list[Sample], bool]:
    tally = Tally()
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
                await one_request(client, url, rng, plan, tally)

        await asyncio.gather(*(worker() for _ in range(plan.clients)))
        stop.set()
        await watching
        idle = False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not idle:
            status = (await watcher.get(proxy.url + "/concurrency/status/sim")).json()
            upstream = (await watcher.get(sim.url + "/sim/stats")).json()
            idle = status["inFlight"] == 0 and status["queued"] == 0 and upstream["inFlight"] == 0
            await asyncio.sleep(0.1)
        final = (await watcher.get(sim.url + "/sim/stats")).json()
        tally.max_upstream = max(tally.max_upstream, final["maxInFlight"])
        tally.faults = final.get("faults", {})
        samples.append(
            Sample(
                at_s=time.monotonic() - started,
                rss_mb=rss_mb(proxy.proc.pid),
                sent=tally.sent,
                ok=tally.statuses[200],
                in_flight=status["inFlight"],
                queued=status["queued"],
                limit=status["limit"],
            )
        )
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
    tally: Tally,
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
    tracebacks = [line for line in proxy_log.splitlines() if any(m in line for m in UNHANDLED)]
    failures = []
    if tally.max_upstream > plan.limit:
        failures.append(f"upstream concurrency {tally.max_upstream} > limit {plan.limit}")
    if tally.without_response or tally.hung:
        failures.append(f"{tally.without_response} requests without a response")
    if tally.corrupted:
        failures.append(f"{len(tally.corrupted)} damaged 200 bodies, e.g. {tally.corrupted[0]}")
    if set(tally.statuses) - STATUSES:
        failures.append(f"unexpected statuses {sorted(set(tally.statuses) - STATUSES)}")
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
        f"  without a response          {tally.without_response} (past deadline: {tally.hung})",
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
    add("--fault-rate", default=FAULT_RATES, help="the sim's random faults (default: %(default)s)")
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
