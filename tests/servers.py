"""Start sluice processes (proxy or sim) on free loopback ports for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A running `python -m proxy ...` subprocess and the file its output goes to."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` and wait for the exit code (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(
    args: list[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/healthz",
    timeout: float = 20.0,
) -> Server:
    """Start `python -m proxy *args` and wait until GET `ready_path` answers 200."""
    log = Path(tempfile.mkstemp(prefix="sluice-", suffix=".log")[1])
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = Server(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become ready in {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def running(
    args: list[str], port: int, *, env: dict[str, str] | None = None, ready_path: str = "/healthz"
) -> Iterator[Server]:
    """`start` as a context manager that always stops the process."""
    server = start(args, port, env=env, ready_path=ready_path)
    try:
        yield server
    finally:
        server.stop()
