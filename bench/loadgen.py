"""The load generator: a minimal HTTP/1.1 keep-alive client on uvloop protocols.

httpx spends about a millisecond of CPU per request, more than the proxies under
test; this client writes pre-encoded request bytes and lets httptools (C) parse the
status line, headers and Content-Length or chunked body, so one core drives well
over ten thousand requests a second. For SSE it stamps the arrival of every read
and extracts each chunk's `bench_sent_ns` / `bench_sched_ns` with one regex.

Each phase runs in its own process (`python -m bench.loadgen PHASE ...`) pinned to
the load core and prints one JSON object; `bench/__main__.py` drives them.

Phases:
- `latency`: sequential non-streaming requests on one connection (p50/p99).
- `rps`: requests/s with C connections for a fixed duration.
- `stream`: sequential streams; time to first chunk and per-chunk relay delay.
- `streams`: N concurrent long streams; completed/failed/stalled, lag behind the
  upstream's schedule, and the RSS per open stream of the process `--pid`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import uvloop

from bench.upstream import CHUNK_FIELDS, raise_fd_limit

_STAMPS = re.compile(re.escape(CHUNK_FIELDS) + rb'(\d+),"bench_sched_ns":(\d+)')
_DONE = b"data: [DONE]"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class ConnectionFailed(Exception):
    """The connection closed or broke before the response was complete."""


@dataclass(slots=True)
class Response:
    """One response as the client saw it (times in ns)."""

    status: int = 0
    sent_ns: int = 0  # wall clock when the request was written
    first_event_ns: int = 0  # wall clock of the first SSE event (streams only)
    done_perf_ns: int = 0  # perf_counter_ns when the response was complete
    events: int = 0
    done: bool = False  # saw `data: [DONE]`
    relay_ns: list[int] = field(default_factory=list)  # arrival - bench_sent_ns
    behind_ns: list[int] = field(default_factory=list)  # arrival - bench_sched_ns
    sched_ns: list[int] = field(default_factory=list)  # bench_sched_ns


class Client(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._response = Response()
        self._stream = False
        self._buffer = b""
        self._now = 0
        self.closed = False

    @property
    def flowing(self) -> bool:
        """Whether the current stream has delivered its first chunk."""
        return self._response.events > 0

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def request(self, data: bytes, *, stream: bool = False) -> Response:
        """Write `data` (a whole request) and wait for the whole response."""
        if self._transport is None or self.closed:
            raise ConnectionFailed("connection closed")
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._response = Response(sent_ns=time.time_ns())
        self._stream = stream
        self._buffer = b""
        self._transport.write(data)
        return await waiter

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._now = time.time_ns()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"bad response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._fail(ConnectionFailed(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._waiter = None

    # --- httptools callbacks ---

    def on_headers_complete(self) -> None:
        self._response.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self._stream:
            return
        data = self._buffer + body if self._buffer else body
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return
        self._buffer = data[end + 2 :]
        complete = data[:end]
        response = self._response
        now = self._now
        stamps = _STAMPS.findall(complete)
        if stamps:
            if not response.events:
                response.first_event_ns = now
            response.events += len(stamps)
            relay, behind, scheds = response.relay_ns, response.behind_ns, response.sched_ns
            for sent, sched in stamps:
                relay.append(now - int(sent))
                scheduled = int(sched)
                behind.append(now - scheduled)
                scheds.append(scheduled)
        if _DONE in complete:
            response.done = True

    def on_message_complete(self) -> None:
        self._response.done_perf_ns = time.perf_counter_ns()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._response)


# ------------------------------------------------------------------ requests


def agent_history(messages: int = 200, kib: int = 100) -> list[dict[str, Any]]:
    """A coding agent's conversation deep in a task: a system prompt, the person's
    prompt, then rounds of assistant tool calls and tool results, `kib` KiB in all."""
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Fix the failing test in tests/test_app.py."},
    ]
    rounds = (messages - 2) // 2
    output = "x" * max(1, (kib * 1024) // max(1, rounds) - 160)
    for i in range(rounds):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "shell", "arguments": '{"cmd": "ls"}'},
        }
        history.append({"role": "assistant", "content": None, "tool_calls": [call]})
        history.append({"role": "tool", "tool_call_id": f"call_{i}", "content": output})
    return history


def chat_request(
    host: str,
    port: int,
    *,
    stream: bool,
    chunks: int = 0,
    interval_ms: int = 0,
    big: bool = False,
    prompt_header: bool = False,
) -> bytes:
    """The bytes of one `POST /v1/chat/completions`; `big`: a 200-message, 100 KiB agent
    conversation; `prompt_header`: with `X-Prompt-Started-At` (task age then needs no
    work)."""
    messages = agent_history() if big else [{"role": "user", "content": "Say hello."}]
    body = json.dumps(
        {"model": "bench-1", "messages": messages, "stream": stream},
        separators=(",", ":"),
    ).encode()
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"host: %s:%d" % (host.encode(), port),
        b"authorization: Bearer sk-bench",
        b"content-type: application/json",
        b"accept: text/event-stream" if stream else b"accept: application/json",
        b"content-length: %d" % len(body),
    ]
    if prompt_header:
        lines.append(b"x-prompt-started-at: %d" % (time.time_ns() // 1_000_000))
    if stream:
        lines.append(b"x-bench-chunks: %d" % chunks)
        lines.append(b"x-bench-interval-ms: %d" % interval_ms)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def ms(values_ns: Sequence[int], q: float) -> float:
    return percentile(values_ns, q) / 1e6


def delays(ttfb: Sequence[int], relay: Sequence[int], behind: Sequence[int]) -> dict[str, float]:
    """p50 and p99 in ms of the streams' times to first chunk, relay delays and lags
    behind the upstream's schedule."""
    return {
        "ttfb_p50_ms": ms(ttfb, 50),
        "ttfb_p99_ms": ms(ttfb, 99),
        "relay_p50_ms": ms(relay, 50),
        "relay_p99_ms": ms(relay, 99),
        "behind_p50_ms": ms(behind, 50),
        "behind_p99_ms": ms(behind, 99),
    }


