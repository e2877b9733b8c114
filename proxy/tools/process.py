"""Servers in subprocesses on loopback ports: start one, wait until it answers, stop it.

The benchmarks (`bench.targets`, `bench.soak`, `bench.cluster`, `bench.memory`) and the
end-to-end tests (`tests/servers.py`) start their servers with this module. It needs
nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The project root: subprocesses run here so `python -m bench...` and `-m proxy` import."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def python(module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Process:
    """A started server and the file its output goes to. Its pid is the server's own
    (`taskset` execs into it)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout_s: float = 10.0  # how long `stop` waits for an exit before SIGKILL

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int | None = 20) -> str:
        """The last `lines` lines of the log (all of it for None; "" if unreadable)."""
        with contextlib.suppress(OSError):
            text = self.log().splitlines()
            return "\n".join(text if lines is None else text[-lines:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send `sig` and wait for the exit code; SIGKILL if it has not exited after
        `timeout` seconds (default: `stop_timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(
    name: str,
    command: list[str],
    port: int,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 30.0,
    stop_timeout_s: float = 10.0,
    log_lines: int | None = 20,
) -> Process:
    """Start `command` in the project root, its output to `log_dir/<name>.log`, and wait
    until `GET /healthz` on `port` answers 200. `env` adds to the environment.

    RuntimeError, quoting the last `log_lines` lines of the log (None: all of it), if
    the process exits first or does not answer within `ready_timeout` (it is killed)."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
        )
    server = Process(name, port, proc, log_path, stop_timeout_s)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}:\n{server.log_tail(log_lines)}"
            )
        if _healthy(port):
            return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(
        f"{name} did not answer /healthz in {ready_timeout:g}s:\n{server.log_tail(log_lines)}"
    )


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
