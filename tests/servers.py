"""Start sluice processes (proxy or sim) on free loopback ports for end-to-end tests.

The benchmarks start theirs the same way: `proxy/tools/process.py` does the work."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from proxy.tools import process
from proxy.tools.process import Process as Server
from proxy.tools.process import free_port

__all__ = ["Server", "free_port", "running", "start"]


def start(args: list[str], port: int, *, env: dict[str, str] | None = None) -> Server:
    """Start `python -m proxy *args` and wait until GET /healthz answers 200 (20 s at
    most). Its log is a file of its own; `stop` waits 15 s for an exit."""
    return process.start(
        "server",
        process.python("proxy", *args),
        port,
        Path(tempfile.mkdtemp(prefix="sluice-")),
        env=env,
        ready_timeout=20.0,
        stop_timeout_s=15.0,
        log_lines=None,
    )


@contextlib.contextmanager
def running(args: list[str], port: int, *, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`start` as a context manager that always stops the process."""
    server = start(args, port, env=env)
    try:
        yield server
    finally:
        server.stop()