class ProcWatch:
    """CPU seconds and RSS of other processes, read from /proc."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    @staticmethod
    def cpu_s(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            return float("nan")
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    @staticmethod
    def rss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return -1

    def cpu(self) -> list[float]:
        return [self.cpu_s(pid) for pid in self.pids]


def core_busy_s() -> list[float]:
    """Busy CPU seconds per core so far, from /proc/stat (idle and iowait excluded)."""
    out = []
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"cpu") and line[3:4].isdigit():
                    ticks = [int(x) for x in line.split()[1:9]]
                    out.append((sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK)
    except OSError:
        pass
    return out


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """CPU used by this process, the watched ones and each core over a stretch of
    wall time (the cores' total shows whether anything else ran meanwhile)."""

    def __init__(self, watch: ProcWatch) -> None:
        self.watch = watch
        self.wall = time.perf_counter()
        self.own = own_cpu_s()
        self.others = watch.cpu()
        self.cores = core_busy_s()

    def close(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        own = own_cpu_s() - self.own
        others = [b - a for a, b in zip(self.others, self.watch.cpu(), strict=True)]
        cores = [b - a for a, b in zip(self.cores, core_busy_s(), strict=True)]
        return {"wall_s": wall, "loadgen_cpu_s": own, "pids_cpu_s": others, "cores_busy_s": cores}


# ------------------------------------------------------------------ phases


async def phase_latency(
    host: str,
    port: int,
    n: int,
    warmup: int,
    pids: list[int],
    *,
    big: bool = False,
    prompt_header: bool = False,
) -> dict[str, Any]:
    """n sequential non-streaming requests on one keep-alive connection."""
    request = chat_request(host, port, stream=False, big=big, prompt_header=prompt_header)
    client = await Client.connect(host, port)
    errors = 0
    for _ in range(warmup):
        await client.request(request)
    latencies: list[int] = []
    window = Window(ProcWatch(pids))
    for _ in range(n):
        start = time.perf_counter_ns()
        response = await client.request(request)
        if response.status != 200:
            errors += 1
        latencies.append(response.done_perf_ns - start)
    usage = window.close()
    client.close()
    return {
        "requests": n,
        "errors": errors,
        "p50_ms": ms(latencies, 50),
        "p99_ms": ms(latencies, 99),
        "mean_ms": sum(latencies) / len(latencies) / 1e6,
        **usage,
    }


async def phase_rps(
    host: str, port: int, connections: int, duration_s: float, warmup_s: float, pids: list[int]
) -> dict[str, Any]:
    """Requests/s with `connections` clients sending back to back for `duration_s`."""
    request = chat_request(host, port, stream=False)
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    end = measure_from + duration_s
    counted = 0
    errors = 0
    latencies: list[int] = []

    async def worker() -> None:
        nonlocal counted, errors
        client: Client | None = None
        while loop.time() < end:
            try:
                if client is None or client.closed:
                    client = await Client.connect(host, port)
                start = time.perf_counter_ns()
                response = await client.request(request)
            except (ConnectionFailed, OSError):
                errors += 1
                client = None
                await asyncio.sleep(0.01)
                continue
            if loop.time() >= measure_from and loop.time() < end:
                if response.status == 200:
                    counted += 1
                    latencies.append(response.done_perf_ns - start)
                else:
                    errors += 1
        if client is not None:
            client.close()

    async def window() -> dict[str, Any]:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        opened = Window(ProcWatch(pids))
        await asyncio.sleep(max(0.0, end - loop.time()))
        return opened.close()

    watched = asyncio.ensure_future(window())
    await asyncio.gather(*(worker() for _ in range(connections)))
    usage = await watched
    return {
        "connections": connections,
        "requests": counted,
        "errors": errors,
        "rps": counted / duration_s,
        "p50_ms": ms(latencies, 50),
        "p99_ms": ms(latencies, 99),
        **usage,
    }


async def phase_stream(
    host: str, port: int, n: int, chunks: int, interval_ms: int, warmup: int, pids: list[int]
) -> dict[str, Any]:
    """n sequential streams on one connection: time to first chunk, relay delay."""
    request = chat_request(host, port, stream=True, chunks=chunks, interval_ms=interval_ms)
    client = await Client.connect(host, port)
    for _ in range(warmup):
        await client.request(request, stream=True)
    ttfb: list[int] = []
    relay: list[int] = []
    behind: list[int] = []
    failed = 0
    window = Window(ProcWatch(pids))
    for _ in range(n):
        response = await client.request(request, stream=True)
        if response.status != 200 or response.events != chunks or not response.done:
            failed += 1
            continue
        ttfb.append(response.first_event_ns - response.sent_ns)
        relay.extend(response.relay_ns)
        behind.extend(response.behind_ns)
    usage = window.close()
    client.close()
    return {
        "streams": n,
        "failed": failed,
        **delays(ttfb, relay, behind),
        **usage,
    }


async def phase_streams(
    host: str,
    port: int,
    n: int,
    chunks: int,
    interval_ms: int,
    grace_s: float,
    warmup: int,
    rss_pid: int | None,
    pids: list[int],
    on_idle: Callable[[], None] | None = None,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """n concurrent streams, each on its own connection, all started at once.

    A stream *fails* on a connection error, a non-200 answer or a truncated body; it
    *stalls* if it has not finished `grace_s` after its schedule ended. The delay
    of a chunk is its arrival minus its scheduled time at the upstream; *steady*
    figures count only chunks scheduled after every stream had its first chunk.
    RSS is sampled once every stream is flowing (or half way through the schedule,
    if later), after `warmup` short streams have loaded whatever loads lazily.
    """
    request = chat_request(host, port, stream=True, chunks=chunks, interval_ms=interval_ms)
    loop = asyncio.get_running_loop()
    duration_s = (chunks - 1) * interval_ms / 1000
    if warmup:
        client = await Client.connect(host, port)
        small = chat_request(host, port, stream=True, chunks=2, interval_ms=1)
        for _ in range(warmup):
            await client.request(small, stream=True)
        client.close()
        await asyncio.sleep(0.2)
    idle_rss = ProcWatch.rss_kib(rss_pid) if rss_pid else -1
    if on_idle is not None:
        on_idle()
    open_streams = 0
    unconnected = 0
    outcomes: dict[str, int] = {"completed": 0, "failed": 0, "stalled": 0}
    errors: dict[str, int] = {}
    clients: list[Client] = []
    completed: list[Response] = []
    started = loop.time()
    deadline = started + duration_s + grace_s

    async def one() -> None:
        nonlocal open_streams, unconnected
        client: Client | None = None
        counted_open = False
        try:
            client = await Client.connect(host, port)
            clients.append(client)
            open_streams += 1
            counted_open = True
            response = await asyncio.wait_for(
                client.request(request, stream=True), timeout=max(0.1, deadline - loop.time())
            )
        except TimeoutError:
            outcomes["stalled"] += 1
            return
        except (ConnectionFailed, OSError) as exc:
            outcomes["failed"] += 1
            unconnected += client is None
            kind = type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            return
        finally:
            if counted_open:
                open_streams -= 1
            if client is not None:
                client.close()
        if response.status != 200 or response.events != chunks or not response.done:
            outcomes["failed"] += 1
            kind = f"status {response.status}" if response.status != 200 else "truncated"
            errors[kind] = errors.get(kind, 0) + 1
            return
        outcomes["completed"] += 1
        completed.append(response)

    async def sample() -> tuple[int, int, float]:
        """RSS once all streams flow (or half way through, if later), capped at 90%."""
        half, latest = started + duration_s / 2, started + duration_s * 0.9
        while loop.time() < latest:
            ready = unconnected + sum(1 for c in clients if c.flowing or c.closed)
            if loop.time() >= half and ready >= n:
                break
            await asyncio.sleep(0.05)
        if on_sample is not None:
            on_sample()
        return (
            (ProcWatch.rss_kib(rss_pid) if rss_pid else -1),
            open_streams,
            loop.time() - started,
        )

    window = Window(ProcWatch(pids))
    sampled = asyncio.ensure_future(sample())
    await asyncio.gather(*(one() for _ in range(n)))
    mid_rss, open_at_sample, sampled_at = await sampled
    usage = window.close()
    per_stream = (
        (mid_rss - idle_rss) / open_at_sample
        if rss_pid and open_at_sample > 0 and mid_rss >= 0
        else float("nan")
    )
    ttfb = [r.first_event_ns - r.sent_ns for r in completed]
    relay = [d for r in completed for d in r.relay_ns]
    behind = [d for r in completed for d in r.behind_ns]
    all_flowing = max((r.first_event_ns for r in completed), default=0)
    steady = [
        d
        for r in completed
        for d, sched in zip(r.behind_ns, r.sched_ns, strict=True)
        if sched >= all_flowing
    ]
    return {
        "streams": n,
        **outcomes,
        "errors": errors,
        **delays(ttfb, relay, behind),
        "behind_max_ms": max(behind) / 1e6 if behind else float("nan"),
        "steady_chunks": len(steady),
        "steady_p50_ms": ms(steady, 50),
        "steady_p99_ms": ms(steady, 99),
        "idle_rss_kib": idle_rss,
        "mid_rss_kib": mid_rss,
        "rss_sampled_at_s": sampled_at,
        "open_at_sample": open_at_sample,
        "rss_kib_per_stream": per_stream,
        **usage,
    }


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("phase", choices=["latency", "rps", "stream", "streams"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", type=int, default=2000, help="requests or streams")
    parser.add_argument("--warmup", type=int, default=200, help="requests or streams")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (rps)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds (rps)")
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--grace", type=float, default=15.0, help="seconds (streams)")
    parser.add_argument("--rss-pid", type=int, help="process whose RSS per stream to report")
    parser.add_argument("--pids", default="", help="comma-separated pids whose CPU to report")
    parser.add_argument(
        "--big", action="store_true", help="latency: a 200-message, 100 KiB agent conversation"
    )
    parser.add_argument(
        "--prompt-header", action="store_true", help="latency: send X-Prompt-Started-At"
    )
    return parser


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pids = [int(p) for p in args.pids.split(",") if p]
    if args.phase == "latency":
        return await phase_latency(
            args.host,
            args.port,
            args.n,
            args.warmup,
            pids,
            big=args.big,
            prompt_header=args.prompt_header,
        )
    if args.phase == "rps":
        return await phase_rps(
            args.host, args.port, args.connections, args.duration, args.warmup_s, pids
        )
    if args.phase == "stream":
        return await phase_stream(
            args.host, args.port, args.n, args.chunks, args.interval_ms, args.warmup, pids
        )
    return await phase_streams(
        args.host,
        args.port,
        args.n,
        args.chunks,
        args.interval_ms,
        args.grace,
        args.warmup,
        args.rss_pid,
        pids,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    # No collector pauses in the middle of a measurement; each phase is short-lived.
    gc.disable()
    result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
