"""Where an open stream's memory goes: sluice under tracemalloc with N streams open.

`python -m bench.memory [--streams 256]` starts the bench upstream and `sluice serve`
inside this module's `serve` wrapper, which runs tracemalloc and takes a snapshot on
each SIGUSR1. The load generator opens N streams; the snapshot taken once they all
flow is compared with the one taken after warm-up, and the difference per open
stream is printed as JSON, grouped by who allocated it, with the top lines.

tracemalloc sees Python objects and what C extensions allocate through Python's
allocators (uvloop's transports, the httptools parsers). An allocation made in a C
callback is charged to the last Python frame: a client connection's transport shows
up under asyncio's `runners.py` (the loop's `run`), the upstream connection's under
the line of sluice that opened it. RSS is higher than these figures by the
allocators' rounding and free space.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import phase_streams
from bench.targets import LOAD_CORE, PROXY_CORE, pin_self, placement, sluice_config
from bench.upstream import raise_fd_limit
from proxy.tools.process import free_port, python, start

OWNERS = (("sluice", f"{os.sep}proxy{os.sep}"), ("uvicorn", f"{os.sep}uvicorn{os.sep}"))
LOOP = "event loop (uvloop, asyncio)"
"""Who allocated a traced block: the innermost frame of sluice or uvicorn on its
traceback (an `asyncio.Event` uvicorn creates is uvicorn's); blocks with neither on
the traceback were allocated by the loop itself, e.g. a client connection's
transport when uvloop accepts it."""


def attribute(traceback: tracemalloc.Traceback) -> tuple[str, str]:
    """(owner, "file:line" of the owner's frame that asked for the block)."""
    innermost = traceback[-1]
    if innermost.filename.endswith(f"asyncio{os.sep}runners.py"):
        # No Python code of anyone's was running: uvloop's C code allocated it.
        return LOOP, "uvloop (C), under asyncio/runners.py"
    for frame in reversed(traceback):  # innermost first
        for name, part in OWNERS:
            if part in frame.filename:
                return name, f"{_short(frame.filename)}:{frame.lineno}"
    return LOOP, f"{_short(innermost.filename)}:{innermost.lineno}"


def serve(argv: list[str]) -> int:
    """`sluice serve argv...` under tracemalloc: the first SIGUSR1 takes the baseline,
    the second writes the per-stream difference to $BENCH_MEMORY_OUT."""
    out = Path(os.environ["BENCH_MEMORY_OUT"])
    streams = int(os.environ["BENCH_MEMORY_STREAMS"])
    tracemalloc.start(6)
    snapshots: list[tracemalloc.Snapshot] = []

    def snapshot(signum: int, frame: object) -> None:
        snapshots.append(tracemalloc.take_snapshot())
        if len(snapshots) == 2:
            # Written whole, then renamed: the driver waits for the file to appear.
            partial = out.with_suffix(".partial")
            partial.write_text(json.dumps(breakdown(snapshots[0], snapshots[1], streams)))
            partial.rename(out)

    signal.signal(signal.SIGUSR1, snapshot)
    from proxy.cli.main import main

    return main(["serve", *argv])


def breakdown(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, streams: int
) -> dict[str, Any]:
    by_owner: dict[str, float] = {}
    by_line: dict[tuple[str, str], list[float]] = {}
    for stat in after.compare_to(before, "traceback"):
        name, where = attribute(stat.traceback)
        by_owner[name] = by_owner.get(name, 0.0) + stat.size_diff
        line = by_line.setdefault((name, where), [0.0, 0.0])
        line[0] += stat.size_diff
        line[1] += stat.count_diff
    top = sorted(by_line.items(), key=lambda item: -item[1][0])[:15]
    return {
        "streams": streams,
        "traced_kib_per_stream": sum(by_owner.values()) / streams / 1024,
        "by_owner_kib": {
            name: size / streams / 1024
            for name, size in sorted(by_owner.items(), key=lambda item: -item[1])
        },
        "top": [
            {"owner": name, "where": where, "bytes": size / streams, "blocks": count / streams}
            for (name, where), (size, count) in top
        ],
    }


def _short(filename: str) -> str:
    """The path from the package on: `uvicorn/...`, `proxy/relay.py`, `asyncio/tasks.py`."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if "proxy" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("proxy") - 1 :])
    if len(parts) > 1 and parts[-2] == "asyncio":
        return "/".join(parts[-2:])
    return parts[-1] if parts else filename  # e.g. "<frozen abc>"


def profile(streams: int, chunks: int = 100, interval_ms: int = 50) -> dict[str, Any]:
    """Run the upstream and the traced proxy, open `streams` streams, return the
    breakdown."""
    place = placement()
    pin_self(place)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="sluice-memory-") as tmp:
        work = Path(tmp)
        up_port, port = free_port(), free_port()
        upstream = start(
            "upstream",
            place.prefix(LOAD_CORE) + python("bench.upstream", "--port", str(up_port)),
            up_port,
            work,
        )
        out = work / "memory.json"
        config = sluice_config(work / "sluice.toml", port, up_port, log_level="warning", limit=None)
        try:
            proxy = start(
                "sluice-traced",
                place.prefix(PROXY_CORE) + python("bench.memory", "serve", "--config", str(config)),
                port,
                work,
                env={"BENCH_MEMORY_OUT": str(out), "BENCH_MEMORY_STREAMS": str(streams)},
            )
        except BaseException:
            upstream.stop()
            raise

        def snap() -> None:
            os.kill(proxy.pid, signal.SIGUSR1)

        try:
            load = uvloop.run(
                phase_streams(
                    "127.0.0.1", port, streams, chunks, interval_ms, 15.0, 5, None, [],
                    on_idle=snap, on_sample=snap,
                )
            )  # fmt: skip
            deadline = time.monotonic() + 60
            while not out.exists():
                if time.monotonic() > deadline or not proxy.alive():
                    return {"error": f"no breakdown from the traced proxy: {proxy.log_tail(5)}"}
                time.sleep(0.1)
            result: dict[str, Any] = json.loads(out.read_text())
        finally:
            proxy.stop()
            upstream.stop()
    # tracemalloc slows the proxy down many times over, so streams finish late or
    # stall; what matters is how many were open when the snapshot was taken.
    result["open_at_snapshot"] = load["open_at_sample"]
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        return serve(args[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--streams", type=int, default=256)
    options = parser.parse_args(args)
    json.dump(profile(options.streams), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
