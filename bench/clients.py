"""What client keys cost a request: the latency phase against sluice without
`[[clients]]` and with one client (the key the load generator sends, and a cap on the
provider), alternating, on one bench upstream.

Both proxies have a limit (10,000), so every request goes through the admission; with
clients each request is also authenticated (one SHA-256 and a dict lookup), loses its
credential header and is counted toward its client's cap. Prints JSON: the p50 and p99
of each run, and the median difference of the p50s in ms.

Run: `python -m bench.clients [--rounds 3] [-n 2000]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.targets import LOAD_CORE, PROXY_CORE, pin_self, placement, sluice_config
from bench.upstream import raise_fd_limit
from proxy.tools.process import Process, free_port, python, start

ROOT = Path(__file__).resolve().parents[1]
BENCH_KEY = b"sk-bench"  # what `bench.loadgen` sends as its Bearer token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    raise_fd_limit()
    place = placement()
    pin_self(place)
    clients = f"""
[[clients]]
id = "bench"
key_sha256 = "{hashlib.sha256(BENCH_KEY).hexdigest()}"
max_in_flight = {{ bench = 1000 }}
"""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-clients-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        processes: list[Process] = []
        try:
            processes.append(
                start(
                    "upstream",
                    place.prefix(LOAD_CORE)
                    + python("bench.upstream", "--port", str(upstream_port)),
                    upstream_port,
                    work,
                )
            )
            for round_ in range(args.rounds):
                for mode in ("off", "on"):
                    port = free_port()
                    config = sluice_config(
                        work / f"{mode}-{round_}.toml",
                        port,
                        upstream_port,
                        log_level="warning",
                        limit=10_000,
                        more=clients if mode == "on" else "",
                    )
                    proxy = start(
                        f"{mode}-{round_}",
                        place.prefix(PROXY_CORE)
                        + python("proxy", "serve", "--config", str(config)),
                        port,
                        work,
                    )
                    try:
                        runs[mode].append(_latency(place.prefix(LOAD_CORE), port, args))
                    finally:
                        proxy.stop()
        finally:
            for process in processes:
                process.stop()
    p50 = {mode: statistics.median(r["p50_ms"] for r in found) for mode, found in runs.items()}
    result = {
        "placement": place.note,
        "runs": runs,
        "p50_ms": p50,
        "added_p50_ms": p50["on"] - p50["off"],
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _latency(prefix: list[str], port: int, args: argparse.Namespace) -> dict[str, Any]:
    command = prefix + python(
        "bench.loadgen", "latency", "--port", str(port), "-n", str(args.n),
        "--warmup", str(args.warmup),
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


if __name__ == "__main__":
    raise SystemExit(main())
