"""What the queued-stream keepalive costs (issue 15): N streaming requests queued
behind one held slot, with `queued_keepalive_s` on, against the same with it off.

    python -m bench.keepalive [--streams 1000] [--interval 1] [--seconds 20]

For each run it starts `sluice sim` and `sluice serve` (limit 1), holds the only slot
with one long stream, opens N streaming requests that all queue, waits until every one
has its first comment (keepalive on) or until all are queued (off), then reads the
proxy's CPU time from /proc over `--seconds` and the bytes each client received.
The figures are scaled to the interval asked for with `--scale-to` (default 15 s):
the cost is per tick, so it scales with 1 / interval. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.tools import process

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stream:
    """One raw HTTP/1.1 streaming request that counts what it receives."""

    def __init__(self) -> None:
        self.received = 0
        self.comments = 0
        self.first_comment = asyncio.Event()

    async def run(self, port: int, body: bytes, extra: str = "") -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                f"\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            ).encode()
            + body
        )
        try:
            while chunk := await reader.read(65536):
                self.received += len(chunk)
                found = chunk.count(b": queued")
                if found:
                    self.comments += found
                    self.first_comment.set()
        finally:
            writer.close()


async def measure(
    port: int, pid: int, streams: int, seconds: float, keepalive: bool
) -> dict[str, Any]:
    body = json.dumps(
        {"model": "sim-1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    holder = Stream()
    tasks = [
        asyncio.create_task(
            holder.run(port, body, "x-sim-tokens: 100000\r\nx-sim-token-delay-ms: 1000\r\n")
        )
    ]
    await asyncio.sleep(0.5)
    rss_before = rss_kib(pid)
    clients = [Stream() for _ in range(streams)]
    for client in clients:
        tasks.append(asyncio.create_task(client.run(port, body)))
    if keepalive:
        await asyncio.wait_for(asyncio.gather(*(c.first_comment.wait() for c in clients)), 120)
    else:
        await asyncio.sleep(5)
    await asyncio.sleep(1)
    rss_after = rss_kib(pid)
    received = sum(c.received for c in clients)
    comments = sum(c.comments for c in clients)
    cpu_before = cpu_s(pid)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    cpu = cpu_s(pid) - cpu_before
    elapsed = time.monotonic() - started
    received = sum(c.received for c in clients) - received
    comments = sum(c.comments for c in clients) - comments
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "cpu_s": cpu,
        "elapsed_s": elapsed,
        "bytes": received,
        "comments": comments,
        "rss_kib_per_stream": (rss_after - rss_before) / streams,
    }


def run(streams: int, interval: float, seconds: float, keepalive: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sluice-keepalive-"))
    sim_port = process.free_port()
    sim = process.start(
        "sim", process.python("proxy", "sim", "--port", str(sim_port)), sim_port, workdir
    )
    port = process.free_port()
    config = workdir / "sluice.toml"
    config.write_text(
        f"""
[server]
port = {port}
database = "{workdir / "sluice.db"}"
log_level = "warning"
[admission]
cooldown_ms = 0
queue_timeout_s = 3600
max_queue = {streams + 10}
queued_keepalive_s = {interval if keepalive else 0}
[[providers]]
id = "sim"
base_url = "http://127.0.0.1:{sim_port}/v1"
limit = 1
"""
    )
    proxy = process.start(
        "proxy", process.python("proxy", "serve", "--config", str(config)), port, workdir
    )
    try:
        return asyncio.run(measure(port, proxy.pid, streams, seconds, keepalive))
    finally:
        proxy.stop()
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scale-to", type=float, default=15.0)
    args = parser.parse_args()
    on = run(args.streams, args.interval, args.seconds, keepalive=True)
    off = run(args.streams, args.interval, args.seconds, keepalive=False)
    ticks = on["comments"]
    added_cpu = on["cpu_s"] - off["cpu_s"] * on["elapsed_s"] / off["elapsed_s"]
    per_tick_us = added_cpu / ticks * 1e6 if ticks else float("nan")
    scaled = args.streams / args.scale_to * added_cpu / ticks if ticks else float("nan")
    print(f"{args.streams} queued streams, keepalive every {args.interval:g} s:")
    print(f"  keepalive on : {json.dumps(on)}")
    print(f"  keepalive off: {json.dumps(off)}")
    print(f"  ticks measured: {ticks}; bytes per tick on the wire: {on['bytes'] / ticks:.1f}")
    print(f"  CPU per tick: {per_tick_us:.1f} µs (on minus off)")
    print(
        f"  at a {args.scale_to:g} s interval: {scaled * 100:.3f} % of one core for "
        f"{args.streams} streams, {on['bytes'] / ticks * args.streams / args.scale_to:.0f} B/s"
    )
    print(
        f"  memory per queued stream: {on['rss_kib_per_stream']:.1f} KiB on, "
        f"{off['rss_kib_per_stream']:.1f} KiB off"
    )


if __name__ == "__main__":
    main()
