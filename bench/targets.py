"""The processes of a benchmark run: the upstream and the targets, pinned to cores.

The upstream and the load generator share the load core (0); the proxy under test
gets the other one (1) to itself. `taskset` does the pinning; without it (or with
one core) everything runs unpinned and the placement says so.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import core_busy_s
from proxy.tools.process import Process, free_port, python, start

LOAD_CORE = 0
PROXY_CORE = 1


@dataclass(frozen=True)
class Placement:
    """Which core runs what, as the report states it."""

    pinned: bool
    note: str

    def prefix(self, core: int) -> list[str]:
        """The command prefix that pins a child to `core` (empty when unpinned)."""
        return ["taskset", "-c", str(core)] if self.pinned else []


def placement() -> Placement:
    cores = os.cpu_count() or 1
    if shutil.which("taskset") is None:
        return Placement(False, "unpinned: `taskset` is not installed")
    if cores < 2:
        return Placement(False, f"unpinned: only {cores} core")
    return Placement(
        True,
        f"taskset: upstream + load generator on core {LOAD_CORE}, "
        f"proxy under test on core {PROXY_CORE}",
    )


def pin_self(place: Placement) -> None:
    """Keep the orchestrator (mostly idle) off the proxy's core."""
    if place.pinned:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {LOAD_CORE})


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu: str
    python: str
    kernel: str
    date: str
    fd_limit: int
    load_before: str  # /proc/loadavg at start
    busy_before_pct: list[float]  # per-core busy % over a second before the run


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def core_busy_pct(seconds: float) -> list[float]:
    """How busy each core was over the next `seconds`, in %."""
    before, started = core_busy_s(), time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    return [100 * (b - a) / wall for a, b in zip(before, core_busy_s(), strict=False)]


def machine(fd_limit: int) -> Machine:
    busy = core_busy_pct(1.0)
    load = ["?"]
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    return Machine(
        cores=os.cpu_count() or 1,
        cpu=cpu_model(),
        python=platform.python_version(),
        kernel=platform.release(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        fd_limit=fd_limit,
        load_before=" ".join(load),
        busy_before_pct=[round(b, 1) for b in busy],
    )


def wait_idle(max_wait_s: float, busy_pct: float = 15.0) -> float | None:
    """Wait until no core is more than `busy_pct` busy over half a second (other
    sessions share this machine); the seconds waited, or None if it never was."""
    began = time.monotonic()
    while True:
        busy = core_busy_pct(0.5)
        waited = time.monotonic() - began
        if max(busy, default=0.0) <= busy_pct:
            return waited
        if waited >= max_wait_s:
            return None


# ------------------------------------------------------------------ the targets


@dataclass(frozen=True)
class TargetSpec:
    """One thing to measure. `phases` limits what runs against it."""

    key: str
    label: str
    phases: frozenset[str] = field(
        default_factory=lambda: frozenset({"latency", "rps", "stream", "streams"})
    )


def sluice_config(
    path: Path,
    port: int,
    upstream_port: int,
    *,
    log_level: str,
    limit: int | None,
    more: str = "",
) -> Path:
    """A TOML config with one provider pointing at the bench upstream; `more` (further
    tables) follows it."""
    limit_line = f"limit = {limit}\n" if limit is not None else ""
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
database = "{path.with_suffix(".db")}"
log_level = "{log_level}"

[[providers]]
id = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
default = true
{limit_line}{more}"""
    )
    return path


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream bench {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_target(
    spec: TargetSpec, place: Placement, upstream_port: int, work: Path, run: int = 0
) -> Process:
    """Start the process for `spec` pinned to the proxy core (not for `direct`)."""
    port = free_port()
    pin = place.prefix(PROXY_CORE)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    if spec.key == "naive":
        command = pin + python(
            "bench.baselines.naive", "--port", str(port), "--upstream", upstream_url
        )
    elif spec.key.startswith("sluice"):
        config = sluice_config(
            work / f"{spec.key}.toml",
            port,
            upstream_port,
            # The default (`info`: an access line per request), as users run it.
            log_level="warning" if spec.key == "sluice_quiet" else "info",
            limit=10_000 if spec.key == "sluice_limited" else None,
        )
        command = pin + python("proxy", "serve", "--config", str(config))
    elif spec.key == "nginx":
        prefix = work / "nginx"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream_port=upstream_port))
        command = [*pin, "nginx", "-p", str(prefix), "-c", str(conf)]
    else:
        raise ValueError(f"no process for target {spec.key!r}")
    return start(f"{spec.key}-{run}", command, port, work)
