"""What cluster mode costs: the latency it adds to one request, and requests/s with
1, 2 and 4 workers sharing one limit through one Redis.

Every request takes a slot (the provider has a limit far above the load, so nobody
queues): single-process mode decides in memory, cluster mode with one script call to
admit and one to release. The upstream is `bench.upstream` (non-streaming answers),
the load comes from `bench.loadgen` in its own process, Redis is a throwaway
`redis-server` on a free port (no persistence).

Run: `python -m bench.cluster` (add `--quick` for a short run). Nothing is pinned:
the workers need every core the machine has, so the figures move with its load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.targets import sluice_config
from proxy.tools.process import ROOT, Process, free_port, python, start

LIMIT = 10_000
"""High enough that no request ever waits: the figures are the admission's cost."""


@dataclass(frozen=True)
class Target:
    label: str
    workers: int
    cluster: bool


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.cluster needs redis-server on the PATH")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def config(path: Path, port: int, upstream_port: int, redis_url: str) -> Path:
    cluster = f'\n[cluster]\nredis_url = "{redis_url}"\n' if redis_url else ""
    admission = "\n[admission]\ncooldown_ms = 0\n"
    return sluice_config(
        path, port, upstream_port, log_level="warning", limit=LIMIT, more=admission + cluster
    )


def loadgen(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        python("bench.loadgen", *args), capture_output=True, text=True, cwd=ROOT, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def serve(target: Target, work: Path, upstream_port: int, redis_url: str) -> Process:
    port = free_port()
    path = config(
        work / f"{target.label.replace(' ', '-')}.toml",
        port,
        upstream_port,
        redis_url if target.cluster else "",
    )
    command = python("proxy", "serve", "--config", str(path), "--workers", str(target.workers))
    return start(target.label.replace(" ", "-"), command, port, work)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-cluster-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = start(
            "upstream", python("bench.upstream", "--port", str(upstream_port)), upstream_port, work
        )
        try:
            with redis_server(work) as redis_url:
                targets = [Target("single-process", 1, False), Target("cluster 1 worker", 1, True)]
                targets += [Target(f"cluster {n} workers", n, True) for n in args.workers if n > 1]
                for target in targets:
                    proxy = serve(target, work, upstream_port, redis_url)
                    try:
                        row: dict[str, Any] = {"target": target.label, "workers": target.workers}
                        if target.workers == 1:
                            latency = loadgen(
                                "latency",
                                "--port",
                                str(proxy.port),
                                "-n",
                                str(args.requests),
                                "--warmup",
                                str(args.requests // 10),
                            )
                            row |= {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"]}
                        rps = loadgen(
                            "rps",
                            "--port",
                            str(proxy.port),
                            "--connections",
                            str(args.connections),
                            "--duration",
                            str(args.duration),
                            "--warmup-s",
                            "1",
                        )
                        row |= {"rps": rps["rps"], "rps_errors": rps["errors"]}
                        rows.append(row)
                        print(f"  {target.label}: done", file=sys.stderr)
                    finally:
                        proxy.stop()
        finally:
            upstream.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ("target", "workers", "p50 ms", "p99 ms", "requests/s", "errors")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["target"],
                str(row["workers"]),
                f"{row['p50_ms']:.3f}" if "p50_ms" in row else "-",
                f"{row['p99_ms']:.3f}" if "p99_ms" in row else "-",
                f"{row['rps']:.0f}",
                str(row["rps_errors"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    single = next((r for r in rows if r["target"] == "single-process"), None)
    one = next((r for r in rows if r["target"] == "cluster 1 worker"), None)
    if single and one:
        out.append(
            f"added latency of cluster mode: p50 +{one['p50_ms'] - single['p50_ms']:.3f} ms, "
            f"p99 +{one['p99_ms'] - single['p99_ms']:.3f} ms"
        )
    out.append(f"machine: {os.cpu_count()} cores, unpinned")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests")
    parser.add_argument("--connections", type=int, default=64, help="for requests/s")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rps run")
    parser.add_argument("--workers", default="1,2,4", help="worker counts for requests/s")
    parser.add_argument("--quick", action="store_true", help="500 requests, 2 s runs")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",")]
    if args.quick:
        args.requests, args.duration = 500, 2.0
    rows = measure(args)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
